"""What a per-layer KV plan is made from: one typed, validated config.

Built once from the flags of `python -m mlx_lm_optiq.kv` (kv/cli.py) or of
`mlx_lm.convert`'s KV-plan flags (hooks/convert_kv.py), or from Python keywords, and
handed to `kv.pipeline.plan_kv`. Validation happens once, here; a `ConfigError`
names the field, and the caller renders it with the user's spelling of that field.
The flags of both entry points are generated from these fields (`flag_specs`), so
the two flag sets cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.kv.candidates import DEFAULT_KV_CANDIDATES, KVCandidate, parse_kv_candidates
from mlx_lm_optiq.kv.geometry import FLOAT_BITS
from mlx_lm_optiq.kv.sensitivity import PROBES

# Fields only the standalone CLI offers (reusing / keeping the measured table).
TABLE_PATH_FIELDS = ("sensitivity", "sensitivity_out")


@dataclass
class KVPlanConfig:
    """How to measure a model's per-layer KV sensitivity and allocate a plan from it.

    After `__post_init__`, `candidates` is a tuple of KVCandidates, or None when re-planning
    from a saved table (`sensitivity`) without candidates: the table's own are then the
    candidates (kv.pipeline.plan_kv), so a re-plan never narrows to defaults it did not measure.
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
    prefix_tokens: int = field(
        default=1536,
        metadata={"help": "tokens of context before the scored ones (long enough for the cache to matter)"},
    )
    scored_tokens: int = field(
        default=128, metadata={"help": "tokens whose next-token KL is measured after the prefix"}
    )
    num_windows: int = field(default=1, metadata={"help": "text windows to average over"})
    probe: str = field(
        default="exact",
        metadata={
            "choices": PROBES,
            "help": "exact: each probe runs the whole window with that layer quantized from the first token "
            "(as served); fast: float prefix, only the scored tokens re-run (cheaper, underestimates "
            "errors that compound through the prefix)",
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

    def __post_init__(self):
        if (
            isinstance(self.target_bits, bool)
            or not isinstance(self.target_bits, (int, float))
            or not (0 < self.target_bits <= FLOAT_BITS)
        ):
            raise ConfigError("target_bits", f"expected a number in (0, {FLOAT_BITS}], got {self.target_bits}")
        if self.candidates is not None or self.sensitivity is None:
            self.candidates = self._parse_candidates(self.candidates)
        for name in ("prefix_tokens", "scored_tokens", "num_windows", "context_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(name, f"expected a positive integer, got {v}")
        v = self.quantized_kv_start
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError("quantized_kv_start", f"expected an integer >= 0, got {v}")
        if self.probe not in PROBES:
            raise ConfigError("probe", f"expected one of {list(PROBES)}, got {self.probe!r}")
        if self.data is not None and Path(self.data).suffix == ".txt" and not Path(self.data).is_file():
            raise ConfigError("data", f"{self.data}: file not found")

    @staticmethod
    def _parse_candidates(value: Any) -> tuple[KVCandidate, ...]:
        if value is None:
            return DEFAULT_KV_CANDIDATES
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
        if not table_paths and f.name in TABLE_PATH_FIELDS:
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
