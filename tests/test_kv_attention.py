"""Attention over packed per-layer KV caches (kv/attention.py) on the CPU backend.

The reference is dequantize + mx.fast SDPA. The quantized_matmul path (Metal's default)
runs here on the CPU's quantized_matmul and must compute the same function; the fused
CUDA kernel has its parity test in test_kv_attention_device.py (GPU only)."""

import itertools

import mlx.core as mx
import pytest
from mlx_lm import load

from mlx_lm_optiq.kv import attention, cuda_attention
from mlx_lm_optiq.kv.caches import MixedQuantizedKVCache
from mlx_lm_optiq.kv.cuda_attention import why_not_mma, why_unsupported
from tests.helpers import optiq
from tests.kv_attention_cases import masks, packed_case

CASES = [
    # B, n_q, n_kv, L, S, D, k_bits, v_bits, group
    (1, 4, 4, 1, 77, 64, 4, 4, 64),
    (2, 6, 2, 1, 130, 64, 8, 2, 32),
    (2, 8, 2, 3, 45, 128, 3, 6, 64),
    (3, 4, 1, 1, 257, 128, 5, 4, 128),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}q{}kv{}L{}S{}D{}k{}v{}g{}".format(*c))
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
def test_quantized_matmul_path_matches_the_reference(case, mask_kind):
    B, n_q, n_kv, L, S, D, kb, vb, g = case
    q, k, v = packed_case(*case)
    mask = masks(B, L, S)[mask_kind]
    ref = attention.dequantized_attention(q, k, v, scale=D**-0.5, mask=mask)
    out = attention.quantized_matmul_attention(q, k, v, scale=D**-0.5, mask=mask)
    assert out.shape == ref.shape == (B, n_q, L, D)
    assert mx.abs(out - ref).max().item() < 2e-4


def test_path_selection_and_clear_errors(monkeypatch):
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    assert attention.selected_path() == "dequantize"  # the CPU default: the reference
    monkeypatch.setenv(attention.ENV_VAR, "quantized_matmul")
    assert attention.selected_path() == "quantized_matmul"
    monkeypatch.setenv(attention.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="MLX_LM_OPTIQ_KV_ATTENTION='fastest'.*expected one of"):
        attention.selected_path()
    monkeypatch.setenv(attention.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="needs MLX's CUDA backend"):
        attention.selected_path()


def test_the_fused_kernel_says_which_calls_it_does_not_cover():
    q, k, v = packed_case(1, 32, 8, 1, 64, 128, 4, 4, 64)
    assert why_unsupported(q, k, v, None) is None  # an 8B-shaped decode step
    q, k, v = packed_case(1, 32, 8, 512, 600, 128, 4, 4, 64)
    assert "prefill takes the reference" in why_unsupported(q, k, v, "causal")
    q, k, v = packed_case(1, 4, 4, 1, 64, 96, 4, 4, 32)
    assert "head dims" in why_unsupported(q, k, v, None)


def test_which_decode_calls_the_tensor_core_kernel_takes(monkeypatch):
    """The CUDA kernel choice is plain Python (the kernels themselves run in the device tests)."""
    q, k, v = packed_case(1, 32, 8, 1, 64, 128, 4, 2, 64, dtype=mx.float16)
    # below Ampere (or not known: this CPU) the float32-FMA kernel takes every call
    assert "compute capability unknown" in why_not_mma(q, k, v)
    monkeypatch.setattr(cuda_attention, "compute_capability", lambda: (7, 5))
    assert "compute capability 7.5 (tensor-core kernel: >= 8.0)" in why_not_mma(q, k, v)
    monkeypatch.setattr(cuda_attention, "compute_capability", lambda: (9, 0))
    assert why_not_mma(q, k, v) is None  # an 8B-shaped fp16 decode step on an H100/H200
    q, k, v = packed_case(1, 32, 8, 1, 64, 128, 4, 4, 64)  # float32 queries
    assert "float32" in why_not_mma(q, k, v)
    q, k, v = packed_case(1, 32, 8, 1, 64, 128, 6, 4, 64, dtype=mx.bfloat16)
    assert "K6/V4" in why_not_mma(q, k, v)
    q, k, v = packed_case(1, 32, 2, 1, 64, 128, 4, 4, 64, dtype=mx.float16)  # 16 query heads per KV head
    assert "16 query rows" in why_not_mma(q, k, v)
    q, k, v = packed_case(1, 4, 2, 1, 64, 64, 4, 2, 32, dtype=mx.float16)
    assert "head dim 64 with 2-bit values" in why_not_mma(q, k, v)


def test_staged_tensor_core_tiles_fit_in_shared_memory_for_every_layout_it_takes():
    """Two 32-row K+V tiles per warp: 4 warps a block for 4-bit rows at head dim 128, fewer as
    rows widen, and one warp's tiles fit for the widest layout the kernel takes."""
    from mlx_lm_optiq.kv.caches import Packing

    def warps(D, kb, vb, g, dtype=mx.float16):
        return cuda_attention._mma_warps_per_block(Packing(kb, g, D, dtype).width, Packing(vb, g, D, dtype).width)

    assert warps(128, 4, 4, 64) == 4  # 72-byte rows: 4 x 2 x 32 x 144 = 36 KiB
    assert warps(128, 8, 8, 32) == 2
    assert warps(256, 8, 8, 32) == 1
    for D, kb, vb, g, dt in itertools.product(
        cuda_attention.HEAD_DIMS,
        cuda_attention.MMA_BITS,
        cuda_attention.MMA_BITS,
        (32, 64, 128),
        (mx.float16, mx.bfloat16, mx.float32),
    ):
        kw, vw = Packing(kb, g, D, dt).width, Packing(vb, g, D, dt).width
        n = cuda_attention._mma_warps_per_block(kw, vw)
        assert n * 2 * 32 * (kw + vw) <= cuda_attention.SHARED_BYTES
    assert "mma-staged" in cuda_attention.KERNELS


def test_model_decodes_through_packed_attention_only_after_the_hook_saw_its_cache(tiny_float_path, monkeypatch):
    """End to end on the real 4-layer model: with the attention hook on and the
    quantized_matmul path chosen, caches hand out PackedKV from the second call on
    (the first proves the model's attention goes through the hook) and the logits
    match the dequantize path's."""
    model, tok = load(str(tiny_float_path))
    prompt = mx.array(tok.encode("It is a truth universally acknowledged, that a single man"))[None]

    def run():
        caches = [MixedQuantizedKVCache(k_bits=4, v_bits=2, group_size=32) for _ in model.layers]
        logits = [model(prompt, cache=caches)[:, -1]]
        fetched = caches[0].update_and_fetch  # spy on what attention receives
        kinds = []

        def spy(k, v):
            out = fetched(k, v)
            kinds.append(type(out[0]).__name__)
            return out

        caches[0].update_and_fetch = spy
        token = mx.argmax(logits[-1], axis=-1)[:, None]
        for _ in range(3):
            logits.append(model(token, cache=caches)[:, -1])
            token = mx.argmax(logits[-1], axis=-1)[:, None]
        return mx.stack(logits), kinds, caches[0]

    monkeypatch.setenv(attention.ENV_VAR, "dequantize")
    with optiq():
        reference, kinds, _ = run()
        assert set(kinds) == {"array"}
        monkeypatch.setenv(attention.ENV_VAR, "quantized_matmul")
        packed, kinds, cache = run()
        assert cache.packed_attention_seen and kinds == ["PackedKV"] * 3
    assert mx.abs(packed - reference).max().item() < 1e-3
    # without the hook the caches never hand out packed views
    _, kinds, cache = run()
    assert set(kinds) == {"array"} and not cache.packed_attention_seen
