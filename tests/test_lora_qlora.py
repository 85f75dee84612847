"""Load-time quantization of a float base for QLoRA (--optiq-load-in-*, --optiq-load-mixed), on the
real 4-layer SmolLM2 dequantized to fp32."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.jsonio import OptiqFileError, write_json
from mlx_lm_optiq.lora import adapter_files
from mlx_lm_optiq.lora.config import LoraTrainingConfig
from mlx_lm_optiq.lora.qlora import load_quantized
from tests.helpers import main_of, optiq
from tests.test_lora import PROBE, logits, small_dataset, train_args


def _mixed_sidecar(float_path, out_file, float_layer=None):
    """Per-layer bits from stock mlx-lm's mixed_4_6 recipe (group 64), one layer optionally kept float."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(float_path), lazy=True)
    recipe = mixed_quant_predicate_builder("mixed_4_6", model, 64)
    layers = {}
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized") and "weight" in module:
            choice = recipe(path, module)
            layers[path] = {"bits": choice["bits"], "group_size": choice["group_size"], "mode": "affine"}
    if float_layer:
        layers[float_layer] = {"bits": 16}
    write_json(out_file, {"layers": layers}, kind="optiq-metadata")
    return out_file


@pytest.fixture(scope="module")
def mixed_sidecar(tiny_float_path, tmp_path_factory):
    return _mixed_sidecar(
        tiny_float_path,
        tmp_path_factory.mktemp("side") / "optiq_metadata.json",
        float_layer="model.layers.1.self_attn.q_proj",
    )


def test_load_in_4bits_quantizes_every_layer_with_group_fallback(tiny_float_path, capsys):
    from mlx_lm.utils import load_model

    model, _, config = load_quantized(tiny_float_path, "load_in_4bits", progress=False)
    assert "group size 128 does not divide the input dims of 25 layers; quantized them with group size 64" in (
        capsys.readouterr().out
    )
    float_model, _ = load_model(Path(tiny_float_path))
    float_modules = dict(float_model.named_modules())
    for path, module in model.named_modules():
        if path in float_modules and isinstance(float_modules[path], (nn.Linear, nn.Embedding)):
            assert isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)), path
            # 576-dim inputs cannot take group 128; down_proj's 1536 can
            expected_group = 128 if path.endswith("down_proj") else 64
            assert (module.bits, module.group_size, module.mode) == (4, expected_group, "affine"), path
            assert config["quantization"][path] == {"group_size": expected_group, "bits": 4, "mode": "affine"}
            w, scales, biases = mx.quantize(float_modules[path].weight, expected_group, 4)
            assert mx.array_equal(module.weight, w) and mx.array_equal(module.scales, scales), path
    # still the same model: 4-bit costs a little, not everything
    ref = nn.log_softmax(logits(float_model), axis=-1)
    kl = (mx.exp(ref) * (ref - nn.log_softmax(logits(model), axis=-1))).sum(-1).mean().item()
    assert 0 < kl < 0.5


@pytest.mark.parametrize(
    "scheme,bits,group,mode",
    [("load_in_mxfp4", 4, 32, "mxfp4"), ("load_in_6bits", 6, 64, "affine"), ("load_in_8bits", 8, 64, "affine")],
)
def test_other_uniform_schemes(tiny_float_path, scheme, bits, group, mode):
    model, _, config = load_quantized(tiny_float_path, scheme, progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and (q.bits, q.group_size, q.mode) == (bits, group, mode)
    assert config["quantization"]["model.layers.0.self_attn.q_proj"]["mode"] == mode


def test_load_mixed_follows_the_sidecar(tiny_float_path, mixed_sidecar):
    model, _, config = load_quantized(tiny_float_path, "load_mixed", metadata_path=mixed_sidecar, progress=False)
    layers = json.loads(Path(mixed_sidecar).read_text())["layers"]
    modules = dict(model.named_modules())
    assert {layers[p]["bits"] for p in layers} == {4, 6, 16}
    for path, entry in layers.items():
        if entry["bits"] == 16:
            assert type(modules[path]) is nn.Linear and config["quantization"][path] is False
        else:
            assert (modules[path].bits, modules[path].group_size) == (entry["bits"], entry["group_size"]), path


def test_load_time_quantization_errors(tiny_float_path, tiny_q4_path, mixed_sidecar, tmp_path):
    with pytest.raises(ValueError, match=r"config.json: field 'quantization' is present.*needs a float base"):
        load_quantized(tiny_q4_path, "load_in_4bits", progress=False)
    with pytest.raises(ConfigError, match="load_in_4bits/load_mixed: choose one load-time quantization"):
        LoraTrainingConfig(load_in_4bits=True, load_mixed=True)
    _choose_one_through_the_hook(tiny_float_path)
    bad = json.loads(Path(mixed_sidecar).read_text())
    bad["layers"]["model.layers.0.self_attn.k_proj"]["group_size"] = 128
    write_json(tmp_path / "bad.json", bad, kind="optiq-metadata")
    with pytest.raises(
        OptiqFileError, match=r"bad.json: field 'layers.model.layers.0.self_attn.k_proj.group_size' is 128"
    ):
        load_quantized(tiny_float_path, "load_mixed", metadata_path=tmp_path / "bad.json", progress=False)
    bad["layers"]["model.layers.0.self_attn.k_proj"]["group_size"] = 64
    del bad["layers"]["model.embed_tokens"]
    write_json(tmp_path / "partial.json", bad, kind="optiq-metadata")
    with pytest.raises(OptiqFileError, match=r"partial.json: field 'layers' has no entry for model.embed_tokens"):
        load_quantized(tiny_float_path, "load_mixed", metadata_path=tmp_path / "partial.json", progress=False)
    with pytest.raises(OptiqFileError, match="optiq_metadata.json: file not found"):
        load_quantized(tiny_float_path, "load_mixed", progress=False)


def _choose_one_through_the_hook(float_path):
    """mlx_lm.lora refuses two load-time quantizations before loading anything, naming both flags."""
    import types

    import mlx_lm.lora

    args = types.SimpleNamespace(
        **{
            **mlx_lm.lora.CONFIG_DEFAULTS,
            "model": str(float_path),
            "optiq_load_in_4bits": True,
            "optiq_load_mixed": True,
        }
    )
    with optiq():
        with pytest.raises(ValueError, match="--optiq-load-in-4bits/--optiq-load-mixed: choose one load-time"):
            mlx_lm.lora.run(args)


def _peak(float_path, kind):
    """(peak MLX memory above what was held before, the model's bytes) of loading `float_path` 4-bit:
    ours (quantizing while loading) or the naive way (load the float model, then quantize it)."""
    import gc

    from mlx.utils import tree_flatten

    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    if kind == "optiq":
        model, _, _ = load_quantized(float_path, "load_in_4bits", progress=False)
    else:
        from mlx_lm.utils import load_model, quantize_model

        model, config = load_model(Path(float_path))
        model, _ = quantize_model(model, config, 64, 4)
        mx.eval(model.parameters())
    return mx.get_peak_memory() - base, sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def test_quantizes_while_loading_never_holding_both_models(tiny_float_path):
    float_bytes = sum(f.stat().st_size for f in Path(tiny_float_path).glob("*.safetensors"))
    # measured in this process, each above the memory held before it (as test_sensitivity's peaks)
    ours, quantized_bytes = _peak(tiny_float_path, "optiq")
    naive, _ = _peak(tiny_float_path, "naive")
    assert naive >= float_bytes  # the float model was fully resident
    # ours holds the quantized model plus at most a layer in float: less than the float model alone
    assert ours < float_bytes
    assert ours < naive - quantized_bytes


def test_qlora_cli_mixed_base_with_by_bits_ranks(tiny_float_path, mixed_sidecar, shared_dir, tmp_path, capsys):
    data = small_dataset(shared_dir, tmp_path / "data", n_train=4, n_valid=2, chars=80)
    out = tmp_path / "qlora"
    args = train_args(
        tiny_float_path,
        data,
        out,
        "--optiq-load-mixed",
        "--optiq-metadata",
        mixed_sidecar,
        "--optiq-rank-scaling",
        "by_bits",
        "--rank",
        4,
        iters=1,
    )
    args[args.index("--max-seq-length") + 1] = 32
    args[args.index("--batch-size") + 1] = 1
    # stock `mlx_lm.lora`'s main, in-process with the hooks on (as MLX_LM_OPTIQ=1 turns them on)
    with optiq():
        main_of("lora", args)
    assert "optiq: quantizing while loading" in capsys.readouterr().err
    record = adapter_files.read_record(out)
    assert record["modules"]["model.layers.3.mlp.down_proj"]["bits"] == 6
    assert record["modules"]["model.layers.1.self_attn.q_proj"]["bits"] == 16
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["optiq_load_mixed"] is True
    # mount on the same quantized base: LoRA over QuantizedLinear, adapters in float
    model, _, _ = load_quantized(tiny_float_path, "load_mixed", metadata_path=mixed_sidecar, progress=False)
    base = logits(model)
    adapter_files.load_compact_adapters(model, out)
    down = model.model.layers[3].mlp.down_proj
    assert isinstance(down.linear, nn.QuantizedLinear) and down.linear.bits == 6
    assert down.lora_a.dtype == mx.float32
    assert adapter_files.module_rank(down) == record["modules"]["model.layers.3.mlp.down_proj"]["rank"]
    assert mx.abs(logits(model) - base).max().item() > 1e-3
    assert len(PROBE[0]) == logits(model).shape[1]
