"""Stdlib-only bootstrap run from the `.pth` line when MLX_LM_OPTIQ is set.

Importing wrapt costs ~140 ms, so nothing is imported here: a one-shot finder
on sys.meta_path waits for `import mlx_lm` and only then enables the hooks.
"""

from __future__ import annotations

import sys


class _OptiqTrigger:
    fired = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "mlx_lm" or self.fired:
            return None
        # Stay in sys.meta_path: importlib is iterating over it right now and a
        # removal would make it skip the next finder.
        self.fired = True
        try:
            import mlx_lm_optiq

            mlx_lm_optiq.enable(check_now=False)
        except Exception as e:  # start-up must never break because of us
            print(f"mlx_lm_optiq: hooks not installed: {e}", file=sys.stderr)
        return None  # let the normal finders load mlx_lm


def _warn_runpy_server():
    # `python -m mlx_lm.server` runs server.py as __main__ and never imports
    # mlx_lm.server, so its hooks cannot fire: say so instead of ignoring flags.
    argv = getattr(sys, "orig_argv", [])
    if "-m" in argv and argv[argv.index("-m") + 1 : argv.index("-m") + 2] == ["mlx_lm.server"]:
        print(
            "mlx_lm_optiq: `python -m mlx_lm.server` bypasses the hooks; "
            "use `mlx_lm.server` or `mlx_lm server` instead",
            file=sys.stderr,
        )


def install() -> None:
    _warn_runpy_server()
    if any(isinstance(f, _OptiqTrigger) for f in sys.meta_path):
        return
    if "mlx_lm" in sys.modules:
        import mlx_lm_optiq

        mlx_lm_optiq.enable(check_now=False)
        return
    sys.meta_path.insert(0, _OptiqTrigger())
