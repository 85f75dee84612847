"""One rank-scaled LoRA run: plan the per-module ranks, then put them on the model.

The hook on `mlx_lm.lora` calls these right after stock `linear_to_lora_layers`
converted the model, before training:

    plan = plan_ranks(config, model, base_rank, model_path)     # reads the sidecar, allocates
    apply_rank_plan(model, plan, lora_parameters, ...)          # re-ranks, resumes, writes the record

Resuming an adapter that has a rank record keeps its ranks: `resumed_record` finds and checks
the record, `plan_from_record` is the plan then. While training, `PaddedSaves` makes every
save appear zero-padded (stock-loadable) in the adapter directory.

Load-time quantization of the base (`config.load_scheme`) is `qlora.load_quantized`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.jsonio import OptiqFileError
from mlx_lm_optiq.lora import adapter_files, residual
from mlx_lm_optiq.lora.config import LoraTrainingConfig, locate_metadata
from mlx_lm_optiq.lora.ranks import (
    DEFAULT_MAX_RANK_FACTOR,
    Dims,
    allocate_by_gain,
    budget_params,
    layer_sensitivity,
    lora_params,
    mode_ranks,
)
from mlx_lm_optiq.weights.metadata import METADATA_FILE, read_metadata


@dataclass
class RankPlan:
    """Per-module LoRA ranks of one run and what they were derived from."""

    mode: str
    base_rank: int
    ranks: dict[str, int]
    dims: dict[str, Dims]
    metadata_path: Path | None = None
    # the sidecar's `layers` entries (bits, kl): recorded next to the ranks
    layers: dict[str, dict] = field(default_factory=dict)
    # a restored plan's record entries ({"bits"?, "kl"?} per module), recorded again as they were
    recorded: dict[str, dict] = field(default_factory=dict)
    # how apply_rank_plan starts the A/B weights: "zero" (stock) or "loftq" (residual SVD)
    init: str = "zero"
    # {module: residual.Residual} when by_residual or loftq needed the quantization residuals
    residuals: dict[str, Any] = field(default_factory=dict)

    @property
    def budget_params(self) -> int:
        """Trainable LoRA parameters constant `base_rank` would use."""
        return budget_params(self.dims, self.base_rank)

    @property
    def trainable_params(self) -> int:
        return lora_params(self.dims, self.ranks)

    def module_entries(self) -> dict[str, dict]:
        """The record's `modules`: rank and dims, plus the sidecar's bits and KL where it has them."""
        entries = {}
        for name, (input_dims, output_dims) in self.dims.items():
            entry = {"rank": self.ranks[name], "input_dims": input_dims, "output_dims": output_dims}
            if name in self.recorded:
                entry.update(
                    {
                        k: v
                        for k, v in self.recorded[name].items()
                        if k in ("bits", "kl", *adapter_files.RESIDUAL_FIELDS)
                    }
                )
            elif name in self.layers:
                entry["bits"] = self.layers[name]["bits"]
                kl = layer_sensitivity(self.layers[name])
                if kl is not None:
                    entry["kl"] = kl
            if name in self.residuals:  # ||R||_F^2 and the share the module's rank can remove
                entry["residual_energy"] = self.residuals[name].energy
                entry["residual_captured"] = self.residuals[name].captured(self.ranks[name])
            entries[name] = entry
        return entries

    def summary(self) -> str:
        hist = {}
        for r in self.ranks.values():
            hist[r] = hist.get(r, 0) + 1
        return (
            f"rank scaling {self.mode}: {len(self.ranks)} LoRA modules, ranks "
            + ", ".join(f"{r}x{n}" for r, n in sorted(hist.items()))
            + f"; {self.trainable_params} LoRA parameters vs {self.budget_params} at constant rank {self.base_rank}"
        )


def plan_ranks(
    config: LoraTrainingConfig,
    model: Any,
    base_rank: int,
    model_path: str | Path,
    float_model: str | Path | None = None,
    progress: bool = True,
    residuals: Mapping[str, Any] | None = None,
) -> RankPlan:
    """The per-module ranks for the LoRA layers stock `linear_to_lora_layers` put on `model`.

    by_bits/by_kl/by_residual read `config.metadata` (default: the sidecar next to `model_path`);
    constant ranks read a sidecar only to record bits next to the ranks. by_residual and
    `lora_init` loftq also compute each module's quantization residual against the float
    weights (`residual.float_source`: the load-time quantized `model_path`, else the sidecar's
    source model; `float_model` overrides both). `residuals`: {module: residual.Residual} already
    computed for this base (a benchmark planning many runs on one base), each with at least as
    many singular triplets as the largest rank planned.
    """
    mode = config.rank_scaling or "constant"
    modules = adapter_files.lora_modules(model)
    if not modules:
        raise ConfigError(
            "rank_scaling", "the model has no LoRA layers to rank (check num_layers / lora_parameters.keys)"
        )
    dims = {name: adapter_files.module_dims(m) for name, m in modules.items()}
    metadata, metadata_path = None, None
    if mode != "constant" or config.metadata is not None or (config.loftq and config.load_scheme is None):
        metadata_path = locate_metadata(model_path, config.metadata)
        metadata = read_metadata(metadata_path)
    else:
        candidate = Path(model_path) / METADATA_FILE
        if candidate.is_file():  # only to record bits next to constant ranks
            metadata_path, metadata = candidate, read_metadata(candidate)
    given, residuals = residuals, {}
    if mode == "by_residual" or config.loftq:
        cap = config.max_rank or DEFAULT_MAX_RANK_FACTOR * base_rank
        if mode != "by_residual":
            ranks = mode_ranks(mode, dims, base_rank, metadata, metadata_path, max_rank=config.max_rank)
            cap = max(ranks.values())
        if given is not None:
            short = [n for n in dims if n not in given or given[n].u.shape[1] < min(cap, *dims[n])]
            if short:
                raise ValueError(f"given residuals miss or are too short for {short[:5]} (rank up to {cap})")
            residuals = {n: given[n] for n in dims}
        else:
            source = float_model or residual.float_source(
                model_path, config.load_scheme, metadata, "rank_scaling" if mode == "by_residual" else "lora_init"
            )
            residuals = residual.compute_residuals(model, list(dims), source, cap, progress=progress)
        if mode == "by_residual":
            gains = residual.residual_gains(residuals, metadata["layers"], metadata_path, cap)
            ranks = allocate_by_gain(dims, gains, base_rank, max_rank=cap)
    else:
        ranks = mode_ranks(mode, dims, base_rank, metadata, metadata_path, max_rank=config.max_rank)
    layers = metadata["layers"] if metadata else {}
    return RankPlan(
        mode,
        base_rank,
        ranks,
        dims,
        metadata_path,
        {n: layers[n] for n in dims if n in layers},
        init="loftq" if config.loftq else "zero",
        residuals=residuals,
    )


def resumed_record(config: LoraTrainingConfig, resume: str | Path | None, base_rank: int | None = None) -> dict | None:
    """The rank record beside the adapter file a run resumes from, or None when it has none.

    A resumed adapter keeps the ranks its file was trained at. With a record, a run whose
    `rank_scaling` (when given) or `fine_tune_type` contradicts it is a ConfigError naming
    both; without `rank_scaling` the record alone decides (`plan_from_record`). Without a
    record the file was trained at one constant rank (stock mlx-lm): a run without
    `rank_scaling` is stock's to resume, a by_bits/by_kl run is refused (its planned ranks
    differ: a cut rank would drop trained capacity and a zero-padded one never trains), and a
    constant run must be at the file's rank (`base_rank`). Checked before the model loads.
    """
    if resume is None:
        return None
    if config.loftq:
        raise ConfigError(
            "lora_init",
            f"loftq initialises a new adapter, but this run resumes {resume} (its trained weights would replace "
            "the initialisation): drop `lora_init` or the resume",
        )
    record = adapter_files.record_beside(resume)
    if record is None and config.rank_scaling is None:
        return None  # stock resumes it
    if not Path(resume).is_file():
        raise ConfigError("resume_adapter_file", f"{resume}: file not found")
    if record is None:
        _check_constant_resume(config, Path(resume), base_rank)
        return None
    source = Path(resume).parent / adapter_files.RECORD_FILE
    recorded = record.get("rank_scaling")
    if config.rank_scaling is not None and config.rank_scaling != recorded:
        raise ConfigError(
            "rank_scaling",
            f"is {config.rank_scaling}, but the adapter being resumed was trained with rank scaling "
            f"{recorded} ({source}); a resumed run keeps its ranks: drop `rank_scaling` or pass {recorded}",
        )
    if config.fine_tune_type != record["fine_tune_type"]:
        raise ConfigError(
            "fine_tune_type",
            f"is {config.fine_tune_type}, but the adapter being resumed is {record['fine_tune_type']} ({source})",
        )
    return record


def _check_constant_resume(config: LoraTrainingConfig, resume: Path, base_rank: int | None) -> None:
    """A rank-scaled run resuming an adapter file that has no rank record (see `resumed_record`)."""
    if config.rank_scaling != "constant":
        raise ConfigError(
            "rank_scaling",
            f"is {config.rank_scaling}, but the adapter being resumed ({resume}) has no "
            f"{adapter_files.RECORD_FILE} beside it: it was trained at one constant rank, and a resumed run "
            "keeps its ranks; drop `rank_scaling` to continue it at its rank, or train a new adapter",
        )
    import mlx.core as mx

    try:
        weights = mx.load(str(resume))
    except (OSError, RuntimeError, ValueError) as e:
        raise OptiqFileError(f"{resume}: not a safetensors adapter file ({e})") from None
    ranks = sorted({shape["rank"] for shape in adapter_files.adapter_shapes(weights).values()})
    if base_rank is not None and ranks and ranks != [base_rank]:
        raise ConfigError(
            "rank_scaling",
            f"is constant at rank {base_rank}, but the adapter being resumed ({resume}) has rank "
            f"{', '.join(map(str, ranks))}: a resumed run keeps its ranks; train at that rank (lora_parameters.rank)",
        )


def plan_from_record(record: dict, model: Any, source: str | Path) -> RankPlan:
    """The rank plan a record (optiq_lora_config.json) describes, for the LoRA layers on `model`.

    Resuming a rank-scaled adapter must train at the ranks its files were written with, whatever
    the resumed run's flags would plan now; the LoRA modules stock put on the model must be the
    record's (same paths and dims), else a ConfigError on `rank_scaling` says which differ.
    """
    modules = adapter_files.lora_modules(model)
    dims = {name: adapter_files.module_dims(m) for name, m in modules.items()}
    recorded = record["modules"]
    missing, extra = sorted(set(recorded) - set(dims)), sorted(set(dims) - set(recorded))
    wrong = [
        n
        for n in set(dims) & set(recorded)
        if (recorded[n].get("input_dims", dims[n][0]), recorded[n].get("output_dims", dims[n][1])) != dims[n]
    ]
    if missing or extra or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(names[:4])}" + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            for what, names in (
                ("recorded but not adapted in this run", missing),
                ("adapted in this run but not recorded", extra),
                ("with other dims", sorted(wrong)),
            )
            if names
        )
        raise ConfigError(
            "rank_scaling",
            f"the resumed adapter's ranks ({source}) are for other LoRA modules than this run adapts ({detail}): "
            "resume with the same model, num_layers and lora_parameters.keys",
        )
    base_rank = record.get("base_rank") or max(adapter_files.record_ranks(record).values())
    metadata = record.get("metadata")
    return RankPlan(
        mode=record.get("rank_scaling") or "constant",
        base_rank=int(base_rank),
        ranks=adapter_files.record_ranks(record),
        dims=dims,
        metadata_path=Path(metadata) if metadata else None,
        recorded={n: recorded[n] for n in dims},
        init=record.get("init") or "zero",
    )


class PaddedSaves:
    """Every adapter file a training run saves appears in `adapter_dir` zero-padded (stock-loadable).

    Stock training saves the model's trainable parameters (compact per-module ranks) to
    adapters.safetensors and `NNNNNNN_adapters.safetensors` checkpoints. The trainer is pointed
    at `staging` (a hidden folder inside `adapter_dir`) instead; `sync()` writes each new or
    changed file from there into `adapter_dir` padded, atomically. The training loop calls it
    before every batch (right after any save) and once at the end, so a run killed at any
    moment leaves only stock-loadable adapter files at the paths stock reads.
    """

    STAGING = ".optiq-compact-saves"

    def __init__(self, adapter_dir: str | Path, ranks: dict[str, int]):
        import shutil

        self.adapter_dir = Path(adapter_dir)
        self.staging = self.adapter_dir / self.STAGING
        shutil.rmtree(self.staging, ignore_errors=True)  # a killed run's leftovers are not this run's saves
        self.staging.mkdir(parents=True)
        self.ranks = dict(ranks)

    def sync(self) -> None:
        """Pad every file saved since the last call into `adapter_dir` (each is then removed from
        staging, so whatever staging holds is new)."""
        for f in sorted(self.staging.glob("*adapters.safetensors")):
            adapter_files.pad_adapter_file(f, self.adapter_dir / f.name, self.ranks)
            f.unlink()

    def batches(self, iterate_batches: Any) -> Any:
        """`iterate_batches` that syncs before handing out each batch (the trainer saves between batches)."""

        def iterate(*args: Any, **kwargs: Any) -> Any:
            for batch in iterate_batches(*args, **kwargs):
                self.sync()
                yield batch

        return iterate

    def close(self) -> None:
        """Sync the last saves and remove the staging folder."""
        import shutil

        try:
            self.sync()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)


def apply_rank_plan(
    model: Any,
    plan: RankPlan,
    lora_parameters: Mapping[str, Any],
    *,
    use_dora: bool,
    adapter_path: str | Path,
    base_model: str | Path,
    resume: str | Path | None = None,
) -> RankPlan:
    """Re-rank the LoRA layers stock `linear_to_lora_layers` just made; write the rank record.

    `resume` is an adapter file to continue from (mlx_lm.lora's resume file), padded
    or compact, loaded at the planned ranks (its cut-off part must be zero). Stock
    resumes with load_weights(strict=False), which does not check shapes, so it
    must not see that file.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    scale, dropout = lora_parameters["scale"], lora_parameters.get("dropout", 0.0)
    adapter_files.build_lora_modules(model, plan.ranks, scale=scale, dropout=dropout, use_dora=use_dora)
    if plan.init == "loftq" and plan.residuals:  # a restored plan (resume) keeps its trained weights
        if use_dora or resume is not None:
            raise ConfigError("lora_init", "loftq initialises new LoRA (not DoRA) layers only, not a resumed adapter")
        residual.loftq_init(model, plan.ranks, plan.residuals, scale)
    if resume is not None:
        print(f"[optiq] Loading fine-tuned weights from {resume} at the planned per-layer ranks")
        weights = adapter_files.fit_adapter_weights(mx.load(str(resume)), plan.ranks, source=str(resume))
        params = dict(tree_flatten(model.parameters()))
        bad = [k for k, w in weights.items() if k not in params or params[k].shape != w.shape]
        if bad:
            raise OptiqFileError(f"{resume}: tensors {bad[:5]} do not fit the planned ranks")
        model.load_weights(list(weights.items()), strict=False)
    record = adapter_files.new_record(
        base_model=str(base_model),
        fine_tune_type="dora" if use_dora else "lora",
        rank_scaling=plan.mode,
        base_rank=plan.base_rank,
        scale=scale,
        dropout=dropout,
        metadata=str(plan.metadata_path) if plan.metadata_path else None,
        budget_params=plan.budget_params,
        modules=plan.module_entries(),
        init=plan.init,
    )
    adapter_files.write_record(adapter_path, record)
    print(f"[optiq] {plan.summary()}")
    return plan
