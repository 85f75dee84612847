"""Hooks on `mlx_lm.lora` (training) and `mlx_lm.tuner.utils` (adapter loading).

mlx_lm.lora:
  build_parser            adds --optiq-rank-scaling, --optiq-metadata, --optiq-max-rank,
                          --optiq-load-in-{4bits,6bits,8bits,mxfp4}, --optiq-load-mixed
                          (default None, so the same keys also work in the -c YAML config)
  run                     remembers the run's args for `load` below
  load                    quantizes a float base while loading when a load-in flag is set
  train_model             per-module ranks: the plan lives in a ContextVar for the
                          duration; afterwards the adapter files are zero-padded for stock
  linear_to_lora_layers   (the name bound in mlx_lm.lora) re-ranks the stock LoRA layers
mlx_lm.tuner.utils:
  load_adapters           an adapter directory with optiq_lora_config.json is mounted at its
                          compact ranks (stock mlx_lm.load / generate / fuse go through it)
Every wrapper passes straight through when its feature is not requested.
"""

import contextvars
import sys
from pathlib import Path

from .. import _patching
from . import on_reset

_RUN_ARGS = contextvars.ContextVar("optiq_lora_run_args", default=None)
_TRAIN_PLAN = contextvars.ContextVar("optiq_lora_train_plan", default=None)


@on_reset
def _reset():
    _RUN_ARGS.set(None)
    _TRAIN_PLAN.set(None)


def _options(args):
    return {k[len("optiq_"):]: v for k, v in vars(args).items() if k.startswith("optiq_")}


def _build_parser(wrapped, instance, args, kwargs):
    parser = wrapped(*args, **kwargs)
    from ..lora_ranks import MODES

    group = parser.add_argument_group("mlx_lm_optiq", "sensitivity-aware LoRA (mlx-lm-optiq)")
    if "--rank" not in parser._option_string_actions:  # stock 0.32 sets the rank only in YAML
        group.add_argument(
            "--rank", type=int, default=None,
            help="LoRA rank (lora_parameters.rank); with --optiq-rank-scaling, the budget rank.",
        )
    group.add_argument(
        "--optiq-rank-scaling", choices=MODES, default=None,
        help="Per-layer LoRA rank at the parameter budget of constant --rank: constant, by_bits "
        "(rank proportional to the layer's quantization bits) or by_kl (to its measured sensitivity). "
        "by_bits/by_kl read the model's optiq_metadata.json.",
    )
    group.add_argument(
        "--optiq-metadata", default=None,
        help="optiq_metadata.json to read per-layer bits/KL from (default: the one next to --model).",
    )
    group.add_argument(
        "--optiq-max-rank", type=int, default=None,
        help="Largest rank any one layer may get with by_bits/by_kl (default 4x the base rank).",
    )
    for flag, what in (("4bits", "4-bit affine, group 128"), ("6bits", "6-bit affine, group 128"),
                       ("8bits", "8-bit affine, group 128"), ("mxfp4", "mxfp4, group 32")):
        group.add_argument(
            f"--optiq-load-in-{flag}", action="store_true", default=None,
            help=f"Quantize a float --model while loading it ({what}; group 64/32 where 128 does not divide).",
        )
    group.add_argument(
        "--optiq-load-mixed", action="store_true", default=None,
        help="Quantize a float --model while loading it with the per-layer bits of an optiq_metadata.json.",
    )
    return parser


def _run(wrapped, instance, args, kwargs):
    run_args = args[0] if args else kwargs.get("args")
    rank = getattr(run_args, "rank", None)
    if rank is not None:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"--rank / rank: expected a positive integer, got {rank!r}")
        # a copy: stock main() hands CONFIG_DEFAULTS' own dict to args
        run_args.lora_parameters = {**(run_args.lora_parameters or {}), "rank": rank}
    options = _options(run_args)
    if options.get("max_rank") is not None and options.get("rank_scaling") is None:
        raise ValueError("--optiq-max-rank only applies with --optiq-rank-scaling by_bits/by_kl")
    if options.get("metadata") is not None and not (options.get("rank_scaling") or options.get("load_mixed")):
        raise ValueError("--optiq-metadata is read by --optiq-rank-scaling or --optiq-load-mixed; neither is set")
    token = _RUN_ARGS.set(run_args)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _RUN_ARGS.reset(token)


def _load(wrapped, instance, args, kwargs):
    run_args = _RUN_ARGS.get()
    if run_args is None:
        return wrapped(*args, **kwargs)
    from ..load_quantized import load_quantized, requested_scheme

    options = _options(run_args)
    scheme = requested_scheme(options)
    if scheme is None:
        return wrapped(*args, **kwargs)
    path = args[0] if args else kwargs["path_or_hf_repo"]
    model, tokenizer, config = load_quantized(
        path, scheme, metadata_path=options.get("metadata"),
        tokenizer_config=kwargs.get("tokenizer_config"),
        trust_remote_code=kwargs.get("trust_remote_code", False),
    )
    if kwargs.get("return_config"):
        return model, tokenizer, config
    return model, tokenizer


def _train_model(wrapped, instance, args, kwargs):
    import inspect

    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    run_args = bound.arguments["args"]
    options = _options(run_args)
    mode = options.get("rank_scaling")
    if mode is None:
        return wrapped(*args, **kwargs)
    from .. import lora_io
    from ..lora_ranks import MODES

    if mode not in MODES:  # a YAML value skips argparse's choices
        raise ValueError(f"--optiq-rank-scaling / optiq_rank_scaling: got {mode!r}, expected one of {list(MODES)}")
    if run_args.fine_tune_type not in ("lora", "dora"):
        raise ValueError(f"--optiq-rank-scaling needs --fine-tune-type lora or dora, got {run_args.fine_tune_type!r}")
    resume = run_args.resume_adapter_file
    # Stock resumes with load_weights(strict=False), which does not check shapes:
    # a padded file would load into compact layers wrongly. We load it ourselves.
    run_args.resume_adapter_file = None
    token = _TRAIN_PLAN.set({"args": run_args, "options": options, "resume": resume})
    try:
        result = wrapped(*args, **kwargs)
    finally:
        _TRAIN_PLAN.reset(token)
        run_args.resume_adapter_file = resume
    # stock save_config ran while resume_adapter_file was hidden: record the real one
    padded = lora_io.finalize_adapter_dir(run_args.adapter_path, {"resume_adapter_file": resume})
    print(f"[optiq] adapters zero-padded to rank {padded} for stock mlx-lm; true ranks in "
          f"{Path(run_args.adapter_path) / lora_io.RECORD_FILE}")
    return result


def _linear_to_lora_layers(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    plan = _TRAIN_PLAN.get()
    if plan is None:
        return result
    import inspect

    from ..lora_ranks import apply_rank_plan

    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    bound.apply_defaults()
    apply_rank_plan(
        bound.arguments["model"], plan["args"], plan["options"],
        lora_parameters=bound.arguments["config"], use_dora=bound.arguments["use_dora"],
        resume=plan["resume"],
    )
    return result


def _load_adapters(wrapped, instance, args, kwargs):
    import inspect

    from .. import lora_io

    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    adapter_path = bound.arguments["adapter_path"]
    if not lora_io.has_record(adapter_path):
        return wrapped(*args, **kwargs)
    return lora_io.load_compact_adapters(bound.arguments["model"], adapter_path)


def install(module):
    """Installer for `mlx_lm.lora`."""
    _patching.wrap(module, "build_parser", _build_parser)
    _patching.wrap(module, "run", _run)
    _patching.wrap(module, "load", _load)
    _patching.wrap(module, "train_model", _train_model)
    _patching.wrap(module, "linear_to_lora_layers", _linear_to_lora_layers)


def install_loader(module):
    """Installer for `mlx_lm.tuner.utils` (also reached lazily by mlx_lm.utils.load)."""
    _patching.wrap(module, "load_adapters", _load_adapters, aliases=[("mlx_lm.lora", "load_adapters")])
    assert sys.modules.get("mlx_lm.tuner.utils") is module
