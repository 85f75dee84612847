"""Stdlib-only bootstrap run from the `.pth` line: `install` when MLX_LM_OPTIQ is set, `hint` when not.

Importing wrapt costs ~140 ms, so nothing is imported here: a one-shot finder
on sys.meta_path waits for `import mlx_lm` and only then enables the hooks.
Without the variable the `.pth` line only scans argv for `--optiq-`; when an mlx-lm
command we hook got such a flag, `hint` says which variable turns the hooks on (stock
argparse would only say "unrecognized arguments").

A virtual environment's site-packages is processed twice at start-up (CPython's `site`
adds it from `venv()` and again from `addsitepackages()`), so the `.pth` line runs
twice: every message here is printed once per process.
"""

from __future__ import annotations

import os
import sys

# The mlx-lm commands whose flags our hooks add (mlx_lm_optiq.HOOKS).
HOOKED_COMMANDS = ("convert", "server", "generate", "lora")
# Interpreter options that take a separate value (`python -X importtime -m mlx_lm ...`).
_OPTIONS_WITH_VALUE = ("-X", "-W", "--check-hash-based-pycs")
_said = set()


def _say_once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        print(message, file=sys.stderr)


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
        _say_once(
            "runpy-server",
            "mlx_lm_optiq: `python -m mlx_lm.server` bypasses the hooks; "
            "use `mlx_lm.server` or `mlx_lm server` instead",
        )


def mlx_lm_command(argv: list[str], orig_argv: list[str]) -> str | None:
    """The mlx-lm command ("convert", ...) this interpreter runs, or None; from argv as the `.pth` sees it.

    Console scripts (`mlx_lm.convert`, `mlx_lm convert`) show in argv[0] (and argv[1]);
    `python -m mlx_lm convert` / `python -m mlx_lm.convert` only in orig_argv.
    """
    module = None
    args = iter(orig_argv[1:])
    for arg in args:
        if arg == "-m":
            module = next(args, None)
            break
        if arg in _OPTIONS_WITH_VALUE:
            next(args, None)
        elif not arg.startswith("-") or arg == "-c":
            break
    if module is not None:
        rest = list(args)
        if module == "mlx_lm":
            return rest[0] if rest else None
        return module[len("mlx_lm.") :] if module.startswith("mlx_lm.") else None
    prog = os.path.basename(argv[0]) if argv else ""
    prog = prog[: -len(".exe")] if prog.endswith(".exe") else prog
    if prog == "mlx_lm":
        return argv[1] if len(argv) > 1 else None
    return prog[len("mlx_lm.") :] if prog.startswith("mlx_lm.") else None


def hint() -> None:
    """One stderr line when an mlx-lm command we hook got `--optiq-*` flags but MLX_LM_OPTIQ is off.

    The `.pth` line calls this only when argv holds a `--optiq-` argument, so it costs
    nothing otherwise; it never raises (start-up must not break because of us).
    """
    try:
        flag = next(a for a in sys.argv if a.startswith("--optiq-")).split("=")[0]
        command = mlx_lm_command(sys.argv, list(getattr(sys, "orig_argv", sys.argv)))
        if command in HOOKED_COMMANDS:
            _say_once(
                "hint",
                f"mlx_lm_optiq: {flag} needs the mlx-lm-optiq hooks: set MLX_LM_OPTIQ=1 "
                f"(e.g. MLX_LM_OPTIQ=1 mlx_lm.{command} ...)",
            )
    except Exception:
        pass


def install() -> None:
    _warn_runpy_server()
    if any(isinstance(f, _OptiqTrigger) for f in sys.meta_path):
        return
    if "mlx_lm" in sys.modules:
        import mlx_lm_optiq

        mlx_lm_optiq.enable(check_now=False)
        return
    sys.meta_path.insert(0, _OptiqTrigger())
