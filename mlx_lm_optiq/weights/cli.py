"""`python -m mlx_lm_optiq.weights`: measure a sensitivity table and write it (weights/table.py)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace

from mlx_lm_optiq.core import backend as _backend
from mlx_lm_optiq.core.calibration import load_calibration
from mlx_lm_optiq.core.errors import user_errors
from mlx_lm_optiq.core.formats import check_with_mlx, parse_candidates
from mlx_lm_optiq.core.model_tree import (
    is_quantized_checkpoint,
    load_float_model,
    read_model_config,
    resolve_model_path,
)
from mlx_lm_optiq.weights import clipping
from mlx_lm_optiq.weights.config import measurement_defaults, per_backend_help
from mlx_lm_optiq.weights.pipeline import method_for_model, parameter_count
from mlx_lm_optiq.weights.probes import log_line
from mlx_lm_optiq.weights.sweep import REFERENCE_MODES, SweepSettings, measure_sensitivity
from mlx_lm_optiq.weights.table import METHODS, write_table

_BATCH_PROBES = {"auto": None, "on": True, "off": False}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_lm_optiq.weights",
        description="Measure per-module quantization sensitivity (KL divergence) of an mlx-lm model.",
    )
    parser.add_argument("--model", required=True, help="local model directory or Hugging Face repo")
    parser.add_argument("--output", required=True, help="sensitivity table to write (JSON)")
    parser.add_argument(
        "--candidates",
        default=None,
        help=f"comma-separated, e.g. 2:64,4:64,8:64 or mxfp4:32 ({per_backend_help('candidates')})",
    )
    parser.add_argument("--method", choices=METHODS, default=None, help=per_backend_help("sensitivity_method"))
    parser.add_argument("--reference", choices=REFERENCE_MODES, default="auto")
    parser.add_argument(
        "--clipping",
        choices=clipping.METHODS,
        default="activation",
        help="group ranges of every probe: clipped by activation-weighted error, or stock min/max",
    )
    parser.add_argument("--calibration", default=None, help="JSONL with 'text' or 'messages' (default: bundled set)")
    parser.add_argument("--num-samples", type=int, default=None, help=per_backend_help("num_samples"))
    parser.add_argument("--sequence-length", type=int, default=None, help=per_backend_help("sequence_length"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--checkpoint", default=None, help="resume file for an interrupted sweep")
    parser.add_argument("--modules", default=None, help="comma-separated module paths (default: all)")
    parser.add_argument(
        "--no-reuse-hidden-states", action="store_true", help="full forward per probe (slow; for checking)"
    )
    parser.add_argument(
        "--batch-probes",
        choices=tuple(_BATCH_PROBES),
        default="auto",
        help="stack probes of one block into shared forwards (auto: on a GPU only)",
    )
    parser.add_argument("--distributed", action="store_true", help="shard over mx.distributed ranks (mlx.launch)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Errors the user caused (`OptiqError`: a flag value, a file, a model path) are one
    `python -m mlx_lm_optiq.weights: error: ...` line and exit status 1, reported before the
    model is loaded wherever they can be; anything else keeps its traceback."""
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    parser = build_parser()
    args = parser.parse_args(argv)
    # what the user left unset: the same per-backend defaults as mlx_lm.convert --optiq-target-bpw
    backend = _backend.compute_backend()
    defaults = measurement_defaults(backend)
    # `is None`, not `or`: a value given (even an empty or zero one) is the user's, checked below
    for name, default in (
        ("candidates", defaults.candidates),
        ("num_samples", defaults.num_samples),
        ("sequence_length", defaults.sequence_length),
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
    method_defaulted = args.method is None
    if args.method is None:  # fisher cannot resume from a checkpoint or use the low-bit reference
        fisher_blocked = args.checkpoint is not None or args.reference == "low-bit"
        args.method = "exact" if fisher_blocked else defaults.sensitivity_method
    group = mx.distributed.init() if args.distributed else None
    with user_errors(parser.prog):
        # every flag first, then the model path, then the text: nothing long runs on a bad input
        settings = SweepSettings(
            method=args.method,
            reference=args.reference,
            clipping=args.clipping,
            batch_size=args.batch_size,
            modules=args.modules.split(",") if args.modules else None,
            reuse_hidden_states=not args.no_reuse_hidden_states,
            batch_probes=_BATCH_PROBES[args.batch_probes],
            seed=args.seed,
            checkpoint_path=args.checkpoint,
        )
        candidates = check_with_mlx(parse_candidates(args.candidates))
        model_path = resolve_model_path(args.model)
        model_config = read_model_config(model_path)
        if method_defaulted:  # fitted to the model's size, as the convert does (shapes only: lazy)
            params = parameter_count(load_float_model(model_path)[0])
            fitted, why = method_for_model(
                args.method,
                backend=backend,
                params=params,
                tokens=args.num_samples * args.sequence_length,
                candidates=candidates,
                checkpoint=args.checkpoint,
                reference=args.reference,
                # a quantized source that does not fit: fisher held quantized, not exact on low bits
                quantized=is_quantized_checkpoint(model_config),
            )
            if why:
                log_line(f"method {why.replace('`sensitivity_method`', '--method')}")
                settings = replace(settings, method=fitted)
        tokenizer = load_tokenizer(model_path)
        tokens = load_calibration(tokenizer, args.calibration, args.num_samples, args.sequence_length, args.seed)
        table = measure_sensitivity(model_path, tokens, candidates, settings, progress=not args.quiet, group=group)
        table["calibration"]["source"] = args.calibration or "bundled"
        if group is None or group.rank() == 0:
            write_table(table, args.output)
            log_line(f"wrote {args.output} ({len(table['modules'])} modules)")
    return 0
