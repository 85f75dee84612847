"""The weight-quantization vocabulary every feature shares: formats, candidates, storage cost.

A *candidate* is one way to store a module's weight: ``{"bits", "group_size", "mode"}``
with mode ``affine`` (mlx's integer groups with a scale and a bias) or one of mlx's
float formats (``nvfp4``, ``mxfp4``, ``mxfp8``; fixed bits and group size each).
Its *key* is how tables and sidecars name it: ``"4:64"`` (affine) or ``"nvfp4:16"``.

Parsing, validation, ordering and cost live here once, so the sweep, the planner, the
writer, LoRA rank allocation and the benchmarks cannot disagree on what a key means.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from mlx_lm_optiq.core.errors import OptiqError

Candidate = dict[str, Any]  # {"bits": int, "group_size": int, "mode": str}

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
# mlx's floating-point formats: bits and group size are fixed per format.
FORMAT_BITS = {"mxfp4": 4, "mxfp8": 8, "nvfp4": 4}
FORMAT_GROUPS = {"nvfp4": 16, "mxfp4": 32, "mxfp8": 32}
MODES = ("affine", *FORMAT_BITS)

_KEY = re.compile(r"[a-z0-9]+:\d+")


class FormatError(OptiqError):
    """A candidate that is malformed or that mlx cannot store."""


def candidate_key(bits: int, group_size: int, mode: str = "affine") -> str:
    """Table key of a candidate: "4:64" for affine, "mxfp4:32" for the float formats."""
    return f"{bits}:{group_size}" if mode == "affine" else f"{mode}:{group_size}"


def parse_candidate(spec: Any) -> Candidate:
    """A candidate dict from a dict, a ``(bits, group_size[, mode])`` pair or a key "4:64"/"nvfp4:16".

    Checks the shape of the spec only; `check_candidate` checks that mlx stores it.
    """
    if isinstance(spec, dict):
        try:
            bits, group_size = int(spec["bits"]), int(spec["group_size"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"candidate {spec!r}: expected integer fields 'bits' and 'group_size'") from None
        mode = spec.get("mode", "affine")
    elif isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        bits, group_size = int(spec[0]), int(spec[1])
        mode = spec[2] if len(spec) == 3 else "affine"
    elif isinstance(spec, str) and _KEY.fullmatch(spec):
        head, gs = spec.split(":")
        group_size = int(gs)
        if head.isdigit():
            bits, mode = int(head), "affine"
        elif head in FORMAT_BITS:
            bits, mode = FORMAT_BITS[head], head
        else:
            raise FormatError(f"candidate {spec!r}: unknown mode {head!r}")
    else:
        raise FormatError(
            f"candidate {spec!r}: expected 'BITS:GROUP' (e.g. 4:64), 'MODE:GROUP' (e.g. mxfp4:32), "
            "a (bits, group_size[, mode]) pair or a dict"
        )
    if mode in FORMAT_BITS and bits != FORMAT_BITS[mode]:
        raise FormatError(f"candidate {spec!r}: mode {mode} has {FORMAT_BITS[mode]} bits, got {bits}")
    return {"bits": bits, "group_size": group_size, "mode": mode}


def check_candidate(c: Candidate) -> Candidate:
    """Raise FormatError unless mlx can store candidate `c` (bits and group of its mode)."""
    if c["mode"] == "affine":
        if c["bits"] not in AFFINE_BITS:
            raise FormatError(f"candidate bits must be among {','.join(map(str, AFFINE_BITS))}, got {c['bits']}")
        if c["group_size"] not in AFFINE_GROUPS:
            raise FormatError(
                f"candidate group sizes must be among {','.join(map(str, AFFINE_GROUPS))}, got {c['group_size']}"
            )
    elif c["mode"] in FORMAT_GROUPS:
        if c["group_size"] != FORMAT_GROUPS[c["mode"]]:
            raise FormatError(f"{c['mode']} has group size {FORMAT_GROUPS[c['mode']]}, got {c['group_size']}")
    else:
        raise FormatError(f"unknown quantization mode {c['mode']!r}")
    return c


def parse_candidates(spec: str | Iterable[Any]) -> list[Candidate]:
    """Validated, de-duplicated candidate dicts, cheapest first.

    spec: "4:64,nvfp4:16,8:64" or a list of keys, dicts or pairs.
    """
    items = [k.strip() for k in spec.split(",") if k.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise FormatError("no candidates given")
    out, seen = [], set()
    for item in items:
        c = check_candidate(parse_candidate(item))
        key = candidate_key(**c)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return cheapest_first(out)


def make_candidates(bits_list: Iterable[int], group_sizes: Iterable[int]) -> list[Candidate]:
    """Every affine (bits, group_size) pair as validated candidates, cheapest first."""
    groups = list(group_sizes)
    return parse_candidates(
        [{"bits": int(b), "group_size": int(g), "mode": "affine"} for b in bits_list for g in groups]
    )


def quantized_bits(num_params: int, bits: int, group_size: int, mode: str = "affine", scale_bits: int = 16) -> int:
    """Bits a quantized weight occupies, counted as `mlx_lm.utils.compute_bits_per_weight` counts them.

    mlx packs `bits` per weight into uint32 words; affine groups add one scale and
    one bias in the float dtype (`scale_bits`); mxfp4/mxfp8 add one uint8 scale;
    nvfp4 one fp8 scale per group of 16.
    """
    if num_params % group_size:
        raise ValueError(f"{num_params} weights are not divisible by group size {group_size}")
    groups = num_params // group_size
    if mode == "affine":
        overhead = groups * 2 * scale_bits
    elif mode in FORMAT_BITS:
        overhead = groups * 8
    else:
        raise ValueError(f"unknown quantization mode {mode!r}")
    return num_params * bits + overhead


def bits_per_weight(c: Candidate) -> float:
    """Storage bits per weight of a candidate (packed bits + scale/bias overhead, fp16 scales)."""
    g = c["group_size"]
    return quantized_bits(g, c["bits"], g, c["mode"]) / g


def cheapest_first(cands: Iterable[Candidate]) -> list[Candidate]:
    """Candidates ordered by storage cost (bits per weight), then bits; ties keep their order."""
    return sorted(cands, key=lambda c: (bits_per_weight(c), c["bits"]))


def applicable(shape: Sequence[int], cands: Iterable[Candidate]) -> list[Candidate]:
    """Candidates whose group size divides the input dim `shape[-1]` (mlx cannot use the others)."""
    return [c for c in cands if shape[-1] % c["group_size"] == 0]


def check_with_mlx(cands: Iterable[Candidate]) -> list[Candidate]:
    """Quantize a small block once per candidate so an unsupported one fails before long work."""
    import mlx.core as mx

    out = list(cands)
    for c in out:
        try:  # nvfp4 rejects tiny shapes: 32 x 128 is the smallest every format takes
            mx.eval(mx.quantize(mx.zeros((32, 128)), c["group_size"], c["bits"], mode=c["mode"]))
        except (ValueError, RuntimeError) as e:
            raise FormatError(f"candidate {candidate_key(**c)}: mx.quantize rejects it ({e})") from None
    return out


def top_level_quantization(candidates: Sequence[Candidate]) -> tuple[int, int, str]:
    """(group_size, bits, mode) for a mixed model's top-level config "quantization" entry.

    Stock `quantize_model` skips a module whose input dim the top-level group size
    does not divide, so it is the smallest candidate group (group sizes are powers of
    two: that is their gcd); bits and mode are the cheapest candidate with that group,
    so the entry is itself a valid quantization. Every planned module has its own entry.
    """
    smallest = min(c["group_size"] for c in candidates)
    c = cheapest_first([c for c in candidates if c["group_size"] == smallest])[0]
    return c["group_size"], c["bits"], c["mode"]


def nominal_bits(key: str) -> float:
    """The bit width a candidate key stands for ("nvfp4:16" -> 4.0, "6:64" -> 6.0); inf if not a candidate.

    Float-layer widths written as keys ("16") read as their number too.
    """
    head = str(key).split(":", 1)[0]
    if head in FORMAT_BITS:
        return float(FORMAT_BITS[head])
    return float(head) if head.replace(".", "", 1).isdigit() else float("inf")
