"""mlx-lm-optiq: sensitivity-aware quantization, KV cache, LoRA and adapters for mlx-lm.

`enable()` installs thin wrapt hooks on mlx-lm's own commands (convert, server,
lora, generate); `disable()` puts every original object back. Importing this
package is deliberately cheap (no mlx, no wrapt) because the `.pth` bootstrap
imports it in every interpreter where MLX_LM_OPTIQ is set.
"""

from __future__ import annotations

import _thread

__version__ = "0.1.0"

# mlx-lm module -> "package.module:installer" (imported only when that module is).
HOOKS = {
    "mlx_lm.convert": "mlx_lm_optiq.hooks.convert:install",
    "mlx_lm.server": "mlx_lm_optiq.hooks.server:install",
    "mlx_lm.generate": "mlx_lm_optiq.hooks.generate:install",
    "mlx_lm.models.base": "mlx_lm_optiq.hooks.turbo:install",
    "mlx_lm.lora": "mlx_lm_optiq.hooks.lora:install",
    "mlx_lm.tuner.utils": "mlx_lm_optiq.hooks.lora:install_loader",
}

_lock = _thread.RLock()
_enabled = False
_registered = set()


def is_enabled() -> bool:
    return _enabled


def _run_installer(target, module):
    if not _enabled:  # wrapt cannot unregister post-import hooks; they go inert
        return
    from mlx_lm_optiq._compat import check_mlx_lm_version

    check_mlx_lm_version()
    mod_name, func_name = target.split(":")
    import importlib

    getattr(importlib.import_module(mod_name), func_name)(module)


def _make_hook(target):
    def hook(module):
        with _lock:
            _run_installer(target, module)

    return hook


def enable(check_now: bool = True) -> None:
    """Install the hooks (idempotent).

    Modules of mlx-lm already imported are patched at once; the others are
    patched when they are imported. With `check_now`, an unsupported mlx-lm
    version raises OptiqVersionError here rather than at first import.
    """
    global _enabled
    with _lock:
        if check_now:
            from mlx_lm_optiq._compat import check_mlx_lm_version

            check_mlx_lm_version()
        if _enabled:
            return
        import sys

        import wrapt

        _enabled = True
        for module_name, target in HOOKS.items():
            if module_name in _registered:
                if module_name in sys.modules:
                    _run_installer(target, sys.modules[module_name])
                continue
            _registered.add(module_name)
            wrapt.register_post_import_hook(_make_hook(target), module_name)


def disable() -> None:
    """Restore every patched mlx-lm symbol to the identical original object."""
    global _enabled
    with _lock:
        _enabled = False
        from mlx_lm_optiq.hooks import patching, reset_state

        patching.unwrap_all()
        reset_state()


def enabled_patches() -> list[tuple[str, str]]:
    """[(owner name, attribute)] currently wrapped or added by us, for diagnostics and tests."""
    from mlx_lm_optiq.hooks import patching

    return patching.describe()
