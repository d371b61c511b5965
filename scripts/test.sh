#!/usr/bin/env bash
# The test command of the README (and of CI): set up, lint, build the docs, run the whole suite. Extra args go
# to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# lint, format and the docs site first: seconds, and a broken link or docstring reference fails here
.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || exit 1
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "${TMPDIR:-/tmp}/memory-peft-site" || exit 1
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests (exit 5): nothing to run for these arguments"
    exit 0
fi
exit "$status"
