"""Hooks on `mlx_lm.lora` (training) and `mlx_lm.tuner.utils` (adapter loading).

mlx_lm.lora:
  build_parser            adds --optiq-rank-scaling, --optiq-metadata, --optiq-max-rank,
                          --optiq-load-in-{4bits,6bits,8bits,mxfp4}, --optiq-load-mixed
                          (default None, so the same keys also work in the -c YAML config)
  run                     builds the run's LoraTrainingConfig once (errors spelled as flags)
  load                    quantizes a float base while loading when a load-in flag is set
  train_model             per-module ranks: the config lives in a ContextVar for the
                          duration; afterwards the adapter files are zero-padded for stock
  linear_to_lora_layers   (the name bound in mlx_lm.lora) plans the ranks (lora.pipeline.plan_ranks)
                          and re-ranks the stock LoRA layers (apply_rank_plan)
mlx_lm.tuner.utils:
  load_adapters           an adapter directory with optiq_lora_config.json is mounted at its
                          compact ranks (stock mlx_lm.load / generate / fuse go through it)
Every wrapper passes straight through when its feature is not requested.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from mlx_lm_optiq.core.config import ConfigError, field_help
from mlx_lm_optiq.core.jsonio import OptiqFileError
from mlx_lm_optiq.hooks import on_reset, patching
from mlx_lm_optiq.lora import adapter_files
from mlx_lm_optiq.lora.config import RANK_SCALING_MODES, UNIFORM_LOAD_SCHEMES, LoraTrainingConfig
from mlx_lm_optiq.lora.pipeline import apply_rank_plan, plan_ranks
from mlx_lm_optiq.lora.qlora import load_quantized

# Config fields that are mlx_lm.lora's own arguments (read without the optiq_ prefix).
_STOCK_FIELDS = {"fine_tune_type": "--fine-tune-type"}
_FIELDS = [f.name for f in dataclasses.fields(LoraTrainingConfig)]


class _Run(NamedTuple):
    args: Any  # the namespace the config was built from
    config: LoraTrainingConfig


class _Training(NamedTuple):
    config: LoraTrainingConfig
    model_path: str
    adapter_path: str
    resume: str | None


_RUN = contextvars.ContextVar("optiq_lora_run", default=None)
_TRAINING = contextvars.ContextVar("optiq_lora_training", default=None)


@on_reset
def _reset():
    _RUN.set(None)
    _TRAINING.set(None)


def _flag(name):
    return _STOCK_FIELDS.get(name) or "--optiq-" + name.replace("_", "-")


def _spell(name):
    # flags and -c YAML keys land on the same namespace: name both
    return _flag(name) if name in _STOCK_FIELDS else f"{_flag(name)} / optiq_{name}"


@contextlib.contextmanager
def _as_flags():
    """Re-raise a ConfigError with the fields spelled as mlx_lm.lora's flags (same class as before:
    a missing sidecar stays an OptiqFileError, everything else a ValueError)."""
    try:
        yield
    except ConfigError as e:
        message = e.render(
            _flag if "/" in e.field else _spell, lambda name: _flag(name) if name in _FIELDS else f"`{name}`"
        )
        raise (OptiqFileError if isinstance(e, OptiqFileError) else ValueError)(message) from None


def _config_from(run_args):
    """The run's LoraTrainingConfig: `optiq_<field>` values (flags or YAML) plus the stock fields it checks."""
    values = {}
    for name in _FIELDS:
        value = getattr(run_args, name if name in _STOCK_FIELDS else f"optiq_{name}", None)
        if value is not None:
            values[name] = value
    with _as_flags():
        return LoraTrainingConfig(**values)


def _config_of(run_args):
    """The config `run` built for these args, or a new one (train_model called without run)."""
    run = _RUN.get()
    if run is not None and run.args is run_args:
        return run.config
    return _config_from(run_args)


def _build_parser(wrapped, instance, args, kwargs):
    parser = wrapped(*args, **kwargs)
    helps = field_help(LoraTrainingConfig)
    group = parser.add_argument_group("mlx_lm_optiq", "sensitivity-aware LoRA (mlx-lm-optiq)")
    if "--rank" not in parser._option_string_actions:  # stock 0.32 sets the rank only in YAML
        group.add_argument(
            "--rank",
            type=int,
            default=None,
            help="LoRA rank (lora_parameters.rank); with --optiq-rank-scaling, the budget rank.",
        )
    # default None, so the same keys also work in the -c YAML config
    group.add_argument("--optiq-rank-scaling", choices=RANK_SCALING_MODES, default=None, help=helps["rank_scaling"])
    group.add_argument("--optiq-metadata", default=None, help=helps["metadata"])
    group.add_argument("--optiq-max-rank", type=int, default=None, help=helps["max_rank"])
    for name in (*UNIFORM_LOAD_SCHEMES, "load_mixed"):
        group.add_argument(_flag(name), action="store_true", default=None, help=helps[name])
    return parser


def _run(wrapped, instance, args, kwargs):
    run_args = args[0] if args else kwargs.get("args")
    rank = getattr(run_args, "rank", None)
    if rank is not None:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"--rank / rank: expected a positive integer, got {rank!r}")
        # a copy: stock main() hands CONFIG_DEFAULTS' own dict to args
        run_args.lora_parameters = {**(run_args.lora_parameters or {}), "rank": rank}
    token = _RUN.set(_Run(run_args, _config_from(run_args)))
    try:
        return wrapped(*args, **kwargs)
    finally:
        _RUN.reset(token)


def _load(wrapped, instance, args, kwargs):
    run = _RUN.get()
    if run is None or run.config.load_scheme is None:
        return wrapped(*args, **kwargs)
    path = args[0] if args else kwargs["path_or_hf_repo"]
    with _as_flags():
        model, tokenizer, config = load_quantized(
            path,
            run.config.load_scheme,
            metadata_path=run.config.metadata,
            tokenizer_config=kwargs.get("tokenizer_config"),
            trust_remote_code=kwargs.get("trust_remote_code", False),
        )
    if kwargs.get("return_config"):
        return model, tokenizer, config
    return model, tokenizer


def _train_model(wrapped, instance, args, kwargs):
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    run_args = bound.arguments["args"]
    config = _config_of(run_args)
    if config.rank_scaling is None:
        return wrapped(*args, **kwargs)
    resume = run_args.resume_adapter_file
    # Stock resumes with load_weights(strict=False), which does not check shapes:
    # a padded file would load into compact layers wrongly. apply_rank_plan loads it.
    run_args.resume_adapter_file = None
    token = _TRAINING.set(_Training(config, str(run_args.model), str(run_args.adapter_path), resume))
    try:
        result = wrapped(*args, **kwargs)
    finally:
        _TRAINING.reset(token)
        run_args.resume_adapter_file = resume
    # stock save_config ran while resume_adapter_file was hidden: record the real one
    padded = adapter_files.finalize_adapter_dir(run_args.adapter_path, {"resume_adapter_file": resume})
    print(
        f"[optiq] adapters zero-padded to rank {padded} for stock mlx-lm; true ranks in "
        f"{Path(run_args.adapter_path) / adapter_files.RECORD_FILE}"
    )
    return result


def _linear_to_lora_layers(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    training = _TRAINING.get()
    if training is None:
        return result
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    bound.apply_defaults()
    model, lora_parameters = bound.arguments["model"], bound.arguments["config"]
    with _as_flags():
        plan = plan_ranks(training.config, model, int(lora_parameters["rank"]), training.model_path)
        apply_rank_plan(
            model,
            plan,
            lora_parameters,
            use_dora=bound.arguments["use_dora"],
            adapter_path=training.adapter_path,
            base_model=training.model_path,
            resume=training.resume,
        )
    return result


def _load_adapters(wrapped, instance, args, kwargs):
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    adapter_path = bound.arguments["adapter_path"]
    if not adapter_files.has_record(adapter_path):
        return wrapped(*args, **kwargs)
    return adapter_files.load_compact_adapters(bound.arguments["model"], adapter_path)


def install(module: ModuleType) -> None:
    """Installer for `mlx_lm.lora`."""
    patching.wrap(module, "build_parser", _build_parser)
    patching.wrap(module, "run", _run)
    patching.wrap(module, "load", _load)
    patching.wrap(module, "train_model", _train_model)
    patching.wrap(module, "linear_to_lora_layers", _linear_to_lora_layers)


def install_loader(module: ModuleType) -> None:
    """Installer for `mlx_lm.tuner.utils` (also reached lazily by mlx_lm.utils.load)."""
    patching.wrap(module, "load_adapters", _load_adapters, aliases=[("mlx_lm.lora", "load_adapters")])
    assert sys.modules.get("mlx_lm.tuner.utils") is module
