#!/usr/bin/env bash
# Sensitivity-aware mixed-precision conversion, then a quality report against uniform 4-bit and
# against mlx-lm's own GPTQ at the same size.
#
#   bash examples/quickstart.sh [MODEL]      MODEL: local path or hub id
#                                            (default ../shared/models/smollm2-135m-instruct-q4-exact)
#
# 1. stock mlx-lm: float reference (-d) and uniform 4-bit g64 (-q) of MODEL;
# 2. MLX_LM_OPTIQ=1 mlx_lm.convert with only --optiq-target-bpw (the uniform model's BPW): the
#    defaults measure per-module sensitivity on the bundled calibration text (on a CPU the Fisher
#    estimate on 16x256 tokens, on a GPU the exact sweep on 16x512), pick 3/4/5/6/8-bit x group
#    32/64/128 or nvfp4 per module, clip group ranges by activation-weighted error and round with
#    GPTQ; it prints in one line what it chose;
# 3. the anchor: mlx-lm's GPTQ (mlx_lm.quant.gptq), 4-bit g64, calibrated on the same text and
#    sizes (benchmarks/anchor.py); ours is re-planned from its sidecar at the anchor's BPW if
#    that differs (no second sweep);
# 4. python -m mlx_lm_optiq.quality: PPL, KL and top-1 vs the float model on held-out text.
# Outputs go to out/quickstart/ (replaced on each run). Knobs (environment), each passed only
# when set: OPTIQ_METHOD (exact|fisher), OPTIQ_SAMPLES, OPTIQ_SEQ_LEN; also OPTIQ_EVAL_TOKENS,
# OPTIQ_EVAL_TEXT, OPTIQ_ANCHOR=0 (skip step 3).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-../shared/models/smollm2-135m-instruct-q4-exact}"
EVAL_TOKENS="${OPTIQ_EVAL_TOKENS:-2048}"
EVAL_TEXT="${OPTIQ_EVAL_TEXT:-../shared/data/text/emma.txt}"
KNOBS=()
[ -n "${OPTIQ_METHOD:-}" ] && KNOBS+=(--optiq-sensitivity-method "$OPTIQ_METHOD")
[ -n "${OPTIQ_SAMPLES:-}" ] && KNOBS+=(--optiq-num-samples "$OPTIQ_SAMPLES")
[ -n "${OPTIQ_SEQ_LEN:-}" ] && KNOBS+=(--optiq-sequence-length "$OPTIQ_SEQ_LEN")

bash scripts/setup.sh
. scripts/env.sh
OUT=out/quickstart
rm -rf "$OUT"
mkdir -p "$OUT"
stock() { env -u MLX_LM_OPTIQ mlx_lm.convert "$@"; }
bpw() {
  python -c "
import sys
from mlx_lm.utils import load_model, compute_bits_per_weight
from pathlib import Path
print(f'{compute_bits_per_weight(load_model(Path(sys.argv[1]), lazy=True)[0]):.4f}')" "$1"
}

echo "== 1/5 float reference and uniform 4-bit (stock mlx-lm)"
stock --hf-path "$MODEL" -d --dtype float16 --mlx-path "$OUT/float" >/dev/null
stock --hf-path "$OUT/float" -q --q-bits 4 --q-group-size 64 --mlx-path "$OUT/uniform-4bit-g64" >/dev/null
TARGET=$(bpw "$OUT/uniform-4bit-g64")
echo "uniform 4-bit g64: $TARGET bits per weight -> mixed-precision target"

echo "== 2/5 sensitivity-aware conversion (MLX_LM_OPTIQ=1 mlx_lm.convert --optiq-target-bpw $TARGET ${KNOBS[*]:-})"
# Calibrates on the bundled set (Northanger Abbey, code, chat); evaluated on another novel.
START=$SECONDS
MLX_LM_OPTIQ=1 mlx_lm.convert --hf-path "$MODEL" -q --optiq-target-bpw "$TARGET" ${KNOBS[@]+"${KNOBS[@]}"} \
  --mlx-path "$OUT/mixed"
echo "mixed-precision convert: $((SECONDS - START)) s"
MODELS=(--model "$OUT/uniform-4bit-g64")

if [ "${OPTIQ_ANCHOR:-1}" != 0 ]; then
  echo "== 3/5 anchor: mlx-lm GPTQ 4-bit g64 on the same calibration text (benchmarks/anchor.py)"
  # the calibration sizes our convert used (its sidecar records them)
  read -r SAMPLES SEQ_LEN < <(python -c "
import json, sys
c = json.load(open(sys.argv[1]))['sensitivity']['calibration']
print(c['num_samples'], c['sequence_length'])" "$OUT/mixed/optiq_metadata.json")
  python benchmarks/anchor.py gptq --model "$OUT/float" --mlx-path "$OUT/mlx-lm-gptq-4bit-g64" \
    --num-samples "$SAMPLES" --sequence-length "$SEQ_LEN"
  MODELS+=(--model "$OUT/mlx-lm-gptq-4bit-g64")
  ANCHOR_BPW=$(bpw "$OUT/mlx-lm-gptq-4bit-g64")
  if [ "$ANCHOR_BPW" != "$TARGET" ]; then
    echo "anchor at $ANCHOR_BPW bits per weight: re-planning ours there from its sidecar"
    MLX_LM_OPTIQ=1 mlx_lm.convert --hf-path "$MODEL" -q --optiq-target-bpw "$ANCHOR_BPW" \
      --optiq-sensitivity "$OUT/mixed/optiq_metadata.json" --mlx-path "$OUT/mixed-at-anchor"
    MODELS+=(--model "$OUT/mixed-at-anchor")
  fi
else
  echo "== 3/5 anchor skipped (OPTIQ_ANCHOR=0)"
fi
MODELS+=(--model "$OUT/mixed")

echo "== 4/5 quality on held-out text ($EVAL_TEXT)"
python -m mlx_lm_optiq.quality "${MODELS[@]}" \
  --reference "$OUT/float" --text "$EVAL_TEXT" --num-tokens "$EVAL_TOKENS" --sequence-length 512 \
  --output "$OUT/eval.json"

echo "== 5/5 per-layer plot"
if python -c "import matplotlib" 2>/dev/null; then
  python -m mlx_lm_optiq.weights.plot "$OUT/mixed" --output "$OUT/mixed-bits.png"
else
  echo "matplotlib not installed: skipped the plot (pip install 'mlx-lm-optiq[plot]')"
fi
echo "done: $OUT/mixed (reload with stock mlx_lm.load), report $OUT/eval.json"
