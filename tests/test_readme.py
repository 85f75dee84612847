"""The README teaches only what works: its runnable example (the ```python block after
`<!-- readme-example -->`) runs as written on the real 4-layer SmolLM2, and every `--optiq-*`
flag, `python -m mlx_lm_optiq...` command, `mlx_lm_optiq.*` name and `MLX_LM_OPTIQ_*`
variable it mentions exists."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import fork_each

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = "<!-- readme-example -->"


def readme_example(text: str) -> str:
    """The code of the fenced python block right after the marker (exactly one marker)."""
    assert text.count(MARKER) == 1, f"README.md needs exactly one {MARKER} line before the example"
    block = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.S)
    assert block, f"README.md: no ```python block right after {MARKER}"
    return block.group(1)


def set_top_level(code: str, name: str, value: object) -> str:
    """Replace the example's `NAME = ...` line; fails when the example no longer defines it."""
    pattern = re.compile(rf"^{re.escape(name)} = .*$", re.M)
    assert len(pattern.findall(code)) == 1, f"README example: expected one line `{name} = ...` at its top"
    return pattern.sub(lambda _: f"{name} = {value!r}", code)


def _keyword(code: str, name: str) -> str:
    """The string literal the example passes as `name=`."""
    found = re.findall(rf"\b{name}=\"([^\"]*)\"", code)
    assert len(found) == 1, f'README example: expected one {name}="..."'
    return found[0]


def test_readme_example_runs_as_written(tiny_q4_path, tmp_path):
    """Only the model, output folder and sizes are replaced (the 4-layer model, a temp folder,
    small calibration); the example enables optiq itself, so the environment must not."""
    out = tmp_path / "mixed"
    code = readme_example(README.read_text())
    code = set_top_level(code, "MODEL", str(tiny_q4_path))
    code = set_top_level(code, "OUT", str(out))
    samples, seq_len, kv_prefix = 1, 32, 32  # small calibration and KV sizes (the knobs the example names)
    code = set_top_level(code, "SAMPLES, SEQ_LEN", (samples, seq_len))
    code = set_top_level(code, "KV_PREFIX", kv_prefix)
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "MLX_LM_OPTIQ"}
    res = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    # every optiq_* keyword took effect (a misspelt one would fall back to a default)
    meta = json.loads((out / "optiq_metadata.json").read_text())
    assert meta["method"] == "fisher" and meta["achieved_bpw"] <= meta["target_bpw"]
    assert meta["sensitivity"]["calibration"]["tokens"] == samples * seq_len
    keys = lambda c: f"{c['bits'] if c['mode'] == 'affine' else c['mode']}:{c['group_size']}"  # noqa: E731
    assert {keys(c) for c in meta["candidates"]} == set(_keyword(code, "optiq_candidates").split(","))
    assert len({c["bits"] for c in meta["layers"].values()}) > 1  # it really mixes
    kv = json.loads((out / "kv_config.json").read_text())
    assert kv["kind"] == "optiq-kv-config" and kv["achieved_bits"] <= kv["target_bits"]
    assert kv["sensitivity"]["prefix_tokens"] == kv_prefix
    measured = {k for slot in kv["layers"] for k in slot.get("kl", {})}
    assert measured == set(_keyword(code, "optiq_kv_candidates").split(","))
    printed = re.search(r"^(\d+\.\d{3}) bits per weight$", res.stdout, re.M)
    assert printed and float(printed.group(1)) == pytest.approx(meta["achieved_bpw"], abs=5e-4)
    assert f"per-layer KV plan {out / 'kv_config.json'}" in res.stderr  # the stock loader attached it
    generated = res.stdout[printed.end() :]
    assert "plan KV: '" in generated and "float KV: '" in generated, res.stdout  # both generations printed


def _helps(kind: str, names: list[str], env: dict, tmp: Path) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of `NAME --help` for each name: console scripts (kind "script")
    or `python -m` modules (kind "module"), each in a fresh child of one interpreter that imported
    transformers and torch (most of a cold `import mlx_lm`) but neither mlx_lm nor our modules: each
    child starts them (and, with MLX_LM_OPTIQ=1, the `.pth` bootstrap's hooks) itself."""
    info, results = fork_each([(kind, name) for name in names], env, tmp)
    assert not any(m.split(".")[0] == "mlx_lm" for m in info["preloaded"]), info
    return results


def _help_text(commands: list[str], tmp: Path) -> str:
    env = dict(os.environ, MLX_LM_OPTIQ="1", COLUMNS="200")
    outs = []
    for cmd, (code, out, err) in zip(commands, _helps("script", commands, env, tmp)):
        assert code == 0, f"{cmd} --help: {err[-2000:]}"
        assert out.startswith("usage: "), f"{cmd} --help: {out[:500]}"
        outs.append(out)
    return "\n".join(outs)


def _flags(text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", text))


def test_readme_optiq_flags_exist_on_the_mlx_lm_commands(tmp_path):
    """Every `--optiq-*` flag named in the README is added to some mlx-lm command (`--optiq-kv-*`
    style wildcards must prefix one)."""
    text = README.read_text()
    named = set(re.findall(r"--optiq-[a-z0-9-]*[a-z0-9*]", text))
    assert named, "README names no --optiq-* flag"
    known = _flags(_help_text([f"mlx_lm.{c}" for c in ("convert", "server", "generate", "lora")], tmp_path))
    missing = sorted(
        f for f in named if (not any(k.startswith(f[:-1]) for k in known) if f.endswith("*") else f not in known)
    )
    assert not missing, f"README names flags no mlx-lm command has with MLX_LM_OPTIQ=1: {missing}"


def _commands(text: str) -> list[tuple[str, str]]:
    """(module, its command line) for every `python -m mlx_lm_optiq...` in the README: to the end
    of its inline code span, else of its line (`\\` continuations joined, `#` comments cut)."""
    text = text.replace("\\\n", " ")
    found = []
    for m in re.finditer(r"python -m (mlx_lm_optiq(?:\.\w+)*)", text):
        rest = text[m.end() :]
        in_span = text[m.start() - 1] == "`"
        line = rest.split("`", 1)[0] if in_span else rest.split("\n", 1)[0].split("#")[0]
        found.append((m.group(1), line.replace("\n", " ")))
    return found


def test_readme_python_m_commands_exist_with_their_flags(tmp_path):
    commands = _commands(README.read_text())
    assert commands, "README shows no `python -m mlx_lm_optiq...` command"
    problems = []
    modules = sorted({module for module, _ in commands})
    helps = {}
    for module, (code, out, err) in zip(modules, _helps("module", modules, dict(os.environ, COLUMNS="200"), tmp_path)):
        helps[module] = out if code == 0 and out.startswith("usage: ") else None
        if helps[module] is None:
            problems.append(f"python -m {module} --help failed: {err.strip()[-300:]}")
    for module, line in commands:
        if helps[module] is not None:
            bad = sorted(_flags(line) - _flags(helps[module]))
            if bad:
                problems.append(f"python -m {module}{line}: {bad} not in its --help")
    assert not problems, "\n".join(problems)


def _resolve(dotted: str) -> bool:
    """Whether `a.b.c` is an importable module or an attribute of the longest importable prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            continue
        obj = importlib.import_module(name)
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_readme_python_names_and_variables_exist():
    """`mlx_lm_optiq.x.y` names and `from mlx_lm_optiq.x import a, b` lines resolve;
    `MLX_LM_OPTIQ_*` variables are read somewhere in the package."""
    text = README.read_text()
    names = set(re.findall(r"\bmlx_lm_optiq(?:\.\w+)+", text))
    for module, imported in re.findall(r"from (mlx_lm_optiq(?:\.\w+)*) import ([\w, ]+)", text):
        names.update(f"{module}.{n.strip()}" for n in imported.split(",") if n.strip())
    missing = sorted(n for n in names if not _resolve(n))
    assert not missing, f"README names what does not exist: {missing}"
    source = "\n".join(p.read_text() for p in (REPO / "mlx_lm_optiq").rglob("*.py"))
    variables = set(re.findall(r"MLX_LM_OPTIQ_[A-Z_]+", text))
    assert not sorted(v for v in variables if v not in source), "README names unknown environment variables"
