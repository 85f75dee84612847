"""What a per-layer KV plan is made from: one typed, validated config.

Built once from the flags of `python -m mlx_lm_optiq.kv` (kv/cli.py) or of
`mlx_lm.convert`'s KV-plan flags (hooks/convert_kv.py), or from Python keywords, and
handed to `kv.pipeline.plan_kv`. Validation happens once, here; a `ConfigError`
names the field, and the caller renders it with the user's spelling of that field.
The flags of both entry points are generated from these fields (`flag_specs`), so
the two flag sets cannot drift apart.

The measurement settings (candidates, window sizes, number of windows, probe) default per
backend (`measurement_defaults`): a GPU measures thoroughly (every probe replays the whole
window, as served), while on a CPU the same 360 probes of the 30-layer bundled model take
hours, so a CPU re-runs only the scored tokens after a shorter float prefix (docs/kv.md,
"Defaults", has the time and the quality of both). A setting the user gives always wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core import backend as _backend
from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.kv.candidates import DEFAULT_KV_CANDIDATES, KVCandidate, parse_kv_candidates
from mlx_lm_optiq.kv.geometry import FLOAT_BITS
from mlx_lm_optiq.kv.sensitivity import PROBES

# Fields only the standalone CLI offers (reusing / keeping the measured table).
TABLE_PATH_FIELDS = ("sensitivity", "sensitivity_out")


@dataclass(frozen=True)
class MeasurementDefaults:
    """The measurement settings a backend uses for the ones the user leaves unset."""

    candidates: tuple[KVCandidate, ...]
    prefix_tokens: int
    scored_tokens: int
    num_windows: int
    probe: str


# The config fields that take a backend default (the names of MeasurementDefaults' fields).
MEASUREMENT_FIELDS = tuple(f.name for f in fields(MeasurementDefaults))
# A GPU (CUDA, Metal): whole-window probes over a long prefix (46.7 s for 4 windows on an H200).
GPU_DEFAULTS = MeasurementDefaults(
    DEFAULT_KV_CANDIDATES, prefix_tokens=1536, scored_tokens=128, num_windows=1, probe="exact"
)
# A CPU: the same candidates, but each probe re-runs only 256 scored tokens after a float prefix
# of 512: minutes instead of hours on 2 cores. The best of the cheap settings measured side by side
# on held-out text (0.89x uniform 4-bit's KL; 64 scored tokens: 0.98x, 4 windows of 64: 0.92x, an
# exact probe over 128+64: 0.93x), though well short of the GPU's thorough plan (0.70x):
# docs/kv.md, "Defaults".
CPU_DEFAULTS = MeasurementDefaults(
    DEFAULT_KV_CANDIDATES, prefix_tokens=512, scored_tokens=256, num_windows=1, probe="fast"
)


def measurement_defaults(backend: str) -> MeasurementDefaults:
    """The default measurement settings on `backend` (core.backend.compute_backend)."""
    return CPU_DEFAULTS if backend == "cpu" else GPU_DEFAULTS


def _per_backend(name: str) -> str:
    """The help-text note for a field with a backend default: "default: X on a CPU, Y on a GPU"."""
    cpu, gpu = getattr(CPU_DEFAULTS, name), getattr(GPU_DEFAULTS, name)
    if cpu == gpu:
        return f"default: {cpu}"
    return f"default: {cpu} on a CPU, {gpu} on a GPU"


@dataclass
class KVPlanConfig:
    """How to measure a model's per-layer KV sensitivity and allocate a plan from it.

    After `__post_init__`, `candidates` is a tuple of KVCandidates, or None when re-planning
    from a saved table (`sensitivity`) without candidates: the table's own are then the
    candidates (kv.pipeline.plan_kv), so a re-plan never narrows to defaults it did not measure.

    The measurement settings (MEASUREMENT_FIELDS) left as None are filled, when measuring, from
    `measurement_defaults(backend)` for the backend MLX computes on; `backend` records it and
    `defaulted` which fields it filled (what kv.pipeline says it chose). Re-planning from a table
    measures nothing, so they stay None there.
    """

    target_bits: float = field(
        metadata={"type": float, "help": "average bits per cached element (fp16 = 16; 4-bit g64 costs 4.5)"}
    )
    candidates: str | Sequence[KVCandidate | tuple] | None = field(
        default=None,
        metadata={
            "help": "comma-separated K_BITS/V_BITS:GROUP candidates, e.g. 8/8:64,8/4:64,4/4:64 "
            "(default: K in {8,4} x V in {8,4,2} x group {64,32}; when re-planning from a saved "
            "table: every candidate it measured)"
        },
    )
    data: str | None = field(
        default=None,
        metadata={"help": "calibration text: a .txt file or a calibration .jsonl (default: the bundled set)"},
    )
    prefix_tokens: int | None = field(
        default=None,
        metadata={
            "type": int,
            "help": "tokens of context before the scored ones (long enough for the cache to matter; "
            f"{_per_backend('prefix_tokens')})",
        },
    )
    scored_tokens: int | None = field(
        default=None,
        metadata={
            "type": int,
            "help": f"tokens whose next-token KL is measured after the prefix ({_per_backend('scored_tokens')})",
        },
    )
    num_windows: int | None = field(
        default=None,
        metadata={"type": int, "help": f"text windows to average over ({_per_backend('num_windows')})"},
    )
    probe: str | None = field(
        default=None,
        metadata={
            "choices": PROBES,
            "help": "exact: each probe runs the whole window with that layer quantized from the first token "
            "(as served); fast: float prefix, only the scored tokens re-run (~prefix/scored times cheaper, "
            f"underestimates errors that compound through the prefix) ({_per_backend('probe')})",
        },
    )
    context_length: int = field(
        default=8192,
        metadata={"help": "context length the average bits are computed for (weights sliding-window layers)"},
    )
    quantized_kv_start: int = field(
        default=0,
        metadata={"help": "keep each cache in float until it holds this many tokens (mlx-lm's quantized_kv_start)"},
    )
    sensitivity: str | None = field(
        default=None,
        metadata={
            "help": "re-plan without measuring, from a saved KV sensitivity table or a kv_config.json "
            "(it holds every layer's measured KLs)"
        },
    )
    sensitivity_out: str | None = field(
        default=None, metadata={"help": "also save the measured sensitivity table here"}
    )
    # Set by __post_init__ (not flags): the backend whose defaults filled the unset measurement
    # settings, and which fields those were.
    backend: str | None = field(default=None, init=False)
    defaulted: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self):
        if (
            isinstance(self.target_bits, bool)
            or not isinstance(self.target_bits, (int, float))
            or not (0 < self.target_bits <= FLOAT_BITS)
        ):
            raise ConfigError("target_bits", f"expected a number in (0, {FLOAT_BITS}], got {self.target_bits}")
        if self.candidates is not None:
            self.candidates = self._parse_candidates(self.candidates)
        for name in ("prefix_tokens", "scored_tokens", "num_windows", "context_length"):
            v = getattr(self, name)
            if v is None and name in MEASUREMENT_FIELDS:
                continue  # the backend's default, below
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(name, f"expected a positive integer, got {v}")
        v = self.quantized_kv_start
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError("quantized_kv_start", f"expected an integer >= 0, got {v}")
        if self.probe is not None and self.probe not in PROBES:
            raise ConfigError("probe", f"expected one of {list(PROBES)}, got {self.probe!r}")
        if self.sensitivity is None:  # measuring: what the user left unset comes from the backend
            self.backend = _backend.compute_backend()
            defaults = measurement_defaults(self.backend)
            self.defaulted = tuple(name for name in MEASUREMENT_FIELDS if getattr(self, name) is None)
            for name in self.defaulted:
                setattr(self, name, getattr(defaults, name))
        if self.data is not None and Path(self.data).suffix == ".txt" and not Path(self.data).is_file():
            raise ConfigError("data", f"{self.data}: file not found")

    @staticmethod
    def _parse_candidates(value: Any) -> tuple[KVCandidate, ...]:
        try:
            if isinstance(value, str):
                return parse_kv_candidates(value)
            cands = tuple(KVCandidate.parse(c if isinstance(c, str) else KVCandidate(*c).key) for c in value)
        except (ValueError, TypeError) as e:
            raise ConfigError("candidates", str(e)) from None
        if not cands:
            raise ConfigError("candidates", "no candidates given")
        return cands

    @property
    def window_tokens(self) -> int:
        """Tokens per measurement window: the prefix, then the scored tokens."""
        return self.prefix_tokens + self.scored_tokens


def flag_specs(*, table_paths: bool = True) -> list[tuple[str, dict]]:
    """(field name, argparse keywords) for every config field, in order; the caller spells the flag.

    A field without a default is `required`; `table_paths=False` leaves out the
    fields only the standalone CLI has (TABLE_PATH_FIELDS)."""
    specs = []
    for f in fields(KVPlanConfig):
        if not f.init or (not table_paths and f.name in TABLE_PATH_FIELDS):
            continue
        kw = {"help": f.metadata.get("help", "")}
        if f.default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        arg_type = f.metadata.get("type", type(f.default) if isinstance(f.default, (int, float)) else None)
        if arg_type is not None:
            kw["type"] = arg_type
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        specs.append((f.name, kw))
    return specs
