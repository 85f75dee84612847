"""Version gate: which mlx-lm releases the hooks were verified against.

Kept free of mlx/mlx_lm imports so the check costs nothing at start-up.
"""

from __future__ import annotations

import os

SUPPORTED_MLX_LM = ">=0.31.3,<0.33"
FORCE_VARIABLE = "MLX_LM_OPTIQ_FORCE"


class OptiqVersionError(RuntimeError):
    pass


def installed_mlx_lm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-lm")
    except PackageNotFoundError:
        return None


def _parse(v):
    parts = []
    for p in v.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def is_supported(installed: str, spec: str = SUPPORTED_MLX_LM) -> bool:
    """True when `installed` satisfies the comma-separated `>=`/`<` spec."""
    v = _parse(installed)
    for clause in spec.split(","):
        clause = clause.strip()
        if clause.startswith(">="):
            if not v >= _parse(clause[2:]):
                return False
        elif clause.startswith("<"):
            if not v < _parse(clause[1:]):
                return False
        else:
            raise ValueError(f"unsupported version clause {clause!r}")
    return True


def check_mlx_lm_version(installed: str | None = None) -> str:
    """Raise OptiqVersionError unless mlx-lm is in the tested range or forced."""
    installed = installed or installed_mlx_lm_version()
    if installed is None:
        raise OptiqVersionError("mlx_lm_optiq: mlx-lm is not installed (pip install mlx-lm).")
    if is_supported(installed):
        return installed
    if os.environ.get(FORCE_VARIABLE, "").strip() not in ("", "0"):
        return installed
    raise OptiqVersionError(
        f"mlx_lm_optiq: installed mlx-lm {installed} is outside the tested range "
        f"mlx-lm{SUPPORTED_MLX_LM}. Install a supported version "
        f"(pip install 'mlx-lm{SUPPORTED_MLX_LM}') or set {FORCE_VARIABLE}=1 to try anyway."
    )
