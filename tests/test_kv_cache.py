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


# ----------------------------------------------------------------------------- sliding windows
# What a quantized sliding-window cache computes, defined once (caches.py, docs/kv.md "Chunked
# prefill, prompt-cache hits and batches"): every query attends exactly the keys mlx-lm's
# RotatingKVCache gives it -- its last `window` positions -- each in its stored (quantized) form,
# the keys of its own chunk included, whatever the chunking, prompt-cache hit or batch it comes
# through. Checked here on fixed inputs, where nothing upstream adds noise: the tolerance is the
# float SDPA noise of another call shape (~1e-6), which stock float caches meet too. (Through a
# model, quantization turns that noise into occasional one-step code flips: see the model-level
# test below.)

SLIDING_ATOL = 1e-5
SCALE = 0.125


def _qkv_rows(n, seed, hq=4, hk=2):
    mx.random.seed(seed)
    return mx.random.normal((1, hq, n, D)), mx.random.normal((1, hk, n, D)), mx.random.normal((1, hk, n, D))


def _stored(x, bits):
    return mx.dequantize(*mx.quantize(x, group_size=64, bits=bits), group_size=64, bits=bits)


def _window_definition(q, k, v, window, k_bits=4, v_bits=4):
    """The definition spelled out: query i attends keys max(0, i - window + 1) .. i, each
    quantized and dequantized once (its stored form)."""
    n = q.shape[2]
    i, j = mx.arange(n)[:, None], mx.arange(n)[None]
    mask = (j <= i) & (j > i - window)
    return mx.fast.scaled_dot_product_attention(q, _stored(k, k_bits), _stored(v, v_bits), scale=SCALE, mask=mask)


def _attend(cache, q, k, v, window):
    """One attention call as a gemma3 layer makes it: mask from the cache, update, attention."""
    from mlx_lm.models.base import scaled_dot_product_attention

    mask = cache.make_mask(q.shape[2], window_size=window)
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=SCALE, mask=mask)


def _chunks(n, size):
    return [size] * (n // size) + ([n % size] if n % size else [])


def _prefill(cache, q, k, v, window, sizes, start=0):
    out = []
    for size in sizes:
        s = slice(start, start + size)
        out.append(_attend(cache, q[:, :, s], k[:, :, s], v[:, :, s], window))
        start += size
    return out


@pytest.mark.parametrize("window", [16, 300])  # 300: longer than mlx-lm's 256-position growth step
def test_sliding_window_cache_attends_its_window_in_stored_form_whatever_the_chunking(window):
    from mlx_lm.models.cache import RotatingKVCache

    from mlx_lm_optiq.kv.caches import MixedQuantizedRotatingKVCache

    n = 2 * window + 17
    q, k, v = _qkv_rows(n, 0)
    want = _window_definition(q, k, v, window)
    runs = {f"chunks of {c}": [_chunks(n, c)] for c in (n, window, window // 2, 1, 7, window + 1)}
    # prompt-cache hits: a prefix prefilled, the cache copied (as the server's prompt cache does), continued
    runs.update({f"hit after {p}": [[p], _chunks(n - p, 5)] for p in (window - 1, window, window + 5)})
    for label, parts in runs.items():
        for kind, make, inputs in (
            ("quantized", lambda: MixedQuantizedRotatingKVCache(window, 0, 4, 4, 64), (k, v)),
            ("float, stored form fed in", lambda: RotatingKVCache(window), (_stored(k, 4), _stored(v, 4))),
        ):
            cache, out, start = make(), [], 0
            for sizes in parts:
                out += _prefill(cache, q, *inputs, window, sizes, start)
                start += sum(sizes)
                cache = copy.deepcopy(cache)
            err = mx.abs(mx.concatenate(out, axis=2) - want).max().item()
            assert err < SLIDING_ATOL, f"{kind}, window {window}, {label}: off the definition by {err:.3g}"


@pytest.mark.parametrize("step", [1000, 16, 7])
def test_batched_sliding_window_cache_attends_each_rows_window_in_stored_form(step):
    """The batched twin as mlx-lm's BatchGenerator drives it: rows from prompt caches (one past
    the window) merged, a right-padded prefill in chunks of `step`, decode steps, a second batch
    extended in, a row filtered out, a row extracted and continued alone. Every output of every
    row is the definition's for that row."""
    from mlx_lm_optiq.kv.caches import BatchMixedQuantizedRotatingKVCache, MixedQuantizedRotatingKVCache

    window = 16

    def single():
        return MixedQuantizedRotatingKVCache(window, 0, 4, 4, 64)

    # whole sequences: prompt-cache prefix + prompt + decoded tokens (+ what "a" prefills alone)
    lengths = {"a": 82, "b": 38, "c": 27, "d": 50, "e": 34}
    seqs = {name: _qkv_rows(n, seed) for seed, (name, n) in enumerate(lengths.items())}
    want = {name: _window_definition(*seqs[name], window) for name in seqs}
    got = {name: [] for name in seqs}
    done = dict.fromkeys(seqs, 0)  # positions processed per row

    def prompt_batch(rows, prefixes, prompt_lengths):
        caches = []
        for name, p in zip(rows, prefixes):
            cache = single()
            if p:
                got[name] += _prefill(cache, *seqs[name], window, [p])
                done[name] = p
            caches.append(copy.deepcopy(cache))
        batch = caches[0].merge(caches)
        assert isinstance(batch, BatchMixedQuantizedRotatingKVCache)
        longest = max(prompt_lengths)
        padding = [longest - n for n in prompt_lengths]
        if max(padding):
            batch.prepare(lengths=prompt_lengths, right_padding=padding)
        for s in range(0, longest, step):
            e = min(longest, s + step)
            parts = [[], [], []]
            for name, n in zip(rows, prompt_lengths):
                for part, x in zip(parts, seqs[name]):
                    x = x[:, :, done[name] + s : done[name] + min(e, n)]
                    part.append(mx.pad(x, [(0, 0), (0, 0), (0, (e - s) - x.shape[2]), (0, 0)]))
            out = _attend(batch, *(mx.concatenate(p, axis=0) for p in parts), window)
            for r, (name, n) in enumerate(zip(rows, prompt_lengths)):
                got[name].append(out[r : r + 1, :, : max(0, min(e, n) - s)])
        batch.finalize()
        for name, n in zip(rows, prompt_lengths):
            done[name] += n
        return batch

    def decode(batch, rows, steps):
        for _ in range(steps):
            parts = [
                mx.concatenate([seqs[name][i][:, :, done[name] : done[name] + 1] for name in rows]) for i in range(3)
            ]
            out = _attend(batch, *parts, window)
            for r, name in enumerate(rows):
                got[name].append(out[r : r + 1])
                done[name] += 1

    rows = ["a", "b", "c"]
    batch = prompt_batch(rows, [window + 9, 5, 0], [40, 28, 20])
    decode(batch, rows, 2)
    late = prompt_batch(["d", "e"], [0, 3], [44, 25])
    decode(late, ["d", "e"], 1)
    batch.extend(late)
    rows += ["d", "e"]
    decode(batch, rows, 3)
    batch.filter([0, 2, 3, 4])  # "b" finished
    rows.remove("b")
    decode(batch, rows, 2)
    alone = batch.extract(0)  # "a" leaves the batch with its cache and continues alone
    assert isinstance(alone, MixedQuantizedRotatingKVCache)
    got["a"] += _prefill(copy.deepcopy(alone), *seqs["a"], window, [lengths["a"] - done["a"]], done["a"])
    done["a"] = lengths["a"]
    for name in seqs:
        out = mx.concatenate(got[name], axis=2)
        err = mx.abs(out - want[name][:, :, : done[name]]).max().item()
        assert out.shape[2] == done[name] == lengths[name] and err < SLIDING_ATOL, f"row {name}: off by {err:.3g}"


def test_quantized_sliding_caches_make_model_logits_depend_on_chunking_only_as_noise_does():
    """A tiny gemma3 (window 16 < the 53-token prompt), its sliding slots quantized K8/V4: prefill
    at once, in chunks of the window, half of it, 1 and 7 tokens, and after prompt-cache hits,
    gives the same log-probabilities up to QUANTIZED_KV_NOISE (tests.helpers: what a 1e-7 relative
    change of any float op does through a quantized cache, since a key on a rounding boundary is
    stored one step apart); float caches agree up to FLOAT_NOISE. Quantizing changes the
    log-probabilities by several times more than that tolerance, so a cache that attended any
    chunk's keys in float (the all-at-once prefill would then be the float result) fails."""
    from mlx_lm.models.cache import RotatingKVCache

    from mlx_lm_optiq.kv.caches import MixedQuantizedRotatingKVCache
    from tests.helpers import FLOAT_NOISE
    from tests.tiny_models import tiny_sliding

    window = 16
    model = tiny_sliding(window=window)
    n = 3 * window + 5
    prompt = (mx.arange(n)[None] * 7 + 3) % 500

    def caches(quantized):
        return [
            MixedQuantizedRotatingKVCache(c.max_size, c.keep, 8, 4, 64)
            if quantized and isinstance(c, RotatingKVCache)
            else c
            for c in model.make_cache()
        ]

    def logprobs(cache, sizes, start=0):
        out = []
        for size in sizes:
            logits = model(prompt[:, start : start + size], cache=cache).astype(mx.float32)
            out.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            start += size
        return out

    at_once = {}
    for quantized, noise in ((False, FLOAT_NOISE), (True, QUANTIZED_KV_NOISE)):
        at_once[quantized] = ref = logprobs(caches(quantized), [n])[0]
        for size in (window, window // 2, 1, 7):
            err = mx.abs(mx.concatenate(logprobs(caches(quantized), _chunks(n, size)), axis=1) - ref).max().item()
            assert err < noise, f"quantized={quantized}, chunks of {size}: {err:.3g}"
        for prefix in (window - 1, window + 3):
            cache = caches(quantized)
            head = logprobs(cache, [prefix])
            tail = logprobs(copy.deepcopy(cache), _chunks(n - prefix, 5), prefix)
            err = mx.abs(mx.concatenate(head + tail, axis=1) - ref).max().item()
            assert err < noise, f"quantized={quantized}, prompt-cache hit after {prefix}: {err:.3g}"
    assert mx.abs(at_once[True] - at_once[False]).max().item() > 3 * QUANTIZED_KV_NOISE
