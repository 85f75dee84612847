"""`WeightsConfig`: everything one mixed-precision conversion is asked to do, validated once.

Built once by the convert hook from its flags (or the keywords of the Python API) plus
the stock convert arguments it depends on, then handed to
`weights.pipeline`. Candidates are parsed here, once, into candidate dicts; nothing
below re-parses them. Errors are `core.config.ConfigError`s naming fields; a field
mentioned inside an error's detail is written in backticks (`target_bpw`) so the hook
can spell it as the flag the user typed.

What a measuring convert leaves unset defaults per backend (`measurement_defaults`, the same
design as kv/config.py): everywhere the 16 candidates the benchmarks found best for their cost
(docs/weights.md: 0.52x uniform 4-bit's KL where 4/8-bit g64 gave 0.87x); on a GPU the exact
sweep on 16x512 tokens (seconds there), on a CPU the Fisher estimate on 16x256 tokens, which
plans as well as the exact sweep on the GPU benchmark (within 3% KL) and takes minutes on 2
cores where the exact sweep takes hours. A value the user gives always wins; re-planning from a
table measures nothing and keeps the table's candidates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core import backend as _backend
from mlx_lm_optiq.core import formats
from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.weights import clipping, gptq, sweep
from mlx_lm_optiq.weights.plan import PROTECTIONS, check_protections

# Bits offered when only group sizes (or stock --q-group-size) are given: those of the default set.
DEFAULT_CANDIDATE_BITS = (3, 4, 5, 6, 8)
# The group size of `candidate_bits` given alone (as before: a subset of a table stays one).
DEFAULT_GROUP_SIZE = 64
# The default candidates: 3/4/5/6/8 bits x group 32/64/128 (128 fits only wide inputs) + nvfp4:16.
DEFAULT_CANDIDATES = ",".join([f"{b}:{g}" for b in DEFAULT_CANDIDATE_BITS for g in (32, 64, 128)] + ["nvfp4:16"])


@dataclass(frozen=True)
class MeasurementDefaults:
    """The measuring settings a backend uses for the ones the user leaves unset."""

    candidates: str
    sensitivity_method: str
    num_samples: int
    sequence_length: int


# The config fields that take a backend default (the names of MeasurementDefaults' fields).
MEASUREMENT_DEFAULT_FIELDS = tuple(f.name for f in fields(MeasurementDefaults))
# A GPU (CUDA, Metal): the exact sweep; the 135M bundled model takes 56 s on an H200 (16x512 tokens)
GPU_DEFAULTS = MeasurementDefaults(DEFAULT_CANDIDATES, "exact", num_samples=16, sequence_length=512)
# ... while the exact sweep's rough time on the model stays within this; above it (an 8B model) a
# defaulted exact measures with fisher instead (weights.pipeline.fit_method_to_model).
EXACT_DEFAULT_MAX_S = 300.0
# A CPU: the Fisher estimate on half the tokens, ~9 minutes for the bundled model on 2 cores
# (the exact sweep: hours), planning as well as the exact sweep did on the GPU benchmark.
CPU_DEFAULTS = MeasurementDefaults(DEFAULT_CANDIDATES, "fisher", num_samples=16, sequence_length=256)


# Distillation of scales and biases after writing (weights.distill), on by default on a GPU: on the
# H200 (bundled model, 3.5 BPW with the 2-bit candidates, GPTQ-written, held-out Emma KL) 22 / 44 /
# 88 steps gave 0.595 -> 0.444 / 0.408 / 0.391 (below uniform 4-bit g64's 0.417 at 4.5 BPW) in
# 15-35 s, and 88 steps at 4.5 BPW 0.128 -> 0.110 in 48 s (docs/weights.md). Off on a CPU, where
# 22 steps alone take ~14 min. A defaulted distillation is dropped where its rough time on the
# model is over DISTILL_DEFAULT_MAX_S (weights.pipeline.fit_distill_to_model).
GPU_DISTILL_STEPS = 88
DISTILL_DEFAULT_MAX_S = 300.0


def measurement_defaults(backend: str) -> MeasurementDefaults:
    """The default measuring settings on `backend` (core.backend.compute_backend)."""
    return CPU_DEFAULTS if backend == "cpu" else GPU_DEFAULTS


# Below this target BPW the default candidates gain 2-bit ones (LOW_BIT_CANDIDATES). On the
# quality-vs-BPW curve (docs/weights.md) they lower the KL 0.69x at 3.51 BPW and 0.80x at 3.63,
# make 3.0-3.45 BPW possible at all (the 16 candidates' cheapest plan of the bundled model is
# 3.458 BPW), and change nothing beyond noise from 3.75 BPW up (1.02x, 0.98x) — where they would
# only cost sweep time.
LOW_BIT_BELOW_BPW = 3.7
LOW_BIT_CANDIDATES = "2:32,2:64"


def added_low_bit_candidates(target_bpw: float) -> str | None:
    """LOW_BIT_CANDIDATES when a measuring convert at `target_bpw` adds them to its defaults, else None
    (the one place that holds the rule: the defaults, the measurement line and a re-plan's hint ask it)."""
    return LOW_BIT_CANDIDATES if target_bpw < LOW_BIT_BELOW_BPW else None


def default_candidates(defaults: MeasurementDefaults, target_bpw: float) -> str:
    """The candidate set a measuring convert uses when none is given: the backend's, plus the
    2-bit candidates for a target below LOW_BIT_BELOW_BPW."""
    added = added_low_bit_candidates(target_bpw)
    return f"{defaults.candidates},{added}" if added else defaults.candidates


def per_backend_help(name: str) -> str:
    """The help-text note for a field with a backend default: "default X on a CPU, Y on a GPU"."""
    cpu, gpu = getattr(CPU_DEFAULTS, name), getattr(GPU_DEFAULTS, name)
    return f"default {cpu}" if cpu == gpu else f"default {cpu} on a CPU, {gpu} on a GPU"


# Fields that configure measuring the sensitivity table: meaningless when it is read from a file.
MEASURING_FIELDS = (
    "calibration",
    "num_samples",
    "sequence_length",
    "sensitivity_method",
    "reference",
    "checkpoint",
    "clipping",
)
# Fields that choose the candidates (none given with a `sensitivity` table: the table's candidates).
CANDIDATE_FIELDS = ("candidate_bits", "group_sizes", "candidates")
# Fields that only make sense with a target (everything but the target and text_only).
PLANNING_FIELDS = (
    "candidate_bits",
    "group_sizes",
    "candidates",
    "sensitivity",
    "protect",
    "writer",
    "distill_steps",
    *MEASURING_FIELDS,
)
# Stock convert arguments the weights feature reads (not its own flags).
STOCK_FIELDS = ("q_group_size", "q_mode", "dequantize", "quant_predicate")
# Fields with a fixed set of values.
CHOICES = {
    "sensitivity_method": sweep.METHODS,
    "reference": sweep.REFERENCE_MODES,
    "clipping": clipping.METHODS,
    "writer": gptq.WRITERS,
}


GPTQ_NEEDS_FLOAT = (
    "gptq needs the float model's calibration inputs (one forward of the float model), which the "
    "low-bit `reference` is there to avoid: use `writer` rtn, or the float reference"
)

GPTQ_NEEDS_RESIDENT = (
    "gptq loads the whole float model, and this quantized source's dequantization does not fit in memory "
    "(the Fisher sweep holds it quantized): use `writer` rtn"
)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class WeightsConfig:
    """One mixed-precision conversion (and/or a text-only rewrite); `None` means "not given".

    After `__post_init__`, `candidates` holds the validated candidate dicts (cheapest
    first) whether they were listed explicitly or given as `candidate_bits` x
    `group_sizes` (which are then cleared: `candidates` says it all), and `protect`
    is a list of protection names. Re-planning from a `sensitivity` table with none of
    those given leaves `candidates` None: the plan then chooses from every candidate the
    table measured (weights.pipeline.plan_weights), not from defaults it may lack; given,
    they restrict the choice to that subset of the table's.
    """

    target_bpw: float | None = field(
        default=None,
        metadata=_help(
            "Mixed precision: average bits per weight (as mlx-lm counts it, scales included) "
            "to spend where the measured KL divergence says it matters."
        ),
    )
    candidate_bits: str | list[int] | None = field(
        default=None,
        metadata=_help(
            "Comma-separated bit widths to choose from per module, at the group sizes given (default "
            f"{','.join(map(str, DEFAULT_CANDIDATE_BITS))} when only group sizes are given; with neither: "
            "the default candidates; when re-planning from a saved sensitivity table: the table's)."
        ),
    )
    group_sizes: str | list[int] | None = field(
        default=None,
        metadata=_help(
            "Comma-separated group sizes to choose from, with the bits given (default: "
            f"--q-group-size or {DEFAULT_GROUP_SIZE})."
        ),
    )
    candidates: str | list[Any] | None = field(
        default=None,
        metadata=_help(
            "Explicit comma-separated candidates instead of bits x group sizes: BITS:GROUP "
            "(affine) or MODE:GROUP for mlx's float formats, e.g. 3:64,4:64,nvfp4:16,8:64 (default, "
            f"when no bits, group sizes or --q-group-size are given: {DEFAULT_CANDIDATES}, plus "
            f"{LOW_BIT_CANDIDATES} for a target below {LOW_BIT_BELOW_BPW} BPW; with "
            "--q-group-size G alone: 3/4/5/6/8 bits at G; when re-planning: the table's)."
        ),
    )
    calibration: str | Path | None = field(
        default=None,
        metadata=_help(
            "Calibration JSONL, one {'text': ...} or {'messages': [...]} per line (default: the bundled set)."
        ),
    )
    num_samples: int | None = field(
        default=None, metadata=_help(f"Calibration sequences ({per_backend_help('num_samples')}).")
    )
    sequence_length: int | None = field(
        default=None, metadata=_help(f"Tokens per sequence ({per_backend_help('sequence_length')}).")
    )
    sensitivity: str | Path | None = field(
        default=None,
        metadata=_help(
            "Plan from a saved sensitivity table (or a converted model's optiq_metadata.json) instead of measuring."
        ),
    )
    sensitivity_method: str | None = field(
        default=None,
        metadata=_help(
            "exact: measured KL per module and candidate; fisher: fast second-order estimate "
            f"({per_backend_help('sensitivity_method')}; exact with a checkpoint or the low-bit reference)."
        ),
    )
    reference: str | None = field(default=None, metadata=_help("Reference model of the KL measurement (default auto)."))
    clipping: str | None = field(
        default=None,
        metadata=_help(
            "Group ranges, measured and written alike: clipped where the calibration activations say it "
            "lowers the layer's output error (default activation), or stock min/max (none)."
        ),
    )
    checkpoint: str | Path | None = field(
        default=None, metadata=_help("Resume file for the sensitivity sweep (written as it goes).")
    )
    protect: str | list[str] | None = field(
        default=None,
        metadata=_help(f"Comma-separated modules to keep at their most precise candidate: {','.join(PROTECTIONS)}."),
    )
    writer: str | None = field(
        default=None,
        metadata=_help(
            "How the planned affine modules are rounded: gptq (error-compensated: each rounding error is "
            "spread onto the input channels not yet rounded, from the calibration inputs' Hessian; same "
            "formats and scales) or rtn (round to nearest, stock). Default "
            f"{gptq.DEFAULT_WRITER} with a float-reference sensitivity table, rtn with a low-bit one or where "
            "a quantized source's dequantization does not fit in memory (the sweep then holds it quantized)."
        ),
    )
    distill_steps: int | None = field(
        default=None,
        metadata=_help(
            "After writing, distil the affine modules' scales and biases against the float model for this "
            "many steps of 4 calibration windows (mlx-lm's DWQ; formats and size unchanged; kept only if "
            f"the KL on 4 held-out calibration windows goes down; Adam at 3e-5, or 1e-5 when that KL starts below 0.1). Default {GPU_DISTILL_STEPS} on a GPU where it "
            f"takes under ~{DISTILL_DEFAULT_MAX_S / 60:.0f} min (the bundled model: 35-48 s on an H200; 3.5 BPW "
            "held-out KL 0.595 -> 0.391), off on a CPU (22 steps: ~14 min on 2 cores); 0 turns it off."
        ),
    )
    text_only: bool = field(
        default=False,
        metadata=_help("Write only the text model of a multi-modal checkpoint (drop vision/audio weights and config)."),
    )
    # Stock convert's own arguments that the rules above depend on.
    q_group_size: int | None = field(default=None, metadata=_help("Stock convert's group size."))
    q_mode: str | None = field(default=None, metadata=_help("Stock convert's quantization mode."))
    dequantize: bool = field(default=False, metadata=_help("Stock convert's dequantize switch."))
    quant_predicate: Any = field(default=None, metadata=_help("Stock convert's quant_predicate."))
    # Set by __post_init__ (not flags) when measuring: the backend whose defaults filled the unset
    # measuring settings, which fields those were (what weights.pipeline says it chose), and why
    # the method differs from the backend's default when it does.
    backend: str | None = field(default=None, init=False)
    defaulted: tuple[str, ...] = field(default=(), init=False)
    method_note: str | None = field(default=None, init=False)
    # Whether distill_steps came from the GPU default (then dropped, with distill_note saying why,
    # where it cannot or should not run: weights.pipeline.fit_distill_to_model).
    distill_defaulted: bool = field(default=False, init=False)
    distill_note: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.text_only = bool(self.text_only)
        if self.target_bpw is None:
            stray = [f for f in PLANNING_FIELDS if getattr(self, f) is not None]
            if stray:
                raise ConfigError("/".join(stray), "need `target_bpw`")
            return
        self.target_bpw = _positive(self.target_bpw, "target_bpw", float)
        if self.dequantize:
            raise ConfigError("target_bpw", "mixed precision quantizes, so it cannot be combined with `dequantize`")
        if self.quant_predicate is not None:
            raise ConfigError(
                "target_bpw", "chooses the bits per layer, so it cannot be combined with `quant_predicate`"
            )
        if self.sensitivity is not None and all(getattr(self, f) is None for f in CANDIDATE_FIELDS):
            self.candidates = None  # re-planning: the table's own candidates (weights.pipeline)
        else:
            self._default_measuring()
            self.candidates = self._parse_candidates()
        self.candidate_bits = self.group_sizes = None
        self.protect = _names(self.protect)
        check_protections(self.protect)
        if self.sensitivity is not None:
            measuring = [f for f in MEASURING_FIELDS if getattr(self, f) is not None]
            if measuring:
                raise ConfigError(
                    "/".join(measuring), "configure measuring, which `sensitivity` skips: drop one or the other"
                )
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ConfigError(name, f"expected one of {', '.join(allowed)}, got {value!r}")
        for name in ("num_samples", "sequence_length"):
            if getattr(self, name) is not None:
                setattr(self, name, _positive(getattr(self, name), name, int))
        if self.distill_steps is not None:
            self.distill_steps = _non_negative_int(self.distill_steps, "distill_steps") or None  # 0: off
        elif self.reference != "low-bit" and (self.backend or _backend.compute_backend()) != "cpu":
            self.distill_steps, self.distill_defaulted = GPU_DISTILL_STEPS, True
        if self.distill_steps is not None and self.reference == "low-bit":
            raise ConfigError(
                "distill_steps", "distils against the float model, which the low-bit `reference` is there to avoid"
            )
        if self.checkpoint is not None and self.sensitivity_method == "fisher":
            # Silently ignoring the file would let the user believe a resume is possible.
            raise ConfigError(
                "checkpoint",
                "resumes an exact sweep; `sensitivity_method` fisher is one quick pass with nothing "
                "to resume: drop one or the other",
            )
        if self.writer == "gptq" and self.reference == "low-bit":
            raise ConfigError("writer", GPTQ_NEEDS_FLOAT)

    def _default_measuring(self) -> None:
        """Fill the measuring settings left unset from the backend's defaults (measuring only).

        The candidates default only when no candidate flag and no stock group size was given (a
        group size alone, or bits alone, keep their own defaults in `_parse_candidates`). A Fisher
        default yields to exact where fisher cannot run: a resume file was asked for, or the
        low-bit reference (fisher needs the float model's gradients)."""
        if self.sensitivity is not None:
            return
        self.backend = _backend.compute_backend()
        defaults = measurement_defaults(self.backend)
        defaulted = []
        if all(getattr(self, f) is None for f in CANDIDATE_FIELDS) and self.q_group_size is None:
            if (self.q_mode or "affine") == "affine":
                self.candidates = default_candidates(defaults, self.target_bpw)
                defaulted.append("candidates")
        for name in ("sensitivity_method", "num_samples", "sequence_length"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(defaults, name))
                defaulted.append(name)
        if "sensitivity_method" in defaulted and self.sensitivity_method == "fisher":
            if self.checkpoint is not None:
                self.method_note = "exact: a `checkpoint` resumes only an exact sweep"
            elif self.reference == "low-bit":
                self.method_note = "exact: fisher needs the float model, and `reference` is low-bit"
            if self.method_note is not None:
                self.sensitivity_method = "exact"
        self.defaulted = tuple(defaulted)

    def _parse_candidates(self) -> list[formats.Candidate]:
        mode = self.q_mode or "affine"
        if self.candidates is not None:
            both = [f for f in ("candidate_bits", "group_sizes") if getattr(self, f) is not None]
            if both:
                raise ConfigError("candidates", f"lists every candidate: drop `{both[0]}`")
            if mode != "affine":
                raise ConfigError("candidates", f"names each candidate's format: drop `q_mode` {mode}")
            try:
                return formats.parse_candidates(self.candidates)
            except (formats.FormatError, ValueError) as e:
                raise ConfigError("candidates", str(e)) from None
        bits = _int_list(self.candidate_bits, "candidate_bits") or list(DEFAULT_CANDIDATE_BITS)
        groups = _int_list(self.group_sizes, "group_sizes") or [self.q_group_size or DEFAULT_GROUP_SIZE]
        if mode != "affine":
            raise ConfigError(
                "q_mode",
                f"only affine quantization is supported with `candidate_bits` x "
                f"`group_sizes`, got {mode!r} (other formats go in `candidates`, "
                "e.g. 4:64,nvfp4:16,8:64)",
            )
        try:
            return formats.make_candidates(bits, groups)
        except formats.FormatError as e:
            raise ConfigError("candidate_bits/group_sizes", str(e)) from None

    @classmethod
    def from_convert(cls, options: Mapping[str, Any], call: Mapping[str, Any]) -> WeightsConfig:
        """The config of one convert call.

        options: the convert hook's option values, prefix stripped (None: not given; other
        features' options are ignored). call: stock convert's bound arguments.
        """
        own = {f.name for f in fields(cls) if f.init} - set(STOCK_FIELDS)
        given = {k: v for k, v in options.items() if k in own and v is not None}
        return cls(**given, **{k: call.get(k) for k in STOCK_FIELDS if call.get(k) is not None})

    def calibration_sizes(self) -> dict[str, int]:
        """The calibration sizes that were given (`load_calibration` has the defaults)."""
        return {k: getattr(self, k) for k in ("num_samples", "sequence_length") if getattr(self, k) is not None}

    def sweep_settings(self) -> sweep.SweepSettings:
        """How to measure the sensitivity table (`SweepSettings` has the defaults)."""
        given = {
            "method": self.sensitivity_method,
            "reference": self.reference,
            "clipping": self.clipping,
            "checkpoint_path": self.checkpoint,
        }
        return sweep.SweepSettings(**{k: v for k, v in given.items() if v is not None})


def _int_list(value: Any, name: str) -> list[int] | None:
    """ "4,8" or [4, 8] -> [4, 8]; None stays None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise ConfigError(name, f"expected comma-separated integers, got {value!r}") from None
    if not out:
        raise ConfigError(name, f"expected at least one integer, got {value!r}")
    return out


def _names(value: Any) -> list[str]:
    """ "embeddings,lm-head" or a list -> list of names."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(name, f"expected a whole number >= 0, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(name, f"expected a whole number >= 0, got {value!r}") from None
    if number < 0:
        raise ConfigError(name, f"expected a whole number >= 0, got {value!r}")
    return number


def _positive(value: Any, name: str, kind: type) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(name, f"expected a positive number, got {value!r}") from None
    if not number > 0 or number != number or number == float("inf"):
        raise ConfigError(name, f"expected a positive number, got {value!r}")
    return number
