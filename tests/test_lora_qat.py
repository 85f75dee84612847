"""QAT at each layer's own bits (`mlx_lm.lora --optiq-qat`, `mlx_lm_optiq.lora.qat`), on the real 4-layer
SmolLM2 dequantized to fp32, at the per-module formats (3/4/5/6-bit, groups 32/64/128) of the quickstart's
optiq_metadata.json, with one adapted module kept float.

The core property: the QAT training forward is the forward of the model that stock `mlx_lm.fuse` + our
re-quantization to the same plan writes, so that model keeps what the adapter learned.
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

import mlx_lm_optiq
from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.jsonio import OptiqFileError, write_json
from mlx_lm_optiq.lora import qat
from mlx_lm_optiq.lora.config import LoraTrainingConfig
from mlx_lm_optiq.lora.peft import export_peft
from tests.helpers import assert_lora_cli_error, main_of, optiq
from tests.test_lora import PROBE, logits, small_dataset, train_args

QUICKSTART_SIDECAR = Path(__file__).resolve().parents[1] / "docs" / "results" / "quickstart-optiq_metadata.json"
FLOAT_MODULE = "model.layers.3.self_attn.v_proj"  # kept float by the test sidecar (and adapted)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    """The quickstart's mixed plan of the full model (the 4-layer model's modules are a subset)."""
    data = json.loads(QUICKSTART_SIDECAR.read_text())
    layers = {k: v for k, v in data["layers"].items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < 4}
    layers[FLOAT_MODULE] = {"bits": 16}
    path = tmp_path_factory.mktemp("qat") / "optiq_metadata.json"
    write_json(path, {"layers": layers}, kind="optiq-metadata")
    return path


def _formats(tiny_float_path, sidecar):
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(tiny_float_path))
    return qat.plan_formats(model, tiny_float_path, sidecar)[0]


def test_straight_through_gradient_reaches_lora_a_and_b(tiny_float_path, sidecar):
    """The layer's gradient for lora_a/lora_b equals the literal STE's, x @ (z + sg(q(z) − z))ᵀ with
    z = W + ΔW, and differs from plain LoRA's on the float weight (the rounding is in the forward)."""
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(tiny_float_path))
    path = "model.layers.0.mlp.down_proj"
    fmt = qat.plan_formats(model, tiny_float_path, sidecar)[0][path]
    assert fmt["bits"] not in (4, 8)  # an odd width: 3/5/6-bit packing is exercised
    mx.random.seed(1)
    base = model.model.layers[0].mlp.down_proj
    lora = LoRALinear.from_base(base, r=4, scale=2.0)
    lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.02
    layer = qat.QATLoRALinear.from_lora(lora, fmt)
    x = mx.random.normal((2, 5, base.weight.shape[1]))

    def literal(params):
        merged = base.weight + ((lora.scale * params["lora_b"].T) @ params["lora_a"].T)
        return x @ qat.straight_through(merged, fmt).T

    def plain(params):
        return x @ base.weight.T + lora.scale * ((x @ params["lora_a"]) @ params["lora_b"])

    def loss_of(forward):
        return lambda params: (forward(params) ** 2).sum()

    def ours(params):
        layer.update(params)
        return layer(x)

    params = {"lora_a": lora.lora_a, "lora_b": lora.lora_b}
    value, grads = mx.value_and_grad(loss_of(ours))(params)
    want_value, want = mx.value_and_grad(loss_of(literal))(params)
    _, plain_grads = mx.value_and_grad(loss_of(plain))(params)
    assert abs(value.item() - want_value.item()) <= 1e-4 * abs(want_value.item())
    for key in ("lora_a", "lora_b"):
        assert mx.abs(grads[key]).max().item() > 0, key
        scale = mx.abs(want[key]).max().item()
        assert mx.abs(grads[key] - want[key]).max().item() <= 1e-3 * scale, key
        assert mx.abs(grads[key] - plain_grads[key]).max().item() > 1e-3 * scale, key
    # only the adapter trains; the forward is the quantized merged weight's
    assert set(dict(_flat(layer.trainable_parameters()))) == {"lora_a", "lora_b"}
    assert mx.allclose(ours(params), x @ qat.fake_quantize(layer.merged_weight(), fmt).T, atol=1e-4).item()


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def test_qat_run_fuses_and_requantizes_to_the_model_it_trained(tiny_float_path, sidecar, shared_dir, tmp_path, capsys):
    """`mlx_lm.lora --optiq-qat` saves a stock adapter; stock `mlx_lm.fuse` (optiq off) fuses it into the
    float base; `python -m mlx_lm_optiq.lora.qat` writes that at the plan's formats; stock `mlx_lm.load`
    reads it, and its logits are the QAT forward's (the model that trained) to float tolerance."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load

    data = small_dataset(shared_dir, tmp_path / "data", n_train=4, n_valid=2, chars=80)
    adapters = tmp_path / "adapters"
    args = train_args(tiny_float_path, data, adapters, "--optiq-qat", "--optiq-metadata", sidecar, iters=2)
    args[args.index("--max-seq-length") + 1] = 32
    # stock `mlx_lm.lora`'s main, in-process with the hooks on (as MLX_LM_OPTIQ=1 turns them on)
    with optiq():
        main_of("lora", args)
    printed = capsys.readouterr().out
    assert "QAT at the formats of" in printed and "1 stay float" in printed, printed[-2000:]
    stock_config = json.loads((adapters / "adapter_config.json").read_text())
    assert stock_config["fine_tune_type"] == "lora" and stock_config["optiq_qat"] is True
    assert not (adapters / "optiq_lora_config.json").exists()  # plain stock adapter files
    weights = mx.load(str(adapters / "adapters.safetensors"))
    assert {k.rsplit(".", 1)[1] for k in weights} == {"lora_a", "lora_b"}
    assert max(mx.abs(w).max().item() for k, w in weights.items() if k.endswith("lora_b")) > 0  # it trained
    peft_dir = export_peft(adapters, tmp_path / "peft")  # and exports to PEFT like any stock LoRA adapter
    assert json.loads((peft_dir / "adapter_config.json").read_text())["r"] == 8

    fused, requantized = tmp_path / "fused", tmp_path / "requantized"
    assert not mlx_lm_optiq.enabled_patches()  # stock `mlx_lm.fuse`: the hooks are off
    main_of("fuse", ["--model", tiny_float_path, "--adapter-path", adapters, "--save-path", fused])
    qat.main(["--model", str(fused), "--metadata", str(sidecar), "--mlx-path", str(requantized)])
    written = json.loads((requantized / "optiq_metadata.json").read_text())
    assert written["writer"]["method"] == "rtn" and written["layers"] == json.loads(sidecar.read_text())["layers"]

    # the QAT forward, rebuilt from the saved adapter as training ran it
    model, _ = load(str(tiny_float_path))
    formats = _formats(tiny_float_path, sidecar)
    load_adapters(model, str(adapters))
    qat.apply_qat(model, formats)
    model.eval()
    assert isinstance(model.model.layers[0].self_attn.q_proj, qat.QATLoRALinear)
    assert type(dict(model.named_modules())[FLOAT_MODULE]).__name__ == "LoRALinear"
    want = logits(model)

    out, _ = load(str(requantized))  # stock loader, real quantized kernels
    modules = dict(out.named_modules())
    for path, fmt in formats.items():
        if fmt:
            assert (modules[path].bits, modules[path].group_size, modules[path].mode) == (
                fmt["bits"],
                fmt["group_size"],
                fmt["mode"],
            ), path
        else:
            assert type(modules[path]) is nn.Linear, path
    got = logits(out)
    assert mx.abs(got - want).max().item() <= 1e-4 * mx.abs(want).max().item()
    # the same adapter without QAT's forward (float base + adapter) is far from the re-quantized model
    float_model, _ = load(str(tiny_float_path), adapter_path=str(adapters))
    assert mx.abs(logits(float_model) - got).max().item() > 100 * mx.abs(got - want).max().item()
    assert len(PROBE[0]) == got.shape[1]


def test_qat_with_rank_scaling_and_eval_mode_is_exactly_the_fused_forward(tiny_float_path, sidecar):
    """QAT goes on after per-module ranks (apply_rank_plan) and keeps them; in eval mode the layer's
    output is x @ fq(W + ΔW)ᵀ exactly (the straight-through terms cancel to 0)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from mlx_lm_optiq.lora import adapter_files

    model, _ = load(str(tiny_float_path))
    formats = _formats(tiny_float_path, sidecar)
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 4, "scale": 20.0, "dropout": 0.1})
    modules = adapter_files.lora_modules(model)
    ranks = {name: 2 + i % 3 for i, name in enumerate(modules)}
    adapter_files.build_lora_modules(model, ranks, scale=20.0, dropout=0.1)
    counts = qat.apply_qat(model, formats)
    assert counts == {"adapted": 6, "fake_quantized": 22, "float": 1}
    layers = adapter_files.lora_modules(model)
    assert {n: adapter_files.module_rank(m) for n, m in layers.items()} == ranks
    layer = model.model.layers[3].mlp.up_proj
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.01
    x = mx.random.normal((1, 3, 576))
    model.eval()
    exact = x @ qat.fake_quantize(layer.merged_weight(), layer.format).T
    assert mx.array_equal(layer(x), exact).item()
    fused = layer.fuse()  # in memory, the layer fuses to what it trained as
    assert (fused.bits, fused.group_size) == (layer.bits, layer.group_size)
    assert mx.allclose(fused(x), exact, atol=1e-4).item()
    model.train()  # training with dropout: the dropped update's terms no longer cancel
    assert not mx.array_equal(layer(x), exact).item()


def test_flag_errors(tiny_float_path, tiny_q4_path, sidecar, tmp_path, monkeypatch, capsys):

    with pytest.raises(ConfigError, match="qat: trains on the float model .* drop `load_in_4bits`"):
        LoraTrainingConfig(qat=True, load_in_4bits=True)
    with pytest.raises(ConfigError, match="qat: needs `fine_tune_type` lora .* got 'dora'"):
        LoraTrainingConfig(qat=True, fine_tune_type="dora")
    with pytest.raises(ConfigError, match="qat: expected true or false, got 'yes'"):
        LoraTrainingConfig(qat="yes")
    assert LoraTrainingConfig(qat=True, metadata=sidecar).metadata == sidecar  # the sidecar is read by qat

    base = ["mlx_lm.lora", "--train", "--adapter-path", str(tmp_path / "ad"), "--optiq-qat"]
    with optiq():
        for extra, message in (
            (
                ["--model", str(tiny_q4_path), "--optiq-metadata", str(sidecar)],
                "--optiq-qat / optiq_qat: " + str(Path(tiny_q4_path) / "config.json") + ": field 'quantization' "
                "is present: the model is quantized",
            ),
            (
                ["--model", str(tiny_float_path)],
                "optiq_metadata.json: file not found. This needs the per-layer sidecar",
            ),
            (
                ["--model", str(tiny_float_path), "--optiq-metadata", str(sidecar), "--optiq-load-mixed"],
                "--optiq-qat / optiq_qat: trains on the float model and quantizes by the sidecar itself; "
                "drop --optiq-load-mixed",
            ),
            (
                ["--model", str(tiny_float_path), "--optiq-metadata", str(sidecar), "--fine-tune-type", "dora"],
                "--optiq-qat / optiq_qat: needs --fine-tune-type lora",
            ),
        ):
            assert_lora_cli_error(monkeypatch, capsys, [*base, *extra], message)

    # a plan that does not fit the model is refused naming the field, before training
    bad = json.loads(sidecar.read_text())
    bad["layers"]["model.layers.0.self_attn.k_proj"]["group_size"] = 128
    write_json(tmp_path / "bad.json", bad, kind="optiq-metadata")
    with pytest.raises(OptiqFileError, match=r"field 'layers.model.layers.0.self_attn.k_proj.group_size' is 128"):
        _formats(tiny_float_path, tmp_path / "bad.json")
    # DoRA layers are refused by name
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(tiny_float_path))
    formats = qat.plan_formats(model, tiny_float_path, sidecar)[0]
    linear_to_lora_layers(model, 1, {"rank": 2, "scale": 1.0, "dropout": 0.0}, use_dora=True)
    with pytest.raises(ConfigError, match="model.layers.3.self_attn.q_proj is a DoRA layer"):
        qat.apply_qat(model, formats)
    # re-quantizing a quantized model would round twice: refused, naming its config
    with pytest.raises(ConfigError, match="model: .*config.json: field 'quantization' is present"):
        qat.requantize(tiny_q4_path, tmp_path / "out", sidecar)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        qat.main(["--model", str(tiny_float_path), "--mlx-path", str(tmp_path / "out2")])
    assert "python -m mlx_lm_optiq.lora.qat: error: --metadata: " in capsys.readouterr().err
