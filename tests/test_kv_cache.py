"""MixedQuantizedKVCache / BatchMixedQuantizedKVCache: storage, batch operations, and batched decoding that
computes what single requests compute (up to the noise of another batch shape: tests.helpers)."""

import copy
import sys

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from mlx_lm_optiq.kv.caches import BatchMixedQuantizedKVCache, MixedQuantizedKVCache, check_kv_quantization
from tests.helpers import QUANTIZED_KV_NOISE, assert_greedy_matches_solo, replay_solo_logprobs

H, D = 3, 64


def _kv(n, seed):
    mx.random.seed(seed)
    return mx.random.normal((1, H, n, D)), mx.random.normal((1, H, n, D))


def _filled(n, seed, **plan):
    cache = MixedQuantizedKVCache(**plan)
    k, v = _kv(n, seed)
    cache.update_and_fetch(k, v)
    return cache, k, v


def _fetch_all(cache):
    """The dequantized keys/values a cache holds (a zero-length update returns them)."""
    k, v = cache.update_and_fetch(mx.zeros((cache_batch(cache), H, 0, D)), mx.zeros((cache_batch(cache), H, 0, D)))
    return k, v


def cache_batch(cache):
    return cache.keys.shape[0]


def test_keys_and_values_keep_their_own_bits_and_memory_shrinks():
    cache = MixedQuantizedKVCache(k_bits=8, v_bits=4, group_size=64)
    k, v = _kv(300, 0)
    k_out, v_out = cache.update_and_fetch(k, v)
    k_err = mx.abs(k_out - k).max().item()
    v_err = mx.abs(v_out - v).max().item()
    # 8-bit keys are ~16x more precise than 4-bit values on N(0,1) data
    assert 0 < k_err < 0.05 and 0.1 < v_err < 1.0
    ref = mx.dequantize(*mx.quantize(v, group_size=64, bits=4), group_size=64, bits=4)
    assert mx.array_equal(v_out, ref)
    fp = KVCache()
    fp.update_and_fetch(k, v)
    # per head vector: 64 codes at 8 (keys) / 4 (values) bits + one fp32 scale and bias each,
    # vs 2 x 64 fp32 values
    assert cache.nbytes / fp.nbytes == pytest.approx(((64 * 8 + 64) + (64 * 4 + 64)) / (2 * 64 * 32), rel=1e-6)


def test_quantized_kv_start_keeps_float_until_reached():
    cache = MixedQuantizedKVCache(k_bits=4, v_bits=4, group_size=64, quantized_kv_start=8)
    k, v = _kv(5, 1)
    k_out, _ = cache.update_and_fetch(k, v)
    assert not cache.quantized and mx.array_equal(k_out, k)
    k2, v2 = _kv(4, 2)
    k_out, _ = cache.update_and_fetch(k2, v2)  # offset 5 < 8: still float
    assert not cache.quantized and mx.array_equal(k_out[..., 5:, :], k2)
    k3, v3 = _kv(1, 3)
    k_out, _ = cache.update_and_fetch(k3, v3)  # offset 9 >= 8: converts everything held
    assert cache.quantized and cache.keys.dtype == mx.uint8
    ref = mx.dequantize(*mx.quantize(mx.concatenate([k, k2, k3], axis=2), group_size=64, bits=4), group_size=64, bits=4)
    assert mx.array_equal(k_out, ref)


def test_bad_plans_are_rejected_with_the_field_named():
    with pytest.raises(ValueError, match="v_bits=7"):
        MixedQuantizedKVCache(k_bits=8, v_bits=7)
    with pytest.raises(ValueError, match="group_size=48"):
        MixedQuantizedKVCache(k_bits=8, v_bits=4, group_size=48)
    with pytest.raises(ValueError, match="head_dim 96 is not divisible by group_size 64"):
        check_kv_quantization(4, 4, 64, head_dim=96)
    cache = MixedQuantizedKVCache(k_bits=4, v_bits=4, group_size=128)
    with pytest.raises(ValueError, match="head_dim 64 is not divisible by group_size 128"):
        cache.update_and_fetch(*_kv(2, 0))


def test_not_converted_by_stock_kv_bits_and_survives_deepcopy():
    gen = sys.modules.get("mlx_lm.generate") or __import__("importlib").import_module("mlx_lm.generate")
    cache, _, _ = _filled(10, 0, k_bits=8, v_bits=4)
    caches = [cache]
    gen.maybe_quantize_kv_cache(caches, quantized_kv_start=0, kv_group_size=64, kv_bits=4)
    assert caches[0] is cache and not hasattr(cache, "bits")  # stock SDPA takes the float branch
    clone = copy.deepcopy(cache)
    assert clone.packing == cache.packing and mx.array_equal(clone.keys, cache.keys)


def test_merge_extract_filter_extend_trim_round_trip():
    plan = dict(k_bits=8, v_bits=4, group_size=64)
    singles = [_filled(n, s, **plan)[0] for n, s in ((7, 0), (3, 1), (12, 2))]
    expected = [_fetch_all(copy.deepcopy(c)) for c in singles]
    batch = MixedQuantizedKVCache.merge(singles)
    assert isinstance(batch, BatchMixedQuantizedKVCache) and batch.quantized
    assert batch.left_padding.tolist() == [5, 9, 0]
    for i, (k, v) in enumerate(expected):
        row = batch.extract(i)
        assert isinstance(row, MixedQuantizedKVCache) and row.offset == k.shape[2]
        rk, rv = _fetch_all(row)
        assert mx.array_equal(rk, k) and mx.array_equal(rv, v)
    batch.filter([0, 2])
    assert batch.left_padding.tolist() == [5, 0]
    assert mx.array_equal(_fetch_all(batch.extract(1))[0], expected[2][0])
    other = MixedQuantizedKVCache.merge([_filled(20, 3, **plan)[0]])
    batch.extend(other)
    assert batch.left_padding.tolist() == [13, 8, 0]
    assert mx.array_equal(_fetch_all(batch.extract(0))[1], expected[0][1])
    assert batch.trim(2) == 2 and batch.extract(2).offset == 18


def test_merge_of_float_and_quantized_rows_quantizes_a_copy():
    plan = dict(k_bits=4, v_bits=4, group_size=64, quantized_kv_start=6)
    short, k_short, _ = _filled(4, 0, **plan)  # below the start: float
    long_, _, _ = _filled(9, 1, **plan)
    long_.update_and_fetch(*_kv(1, 2))  # offset 9 >= 6 at this update: quantized
    assert not short.quantized and long_.quantized
    batch = MixedQuantizedKVCache.merge([short, long_])
    assert batch.quantized and not short.quantized  # the prompt-cache entry is left as it was
    ref = mx.dequantize(*mx.quantize(k_short, group_size=64, bits=4), group_size=64, bits=4)
    assert mx.array_equal(_fetch_all(batch.extract(0))[0], ref)
    with pytest.raises(ValueError, match="different plans"):
        MixedQuantizedKVCache.merge([long_, MixedQuantizedKVCache(k_bits=8, v_bits=4)])


@pytest.mark.parametrize("quantized_kv_start", [0, 4])
def test_batch_generator_matches_single_requests(tiny_float_path, quantized_kv_start):
    """Continuous batching (left padding, prefill, filter on finish) computes what one request
    at a time computes, up to the noise another batch shape brings (tests.helpers): each row's
    single request is replayed on the batched tokens. (A batch switches to quantized storage once,
    when its longest row reaches quantized_kv_start: a row shorter than the start is quantized
    sooner than alone, which moves its logits by O(1). The start 4 is below every prompt length
    here, 5, 15 and 8 tokens, so rows switch as they do alone.)"""
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator, generate_step

    gen = sys.modules["mlx_lm.generate"]
    model, tok = load(str(tiny_float_path))
    bits = [(8, 4), (4, 4), (8, 8), (4, 2)]

    def plan_cache(*_):
        return [MixedQuantizedKVCache(k, v, 64, quantized_kv_start) for k, v in bits]

    prompts = [
        tok.encode(t)
        for t in (
            "The capital of France is",
            "Once upon a time, in a small village by the sea, there lived",
            "1, 2, 3,",
        )
    ]
    assert min(len(p) for p in prompts) > quantized_kv_start
    max_tokens = [10, 6, 8]
    original = gen.make_prompt_cache
    gen.make_prompt_cache = plan_cache
    try:
        batch = BatchGenerator(model, max_tokens=10)
        uids = batch.insert(prompts, max_tokens=max_tokens)
        got = {u: [] for u in uids}
        while responses := batch.next_generated():
            for r in responses:
                got[r.uid].append((r.token, r.logprobs))
                if r.finish_reason is not None:
                    assert all(isinstance(c, MixedQuantizedKVCache) and c.quantized for c in r.prompt_cache)
        batch.close()
    finally:
        gen.make_prompt_cache = original
    assert [len(got[u]) for u in uids] == max_tokens
    for row, (u, prompt) in enumerate(zip(uids, prompts)):
        tokens = [t for t, _ in got[u]]
        solo = replay_solo_logprobs(model, prompt, tokens, prompt_cache=plan_cache())
        assert_greedy_matches_solo(
            tokens, solo, logprobs=[lp for _, lp in got[u]], noise=QUANTIZED_KV_NOISE, label=f"row {row}"
        )
    if quantized_kv_start == 0:
        # the plan really changes the computation (2-bit values on layer 3)
        fp = [int(t) for t, _ in generate_step(mx.array(prompts[1]), model, max_tokens=6)]
        planned = [
            int(t) for t, _ in generate_step(mx.array(prompts[1]), model, max_tokens=6, prompt_cache=plan_cache())
        ]
        assert planned != fp
