"""Registry of every change we make to mlx-lm objects, so `disable()` can undo them exactly.

Two kinds of change, both recorded here and nowhere else:
* `wrap(owner, attr, wrapper)`: a wrapt wrapper around an existing symbol (stackable,
  idempotent), optionally re-pointing re-exports (`aliases`) that hold the original;
* `add_attribute(owner, attr, value)`: a new attribute on an owner that lacks it (e.g. a
  `do_DELETE` method on the server's request handler), removed again on undo.
`unwrap(owner, attr, wrapper)` undoes one wrap (with its aliases); `unwrap_all()` undoes
everything, newest first. Nothing outside this module touches the registry.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import wrapt

# (owner, attribute, handle); newest last.
_PATCHES: list[tuple[Any, str, Any]] = []
# (module name, attribute, original, handle) for re-exports such as mlx_lm.convert.
_ALIASES: list[tuple[str, str, Any, Any]] = []
# (owner, attribute, value) added where the owner had no such attribute.
_ADDED: list[tuple[Any, str, Any]] = []

Wrapper = Callable[[Callable, Any, tuple, dict], Any]


class HookPointMissing(RuntimeError):
    pass


def _ours(obj: Any, wrapper: Wrapper) -> Any:
    """Our handle for `wrapper` in obj's wrapper chain (several features may stack on one symbol)."""
    handles = [h for _, _, h in _PATCHES if h._self_wrapper is wrapper]
    return wrapt.find_wrapper(obj, predicate=lambda w: any(w is h for h in handles))


def wrap(owner: Any, attr: str, wrapper: Wrapper, aliases: tuple | list = ()) -> Any:
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


def _restore_aliases(handle: Any) -> None:
    for i in reversed(range(len(_ALIASES))):
        mod_name, alias, original, h = _ALIASES[i]
        if h is handle:
            mod = sys.modules.get(mod_name)
            if mod is not None and getattr(mod, alias, None) is handle:
                setattr(mod, alias, original)
            del _ALIASES[i]


def unwrap(owner: Any, attr: str, wrapper: Wrapper) -> bool:
    """Undo one `wrap(owner, attr, wrapper)` and its aliases; other wrappers on `attr` stay.

    Returns whether there was such a wrap to undo.
    """
    current = vars(owner).get(attr)
    handle = _ours(current, wrapper) if current is not None else None
    if handle is None:
        return False
    _restore_aliases(handle)
    _PATCHES[:] = [p for p in _PATCHES if p[2] is not handle]
    wrapt.unwrap_object(owner, attr, handle, missing_ok=True)
    return True


def add_attribute(owner: Any, attr: str, value: Any) -> None:
    """Give `owner` an attribute it does not have (a method, a flag); removed by `unwrap_all`.

    Idempotent for the same value; refuses to shadow an attribute the owner already
    defines itself (that would not be restorable exactly).
    """
    existing = vars(owner).get(attr, _MISSING)
    if existing is value:
        return
    if existing is not _MISSING:
        raise HookPointMissing(
            f"mlx_lm_optiq: {getattr(owner, '__name__', owner)}.{attr} already exists; "
            "this mlx-lm version is not supported by the hook"
        )
    setattr(owner, attr, value)
    _ADDED.append((owner, attr, value))


_MISSING = object()


def unwrap_all() -> None:
    """Undo every wrap and added attribute, newest first; the owners get their identical originals."""
    while _ADDED:
        owner, attr, value = _ADDED.pop()
        if vars(owner).get(attr, _MISSING) is value:
            delattr(owner, attr)
    for mod_name, alias, original, handle in reversed(_ALIASES):
        mod = sys.modules.get(mod_name)
        if mod is not None and getattr(mod, alias, None) is handle:
            setattr(mod, alias, original)
    _ALIASES.clear()
    while _PATCHES:
        owner, attr, handle = _PATCHES.pop()
        wrapt.unwrap_object(owner, attr, handle, missing_ok=True)


def describe() -> list[tuple[str, str]]:
    """[(owner name, attribute)] of every live wrap and added attribute, for diagnostics and tests."""
    return [(getattr(o, "__name__", repr(o)), a) for o, a, _ in _PATCHES] + [
        (getattr(o, "__name__", repr(o)), a) for o, a, _ in _ADDED
    ]
