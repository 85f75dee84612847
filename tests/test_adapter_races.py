"""Races and bad adapters in the multi-adapter server (issue 16, items 1-4).

Each race is built step by step, not left to timing: the server runs in this process
(mlx-lm's own ResponseGenerator, APIHandler and ThreadingHTTPServer, hooks on), and
`Gate`s park the generation thread (at `BatchGenerator.next`) or a request's HTTP
handler (at `ResponseGenerator._await_response` or `GenerationContext.stop`) until the
test lets them go, so "unmount while the row is still in the batch" happens by
construction.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import sys
import threading
import time

import pytest

mx = pytest.importorskip("mlx.core")

from tests.helpers import HOST, request_json, write_random_adapter  # noqa: E402

PROMPT = "Once upon a time"
FP16_NOISE = 0.25


# ---------------------------------------------------------------------------
# The server in this process, and gates that park its threads


class Gate:
    """Parks every thread that calls `passage()` while closed; `step()` lets one call through.

    `wait_parked()` returns once a thread waits at the gate with no step pending, so
    after `close()` + `wait_parked()` the gated thread is known to be stopped right there.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._permits = 0
        self._waiting = 0
        self.threads: list[threading.Thread] = []

    def passage(self) -> None:
        with self._cond:
            if self._open:
                return
            self.threads.append(threading.current_thread())
            self._waiting += 1
            self._cond.notify_all()
            while not self._open and self._permits == 0:
                self._cond.wait()
            self._waiting -= 1
            if not self._open:
                self._permits -= 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._open = False

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def step(self) -> None:
        with self._cond:
            self._permits += 1
            self._cond.notify_all()

    def parked(self) -> bool:
        with self._cond:
            return self._waiting > 0 and self._permits == 0

    def wait_parked(self, timeout: float = 60.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self._waiting > 0 and self._permits == 0, timeout), "nothing parked"


class LiveServer:
    """mlx-lm's server in this process: `main()` parses the flags (our hooks on), then the
    stock ResponseGenerator and APIHandler serve on a ThreadingHTTPServer thread."""

    def __init__(self, model, *flags: str) -> None:
        srv = sys.modules["mlx_lm.server"]
        captured = {}
        run, argv = srv.run, sys.argv
        srv.run = lambda host, port, provider, **kw: captured.update(provider=provider)
        sys.argv = ["mlx_lm.server", "--model", str(model), *flags]
        try:
            srv.main()
        finally:
            srv.run, sys.argv = run, argv
        provider = captured["provider"]
        self.generator = srv.ResponseGenerator(provider, srv.LRUPromptCache(provider.cli_args.prompt_cache_size))
        self.httpd = srv.ThreadingHTTPServer(
            (HOST, 0), lambda *a, **kw: srv.APIHandler(self.generator, *a, system_fingerprint="test", **kw)
        )
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def request(self, method, path, body=None):
        return request_json(self.port, method, path, body, timeout=120)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.generator.stop_and_join()


@pytest.fixture
def live(hooks_enabled, monkeypatch):
    """start(model, *flags) -> LiveServer; gates: generation (BatchGenerator.next), load
    (ModelProvider._load), handler (after `_await_response` returns, when armed) and stop
    (GenerationContext.stop, when armed)."""
    import mlx_lm.server  # noqa: F401

    gen_mod, srv = sys.modules["mlx_lm.generate"], sys.modules["mlx_lm.server"]
    servers = []
    gates = {"generation": Gate(), "handler": Gate(), "stop": Gate(), "load": Gate()}
    gates["handler"].close()  # reached only when armed
    gates["stop"].close()
    armed = {"handler": False, "stop": False}
    waiting_on = {}

    next_ = gen_mod.BatchGenerator.next

    def gated_next(self):
        gates["generation"].passage()
        return next_(self)

    await_response = srv.ResponseGenerator._await_response

    def gated_await(self, queue):
        waiting_on[threading.current_thread()] = queue
        try:
            result = await_response(self, queue)
        finally:
            waiting_on.pop(threading.current_thread(), None)
        skip = armed["handler"]  # True, or the set of threads it does not apply to
        if skip is not False and (skip is True or threading.current_thread() not in skip):
            armed["handler"] = False
            gates["handler"].passage()
        return result

    load = srv.ModelProvider._load

    def gated_load(self, *args, **kwargs):
        gates["load"].passage()
        return load(self, *args, **kwargs)

    stop = srv.GenerationContext.stop

    def gated_stop(self):
        if armed["stop"]:
            armed["stop"] = False
            gates["stop"].passage()
        return stop(self)

    monkeypatch.setattr(gen_mod.BatchGenerator, "next", gated_next)
    monkeypatch.setattr(srv.ResponseGenerator, "_await_response", gated_await)
    monkeypatch.setattr(srv.GenerationContext, "stop", gated_stop)
    monkeypatch.setattr(srv.ModelProvider, "_load", gated_load)

    def start(model, *flags):
        s = LiveServer(model, *flags)
        servers.append(s)
        return s

    start.gates, start.armed, start.waiting_on = gates, armed, waiting_on
    yield start
    for gate in gates.values():
        gate.open()
    for s in servers:
        s.close()


def _stream(port, body):
    """Send a streaming completion on a raw socket: (socket, its reader past the headers)."""
    payload = json.dumps({**body, "stream": True}).encode()
    sock = socket.create_connection((HOST, port), timeout=120)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    reader = sock.makefile("rb")
    status = reader.readline()
    assert b" 200 " in status, status
    while reader.readline().strip():
        pass
    return sock, reader


def _events(reader, n=None, eof_ok=False):
    """Read SSE data events (parsed JSON, or the string '[DONE]'): n of them, or up to [DONE] (or EOF if `eof_ok`)."""
    out = []
    while n is None or len(out) < n:
        line = reader.readline()
        if not line and eof_ok:
            break
        assert line, "stream ended before [DONE]"
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
        if data == "[DONE]":
            break
    return out


def _reset(sock, reader):
    """Close the client socket abruptly (RST), as a killed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reader.close()  # the socket closes with its last file object
    sock.close()


def _step_until(live, predicate, limit=200):
    """Step the parked generation thread one `BatchGenerator.next` at a time until `predicate()`."""
    gen = live.gates["generation"]
    for _ in range(limit):
        gen.wait_parked()
        if predicate():
            return
        gen.step()
    raise AssertionError("the generation thread never got there")


def _wait_until(predicate, timeout=30.0, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _disconnect_with_the_row_in_the_batch(live, sock, reader):
    """Park the generation thread, close the client socket abruptly, then step the
    generation thread one token at a time until the request's handler, writing to the
    dead socket, gives up and returns. The handler is held after each token until the
    generation thread is parked again, so the generation thread has not seen the request
    stopped: its row is still in the batch when this returns."""
    gen, handler = live.gates["generation"], live.gates["handler"]
    gen.close()
    gen.wait_parked()  # the row is in the batch
    _wait_until(lambda: any(q.empty() for q in live.waiting_on.values()), what="the handler to wait for a token")
    (handler_thread,) = live.waiting_on
    _reset(sock, reader)
    for _ in range(50):
        live.armed["handler"] = True
        gen.step()
        gen.wait_parked()
        handler.wait_parked()
        handler.step()  # the handler writes the token (if it has text) and fails, or waits again
        _wait_until(lambda: not handler_thread.is_alive() or handler_thread in live.waiting_on, what="the handler")
        if not handler_thread.is_alive():
            return
    raise AssertionError("the handler never noticed the closed socket")


@pytest.fixture(scope="module")
def race_adapters(tiny_float_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("race-adapters")
    for name, seed in (("victim", 11), ("other", 12)):
        write_random_adapter(tiny_float_path, root / name, seed=seed, rank=4, b_std=0.05)
    return root


# ---------------------------------------------------------------------------
# 1. disconnect + unmount


def test_unmount_waits_for_a_disconnected_requests_row(live, tiny_float_path, race_adapters):
    """The row of a request whose client went away stays in the batch until the
    generation thread drops it: the adapter cannot be unmounted before that, and the
    generation thread survives (it died with UnknownAdapterError)."""
    server = live(
        tiny_float_path,
        "--optiq-adapter",
        f"victim={race_adapters / 'victim'}",
        "--optiq-adapter",
        f"other={race_adapters / 'other'}",
        "--optiq-adapter-root",
        str(race_adapters),
    )
    gen = live.gates["generation"]
    gen.close()  # from here on the generation thread decodes only when stepped
    sock, reader = _stream(server.port, {"model": "victim", "prompt": PROMPT, "max_tokens": 400, "temperature": 0})
    read = {}
    t = threading.Thread(target=lambda: read.update(events=_events(reader, 3)))
    t.start()
    _step_until(live, lambda: not t.is_alive())  # the client has read 3 chunks, a few tokens out of 400
    assert len(read["events"]) == 3

    _disconnect_with_the_row_in_the_batch(live, sock, reader)

    status, body = server.request("DELETE", "/v1/adapters/victim")
    assert status == 409, body
    assert "victim" in body["error"]["message"]
    gen.open()
    _wait_until(lambda: server.request("DELETE", "/v1/adapters/victim")[0] == 200, what="the unmount")
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    for model in ("other", "default_model"):
        status, out = server.request(
            "POST", "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        )
        assert status == 200 and out["choices"][0]["text"], out


def _completion(server, model, n=4, **extra):
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, **extra}
    return server.request("POST", "/v1/completions", body)


def test_a_vanished_adapter_fails_only_its_own_request(live, tiny_float_path, race_adapters):
    """Defence in depth: the adapter of a row in the batch is unmounted behind the server's
    back (a script on the served model, not the admin API) and another adapter is mounted
    under its name. That request ends with an error naming the adapter; its row never
    computes with the new adapter; the request sharing the batch and the server go on."""
    from mlx_lm_optiq.adapters import mounting
    from mlx_lm_optiq.hooks import server_adapters

    server = live(
        tiny_float_path,
        "--optiq-adapter",
        f"victim={race_adapters / 'victim'}",
        "--optiq-adapter",
        f"other={race_adapters / 'other'}",
    )
    gen, handler = live.gates["generation"], live.gates["handler"]
    gen.close()  # from here on the generation thread decodes only when stepped
    body = {"prompt": PROMPT, "temperature": 0}
    victim = _stream(server.port, {"model": "victim", "max_tokens": 400, **body})  # inserted, then parks
    started = {}
    t = threading.Thread(
        target=lambda: started.update(other=_stream(server.port, {"model": "other", "max_tokens": 64, **body}))
    )
    t.start()
    _step_until(live, lambda: not t.is_alive())  # inserted: it has its context (at most ~25 steps)
    # a non-streaming request for victim too, held by the handler gate once it has its context
    live.armed["handler"] = set(threading.enumerate())
    plain = {}
    plain_thread = threading.Thread(target=lambda: plain.update(r=_completion(server, "victim", n=400)))
    plain_thread.start()
    _step_until(live, lambda: handler.parked())
    other = started["other"]
    state = server_adapters._SERVED
    mounting.unmount_adapter(state.model, "victim")
    mounting.mount_adapter(state.model, "victim", race_adapters / "other")
    handler.open()
    gen.open()

    plain_thread.join(60)
    status, out = plain["r"]
    assert status == 409 and "adapter 'victim' was unmounted" in out["error"]["message"], out
    events = _events(victim[1], eof_ok=True)
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and "adapter 'victim' was unmounted" in errors[0]["error"]["message"], events
    assert "[DONE]" not in events
    events = _events(other[1])
    assert events[-1] == "[DONE]" and not [e for e in events[:-1] if "error" in e]
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    _wait_until(lambda: not state.in_flight, what="every lease to be released")
    for model in ("other", "default_model"):
        status, out = _completion(server, model)
        assert status == 200 and out["choices"][0]["text"], out


# ---------------------------------------------------------------------------
# 2. mount while the model loads


def _misfit_copy(src, dst):
    """A copy of adapter `src` whose q_proj of layer 1 expects 100 input features (another model's)."""
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = mx.load(str(src / "adapters.safetensors"))
    key = "model.layers.1.self_attn.q_proj.lora_a"
    tensors[key] = mx.zeros((100, tensors[key].shape[1]))
    mx.save_safetensors(str(dst / "adapters.safetensors"), tensors)
    return dst


def test_mount_while_the_model_loads_is_checked(live, tiny_float_path, race_adapters, tmp_path):
    """POST /v1/adapters before the generation thread has loaded the model: an adapter that
    does not fit the base gets 400 then too (it was accepted, and then killed the
    generation thread when the model loaded), one that fits is served once it has."""
    root = tmp_path / "root"
    root.mkdir()
    _misfit_copy(race_adapters / "victim", root / "misfit")
    shutil.copytree(race_adapters / "victim", root / "fits")
    load = live.gates["load"]
    load.close()
    server = live(tiny_float_path, "--optiq-adapter-root", str(root))
    load.wait_parked()  # the port is open, the model is not loaded

    status, body = server.request("POST", "/v1/adapters", {"name": "misfit", "path": "misfit"})
    assert status == 400, body
    assert "does not fit the model" in body["error"]["message"]
    assert "model.layers.1.self_attn.q_proj: adapter maps 100 -> 576 features" in body["error"]["message"]
    status, body = server.request("POST", "/v1/adapters", {"name": "fits", "path": "fits"})
    assert status == 200, body
    load.open()
    status, out = _completion(server, "fits")
    assert status == 200 and out["choices"][0]["text"], out
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    status, body = server.request("POST", "/v1/adapters", {"name": "misfit", "path": "misfit"})
    assert status == 400 and "does not fit the model" in body["error"]["message"], body


# ---------------------------------------------------------------------------
# 4. unmount right after a finished request


@pytest.mark.parametrize("path", ["batched", "single"])
def test_unmount_after_the_response_ended_is_not_refused(live, tiny_float_path, race_adapters, path):
    """The client has read [DONE]; its handler has not returned yet (held in its last
    step). The request's row has left the batch before its last token was sent, so the
    adapter is no longer in flight: DELETE succeeds (it got 409 "1 request(s) in flight").
    "single": a request with a seed, which mlx-lm serves alone."""
    server = live(
        tiny_float_path,
        "--optiq-adapter",
        f"victim={race_adapters / 'victim'}",
        "--optiq-adapter-root",
        str(race_adapters),
    )
    extra = {"seed": 3} if path == "single" else {}
    live.armed["stop"] = True  # the handler stops right after writing [DONE]
    sock, reader = _stream(server.port, {"model": "victim", "prompt": PROMPT, "max_tokens": 4, **extra})
    assert _events(reader)[-1] == "[DONE]"
    live.gates["stop"].wait_parked()

    status, body = server.request("DELETE", "/v1/adapters/victim")
    assert status == 200, body
    live.gates["stop"].open()
    reader.close()
    sock.close()
    status, body = _completion(server, "victim")
    assert status == 404, body
    assert server.request("GET", "/health") == (200, {"status": "ok"})


# ---------------------------------------------------------------------------
# 3. adapter values


def _edited_copy(src, dst, tensors=None, config=None):
    """A copy of mlx-lm adapter `src`: `tensors(dict)` edits its tensors, `config` replaces its config text."""
    dst.mkdir()
    t = mx.load(str(src / "adapters.safetensors"))
    if tensors is not None:
        tensors(t)
    mx.save_safetensors(str(dst / "adapters.safetensors"), t)
    (dst / "adapter_config.json").write_text(config or (src / "adapter_config.json").read_text())
    return dst


def test_adapter_values_are_checked_at_mount_and_start_up(tiny_float_path, race_adapters, tmp_path):
    """NaN/inf weights, int or bool tensors and absurd or NaN scales are refused with a message
    naming the file and the tensor or field (they mounted with 200, and one NaN adapter
    turned every row of a masked batch into NaN)."""
    from mlx_lm_optiq.adapters import admin_api
    from mlx_lm_optiq.adapters.config import AdapterServingConfig
    from mlx_lm_optiq.adapters.serving import start_serving
    from mlx_lm_optiq.core.config import ConfigError

    src = race_adapters / "victim"
    key = sorted(k for k in mx.load(str(src / "adapters.safetensors")) if k.endswith("lora_b"))[0]
    config = json.loads((src / "adapter_config.json").read_text())

    def with_scale(text):
        return json.dumps({**config, "lora_parameters": {**config["lora_parameters"], "scale": "@"}}).replace(
            '"@"', text
        )

    def poke(value, at):
        def edit(t):
            a = t[at]
            t[at] = mx.where(mx.arange(a.size).reshape(a.shape) == 0, mx.array(value, a.dtype), a)

        return edit

    def cast(dtype):
        def edit(t):
            for k in t:
                t[k] = (t[k] > 0) if dtype == mx.bool_ else (t[k] * 100).astype(dtype)

        return edit

    root = tmp_path / "root"
    root.mkdir()
    cases = {
        "nan": (
            dict(tensors=poke(float("nan"), key)),
            f"adapters.safetensors): tensor {key[:-7]}.lora_b has 1 non-finite",
        ),
        "inf": (dict(tensors=poke(float("inf"), key)), f"tensor {key[:-7]}.lora_b has 1 non-finite value(s)"),
        "int32": (dict(tensors=cast(mx.int32)), "has dtype int32, expected float16, bfloat16, float32"),
        "bool": (dict(tensors=cast(mx.bool_)), "has dtype bool, expected float16, bfloat16, float32"),
        "huge-scale": (dict(config=with_scale("1e308")), "'lora_parameters.scale' is 1e+308; expected a finite number"),
        "nan-scale": (dict(config=with_scale("NaN")), "'lora_parameters.scale' is nan; expected a finite number"),
    }
    state = start_serving(AdapterServingConfig(adapter_root=root, model=str(tiny_float_path)))
    for name, (edit, message) in cases.items():
        _edited_copy(src, root / name, **edit)
        status, body = admin_api.mount(state, {"name": name, "path": name})
        assert status == 400 and message in body["error"]["message"], (name, body)
        with pytest.raises(ConfigError, match="adapter: x=") as e:
            start_serving(AdapterServingConfig(adapter=[f"x={root / name}"], model=str(tiny_float_path)))
        assert message in str(e.value), (name, str(e.value))
    assert state.names() == []
    shutil.copytree(src, root / "fine")
    assert admin_api.mount(state, {"name": "fine", "path": "fine"})[0] == 200


def test_an_overflowing_adapter_never_reaches_other_rows(tiny_float_path, race_adapters, tmp_path, monkeypatch):
    """float16 everywhere: a mounted adapter whose (finite) A overflows to inf for every
    input, never requested. Rows of the base and of another adapter, computed in the same
    forward, equal their solo results under every mixed-rows method ("masked" multiplied
    the overflowing columns by a 0 mask: inf * 0 = NaN in every row; "gather" raised, as
    mlx's CPU gather_mm takes float32 only, which in a server killed the generation thread)."""
    from mlx_lm.utils import load_model

    from mlx_lm_optiq.adapters import mounting, rows

    def half(t):
        for k in t:
            t[k] = t[k].astype(mx.float16)

    def loud(t):
        for k in t:
            t[k] = mx.full(t[k].shape, 60000.0 if k.endswith("lora_a") else 0.01, dtype=mx.float16)

    quiet_dir = _edited_copy(race_adapters / "victim", tmp_path / "quiet", tensors=half)
    loud_dir = _edited_copy(race_adapters / "other", tmp_path / "loud", tensors=loud)
    model, _ = load_model(tiny_float_path)
    model.set_dtype(mx.float16)
    mounting.mount_adapter(model, "quiet", quiet_dir)
    mounting.mount_adapter(model, "loud", loud_dir)
    x = mx.array([[1, 504, 3714, 253, 260], [1, 504, 3714, 253, 260]])
    with mounting.use_adapter("loud"):
        assert not mx.all(mx.isfinite(model(x[:1]))).item(), "the loud adapter should overflow its own row"
    names = ["quiet", None]
    solo = []
    for row, name in enumerate(names):
        with mounting.use_adapter(name):
            solo.append(model(x[row : row + 1])[0])
    assert mx.abs(solo[0] - solo[1]).max().item() > 10 * FP16_NOISE  # the quiet adapter moves logits by far more
    for method in rows.MIXED_ROWS_METHODS:
        monkeypatch.setattr(rows, "MIXED_ROWS_METHOD", method)
        with mounting.adapter_rows(model, names):
            mixed = model(x)
        for row, name in enumerate(names):
            assert mx.all(mx.isfinite(mixed[row])).item(), (method, name)
            # float16 logits of ~30 round in steps of 0.03; other summation orders stay within a few steps
            assert mx.abs(mixed[row] - solo[row]).max().item() < FP16_NOISE, (method, name)
