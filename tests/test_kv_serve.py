"""`mlx_lm.server --optiq-kv-config`: a real server on 127.0.0.1 with a per-layer KV plan.

Checks that concurrent requests are served by the continuous-batching path with the
plan applied (what the single-request path and an in-process run with the plan compute,
different from the float cache), that prompt-cache hits compute what a cold run does, and
that bad configs / --kv-bits stop the server at start-up. Served tokens are compared with
the in-process single request replayed on them, up to the noise another batch shape or
prefill split brings (tests.helpers.assert_greedy_matches_solo).
"""

import json
import shutil
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import mlx.core as mx
import pytest

from mlx_lm_optiq.core.jsonio import write_json
from tests.helpers import (
    FLOAT_NOISE,
    QUANTIZED_KV_NOISE,
    ServerProcess,
    assert_greedy_matches_solo,
    free_port,
    replay_solo_logprobs,
    server_argv,
)

PLAN_BITS = [(8, 4), (4, 4), (8, 8), (4, 2)]  # the 2-bit values on slot 3 visibly change tokens
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "Anne Elliot walked along the shore at Lyme, thinking of",
]
MAX_TOKENS = 8


def _write_plan(path, bits=PLAN_BITS, group_size=64, **extra):
    layers = [
        {"layer": i, "cache_slot": i, "scheme": "affine", "k_bits": k, "v_bits": v, "group_size": group_size}
        for i, (k, v) in enumerate(bits)
    ]
    payload = {
        "model": "smollm2-135m-instruct-4layer",
        "quantized_kv_start": 0,
        "num_cache_slots": len(layers),
        "layers": layers,
    }
    payload.update(extra)
    return write_json(path, payload, kind="optiq-kv-config")


class Completion(NamedTuple):
    tokens: list[int]
    cached: int  # prompt tokens served from the prompt cache
    logprobs: list[float]  # each token's log-probability


class Server(ServerProcess):
    """`python -m mlx_lm server` for `model` with `flags` (tests.helpers.ServerProcess), plus completions."""

    def __init__(self, model, env, log_path, *flags):
        super().__init__(model, *flags, env=env, log_path=log_path)

    def complete(self, prompt, **body) -> Completion:
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "logprobs": True, **body}
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=300) as r:
            out = json.loads(r.read())
        if "error" in out:
            raise AssertionError(out)
        content = out["choices"][0]["logprobs"]["content"]
        cached = out["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
        return Completion([c["id"] for c in content], cached, [c["logprob"] for c in content])


@pytest.fixture(scope="module")
def planned_model(tiny_float_path, tmp_path_factory):
    """The 4-layer model in a folder with its kv_config.json beside the weights."""
    folder = tmp_path_factory.mktemp("kvplan") / "model"
    shutil.copytree(tiny_float_path, folder)
    _write_plan(folder / "kv_config.json")
    return folder


@pytest.fixture(scope="module")
def plan_path(planned_model):
    return planned_model / "kv_config.json"


def _serve(model, tmp_path_factory, *flags):
    import os

    env = {**os.environ, "MLX_LM_OPTIQ": "1", "PYTHONUNBUFFERED": "1"}
    return Server(model, env, tmp_path_factory.mktemp("kvserver") / "server.log", *flags)


@pytest.fixture(scope="module")
def plan_server(planned_model, tmp_path_factory):
    # no flag: the plan in the folder is picked up; DEBUG logs the per-layer caches' batch sizes
    server = _serve(planned_model, tmp_path_factory, "--log-level", "DEBUG")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tiny_float_path, plan_path):
    """Greedy tokens computed in this process, with the plan's caches and with float caches."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from mlx_lm_optiq.kv.apply import make_plan_cache
    from mlx_lm_optiq.kv.plan_file import load_kv_config

    model, tok = load(str(tiny_float_path))
    plan = load_kv_config(plan_path, model)

    def run(prompt, planned):
        cache = make_plan_cache(model, plan) if planned else None
        ids = tok.encode(prompt)
        return [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=MAX_TOKENS, prompt_cache=cache)]

    def check(prompt, served, planned=True, label=""):
        """The served completion is what this process's single request computes (replayed on its tokens)."""
        cache = make_plan_cache(model, plan) if planned else None
        solo = replay_solo_logprobs(model, tok.encode(prompt), served.tokens, prompt_cache=cache)
        noise = QUANTIZED_KV_NOISE if planned else FLOAT_NOISE
        assert len(served.tokens) == MAX_TOKENS, label
        assert_greedy_matches_solo(served.tokens, solo, token_logprobs=served.logprobs, noise=noise, label=label)

    run.tokenizer = tok
    run.check = check
    return run


def _largest_kv_batch(log_text):
    import re

    return max([int(n) for n in re.findall(r"mlx_lm_optiq KV: batch of (\d+) rows", log_text)] + [0])


def test_concurrent_requests_batch_with_the_plan(plan_server, reference):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        batched = list(pool.map(plan_server.complete, PROMPTS))
    # they really shared a batch of per-layer quantized caches
    assert _largest_kv_batch(plan_server.log_path.read_text()) >= 2
    # a request with a seed is not batchable: stock serves it through _serve_single
    single = [plan_server.complete(p, seed=0) for p in PROMPTS]
    for p, b, s in zip(PROMPTS, batched, single):
        reference.check(p, b, label=f"batched {p!r}")
        reference.check(p, s, label=f"single {p!r}")
    planned = [reference(p, planned=True) for p in PROMPTS]
    # the plan is really in effect on both paths (a silently float cache would match this)
    assert planned != [reference(p, planned=False) for p in PROMPTS]


def test_prompt_cache_hits_match_a_cold_run(plan_server, reference):
    prompt = "Captain Wentworth had no fortune. He had been lucky in his profession, but"
    cold = plan_server.complete(prompt)
    assert cold.cached == 0
    reference.check(prompt, cold, label="cold")
    again = plan_server.complete(prompt)  # the stored entry is trimmed back to the prompt
    assert again.cached > 0
    reference.check(prompt, again, label="prompt-cache hit")
    longer = prompt + " spending freely what had come freely, had realized"
    extended = plan_server.complete(longer)  # hit on the prefix, prefill the rest
    assert extended.cached >= len(reference.tokenizer.encode(prompt)) - 1
    reference.check(longer, extended, label="prefix hit")
    # the same through the single-request path
    single = plan_server.complete(longer, seed=0)
    assert single.cached > 0
    reference.check(longer, single, label="single-request prefix hit")


def test_server_serves_a_turbo_plan(tiny_float_path, tmp_path_factory, hooks_enabled):
    """Per-layer "scheme": "turbo" through mlx_lm.server: concurrent requests share batched
    turbo caches (continuous batching is kept) and get what the plan computes in this process
    for one request (replayed on the served tokens, tests.helpers)."""
    import re

    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from mlx_lm_optiq.kv.apply import make_plan_cache
    from mlx_lm_optiq.kv.plan_file import load_kv_config

    layers = [
        {"layer": i, "cache_slot": i, "scheme": "turbo", "k_bits": kb, "v_bits": vb}
        for i, (kb, vb) in enumerate([(3, 3), (4, 2), (2, 2), (4, 4)])
    ]
    layers[1] = {"layer": 1, "cache_slot": 1, "scheme": "affine", "k_bits": 8, "v_bits": 4, "group_size": 64}
    plan_file = write_json(
        tmp_path_factory.mktemp("turbo") / "turbo_plan.json",
        {"model": "smollm2-135m-instruct-4layer", "layers": layers},
        kind="optiq-kv-config",
    )
    model, tok = load(str(tiny_float_path))
    plan = load_kv_config(plan_file, model)

    server = _serve(tiny_float_path, tmp_path_factory, "--optiq-kv-config", str(plan_file), "--log-level", "DEBUG")
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            served = list(pool.map(server.complete, PROMPTS))
    finally:
        server.stop()
    # the turbo slots were batched (BatchTurboQuantKVCache logs its row count at DEBUG)
    rows = re.findall(r"batch of (\d+) rows \((?:merge|extend), turbo\)", server.log_path.read_text())
    assert max([int(n) for n in rows] + [0]) >= 2, "turbo slots were not batched"
    for p, c in zip(PROMPTS, served):
        solo = replay_solo_logprobs(model, tok.encode(p), c.tokens, prompt_cache=make_plan_cache(model, plan))
        assert len(c.tokens) == MAX_TOKENS, p
        assert_greedy_matches_solo(c.tokens, solo, token_logprobs=c.logprobs, noise=QUANTIZED_KV_NOISE, label=p)
    float_tokens = [
        [int(t) for t, _ in generate_step(mx.array(tok.encode(p)), model, max_tokens=MAX_TOKENS)] for p in PROMPTS
    ]
    assert [c.tokens for c in served] != float_tokens  # 2-bit turbo slots change tokens


def test_plan_is_reported_at_startup(plan_server, plan_path):
    assert f"per-layer KV plan {plan_path}" in plan_server.log_path.read_text()


def test_no_kv_config_flag_serves_float_on_both_paths(planned_model, reference, tmp_path_factory):
    server = _serve(planned_model, tmp_path_factory, "--optiq-no-kv-config")
    try:
        with ThreadPoolExecutor(2) as pool:
            batched = list(pool.map(server.complete, PROMPTS[:2]))
        single = [server.complete(p, seed=0) for p in PROMPTS[:2]]
    finally:
        server.stop()
    for p, b, s in zip(PROMPTS[:2], batched, single):
        reference.check(p, b, planned=False, label=f"batched {p!r}")
        reference.check(p, s, planned=False, label=f"single {p!r}")
    assert "per-layer KV plan" not in server.log_path.read_text()


def test_kv_bits_with_a_plan_is_refused(tiny_float_path, plan_path):
    import os

    out = subprocess.run(
        server_argv(tiny_float_path, free_port(), "--optiq-kv-config", str(plan_path), "--kv-bits", "4"),
        env={**os.environ, "MLX_LM_OPTIQ": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--kv-bits 4 cannot be combined with the per-layer KV plan" in out.stderr


def _after_parse(argv):
    """Run the extension's start-up step on a parser with the stock flags it reads."""
    import argparse

    from mlx_lm_optiq.hooks import server_kv

    parser = argparse.ArgumentParser(prog="mlx_lm.server")
    parser.add_argument("--model")
    parser.add_argument("--kv-bits", type=int)
    server_kv.add_arguments(parser.add_argument_group("mlx_lm_optiq"))
    args = parser.parse_args(argv)
    try:
        server_kv.after_parse(args, parser)
    finally:
        server_kv._clear()


@pytest.mark.parametrize(
    "bits, group_size, expected",
    [
        (PLAN_BITS[:3], 64, "has 3 cache slots but the model builds 4"),
        (PLAN_BITS, 128, "'group_size' is 128, which does not divide the model's k_head_dim 64"),
        ([(8, 4), (4, 7), (8, 8), (4, 2)], 64, "field 'v_bits' is 7"),
    ],
)
def test_bad_config_stops_the_server_at_startup(tiny_float_path, tmp_path, capsys, bits, group_size, expected):
    bad = _write_plan(tmp_path / "kv_config.json", bits=bits, group_size=group_size)
    with pytest.raises(SystemExit) as exit_info:
        _after_parse(["--model", str(tiny_float_path), "--optiq-kv-config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--optiq-kv-config: {bad}" in err and expected in err


def test_bad_config_in_the_model_folder_is_found(tiny_float_path, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_float_path, model)
    _write_plan(model / "kv_config.json", bits=PLAN_BITS[:2])
    with pytest.raises(SystemExit):
        _after_parse(["--model", str(model)])
    assert f"{model / 'kv_config.json'}: has 2 cache slots" in capsys.readouterr().err
    _after_parse(["--model", str(model), "--optiq-no-kv-config"])  # switched off: nothing is read
    with pytest.raises(SystemExit):
        _after_parse(["--model", str(model), "--optiq-no-kv-config", "--optiq-kv-config", str(model)])
    assert "contradict" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value, expected",
    [("fastest", "MLX_LM_OPTIQ_KV_ATTENTION='fastest': expected one of"), ("cuda", "needs MLX's CUDA backend")],
)
def test_bad_attention_path_stops_the_server_at_startup(
    tiny_float_path, plan_path, monkeypatch, capsys, value, expected
):
    monkeypatch.setenv("MLX_LM_OPTIQ_KV_ATTENTION", value)
    with pytest.raises(SystemExit) as exit_info:
        _after_parse(["--model", str(tiny_float_path), "--optiq-kv-config", str(plan_path)])
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err
