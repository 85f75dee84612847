#!/usr/bin/env bash
# Create .venv with mlx (CPU), mlx-lm and this package (editable, test extras),
# and install Debian's OpenBLAS, which makes MLX's fp32 matmuls ~21x faster on CPU.
# Idempotent; source scripts/env.sh afterwards (the other scripts do).
set -euo pipefail
cd "$(dirname "$0")/.."
OPENBLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [ ! -e "$OPENBLAS" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null \
    || echo "setup: could not install libopenblas0-pthread; MLX will use its slower reference BLAS" >&2
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# mlx[cpu] pulls the CPU backend on Linux; on macOS plain mlx uses Metal.
if [ "$(uname -s)" = Linux ]; then MLX_SPEC="mlx[cpu]"; else MLX_SPEC="mlx"; fi
.venv/bin/python -m pip install -q "$MLX_SPEC" -e ".[test]"
if [ "${OPTIQ_WITH_PEFT:-0}" = 1 ]; then
  # torch 2.13.0 (CPU) is served from this machine's disk; PEFT/transformers from PyPI.
  .venv/bin/python -m pip install -q "torch==2.13.0" peft
fi
echo "setup: .venv ready ($(.venv/bin/python -c 'import mlx.core as mx, mlx_lm; print("mlx", mx.__version__, "mlx-lm", mlx_lm.__version__)'))"
