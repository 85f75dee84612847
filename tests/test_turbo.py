"""TurboQuant KV cache: codebooks, distortion/unbiasedness bounds, packing and byte lookups, attention,
batching (merge/extract/filter/extend; BatchGenerator == single requests), real-model generation."""

import math
import re
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_optiq.kv import turbo
from tests.helpers import optiq

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
    before = keys.keys[:, :, :200]
    assert cache.trim(5) == 5 and cache.offset == sum(lengths) - 5
    keys, _ = cache.update_and_fetch(mx.zeros((B, Hkv, 1, D)), mx.zeros((B, Hkv, 1, D)))
    assert cache.offset == sum(lengths) - 4
    assert mx.array_equal(keys.keys[:, :, :200], before).item()


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
    assert mx.array_equal(plain_keys, comp_keys).item()
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


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 2.5, 3.5])
def test_packed_rows_and_byte_lookups_read_back_the_codes(bits):
    """pack() stores quantize()'s fields in one uint8 row per vector; the byte-lookup tables give
    exactly the centroids of the codes (what unpacking each code and indexing the codebook gives),
    for float32 and 16-bit activations."""
    mode = "prod" if bits in (3, 3.5) else "mse"
    q = turbo.TurboQuantizer(64, bits, seed=3, mode=mode)
    x = mx.random.normal((2, 3, 17, 64), key=mx.random.key(int(bits * 2)))
    fields, packed = q.quantize(x), q.pack(x)
    assert packed.dtype == mx.uint8 and packed.shape == (2, 3, 17, q.width)
    # codes + fp16 norm (+ 1-bit QJL signs and the fp16 residual norm: "prod" codes use bits - 1)
    assert q.width * 8 == (64 * bits + 16 if mode == "mse" else 64 * (bits - 1) + 16 + 64 + 16)
    back = q.unpack(packed)
    for key in fields:
        got, want = back[key], fields[key]
        for a, b in zip(got if isinstance(got, list) else [got], want if isinstance(want, list) else [want]):
            assert mx.array_equal(a, b).item(), key
    i = 0
    expected = []
    for (_, b), c in zip(q.segments, q.centroids):
        n = len(turbo._planes(b))
        expected.append(c[turbo.unpack_codes(fields["codes"][i : i + n], b)])
        i += n
    expected = mx.concatenate(expected, axis=-1)
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        assert mx.array_equal(q.rotated_unit(back, dtype), expected.astype(dtype)).item(), dtype
    if mode == "prod":
        signs = turbo.unpack_codes(fields["qjl"], 1).astype(mx.float32) * 2 - 1
        assert mx.array_equal(q.qjl_signs(back), signs).item()
    assert mx.array_equal(q.dequantize(packed), q.dequantize(fields)).item()
    with pytest.raises(ValueError, match=f"uint8 rows of {q.width} bytes, got uint8 rows of 5"):
        q.unpack(packed[..., :5])


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
    with pytest.raises(ValueError, match="quantized_kv_start must be an int >= 0, got -1"):
        turbo.TurboQuantKVCache(head_dim=64, quantized_kv_start=-1)
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
    with optiq():
        assert ("mlx_lm.models.base", "scaled_dot_product_attention") in mlx_lm_optiq.enabled_patches()
        assert llama.scaled_dot_product_attention is not original and turbo.attention_patched()
        if "mlx_lm.models.qwen3" in sys.modules:
            del sys.modules["mlx_lm.models.qwen3"]
        import mlx_lm.models.qwen3 as qwen3  # imported while enabled: binds the wrapper

        assert qwen3.scaled_dot_product_attention is base.scaled_dot_product_attention
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
                {
                    "layer": i,
                    "cache_slot": i,
                    **({"scheme": "turbo", "k_bits": 3, "v_bits": 3} if i % 2 else {"scheme": "none"}),
                }
                for i in range(n)
            ]
        }
    )
    caches = make_plan_cache(model, plan)
    assert [type(c).__name__ for c in caches] == ["KVCache", "TurboQuantKVCache"] * (n // 2)
    assert caches[1].key_bits == 3 and caches[1].seed != caches[3].seed
    logits = model(mx.array(tok.encode("Hello there, how are you?"))[None], cache=caches)
    assert caches[1].offset == caches[0].offset > 0 and bool(mx.isfinite(logits).all())


def _plan(n_layers, schemes, quantized_kv_start=0):
    from mlx_lm_optiq.kv.plan_file import plan_from_dict

    return plan_from_dict(
        {
            "quantized_kv_start": quantized_kv_start,
            "layers": [{"layer": i, "cache_slot": i, **schemes.get(i, {"scheme": "none"})} for i in range(n_layers)],
        }
    )


def test_turbo_slots_stay_float_until_quantized_kv_start_and_are_batchable(attention_patched, tiny_q4_path):
    """A plan's quantized_kv_start is applied inside the turbo cache (float until it holds that
    many tokens), so the slot has `merge` from the start: mlx-lm's server batches the plan."""
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_lm_optiq.kv.apply import make_plan_cache

    model, tok = load(str(tiny_q4_path))
    plan = _plan(len(model.layers), {1: {"scheme": "turbo", "k_bits": 3, "v_bits": 3}}, quantized_kv_start=4)
    caches, floats = make_plan_cache(model, plan), make_prompt_cache(model)
    assert isinstance(caches[1], turbo.TurboQuantKVCache) and caches[1].quantized_kv_start == 4
    assert all(hasattr(c, "merge") for c in caches)  # the server's batchability test
    ids = mx.array(tok.encode("Hello there, how are you today?"))[None]
    # below the start the slot holds float K/V and attention is stock: logits equal a float cache's
    for piece in (ids[:, :3], ids[:, 3:5]):
        assert mx.array_equal(model(piece, cache=caches), model(piece, cache=floats)).item()
        assert not caches[1].quantized and caches[1].keys.dtype != mx.uint8
    model(ids[:, 5:6], cache=caches)  # the cache held 5 >= 4 tokens at this update: all packed now
    assert caches[1].quantized and caches[1].offset == caches[0].offset == 6
    assert caches[1].keys.shape[-1] == caches[1].key_quantizer.width


def _turbo_filled(n, data_seed, heads=3, dim=64, **settings):
    cache = turbo.TurboQuantKVCache(head_dim=dim, **settings)
    k1, k2 = mx.random.split(mx.random.key(data_seed))
    cache.update_and_fetch(mx.random.normal((1, heads, n, dim), key=k1), mx.random.normal((1, heads, n, dim), key=k2))
    return cache


def _held(cache):
    """The (packed or float) key and value rows a single cache holds."""
    return cache.keys[:, :, : cache.offset], cache.values[:, :, : cache.offset]


def _decode_step_matches_rows(batch, singles, seed, compiled=False):
    """One decode step of the batch (left padding masked by make_mask) == each row's own step."""
    import copy

    from mlx_lm.models.base import scaled_dot_product_attention as sdpa

    rows = len(singles)
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    k, v = mx.random.normal((rows, 3, 1, 64), key=k1), mx.random.normal((rows, 3, 1, 64), key=k2)
    q = mx.random.normal((rows, 9, 1, 64), key=k3)
    mask = batch.make_mask(1)
    kv, _ = batch.update_and_fetch(k, v)
    out = sdpa(q, kv, kv, cache=batch, scale=0.125, mask=mask)
    for i, single in enumerate(singles):
        single = copy.deepcopy(single)
        kv_i, _ = single.update_and_fetch(k[i : i + 1], v[i : i + 1])
        ref = sdpa(q[i : i + 1], kv_i, kv_i, cache=single, scale=0.125, mask=None)  # a single decode step's mask
        assert mx.abs(out[i : i + 1] - ref).max().item() < 1e-5, (i, compiled)
    batch.trim(1)


@pytest.mark.parametrize("compiled", [False, True])
def test_merge_extract_filter_extend_trim_round_trip(attention_patched, monkeypatch, compiled):
    """Rows keep their codes through every batch operation, and batched attention (left padding
    masked) computes each row's own attention, on the plain (CPU) and the compiled (GPU) graph."""
    monkeypatch.setattr(turbo, "COMPILE_ON_CPU", compiled)
    settings = dict(key_bits=3, value_bits=2.5, seed=5)  # fractional values: two code segments
    singles = [_turbo_filled(n, s, **settings) for n, s in ((7, 0), (3, 1), (300, 2))]  # 300 > the 256 step
    expected = [_held(c) for c in singles]
    batch = turbo.TurboQuantKVCache.merge(singles)
    assert isinstance(batch, turbo.BatchTurboQuantKVCache) and batch.quantized
    assert batch.left_padding.tolist() == [293, 297, 0] and batch.size() == 300
    for i, (k, v) in enumerate(expected):
        row = batch.extract(i)
        assert isinstance(row, turbo.TurboQuantKVCache) and row.offset == k.shape[2] and row.quantized
        assert mx.array_equal(_held(row)[0], k).item() and mx.array_equal(_held(row)[1], v).item()
    _decode_step_matches_rows(batch, singles, seed=10, compiled=compiled)
    batch.filter([2, 0])
    assert batch.left_padding.tolist() == [0, 293]
    assert mx.array_equal(_held(batch.extract(1))[0], expected[0][0]).item()
    other = turbo.TurboQuantKVCache.merge([_turbo_filled(20, 3, **settings)])
    batch.extend(other)
    assert batch.left_padding.tolist() == [0, 293, 280]
    singles = [singles[2], singles[0], _turbo_filled(20, 3, **settings)]
    for i, c in enumerate(singles):
        assert mx.array_equal(_held(batch.extract(i))[1], _held(c)[1]).item()
    _decode_step_matches_rows(batch, singles, seed=11, compiled=compiled)
    assert batch.trim(2) == 2 and batch.extract(2).offset == 18


def test_merge_packs_copies_of_float_rows_and_refuses_other_settings(attention_patched):
    settings = dict(bits=3, seed=1, quantized_kv_start=6)
    short = _turbo_filled(4, 0, **settings)  # below the start: float
    long_ = _turbo_filled(9, 1, **settings)
    long_.update_and_fetch(mx.zeros((1, 3, 1, 64)), mx.zeros((1, 3, 1, 64)))  # held 9 >= 6 at this update
    assert not short.quantized and long_.quantized
    k_short = _held(short)[0]
    batch = turbo.TurboQuantKVCache.merge([short, long_])
    assert batch.quantized and not short.quantized  # the prompt-cache entry is left as it was
    assert mx.array_equal(_held(batch.extract(0))[0], short.key_quantizer.pack(k_short)).item()
    # a float batch becomes codes when extended with a packed one (and so does its other side)
    floats = turbo.TurboQuantKVCache.merge([_turbo_filled(2, 2, **settings)])
    assert not floats.quantized
    floats.extend(turbo.TurboQuantKVCache.merge([long_]))
    assert floats.quantized and floats.extract(0).offset == 2 and floats.extract(1).offset == 10
    with pytest.raises(ValueError, match="different settings"):
        turbo.TurboQuantKVCache.merge([long_, turbo.TurboQuantKVCache(head_dim=64, bits=4, seed=1)])
    with pytest.raises(ValueError, match=r"key/value head_dim \(64, 64\) and \(128, 128\)"):
        turbo.TurboQuantKVCache.merge([long_, _turbo_filled(2, 0, dim=128, **settings)])


@pytest.mark.parametrize("quantized_kv_start", [0, 4])
def test_batch_generator_matches_single_requests(
    attention_patched, tiny_float_path, monkeypatch, caplog, quantized_kv_start
):
    """mlx-lm's continuous batching (merge, right-padded prefill + finalize, left padding,
    filter on finish, extract) with turbo slots computes what one request at a time computes,
    up to the noise another batch shape brings (tests.helpers). quantized_kv_start 4 is below
    every prompt (5, 15 and 8 tokens), so rows switch to codes as they do alone."""
    import logging

    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator, generate_step

    from mlx_lm_optiq.kv.apply import make_plan_cache
    from tests.helpers import QUANTIZED_KV_NOISE, assert_greedy_matches_solo, replay_solo_logprobs

    gen = sys.modules["mlx_lm.generate"]
    model, tok = load(str(tiny_float_path))
    schemes = {
        0: {"scheme": "turbo", "k_bits": 3, "v_bits": 3},
        1: {"scheme": "affine", "k_bits": 8, "v_bits": 4, "group_size": 64},
        2: {"scheme": "turbo", "k_bits": 4, "v_bits": 2},
        3: {"scheme": "turbo", "k_bits": 2, "v_bits": 2},
    }
    plan = _plan(len(model.layers), schemes, quantized_kv_start)

    def plan_cache(*_):
        return make_plan_cache(model, plan)

    prompts = [
        tok.encode(t)
        for t in (
            "The capital of France is",
            "Once upon a time, in a small village by the sea, there lived",
            "1, 2, 3,",
        )
    ]
    max_tokens = [10, 6, 8]
    monkeypatch.setattr(gen, "make_prompt_cache", plan_cache)
    caplog.set_level(logging.DEBUG)
    batch = BatchGenerator(model, max_tokens=10)
    uids = batch.insert(prompts, max_tokens=max_tokens)
    got = {u: [] for u in uids}
    while responses := batch.next_generated():
        for r in responses:
            got[r.uid].append((r.token, r.logprobs))
            if r.finish_reason is not None:
                assert all(isinstance(r.prompt_cache[i], turbo.TurboQuantKVCache) for i in (0, 2, 3))
                assert r.prompt_cache[0].quantized and r.prompt_cache[0].offset > len(prompts[uids.index(r.uid)])
    batch.close()
    monkeypatch.undo()
    assert "batch of 3 rows (merge, turbo)" in caplog.text  # the rows really shared turbo batches
    assert [len(got[u]) for u in uids] == max_tokens
    for row, (u, prompt) in enumerate(zip(uids, prompts)):
        tokens = [t for t, _ in got[u]]
        solo = replay_solo_logprobs(model, prompt, tokens, prompt_cache=plan_cache())
        assert_greedy_matches_solo(
            tokens, solo, logprobs=[lp for _, lp in got[u]], noise=QUANTIZED_KV_NOISE, label=f"row {row}"
        )
    if quantized_kv_start == 0:
        # the plan really changes the computation (2-bit turbo slots)
        fp = [int(t) for t, _ in generate_step(mx.array(prompts[1]), model, max_tokens=6)]
        planned = [
            int(t) for t, _ in generate_step(mx.array(prompts[1]), model, max_tokens=6, prompt_cache=plan_cache())
        ]
        assert planned != fp


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


def test_turbo_prompt_cache_says_which_slots_stay_float(tiny_q4_path):
    """make_turbo_prompt_cache replaces plain KVCache slots only. What it leaves in float is said,
    never silent: a warning with the count and the reason, and `left_as_is` on the returned list.
    A gemma3-style model (5 sliding-window layers to 1 global) keeps 5 of 6 slots in float; a
    hybrid (linear-attention) model its recurrent-state slots; a llama-style model none."""
    import copy
    import warnings

    from mlx_lm import load

    from tests.tiny_models import tiny_hybrid, tiny_sliding

    sliding = "sliding-window RotatingKVCache (TurboQuant has no sliding-window cache)"
    with pytest.warns(UserWarning, match=r"5 of 6 cache slots stay in float, not TurboQuant: 5 " + re.escape(sliding)):
        cache = turbo.make_turbo_prompt_cache(tiny_sliding(window=16, layers=6, pattern=6), bits=3)
    assert [type(c).__name__ for c in cache] == ["RotatingKVCache"] * 5 + ["TurboQuantKVCache"]
    assert cache.left_as_is == dict.fromkeys(range(5), sliding)
    assert copy.deepcopy(cache).left_as_is == cache.left_as_is  # mlx-lm's prompt caches are deep-copied

    with pytest.warns(UserWarning, match=r"2 of 4 cache slots .*: 2 ArraysCache \(recurrent state"):
        cache = turbo.make_turbo_prompt_cache(tiny_hybrid(), bits=3)
    assert sorted(cache.left_as_is) == [0, 2] and isinstance(cache[1], turbo.TurboQuantKVCache)

    model, _ = load(str(tiny_q4_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every slot is TurboQuant: nothing to say
        cache = turbo.make_turbo_prompt_cache(model, bits=3)
    assert cache.left_as_is == {} and all(isinstance(c, turbo.TurboQuantKVCache) for c in cache)
