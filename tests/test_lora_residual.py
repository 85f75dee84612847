"""Residual-aware LoRA (issue 15 items 2-3): rank scaling by_residual and LoftQ initialisation, on
the real 4-layer SmolLM2 (fp32 dequantized, quantized while loading at a sidecar's per-layer bits,
so the float weights and the exact quantized base are both at hand)."""

import copy
import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_lm_optiq
from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.jsonio import write_json
from mlx_lm_optiq.core.model_tree import is_quantized
from mlx_lm_optiq.lora import adapter_files
from mlx_lm_optiq.lora.config import LoraTrainingConfig
from mlx_lm_optiq.lora.pipeline import apply_rank_plan, plan_ranks
from mlx_lm_optiq.lora.ranks import allocate_by_gain, budget_params, lora_params, mode_ranks, rank_cost
from mlx_lm_optiq.quality import float32_model
from tests.helpers import assert_lora_cli_error, optiq
from tests.test_lora import logits, run_mlx_lm, small_dataset, train_args

NUM_LAYERS = 2  # LoRA on blocks 2-3: 14 modules keep the SVDs fast
RANK, SCALE = 4, 20.0
BOOSTED = "model.layers.3.self_attn.o_proj"  # the module the constructed sidecar calls most sensitive


def _sidecar(float_path, out_file, boosted_kl=None, base_model=None):
    """Every linear layer 4-bit g64 (mlp 3-bit) with one KL per layer; `boosted_kl` on BOOSTED."""
    from mlx_lm.utils import load_model

    model, _ = load_model(float_path, lazy=True)
    layers = {}
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized") and "weight" in module:
            bits = 3 if ".mlp." in path else 4
            kl = boosted_kl if path == BOOSTED and boosted_kl else 0.01
            layers[path] = {"bits": bits, "group_size": 64, "mode": "affine", "kl": {f"{bits}:64": kl}}
    payload = {"layers": layers, **({"base_model": str(base_model)} if base_model else {})}
    write_json(out_file, payload, kind="optiq-metadata")
    return out_file


@pytest.fixture(scope="module")
def sidecar(tiny_float_path, tmp_path_factory):
    return _sidecar(tiny_float_path, tmp_path_factory.mktemp("resid") / "optiq_metadata.json", boosted_kl=0.5)


def _lora_model(float_path, sidecar_path):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_lm_optiq.lora.qlora import load_quantized

    model, _, _ = load_quantized(float_path, "load_mixed", metadata_path=sidecar_path, progress=False)
    model.freeze()
    lora_parameters = {"rank": RANK, "scale": SCALE, "dropout": 0.0}
    linear_to_lora_layers(model, NUM_LAYERS, lora_parameters)
    return model, lora_parameters


def _kl_to_float(model, float_model, tokens):
    ref = nn.log_softmax(float_model(tokens).astype(mx.float32), axis=-1)
    out = nn.log_softmax(model(tokens).astype(mx.float32), axis=-1)
    return (mx.exp(ref) * (ref - out)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def residual_run(tiny_float_path, sidecar, tmp_path_factory):
    """by_residual + loftq planned and applied; its adapter directory saved (padded, stock config)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_config

    model, lora_parameters = _lora_model(tiny_float_path, sidecar)
    config = LoraTrainingConfig(rank_scaling="by_residual", metadata=sidecar, load_mixed=True, lora_init="loftq")
    out = tmp_path_factory.mktemp("resid") / "adapter"
    plan = plan_ranks(config, model, RANK, tiny_float_path, progress=False)
    apply_rank_plan(model, plan, lora_parameters, use_dora=False, adapter_path=out, base_model=str(tiny_float_path))
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    save_config(
        {
            "fine_tune_type": "lora",
            "model": str(tiny_float_path),
            "num_layers": NUM_LAYERS,
            "lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.0},
        },
        out / "adapter_config.json",
    )
    adapter_files.finalize_adapter_dir(out)
    return model, plan, out


def test_allocate_by_gain_keeps_the_budget_exactly():
    rng = np.random.default_rng(0)
    shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
    dims = {f"m{i}": shapes[i % 4] for i in range(29)}
    for base_rank in (1, 4, 8, 16):
        gains = {
            n: np.sort(rng.exponential(size=4 * base_rank))[::-1] * rng.choice([0.0, 1e-4, 1.0, 30.0]) for n in dims
        }
        ranks = allocate_by_gain(dims, gains, base_rank)
        budget, used = budget_params(dims, base_rank), lora_params(dims, ranks)
        growable = [rank_cost(dims[n]) for n in dims if ranks[n] < 4 * base_rank]
        assert used <= budget and budget - used < min(growable, default=budget + 1)
        assert min(ranks.values()) >= 1 and max(ranks.values()) <= 4 * base_rank
    # it maximises the gain: equal costs, one module's steps worth 10x -> it fills to the cap first
    dims = {n: (64, 64) for n in "abcd"}
    gains = {n: np.full(16, 10.0 if n == "b" else 1.0) for n in dims}
    assert allocate_by_gain(dims, gains, 4) == {"a": 1, "b": 13, "c": 1, "d": 1}


def test_by_residual_follows_sensitivity_weighted_residual(residual_run, sidecar):
    from mlx_lm_optiq.weights.metadata import read_metadata

    _, plan, out = residual_run
    ranks, dims = plan.ranks, plan.dims
    assert lora_params(dims, ranks) <= plan.budget_params
    growable = [rank_cost(dims[n]) for n in dims if ranks[n] < 4 * RANK]
    assert plan.budget_params - lora_params(dims, ranks) < min(growable)
    # the module whose residual the sidecar says hurts 50x more gets the most rank of its shape ...
    same_shape = [n for n in dims if dims[n] == dims[BOOSTED] and n != BOOSTED]
    assert ranks[BOOSTED] > RANK and all(ranks[BOOSTED] > ranks[n] for n in same_shape)
    # ... which by_bits cannot see: every attention layer here is 4-bit, so it ranks them alike
    by_bits = mode_ranks("by_bits", dims, RANK, read_metadata(sidecar), sidecar)
    assert len({by_bits[n] for n in [BOOSTED, *same_shape]}) == 1
    # the record carries each module's residual energy and the share its rank removes
    record = adapter_files.read_record(out)
    assert record["rank_scaling"] == "by_residual" and record["init"] == "loftq"
    boosted = record["modules"][BOOSTED]
    assert boosted["residual_energy"] > 0 and 0 < boosted["residual_captured"] < 1
    others = [record["modules"][n]["residual_captured"] for n in same_shape]
    assert boosted["residual_captured"] > max(others)  # more rank: more of its residual removed


def test_loftq_init_is_the_truncated_svd_of_the_residual(residual_run, tiny_float_path, austen):
    from mlx_lm.utils import load

    model, plan, _ = residual_run
    float_model, tokenizer = load(str(tiny_float_path))
    tokens = mx.array(tokenizer.encode(austen("emma")[20000:22000])[:256])[None]
    float_modules, modules = dict(float_model.named_modules()), dict(model.named_modules())
    checked = {}  # one module of each shape: the same code path, a third of the SVDs
    for path, rank in plan.ranks.items():
        if checked.setdefault(plan.dims[path], path) != path and path != BOOSTED:
            continue
        layer = modules[path]
        q = layer.linear
        deq = mx.dequantize(q.weight, q.scales, q.biases, group_size=q.group_size, bits=q.bits)
        residual = np.array(float_modules[path].weight - deq, dtype=np.float64)
        # singular values by MLX's SVD (numpy's LAPACK is slow on the shared CPU), independent of
        # the Gram eigensolve the init uses
        s = np.array(mx.linalg.svd(mx.array(residual.astype(np.float32)), compute_uv=False, stream=mx.cpu))
        s = s.astype(np.float64)
        update = SCALE * np.array(layer.lora_a @ layer.lora_b, dtype=np.float64).T  # rank <= r by shape
        # Eckart-Young: the best rank-r approximation leaves exactly the energy past sigma_r
        left = np.sum((residual - update) ** 2)
        assert abs(left - np.sum(s[rank:] ** 2)) <= 1e-4 * np.sum(s**2), path
    # it starts closer to the float model than stock's zero init on the same quantized base; both run
    # as simulated quantization (each quantized layer as its exact dequantized fp32 weight, logits
    # within ~1e-4 of the quantized kernels': CPU quantized matmuls took ~13 s per forward here)
    zero_model, lora_parameters = _lora_model(tiny_float_path, plan.metadata_path)
    loftq, zero = float32_model(copy.deepcopy(model)), float32_model(zero_model)
    assert is_quantized(model) and not is_quantized(loftq) and not is_quantized(zero)
    assert _kl_to_float(loftq, float_model, tokens) < 0.98 * _kl_to_float(zero, float_model, tokens)


def test_loftq_adapter_round_trips_through_stock_load_and_peft(residual_run, tiny_float_path, tmp_path):
    from mlx_lm import load

    from mlx_lm_optiq.lora.peft import export_peft, import_peft

    model, plan, out = residual_run
    ranks, compact, _ = adapter_files.read_adapter(out)
    assert ranks == plan.ranks
    for path in ranks:  # B.A nonzero at init, as trained
        assert mx.abs(compact[f"{path}.lora_a"] @ compact[f"{path}.lora_b"]).max().item() > 1e-4
    imported = import_peft(export_peft(out, tmp_path / "peft"), tmp_path / "imported", base_model=tiny_float_path)
    ranks2, compact2, meta = adapter_files.read_adapter(imported)
    assert ranks2 == ranks and meta["scale"] == SCALE
    for key, w in compact.items():
        np.testing.assert_array_equal(np.array(compact2[key]), np.array(w))
    # stock mlx-lm (optiq off) loads the padded directory: same outputs as the compact adapter
    mlx_lm_optiq.disable()
    stock, _ = load(str(tiny_float_path), adapter_path=str(out))
    compact_model, _ = load(str(tiny_float_path))
    adapter_files.load_compact_adapters(compact_model, out)
    np.testing.assert_allclose(np.array(logits(stock)), np.array(logits(compact_model)), atol=1e-4)


@pytest.mark.slow
def test_peft_library_loads_the_loftq_init(residual_run, tiny_float_path, tmp_path):
    pytest.importorskip("peft")
    from mlx_lm import load

    from mlx_lm_optiq.lora.peft import export_peft
    from tests.test_peft import _hf_logits

    _, _, out = residual_run
    exported = export_peft(out, tmp_path / "peft")
    mlx_lm_optiq.disable()
    model, _ = load(str(tiny_float_path))
    adapter_files.load_compact_adapters(model, out)
    hf_adapted, hf_base = _hf_logits(tiny_float_path, exported), _hf_logits(tiny_float_path)
    assert np.abs(hf_adapted - hf_base).max() > 1e-2  # the init is not a no-op
    np.testing.assert_allclose(hf_adapted, np.array(logits(model)), atol=2e-3)


def test_by_residual_without_float_weights_is_a_clear_error(tiny_q4_path, tiny_float_path, tmp_path):
    # an already-quantized base whose sidecar does not record the source model
    side = _sidecar(tiny_float_path, tmp_path / "optiq_metadata.json")
    for field, kwargs in (("rank_scaling", {"rank_scaling": "by_residual"}), ("lora_init", {"lora_init": "loftq"})):
        config = LoraTrainingConfig(metadata=side, **kwargs)
        with pytest.raises(ConfigError, match="load_mixed.*load_in_4bits.*base_model") as e:
            config.check_sidecar(tiny_q4_path)
        assert e.value.field == field
    # with the source recorded it passes (the float weights are the source's dequantization)
    side = _sidecar(tiny_float_path, tmp_path / "recorded.json", base_model=tiny_float_path)
    LoraTrainingConfig(metadata=side, rank_scaling="by_residual").check_sidecar(tiny_q4_path)
    with pytest.raises(ConfigError, match="expected one of \\['zero', 'loftq'\\]"):
        LoraTrainingConfig(lora_init="svd")
    with pytest.raises(ConfigError, match="loftq initialises LoRA layers"):
        LoraTrainingConfig(lora_init="loftq", fine_tune_type="dora")


def test_cli_by_residual_loftq_run_and_info(tiny_float_path, sidecar, shared_dir, tmp_path, capsys, monkeypatch):
    """The flags through the real `mlx_lm lora` console entry point, then `lora.info` shows the residuals
    and a resume is refused (`lora.info`'s main, and stock `mlx_lm.lora`'s with the hooks on, in this
    process: interpreter starts less)."""
    from mlx_lm_optiq.lora import info

    data = small_dataset(shared_dir, tmp_path / "data")
    adapter = tmp_path / "adapter"
    env = {**os.environ, "MLX_LM_OPTIQ": "1"}
    args = train_args(tiny_float_path, data, adapter, "--optiq-load-mixed", "--optiq-metadata", sidecar, iters=1)
    args[args.index("--num-layers") + 1] = NUM_LAYERS
    args[args.index("--max-seq-length") + 1] = 32  # shorter CPU steps on the quantized base
    extra = ["--rank", RANK, "--optiq-rank-scaling", "by_residual", "--optiq-lora-init", "loftq"]
    proc = run_mlx_lm("lora", [*args, *extra], env)
    assert "rank scaling by_residual" in proc.stdout
    record = adapter_files.read_record(adapter)
    assert record["init"] == "loftq" and record["trainable_params"] <= record["budget_params"]
    capsys.readouterr()
    info.main([str(adapter), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["init"] == "loftq" and 0 < summary["residual_captured"] < 1
    # resuming a loftq run is refused before loading: the init would be overwritten (exit 1, one error line)
    with optiq():
        assert_lora_cli_error(
            monkeypatch,
            capsys,
            ["mlx_lm.lora", *map(str, [*args, *extra, "--resume-adapter-file", adapter / "adapters.safetensors"])],
            "--optiq-lora-init / optiq_lora_init: loftq initialises a new adapter",
        )
