"""Hooks on `mlx_lm.lora` (training) and `mlx_lm.tuner.utils` (adapter loading).

mlx_lm.lora:
  build_parser            adds --optiq-rank-scaling, --optiq-metadata, --optiq-max-rank, --optiq-lora-init,
                          --optiq-load-in-{4bits,6bits,8bits,mxfp4}, --optiq-load-mixed, --optiq-qat
                          (default None, so the same keys also work in the -c YAML config)
  run                     builds the run's LoraTrainingConfig once (errors spelled as flags); an
                          optiq_* key no flag defines (a misspelt YAML key) is an error
  load                    quantizes a float base while loading when a load-in flag is set
  main                    an error the user caused is one `mlx_lm.lora: error:` line (no traceback)
  train_model             per-module ranks: the config lives in a ContextVar for the
                          duration; afterwards the adapter files are zero-padded for stock.
                          Resuming an adapter that has a rank record restores its ranks
                          (with or without --optiq-rank-scaling)
  train                   every save of a rank-scaled run is written padded as it happens
  linear_to_lora_layers   (the name bound in mlx_lm.lora) plans the ranks (lora.pipeline.plan_ranks)
                          and re-ranks the stock LoRA layers (apply_rank_plan)
mlx_lm.tuner.utils:
  load_adapters           an adapter directory with optiq_lora_config.json is mounted at its
                          compact ranks (stock mlx_lm.load / generate / fuse go through it)
mlx_lm.tuner.dora:
  DoRALinear.from_base    right input dims on 3/5/6-bit quantized layers (stock's are wrong there,
                          and our mixed-precision convert writes such layers)
  train_model, linear_to_lora_layers (second wrappers, --optiq-qat): the plan's formats are read on
                          the bare float model, then lora.qat puts quantization-aware LoRA layers on
Every wrapper passes straight through when its feature is not requested.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from mlx_lm_optiq.core.config import ConfigError, field_help
from mlx_lm_optiq.core.errors import UsageError, user_errors
from mlx_lm_optiq.core.jsonio import OptiqFileError
from mlx_lm_optiq.hooks import on_reset, patching
from mlx_lm_optiq.lora import adapter_files
from mlx_lm_optiq.lora.config import LORA_INITS, RANK_SCALING_MODES, UNIFORM_LOAD_SCHEMES, LoraTrainingConfig
from mlx_lm_optiq.lora.pipeline import PaddedSaves, apply_rank_plan, plan_from_record, plan_ranks, resumed_record
from mlx_lm_optiq.lora.qlora import load_quantized

# Config fields that are mlx_lm.lora's own arguments (read without the optiq_ prefix), and
# other stock arguments an error may name.
_STOCK_FIELDS = {"fine_tune_type": "--fine-tune-type", "resume_adapter_file": "--resume-adapter-file"}
_FIELDS = [f.name for f in dataclasses.fields(LoraTrainingConfig)]


class _Run(NamedTuple):
    args: Any  # the namespace the config was built from
    config: LoraTrainingConfig


class _Training(NamedTuple):
    config: LoraTrainingConfig
    model_path: str
    adapter_path: str
    resume: str | None
    record: dict | None  # the resumed adapter's rank record: its ranks are restored, not re-planned
    state: dict  # {"plan": RankPlan} once linear_to_lora_layers planned it


_RUN = contextvars.ContextVar("optiq_lora_run", default=None)
_TRAINING = contextvars.ContextVar("optiq_lora_training", default=None)
_QAT = contextvars.ContextVar("optiq_lora_qat", default=None)  # (model path, sidecar path or None) of a QAT run


@on_reset
def _reset():
    _RUN.set(None)
    _TRAINING.set(None)
    _QAT.set(None)


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
            _flag if "/" in e.field else _spell,
            lambda name: _flag(name) if name in _FIELDS or name in _STOCK_FIELDS else f"`{name}`",
        )
        raise (OptiqFileError if isinstance(e, OptiqFileError) else UsageError)(message) from None


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
    group.add_argument("--optiq-lora-init", choices=LORA_INITS, default=None, help=helps["lora_init"])
    for name in (*UNIFORM_LOAD_SCHEMES, "load_mixed"):
        group.add_argument(_flag(name), action="store_true", default=None, help=helps[name])
    group.add_argument(_flag("qat"), action="store_true", default=None, help=helps["qat"])
    return parser


def _check_optiq_keys(run_args):
    """An `optiq_*` key no flag defines (a misspelt -c YAML key: stock copies every YAML key onto
    the arguments) is an error naming it, not a silently stock run."""
    import mlx_lm.lora

    known = {action.dest for action in mlx_lm.lora.build_parser()._actions if action.dest.startswith("optiq_")}
    unknown = sorted(k for k in vars(run_args) if k.startswith("optiq_") and k not in known)
    if not unknown:
        return
    hints = []
    for key in unknown[:5]:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hints.append(key + (f" (did you mean {close[0]}?)" if close else ""))
    where = getattr(run_args, "config", None) or "mlx_lm.lora arguments"
    raise UsageError(f"{where}: unknown optiq key(s) {', '.join(hints)}; known: {', '.join(sorted(known))}")


def _run(wrapped, instance, args, kwargs):
    run_args = args[0] if args else kwargs.get("args")
    _check_optiq_keys(run_args)
    rank = getattr(run_args, "rank", None)
    if rank is not None:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise UsageError(f"--rank / rank: expected a positive integer, got {rank!r}")
        # a copy: stock main() hands CONFIG_DEFAULTS' own dict to args
        run_args.lora_parameters = {**(run_args.lora_parameters or {}), "rank": rank}
    config = _config_from(run_args)
    if getattr(run_args, "train", False):  # the record and sidecar it needs, before the model and data load
        restored = _resumed_record(config, run_args) is not None
        with _as_flags():
            if config.qat:
                from mlx_lm_optiq.lora import qat

                qat.check_base(run_args.model, config.metadata)
            config.check_sidecar(run_args.model, for_ranks=not restored)
    token = _RUN.set(_Run(run_args, config))
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


def _resumed_record(config, run_args):
    """The rank record of the adapter being resumed (None without one), checked against the run."""
    rank = (getattr(run_args, "lora_parameters", None) or {}).get("rank")
    rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else None
    with _as_flags():
        return resumed_record(config, getattr(run_args, "resume_adapter_file", None), base_rank=rank)


def _train_model(wrapped, instance, args, kwargs):
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    run_args = bound.arguments["args"]
    config = _config_of(run_args)
    record = _resumed_record(config, run_args)
    if config.rank_scaling is None and not config.loftq and record is None:
        return wrapped(*args, **kwargs)
    if record is not None:
        print(
            f"[optiq] resuming a rank-scaled adapter: its {record.get('rank_scaling')} ranks are restored from "
            f"{Path(run_args.resume_adapter_file).parent / adapter_files.RECORD_FILE}"
        )
    resume = run_args.resume_adapter_file
    # Stock resumes with load_weights(strict=False), which does not check shapes:
    # a padded file would load into compact layers wrongly. apply_rank_plan loads it.
    run_args.resume_adapter_file = None
    training = _Training(config, str(run_args.model), str(run_args.adapter_path), resume, record, {})
    token = _TRAINING.set(training)
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
        if training.record is not None:
            source = Path(training.resume).parent / adapter_files.RECORD_FILE
            plan = plan_from_record(training.record, model, source)
        else:
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
    training.state["plan"] = plan
    return result


def _train(wrapped, instance, args, kwargs):
    """Stock `train` of a rank-scaled run: every save it makes appears padded (stock-loadable) at once.

    The stock adapter_config.json is given the padded rank before the first step, and the trainer
    saves into a staging folder that `PaddedSaves` mirrors, padded, into the adapter directory.
    """
    training = _TRAINING.get()
    plan = training.state.get("plan") if training is not None else None
    signature = inspect.signature(wrapped)
    if plan is None or "iterate_batches" not in signature.parameters:
        return wrapped(*args, **kwargs)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    train_args = bound.arguments["args"]
    adapter_file = Path(train_args.adapter_file)
    with _as_flags():
        adapter_files.set_padded_rank(adapter_file.parent, {"resume_adapter_file": training.resume})
    saves = PaddedSaves(adapter_file.parent, plan.ranks)
    bound.arguments["args"] = dataclasses.replace(train_args, adapter_file=saves.staging / adapter_file.name)
    bound.arguments["iterate_batches"] = saves.batches(bound.arguments["iterate_batches"])
    try:
        return wrapped(*bound.args, **bound.kwargs)
    finally:
        saves.close()


def _qat_train_model(wrapped, instance, args, kwargs):
    """A `--optiq-qat` run: its model path and sidecar are what `_qat_lora_layers` reads."""
    run_args = inspect.signature(wrapped).bind(*args, **kwargs).arguments["args"]
    config = _config_of(run_args)
    if not config.qat:
        return wrapped(*args, **kwargs)
    token = _QAT.set((str(run_args.model), config.metadata))
    try:
        return wrapped(*args, **kwargs)
    finally:
        _QAT.reset(token)


def _qat_lora_layers(wrapped, instance, args, kwargs):
    """QAT: the sidecar's formats are matched to the bare float model (paths, group sizes), stock (and
    rank scaling) put the LoRA layers on, then `lora.qat.apply_qat` makes them quantization-aware."""
    qat_run = _QAT.get()
    if qat_run is None:
        return wrapped(*args, **kwargs)
    from mlx_lm_optiq.lora import qat

    model = inspect.signature(wrapped).bind(*args, **kwargs).arguments["model"]
    with _as_flags():
        formats, sidecar = qat.plan_formats(model, *qat_run)
    result = wrapped(*args, **kwargs)
    with _as_flags():
        counts = qat.apply_qat(model, formats)
    print(
        f"[optiq] QAT at the formats of {sidecar}: {counts['adapted']} LoRA layers train through their "
        f"quantization, {counts['fake_quantized']} other layers run quantized, {counts['float']} stay float"
    )
    return result


def _load_adapters(wrapped, instance, args, kwargs):
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    adapter_path = bound.arguments["adapter_path"]
    if not adapter_files.has_record(adapter_path):
        return wrapped(*args, **kwargs)
    return adapter_files.load_compact_adapters(bound.arguments["model"], adapter_path)


def _main(wrapped, instance, args, kwargs):
    """The `mlx_lm.lora` command line: an error the user caused (a flag, a file: `OptiqError`, worded
    with the flags) is one `mlx_lm.lora: error: ...` line and exit status 1; anything else keeps
    its traceback."""
    with user_errors("mlx_lm.lora"):
        return wrapped(*args, **kwargs)


def install(module: ModuleType) -> None:
    """Installer for `mlx_lm.lora`."""
    patching.wrap(module, "main", _main)
    patching.wrap(module, "train", _train)
    patching.wrap(module, "build_parser", _build_parser)
    patching.wrap(module, "run", _run)
    patching.wrap(module, "load", _load)
    patching.wrap(module, "train_model", _train_model)
    patching.wrap(module, "linear_to_lora_layers", _linear_to_lora_layers)
    patching.wrap(module, "train_model", _qat_train_model)
    patching.wrap(module, "linear_to_lora_layers", _qat_lora_layers)


def _dora_from_base(wrapped, instance, args, kwargs):
    """Stock `DoRALinear.from_base` on a 3/5/6-bit quantized layer gets its input dims wrong (training,
    loading and fusing a DoRA adapter then fail on a shape mismatch): built by `adapter_files` instead."""
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    bound.apply_defaults()
    linear = bound.arguments["linear"]
    if not adapter_files.stock_dora_dims_wrong(linear):
        return wrapped(*args, **kwargs)
    return adapter_files.lora_from_base(
        linear,
        bound.arguments["r"],
        scale=bound.arguments["scale"],
        dropout=bound.arguments["dropout"],
        use_dora=True,
    )


def install_loader(module: ModuleType) -> None:
    """Installer for `mlx_lm.tuner.utils` (also reached lazily by mlx_lm.utils.load)."""
    from mlx_lm.tuner.dora import DoRALinear  # imported by mlx_lm.tuner.utils itself

    patching.wrap(module, "load_adapters", _load_adapters, aliases=[("mlx_lm.lora", "load_adapters")])
    patching.wrap(DoRALinear, "from_base", _dora_from_base)
    assert sys.modules.get("mlx_lm.tuner.utils") is module
