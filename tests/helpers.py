"""Helpers shared by the tests and the benchmarks (benchmarks import them as `tests.helpers`).

- `free_port()`: a TCP port nothing listens on right now.
- `ServerProcess`: a real `mlx_lm.server` subprocess on 127.0.0.1, its output in a log
  file, started and waited for until it answers HTTP; `stop()` (or `with`) ends it.
- `request_json(port, method, path, body)`: one HTTP request -> (status, parsed JSON).
- `write_random_adapter(...)`: a real mlx-lm LoRA adapter with seeded random weights.
- `optiq()` / `main_of(command, argv)`: the hooks on for a block; stock `mlx_lm.<command>.main()`
  in this process (a fresh interpreter costs seconds of imports per run).
- `run_together((argv, env), ...)`: several short subprocesses at once (one core each).
- `fork_each(specs, env, tmp)`: first imports (or `NAME --help` runs), each in a fresh child of one
  interpreter that pre-imported only the heavy third-party packages.

Kept light: nothing here imports mlx at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
# How to run the server: `python -m mlx_lm server` (the .pth bootstrap applies the hooks
# when MLX_LM_OPTIQ=1 is in the environment), or the `mlx_lm.server` console script.
MLX_LM_SERVER = (sys.executable, "-m", "mlx_lm", "server")
MLX_LM_SERVER_SCRIPT = (os.path.join(os.path.dirname(sys.executable), "mlx_lm.server"),)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (free when asked: another process could still take it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def request_json(port: int, method: str, path: str, body: Any = None, timeout: float = 120) -> tuple[int, Any]:
    """(HTTP status, parsed JSON body or None) of one request to the server on `port`; HTTP errors are returned."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://{HOST}:{port}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def server_argv(model: str | Path, port: int, *flags: str, command: Sequence[str] = MLX_LM_SERVER) -> list[str]:
    """The command line of a server for `model` on 127.0.0.1:`port`."""
    return [*command, "--model", str(model), "--host", HOST, "--port", str(port), *flags]


class ServerStartError(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log."""


class ServerProcess:
    """A real server subprocess: `ServerProcess(model, *flags, env=..., log_path=...)`.

    Starts `command` (default `python -m mlx_lm server`) on a free port with stdout and
    stderr in `log_path`, and returns once the server answers any HTTP request on
    /health (an error status counts: it is serving). Raises ServerStartError with the
    log's tail when the process exits or `timeout` seconds pass first.
    """

    def __init__(
        self,
        model: str | Path,
        *flags: str,
        env: Mapping[str, str],
        log_path: str | Path,
        command: Sequence[str] = MLX_LM_SERVER,
        timeout: float = 180.0,
    ) -> None:
        self.port = free_port()
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            server_argv(model, self.port, *flags, command=command),
            env=dict(env),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout):
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerStartError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-5000:]}")
            try:
                urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=5).read()
                return
            except urllib.error.HTTPError:  # any HTTP answer means it is serving
                return
            except OSError:
                pass
            if time.time() > deadline:
                raise ServerStartError(f"server did not answer within {timeout:.0f} s:\n{self.log_text()[-5000:]}")
            time.sleep(0.5)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate the server (kill it when it does not exit within `timeout` s) and close the log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_random_adapter(
    model_path: str | Path,
    adapter_path: str | Path,
    *,
    seed: int,
    rank: int = 8,
    scale: float = 20.0,
    num_layers: int = -1,
    keys: Sequence[str] | None = None,
    b_std: float = 0.02,
) -> Path:
    """Write a real mlx-lm LoRA adapter with random (seeded) A and non-zero B.

    For tests and benchmarks: it is made by mlx-lm's own `linear_to_lora_layers`
    and loads with stock `mlx_lm.load(..., adapter_path=...)`. `b_std` sets how
    strongly it changes the outputs (a freshly initialised LoRA has B = 0).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from mlx_lm_optiq.core.jsonio import atomic_output_dir

    model, _ = load(str(model_path), lazy=True)
    model.freeze()
    lora_parameters = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys is not None:
        lora_parameters["keys"] = list(keys)
    mx.random.seed(seed)
    linear_to_lora_layers(model, num_layers, lora_parameters)
    params = dict(tree_flatten(model.trainable_parameters()))
    for key in params:
        if key.endswith(".lora_b"):
            params[key] = b_std * mx.random.normal(params[key].shape)
    with atomic_output_dir(adapter_path) as staging:
        mx.save_safetensors(str(staging / "adapters.safetensors"), params)
        config = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora_parameters}
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(adapter_path)


# ---------------------------------------------------------------------------
# Batched vs single-request comparisons that hold on every CPU and BLAS.
#
# A batch computes each row with other matrix shapes than a single request, so the BLAS
# (OpenBLAS picks its kernels per CPU) sums in another order: logits differ by float32
# rounding noise (~1e-5 here). Quantized KV caches amplify that: a key or value that sits
# on a rounding boundary is stored one quantization step apart, which moves later logits
# by up to ~0.2 on the tiny test models. Either can flip a greedy argmax at a near-tie, after
# which free-running continuations legitimately diverge. So the comparison is teacher-forced:
# the single-request path is replayed on the batched tokens, and at EVERY position the
# batched token must be the single request's greedy choice up to a near-tie (`margin`) and
# the batched log-probabilities must equal the single request's up to `atol`. Broken
# batching (a swapped row, a wrong offset or padding) moves logits by O(1) and fails both.

# Tolerances (largest log-probability change), measured by perturbing every weight by a
# relative 1e-7 or 1e-6 (as another summation order does) and replaying the tests' prompts,
# 6 seeds each: float caches moved log-probabilities by at most 3.4e-4; quantized KV caches
# by up to 0.08 (8/4-bit, tiny random gemma3) and 0.12 (SmolLM2 with 2-bit values), while a
# wrongly batched row moves them by O(1). Both keep a margin of 3-6x over what was seen.
FLOAT_NOISE = 2e-3
QUANTIZED_KV_NOISE = 0.3


def replay_solo_logprobs(model: Any, prompt: Sequence[int], tokens: Sequence[int], **generate_kwargs: Any) -> list[Any]:
    """The single-request path's log-probabilities at each of `tokens`' positions, the
    continuation forced to `tokens`: mlx-lm's own `generate_step` (same prefill, same cache
    handling) with a sampler that replays them. `generate_kwargs` go to `generate_step`
    (e.g. `prompt_cache=`). Returns one (vocab,) array per token."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    forced = [int(t) for t in tokens]
    calls = iter(range(len(forced) + 1))

    def replay(logprobs):  # generate_step samples one step ahead: the last call's token is unused
        return mx.array([forced[min(next(calls), len(forced) - 1)]])

    out = []
    steps = generate_step(mx.array(list(prompt)), model, max_tokens=len(forced), sampler=replay, **generate_kwargs)
    for t, logprobs in steps:
        assert t == forced[len(out)]
        out.append(logprobs)
    return out


def assert_greedy_matches_solo(
    tokens: Sequence[int],
    solo_logprobs: Sequence[Any],
    *,
    noise: float,
    logprobs: Sequence[Any] | None = None,
    token_logprobs: Sequence[float] | None = None,
    label: str = "",
) -> int:
    """Assert that a batched (or concurrent) greedy continuation is what the single request
    computes, up to `noise`: the largest change of a log-probability that another batch
    shape may bring (see above).

    `solo_logprobs[i]` is the single request's (vocab,) log-probabilities at position i
    with the same context as `tokens[:i]` (`replay_solo_logprobs`). With `logprobs` (the
    batched (vocab,) vectors) or `token_logprobs` (the batched chosen token's
    log-probability, e.g. from a server) those must equal the single request's within
    `noise`; and at every position `tokens[i]` must be the single request's greedy token or
    a near-tie within 2 * `noise` of it (two values each off by at most `noise` can swap
    order only then). Every position is checked, so this cannot pass vacuously. Returns how
    many positions picked exactly the single request's greedy token.
    """
    import mlx.core as mx

    assert len(tokens) == len(solo_logprobs), f"{label}: {len(tokens)} tokens vs {len(solo_logprobs)} solo positions"
    assert len(tokens) > 0, f"{label}: nothing to compare"
    exact = 0
    for i, (t, solo) in enumerate(zip(tokens, solo_logprobs)):
        best, best_lp, got_lp = int(mx.argmax(solo).item()), solo.max().item(), solo[int(t)].item()
        assert best_lp - got_lp <= 2 * noise, (
            f"{label}: position {i}: token {t} is {best_lp - got_lp:.3g} below the single request's "
            f"greedy token {best}, more than a near-tie (2 * noise = {2 * noise})"
        )
        exact += int(t) == best
        if logprobs is not None:
            diff = mx.abs(logprobs[i] - solo).max().item()
            assert diff <= noise, f"{label}: position {i}: log-probabilities differ by {diff:.3g} > {noise}"
        if token_logprobs is not None:
            diff = abs(token_logprobs[i] - got_lp)
            assert diff <= noise, f"{label}: position {i}: token log-probability differs by {diff:.3g} > {noise}"
    return exact


def run_together(*runs: tuple[Sequence[str], Mapping[str, str]]) -> list[subprocess.CompletedProcess]:
    """`subprocess.run(argv, env=env, capture_output=True, text=True)` for each (argv, env), all at
    once (each is mostly one interpreter's imports, on one core): the results in order."""
    from concurrent.futures import ThreadPoolExecutor

    def run(spec):
        argv, env = spec
        return subprocess.run(list(argv), env=dict(env), capture_output=True, text=True)

    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(run, runs))


@contextlib.contextmanager
def optiq(enabled: bool = True):
    """The hooks on (as MLX_LM_OPTIQ=1 turns them on) for the block, off after it whatever happens."""
    import mlx_lm_optiq

    if enabled:
        mlx_lm_optiq.enable()
    try:
        yield
    finally:
        mlx_lm_optiq.disable()


def main_of(command: str, argv: Sequence[Any]) -> None:
    """Run stock `mlx_lm.<command>.main()` in-process with `argv` (hooks as they are now)."""
    import importlib

    module = importlib.import_module(f"mlx_lm.{command}")
    saved = sys.argv
    sys.argv = [f"mlx_lm.{command}", *map(str, argv)]
    try:
        module.main()
    finally:
        sys.argv = saved


# `python -c _FORK_EACH SPECS_JSON`: imports the heavy third-party packages mlx-lm pulls in (transformers
# and torch: ~90 % of a cold `import mlx_lm`) once, then forks one child per spec, two at a time (each is
# mostly imports, on one core). Neither mlx_lm nor any of our modules beyond what the `.pth` bootstrap
# imports is loaded before the forks, so in each child they are imported first (and, with
# MLX_LM_OPTIQ=1, the bootstrap's hooks install there).
_FORK_EACH = r"""
import importlib, json, os, runpy, sys, traceback
from importlib.metadata import entry_points

import torch, transformers  # noqa: F401  third-party only
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

preloaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx_lm", "mlx_lm_optiq"))
armed = any(type(f).__name__ == "_OptiqTrigger" and not f.fired for f in sys.meta_path)


def child(kind, name):
    if kind == "import":
        importlib.import_module(name)
        return
    sys.argv = [name, "--help"]
    if kind == "script":
        entry_points(group="console_scripts")[name].load()()
    else:
        runpy.run_module(name, run_name="__main__", alter_sys=True)


specs, running, codes = json.loads(sys.argv[1]), {}, {}


def wait_one():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)


for i, (kind, name, out) in enumerate(specs):
    if len(running) >= 2:
        wait_one()
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for fd, path in ((1, out + ".out"), (2, out + ".err")):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        code = 0
        try:
            child(kind, name)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    running[pid] = i
while running:
    wait_one()
print(json.dumps({"preloaded": preloaded, "armed": armed, "codes": [codes[i] for i in range(len(specs))]}))
"""


def fork_each(
    specs: Sequence[tuple[str, str]], env: Mapping[str, str], tmp: str | Path
) -> tuple[dict[str, Any], list[tuple[int, str, str]]]:
    """Run each (kind, NAME) in a fresh child forked from one interpreter started with `env` that has
    imported only transformers and torch: kind "import" imports module NAME; "script" runs console
    script NAME (its entry point) and "module" `python -m NAME`, each with argv `NAME --help`.

    Returns ({"preloaded": our and mlx_lm's modules loaded before the forks (the `.pth` bootstrap's),
    "armed": whether the bootstrap's import trigger was installed and not fired}, [(exit code,
    stdout, stderr) per spec]); the outputs are files under `tmp`.
    """
    paths = [str(Path(tmp) / f"child{i}") for i in range(len(specs))]
    res = subprocess.run(
        [sys.executable, "-c", _FORK_EACH, json.dumps([[k, n, p] for (k, n), p in zip(specs, paths)])],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    codes = info.pop("codes")
    assert len(codes) == len(specs)
    return info, [(c, Path(p + ".out").read_text(), Path(p + ".err").read_text()) for c, p in zip(codes, paths)]


def assert_lora_cli_error(monkeypatch: Any, capsys: Any, argv: Sequence[str], message: str) -> None:
    """`mlx_lm.lora` run with `argv` (hooks on) exits 1 with one last `mlx_lm.lora: error:` line
    containing `message`, and no traceback."""
    import importlib

    import pytest

    monkeypatch.setattr(sys, "argv", list(argv))
    with pytest.raises(SystemExit) as e:
        importlib.import_module("mlx_lm.lora").main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("mlx_lm.lora: error: ") and message in err, err
