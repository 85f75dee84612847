"""Helpers shared by the tests and the benchmarks (benchmarks import them as `tests.helpers`).

- `free_port()`: a TCP port nothing listens on right now.
- `ServerProcess`: a real `mlx_lm.server` subprocess on 127.0.0.1, its output in a log
  file, started and waited for until it answers HTTP; `stop()` (or `with`) ends it.
- `request_json(port, method, path, body)`: one HTTP request -> (status, parsed JSON).
- `write_random_adapter(...)`: a real mlx-lm LoRA adapter with seeded random weights.

Kept light: nothing here imports mlx at module level.
"""

from __future__ import annotations

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
