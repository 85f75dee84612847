"""The KV candidate vocabulary: one (k_bits, v_bits, group_size) choice for a cache slot.

Written "K_BITS/V_BITS:GROUP" (e.g. "8/4:64"): keys and values are quantized with
mlx affine groups of GROUP channels, keys at K_BITS and values at V_BITS. This is
the key of every KL entry in the KV sensitivity table and in kv_config.json. (Weight
candidates — "4:64", "nvfp4" — are a different vocabulary: core.formats.)
"""

from __future__ import annotations

from typing import NamedTuple

from mlx_lm_optiq.core.formats import AFFINE_BITS, AFFINE_GROUPS


class KVCandidate(NamedTuple):
    k_bits: int
    v_bits: int
    group_size: int

    @property
    def key(self) -> str:
        """'8/4:64': how the candidate is written in tables, plans and flags."""
        return f"{self.k_bits}/{self.v_bits}:{self.group_size}"

    @classmethod
    def parse(cls, text: str) -> KVCandidate:
        """'8/4:64' -> KVCandidate(8, 4, 64); a ValueError says what is expected (the caller names where)."""
        try:
            bits, group = text.strip().split(":")
            k, v = bits.split("/")
            cand = cls(int(k), int(v), int(group))
        except ValueError:
            raise ValueError(f"{text!r} is not of the form K_BITS/V_BITS:GROUP, e.g. 8/4:64") from None
        if cand.k_bits not in AFFINE_BITS or cand.v_bits not in AFFINE_BITS:
            raise ValueError(f"{text!r} has bits outside {list(AFFINE_BITS)}")
        if cand.group_size not in AFFINE_GROUPS:
            raise ValueError(f"{text!r} has group size outside {list(AFFINE_GROUPS)}")
        return cand


def parse_kv_candidates(text: str) -> tuple[KVCandidate, ...]:
    """'8/8:64,8/4:64' -> the candidates in order; a ValueError says what is wrong."""
    cands = tuple(KVCandidate.parse(t) for t in text.split(",") if t.strip())
    if not cands:
        raise ValueError(f"no candidates in {text!r}")
    return cands


# K in {8,4} x V in {8,4,2} x group {64,32}
DEFAULT_KV_CANDIDATES = tuple(KVCandidate(k, v, g) for g in (64, 32) for k in (8, 4) for v in (8, 4, 2))
