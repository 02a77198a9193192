"""One logging set-up for every entry point (the ``weaktr`` command, each ``ray_jobs/`` script) and for the Ray
workers and actors they start, so that weaktr's messages reach the console at the level the user chose:
``-v`` DEBUG, INFO by default, ``-q`` WARNING.

Library modules log through ``logging.getLogger(__name__)``; only entry points print results. Ray workers are other
processes: ``weaktr.launch.job_runtime_env`` hands them the level (``WEAKTR_LOG_LEVEL``) and ``configure_worker``
as their setup hook, and Ray forwards what they write to the driver's console (the job's log under ``ray job submit``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

LEVEL_ENV = "WEAKTR_LOG_LEVEL"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "weaktr-console"


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` and ``-q/--quiet`` on an entry point's command line (read by ``configure_from_args``)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    group.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def configure_from_args(args: argparse.Namespace) -> None:
    configure("DEBUG" if getattr(args, "verbose", False) else "WARNING" if getattr(args, "quiet", False) else "INFO")


class _ConsoleHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each message (redirected, or captured by a test), not as it was when
    the handler was made."""

    def __init__(self):
        super().__init__()
        self.set_name(_HANDLER_NAME)
        self.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))

    def filter(self, record: logging.LogRecord) -> bool:
        # Ray Train's workers put a handler named "console" on the root logger, which prints weaktr's records
        # (they propagate): this one steps aside there, or each line would show twice.
        root_console = any(handler.get_name() == "console" for handler in logging.getLogger().handlers)
        return not root_console and bool(super().filter(record))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ sets it
        pass


def configure(level: str) -> None:
    """weaktr's loggers at ``level`` on stderr, once per process (a second call only changes the level), and the
    level in ``WEAKTR_LOG_LEVEL`` for the processes this one starts (a local Ray's workers). Other libraries'
    loggers keep their own set-up; a handler on the root logger (the user's own) sees weaktr's messages too."""
    logger = logging.getLogger("weaktr")
    logger.setLevel(level)
    os.environ[LEVEL_ENV] = level
    if not any(handler.get_name() == _HANDLER_NAME for handler in logger.handlers):
        logger.addHandler(_ConsoleHandler())


def configure_worker() -> None:
    """Ray's ``worker_process_setup_hook``: the driver's level in every worker and actor of the job."""
    configure(os.environ.get(LEVEL_ENV, "INFO"))
