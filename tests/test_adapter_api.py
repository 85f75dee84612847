"""The adapter server's HTTP surface (issue 16): names, paths, bodies, stock request forms, /v1/models.

Most of it runs the `adapters.admin_api` functions in-process on the real 4-layer model
(a few hundred generated malformed inputs; none may raise, answer 5xx or change what is
mounted), then one real `mlx_lm.server` gets the same classes of input over HTTP and must
stay healthy and keep serving stock request forms with stock semantics.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")

from mlx_lm_optiq.adapters import admin_api, mounting  # noqa: E402
from mlx_lm_optiq.adapters.config import (  # noqa: E402
    ADAPTER_NAME_MAX,
    AdapterServingConfig,
    adapter_name_problem,
)
from mlx_lm_optiq.adapters.serving import start_serving  # noqa: E402
from mlx_lm_optiq.core.config import ConfigError  # noqa: E402
from tests.helpers import HOST, MLX_LM_SERVER_SCRIPT, ServerProcess, request_json, write_random_adapter  # noqa: E402

ERROR_STATUSES = {400, 403, 404, 409, 411, 413}
GOOD_NAMES = ["alpha", "a", "org/name", "my-adapter_v1.2", "_x_", "A9/b.c", "x" * ADAPTER_NAME_MAX]
BAD_NAMES = [
    "",
    "a b",
    "line\nbreak",
    "50%",
    "what?",
    "frag#1",
    "tab\t",
    "nul\0",
    "x" * (ADAPTER_NAME_MAX + 1),
    "x" * 100_000,
    "a/b/c",
    "/lead",
    "trail/",
    "..",
    "a..b",
    "a--b",
    "-dash",
    "dot.",
    "ünï",
    "default_model",
    5,
    None,
    True,
    ["alpha"],
    {"n": 1},
]


# ---------------------------------------------------------------------------
# Fixtures: a root with good and malformed adapters, the real 4-layer base


def _write_peft(src: Path, dst: Path, **config_changes) -> Path:
    """A PEFT copy of the mlx-lm adapter `src` with `config_changes` applied to adapter_config.json."""
    from mlx_lm_optiq.lora.peft import export_peft

    out = export_peft(src, dst)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return out


@pytest.fixture(scope="module")
def root(tiny_q4_path, tmp_path_factory):
    """The adapter root: two good adapters, a PEFT one, and one directory per class of malformed adapter."""
    root = tmp_path_factory.mktemp("adapter-root")
    write_random_adapter(tiny_q4_path, root / "alpha", seed=1, rank=4, b_std=0.1)
    write_random_adapter(tiny_q4_path, root / "beta", seed=2, rank=8, b_std=0.1, keys=["self_attn.q_proj"])
    _write_peft(root / "beta", root / "peft_ok")
    _write_peft(root / "beta", root / "peft_rank_list", rank_pattern=[1, 2])
    _write_peft(root / "beta", root / "peft_alpha_str", alpha_pattern="16")
    _write_peft(root / "beta", root / "peft_bad_regex", rank_pattern={"(": 8})
    for name, config in [
        ("deep", b"[" * 100_000),
        ("binary", b"\xff\xfe\x00\x01"),
        ("not_object", b"[1]"),
        ("huge_int", b'{"lora_parameters": {"scale": 1' + b"0" * 5000 + b"}}"),
        ("wrong_types", json.dumps({"lora_parameters": {"scale": "big"}}).encode()),
    ]:
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_bytes(config)
        shutil.copy(root / "alpha" / "adapters.safetensors", root / name)
    (root / "garbage_tensors").mkdir()
    shutil.copy(root / "alpha" / "adapter_config.json", root / "garbage_tensors")
    (root / "garbage_tensors" / "adapters.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (root / "a_file").write_text("not a directory")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(root / "alpha", outside / "alpha")
    (root / "escape").symlink_to(outside / "alpha", target_is_directory=True)
    (root / "loop").symlink_to(root / "loop")
    return root


@pytest.fixture(scope="module")
def base(tiny_q4_path):
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(tiny_q4_path))
    return model


@pytest.fixture
def state(root, base, tiny_q4_path):
    """A server's adapter state with `alpha` mounted at start-up, attached to the real base."""
    config = AdapterServingConfig(adapter=[f"alpha={root / 'alpha'}"], adapter_root=root, model=str(tiny_q4_path))
    served = start_serving(config)
    served.attach(base)
    yield served
    for name in list(mounting.mounted_adapters(base)):
        mounting.unmount_adapter(base, name)


def _assert_clean_error(status, payload, root, sent=""):
    """A 4xx OpenAI error whose message is short and shows no server path the client did not send."""
    assert status in ERROR_STATUSES, (status, payload)
    json.dumps(payload)
    message = payload["error"]["message"]
    assert isinstance(message, str) and len(message) <= admin_api.MAX_MESSAGE_CHARS + 40, len(message)
    if str(root) not in sent:
        assert str(root) not in message, message


# ---------------------------------------------------------------------------
# Names (item 5)


def test_adapter_names_follow_one_grammar_and_round_trip(state, root):
    for name in GOOD_NAMES:
        assert adapter_name_problem(name) is None, name
    for name in BAD_NAMES:
        assert adapter_name_problem(name), name
        status, body = admin_api.mount(state, {"name": name, "path": "beta"})
        _assert_clean_error(status, body, root)
        assert status == 400 and body["error"]["param"] == "name", (name, body)
        assert len(body["error"]["message"]) < 500
    assert state.names() == ["alpha"]

    # every valid name can be mounted, selected, listed, fetched and deleted, percent-encoded or not
    for name, delete_path in [
        ("org/beta.v1", "/v1/adapters/org%2Fbeta.v1"),
        ("org/beta.v1", "/v1/adapters/org/beta.v1?force=1"),
        ("my-adapter_2", "/v1/adapters/my%2Dadapter%5F2"),
    ]:
        assert admin_api.mount(state, {"name": name, "path": "beta"})[0] == 200
        assert admin_api.select_adapter(state, name, None) == (200, {"adapter": name})
        assert admin_api.get_model(state, None, 0, "/v1/models/" + name.replace("/", "%2F"))[1]["id"] == name
        assert admin_api.unmount(state, delete_path) == (200, {"id": name, "object": "model", "deleted": True})
    assert state.names() == sorted(mounting.mounted_adapters(state.model)) == ["alpha"]

    status, body = admin_api.unmount(state, "/v1/adapters/" + "x" * 100_000)
    assert status == 404 and len(body["error"]["message"]) < 500
    for path in ["/v1/adapters/%00", "/v1/adapters/%ff%fe", "/v1/adapters/", "/v1/adapters/a%20b"]:
        _assert_clean_error(*admin_api.unmount(state, path), root)


def test_start_up_names_and_bad_peft_files_are_one_line_errors(root, tiny_q4_path, capsys):
    from mlx_lm_optiq.hooks import server_adapters

    flag = lambda f: "--optiq-" + f.replace("_", "-")  # noqa: E731
    for item in ["a b=x", "50%=x", "a/b/c=x", "y" * 200 + "=x"]:
        with pytest.raises(ConfigError) as e:
            AdapterServingConfig(adapter=[item])
        rendered = e.value.render(flag)
        assert rendered.startswith("--optiq-adapter: ") and "adapter name" in rendered and len(rendered) < 500

    for bad, words in [
        ("peft_rank_list", "field 'rank_pattern'"),
        ("peft_alpha_str", "field 'alpha_pattern'"),
        ("peft_bad_regex", "is not a valid module pattern"),
        ("deep", "not valid JSON"),
    ]:
        args = argparse.Namespace(
            optiq_adapter=[f"x={root / bad}"], optiq_adapter_root=None, model=str(tiny_q4_path), adapter_path=None
        )
        with pytest.raises(SystemExit) as e:
            server_adapters.after_parse(args, argparse.ArgumentParser(prog="mlx_lm.server"))
        assert e.value.code == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and last.startswith("mlx_lm.server: error: --optiq-adapter: x="), err
        assert words in last and "adapter_config.json" in last, last


# ---------------------------------------------------------------------------
# Paths (item 6) and bad adapter files (item 7)


def test_path_policy_absolute_inside_root_and_no_server_paths(state, root):
    status, body = admin_api.mount(state, {"name": "abs", "path": str(root / "beta")})
    assert status == 200, body
    assert admin_api.mount(state, {"name": "dotted", "path": "./alpha/../beta"})[0] == 200
    for given, want in [
        ("../" + root.name + "-elsewhere", 403),
        ("/tmp", 403),
        ("escape", 403),
        ("loop", (400, 403)),
        ("a\0b", 400),
        ("x" * 5000, 400),
        ("a_file", 400),
        ("missing", 400),
        (str(root / "missing"), 400),
        ("", 400),
        (7, 400),
    ]:
        status, body = admin_api.mount(state, {"name": "x", "path": given})
        assert status in (want if isinstance(want, tuple) else (want,)), (given, body)
        _assert_clean_error(status, body, root, sent=str(given))
    for bad, words in [
        ("peft_rank_list", "field 'rank_pattern'"),
        ("peft_alpha_str", "field 'alpha_pattern'"),
        ("peft_bad_regex", "not a valid module pattern"),
        ("deep", "not valid JSON"),
        ("binary", "not valid JSON|not a JSON text file"),
        ("not_object", "expected a JSON object"),
        ("huge_int", "not valid JSON"),
        ("wrong_types", "lora_parameters.scale"),
        ("garbage_tensors", "cannot read safetensors"),
    ]:
        status, body = admin_api.mount(state, {"name": "x", "path": bad})
        assert status == 400 and re.search(words, body["error"]["message"]), (bad, body)
        assert body["error"]["message"].startswith("<adapter-root>/" + bad), body
        _assert_clean_error(status, body, root)
    # /v1/models shows no adapter path (stock's base id is the one path it shows)
    listing = admin_api.list_models(state, "org/base", 0)[1]
    assert len(listing["data"]) == 4 and str(root) not in json.dumps(listing)
    assert sorted(state.names()) == ["abs", "alpha", "dotted"]


def test_request_bodies_and_headers(root):
    for raw, words in [
        (b"[" * 100_000, "nested deeper"),
        (b"[" * (admin_api.MAX_JSON_DEPTH + 1) + b"]" * (admin_api.MAX_JSON_DEPTH + 1), "nested deeper"),
        (b'{"a": ' + b"1" * 5000 + b"}", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"name": "x",', "not valid JSON"),
        (b"", "not valid JSON"),
    ]:
        value, problem = admin_api.parse_body(raw)
        assert value is None and problem[0] == 400 and words in problem[1]["error"]["message"], (raw[:20], problem)
    assert admin_api.parse_body(b'{"name": "x", "path": "y"}') == ({"name": "x", "path": "y"}, None)
    assert admin_api.content_length_problem(None, 10)[0] == 411
    for bad in ["-1", "abc", "", "1e3"]:
        assert admin_api.content_length_problem(bad, 10)[0] == 400
    assert admin_api.content_length_problem("11", 10)[0] == 413
    assert admin_api.content_length_problem("10", 10) is None


# ---------------------------------------------------------------------------
# Stock request forms (item 14) and /v1/models (item 15)


def test_stock_request_forms_are_routed_to_stock(state, root, tiny_q4_path, tmp_path):
    other_model = tmp_path / "another-model"
    other_model.mkdir()
    base_id = str(Path(tiny_q4_path).resolve())
    stock = (200, {"adapter": None, "stock": True})
    assert admin_api.select_adapter(state, str(other_model), None) == stock
    assert admin_api.select_adapter(state, "mlx-community/Other-4bit", None) == stock
    assert admin_api.select_adapter(state, base_id, str(root / "beta")) == stock
    assert admin_api.select_adapter(state, str(other_model), str(root / "beta")) == stock
    # mounted names are served on the base, whatever form names them
    assert admin_api.select_adapter(state, "alpha", None) == (200, {"adapter": "alpha"})
    assert admin_api.select_adapter(state, base_id, "alpha") == (200, {"adapter": "alpha"})
    assert admin_api.select_adapter(state, "default_model", None) == (200, {"adapter": None})
    # mixed or ambiguous forms: a 4xx that says which form to use
    for model, adapters, status, words in [
        ("default_model", str(root / "beta"), 400, '"model"'),
        ("alpha", str(root / "beta"), 400, "send only \"model\": 'alpha'"),
        (str(other_model), "alpha", 400, "served on the base model only"),
        ("nope", None, 404, "unknown model or adapter 'nope'"),
        ("org/" + "x" * 200, None, 404, "unknown model or adapter 'org/xxx"),
        (base_id, "nope", 404, "unknown adapter 'nope'"),
        (base_id, "a\0b", 404, "unknown adapter"),
    ]:
        got, body = admin_api.select_adapter(state, model, adapters)
        assert got == status and words in body["error"]["message"], (model, adapters, body)
        assert body["error"]["mounted_adapters"] == ["alpha"]


def test_models_list_and_model_objects(state, tmp_path):
    # a Hugging Face cache laid out as huggingface_hub writes it, with one MLX model (stock's rule)
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc")
    for f in ["config.json", "model.safetensors.index.json", "tokenizer_config.json"]:
        (snapshot / f).write_text("{}")
    cached = admin_api.cached_hub_models(cache)
    assert cached == ["org/tiny"]
    assert admin_api.cached_hub_models(tmp_path / "missing") == []

    status, listing = admin_api.list_models(state, "org/base", 7, cached)
    assert status == 200 and listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["org/base", "alpha", "org/tiny"]
    assert all({"id", "object", "created", "owned_by"} <= set(m) for m in listing["data"])
    for entry in listing["data"]:
        got = admin_api.models_request(state, "org/base", 7, "/v1/models/" + entry["id"], cached)
        assert got == (200, entry)
    assert admin_api.models_request(state, "org/base", 7, "/v1/models/org%2Ftiny", cached) == (200, listing["data"][2])
    for path in ["/v1/models/nope", "/v1/models/%00", "/v1/models/" + "x" * 100_000, "/v1/modelsX"]:
        status, body = admin_api.models_request(state, "org/base", 7, path, cached)
        assert status == 404 and len(body["error"]["message"]) < 500, path
    assert admin_api.models_request(state, "org/base", 7, "/v1/models/?x=1", cached) == (200, listing)


# ---------------------------------------------------------------------------
# Fuzz: a few hundred generated malformed inputs, in-process


def _fuzz_values(rng: random.Random, root: Path) -> list:
    """Strings, numbers and structures a careless or hostile client sends as a name or a path."""
    pool = [*BAD_NAMES, *GOOD_NAMES[:3], "beta", "peft_ok", "../beta", str(root), str(root / "beta"), "/", "~"]
    pool += [p.name for p in root.iterdir()] + ["a\0b", "%2e%2e/beta", "beta/", "beta/.", "./" * 2000]
    for _ in range(40):
        n = rng.choice([1, 3, 10, 200])
        pool.append("".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x3000)])) for _ in range(n)))
    pool += [rng.uniform(-1e9, 1e9), -1, 0, 2**70, float("nan"), [], {}, [[[[]]]]]
    return pool


def test_admin_api_fuzz_in_process(state, root, base):
    rng = random.Random(16)
    values = _fuzz_values(rng, root)
    calls, seen = 0, collections.Counter()
    for _ in range(250):  # mount bodies
        kind = rng.random()
        if kind < 0.15:
            body = rng.choice(values)
        else:
            body = {k: rng.choice(values) for k in rng.sample(["name", "path", "extra", "adapters"], rng.randint(0, 3))}
            if kind < 0.8:  # half with a valid name and a plausible path, so that every check runs
                plausible = rng.random() < 0.5
                names = [*GOOD_NAMES, "alpha"] if plausible else values
                paths = ["beta", "peft_ok", str(root / "beta"), "alpha/../beta", "escape", "../x", "deep"]
                body.update(name=rng.choice(names), path=rng.choice(paths if plausible else values))
        status, payload = admin_api.mount(state, body)
        calls, seen[status] = calls + 1, seen[status] + 1
        if status == 200:
            assert admin_api.unmount(state, "/v1/adapters/" + payload["id"])[0] == 200
        else:
            _assert_clean_error(status, payload, root, sent=repr(body))
    for _ in range(120):  # request bodies
        parts = [b"[", b"{", b'"a":', b"1", b",", b"]", b"}", b"\xff", b"\x00", b"9" * 50, b'"\\ud800"', b"NaN"]
        raw = b"".join(rng.choice(parts) for _ in range(rng.randint(0, 60)))
        if rng.random() < 0.1:
            raw = rng.choice([b"[", b'{"a":']) * rng.randint(1000, 50_000)
        value, problem = admin_api.parse_body(raw)
        calls += 1
        if problem is not None:
            _assert_clean_error(*problem, root)
    for _ in range(120):  # DELETE and GET paths
        name = rng.choice(values)
        text = name if isinstance(name, str) else json.dumps(name)
        encoded = "".join(rng.choice([c, f"%{ord(c) % 256:02X}"]) for c in text[:300])
        query = rng.choice(["", "?x=1", "#f", "?" + "y" * 5000])
        status, payload = admin_api.unmount(
            state, rng.choice(["/v1/adapters/", "/v1/adapters", "/v1/"]) + encoded + query
        )
        calls += 1
        if status != 200:
            _assert_clean_error(status, payload, root, sent=text)
        else:  # only a mounted name deletes; put it back
            assert admin_api.mount(state, {"name": "alpha", "path": "alpha"})[0] == 200
        status, payload = admin_api.models_request(state, None, 0, "/v1/models/" + encoded + query, ["org/x"])
        calls += 1
        assert status in (200, 404) and json.dumps(payload)
    for _ in range(80):  # completion selections
        model, adapters = rng.choice(values), rng.choice([None, *values])
        model = model if isinstance(model, str) else "default_model"
        adapters = adapters if isinstance(adapters, str) or adapters is None else None
        status, payload = admin_api.select_adapter(state, model, adapters)
        calls += 1
        if status != 200:
            _assert_clean_error(status, payload, root, sent=f"{model}{adapters}")
    assert calls >= 600 and {200, 400, 403, 409} <= set(seen), seen  # every outcome of a mount was reached
    # nothing leaked into what is mounted, and the base still computes with and without its adapter
    assert state.names() == sorted(mounting.mounted_adapters(base)) == ["alpha"]
    x = mx.array([[1, 504, 3458, 282]])
    plain = base(x)
    with mounting.use_adapter("alpha"):
        adapted = base(x)
    assert mx.isfinite(adapted).all().item() and not mx.allclose(plain, adapted).item()


# ---------------------------------------------------------------------------
# One real server: the same classes over HTTP, stock forms, then healthy


def _raw(port, method, path, body=b"", headers=None, timeout=60):
    """(status, parsed body or raw bytes) of one request sent exactly as given (no client-side checks)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        hdrs = {"Content-Length": str(len(body))} if headers is None else headers
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data
    finally:
        conn.close()


def _complete(port, model, **extra):
    body = {"model": model, "prompt": "Hello, my name is", "max_tokens": 4, "temperature": 0, "logprobs": True}
    status, out = request_json(port, "POST", "/v1/completions", {**body, **extra})
    assert status == 200, out
    return [c["id"] for c in out["choices"][0]["logprobs"]["content"]], out["choices"][0]["logprobs"]["content"]


def test_real_server_malformed_http_and_stock_forms(root, tiny_q4_path, tmp_path):
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc")
    for f in ["config.json", "model.safetensors.index.json", "tokenizer_config.json"]:
        (snapshot / f).write_text("{}")
    other_model = tmp_path / "same-weights-other-path"
    other_model.symlink_to(tiny_q4_path, target_is_directory=True)
    env = dict(os.environ, MLX_LM_OPTIQ="1", PYTHONUNBUFFERED="1", HF_HUB_CACHE=str(cache))
    flags = ["--optiq-adapter", f"alpha={root / 'alpha'}", "--optiq-adapter-root", str(root)]
    log = tmp_path / "server.log"
    with ServerProcess(tiny_q4_path, *flags, env=env, log_path=log, command=MLX_LM_SERVER_SCRIPT) as server:
        port = server.port
        base_id = str(Path(tiny_q4_path).resolve())
        deep = b"[" * 100_000
        # (a body is sent only where the server reads it: unread bytes make the socket close with a reset)
        for method, path, body, headers, want in [
            ("POST", "/v1/adapters", deep, None, 400),
            ("POST", "/v1/completions", deep, None, 400),
            ("POST", "/v1/chat/completions", b"\xff\xfe", None, 400),
            ("POST", "/v1/completions", b'{"max_tokens": ' + b"9" * 5000 + b"}", None, 400),
            ("POST", "/v1/completions", b"", {"Content-Length": "-5"}, 400),
            ("POST", "/v1/completions", b"", {}, 411),  # stock's own answer
            ("POST", "/v1/adapters", b"", {"Content-Length": "-5"}, 400),
            ("POST", "/v1/adapters", b"", {"Content-Length": "abc"}, 400),
            ("POST", "/v1/adapters", b"", {}, 411),
            ("POST", "/v1/adapters", b"", {"Content-Length": str(admin_api.MAX_ADMIN_BODY + 1)}, 413),
            ("POST", "/v1/adapters", json.dumps({"name": "x", "path": "a\0b"}).encode(), None, 400),
            ("POST", "/v1/adapters", json.dumps({"name": "n" * 100_000, "path": "beta"}).encode(), None, 400),
            ("POST", "/v1/adapters", json.dumps({"name": "x", "path": "peft_rank_list"}).encode(), None, 400),
            ("POST", "/v1/adapters", json.dumps({"name": "x", "path": "peft_alpha_str"}).encode(), None, 400),
            ("DELETE", "/v1/adapters/%00", b"", None, 404),
            ("DELETE", "/v1/adapters/" + "x" * 20_000, b"", None, 404),
            ("GET", "/v1/models/%00", b"", None, 404),
            ("GET", "/v1/models/nope", b"", None, 404),
        ]:
            status, out = _raw(port, method, path, body, headers)
            assert status == want, (method, path[:40], body[:40], out)
            assert isinstance(out, dict) and len(json.dumps(out)) < 3000, out
        rng = random.Random(7)
        for _ in range(40):  # random bytes at every POST endpoint
            raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
            path = rng.choice(["/v1/adapters", "/v1/completions", "/v1/chat/completions"])
            status, out = _raw(port, "POST", path, raw)
            assert 400 <= status < 500, (path, raw[:40], out)

        # names and absolute paths inside the root, over HTTP
        status, out = request_json(port, "POST", "/v1/adapters", {"name": "org/beta", "path": str(root / "beta")})
        assert status == 200, out
        listing = request_json(port, "GET", "/v1/models")[1]
        assert [m["id"] for m in listing["data"]] == [base_id, "alpha", "org/beta", "org/tiny"]
        assert str(root) not in json.dumps(listing)
        assert request_json(port, "GET", "/v1/models/org%2Fbeta")[1]["parent"] == base_id
        assert request_json(port, "DELETE", "/v1/adapters/org%2Fbeta")[0] == 200

        # stock forms keep stock semantics: the adapter directory loaded the stock way computes
        # what the mounted adapter computes; another model path is served; then back to the base
        mounted, mounted_lp = _complete(port, "alpha")
        base_lp = _complete(port, base_id)[1]
        assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(mounted_lp, base_lp)) > 0.05
        stock, stock_lp = _complete(port, base_id, adapters=str(root / "alpha"))
        assert stock == mounted
        assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(mounted_lp, stock_lp)) < 2e-3
        _complete(port, str(other_model))
        status, out = request_json(
            port, "POST", "/v1/completions", {"adapters": str(root / "alpha"), "prompt": "x", "max_tokens": 2}
        )
        assert status == 400 and '"model"' in out["error"]["message"], out
        assert _complete(port, "alpha")[0] == mounted
        assert request_json(port, "GET", "/health") == (200, {"status": "ok"})
        text = server.log_text()
    assert "Traceback" not in text, text[-3000:]
