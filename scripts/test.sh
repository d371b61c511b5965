#!/usr/bin/env bash
# The test command of the README (and of CI): set up, then run the whole suite. Extra args go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests (exit 5): nothing to run for these arguments"
    exit 0
fi
exit "$status"
