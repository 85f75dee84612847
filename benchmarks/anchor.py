"""An mlx-lm learned quantizer as an anchor, calibrated on the same text as our convert.

    python benchmarks/anchor.py gptq --model FLOAT_DIR --mlx-path OUT [--bits 4 --group-size 64]
    python benchmarks/anchor.py awq  --model FLOAT_DIR --mlx-path OUT
    python benchmarks/anchor.py dwq  --model FLOAT_DIR --mlx-path OUT
    python benchmarks/anchor.py dwq  --model FLOAT_DIR --mlx-path OUT --student OURS_DIR   # DWQ on top of ours

Why this script: the quickstart compares our mixed-precision model with the strongest of
mlx-lm 0.32's learned quantizers that runs on a CPU in a few minutes (issue 13 item 4).
Their command lines calibrate on a dataset they download; the comparison is only fair on
the same calibration text as ours, so this calls their Python functions
(`mlx_lm.quant.gptq.gptq_quantize`, `mlx_lm.quant.awq.awq_quantize`,
`mlx_lm.quant.dwq.dwq_quantize`: distillation from the float model, its CLI's optimizer,
learning rate and batch size; the last `--dwq-valid` windows are its validation set) with the tokens our
convert calibrates on (`core.calibration.load_calibration`, the bundled set by default,
the same samples x tokens), and saves with stock `mlx_lm.utils.save`. Every module,
the tied embedding included, is written at `--bits`/`--group-size`, so the anchor has the
BPW of uniform `--bits`-bit g`--group-size` (printed, as `compute_bits_per_weight` counts it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DWQ_MAX_SAMPLES = 2048  # mlx_lm.dwq's --num-samples default


def _samples(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {value!r}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("method", choices=("gptq", "awq", "dwq"), help="mlx-lm's quantizer (mlx_lm.gptq/awq/dwq)")
    p.add_argument("--model", required=True, help="float model folder (e.g. the quickstart's out/quickstart/float)")
    p.add_argument("--mlx-path", required=True, help="output folder (a stock mlx-lm model)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calibration", default=None, help="calibration JSONL (default: the bundled set, as our convert)")
    p.add_argument(
        "--num-samples",
        type=_samples,
        default=16,
        help="calibration sequences (default 16, the CPU convert's); 'all': every window of --sequence-length "
        f"the calibration holds, at most {DWQ_MAX_SAMPLES} (mlx_lm.dwq's default)",
    )
    p.add_argument("--sequence-length", type=int, default=256, help="tokens per sequence (default 256, as above)")
    p.add_argument("--seed", type=int, default=123, help="mx.random seed (mlx-lm's CLI default)")
    p.add_argument("--dwq-valid", type=int, default=4, help="dwq: calibration windows held out for validation")
    p.add_argument("--dwq-learning-rate", type=float, default=1e-6, help="dwq: Adam learning rate (its CLI default)")
    p.add_argument("--dwq-batch-size", type=int, default=4, help="dwq: batch size (its CLI default)")
    p.add_argument(
        "--student",
        default=None,
        help="dwq: an already quantized model to distil instead of uniform --bits/--group-size (mlx_lm.dwq's "
        "--quantized-model), e.g. our mixed-precision convert: its formats and codes stay, DWQ trains its "
        "scales and biases against --model",
    )
    args = p.parse_args()
    if args.student is not None and args.method != "dwq":
        p.error("--student: only dwq distils an existing quantized model")

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import compute_bits_per_weight, load, save

    from mlx_lm_optiq.core.calibration import load_calibration

    start = time.perf_counter()
    mx.random.seed(args.seed)
    model, tokenizer, config = load(args.model, lazy=True, return_config=True)
    # Computed in float32 (MLX's CPU float16 matmuls do not use BLAS: the float16 Hessian pass of
    # mlx_lm.gptq had not finished one batch after 5 minutes on 2 cores; float32 also keeps its
    # xᵀx from overflowing), then stored at the checkpoint's dtype, as stock would store it.
    stored = next(v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    model.set_dtype(mx.float32)
    if args.num_samples == "all":
        from mlx_lm_optiq.core.calibration import token_stream

        args.num_samples = min(DWQ_MAX_SAMPLES, len(token_stream(tokenizer, args.calibration)) // args.sequence_length)
    tokens = load_calibration(tokenizer, args.calibration, args.num_samples, args.sequence_length)
    if args.method == "gptq":
        from mlx_lm.quant.gptq import gptq_quantize

        # The fallback (modules GPTQ does not handle: the embedding) at the same format, so
        # the anchor costs exactly uniform bits/group (mlx_lm.gptq's CLI default is 6-bit).
        model, config["quantization"] = gptq_quantize(
            model, tokens, args.bits, args.group_size, args.bits, args.group_size
        )
    elif args.method == "dwq":
        import copy

        import mlx.optimizers as optimizers
        from mlx_lm.quant.dwq import dwq_quantize
        from mlx_lm.utils import quantize_model

        mx.eval(model.parameters())
        teacher = model
        if args.student is None:
            model = copy.deepcopy(teacher)
            _, config = quantize_model(model, config, group_size=args.group_size, bits=args.bits)
        else:  # as mlx_lm.dwq --quantized-model: trained in float32 like the uniform student, stored back
            model, _, config = load(args.student, return_config=True)
            if "quantization" not in config:
                raise SystemExit(f"--student {args.student}: not a quantized model (no 'quantization' in config.json)")
            model.set_dtype(mx.float32)
        rows = [(t, 0) for t in tokens.tolist()]  # (tokens, prompt offset) as its dataset gives them
        train, valid = rows[: len(rows) - args.dwq_valid], rows[len(rows) - args.dwq_valid :]
        dwq_quantize(
            model,
            lambda batch, idx, split: teacher(batch),
            optimizers.Adam(learning_rate=args.dwq_learning_rate, bias_correction=True),
            train,
            valid,
            batch_size=args.dwq_batch_size,
            max_seq_length=args.sequence_length,
            seed=args.seed,
            dtype=mx.float32,
        )
        model.eval()
        del teacher
    else:
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

        awq_config = AWQ_MODEL_CONFIGS.get(config["model_type"])
        if awq_config is None:
            raise SystemExit(f"mlx_lm.awq has no config for model_type {config['model_type']!r}")
        # embed_* at the same format for the same reason (mlx_lm.awq's CLI default is 4-bit g32).
        awq_quantize(
            model,
            tokens,
            awq_config,
            group_size=args.group_size,
            bits=args.bits,
            embed_group_size=args.group_size,
            embed_bits=args.bits,
        )
        config = update_config(model, config)
    model.set_dtype(stored)  # floating parameters only: scales, biases, norms (codes stay uint32)
    bpw = compute_bits_per_weight(model)
    save(args.mlx_path, args.model, model, tokenizer, config)
    seconds = time.perf_counter() - start
    what = f"{args.bits}-bit g{args.group_size}" if args.student is None else f"student {args.student}"
    print(
        f"mlx-lm {args.method} {what}: {bpw:.4f} bits per weight, "
        f"calibrated on {args.num_samples}x{args.sequence_length} tokens of "
        f"{args.calibration or 'the bundled set'}, {seconds:.0f} s -> {Path(args.mlx_path)}"
    )


if __name__ == "__main__":
    main()
