"""One rank-scaled LoRA run: plan the per-module ranks, then put them on the model.

The hook on `mlx_lm.lora` calls these right after stock `linear_to_lora_layers`
converted the model, before training:

    plan = plan_ranks(config, model, base_rank, model_path)     # reads the sidecar, allocates
    apply_rank_plan(model, plan, lora_parameters, ...)          # re-ranks, resumes, writes the record

Load-time quantization of the base (`config.load_scheme`) is `qlora.load_quantized`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.lora import adapter_files
from mlx_lm_optiq.lora.config import LoraTrainingConfig, locate_metadata
from mlx_lm_optiq.lora.ranks import Dims, budget_params, layer_sensitivity, lora_params, mode_ranks
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
            if name in self.layers:
                entry["bits"] = self.layers[name]["bits"]
                kl = layer_sensitivity(self.layers[name])
                if kl is not None:
                    entry["kl"] = kl
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


def plan_ranks(config: LoraTrainingConfig, model: Any, base_rank: int, model_path: str | Path) -> RankPlan:
    """The per-module ranks for the LoRA layers stock `linear_to_lora_layers` put on `model`.

    by_bits/by_kl read `config.metadata` (default: the sidecar next to `model_path`);
    constant ranks read a sidecar only to record bits next to the ranks.
    """
    mode = config.rank_scaling or "constant"
    modules = adapter_files.lora_modules(model)
    if not modules:
        raise ConfigError(
            "rank_scaling", "the model has no LoRA layers to rank (check num_layers / lora_parameters.keys)"
        )
    dims = {name: adapter_files.module_dims(m) for name, m in modules.items()}
    metadata, metadata_path = None, None
    if mode != "constant" or config.metadata is not None:
        metadata_path = locate_metadata(model_path, config.metadata)
        metadata = read_metadata(metadata_path)
    else:
        candidate = Path(model_path) / METADATA_FILE
        if candidate.is_file():  # only to record bits next to constant ranks
            metadata_path, metadata = candidate, read_metadata(candidate)
    ranks = mode_ranks(mode, dims, base_rank, metadata, metadata_path, max_rank=config.max_rank)
    layers = metadata["layers"] if metadata else {}
    return RankPlan(mode, base_rank, ranks, dims, metadata_path, {n: layers[n] for n in dims if n in layers})


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
    if resume is not None:
        print(f"[optiq] Loading fine-tuned weights from {resume} at the planned per-layer ranks")
        weights = adapter_files.fit_adapter_weights(mx.load(str(resume)), plan.ranks, source=str(resume))
        params = dict(tree_flatten(model.parameters()))
        bad = [k for k, w in weights.items() if k not in params or params[k].shape != w.shape]
        if bad:
            raise ValueError(f"{resume}: tensors {bad[:5]} do not fit the planned ranks")
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
    )
    adapter_files.write_record(adapter_path, record)
    print(f"[optiq] {plan.summary()}")
    return plan
