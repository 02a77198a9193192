"""``python -m weaktr``: the ``weaktr`` command."""

import sys

from weaktr.cli import main

sys.exit(main())
