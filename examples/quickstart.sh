#!/usr/bin/env bash
# Sensitivity-aware mixed-precision conversion, then a quality report against uniform 4-bit.
#
#   bash examples/quickstart.sh [MODEL]      MODEL: local path or hub id
#                                            (default ../shared/models/smollm2-135m-instruct-q4-exact)
#
# 1. stock mlx-lm: float reference (-d) and uniform 4-bit g64 (-q) of MODEL;
# 2. MLX_LM_OPTIQ=1 mlx_lm.convert: measure per-module sensitivity on calibration text and pick
#    3/4/5/6/8-bit x group 32/64/128 or nvfp4 per module at no more bits per weight than the
#    uniform 4-bit model (group ranges clipped by activation-weighted error, the default);
# 3. python -m mlx_lm_optiq.quality: PPL, KL and top-1 vs the float model on held-out text.
# Outputs go to out/quickstart/ (replaced on each run). Knobs (environment): OPTIQ_METHOD
# (fisher: fast default on CPU; exact: measured KL per module, slower), OPTIQ_SAMPLES,
# OPTIQ_SEQ_LEN, OPTIQ_EVAL_TOKENS, OPTIQ_EVAL_TEXT.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-../shared/models/smollm2-135m-instruct-q4-exact}"
METHOD="${OPTIQ_METHOD:-fisher}"
SAMPLES="${OPTIQ_SAMPLES:-16}"
SEQ_LEN="${OPTIQ_SEQ_LEN:-256}"
EVAL_TOKENS="${OPTIQ_EVAL_TOKENS:-2048}"
EVAL_TEXT="${OPTIQ_EVAL_TEXT:-../shared/data/text/emma.txt}"

bash scripts/setup.sh
. scripts/env.sh
OUT=out/quickstart
rm -rf "$OUT"
mkdir -p "$OUT"
stock() { env -u MLX_LM_OPTIQ mlx_lm.convert "$@"; }

echo "== 1/4 float reference and uniform 4-bit (stock mlx-lm)"
stock --hf-path "$MODEL" -d --dtype float16 --mlx-path "$OUT/float" >/dev/null
stock --hf-path "$OUT/float" -q --q-bits 4 --q-group-size 64 --mlx-path "$OUT/uniform-4bit-g64" >/dev/null
TARGET=$(python -c "
import sys
from mlx_lm.utils import load_model, compute_bits_per_weight
from pathlib import Path
print(f'{compute_bits_per_weight(load_model(Path(sys.argv[1]), lazy=True)[0]):.4f}')" "$OUT/uniform-4bit-g64")
echo "uniform 4-bit g64: $TARGET bits per weight -> mixed-precision target"

echo "== 2/4 sensitivity-aware conversion (MLX_LM_OPTIQ=1 mlx_lm.convert, $METHOD sensitivity)"
# Calibrate on the bundled set (Northanger Abbey, code, chat); evaluate on another novel.
MLX_LM_OPTIQ=1 mlx_lm.convert --hf-path "$MODEL" -q \
  --optiq-target-bpw "$TARGET" \
  --optiq-candidates 3:32,3:64,3:128,4:32,4:64,4:128,5:32,5:64,5:128,6:32,6:64,6:128,8:32,8:64,8:128,nvfp4:16 \
  --optiq-sensitivity-method "$METHOD" --optiq-num-samples "$SAMPLES" --optiq-sequence-length "$SEQ_LEN" \
  --mlx-path "$OUT/mixed"

echo "== 3/4 quality on held-out text ($EVAL_TEXT)"
python -m mlx_lm_optiq.quality --model "$OUT/uniform-4bit-g64" --model "$OUT/mixed" \
  --reference "$OUT/float" --text "$EVAL_TEXT" --num-tokens "$EVAL_TOKENS" --sequence-length 512 \
  --output "$OUT/eval.json"

echo "== 4/4 per-layer plot"
if python -c "import matplotlib" 2>/dev/null; then
  python -m mlx_lm_optiq.weights.plot "$OUT/mixed" --output "$OUT/mixed-bits.png"
else
  echo "matplotlib not installed: skipped the plot (pip install 'mlx-lm-optiq[plot]')"
fi
echo "done: $OUT/mixed (reload with stock mlx_lm.load), report $OUT/eval.json"
