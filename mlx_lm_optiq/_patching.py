"""Registry of the wrapt wrappers we install, so `disable()` can undo them exactly."""

import sys

import wrapt

# (owner, attribute, handle); newest last.
_PATCHES = []
# (module name, attribute, original, handle) for re-exports such as mlx_lm.convert.
_ALIASES = []


class HookPointMissing(RuntimeError):
    pass


def _ours(obj, wrapper):
    """Our handle for `wrapper` in obj's wrapper chain (several features may stack on one symbol)."""
    handles = [h for _, _, h in _PATCHES if h._self_wrapper is wrapper]
    return wrapt.find_wrapper(obj, predicate=lambda w: any(w is h for h in handles))


def wrap(owner, attr, wrapper, aliases=()):
    """Wrap `owner.attr` (module or class) with `wrapper(wrapped, instance, args, kwargs)`.

    Idempotent: wrapping the same attribute with the same wrapper again returns
    the existing handle; different wrappers on one attribute stack.
    `aliases` are (module name, attribute) re-exports that still hold the
    original object; they are pointed at the wrapper too and restored on unwrap.
    """
    if attr not in vars(owner):
        raise HookPointMissing(
            f"mlx_lm_optiq: {getattr(owner, '__name__', owner)}.{attr} not found; "
            "this mlx-lm version is not supported by the hook"
        )
    current = vars(owner)[attr]
    existing = _ours(current, wrapper)
    if existing is not None:
        return existing
    original = getattr(owner, attr)
    handle = wrapt.wrap_function_wrapper(owner, attr, wrapper)
    _PATCHES.append((owner, attr, handle))
    for mod_name, alias in aliases:
        mod = sys.modules.get(mod_name)
        if mod is not None and getattr(mod, alias, None) is original:
            setattr(mod, alias, handle)
        # Recorded even when the alias is not bound yet: under the .pth route the
        # package binds it to the wrapper itself right after this hook runs.
        _ALIASES.append((mod_name, alias, original, handle))
    return handle


def unwrap_all():
    for mod_name, alias, original, handle in reversed(_ALIASES):
        mod = sys.modules.get(mod_name)
        if mod is not None and getattr(mod, alias, None) is handle:
            setattr(mod, alias, original)
    _ALIASES.clear()
    while _PATCHES:
        owner, attr, handle = _PATCHES.pop()
        wrapt.unwrap_object(owner, attr, handle, missing_ok=True)


def describe():
    return [(getattr(o, "__name__", repr(o)), a) for o, a, _ in _PATCHES]
