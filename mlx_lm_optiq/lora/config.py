"""What optiq adds to an `mlx_lm.lora` run, as one validated config.

Per-module LoRA ranks (`rank_scaling`, `metadata`, `max_rank`) and quantizing a float
base while loading it (`load_in_4bits` ... `load_mixed`). The hook on `mlx_lm.lora`
builds it once from the run's arguments (flags and `-c` YAML keys land there alike),
so a YAML value that skipped argparse's checks is validated here too. Errors name the field (`ConfigError`); the hook spells them as flags. Inside an
error's detail, another field is written in backticks (`rank_scaling`) so that the
hook can spell it as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.jsonio import OptiqFileError
from mlx_lm_optiq.weights.metadata import find_metadata, read_metadata

RANK_SCALING_MODES = ("constant", "by_bits", "by_kl", "by_residual")
# How new LoRA A/B start: zero (stock: B = 0) or loftq (truncated SVD of the quantization residual).
LORA_INITS = ("zero", "loftq")
# Load-time quantization schemes, named as their config fields; at most one is set.
UNIFORM_LOAD_SCHEMES = ("load_in_4bits", "load_in_6bits", "load_in_8bits", "load_in_mxfp4")
MIXED_LOAD_SCHEME = "load_mixed"
LOAD_SCHEMES = (*UNIFORM_LOAD_SCHEMES, MIXED_LOAD_SCHEME)
# mlx_lm.lora fine-tune types that put LoRA layers on the model (`full` does not).
LORA_FINE_TUNE_TYPES = ("lora", "dora")

_UNIFORM_HELP = {
    "load_in_4bits": "4-bit affine, group 128",
    "load_in_6bits": "6-bit affine, group 128",
    "load_in_8bits": "8-bit affine, group 128",
    "load_in_mxfp4": "mxfp4, group 32",
}


def _load_help(what: str) -> dict[str, str]:
    return {"help": f"Quantize a float --model while loading it ({what}; group 64/32 where 128 does not divide)."}


class MetadataNotFound(ConfigError, OptiqFileError):
    """No optiq_metadata.json where `metadata` (or its default, next to the model) points.

    Both a config error (the user fixes it through `metadata` or `rank_scaling`) and
    a file error (what callers caught before the config existed).
    """


@dataclass
class LoraTrainingConfig:
    """optiq's part of one `mlx_lm.lora` training run. `None`/`False` fields leave stock behaviour."""

    rank_scaling: str | None = field(
        default=None,
        metadata={
            "help": "Per-layer LoRA rank at the parameter budget of constant --rank: constant, by_bits "
            "(rank proportional to the layer's quantization bits), by_kl (to its measured sensitivity) or "
            "by_residual (greedy on the sensitivity-weighted singular values of each layer's quantization "
            "residual). by_bits/by_kl/by_residual read the model's optiq_metadata.json."
        },
    )
    metadata: Path | None = field(
        default=None,
        metadata={"help": "optiq_metadata.json to read per-layer bits/KL from (default: the one next to --model)."},
    )
    max_rank: int | None = field(
        default=None,
        metadata={"help": "Largest rank any one layer may get with by_bits/by_kl (default 4x the base rank)."},
    )
    load_in_4bits: bool = field(default=False, metadata=_load_help(_UNIFORM_HELP["load_in_4bits"]))
    load_in_6bits: bool = field(default=False, metadata=_load_help(_UNIFORM_HELP["load_in_6bits"]))
    load_in_8bits: bool = field(default=False, metadata=_load_help(_UNIFORM_HELP["load_in_8bits"]))
    load_in_mxfp4: bool = field(default=False, metadata=_load_help(_UNIFORM_HELP["load_in_mxfp4"]))
    load_mixed: bool = field(
        default=False,
        metadata={
            "help": "Quantize a float --model while loading it with the per-layer bits of an optiq_metadata.json."
        },
    )
    lora_init: str | None = field(
        default=None,
        metadata={
            "help": "How new LoRA weights start: zero (stock, B = 0) or loftq (A/B from the truncated SVD of "
            "each layer's quantization residual, so training starts at the float model's best low-rank "
            "correction; needs the float weights: a load-time quantized float --model, or a model our "
            "convert wrote)."
        },
    )
    qat: bool = field(
        default=False,
        metadata={
            "help": "Quantization-aware LoRA on a float --model: each adapted layer trains through the "
            "round-to-nearest quantization of W + its LoRA update at that layer's bits/group/mode from "
            "optiq_metadata.json (straight-through gradients), other layers run quantized at theirs, so "
            "mlx_lm.fuse + re-quantization to the same plan (python -m mlx_lm_optiq.lora.qat) keeps the gain."
        },
    )
    fine_tune_type: str = field(
        default="lora",
        metadata={"help": "mlx_lm.lora's own fine-tune type (lora, dora, full); rank scaling needs lora or dora."},
    )

    def __post_init__(self) -> None:
        if self.rank_scaling is not None and self.rank_scaling not in RANK_SCALING_MODES:
            # a YAML value skips argparse's choices
            raise ConfigError("rank_scaling", f"got {self.rank_scaling!r}, expected one of {list(RANK_SCALING_MODES)}")
        if self.metadata is not None:
            if not isinstance(self.metadata, (str, PathLike)):
                raise ConfigError("metadata", f"expected a file path, got {self.metadata!r}")
            self.metadata = Path(self.metadata)
        if self.max_rank is not None:
            if not isinstance(self.max_rank, int) or isinstance(self.max_rank, bool) or self.max_rank < 1:
                raise ConfigError("max_rank", f"expected a positive integer, got {self.max_rank!r}")
            if self.rank_scaling is None:
                raise ConfigError("max_rank", "only applies with `rank_scaling` by_bits/by_kl")
        if self.lora_init is not None and self.lora_init not in LORA_INITS:
            raise ConfigError("lora_init", f"got {self.lora_init!r}, expected one of {list(LORA_INITS)}")
        if self.lora_init == "loftq" and self.fine_tune_type != "lora":
            raise ConfigError(
                "lora_init", f"loftq initialises LoRA layers; `fine_tune_type` is {self.fine_tune_type!r}"
            )
        for name in LOAD_SCHEMES:
            value = getattr(self, name)
            if value is None:
                setattr(self, name, False)
            elif not isinstance(value, bool):
                raise ConfigError(name, f"expected true or false, got {value!r}")
        chosen = [name for name in LOAD_SCHEMES if getattr(self, name)]
        if len(chosen) > 1:
            raise ConfigError("/".join(chosen), "choose one load-time quantization")
        if self.qat is None:
            self.qat = False
        if not isinstance(self.qat, bool):
            raise ConfigError("qat", f"expected true or false, got {self.qat!r}")
        if self.qat and chosen:
            raise ConfigError(
                "qat", f"trains on the float model and quantizes by the sidecar itself; drop `{chosen[0]}`"
            )
        if self.qat and self.loftq:
            raise ConfigError(
                "qat",
                "`lora_init` loftq fits A·B to a quantized base's residual; QAT trains on the float base: use one",
            )
        if self.qat and self.fine_tune_type != "lora":
            raise ConfigError(
                "qat",
                f"needs `fine_tune_type` lora (DoRA's fused weight is not W + its update), got {self.fine_tune_type!r}",
            )
        if self.metadata is not None and not (self.rank_scaling or self.load_mixed or self.loftq or self.qat):
            raise ConfigError(
                "metadata", "is read by `rank_scaling`, `load_mixed`, `lora_init` loftq or `qat`; none is set"
            )
        if self.rank_scaling is not None and self.fine_tune_type not in LORA_FINE_TUNE_TYPES:
            raise ConfigError("rank_scaling", f"needs `fine_tune_type` lora or dora, got {self.fine_tune_type!r}")

    def check_sidecar(self, model_path: str | Path, for_ranks: bool = True) -> None:
        """Read the optiq_metadata.json this run will need (by_bits/by_kl ranks when `for_ranks`, the
        `load_mixed` bits) now, before the model and the data load: a missing or malformed sidecar
        fails in seconds (MetadataNotFound / OptiqFileError naming it), not after loading."""
        if (for_ranks and self.rank_scaling in ("by_bits", "by_kl", "by_residual")) or self.load_mixed or self.qat:
            read_metadata(locate_metadata(model_path, self.metadata))
        if for_ranks and (self.rank_scaling == "by_residual" or self.loftq) and self.load_scheme is None:
            # the residual needs the float weights: the sidecar's source model (lora/residual.py)
            from mlx_lm_optiq.lora.residual import float_source

            field = "rank_scaling" if self.rank_scaling == "by_residual" else "lora_init"
            try:
                metadata = read_metadata(locate_metadata(model_path, self.metadata))
            except MetadataNotFound:
                metadata = None
            float_source(model_path, None, metadata, field)

    @property
    def loftq(self) -> bool:
        """Whether new LoRA layers start from the residual's truncated SVD (`lora_init` loftq)."""
        return self.lora_init == "loftq"

    @property
    def load_scheme(self) -> str | None:
        """The load-time quantization asked for (a field name of LOAD_SCHEMES), or None."""
        return next((name for name in LOAD_SCHEMES if getattr(self, name)), None)


def locate_metadata(model_path: str | Path, metadata: str | Path | None = None) -> Path:
    """The optiq_metadata.json to read: `metadata`, else the sidecar next to the model.

    A missing file is `MetadataNotFound` (field `metadata`); without an explicit path
    it also says how to do without a sidecar.
    """
    try:
        return find_metadata(model_path, metadata)
    except (OptiqFileError, FileNotFoundError) as e:
        hint = "" if metadata is not None else " (`metadata`), or use `rank_scaling` constant"
        raise MetadataNotFound("metadata", f"{e}{hint}") from None
