"""Tiny random-weight models built with mlx-lm's own model classes, for cache-layout tests.

- `tiny_hybrid()`: qwen3_next (linear-attention/SSM layers with ArraysCache + full
  attention layers with KVCache, every `full_attention_interval`-th layer).
- `tiny_sliding()`: gemma3_text (sliding-window layers with RotatingKVCache +
  global layers with KVCache, every `sliding_window_pattern`-th layer). mlx-lm's own
  gemma3 classes, so the layer kinds, masks (the sliding mask comes from the first
  slot's cache) and local/global RoPE are gemma3's; by default 4 layers alternating
  sliding/global (`pattern=2`); `layers=6, pattern=6` gives gemma3's real ratio of
  5 sliding layers to 1 global one.
Weights are seeded and kept in float32 (fast on CPU); head_dim is 64 so group
sizes 32/64 apply as on real models.
"""

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten


def _init(model, seed):
    """Deterministic small weights (mlx-lm's defaults vary with the global RNG)."""
    mx.random.seed(seed)
    params = tree_flatten(model.parameters())
    fresh = []
    for name, p in params:
        if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
            fresh.append((name, mx.ones(p.shape, dtype=mx.float32)))
        else:
            fresh.append((name, (0.05 * mx.random.normal(p.shape)).astype(mx.float32)))
    model.update(tree_unflatten(fresh))
    mx.eval(model.parameters())
    return model


def tiny_hybrid(seed=0):
    from mlx_lm.models import qwen3_next

    args = qwen3_next.ModelArgs(
        model_type="qwen3_next",
        hidden_size=128,
        num_hidden_layers=4,
        intermediate_size=256,
        num_attention_heads=4,
        linear_num_value_heads=2,
        linear_num_key_heads=2,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        shared_expert_intermediate_size=128,
        mlp_only_layers=[],
        moe_intermediate_size=64,
        rms_norm_eps=1e-6,
        vocab_size=512,
        num_key_value_heads=2,
        rope_theta=10000.0,
        partial_rotary_factor=0.25,
        max_position_embeddings=4096,
        head_dim=64,
        full_attention_interval=2,
    )
    return _init(qwen3_next.Model(args), seed)


def tiny_sliding(seed=0, window=32, layers=4, pattern=2):
    from mlx_lm.models import gemma3_text

    args = gemma3_text.ModelArgs(
        model_type="gemma3_text",
        hidden_size=128,
        num_hidden_layers=layers,
        intermediate_size=256,
        num_attention_heads=4,
        head_dim=64,
        vocab_size=512,
        num_key_value_heads=2,
        query_pre_attn_scalar=64,
        sliding_window=window,
        sliding_window_pattern=pattern,
        max_position_embeddings=4096,
    )
    return _init(gemma3_text.Model(args), seed)
