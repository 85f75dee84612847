"""Thin wrapt hooks on mlx-lm symbols.

Each module here wraps a few mlx-lm functions and calls into the plain modules
of `mlx_lm_optiq` (which never import anything from this package).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Per-process state a hook keeps while enabled (e.g. the server's KV plan);
# feature hooks register a reset callable so disable() leaves nothing behind.
_RESETTERS: list[Callable[[], None]] = []


def on_reset(fn: Callable[[], None]) -> Callable[[], None]:
    """Register `fn` to run on disable() (use once per module, at import: as a decorator)."""
    _RESETTERS.append(fn)
    return fn


def reset_state() -> None:
    for fn in _RESETTERS:
        fn()


def pop_options(kwargs: dict[str, Any], prefix: str = "optiq_") -> dict[str, Any]:
    """Remove and return every `optiq_*` keyword (stock functions reject them)."""
    return {k[len(prefix) :]: kwargs.pop(k) for k in list(kwargs) if k.startswith(prefix)}
