"""Activation: enable/disable identity, idempotence, version gate, the .pth bootstrap."""

import os
import subprocess
import sys

import pytest

import mlx_lm_optiq
from mlx_lm_optiq import _compat
from tests.helpers import fork_each, run_together


def _run(code, env_extra=None, unset=("MLX_LM_OPTIQ",)):
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def _without_variable():
    return {k: v for k, v in os.environ.items() if k != "MLX_LM_OPTIQ"}


def test_enable_disable_restores_identical_objects():
    import mlx_lm
    import mlx_lm.server  # noqa: F401

    conv_mod = sys.modules["mlx_lm.convert"]
    server_mod = sys.modules["mlx_lm.server"]
    originals = (conv_mod.convert, conv_mod.configure_parser, server_mod.main, mlx_lm.convert)
    assert originals[0] is originals[3]
    try:
        mlx_lm_optiq.enable()
        patched = mlx_lm_optiq.enabled_patches()
        mlx_lm_optiq.enable()  # idempotent (an attribute may carry two features' wrappers, never one twice)
        assert mlx_lm_optiq.enabled_patches() == patched
        assert ("mlx_lm.convert", "convert") in patched and ("mlx_lm.server", "main") in patched
        assert conv_mod.convert is not originals[0]
        # the package re-export (`from mlx_lm import convert`) sees the hook too
        from mlx_lm import convert as api_convert

        assert api_convert is conv_mod.convert
        assert api_convert.__wrapped__ is originals[0]
    finally:
        mlx_lm_optiq.disable()
        mlx_lm_optiq.disable()
    assert mlx_lm_optiq.enabled_patches() == []
    now = (conv_mod.convert, conv_mod.configure_parser, server_mod.main, mlx_lm.convert)
    assert all(a is b for a, b in zip(now, originals))


def test_pth_route_binds_package_alias_and_disable_restores_it():
    out = _run(
        "import sys, mlx_lm, mlx_lm_optiq\n"
        "m = sys.modules['mlx_lm.convert']\n"
        "assert mlx_lm.convert is m.convert and hasattr(m.convert, '__wrapped__')\n"
        "orig = m.convert.__wrapped__\n"
        "mlx_lm_optiq.disable()\n"
        "assert mlx_lm.convert is orig and m.convert is orig\n"
        "print('ok')",
        {"MLX_LM_OPTIQ": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_unset_variable_imports_nothing_at_startup():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"],
        env={k: v for k, v in os.environ.items() if k != "MLX_LM_OPTIQ"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0
    imported = out.stderr
    assert "mlx_lm_optiq" not in imported and "wrapt" not in imported
    # with the variable set, only our stdlib-only bootstrap is imported before mlx_lm
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"],
        env={**os.environ, "MLX_LM_OPTIQ": "1"},
        capture_output=True,
        text=True,
    )
    assert "mlx_lm_optiq._lazy" in out.stderr and "wrapt" not in out.stderr


@pytest.mark.parametrize("argv", [["mlx_lm.convert", "--help"], ["mlx_lm", "convert", "--help"]])
def test_console_scripts_show_flags_only_when_enabled(argv):
    bindir = os.path.dirname(sys.executable)
    cmd = [os.path.join(bindir, argv[0])] + argv[1:]
    on, off = run_together((cmd, {**os.environ, "MLX_LM_OPTIQ": "1"}), (cmd, _without_variable()))
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert "--optiq-" in on.stdout
    assert "optiq" not in off.stdout


def test_version_range():
    assert _compat.is_supported("0.31.3") and _compat.is_supported("0.32.9")
    assert not _compat.is_supported("0.31.2") and not _compat.is_supported("0.33.0")
    with pytest.raises(_compat.OptiqVersionError) as e:
        _compat.check_mlx_lm_version("0.30.0")
    msg = str(e.value)
    assert "0.30.0" in msg and _compat.SUPPORTED_MLX_LM in msg and _compat.FORCE_VARIABLE in msg


def test_version_gate_blocks_enable_and_force_overrides():
    code = (
        "import mlx_lm_optiq, mlx_lm_optiq._compat as c\n"
        "c.installed_mlx_lm_version = lambda: '0.30.0'\n"
        "try:\n    mlx_lm_optiq.enable()\nexcept c.OptiqVersionError as e:\n    print('refused:', e)\n"
        "else:\n    print('enabled', mlx_lm_optiq.is_enabled())\n"
    )
    refused = _run(code)
    assert "refused:" in refused.stdout and "0.30.0" in refused.stdout, refused.stderr
    forced = _run(code, {"MLX_LM_OPTIQ_FORCE": "1"})
    assert "enabled True" in forced.stdout, forced.stderr


def test_env_route_version_gate_fails_at_import():
    # Patch the installed-version lookup through sitecustomize-like code before mlx_lm is imported.
    code = (
        "import mlx_lm_optiq._compat as c\n"
        "c.installed_mlx_lm_version = lambda: '0.28.0'\n"
        "import mlx_lm_optiq._lazy as l; l.install()\n"
        "try:\n    import mlx_lm.convert\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = _run(code)
    assert "OptiqVersionError" in out.stdout and "0.28.0" in out.stdout, out.stdout + out.stderr


def test_outputs_are_written_with_the_process_umask(tmp_path):
    from mlx_lm_optiq.core import jsonio as io_utils

    old = os.umask(0o022)
    try:
        with io_utils.atomic_output_dir(tmp_path / "out") as staging:
            io_utils.write_json(staging / "x.json", {"a": 1}, kind="test")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "x.json").stat().st_mode & 0o777 == 0o644
    data = io_utils.read_json(tmp_path / "out" / "x.json", kind="test")
    assert data["format_version"] == 1 and data["a"] == 1
    with pytest.raises(FileExistsError):
        with io_utils.atomic_output_dir(tmp_path / "out"):
            pass


def _bin(name):
    return os.path.join(os.path.dirname(sys.executable), name)


CONVERT_ARGS = ["--hf-path", "x", "--optiq-target-bpw", "4"]


@pytest.mark.parametrize(
    "cmd",
    [
        [_bin("mlx_lm.convert")],  # the console script
        [_bin("mlx_lm"), "convert"],  # the `mlx_lm <cmd>` script
        [sys.executable, "-m", "mlx_lm", "convert"],  # only sys.orig_argv names mlx_lm here
    ],
)
def test_optiq_flag_without_the_variable_says_which_variable_to_set(cmd):
    """Stock argparse only says "unrecognized arguments"; the .pth bootstrap adds one line."""
    runs = [(cmd + CONVERT_ARGS, _without_variable())]
    if cmd[0] == _bin("mlx_lm.convert"):  # the run with the variable set (checked below), alongside
        runs.append((cmd + CONVERT_ARGS + ["--help"], {**os.environ, "MLX_LM_OPTIQ": "1"}))
    off, *on = run_together(*runs)
    assert off.returncode == 2 and "unrecognized arguments: --optiq-target-bpw" in off.stderr
    hint = "mlx_lm_optiq: --optiq-target-bpw needs the mlx-lm-optiq hooks: set MLX_LM_OPTIQ=1"
    assert off.stderr.count(hint) == 1, off.stderr  # once, although a venv runs the .pth line twice
    if cmd[0] != _bin("mlx_lm.convert"):
        return
    # with the variable set the flag is known: no hint (--help exits before any work)
    (on,) = on
    assert on.returncode == 0 and "--optiq-target-bpw" in on.stdout and "mlx_lm_optiq:" not in on.stderr


def test_no_hint_for_commands_we_do_not_hook():
    env = {k: v for k, v in os.environ.items() if k != "MLX_LM_OPTIQ"}
    for cmd in ([sys.executable, "-c", "pass", "--optiq-x"], [_bin("mlx_lm.chat"), "--optiq-x"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert "mlx_lm_optiq" not in out.stderr, out.stderr


@pytest.mark.parametrize(
    "argv, orig_argv, command",
    [
        (["/v/bin/mlx_lm.convert", "--optiq-x"], ["/v/bin/python", "/v/bin/mlx_lm.convert", "--optiq-x"], "convert"),
        (["/v/bin/mlx_lm", "server"], ["/v/bin/python", "/v/bin/mlx_lm", "server"], "server"),
        (["-m", "lora"], ["python", "-m", "mlx_lm", "lora"], "lora"),
        (["-m", "--x"], ["python", "-X", "importtime", "-m", "mlx_lm.generate", "--x"], "generate"),
        (["-c", "--optiq-x"], ["python", "-c", "pass", "-m", "mlx_lm.convert"], None),
        (["script.py"], ["python", "script.py", "-m", "mlx_lm.convert"], None),
        (["C:\\v\\mlx_lm.convert.exe"], ["python", "C:\\v\\mlx_lm.convert.exe"], "convert"),
    ],
)
def test_mlx_lm_command_from_argv(argv, orig_argv, command):
    from mlx_lm_optiq._lazy import mlx_lm_command

    argv = [a.replace("\\", os.sep) for a in argv]
    assert mlx_lm_command(argv, orig_argv) == command


def test_runpy_server_warning_is_printed_once():
    out = subprocess.run(
        [sys.executable, "-m", "mlx_lm.server", "--help"],
        env={**os.environ, "MLX_LM_OPTIQ": "1"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0
    assert out.stderr.count("mlx_lm_optiq: `python -m mlx_lm.server` bypasses the hooks") == 1, out.stderr


def test_every_module_imports_first_with_the_bootstrap_on(tmp_path):
    """With MLX_LM_OPTIQ=1 the hooks install inside the first `import mlx_lm`, which one of our own
    modules may be doing: no module may then see another half-initialized (each imported first,
    in its own child forked from an interpreter where neither mlx_lm nor our modules are loaded)."""
    import pkgutil

    import mlx_lm_optiq

    names = [
        m.name for m in pkgutil.walk_packages(mlx_lm_optiq.__path__, "mlx_lm_optiq.") if not m.name.endswith("__main__")
    ]
    # forked from an interpreter started with MLX_LM_OPTIQ=1 (the bootstrap's trigger installed) that
    # imported only the heavy third-party packages mlx-lm pulls in
    info, results = fork_each([("import", name) for name in names], dict(os.environ, MLX_LM_OPTIQ="1"), tmp_path)
    assert info["preloaded"] == ["mlx_lm_optiq", "mlx_lm_optiq._lazy"], info  # what the bootstrap alone imports
    assert info["armed"], info  # its import trigger is installed and has not fired
    assert len(results) == len(names) and len(names) > 50
    failed = [(name, code, err[-600:]) for name, (code, _, err) in zip(names, results) if code != 0]
    assert not failed, failed
