"""`python -m mlx_lm_optiq.kv MODEL --target-bits 4.5`: measure per-layer KV sensitivity and
write a per-layer KV plan (kv_config.json) for an existing model.

Flags -> `KVPlanConfig` (kv/config.py; the flags are generated from its fields) ->
`kv.pipeline.plan_kv` -> kv_config.json. The measurement runs on the model's float
version (a quantized checkpoint is dequantized, in float32: fastest on CPU) with
simulated cache quantization; see kv/sensitivity.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.errors import OptiqError, one_line
from mlx_lm_optiq.core.model_tree import looks_like_local_path, resolve_model_path
from mlx_lm_optiq.kv.config import KVPlanConfig, flag_specs
from mlx_lm_optiq.kv.pipeline import plan_kv
from mlx_lm_optiq.kv.plan_file import FILENAME, write_kv_config
from mlx_lm_optiq.kv.sensitivity import plan_kl


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_lm_optiq.kv",
        description="Measure per-layer KV-cache sensitivity and write a per-layer KV plan (kv_config.json).",
    )
    parser.add_argument("model", help="model folder (or Hub repo) to plan the KV cache for")
    parser.add_argument(
        "-o", "--output", default=None, help="where to write kv_config.json (default: inside MODEL when it is a folder)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    for name, kw in flag_specs():
        parser.add_argument(_flag(name), dest=name, **kw)
    return parser


def _resolve_model(parser: argparse.ArgumentParser, model: str) -> str:
    """The model's local directory, before anything is loaded; a clear parser error when there is none
    (core.model_tree.resolve_model_path words both cases: a mistyped local path, a failed hub lookup)."""
    try:
        return str(resolve_model_path(model))
    except OptiqError as e:
        parser.error(one_line(str(e)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # Re-planning from a table needs no model: a hub id is then not downloaded, a local path still checked.
    model_path = args.model
    if args.sensitivity is None or looks_like_local_path(args.model):
        model_path = _resolve_model(parser, args.model)
    out = Path(args.output) if args.output else None
    if out is None:
        if not Path(args.model).expanduser().is_dir():  # never into a hub snapshot
            parser.error(f"{args.model} is not a local folder: give --output for kv_config.json")
        out = Path(args.model).expanduser() / FILENAME
    if out.is_dir():
        out = out / FILENAME
    if out.exists() and not args.force:
        parser.error(f"--output {out} already exists (use --force to overwrite)")
    # Errors the user caused (OptiqError: a flag, a file, the model) are one argparse-style line,
    # exit status 2; anything else is a bug and keeps its traceback.
    try:
        config = KVPlanConfig(**{name: getattr(args, name) for name, _ in flag_specs()})
        plan = plan_kv(model_path, config, model_name=args.model, spell=_flag).plan
    except ConfigError as e:
        parser.error(one_line(e.render(_flag)))
    except OptiqError as e:
        parser.error(one_line(str(e)))
    path = write_kv_config(plan, out).resolve()
    print(
        f"wrote {path}: {plan.summary()}; average {plan.achieved_bits} bits "
        f"(target {args.target_bits}), summed KL {plan_kl(plan):.5f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
