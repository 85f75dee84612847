"""Stock `mlx_lm.lora` settings with optiq on (issue 15 item 5), on a model our convert wrote.

The base is the 4-layer SmolLM2 written by `mlx_lm.convert --optiq-target-bpw` with 3-, 4- and
6-bit layers (its optiq_metadata.json sidecar next to it), so `--optiq-rank-scaling by_bits`
reads our convert's own bits. Training runs through stock `mlx_lm.lora.main()` in-process
(command line or `-c` YAML, as a user types it) for one step of 16 tokens on ../shared's
GSM-Symbolic: quantized matmuls are slow on CPU, so every run is as short as the check allows.
"""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_lm_optiq.lora import adapter_files
from tests.helpers import main_of, optiq
from tests.test_lora import PROBE, small_dataset

# bits whose packing stock DoRALinear.from_base gets wrong (32 % bits != 0)
ODD_BITS = (3, 5, 6)


def lora_args(model, data, adapter_path, *extra, iters=1):
    return [
        "--model",
        model,
        "--train",
        "--data",
        data,
        "--adapter-path",
        adapter_path,
        "--iters",
        iters,
        "--batch-size",
        1,
        "--max-seq-length",
        16,
        "--val-batches",
        0,  # no validation pass: the checks here are on the adapter, not its loss
        "--steps-per-report",
        1,
        "--learning-rate",
        "1e-3",
        "--num-layers",
        2,
        *extra,
    ]


def probe_logits(model):
    out = model(mx.array(PROBE)[:, :8]).astype(mx.float32)
    mx.eval(out)
    return out


def max_diff(a, b):
    return mx.abs(a - b).max().item()


def load(path, adapter_path=None, hooks=False):
    from mlx_lm import load as mlx_load

    with optiq(hooks):
        model, _ = mlx_load(str(path), adapter_path=str(adapter_path) if adapter_path else None)
    return model


def layer_bits(model_path):
    return {p: e["bits"] for p, e in json.loads((model_path / "optiq_metadata.json").read_text())["layers"].items()}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mixed(tiny_float_path, tmp_path_factory):
    """Our `--optiq-target-bpw` convert with 3/4/6-bit candidates (one short fisher sample,
    round-to-nearest writer: fast); the sidecar lies next to the model."""
    out = tmp_path_factory.mktemp("stock") / "mixed"
    with optiq():
        from mlx_lm import convert

        convert(
            str(tiny_float_path),
            mlx_path=str(out),
            quantize=True,
            optiq_target_bpw=4.8,
            optiq_candidates="3:64,4:64,6:64",
            optiq_sensitivity_method="fisher",
            optiq_clipping="none",
            optiq_writer="rtn",
            optiq_num_samples=1,
            optiq_sequence_length=64,
        )
    assert {layer_bits(out)[p] for p in layer_bits(out) if ".layers.2." in p or ".layers.3." in p} & set(ODD_BITS)
    return out


@pytest.fixture(scope="module")
def data(shared_dir, tmp_path_factory):
    return small_dataset(shared_dir, tmp_path_factory.mktemp("stock-data"), n_train=4, n_valid=2, chars=80)


@pytest.fixture(scope="module")
def yaml_run(mixed, data, tmp_path_factory):
    """LoRA from a -c YAML config: num_layers 2, lora_parameters rank/scale/dropout, our optiq keys
    (by_bits from the converted model's own sidecar, max rank). Records the LoRA layers the stock
    trainer got (their rank, scale and dropout)."""
    import mlx_lm.lora

    work = tmp_path_factory.mktemp("yaml")
    out = work / "adapter"
    config = work / "lora.yaml"
    config.write_text(
        f"model: {mixed}\ntrain: true\ndata: {data}\nadapter_path: {out}\niters: 1\nbatch_size: 1\n"
        "max_seq_length: 16\nval_batches: 0\nnum_layers: 2\nlearning_rate: 1.0e-3\n"
        f"optiq_rank_scaling: by_bits\noptiq_metadata: {mixed / 'optiq_metadata.json'}\noptiq_max_rank: 8\n"
        "lora_parameters:\n  rank: 4\n  scale: 5.0\n  dropout: 0.25\n"
    )
    seen = {}
    with optiq():
        hooked_train = mlx_lm.lora.train

        def spy(*args, **kwargs):
            seen.update(
                {
                    p: (adapter_files.module_rank(m), m.scale, round(1 - m.dropout._p_1, 6))
                    for p, m in adapter_files.lora_modules(kwargs["model"]).items()
                }
            )
            return hooked_train(*args, **kwargs)

        mlx_lm.lora.train = spy
        try:
            main_of("lora", ["-c", config])
        finally:
            mlx_lm.lora.train = hooked_train
    return out, seen


@pytest.fixture(scope="module")
def dora_adapter(mixed, data, tmp_path_factory):
    """DoRA + by_bits on the converted model's last two blocks (3- and 6-bit layers among them)."""
    out = tmp_path_factory.mktemp("dora") / "adapter"
    args = lora_args(mixed, data, out, "--fine-tune-type", "dora", "--optiq-rank-scaling", "by_bits", "--rank", 4)
    with optiq():
        main_of("lora", args)
    return out


# ---------------------------------------------------------------- DoRA


def test_dora_with_rank_scaling_on_3_and_6_bit_layers(dora_adapter, mixed):
    """Stock DoRALinear.from_base sizes lora_a of a 3/5/6-bit layer as columns * (32 // bits) (540
    rows instead of 576): DoRA on our converted model failed at the first step. Rank scaling
    supports DoRA: the magnitudes are rank-independent and outside the budget."""
    record = adapter_files.read_record(dora_adapter)
    assert record["fine_tune_type"] == "dora" and record["rank_scaling"] == "by_bits"
    modules = record["modules"]
    assert {m["bits"] for m in modules.values()} & set(ODD_BITS)
    assert record["trainable_params"] == sum(m["rank"] * (m["input_dims"] + m["output_dims"]) for m in modules.values())
    assert record["trainable_params"] <= record["budget_params"]
    weights = mx.load(str(dora_adapter / "adapters.safetensors"))
    for path, m in modules.items():
        assert weights[f"{path}.lora_a"].shape[0] == m["input_dims"] == (1536 if "down_proj" in path else 576)
        assert weights[f"{path}.m"].shape == (m["output_dims"],)  # DoRA magnitude: saved, not budgeted
    assert any(mx.any(weights[f"{p}.lora_b"]).item() for p in modules)  # trained

    # stock's own DoRA conversion (no rank scaling), hooks on: right dims, a forward runs
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = load(mixed)
    with optiq():
        linear_to_lora_layers(model, 2, {"rank": 2, "scale": 1.0, "dropout": 0.0}, use_dora=True)
    converted = {p: m for p, m in model.named_modules() if type(m).__name__ == "DoRALinear"}
    assert len(converted) == 14 and any(m.linear.bits in ODD_BITS for m in converted.values())
    for p, m in converted.items():
        assert m.lora_a.shape == (1536 if "down_proj" in p else 576, 2), p
    assert probe_logits(model).shape == (1, 8, 49152)


def test_resume_dora_adapter_keeps_magnitudes(dora_adapter, mixed, data, tmp_path):
    """--resume-adapter-file of a rank-scaled DoRA adapter (no optiq flag: its record decides)
    restores every tensor, magnitudes included (0 more steps: the saved file is the loaded one)."""
    out = tmp_path / "resumed"
    args = lora_args(mixed, data, out, "--fine-tune-type", "dora", iters=0)
    with optiq():
        main_of("lora", [*args, "--resume-adapter-file", dora_adapter / "adapters.safetensors"])
    before = mx.load(str(dora_adapter / "adapters.safetensors"))
    after = mx.load(str(out / "adapters.safetensors"))
    assert before.keys() == after.keys() and any(k.endswith(".m") for k in before)
    for k in before:
        assert mx.array_equal(before[k], after[k]).item(), k
    # the magnitudes trained away from their start (the base's row norms): not merely rebuilt
    layers = dict(load(mixed).named_modules())
    start = {
        p: mx.linalg.norm(mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits, mode=q.mode), axis=1)
        for p, q in ((k[: -len(".m")], layers[k[: -len(".m")]]) for k in before if k.endswith(".m"))
    }
    assert any(not mx.allclose(before[f"{p}.m"], norm).item() for p, norm in start.items())
    assert adapter_files.record_ranks(adapter_files.read_record(out)) == adapter_files.record_ranks(
        adapter_files.read_record(dora_adapter)
    )
    adapter_files.check_adapter_dir(out)


def test_resume_of_an_adapter_without_rank_record_is_refused_before_loading(
    yaml_run, mixed, data, tmp_path, monkeypatch, capsys
):
    """A stock (constant-rank) adapter resumed under by_bits used to load the model, then fail on
    "rank 5 smaller than the recorded rank 7" (there is no record); constant at another rank and
    a missing file likewise. Now each is one line before anything loads."""
    import mlx_lm.lora

    stock = tmp_path / "stock"
    stock.mkdir()
    shutil.copy(yaml_run[0] / "adapters.safetensors", stock)  # the padded file alone: one constant rank
    resume = stock / "adapters.safetensors"
    rank = adapter_files.read_record(yaml_run[0])["padded_rank"]
    missing = tmp_path / "nope.safetensors"
    cases = (
        (
            ["--optiq-rank-scaling", "by_bits", "--resume-adapter-file", resume],
            f"--optiq-rank-scaling / optiq_rank_scaling: is by_bits, but the adapter being resumed ({resume}) "
            "has no optiq_lora_config.json beside it: it was trained at one constant rank",
        ),
        (
            ["--optiq-rank-scaling", "constant", "--rank", rank + 1, "--resume-adapter-file", resume],
            f"is constant at rank {rank + 1}, but the adapter being resumed ({resume}) has rank {rank}",
        ),
        (
            ["--optiq-rank-scaling", "by_bits", "--resume-adapter-file", missing],
            f"--resume-adapter-file: {missing}: file not found",
        ),
    )
    with optiq():
        monkeypatch.setattr(mlx_lm.lora, "load", lambda *a, **k: pytest.fail("loaded the model first"))
        for extra, message in cases:
            with pytest.raises(SystemExit) as e:
                main_of("lora", [*lora_args(mixed, data, tmp_path / "out"), *extra])
            err = capsys.readouterr().err
            assert e.value.code == 1 and "Traceback" not in err, err
            assert err.startswith("mlx_lm.lora: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- --num-layers, YAML dropout / scale


def test_num_layers_plans_and_budgets_only_the_trained_layers(yaml_run, mixed):
    out, seen = yaml_run
    record = adapter_files.read_record(out)
    modules = record["modules"]
    assert set(modules) == set(seen)
    assert len(modules) == 14 and all(p.startswith(("model.layers.2.", "model.layers.3.")) for p in modules)
    cost = {p: m["input_dims"] + m["output_dims"] for p, m in modules.items()}
    assert record["budget_params"] == 4 * sum(cost.values())
    used = sum(m["rank"] * cost[p] for p, m in modules.items())
    assert used == record["trainable_params"] and 0 <= record["budget_params"] - used < max(cost.values())
    bits = layer_bits(mixed)
    assert all(m["bits"] == bits[p] for p, m in modules.items())
    # by_bits over the trained layers: more bits, more rank (cap: optiq_max_rank 8 from the YAML)
    by_bits = sorted(modules.values(), key=lambda m: m["bits"])
    assert all(a["rank"] <= b["rank"] for a, b in zip(by_bits, by_bits[1:]) if a["bits"] < b["bits"])
    assert max(m["rank"] for m in modules.values()) <= 8 and len({m["rank"] for m in modules.values()}) > 1


def test_yaml_dropout_and_scale_reach_training_and_loading(yaml_run, mixed):
    out, seen = yaml_run
    record = adapter_files.read_record(out)
    ranks = adapter_files.record_ranks(record)
    # the layers stock's trainer got: planned ranks, the YAML's scale and dropout
    assert {p: r for p, (r, _, _) in seen.items()} == ranks
    assert {(scale, dropout) for _, scale, dropout in seen.values()} == {(5.0, 0.25)}
    assert record["scale"] == 5.0 and record["dropout"] == 0.25
    stock_config = json.loads((out / "adapter_config.json").read_text())
    assert stock_config["lora_parameters"] == {"rank": record["padded_rank"], "scale": 5.0, "dropout": 0.25}
    assert stock_config["optiq_rank_scaling"] == "by_bits" and stock_config["num_layers"] == 2

    compact = load(mixed, out, hooks=True)
    assert {p: (adapter_files.module_rank(m), m.scale) for p, m in adapter_files.lora_modules(compact).items()} == {
        p: (r, 5.0) for p, r in ranks.items()
    }
    stock = load(mixed, out)  # stock mlx-lm, padded file
    assert not compact.training and not stock.training  # dropout off when evaluating
    base = load(mixed)
    a, b, c = probe_logits(compact), probe_logits(stock), probe_logits(base)
    assert max_diff(a, b) <= 1e-4 * mx.abs(b).max().item()
    assert max_diff(a, c) > 1e-2  # the adapter does something


def test_misspelt_optiq_yaml_key_is_an_error_not_a_stock_run(tiny_q4_path, data, tmp_path, capsys):
    """Stock copies every YAML key onto the arguments: `optiq_rank_scalling` used to train a plain
    constant-rank adapter without a word."""
    config = tmp_path / "lora.yaml"
    config.write_text("optiq_rank_scalling: by_bits\nlora_parameters: {rank: 4, scale: 5.0, dropout: 0.0}\n")
    with optiq(), pytest.raises(SystemExit) as e:
        main_of("lora", ["-c", config, *lora_args(tiny_q4_path, data, tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err, err
    assert (
        f"mlx_lm.lora: error: {config}: unknown optiq key(s) optiq_rank_scalling (did you mean optiq_rank_scaling?)"
        in err
    )
    assert not (tmp_path / "out").exists()


def test_full_fine_tune_with_rank_scaling_is_refused(tiny_q4_path, data, tmp_path, capsys):
    with optiq(), pytest.raises(SystemExit):
        main_of(
            "lora",
            [
                *lora_args(tiny_q4_path, data, tmp_path / "out"),
                "--fine-tune-type",
                "full",
                "--optiq-rank-scaling",
                "by_bits",
            ],
        )
    err = capsys.readouterr().err
    assert (
        "mlx_lm.lora: error: --optiq-rank-scaling / optiq_rank_scaling: needs --fine-tune-type lora or dora, got 'full'"
        in err
    )
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- mlx_lm.fuse


def test_fuse_with_and_without_dequantize(yaml_run, dora_adapter, mixed, tmp_path):
    """Stock `mlx_lm.fuse` (hooks on: compact load) of rank-scaled adapters on our mixed-precision
    model. --dequantize: a float model computing base + adapter (fp32 rounding only). Without it:
    each fused layer re-quantized at its own planned format (the quantization config unchanged),
    exactly the --dequantize weights quantized at that format; stock mlx_lm.load loads both.
    (Re-quantizing base + adapter rounds part of the adapter away; how much is item 4's QAT.)"""
    from mlx.utils import tree_flatten

    adapter = yaml_run[0]
    fused, fused_float = tmp_path / "fused", tmp_path / "fused-float"
    with optiq():
        main_of("fuse", ["--model", mixed, "--adapter-path", adapter, "--save-path", fused])
        main_of("fuse", ["--model", mixed, "--adapter-path", adapter, "--save-path", fused_float, "--dequantize"])
    adapted = probe_logits(load(mixed, adapter, hooks=True))

    float_model = load(fused_float)  # stock load
    assert "quantization" not in json.loads((fused_float / "config.json").read_text())
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in float_model.named_modules())
    assert max_diff(probe_logits(float_model), adapted) <= 1e-3 * mx.abs(adapted).max().item()

    quant_model = load(fused)  # stock load
    plan = json.loads((mixed / "config.json").read_text())["quantization"]
    assert json.loads((fused / "config.json").read_text())["quantization"] == plan
    float_weights = dict(tree_flatten(float_model.parameters()))
    checked = 0
    for path, m in quant_model.named_modules():
        if isinstance(m, nn.QuantizedLinear) and path.startswith(("model.layers.2.", "model.layers.3.")):
            assert (m.bits, m.group_size, m.mode) == (plan[path]["bits"], plan[path]["group_size"], plan[path]["mode"])
            w, scales, biases = mx.quantize(float_weights[f"{path}.weight"], m.group_size, m.bits, mode=m.mode)
            for got, want in ((m.weight, w), (m.scales, scales), (m.biases, biases)):
                assert mx.array_equal(got, want).item(), path
            checked += 1
    assert checked == 14

    # DoRA on 3/6-bit layers fuses too (the dequantized fuse equals base + adapter)
    fused_dora = tmp_path / "fused-dora"
    with optiq():
        main_of("fuse", ["--model", mixed, "--adapter-path", dora_adapter, "--save-path", fused_dora, "--dequantize"])
    dora_adapted = probe_logits(load(mixed, dora_adapter, hooks=True))
    assert max_diff(probe_logits(load(fused_dora)), dora_adapted) <= 1e-3 * mx.abs(dora_adapted).max().item()
