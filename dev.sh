#!/usr/bin/env bash
# One entry point for a fresh machine that has only python3:
#   ./dev.sh demo   set up .venv, then run the whole pipeline on the built-in synthetic dataset with a local Ray
#   ./dev.sh test   set up .venv, then lint (ruff) and run the test suite
#   ./dev.sh setup  only set up .venv
# Set-up is skipped when .venv already matches pyproject.toml and constraints.txt.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${WEAKTR_VENV:-.venv}
CONSTRAINTS=${WEAKTR_CONSTRAINTS:-constraints.txt}

setup() {
    local stamp
    stamp=$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)
    if [[ -f "$VENV/.setup-stamp" && "$(cat "$VENV/.setup-stamp")" == "$stamp" ]]; then
        return
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        # The environment takes 6.2 GB (torch's CUDA build most of it): say so up front rather than let pip fail
        # half-way with "No space left on device".
        local free_gb
        mkdir -p "$(dirname "$VENV")"
        free_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 { print int($4 / 1048576) }')
        if (( free_gb < 7 )); then
            echo "dev.sh: the environment needs about 7 GB of disk and $(dirname "$VENV") has ${free_gb} GB" \
                 "free: free some, or set WEAKTR_VENV to a path on a disk with room" >&2
            exit 1
        fi
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" -e ".[test,pydensecrf,tracking]"
    echo "$stamp" > "$VENV/.setup-stamp"
}

cmd=${1:-}
shift || true
case "$cmd" in
    setup) setup ;;
    demo)
        setup
        exec "$VENV/bin/python" ray_jobs/pipeline.py --config configs/synthetic.yaml "$@" ;;
    test)
        setup
        # Many processes (Ray workers, DataLoader workers) share 2 cores: one BLAS thread each.
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        "$VENV/bin/python" -m ruff check .  # lint (pyproject.toml's [tool.ruff]) before the tests
        exec "$VENV/bin/python" -m pytest "$@" ;;
    *)
        echo "usage: ./dev.sh {demo|test|setup} [extra args]" >&2
        exit 2 ;;
esac
