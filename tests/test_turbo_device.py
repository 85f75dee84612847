"""Parity of the fused CUDA TurboQuant kernels (kv/cuda_turbo.py: attention, pack) with the MLX
reference graphs (GPU only).

Run through the device tool:  python -m pytest -m device -v -s tests/test_turbo_device.py

Reference: `turbo.reference_attention` with float32 queries (lookup tables, rotations, matmuls
and softmax in float32), i.e. the exact function of the stored codes and norms. The kernel
accumulates in float32 and rounds once to the queries' dtype, so it must agree within the
output dtype's rounding at the outputs' scale (|out| <= ~4 here: random unit-variance values)
plus float32 summation-order noise: TOL below, as for the affine kernel's parity test."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_optiq.kv import cuda_turbo, turbo
from tests.helpers import QUANTIZED_KV_NOISE, optiq

pytestmark = [
    pytest.mark.device,
    pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend (run via the device tool)"),
]

TOL = {mx.float32: 1e-3, mx.float16: 4e-3, mx.bfloat16: 3e-2}  # float32: __expf is approximate


def turbo_case(B, n_q, n_kv, L, S, D, kbits, vbits, dtype, pad=5, seed=0):
    """Queries (B, n_q, L, D) and a TurboKV over S random positions, in buffers of capacity
    S + pad (the caches' unfilled tail, which attention must not read)."""
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    kq = turbo.get_quantizer(D, kbits, seed, "mse")
    vq = turbo.get_quantizer(D, vbits, seed + 1, "mse")
    keys = kq.pack(mx.random.normal((B, n_kv, S + pad, D), key=k1))
    values = vq.pack(mx.random.normal((B, n_kv, S + pad, D), key=k2))
    q = mx.random.normal((B, n_q, L, D), key=k3).astype(dtype)
    mx.eval(keys, values, q)
    return q, turbo.TurboKV(kq, vq, keys, values, S)


def make_mask(kind, B, L, S, dtype):
    """None, "causal", or mlx-lm's left-padded batch mask (create_causal_mask with
    left_padding, (B, 1, L, S) bool) as bool or additive."""
    if kind in ("none", "causal"):
        return None if kind == "none" else "causal"
    from mlx_lm.models.base import create_causal_mask

    left = mx.array([(7 * i) % max(S - L, 1) for i in range(B)])  # row 0 unpadded, others padded
    m = create_causal_mask(L, offset=S - L, left_padding=left)
    return m if kind == "bool" else mx.where(m, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))


def check(case, mask_kind="bool", dtype=mx.float16):
    B, n_q, n_kv, L, S, D, kb, vb = case
    q, kv = turbo_case(*case, dtype=dtype)
    mask = make_mask(mask_kind, B, L, S, dtype)
    assert cuda_turbo.why_unsupported(q, kv, mask) is None
    scale = D**-0.5
    ref_mask = mask if mask is None or isinstance(mask, str) or mask.dtype == mx.bool_ else mask.astype(mx.float32)
    ref = turbo.reference_attention(q.astype(mx.float32), kv, scale, ref_mask)
    out = cuda_turbo.attention(q, kv, scale, mask)
    err = mx.abs(out.astype(mx.float32) - ref).max().item()
    print(f"{case} {mask_kind:8s} {str(dtype):14s} max|err| {err:.2e} (max|ref| {mx.abs(ref).max().item():.2f})")
    assert out.dtype == dtype and out.shape == (B, n_q, L, D)
    assert err < TOL[dtype], f"{case} {mask_kind} {dtype}: {err}"


@pytest.fixture(autouse=True)
def plain_reference_graphs():
    """The reference graph and the packing run uncompiled here: mx.compile would build (and
    JIT-compile) a new graph for every test shape, most of this file's run time otherwise."""
    mx.disable_compile()
    yield
    mx.enable_compile()


def test_dispatch_on_cuda(monkeypatch):
    """Default on CUDA: decode calls take the kernel; prefill-shaped calls and "prod" keys the
    reference; MLX_LM_OPTIQ_TURBO_ATTENTION=reference forces the reference."""
    monkeypatch.delenv(cuda_turbo.ENV_VAR, raising=False)
    assert cuda_turbo.selected_path() == "cuda"
    calls = []
    real = cuda_turbo.attention
    monkeypatch.setattr(cuda_turbo, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, kv = turbo_case(1, 8, 2, 1, 900, 64, 3, 3, mx.float16)
    out = turbo.turbo_scaled_dot_product_attention(q, kv, 0.125, None)
    ref = turbo.reference_attention(q.astype(mx.float32), kv, 0.125, None)
    assert calls == [1] and mx.abs(out.astype(mx.float32) - ref).max().item() < TOL[mx.float16]
    q, kv = turbo_case(1, 8, 2, 64, 900, 64, 3, 3, mx.float16)
    turbo.turbo_scaled_dot_product_attention(q, kv, 0.125, "causal")
    assert calls == [1]  # 256 query rows per KV head: the reference
    monkeypatch.setenv(cuda_turbo.ENV_VAR, "reference")
    q, kv = turbo_case(1, 8, 2, 1, 900, 64, 3, 3, mx.float16)
    turbo.turbo_scaled_dot_product_attention(q, kv, 0.125, None)
    assert calls == [1]
    monkeypatch.setenv(cuda_turbo.ENV_VAR, "cuda")
    turbo.turbo_scaled_dot_product_attention(q, kv, 0.125, None)
    assert calls == [1, 1]


@pytest.mark.parametrize(
    "D,bits,dtype",
    [(64, 3, mx.float16), (128, 3, mx.bfloat16), (64, 2.5, mx.float32), (128, 4, mx.float16), (256, 6, mx.float16)],
    ids=str,
)
def test_pack_kernel_writes_the_rows_the_mlx_graph_writes(monkeypatch, D, bits, dtype):
    """The fused pack (the decode step's quantize) against TurboQuantizer.pack's MLX graph on
    transposed input (strided, as the model hands it over).

    Not bitwise: the rotation is the kernel's float32 FMA loop against the MLX graph's float32
    matmul, which round differently (the CPU emulation of the kernel matches the CPU graph
    bit for bit, tests/test_turbo_cuda.py), so a coordinate lying within that rounding of a
    code boundary takes the neighbouring code. Measured on the H200 (2026-12-04): 0.07-0.3% of
    the bytes differ (most at 6 bits, whose cells are narrowest), norms within one fp16 ulp. So:
    every code is the graph's or its neighbour (rotated-space values within one centroid gap),
    under 1% of bytes differ, norms agree to 2e-3 relative."""
    q = turbo.get_quantizer(D, bits, 3, "mse")
    x = (mx.random.normal((2, 3000, 4, D), key=mx.random.key(D)) * 3).astype(dtype).transpose(0, 2, 1, 3)
    got = cuda_turbo.pack(q, x)
    monkeypatch.setenv(cuda_turbo.ENV_VAR, "reference")
    want = q.pack(x)
    assert got.shape == want.shape == (2, 4, 3000, q.width)
    differ = (got != want).astype(mx.float32).mean().item()
    g, w = q.unpack(got), q.unpack(want)
    norm_w = w["norm"].astype(mx.float32)
    rel = (mx.abs(g["norm"].astype(mx.float32) - norm_w) / mx.maximum(norm_w, 1e-6)).max().item()
    step = max(float(np.diff(c).max()) for c in q._books)  # the widest gap between neighbouring centroids
    jump = mx.abs(q.rotated_unit(g) - q.rotated_unit(w)).max().item()
    print(f"pack D{D} {bits} bits {dtype}: differing bytes {differ:.2e}, norm rel err {rel:.1e}, jump {jump:.3f}")
    assert differ < 1e-2 and rel < 2e-3 and jump <= step * (1 + 1e-6)


def test_a_model_decodes_through_the_kernel_like_the_reference(monkeypatch):
    """A random llama (head_dim 64, GQA 4) with 3-bit TurboQuant caches, as mlx-lm's
    BatchGenerator drives them: two prompts of different lengths prefilled alone (300 query rows:
    the reference in both runs), merged into one left-padded BatchTurboQuantKVCache per layer
    (decode then reads the mask mlx-lm builds from left_padding), then 8 teacher-forced batched
    decode steps through the kernel vs the reference.

    Two comparisons. Attention kernel alone (the pack through the MLX graph, so the stored codes
    are the reference run's up to rounding of the hidden states): the reference computes in fp16,
    the kernel accumulates in float32, and each step's new K/V are quantized from hidden states
    that differ by that rounding; measured 4.9e-3 at logit scale 5.6 (H200): bound 2% of the
    scale. Both kernels: the pack kernel's rotation rounds differently from the graph's matmul,
    so some coordinates take the neighbouring code (test above) and logits move at the
    quantized-KV noise level (measured 0.13 in logits): bound tests/helpers' QUANTIZED_KV_NOISE
    on log-probabilities. In both, the greedy tokens must agree."""
    from mlx_lm.models import llama

    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=512,
        num_hidden_layers=4,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        rms_norm_eps=1e-5,
        vocab_size=1000,
    )
    model = llama.Model(args)
    model.set_dtype(mx.float16)
    prompt = mx.random.randint(0, 1000, (2, 300))
    steps = mx.random.randint(0, 1000, (2, 8))
    n_layers = len(model.layers)

    def run():
        singles, first = [], []
        for b, n in ((0, 300), (1, 293)):
            caches = [turbo.TurboQuantKVCache(bits=3, seed=2 * i) for i in range(n_layers)]
            first.append(model(prompt[b : b + 1, :n], cache=caches)[:, -1])
            singles.append(caches)
        caches = [turbo.TurboQuantKVCache.merge([singles[0][i], singles[1][i]]) for i in range(n_layers)]
        assert caches[0].left_padding.tolist() == [0, 7]
        out = [mx.concatenate(first)]
        for i in range(steps.shape[1]):
            out.append(model(steps[:, i : i + 1], cache=caches)[:, -1])
        return mx.stack(out).astype(mx.float32)

    calls = []
    real = cuda_turbo.attention
    monkeypatch.setattr(cuda_turbo, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with optiq():
        monkeypatch.setenv(cuda_turbo.ENV_VAR, "reference")
        reference = run()
        assert not calls
        monkeypatch.delenv(cuda_turbo.ENV_VAR)
        real_use_pack = cuda_turbo.use_fused_pack
        monkeypatch.setattr(cuda_turbo, "use_fused_pack", lambda q, x: False)
        attention_only = run()  # the same codes as the reference: only the attention differs
        assert len(calls) == 8 * n_layers
        monkeypatch.setattr(cuda_turbo, "use_fused_pack", real_use_pack)
        fused = run()
    assert len(calls) == 2 * 8 * n_layers
    scale = mx.abs(reference).max().item()
    err = mx.abs(attention_only - reference).max().item()
    agree = (mx.argmax(attention_only, -1) == mx.argmax(reference, -1)).mean().item()
    print(f"random llama, turbo3, attention kernel: max|logit diff| {err:.2e} (logit scale {scale:.1f}), top-1 {agree}")
    assert err < 0.02 * scale and agree == 1.0

    def logprobs(x):
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    err = mx.abs(logprobs(fused) - logprobs(reference)).max().item()
    agree = (mx.argmax(fused, -1) == mx.argmax(reference, -1)).mean().item()
    print(f"random llama, turbo3, attention + pack kernels: max|log-prob diff| {err:.2e}, top-1 {agree}")
    assert err < QUANTIZED_KV_NOISE and agree == 1.0


BITS = [(3, 3), (2, 2), (4, 4), (3, 2), (2, 4), (1, 1), (5, 5), (6, 6), (2.5, 2.5), (3.5, 3)]


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"K{b[0]}V{b[1]}")
def test_bits(bits):
    check((2, 8, 2, 1, 1000, 128, *bits), "bool", mx.float16)


@pytest.mark.parametrize("bits", [(3, 3), (2, 4), (2.5, 2.5), (4, 4)], ids=lambda b: f"K{b[0]}V{b[1]}")
def test_head_dim_64(bits):
    check((2, 8, 2, 1, 1000, 64, *bits), "bool", mx.float16)


@pytest.mark.parametrize("gqa", [(4, 4), (8, 2), (9, 3), (16, 1), (32, 8)], ids=lambda h: f"q{h[0]}kv{h[1]}")
@pytest.mark.parametrize("S", [1, 77, 20011])
def test_gqa_and_lengths_not_a_multiple_of_the_block(gqa, S):
    check((1, *gqa, 1, S, 64, 3, 3), "none", mx.float16)


def test_lengths_around_the_tile_and_split():
    for S in (31, 32, 33, 4097, 8191):
        check((1, 8, 2, 1, S, 64, 3, 3), "none", mx.float16)


MASK_CASES = [(m, L, mx.float16) for m, L in itertools.product(["none", "causal", "bool", "additive"], [1, 3])]
MASK_CASES += [(m, L, dt) for dt in (mx.bfloat16, mx.float32) for m, L in [("bool", 1), ("additive", 3), ("causal", 3)]]


@pytest.mark.parametrize("mask_kind,L,dtype", MASK_CASES, ids=str)
def test_masks_query_rows_and_dtypes(mask_kind, L, dtype):
    check((3, 8, 2, L, 300, 128, 3, 3), mask_kind, dtype)


def test_head_dim_256_and_most_rows():
    check((2, 16, 1, 1, 520, 256, 3, 3), "bool", mx.float16)
    check((1, 4, 1, 4, 700, 64, 4, 3), "causal", mx.bfloat16)
