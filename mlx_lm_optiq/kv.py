"""`python -m mlx_lm_optiq.kv MODEL --target-bits 4.5`: measure per-layer KV sensitivity and
write a per-layer KV plan (kv_config.json) for an existing model.

The measurement runs on the model's float version (a quantized checkpoint is
dequantized, in float32 by default: fastest on CPU) with simulated cache
quantization; see kv_sensitivity.py.
"""

import argparse
import logging
import sys
from pathlib import Path

from . import kv_config, kv_sensitivity

DEFAULT_PREFIX_TOKENS = 1536
DEFAULT_SCORED_TOKENS = 128


def load_float_model(path, dtype="float32"):
    """(model, tokenizer) with every quantized layer dequantized and weights cast to `dtype`."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import dequantize_model, load

    model, tokenizer = load(str(path), lazy=True)
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    if quantized:
        logging.info("mlx_lm_optiq.kv: %s is quantized; the float reference is its dequantization", path)
        model = dequantize_model(model)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    # the folder's own kv_config.json (if any) must not shape the reference caches
    kv_config.attach_plan(model, None)
    return model, tokenizer


def token_windows(tokenizer, data, num_windows, length, seed=0):
    """`num_windows` windows of `length` tokens from a .txt file, a calibration .jsonl,
    or (data=None) the bundled calibration set."""
    import mlx.core as mx
    import numpy as np

    if data is not None and Path(data).suffix == ".txt":
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"--data {path}: file not found")
        ids = np.array(tokenizer.encode(path.read_text()), dtype=np.int32)
        n = len(ids) // length
        if n < num_windows:
            raise ValueError(
                f"--data {path}: {len(ids)} tokens make only {n} windows of {length} tokens, "
                f"{num_windows} requested"
            )
        picks = np.sort(np.random.default_rng(seed).choice(n, size=num_windows, replace=False))
        return [mx.array(ids[p * length : (p + 1) * length]) for p in picks]
    from .calibration import load_calibration

    tokens = load_calibration(tokenizer, data, num_samples=num_windows, sequence_length=length, seed=seed)
    return [tokens[i] for i in range(tokens.shape[0])]


def add_measure_arguments(add, prefix=""):
    """The measurement flags, shared with the convert extension (`prefix` = "optiq-kv-")."""
    add(f"--{prefix}candidates", default=None,
        help="comma-separated K_BITS/V_BITS:GROUP candidates, e.g. 8/8:64,8/4:64,4/4:64 "
        "(default: K in {8,4} x V in {8,4,2} x group {64,32})")
    add(f"--{prefix}data", default=None,
        help="calibration text: a .txt file or a calibration .jsonl (default: the bundled set)")
    add(f"--{prefix}prefix-tokens", type=int, default=DEFAULT_PREFIX_TOKENS,
        help="tokens of context before the scored ones (long enough for the cache to matter)")
    add(f"--{prefix}scored-tokens", type=int, default=DEFAULT_SCORED_TOKENS,
        help="tokens whose next-token KL is measured after the prefix")
    add(f"--{prefix}num-windows", type=int, default=1, help="text windows to average over")
    add(f"--{prefix}probe", choices=list(kv_sensitivity.PROBES), default="exact",
        help="exact: each probe runs the whole window with that layer quantized from the first token "
        "(as served); fast: float prefix, only the scored tokens re-run (cheaper, underestimates "
        "errors that compound through the prefix)")
    add(f"--{prefix}context-length", type=int, default=8192,
        help="context length the average bits are computed for (weights sliding-window layers)")
    add(f"--{prefix}quantized-kv-start", type=int, default=0,
        help="keep each cache in float until it holds this many tokens (mlx-lm's quantized_kv_start)")


def check_measure_options(opts, flag=lambda name: f"--{name}"):
    """Validate measurement options; errors name the flag."""
    cands = kv_sensitivity.DEFAULT_CANDIDATES
    if opts["candidates"] is not None:
        cands = kv_sensitivity.parse_candidates(opts["candidates"], where=flag("candidates"))
    for name in ("prefix-tokens", "scored-tokens", "num-windows", "context-length"):
        v = opts[name.replace("-", "_")]
        if v < 1:
            raise ValueError(f"{flag(name)} is {v}, expected a positive integer")
    if opts["quantized_kv_start"] < 0:
        raise ValueError(f"{flag('quantized-kv-start')} is {opts['quantized_kv_start']}, expected >= 0")
    return cands


def make_plan(model_path, target_bits, opts, model_name=None, progress=True, table_out=None):
    """Measure `model_path` and allocate a KVPlan under `target_bits`."""
    if not (0 < target_bits <= kv_config.FLOAT_BITS):
        raise ValueError(f"target bits {target_bits} must be in (0, {kv_config.FLOAT_BITS}]")
    cands = check_measure_options(opts)
    model, tokenizer = load_float_model(model_path)
    windows = token_windows(tokenizer, opts["data"], opts["num_windows"],
                            opts["prefix_tokens"] + opts["scored_tokens"])
    table = kv_sensitivity.measure_kv_sensitivity(
        model, windows, opts["prefix_tokens"], cands, progress=progress, model_name=model_name or str(model_path),
        probe=opts["probe"],
    )
    if table_out is not None:
        kv_sensitivity.save_table(table, table_out)
    plan = kv_sensitivity.allocate_kv(
        table, target_bits, context_length=opts["context_length"], quantized_kv_start=opts["quantized_kv_start"],
    )
    return plan, table


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m mlx_lm_optiq.kv",
        description="Measure per-layer KV-cache sensitivity and write a per-layer KV plan (kv_config.json).",
    )
    parser.add_argument("model", help="model folder (or Hub repo) to plan the KV cache for")
    parser.add_argument("--target-bits", type=float, required=True,
                        help="average bits per cached element (fp16 = 16; 4-bit g64 costs 4.5)")
    parser.add_argument("-o", "--output", default=None,
                        help="where to write kv_config.json (default: inside MODEL when it is a folder)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    parser.add_argument("--sensitivity-out", default=None, help="also save the measured sensitivity table here")
    parser.add_argument("--sensitivity", default=None,
                        help="reuse a saved sensitivity table instead of measuring (allocation only)")
    add_measure_arguments(parser.add_argument)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    out = Path(args.output) if args.output else None
    if out is None:
        if not Path(args.model).is_dir():
            parser.error(f"{args.model} is not a local folder: give --output for kv_config.json")
        out = Path(args.model) / kv_config.FILENAME
    if out.is_dir():
        out = out / kv_config.FILENAME
    if out.exists() and not args.force:
        parser.error(f"--output {out} already exists (use --force to overwrite)")
    opts = {k: v for k, v in vars(args).items()}
    try:
        if args.sensitivity is not None:
            check_measure_options(opts)
            table = kv_sensitivity.load_table(args.sensitivity)
            plan = kv_sensitivity.allocate_kv(table, args.target_bits, context_length=args.context_length,
                                              quantized_kv_start=args.quantized_kv_start, model_name=args.model)
        else:
            plan, _ = make_plan(args.model, args.target_bits, opts, table_out=args.sensitivity_out)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    plan.model = args.model
    kv_config.save_kv_config(plan, out)
    print(f"wrote {out}: {plan.summary()}; average {plan.achieved_bits} bits "
          f"(target {args.target_bits}), summed KL {kv_sensitivity.plan_kl(plan):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
