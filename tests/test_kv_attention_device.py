"""Parity of the fused CUDA KV attention kernel with the reference (GPU only).

Run through the device tool (docs/results/kv-attention-parity-h200.txt has the latest
output):  python -m pytest -m device -v -s tests/test_kv_attention_device.py

Reference: the packed cache dequantized to float32 and mx.fast SDPA in float32, i.e.
the exact function of the stored (quantized) values. The kernel accumulates in
float32 and rounds once to the queries' dtype, so it must agree within the output
dtype's rounding (plus float32 summation-order noise)."""

import itertools

import mlx.core as mx
import pytest

from mlx_lm_optiq.kv import attention, cuda_attention
from tests.helpers import optiq
from tests.kv_attention_cases import masks, packed_case

pytestmark = [
    pytest.mark.device,
    pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend (run via the device tool)"),
]

TOL = {mx.float32: 1e-3, mx.float16: 4e-3, mx.bfloat16: 3e-2}  # float32: __expf is approximate


def _reference(q, k, v, scale, mask):
    f32 = mx.float32
    kd, vd = k.dequantize().astype(f32), v.dequantize().astype(f32)
    if mask is not None and not isinstance(mask, str) and mask.dtype != mx.bool_:
        mask = mask.astype(f32)
    return mx.fast.scaled_dot_product_attention(q.astype(f32), kd, vd, scale=scale, mask=mask)


def _check(case, mask_kind, dtype, pad=5):
    B, n_q, n_kv, L, S, D, kb, vb, g = case
    q, k, v = packed_case(*case, dtype=dtype, pad=pad)
    mask = masks(B, L, S)[mask_kind]
    if mask is not None and not isinstance(mask, str) and mask.dtype != mx.bool_:
        mask = mask.astype(dtype)
    assert cuda_attention.why_unsupported(q, k, v, mask) is None
    ref = _reference(q, k, v, D**-0.5, mask)
    # every split kernel that takes the call: float32 FMAs always, tensor cores (rows read
    # straight from the cache, and tiles staged through shared memory) where allowed
    kernels = ["simt"] + (["mma", "mma-staged"] if cuda_attention.why_not_mma(q, k, v) is None else [])
    for kernel in kernels:
        out = cuda_attention.attention(q, k, v, D**-0.5, mask, kernel=kernel)
        err = mx.abs(out.astype(mx.float32) - ref).max().item()
        print(f"{case} {mask_kind:8s} {str(dtype):14s} {kernel:10s} max|err| {err:.2e}")
        assert out.dtype == dtype and out.shape == (B, n_q, L, D)
        assert err < TOL[dtype], f"{case} {mask_kind} {dtype} {kernel}: {err}"
    return kernels


BITS = [(2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (8, 8), (8, 4), (4, 2)]


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"K{b[0]}V{b[1]}")
@pytest.mark.parametrize("group", [32, 64, 128])
def test_bits_and_groups(bits, group):
    _check((2, 8, 2, 1, 1000, 128, *bits, group), "bool", mx.float16)


@pytest.mark.parametrize("gqa", [(4, 4), (8, 2), (32, 8), (12, 3), (16, 1)], ids=lambda h: f"q{h[0]}kv{h[1]}")
@pytest.mark.parametrize("S", [1, 31, 77, 4097, 33000])
def test_gqa_and_lengths_not_a_multiple_of_the_block(gqa, S):
    _check((1, *gqa, 1, S, 128, 4, 4, 64), "none", mx.float16)


@pytest.mark.parametrize(
    "mask_kind,L", list(itertools.product(["none", "causal", "bool", "additive"], [1, 2, 4])), ids=str
)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32], ids=str)
def test_masks_query_rows_and_dtypes(mask_kind, L, dtype):
    _check((3, 8, 2, L, 300, 128, 4, 2, 64), mask_kind, dtype)


@pytest.mark.parametrize("D", [64, 256])
def test_head_dims(D):
    _check((2, 4, 2, 1, 520, D, 8, 4, 32), "bool", mx.float16)


@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (8, 8), (8, 4), (4, 2), (2, 8)], ids=lambda b: f"K{b[0]}V{b[1]}")
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_tensor_core_kernel_bits_head_dims_dtypes(bits, D, dtype):
    """The mma kernel's code layouts per width and head dim (bf16 8-bit codes take float32)."""
    if D * bits[1] < 256:
        pytest.skip("outside the tensor-core kernel (head dim x value bits < 256)")
    assert "mma" in _check((2, 8, 2, 1, 301, D, *bits, 32 if D == 64 else 64), "bool", dtype)


@pytest.mark.parametrize("pad", [0, 1, 32], ids=lambda p: f"pad{p}")
@pytest.mark.parametrize("S", [32, 95, 4127])
def test_staged_tiles_on_aligned_and_misaligned_cache_views(pad, S):
    """The staged kernel copies a tile's rows as 16-byte runs only when the view's base is
    16-byte aligned: with an odd allocated length (pad) every other KV head's rows start at
    8 bytes past a 16-byte boundary and take the direct loads inside the same kernel; tile
    ends (S not a multiple of 32) are zero-filled copies."""
    assert "mma-staged" in _check((2, 16, 4, 1, S, 128, 4, 4, 64), "bool", mx.float16, pad=pad)
    assert "mma-staged" in _check((1, 8, 2, 2, S, 256, 8, 8, 32), "causal", mx.bfloat16, pad=pad)


def test_auto_picks_tensor_cores_where_they_apply():
    q, k, v = packed_case(1, 32, 8, 1, 100, 128, 4, 4, 64, dtype=mx.float16)
    assert cuda_attention.why_not_mma(q, k, v) is None
    q3, k3, v3 = packed_case(1, 32, 8, 1, 100, 128, 3, 3, 64, dtype=mx.float16)
    assert "bits" in cuda_attention.why_not_mma(q3, k3, v3)
    with pytest.raises(ValueError, match="tensor-core"):
        cuda_attention.attention(q3, k3, v3, 0.1, None, kernel="mma")


def test_selected_by_default_on_cuda_and_used_by_the_hooked_path(monkeypatch):
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    assert attention.selected_path() == "cuda"
    q, k, v = packed_case(1, 32, 8, 1, 2000, 128, 4, 4, 64, dtype=mx.float16)
    out = attention.quantized_scaled_dot_product_attention(q, k, v, scale=128**-0.5, mask=None)
    assert mx.abs(out.astype(mx.float32) - _reference(q, k, v, 128**-0.5, None)).max().item() < TOL[mx.float16]
    # a prefill-shaped call is outside the kernel: the reference path computes it
    q, k, v = packed_case(1, 32, 8, 64, 200, 128, 4, 4, 64, dtype=mx.float16)
    out = attention.quantized_scaled_dot_product_attention(q, k, v, scale=128**-0.5, mask="causal")
    assert mx.abs(out.astype(mx.float32) - _reference(q, k, v, 128**-0.5, "causal")).max().item() < TOL[mx.float16]


def test_a_model_decodes_through_the_kernel_like_the_reference(monkeypatch):
    """A random llama (head_dim 128, GQA 4) through mlx-lm's own attention with the hook
    on: the default (fused) path's logits match the dequantize path's."""
    from mlx_lm.models import llama

    from mlx_lm_optiq.kv.caches import MixedQuantizedKVCache

    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=1024,
        num_hidden_layers=4,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        rms_norm_eps=1e-5,
        vocab_size=1000,
    )
    model = llama.Model(args)
    model.set_dtype(mx.float16)
    prompt = mx.random.randint(0, 1000, (2, 300))
    steps = mx.random.randint(0, 1000, (2, 8))  # teacher-forced: both runs see the same tokens

    def run():
        caches = [MixedQuantizedKVCache(k_bits=4, v_bits=2, group_size=64) for _ in model.layers]
        out = [model(prompt, cache=caches)[:, -1]]
        for i in range(steps.shape[1]):
            out.append(model(steps[:, i : i + 1], cache=caches)[:, -1])
        return mx.stack(out).astype(mx.float32)

    with optiq():
        monkeypatch.setenv(attention.ENV_VAR, "dequantize")
        reference = run()
        monkeypatch.delenv(attention.ENV_VAR)
        fused = run()
    err = mx.abs(fused - reference).max().item()
    print(f"random llama, 8 decode steps: max|logit diff| {err:.2e} (logit scale {mx.abs(reference).max().item():.1f})")
    assert err < 5e-2
