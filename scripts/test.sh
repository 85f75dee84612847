#!/usr/bin/env bash
# Install everything (scripts/setup.sh) and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh
python -m pytest -q --durations=25 "$@"
