"""Many adapters on one base (issue 6): library mounting and the multi-adapter server.

Adapters: three random-but-deterministic mlx-lm adapters (made with mlx-lm's own
`linear_to_lora_layers`, different seeds/ranks/target layers) and two trained for
a few steps with the real `mlx_lm.lora` on ../shared/data/gsm_symbolic (other seeds,
block counts and learning rates).
"""

import functools
import json
import os
import sys
import threading
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import mlx_lm_optiq  # noqa: E402
from mlx_lm_optiq.adapters import admin_api, mounting, rows  # noqa: E402
from mlx_lm_optiq.adapters.config import AdapterServingConfig  # noqa: E402
from mlx_lm_optiq.adapters.serving import ServedAdapters, start_serving  # noqa: E402
from mlx_lm_optiq.core.config import ConfigError  # noqa: E402
from tests.helpers import (  # noqa: E402
    FLOAT_NOISE,
    MLX_LM_SERVER_SCRIPT,
    ServerProcess,
    assert_greedy_matches_solo,
    main_of,
    replay_solo_logprobs,
    request_json,
    run_together,
    write_random_adapter,
)

PROMPT = "Hello, my name is"
PROMPTS = ["Hello, my name is", "The weather today", "Once upon a time"]


# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def random_adapters(tiny_float_path, adapter_dir):
    """name -> path of three different real mlx-lm adapters (seeded random weights)."""
    specs = {
        "alpha": dict(seed=1, rank=4),
        "beta": dict(seed=2, rank=8, scale=10.0),
        "gamma": dict(seed=3, rank=6, keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]),
    }
    return {
        name: write_random_adapter(tiny_float_path, adapter_dir / name, b_std=0.1, **kw) for name, kw in specs.items()
    }


def _lora_argv(model, data, out, seed, num_layers, learning_rate):
    """The real (stock) `mlx_lm.lora` command line of a LoRA adapter trained for a few steps."""
    return [
        "--model",
        str(model),
        "--train",
        "--data",
        str(data),
        "--iters",
        "4",
        "--batch-size",
        "1",
        "--num-layers",
        str(num_layers),
        "--learning-rate",
        str(learning_rate),
        "--max-seq-length",
        "48",
        "--val-batches",
        "1",
        "--steps-per-eval",
        "1000",
        "--save-every",
        "1000",
        "--adapter-path",
        str(out),
        "--seed",
        str(seed),
    ]


@pytest.fixture(scope="session")
def trained_adapters(tiny_float_path, adapter_dir, shared_dir, tmp_path_factory):
    """(math, prose): two adapters trained with the real (stock) `mlx_lm.lora`. The second is on
    Austen prose ({"text"} records) instead of math, every block, other seed."""
    data = tmp_path_factory.mktemp("prose")
    words = (shared_dir / "data" / "text" / "persuasion.txt").read_text().split()[3000:]
    for split, start, n in (("train", 0, 8), ("valid", 400, 2)):
        with open(data / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": " ".join(words[start + 40 * i : start + 40 * (i + 1)])}) + "\n")
    math, prose = adapter_dir / "trained", adapter_dir / "trained2"
    argvs = [
        _lora_argv(
            tiny_float_path, shared_dir / "data" / "gsm_symbolic", math, seed=3, num_layers=2, learning_rate=1e-2
        ),
        _lora_argv(tiny_float_path, data, prose, seed=7, num_layers=4, learning_rate=1e-2),
    ]
    # stock `mlx_lm lora`'s own main, once per command line, in this process with the hooks off
    # (importing mlx_lm's trainer is most of a few-step run's time); each run seeds itself from its --seed
    assert not mlx_lm_optiq.enabled_patches()
    for argv in argvs:
        main_of("lora", argv)
    for out in (math, prose):
        assert (out / "adapters.safetensors").exists() and (out / "adapter_config.json").exists()
    return math, prose


@pytest.fixture(scope="session")
def trained_adapter(trained_adapters):
    return trained_adapters[0]


@pytest.fixture(scope="session")
def trained_adapter_2(trained_adapters):
    """The second trained adapter: Austen prose, every block, other seed."""
    return trained_adapters[1]


def _greedy_tokens(model, tokenizer, prompt, n=8):
    from mlx_lm.generate import generate_step

    tokens = mx.array(tokenizer.encode(prompt))
    return [int(t) for t, _ in zip((t for t, _ in generate_step(tokens, model, max_tokens=n)), range(n))]


@functools.cache
def _tokenizer(path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(Path(path))


def _fresh(path, adapter_path=None):
    """A freshly loaded model (stock mlx-lm, with the adapter loaded the stock way when given)."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    if adapter_path is not None:
        load_adapters(model, str(adapter_path))
    return model, _tokenizer(str(path))


# ---------------------------------------------------------------------------
# Library


def test_mount_matches_stock_lora_and_unmount_restores_modules(
    tiny_float_path, random_adapters, trained_adapter, trained_adapter_2
):
    model, tok = _fresh(tiny_float_path)
    x = mx.array([tok.encode(PROMPT)])
    base = model(x)
    modules_before = dict(model.named_modules())
    params_before = {k: v for k, v in tree_flatten(model.parameters())}
    named = dict(random_adapters, trained=trained_adapter, trained2=trained_adapter_2)
    for name, path in named.items():
        info = mounting.mount_adapter(model, name, path)
        assert info.format == "mlx-lm" and info.nbytes > 0
    assert sorted(mounting.mounted_adapters(model)) == sorted(named)
    # adapter tensors are not parameters: nothing named lora appears in the tree
    assert not [k for k, _ in tree_flatten(model.parameters()) if "lora" in k]

    # no adapter selected: exactly the base model
    assert mx.array_equal(model(x), base)
    for name, path in named.items():
        stock, _ = _fresh(tiny_float_path, path)
        want = stock(x)
        with mounting.use_adapter(name, model=model):
            got = model(x)
        assert mx.array_equal(got, want), name  # same arithmetic as mlx-lm's LoRALinear
        assert not mx.allclose(got, base, atol=1e-3), f"adapter {name} does not change the outputs"

    for name in named:
        mounting.unmount_adapter(model, name)
    modules_after = dict(model.named_modules())
    assert modules_after.keys() == modules_before.keys()
    assert all(modules_after[k] is modules_before[k] for k in modules_before)
    assert all(v is params_before[k] for k, v in tree_flatten(model.parameters()))
    assert mounting.mounted_adapters(model) == {}
    assert not hasattr(model, mounting._REGISTRY_ATTR)
    assert mx.array_equal(model(x), base)


def test_adapters_change_generation_like_stock(tiny_float_path, trained_adapter, random_adapters):
    model, tok = _fresh(tiny_float_path)
    x = mx.array([tok.encode(PROMPTS[1])])
    base_logits = model(x)
    mounting.mount_adapter(model, "trained", trained_adapter)
    with mounting.use_adapter("trained"):
        mounted_tokens = _greedy_tokens(model, tok, PROMPTS[1])
        trained_logits = model(x)
    stock, _ = _fresh(tiny_float_path, trained_adapter)
    assert mounted_tokens == _greedy_tokens(stock, tok, PROMPTS[1])
    assert mx.abs(trained_logits - base_logits).max().item() > 0.1, "training left the adapter at zero"
    # the random adapters must visibly change greedy generation (the server tests rely on it)
    for name, path in random_adapters.items():
        mounting.mount_adapter(model, name, path)
    outs = set()
    for name in [None, *random_adapters]:
        with mounting.use_adapter(name):
            outs.add(tuple(_greedy_tokens(model, tok, PROMPTS[0])))
    assert len(outs) == 4, "base and the three adapters should give four different continuations"


@pytest.mark.parametrize("method", rows.MIXED_ROWS_METHODS)
def test_mixed_rows_in_one_forward_match_solo(tiny_float_path, random_adapters, method, monkeypatch):
    # every way of computing mixed rows runs here on the CPU; prefill is eager, the
    # one-token decode step runs the compiled function (and eagerly, to compare)
    from mlx_lm.models.cache import make_prompt_cache

    monkeypatch.setattr(rows, "MIXED_ROWS_METHOD", method)
    model, tok = _fresh(tiny_float_path)
    for name, path in random_adapters.items():
        mounting.mount_adapter(model, name, path)
    names = ["beta", None, "alpha", "gamma", "beta"]
    ids = [tok.encode(p) for p in (PROMPTS * 2)[: len(names)]]
    length = min(len(i) for i in ids) - 1
    x = mx.array([i[:length] for i in ids])
    step = mx.array([[i[length]] for i in ids])
    decoded = {}
    for compiled in (True, False):
        monkeypatch.setattr(rows, "COMPILE_DECODE", compiled)
        cache = make_prompt_cache(model)
        with mounting.adapter_rows(model, names):
            mixed = model(x, cache=cache)
            decoded[compiled] = model(step, cache=cache)
    assert mx.allclose(decoded[True], decoded[False], atol=1e-5)
    for row, name in enumerate(names):
        cache = make_prompt_cache(model)
        with mounting.use_adapter(name):
            solo = model(x[row : row + 1], cache=cache)
            solo_step = model(step[row : row + 1], cache=cache)
        assert mx.allclose(mixed[row], solo[0], atol=1e-4), (row, name)
        # greedy choices at every prompt position, up to near-ties another batch shape may flip
        assert_greedy_matches_solo(mixed[row].argmax(-1).tolist(), list(solo[0]), noise=FLOAT_NOISE, label=str(name))
        assert mx.allclose(decoded[True][row], solo_step[0], atol=1e-4), (row, name)
    with pytest.raises(mounting.UnknownAdapterError, match="mounted adapters: \\['alpha', 'beta', 'gamma'\\]"):
        with mounting.adapter_rows(model, ["alpha", "nope"]):
            pass


def test_mixed_rows_method_variable_is_checked():
    mounting_import = [sys.executable, "-c", "import mlx_lm_optiq.adapters.mounting"]
    bad, ok, bad2, ok2 = run_together(  # four fresh interpreters, at once
        (mounting_import, dict(os.environ, MLX_LM_OPTIQ_MIXED_ROWS="fast")),
        (
            [sys.executable, "-c", "import mlx_lm_optiq.adapters.rows as R; print(R.mixed_rows_method())"],
            dict(os.environ, MLX_LM_OPTIQ_MIXED_ROWS="masked"),
        ),
        (mounting_import, dict(os.environ, MLX_LM_OPTIQ_COMPILE_DECODE="yes")),
        (
            [sys.executable, "-c", "import mlx_lm_optiq.adapters.rows as R; print(R.COMPILE_DECODE)"],
            dict(os.environ, MLX_LM_OPTIQ_COMPILE_DECODE="0"),
        ),
    )
    assert bad.returncode != 0
    assert "MLX_LM_OPTIQ_MIXED_ROWS is 'fast', expected one of ['gather', 'take', 'masked']" in bad.stderr
    assert ok.returncode == 0 and ok.stdout.strip() == "masked", ok.stderr
    assert bad2.returncode != 0 and "MLX_LM_OPTIQ_COMPILE_DECODE is 'yes', expected 0 or 1" in bad2.stderr
    assert ok2.returncode == 0 and ok2.stdout.strip() == "False", ok2.stderr
    # gather dies inside mx.gather_mm on CUDA (mlx 0.32.4): refused when the variable is read, not at a request
    with pytest.raises(ValueError, match="MLX_LM_OPTIQ_MIXED_ROWS is 'gather', which does not run on CUDA"):
        rows._refuse_gather_on_cuda("gather", "MLX_LM_OPTIQ_MIXED_ROWS", on_cuda=True)
    for method, on_cuda in [("take", True), ("masked", True), ("gather", False)]:
        rows._refuse_gather_on_cuda(method, "MLX_LM_OPTIQ_MIXED_ROWS", on_cuda=on_cuda)


def _quantized(path, bits, mode, group_size):
    """Stock mlx-lm quantization of every linear layer in the blocks (the tied embedding
    stays float: quantizing it only costs CI time and adapters never touch it)."""
    from mlx_lm.utils import load_model, quantize_model

    model, config = load_model(Path(path), lazy=True)
    model, _ = quantize_model(
        model, config, group_size, bits, mode=mode, quant_predicate=lambda p, m, *_: "embed_tokens" not in p
    )
    return model, _tokenizer(str(path))


@pytest.mark.parametrize(
    "bits,mode,group_size",
    [
        (2, "affine", 64),
        (3, "affine", 64),
        (4, "affine", 64),
        (5, "affine", 64),
        (6, "affine", 32),
        (8, "affine", 64),
        (4, "mxfp4", 32),
    ],
    ids=["2bit", "3bit", "4bit", "5bit", "6bit", "8bit", "mxfp4"],
)
def test_quantized_bases_every_bit_width(tiny_float_path, random_adapters, bits, mode, group_size):
    from mlx_lm.tuner.utils import load_adapters

    model, tok = _quantized(tiny_float_path, bits, mode, group_size)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and q.bits == bits and q.mode == mode
    x = mx.array([tok.encode(PROMPT)[:3]])
    base = model(x)
    before = dict(model.named_modules())
    mounting.mount_adapter(model, "alpha", random_adapters["alpha"])
    mounting.mount_adapter(model, "gamma", random_adapters["gamma"])
    with mounting.use_adapter("alpha"):
        got = model(x)
    assert got.dtype == base.dtype
    with mounting.use_adapter("gamma"):
        solo = model(x)
    for method in rows.MIXED_ROWS_METHODS:
        rows.MIXED_ROWS_METHOD = method
        try:
            with mounting.adapter_rows(model, ["gamma", None]):
                mixed = model(mx.concatenate([x, x]))
        finally:
            rows.MIXED_ROWS_METHOD = None
        assert mixed.dtype == base.dtype, method
        assert mx.allclose(mixed[0], solo[0], atol=1e-4) and mx.allclose(mixed[1], base[0], atol=1e-4), method
    mounting.unmount_adapter(model, "alpha")
    mounting.unmount_adapter(model, "gamma")
    assert all(dict(model.named_modules())[k] is v for k, v in before.items())
    assert mx.array_equal(model(x), base)
    # stock mlx-lm LoRA on the very same quantized layers computes the same thing
    load_adapters(model, str(random_adapters["alpha"]))
    assert mx.array_equal(got, model(x))
    assert not mx.allclose(got, base, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_adapters_keep_the_activation_dtype(tiny_float_path, random_adapters, dtype):
    model, tok = _fresh(tiny_float_path)
    model.set_dtype(getattr(mx, dtype))
    x = mx.array([tok.encode(PROMPT)[:4]] * 2)
    base = model(x)
    mounting.mount_adapter(model, "alpha", random_adapters["alpha"])  # adapter tensors are float32
    mounting.mount_adapter(model, "beta", random_adapters["beta"])
    with mounting.use_adapter("alpha"):
        single = model(x)
    with mounting.adapter_rows(model, ["alpha", "beta"]):
        mixed = model(x)
    hidden = []
    layer = model.model.layers[0].self_attn.q_proj
    with mounting.use_adapter("beta"):
        hidden.append(layer(mx.zeros((1, 2, 576), dtype=getattr(mx, dtype))))
    assert base.dtype == single.dtype == mixed.dtype == hidden[0].dtype == getattr(mx, dtype)


def _write_peft_copy(src, dst, rank):
    """The same LoRA as an mlx-lm adapter, in PEFT's on-disk layout (torch-style transposed)."""
    cfg = json.loads((src / "adapter_config.json").read_text())
    scale = cfg["lora_parameters"]["scale"]
    tensors = mx.load(str(src / "adapters.safetensors"))
    peft = {}
    for key, value in tensors.items():
        path, leaf = key.rsplit(".", 1)
        peft[f"base_model.model.{path}.lora_{'A' if leaf == 'lora_a' else 'B'}.weight"] = value.T
    dst.mkdir()
    mx.save_safetensors(str(dst / "adapter_model.safetensors"), peft)
    (dst / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": scale * rank, "target_modules": ["q_proj", "v_proj"]})
    )


def test_peft_and_zero_padded_per_layer_rank_adapters(tiny_float_path, random_adapters, tmp_path):
    model, tok = _fresh(tiny_float_path)
    x = mx.array([tok.encode(PROMPT)])
    mounting.mount_adapter(model, "alpha", random_adapters["alpha"])
    with mounting.use_adapter("alpha"):
        want = model(x)

    _write_peft_copy(random_adapters["alpha"], tmp_path / "peft", rank=4)
    info = mounting.mount_adapter(model, "alpha-peft", tmp_path / "peft")
    assert info.format == "peft"
    with mounting.use_adapter("alpha-peft"):
        assert mx.allclose(model(x), want, atol=1e-4)

    # per-layer ranks stored zero-padded to the largest rank (how optiq LoRA saves
    # them for stock mlx-lm): mounted at the true ranks, same outputs as stock
    padded = tmp_path / "padded"
    padded.mkdir()
    tensors = mx.load(str(random_adapters["beta"] / "adapters.safetensors"))
    for i, key in enumerate(sorted(k for k in tensors if k.endswith(".lora_a"))):
        keep = 2 + (i % 3) * 2  # ranks 2, 4, 6 (padded to 8)
        a, b = tensors[key], tensors[key[:-1] + "b"]
        tensors[key] = mx.concatenate([a[:, :keep], mx.zeros((a.shape[0], 8 - keep))], axis=1)
        tensors[key[:-1] + "b"] = mx.concatenate([b[:keep], mx.zeros((8 - keep, b.shape[1]))], axis=0)
    mx.save_safetensors(str(padded / "adapters.safetensors"), tensors)
    (padded / "adapter_config.json").write_text((random_adapters["beta"] / "adapter_config.json").read_text())
    info = mounting.mount_adapter(model, "ranks", padded)
    assert sorted(set(info.ranks.values())) == [2, 4, 6] and info.format == "optiq"
    stock, _ = _fresh(tiny_float_path, padded)
    with mounting.use_adapter("ranks"):
        assert mx.allclose(model(x), stock(x), atol=1e-4)


def test_bad_adapters_are_refused_and_leave_mounted_ones_alone(tiny_float_path, random_adapters, tmp_path):
    model, tok = _fresh(tiny_float_path)
    x = mx.array([tok.encode(PROMPT)])
    mounting.mount_adapter(model, "alpha", random_adapters["alpha"])
    with mounting.use_adapter("alpha"):
        want = model(x)
    modules = dict(model.named_modules())

    with pytest.raises(mounting.AdapterError, match="no such directory"):
        mounting.mount_adapter(model, "x", tmp_path / "missing")
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(mounting.AdapterError, match="adapter_config.json: not valid JSON"):
        mounting.mount_adapter(model, "x", bad_json)
    # a tensor of the wrong width: every mismatch is listed, nothing is mounted
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text((random_adapters["alpha"] / "adapter_config.json").read_text())
    t = mx.load(str(random_adapters["alpha"] / "adapters.safetensors"))
    key = "model.layers.3.self_attn.q_proj.lora_a"
    t[key] = mx.zeros((100, t[key].shape[1]))
    mx.save_safetensors(str(wrong / "adapters.safetensors"), t)
    with pytest.raises(mounting.AdapterError, match="model.layers.3.self_attn.q_proj: adapter maps 100 -> 576"):
        mounting.mount_adapter(model, "x", wrong)
    # half a pair
    del t[key]
    mx.save_safetensors(str(wrong / "adapters.safetensors"), t)
    with pytest.raises(mounting.AdapterError, match="has no '.lora_a' tensor"):
        mounting.mount_adapter(model, "x", wrong)
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "dora", "lora_parameters": {"scale": 1}}))
    with pytest.raises(mounting.AdapterError, match="fine_tune_type' is 'dora'"):
        mounting.mount_adapter(model, "x", dora)
    with pytest.raises(mounting.AdapterError, match="already mounted"):
        mounting.mount_adapter(model, "alpha", random_adapters["beta"])
    with pytest.raises(mounting.UnknownAdapterError, match="mounted adapters: \\['alpha'\\]"):
        with mounting.use_adapter("beta", model=model):
            pass
    with pytest.raises(mounting.UnknownAdapterError):
        mounting.unmount_adapter(model, "beta")

    assert list(mounting.mounted_adapters(model)) == ["alpha"]
    assert all(dict(model.named_modules())[k] is v for k, v in modules.items())
    with mounting.use_adapter("alpha"):
        assert mx.array_equal(model(x), want)


def test_batch_generator_mixes_adapters_in_one_batch(tiny_float_path, random_adapters, hooks_enabled):
    """mlx-lm's own BatchGenerator: rows of different adapters decode together, no cross-talk."""
    import mlx_lm.server  # noqa: F401  (installs the batch-engine hooks)
    from mlx_lm.generate import BatchGenerator

    model, tok = _fresh(tiny_float_path)
    for name, path in random_adapters.items():
        mounting.mount_adapter(model, name, path)
    jobs = [
        ("alpha", PROMPTS[0]),
        (None, PROMPTS[1]),
        ("beta", PROMPTS[2]),
        ("gamma", PROMPTS[0]),
        ("beta", PROMPTS[0]),
    ]
    gen = BatchGenerator(model, max_tokens=6, completion_batch_size=8, prefill_batch_size=8)
    uid_job = {}
    for i, (name, prompt) in enumerate(jobs):
        with mounting.use_adapter(name):
            (uid,) = gen.insert([tok.encode(prompt)])
        uid_job[uid] = i
    got = {i: [] for i in range(len(jobs))}
    steps, widest = 0, 0
    while any(len(v) < 6 for v in got.values()):
        widest = max(widest, len(gen._generation_batch))
        for r in gen.next_generated():
            got[uid_job[r.uid]].append((r.token, r.logprobs))
        steps += 1
        assert steps < 50
    gen.close()
    assert widest == len(jobs), "all five requests should decode in one batch"
    # each row computes what its adapter alone computes: the single request replayed on the
    # batched tokens, up to the noise another batch shape brings (tests.helpers)
    for i, (name, prompt) in enumerate(jobs):
        tokens = [t for t, _ in got[i]]
        with mounting.use_adapter(name):
            solo = replay_solo_logprobs(model, tok.encode(prompt), tokens)
        assert_greedy_matches_solo(
            tokens, solo, logprobs=[lp for _, lp in got[i]], noise=FLOAT_NOISE, label=f"{name} {prompt!r}"
        )


def test_disable_restores_the_batch_engine_and_handler(hooks_enabled):
    import mlx_lm.server  # noqa: F401

    gen_mod, srv = sys.modules["mlx_lm.generate"], sys.modules["mlx_lm.server"]

    originals = {
        (gen_mod.BatchGenerator, "insert_segments"): gen_mod.BatchGenerator.__dict__["insert_segments"],
        (gen_mod.GenerationBatch, "_step"): gen_mod.GenerationBatch.__dict__["_step"],
        (srv.ModelProvider, "load"): srv.ModelProvider.__dict__["load"],
    }
    assert all(hasattr(v, "__wrapped__") for v in originals.values())
    assert "do_DELETE" in srv.APIHandler.__dict__
    hooks_enabled.disable()
    for (owner, attr), wrapped in originals.items():
        assert owner.__dict__[attr] is wrapped.__wrapped__
    assert "do_DELETE" not in srv.APIHandler.__dict__


# ---------------------------------------------------------------------------
# The server's HTTP API as plain functions (no server)


def test_admin_api_mounts_selects_and_unmounts(tiny_float_path, random_adapters, adapter_dir):
    model, tok = _fresh(tiny_float_path)
    x = mx.array([tok.encode(PROMPT)])
    config = AdapterServingConfig(
        adapter=[f"alpha={random_adapters['alpha']}"], adapter_root=adapter_dir, model=str(tiny_float_path)
    )
    state = start_serving(config)
    state.attach(model)
    assert list(mounting.mounted_adapters(model)) == ["alpha"]

    status, body = admin_api.mount(state, {"name": "beta", "path": "beta"})
    assert status == 200 and body["mounted"] and body["adapter_format"] == "mlx-lm", body
    assert sorted(mounting.mounted_adapters(model)) == ["alpha", "beta"]
    with mounting.use_adapter("beta"):
        got = model(x)
    stock, _ = _fresh(tiny_float_path, random_adapters["beta"])
    assert mx.array_equal(got, stock(x))
    status, listing = admin_api.list_models(state, str(tiny_float_path), 0)
    assert status == 200 and [m["id"] for m in listing["data"]] == [str(tiny_float_path.resolve()), "alpha", "beta"]

    # selection: by "model", by "adapters", the base, and the errors
    assert admin_api.select_adapter(state, "beta", None) == (200, {"adapter": "beta"})
    assert admin_api.select_adapter(state, "default_model", "alpha") == (200, {"adapter": "alpha"})
    assert admin_api.select_adapter(state, str(tiny_float_path), None) == (200, {"adapter": None})
    status, body = admin_api.select_adapter(state, "nope", None)
    assert status == 404 and body["error"]["mounted_adapters"] == ["alpha", "beta"]
    assert "unknown model or adapter 'nope'" in body["error"]["message"]
    assert admin_api.select_adapter(state, "default_model", "nope")[0] == 404
    assert admin_api.select_adapter(state, "alpha", "beta")[0] == 400

    # bad bodies, names and paths: 4xx, nothing changes
    for bad_body, want in [
        (["beta"], 400),
        ({"name": "x"}, 400),
        ({"name": "", "path": "beta"}, 400),
        ({"name": "default_model", "path": "beta"}, 400),
        ({"name": "x", "path": "missing"}, 400),
        ({"name": "x", "path": "../elsewhere"}, 403),
        ({"name": "x", "path": "/tmp"}, 403),
        ({"name": "beta", "path": "gamma"}, 409),
    ]:
        status, body = admin_api.mount(state, bad_body)
        assert status == want and body["error"]["code"] == want, (bad_body, body)
    assert admin_api.body_not_json(ValueError("Expecting value"))[0] == 400
    assert sorted(state.names()) == sorted(mounting.mounted_adapters(model)) == ["alpha", "beta"]

    # unmounting: unknown 404, in flight 409, then 200 and the module tree loses it
    status, body = admin_api.unmount(state, "/v1/adapters/nope")
    assert status == 404 and body["error"]["mounted_adapters"] == ["alpha", "beta"]
    assert admin_api.unmount(state, "/v1/other")[0] == 404
    state.unmount_grace_s = 0.05  # how long an unmount waits for rows that are leaving the batch
    with state.track("beta"):
        assert admin_api.unmount(state, "/v1/adapters/beta")[0] == 409
    assert admin_api.unmount(state, "/v1/adapters/beta") == (200, {"id": "beta", "object": "model", "deleted": True})
    assert list(mounting.mounted_adapters(model)) == ["alpha"] and state.names() == ["alpha"]
    assert admin_api.unmount(state, "/v1/adapters/beta")[0] == 404

    # without an adapter root, runtime (un)mounting is off
    closed = ServedAdapters({}, None, config.base_ids)
    assert admin_api.mount(closed, {"name": "beta", "path": "beta"})[0] == 404
    assert admin_api.unmount(closed, "/v1/adapters/alpha")[0] == 404


def test_serving_config_errors_name_the_field(tmp_path):
    flag = lambda f: "--optiq-" + f.replace("_", "-")
    for kwargs, field, detail in [
        ({"adapter": ["alpha"]}, "adapter", "'alpha': expected NAME=PATH"),
        ({"adapter": ["a=x", "a=y"]}, "adapter", "the name 'a' is given twice"),
        ({"adapter": ["default_model=x"]}, "adapter", "'default_model' is reserved for the base model"),
        ({"adapter": ["m=x"], "model": "m"}, "adapter", "m=...: the name collides with the base model id"),
        ({"adapter_root": tmp_path / "missing"}, "adapter_root", "not a directory"),
    ]:
        with pytest.raises(ConfigError) as e:
            AdapterServingConfig(**kwargs)
        assert e.value.field == field and detail in e.value.render(flag), (kwargs, str(e.value))
        assert e.value.render(flag).startswith(flag(field))
    assert not AdapterServingConfig().enabled and start_serving(AdapterServingConfig()) is None
    with pytest.raises(ConfigError, match="adapter: x=.*no such directory"):
        start_serving(AdapterServingConfig(adapter=[f"x={tmp_path / 'missing'}"]))
    # adapters are served on the server's own model: without one, runtime mounts were accepted unchecked
    with pytest.raises(ConfigError, match="adapter_root: serving adapters needs the server's base model"):
        start_serving(AdapterServingConfig(adapter_root=tmp_path))
    with pytest.raises(ConfigError, match="adapter_root: cannot read the base model .*missing-model"):
        start_serving(AdapterServingConfig(adapter_root=tmp_path, model=str(tmp_path / "missing-model")))


# ---------------------------------------------------------------------------
# Server (a real `mlx_lm.server` subprocess with MLX_LM_OPTIQ=1)


def _http(port, method, path, body=None, timeout=120):
    return request_json(port, method, path, body, timeout=timeout)


def _complete_tokens(port, model, prompt, n=6):
    """Greedy completion as (token ids, each token's log-probability)."""
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": True}
    status, out = _http(port, "POST", "/v1/completions", body)
    assert status == 200, out
    content = out["choices"][0]["logprobs"]["content"]
    return [c["id"] for c in content], [c["logprob"] for c in content]


def _complete(port, model, prompt, n=6, **extra):
    status, out = _http(
        port, "POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, **extra}
    )
    assert status == 200, out
    return out["choices"][0]["text"]


@pytest.fixture(scope="module")
def server(tiny_float_path, random_adapters, trained_adapter, trained_adapter_2, adapter_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, MLX_LM_OPTIQ="1", PYTHONUNBUFFERED="1")
    flags = [
        "--log-level",
        "DEBUG",
        "--optiq-adapter",
        f"alpha={random_adapters['alpha']}",
        "--optiq-adapter",
        f"beta={random_adapters['beta']}",
        "--optiq-adapter",
        f"trained={trained_adapter}",
        "--optiq-adapter",
        f"trained2={trained_adapter_2}",
        "--optiq-adapter-root",
        str(adapter_dir),
    ]
    with ServerProcess(tiny_float_path, *flags, env=env, log_path=log, command=MLX_LM_SERVER_SCRIPT) as proc:
        yield {"port": proc.port, "log": log, "base": str(tiny_float_path.resolve())}


@pytest.fixture(scope="module")
def expected_text(tiny_float_path, random_adapters, trained_adapter, trained_adapter_2):
    """Greedy continuations from stock mlx-lm with each adapter loaded the stock way."""
    from mlx_lm import generate

    paths = {None: None, "trained": trained_adapter, "trained2": trained_adapter_2, **random_adapters}
    models, texts = {}, {}

    def model(name):
        if name not in models:
            models[name] = _fresh(tiny_float_path, paths[name])
        return models[name]

    def get(name, prompt, n=6):
        if (name, prompt, n) not in texts:
            texts[(name, prompt, n)] = generate(*model(name), prompt, max_tokens=n)
        return texts[(name, prompt, n)]

    get.model = model  # (model, tokenizer) with the adapter loaded the stock way
    return get


def test_server_openai_client_selects_adapters_by_model(server, expected_text):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="unused")
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == server["base"] and set(ids[1:]) >= {"alpha", "beta", "trained", "trained2"}
    for name in ["alpha", "trained", None, "beta"]:
        out = client.completions.create(model=name or server["base"], prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert out.choices[0].text == expected_text(name, PROMPTS[0]), name
        assert out.model == (name or server["base"])
    # the mlx-lm `adapters` field selects too
    out = client.completions.create(
        model=server["base"], prompt=PROMPTS[1], max_tokens=6, temperature=0, extra_body={"adapters": "beta"}
    )
    assert out.choices[0].text == expected_text("beta", PROMPTS[1])
    chat = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert chat.model == "alpha" and chat.choices[0].message.content is not None

    with pytest.raises(openai.NotFoundError, match=r"unknown model or adapter 'nope'; mounted adapters: \[.*'alpha'"):
        client.completions.create(model="nope", prompt=PROMPTS[0], max_tokens=2)
    status, body = _http(
        server["port"],
        "POST",
        "/v1/completions",
        {"model": server["base"], "adapters": "nope", "prompt": "x", "max_tokens": 2},
    )
    assert status == 404 and "alpha" in body["error"]["mounted_adapters"]


def test_server_mixed_adapters_share_a_batch_without_cross_talk(server, expected_text):
    port = server["port"]
    jobs = [
        ("alpha", PROMPTS[0]),
        ("beta", PROMPTS[0]),
        ("trained", PROMPTS[0]),
        ("trained2", PROMPTS[0]),
        (None, PROMPTS[0]),
        ("alpha", PROMPTS[1]),
        ("beta", PROMPTS[2]),
        ("trained", PROMPTS[1]),
        ("trained2", PROMPTS[2]),
        (None, PROMPTS[2]),
    ]
    # solo, one at a time; the same prompt for every adapter also checks that
    # prompt-cache entries are never reused across adapters
    solo = [_complete(port, name or server["base"], prompt, n=8) for name, prompt in jobs]
    for (name, prompt), text in zip(jobs[:5], solo[:5]):
        assert text == expected_text(name, prompt, 8), name
    assert len(set(solo[:5])) == 5

    log_start = server["log"].stat().st_size
    results = [None] * len(jobs)

    def run(i):
        name, prompt = jobs[i]
        results[i] = _complete_tokens(port, name or server["base"], prompt, n=8)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    # each concurrent request computes what its adapter alone computes (stock mlx-lm, the
    # adapter loaded the stock way, replayed on the served tokens), up to the noise another
    # batch shape brings (tests.helpers): a row given another row's adapter fails by O(1)
    for (name, prompt), result in zip(jobs, results):
        assert result is not None, (name, prompt)
        tokens, token_logprobs = result
        model, tok = expected_text.model(name)
        solo_lp = replay_solo_logprobs(model, tok.encode(prompt), tokens)
        assert_greedy_matches_solo(
            tokens, solo_lp, token_logprobs=token_logprobs, noise=FLOAT_NOISE, label=f"{name} {prompt!r}"
        )
    with open(server["log"]) as f:
        f.seek(log_start)
        log = f.read()
    mixed = [line for line in log.splitlines() if "GenerationBatch step" in line]
    assert mixed, "requests for different adapters were not decoded in one batch"
    assert max(line.count("'") for line in mixed) >= 6  # at least three distinct names in one step


def test_server_runtime_mount_is_confined_to_the_root(server, expected_text, adapter_dir, tmp_path_factory):
    port = server["port"]
    outside = tmp_path_factory.mktemp("outside")
    (adapter_dir / "escape").symlink_to(outside, target_is_directory=True)
    for bad in ["../" + outside.name, str(outside), "escape"]:
        status, body = _http(port, "POST", "/v1/adapters", {"name": "x", "path": bad})
        assert status == 403, (bad, body)
    broken = adapter_dir / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 4, "scale": 2.0}}))
    (broken / "adapters.safetensors").write_bytes(b"not a safetensors file")

    # a request in flight on "alpha" while the malformed adapter is refused
    in_flight = {}
    t = threading.Thread(target=lambda: in_flight.update(text=_complete(port, "alpha", PROMPTS[2], n=24)))
    t.start()
    status, body = _http(port, "POST", "/v1/adapters", {"name": "broken", "path": "broken"})
    assert status == 400 and "adapters.safetensors" in body["error"]["message"]
    t.join(timeout=300)
    assert in_flight["text"] == expected_text("alpha", PROMPTS[2], 24)
    assert "broken" not in [m["id"] for m in _http(port, "GET", "/v1/models")[1]["data"]]

    status, body = _http(port, "POST", "/v1/adapters", {"name": "gamma", "path": "gamma"})
    assert status == 200, body
    assert _complete(port, "gamma", PROMPTS[0]) == expected_text("gamma", PROMPTS[0])
    assert _complete(port, "alpha", PROMPTS[0]) == expected_text("alpha", PROMPTS[0])
    assert _http(port, "POST", "/v1/adapters", {"name": "gamma", "path": "gamma"})[0] == 409
    assert _http(port, "DELETE", "/v1/adapters/gamma")[0] == 200
    status, body = _http(port, "POST", "/v1/completions", {"model": "gamma", "prompt": "x", "max_tokens": 2})
    assert status == 404 and "gamma" not in body["error"]["mounted_adapters"]
    assert _http(port, "DELETE", "/v1/adapters/gamma")[0] == 404
