#!/usr/bin/env bash
# Set up the environment (idempotent, see scripts/setup_env.sh) and run the whole test suite.
# Extra arguments go to pytest, e.g.  bash scripts/run_tests.sh -m "not slow"  or  -k assignment
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
# pytest exits 5 when it collects no test: that is a failure here, like any other non-zero code
exec "${VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"  # the environment setup_env.sh made (VENV)
