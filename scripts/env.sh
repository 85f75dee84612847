# Source me: activates .venv and preloads OpenBLAS when present (see scripts/setup.sh).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. .venv/bin/activate
OPENBLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [ -e "$OPENBLAS" ]; then export LD_PRELOAD="$OPENBLAS${LD_PRELOAD:+:$LD_PRELOAD}"; fi
export OPTIQ_SHARED="${OPTIQ_SHARED:-$(cd .. && pwd)/shared}"
