"""Thin wrapt hooks on mlx-lm symbols.

Each module here wraps a few mlx-lm functions and calls into the plain modules
of `mlx_lm_optiq` (which never import anything from this package).
"""

# Per-process state a hook keeps while enabled (e.g. the server's KV plan);
# feature hooks register a reset callable so disable() leaves nothing behind.
_RESETTERS = []


def on_reset(fn):
    _RESETTERS.append(fn)
    return fn


def reset_state():
    for fn in _RESETTERS:
        fn()


def pop_options(kwargs, prefix="optiq_"):
    """Remove and return every `optiq_*` keyword (stock functions reject them)."""
    return {k[len(prefix):]: kwargs.pop(k) for k in list(kwargs) if k.startswith(prefix)}
