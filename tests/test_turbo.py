"""TurboQuant KV cache: codebooks, distortion/unbiasedness bounds, packing, attention, real-model generation."""

import math
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_optiq.kv import turbo

MSE_BOUND = math.sqrt(3) * math.pi / 2  # paper, Thm 1: D_mse <= (sqrt(3) pi / 2) 4^-b for unit vectors
# D_mse for b = 1..4 in the large-d (Gaussian) limit: Max (1960)'s Lloyd-Max errors, which the paper
# quotes rounded as 0.36, 0.117, 0.03, 0.009
GAUSSIAN_LIMIT_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.fixture
def attention_patched():
    from mlx_lm_optiq.hooks.turbo import patch_attention, unpatch_attention

    patch_attention()
    yield
    unpatch_attention()


# ---------------------------------------------------------------- codebooks
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_is_lloyd_max_for_the_rotated_coordinate_law(bits):
    from scipy import integrate
    from scipy.special import beta

    d = 64
    c = turbo.compute_codebook(d, bits)
    assert c.shape == (2**bits,) and np.all(np.diff(c) > 0)
    np.testing.assert_allclose(c, -c[::-1], atol=1e-15)

    def f(t):
        return (1 - t * t) ** ((d - 3) / 2) / beta(0.5, (d - 1) / 2)

    # Lloyd-Max optimality: every centroid is the conditional mean of its cell (checked by quadrature)
    edges = np.concatenate([[-1.0], (c[1:] + c[:-1]) / 2, [1.0]])
    for i in range(len(c)):
        mass = integrate.quad(f, edges[i], edges[i + 1], epsabs=1e-14)[0]
        mean = integrate.quad(lambda t: t * f(t), edges[i], edges[i + 1], epsabs=1e-14)[0] / mass
        assert mean == pytest.approx(c[i], rel=1e-6, abs=1e-9)
    mse = (
        d * integrate.quad(lambda t: min((t - x) ** 2 for x in c) * f(t), -1, 1, points=list(edges[1:-1]), limit=200)[0]
    )
    assert turbo.codebook_mse(d, c) * d == pytest.approx(mse, rel=1e-6)
    # the paper's numbers (Gaussian limit) and its bounds
    assert mse == pytest.approx(GAUSSIAN_LIMIT_MSE[bits], rel=0.05)
    assert 4.0**-bits < mse < MSE_BOUND * 4.0**-bits


def test_shipped_codebooks_are_fresh():
    for key in ("64:2", "64:3", "64:4", "128:4", "80:3"):
        dim, bits = map(int, key.split(":"))
        np.testing.assert_allclose(turbo._shipped_codebooks()[key], turbo.compute_codebook(dim, bits), rtol=1e-7)
    assert turbo.codebook(64, 4) is turbo.codebook(64, 4)  # memoised


def test_codebook_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="bits must be one of"):
        turbo.compute_codebook(64, 7)
    with pytest.raises(ValueError, match="head_dim >= 3"):
        turbo.compute_codebook(2, 2)
    bad = tmp_path / "books.json"
    from mlx_lm_optiq.core.jsonio import OptiqFileError, write_json

    write_json(bad, {"codebooks": {"64:2": [0.3, 0.1, 0.2, 0.4]}}, kind=turbo.CODEBOOK_KIND)
    monkeypatch.setattr(turbo, "CODEBOOK_FILE", bad)
    turbo._shipped_codebooks.cache_clear()
    turbo.codebook.cache_clear()
    try:
        with pytest.raises(OptiqFileError, match=r"books.json: codebook '64:2' must be 4 increasing"):
            turbo.codebook(64, 2)
    finally:
        monkeypatch.undo()
        turbo._shipped_codebooks.cache_clear()
        turbo.codebook.cache_clear()


# ---------------------------------------------------------------- rotation and packing
@pytest.mark.parametrize("dim", [64, 128, 80])
def test_rotation_is_orthogonal_and_seeded(dim):
    r = turbo.rotation_matrix(dim, 5).astype(np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(dim), atol=1e-5)
    assert not np.allclose(r, turbo.rotation_matrix(dim, 6))
    assert np.array_equal(r, turbo.rotation_matrix.__wrapped__(dim, 5))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6])
def test_pack_unpack_roundtrip_uses_exactly_bits(bits):
    codes = mx.random.randint(0, 2**bits, (2, 3, 7, 64), key=mx.random.key(bits)).astype(mx.uint8)
    planes = turbo.pack_codes(codes, bits)
    assert sum(p.shape[-1] for p in planes) * 8 == 64 * bits
    assert mx.array_equal(turbo.unpack_codes(planes, bits), codes).item()
    with pytest.raises(ValueError, match="head_dim 60 must be a multiple of 8"):
        turbo.pack_codes(codes[..., :60], 3)


# ---------------------------------------------------------------- distortion / unbiasedness
def _rel_mse(q, x):
    xh = q.dequantize(q.quantize(x))
    return (mx.sum((x - xh) ** 2, -1) / mx.sum(x * x, -1)).mean().item()


@pytest.mark.parametrize("dim", [64, 128, 96])
def test_mse_distortion_within_paper_bounds(dim):
    x = mx.random.normal((2048, dim), key=mx.random.key(dim)) * 3.0
    basis = mx.eye(dim) * 7.0  # one-hot "outlier channel" vectors: the hard case for a single Hadamard round
    for bits in (1, 2, 3, 4):
        q = turbo.TurboQuantizer(dim, bits, seed=11)
        # Shannon's lower bound 4^-b holds on average over directions, the paper's upper bound for every x
        mse = _rel_mse(q, x)
        assert 4.0**-bits < mse < MSE_BOUND * 4.0**-bits, (dim, bits, mse)
        assert _rel_mse(q, basis) < MSE_BOUND * 4.0**-bits, (dim, bits)


def test_mse_distortion_on_real_keys_and_values(tiny_q4_path, austen):
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = load(str(tiny_q4_path))
    cache = make_prompt_cache(model)
    ids = mx.array(tok.encode(austen("emma")[5000:8000])[:256])[None]
    model.model(ids, cache=cache)  # fills the caches; skips the (slow on CPU) quantized lm_head
    for layer in (0, 3):
        for x in (cache[layer].keys, cache[layer].values):
            x = x[..., : cache[layer].offset, :].reshape(-1, x.shape[-1]).astype(mx.float32)
            for bits in (2, 3, 4):
                mse = _rel_mse(turbo.TurboQuantizer(x.shape[-1], bits, seed=layer), x)
                assert mse < MSE_BOUND * 4.0**-bits, (layer, bits, mse)


def test_fractional_bits_split_channels():
    """3.5 bits on d=64: 32 rotated coordinates at 4 bits, 32 at 3; the MSE is the mean of the two widths'."""
    x = mx.random.normal((4096, 64), key=mx.random.key(9))
    q = turbo.TurboQuantizer(64, 3.5, seed=1)
    assert q.segments == ((32, 4), (32, 3)) and q.bits_per_channel() == 3.75
    packed = q.quantize(x)
    assert sum(p.shape[-1] for p in packed["codes"]) * 8 == 64 * 3.5
    mse = {b: _rel_mse(turbo.TurboQuantizer(64, b, seed=1), x) for b in (3, 3.5, 4)}
    assert mse[4] < mse[3.5] < mse[3]
    assert mse[3.5] == pytest.approx((mse[3] + mse[4]) / 2, rel=0.05)


def test_prod_inner_products_unbiased_and_mse_biased():
    dim, trials = 64, 256
    rng = np.random.default_rng(0)
    x = rng.standard_normal(dim)
    x /= np.linalg.norm(x)
    y = 0.6 * x + 0.8 * rng.standard_normal(dim) / math.sqrt(dim)
    true = float(x @ y)
    xs, ys = mx.array(x[None].astype(np.float32)), mx.array(y.astype(np.float32))
    for bits in (2, 3):
        est_prod = np.array(
            [
                (
                    turbo.TurboQuantizer(dim, bits, seed=s, mode="prod").dequantize(
                        turbo.TurboQuantizer(dim, bits, seed=s, mode="prod").quantize(xs)
                    )
                    @ ys
                ).item()
                for s in range(trials)
            ]
        )
        # unbiased: the mean is within 4 standard errors of <x, y>
        se = est_prod.std() / math.sqrt(trials)
        assert abs(est_prod.mean() - true) < 4 * se + 1e-3, (bits, est_prod.mean(), true, se)
        # Theorem 2: Var <= sqrt(3) pi^2 |y|^2 / d * 4^-b
        assert np.mean((est_prod - true) ** 2) < math.sqrt(3) * math.pi**2 * float(y @ y) / dim * 4.0**-bits
    # 1-bit mse codes shrink inner products by ~2/pi: the bias "prod" removes
    est_mse = np.array(
        [
            (
                turbo.TurboQuantizer(dim, 1, seed=s).dequantize(turbo.TurboQuantizer(dim, 1, seed=s).quantize(xs)) @ ys
            ).item()
            for s in range(trials)
        ]
    )
    assert est_mse.mean() / true == pytest.approx(2 / math.pi, rel=0.08)


# ---------------------------------------------------------------- the cache and attention
def _reference_attention(q, cache, kv, scale, mask):
    keys = cache.key_quantizer.dequantize(kv.keys)
    values = cache.value_quantizer.dequantize(kv.values)
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)


@pytest.mark.parametrize("key_mode,bits", [("mse", 3), ("prod", 3), ("mse", 2), ("mse", 2.5), ("prod", 3.5)])
def test_rotated_space_attention_equals_dequantized_attention(attention_patched, key_mode, bits):
    from mlx_lm.models.base import scaled_dot_product_attention as sdpa

    B, Hq, Hkv, D, scale = 2, 9, 3, 64, 0.125
    key = mx.random.key(1)
    cache = turbo.TurboQuantKVCache(head_dim=D, bits=bits, seed=4, key_mode=key_mode)
    # prefill across the 256-token growth step, with every mask form models pass
    lengths = [200, 70, 1, 1]
    for n in lengths:
        k1, k2, k3, key = mx.random.split(key, 4)
        k, v = mx.random.normal((B, Hkv, n, D), key=k1), mx.random.normal((B, Hkv, n, D), key=k2)
        q = mx.random.normal((B, Hq, n, D), key=k3)
        keys, values = cache.update_and_fetch(k, v)
        assert keys is values and isinstance(keys, turbo.TurboKV)
        masks = ["causal", None] if n > 1 else [None]
        if n > 1:
            causal = mx.arange(cache.offset - n, cache.offset)[:, None] >= mx.arange(cache.offset)[None]
            masks += [causal, mx.where(causal, 0.0, -1e9)[None, None].astype(mx.float32)]
        for mask in masks:
            out = sdpa(q, keys, values, cache=cache, scale=scale, mask=mask)
            ref = _reference_attention(q, cache, keys, scale, mask)
            assert out.shape == (B, Hq, n, D)
            assert mx.abs(out - ref).max().item() < 1e-4
    assert cache.offset == sum(lengths) and cache.size() == cache.offset
    # trimming and further updates keep the earlier codes
    before = [a[:, :, :200] for a in turbo._leaves(keys.keys)]
    assert cache.trim(5) == 5 and cache.offset == sum(lengths) - 5
    keys, _ = cache.update_and_fetch(mx.zeros((B, Hkv, 1, D)), mx.zeros((B, Hkv, 1, D)))
    assert cache.offset == sum(lengths) - 4
    for a, b in zip(turbo._leaves(keys.keys), before):
        assert mx.array_equal(a[:, :, :200], b).item()


@pytest.mark.parametrize("bits", [3, 2.5])
def test_compiled_graphs_match_plain_ones(attention_patched, monkeypatch, bits):
    """GPUs run mx.compile'd quantize/attention graphs; they must equal the plain ops used on CPU."""
    B, Hq, Hkv, D = 1, 4, 2, 64
    k, v, q = (
        mx.random.normal(s, key=mx.random.key(i)) for i, s in enumerate([(B, Hkv, 9, D), (B, Hkv, 9, D), (B, Hq, 1, D)])
    )
    outs = []
    for compiled in (False, True):
        monkeypatch.setattr(turbo, "COMPILE_ON_CPU", compiled)
        cache = turbo.TurboQuantKVCache(head_dim=D, bits=bits, seed=2)
        kv, _ = cache.update_and_fetch(k, v)
        outs.append((turbo.turbo_scaled_dot_product_attention(q, kv, 0.125, None), kv.keys))
    (plain, plain_keys), (comp, comp_keys) = outs
    for a, b in zip(turbo._leaves(plain_keys), turbo._leaves(comp_keys)):
        assert mx.array_equal(a, b).item()
    assert mx.abs(plain - comp).max().item() < 1e-5


def test_cache_memory_and_bits(attention_patched):
    cache = turbo.TurboQuantKVCache(head_dim=64, bits=3, seed=0)
    cache.update_and_fetch(mx.ones((1, 3, 256, 64)), mx.ones((1, 3, 256, 64)))
    # 3 bits per coordinate + one fp16 norm per 64-dim vector, for keys and values
    assert cache.nbytes == 2 * 3 * 256 * (64 * 3 // 8 + 2)
    assert cache.bits_per_channel() == pytest.approx(3 + 16 / 64)
    assert turbo.affine_bits_per_channel(3, 64) == 3.5
    prod = turbo.TurboQuantKVCache(head_dim=64, bits=3, key_mode="prod")
    assert prod.bits_per_channel() == pytest.approx(3 + (32 + 16) / 2 / 64)


def test_cache_bad_inputs(attention_patched):
    with pytest.raises(ValueError, match=r"key_bits must be a number of bits in \[1, 6\]"):
        turbo.TurboQuantKVCache(head_dim=64, bits=0)
    with pytest.raises(ValueError, match="value_bits must be a number of bits"):
        turbo.TurboQuantKVCache(head_dim=64, bits=3, value_bits=9)
    with pytest.raises(ValueError, match="key_bits must be a number of bits"):
        turbo.TurboQuantKVCache(head_dim=64, bits="3")
    with pytest.raises(ValueError, match="bits 3.3 on head_dim 64: the fractional part must put a multiple of 8"):
        turbo.TurboQuantKVCache(head_dim=64, bits=3.3)
    with pytest.raises(ValueError, match="key_mode must be one of"):
        turbo.TurboQuantKVCache(head_dim=64, key_mode="qjl")
    with pytest.raises(ValueError, match="seed must be an int"):
        turbo.TurboQuantKVCache(head_dim=64, seed=None)
    cache = turbo.TurboQuantKVCache(head_dim=64, bits=3)
    with pytest.raises(ValueError, match="built for key/value head_dim 64/64, got 128/128"):
        cache.update_and_fetch(mx.ones((1, 1, 2, 128)), mx.ones((1, 1, 2, 128)))
    cache = turbo.TurboQuantKVCache(head_dim=64, bits=3)
    kv, _ = cache.update_and_fetch(mx.ones((1, 1, 2, 64)), mx.ones((1, 1, 2, 64)))
    with pytest.raises(ValueError, match="does not support attention sinks"):
        turbo.turbo_scaled_dot_product_attention(mx.ones((1, 1, 2, 64)), kv, 1.0, None, sinks=mx.zeros((1,)))


def test_patch_is_undone_exactly_and_cache_refuses_unpatched_attention():
    import mlx_lm.models.base as base
    import mlx_lm.models.llama as llama

    import mlx_lm_optiq
    from mlx_lm_optiq.hooks.turbo import patch_attention, unpatch_attention

    original = base.scaled_dot_product_attention
    assert llama.scaled_dot_product_attention is original
    with pytest.raises(RuntimeError, match="patch_attention"):
        turbo.TurboQuantKVCache(head_dim=64).update_and_fetch(mx.ones((1, 1, 1, 64)), mx.ones((1, 1, 1, 64)))
    patch_attention()
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention is not original
    unpatch_attention()
    assert llama.scaled_dot_product_attention is original and base.scaled_dot_product_attention is original
    assert not turbo.attention_patched()
    # the package switch installs the same dispatch and disable() removes it
    mlx_lm_optiq.enable()
    try:
        assert ("mlx_lm.models.base", "scaled_dot_product_attention") in mlx_lm_optiq.enabled_patches()
        assert llama.scaled_dot_product_attention is not original and turbo.attention_patched()
        if "mlx_lm.models.qwen3" in sys.modules:
            del sys.modules["mlx_lm.models.qwen3"]
        import mlx_lm.models.qwen3 as qwen3  # imported while enabled: binds the wrapper

        assert qwen3.scaled_dot_product_attention is base.scaled_dot_product_attention
    finally:
        mlx_lm_optiq.disable()
    assert llama.scaled_dot_product_attention is original and base.scaled_dot_product_attention is original
    assert qwen3.scaled_dot_product_attention is original
    assert not turbo.attention_patched()


# ---------------------------------------------------------------- real model
def _kl(ref_lp, lp):
    return (mx.exp(ref_lp) * (ref_lp - lp)).sum(-1).mean().item()


def _logprobs(model, ids, caches):
    out = []
    for s in range(0, ids.shape[1], 64):  # prefill chunks, then the attention sees cached codes
        logits = model(ids[:, s : s + 64], cache=caches).astype(mx.float32)
        out.append(logits - mx.logsumexp(logits, -1, keepdims=True))
    return mx.concatenate(out, axis=1)


def test_real_model_quality_and_generation(attention_patched, tiny_q4_path, austen):
    from mlx.utils import tree_map
    from mlx_lm import generate, load
    from mlx_lm.models.cache import KVCache, QuantizedKVCache
    from mlx_lm.utils import dequantize_model

    model, tok = load(str(tiny_q4_path))
    # generation through mlx-lm's own generate(), real quantized weights, turbo cache on every layer
    cache = turbo.make_turbo_prompt_cache(model, bits=3, seed=0)
    assert all(isinstance(c, turbo.TurboQuantKVCache) for c in cache)
    prompt = tok.encode("It was the best of times, it was the worst of times,")
    text = generate(model, tok, prompt=prompt, max_tokens=8, prompt_cache=cache)
    assert isinstance(text, str) and len(text) > 0
    # decode steps went through the cache (generate_step runs one step ahead of what it yields)
    assert len(prompt) + 7 <= cache[0].offset <= len(prompt) + 8

    # quality on real keys/values (fp32 float reference): turbo beats affine at fewer bits per channel
    model = dequantize_model(model)
    model.update(tree_map(lambda a: a.astype(mx.float32), model.parameters()))
    ids = mx.array(tok.encode(austen("persuasion")[20000:26000])[:192])[None]
    n = len(model.layers)
    ref = _logprobs(model, ids, [KVCache() for _ in range(n)])
    kl = {}
    for bits in (2, 3, 4):
        kl[f"turbo{bits}"] = _kl(ref, _logprobs(model, ids, turbo.make_turbo_prompt_cache(model, bits=bits)))
        kl[f"affine{bits}"] = _kl(ref, _logprobs(model, ids, [QuantizedKVCache(64, bits) for _ in range(n)]))
    for bits in (2, 3, 4):
        assert kl[f"turbo{bits}"] < kl[f"affine{bits}"], kl
    assert kl["turbo4"] < kl["turbo3"] < kl["turbo2"], kl


def test_kv_config_turbo_scheme_builds_turbo_caches(attention_patched, tiny_q4_path):
    from mlx_lm import load

    from mlx_lm_optiq.kv.apply import make_plan_cache
    from mlx_lm_optiq.kv.plan_file import plan_from_dict

    model, tok = load(str(tiny_q4_path))
    n = len(model.layers)
    plan = plan_from_dict(
        {
            "layers": [
                {"layer": i, "cache_slot": i, "scheme": "turbo" if i % 2 else "none", "k_bits": 3, "v_bits": 3}
                for i in range(n)
            ]
        }
    )
    caches = make_plan_cache(model, plan)
    assert [type(c).__name__ for c in caches] == ["KVCache", "TurboQuantKVCache"] * (n // 2)
    assert caches[1].key_bits == 3 and caches[1].seed != caches[3].seed
    logits = model(mx.array(tok.encode("Hello there, how are you?"))[None], cache=caches)
    assert caches[1].offset == caches[0].offset > 0 and bool(mx.isfinite(logits).all())


def test_turbo_slots_waiting_for_quantized_kv_start_are_not_batchable(attention_patched, tiny_q4_path):
    """mlx-lm's server batches a prompt cache when every slot has `merge`; a turbo slot still in
    float (before quantized_kv_start) must not pass, or merging would keep it float for good."""
    from mlx_lm import load

    from mlx_lm_optiq.kv.apply import make_plan_cache, promote_pending
    from mlx_lm_optiq.kv.plan_file import plan_from_dict

    model, tok = load(str(tiny_q4_path))
    n = len(model.layers)
    plan = plan_from_dict(
        {
            "quantized_kv_start": 4,
            "layers": [
                {"layer": i, "cache_slot": i, "scheme": "turbo" if i == 1 else "none", "k_bits": 3, "v_bits": 3}
                for i in range(n)
            ],
        }
    )
    caches = make_plan_cache(model, plan)
    assert type(caches[1]).__name__ == "PendingKVCache"
    assert not all(hasattr(c, "merge") for c in caches)  # the server's batchability test
    with pytest.raises(AttributeError, match="turbo K3/V3 cannot be batched"):
        caches[1].merge([caches[1]])
    model(mx.array(tok.encode("Hello there, how are you?"))[None], cache=caches)
    promote_pending(caches)
    assert type(caches[1]).__name__ == "TurboQuantKVCache" and caches[1].offset == caches[0].offset


def test_pth_route_serves_turbo_caches_and_deepcopies(tiny_q4_path, optiq_env):
    """MLX_LM_OPTIQ=1 (the route mlx_lm.server takes) installs the dispatch; prompt-cache copies stay independent."""
    import subprocess

    code = (
        "import copy, mlx_lm, mlx_lm.models.llama as llama\n"
        "from mlx_lm import load, generate\n"
        "from mlx_lm_optiq.kv.turbo import make_turbo_prompt_cache\n"
        "assert hasattr(llama.scaled_dot_product_attention, '__wrapped__')\n"
        f"model, tok = load({str(tiny_q4_path)!r})\n"
        "cache = make_turbo_prompt_cache(model, bits=2)\n"
        "generate(model, tok, prompt='Once upon a time', max_tokens=3, prompt_cache=cache)\n"
        "copied = copy.deepcopy(cache)\n"  # what LRUPromptCache.fetch_nearest_cache hands out
        "generate(model, tok, prompt=' there', max_tokens=2, prompt_cache=copied)\n"
        "assert copied[0].offset > cache[0].offset > 0, (copied[0].offset, cache[0].offset)\n"
        "print('ok', type(cache[0]).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=optiq_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok TurboQuantKVCache")


class _DequantizedReferenceCache:
    """Stock KVCache holding the dequantized TurboQuant codes: stock attention on what turbo stores."""

    def __init__(self, turbo_cache):
        from mlx_lm.models.cache import KVCache

        self.turbo, self.inner = turbo_cache, KVCache()

    def update_and_fetch(self, keys, values):
        t = self.turbo
        if t.key_quantizer is None:
            t._make_quantizers(keys.shape[-1], values.shape[-1])
        kh = t.key_quantizer.dequantize(t.key_quantizer.quantize(keys), keys.dtype)
        vh = t.value_quantizer.dequantize(t.value_quantizer.quantize(values), values.dtype)
        return self.inner.update_and_fetch(kh, vh)

    def __getattr__(self, name):  # offset, make_mask, ... from the stock cache
        return getattr(self.inner, name)


def _qwen3_random():
    from mlx_lm.models import qwen3

    args = qwen3.ModelArgs.from_dict(
        dict(
            model_type="qwen3",
            hidden_size=256,
            num_hidden_layers=2,
            intermediate_size=512,
            num_attention_heads=8,
            rms_norm_eps=1e-6,
            vocab_size=512,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            head_dim=128,
            tie_word_embeddings=True,
            rope_theta=1e6,
        )
    )
    mx.random.seed(0)
    model = qwen3.Model(args)
    mx.eval(model.parameters())
    return model, list(range(3, 90))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_logits_equal_stock_attention_on_dequantized_codes(attention_patched, tiny_q4_path, arch):
    """Whole model, prefill chunks + decode: turbo's rotated-space attention == stock SDPA on dequantized K/V.

    llama: the real 4-layer SmolLM2 (head_dim 64, 9/3 heads); qwen3: random weights, head_dim 128, q/k norms.
    """
    from mlx_lm import load

    if arch == "llama":
        model, tok = load(str(tiny_q4_path))
        ids = tok.encode("Captain Wentworth had no fortune. He had been lucky in his profession, but")
    else:
        model, ids = _qwen3_random()
    ids = mx.array(ids)[None]
    n = len(model.layers)
    turbo_caches = turbo.make_turbo_prompt_cache(model, bits=3, seed=7)
    ref_caches = [_DequantizedReferenceCache(turbo.TurboQuantKVCache(bits=3, seed=7 + 2 * i)) for i in range(n)]
    half = ids.shape[1] // 2
    for piece in (ids[:, :half], ids[:, half:-3], ids[:, -3:-2], ids[:, -2:-1], ids[:, -1:]):
        a = model(piece, cache=turbo_caches).astype(mx.float32)
        b = model(piece, cache=ref_caches).astype(mx.float32)
        assert mx.abs(a - b).max().item() < 2e-3 * max(1.0, mx.abs(b).max().item())
    assert turbo_caches[0].offset == ids.shape[1]
