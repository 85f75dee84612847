"""PEFT export/import of per-rank LoRA adapters, on the real 4-layer SmolLM2 (fp32 dequantized).

The slow tests load the exported adapter with the real `peft` library on the same model in
transformers (and an adapter made by `peft` in mlx-lm) and compare logits.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_lm_optiq
from mlx_lm_optiq.core.jsonio import OptiqFileError
from mlx_lm_optiq.lora import adapter_files
from mlx_lm_optiq.lora.peft import export_peft, import_peft, load_peft_adapter, mount_peft_adapter
from tests.test_lora import PROBE, logits

SCALE = 5.0


@pytest.fixture(scope="module")
def ranked_adapter(tiny_float_path, tmp_path_factory):
    """An mlx-lm adapter dir with per-module ranks 2..6 and random non-zero weights (padded + record)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load, save_config

    model, _ = load(str(tiny_float_path))
    paths = [p for p, m in model.named_modules() if type(m).__name__ == "Linear" and ".layers." in p]
    ranks = {p: 2 + i % 5 for i, p in enumerate(paths)}
    model.freeze()
    adapter_files.build_lora_modules(model, ranks, scale=SCALE)
    mx.random.seed(3)
    for m in adapter_files.lora_modules(model).values():
        m.lora_b = 0.02 * mx.random.normal(m.lora_b.shape)
    out = tmp_path_factory.mktemp("peft") / "ranked"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    save_config(
        {
            "fine_tune_type": "lora",
            "model": str(tiny_float_path),
            "num_layers": 4,
            "lora_parameters": {"rank": 4, "scale": SCALE, "dropout": 0.0},
        },
        out / "adapter_config.json",
    )
    dims = {p: adapter_files.module_dims(m) for p, m in adapter_files.lora_modules(model).items()}
    adapter_files.write_record(
        out,
        {
            "base_model": str(tiny_float_path),
            "fine_tune_type": "lora",
            "rank_scaling": "test",
            "base_rank": 4,
            "padded_rank": None,
            "scale": SCALE,
            "dropout": 0.0,
            "metadata": None,
            "budget_params": None,
            "trainable_params": sum(ranks[p] * (i + o) for p, (i, o) in dims.items()),
            "modules": {p: {"rank": ranks[p], "input_dims": dims[p][0], "output_dims": dims[p][1]} for p in ranks},
        },
    )
    adapter_files.finalize_adapter_dir(out)
    return out


@pytest.fixture(scope="module")
def adapter_logits(ranked_adapter, tiny_float_path):
    from mlx_lm import load

    mlx_lm_optiq.disable()
    model, _ = load(str(tiny_float_path), adapter_path=str(ranked_adapter))  # stock, padded
    return np.array(logits(model))


def test_export_uses_peft_names_layouts_and_patterns(ranked_adapter, tmp_path):
    out = export_peft(ranked_adapter, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = adapter_files.record_ranks(adapter_files.read_record(ranked_adapter))
    assert config["peft_type"] == "LORA" and config["target_modules"] == sorted(ranks)
    default = config["r"]
    assert config["lora_alpha"] == SCALE * default
    assert config["rank_pattern"] == {p: r for p, r in ranks.items() if r != default}
    assert config["alpha_pattern"] == {p: SCALE * r for p, r in ranks.items() if r != default}
    assert len(set(ranks.values())) == 5
    from safetensors.numpy import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    compact = adapter_files.fit_adapter_weights(mx.load(str(ranked_adapter / "adapters.safetensors")), ranks)
    assert len(tensors) == 2 * len(ranks)
    for p, r in ranks.items():
        a = tensors[f"base_model.model.{p}.lora_A.weight"]
        b = tensors[f"base_model.model.{p}.lora_B.weight"]
        assert a.shape[0] == r and b.shape[1] == r
        np.testing.assert_array_equal(a, np.array(compact[f"{p}.lora_a"]).T)
        np.testing.assert_array_equal(b, np.array(compact[f"{p}.lora_b"]).T)


def test_round_trip_through_peft_format_in_mlx(ranked_adapter, adapter_logits, tiny_float_path, tmp_path):
    from mlx_lm import load

    exported = export_peft(ranked_adapter, tmp_path / "peft")
    imported = import_peft(exported, tmp_path / "imported", base_model=tiny_float_path)
    # stock mlx-lm loads the imported directory (padded) ...
    mlx_lm_optiq.disable()
    stock, _ = load(str(tiny_float_path), adapter_path=str(imported))
    np.testing.assert_allclose(np.array(logits(stock)), adapter_logits, atol=1e-4)
    # ... and the compact mount gives the same outputs at the original ranks
    model, _ = load(str(tiny_float_path))
    mount_peft_adapter(model, exported)
    ranks = adapter_files.record_ranks(adapter_files.read_record(ranked_adapter))
    assert {p: adapter_files.module_rank(m) for p, m in adapter_files.lora_modules(model).items()} == ranks
    np.testing.assert_allclose(np.array(logits(model)), adapter_logits, atol=1e-4)


def test_import_folds_per_module_alpha_into_lora_b(ranked_adapter, tmp_path):
    exported = export_peft(ranked_adapter, tmp_path / "peft")
    config_file = exported / "adapter_config.json"
    config = json.loads(config_file.read_text())
    base_cfg, base_w = load_peft_adapter(exported)
    target = "model.layers.2.mlp.up_proj"
    r = base_cfg["ranks"][target]
    config["alpha_pattern"][target] = 3 * SCALE * r  # three times the scaling of the others
    config_file.write_text(json.dumps(config))
    cfg, w = load_peft_adapter(exported)
    assert cfg["scale"] == SCALE
    assert mx.allclose(w[f"{target}.lora_b"], 3 * base_w[f"{target}.lora_b"]).item()
    config["use_rslora"] = True  # alpha / sqrt(r): every module's scaling changes, still folded exactly
    config_file.write_text(json.dumps(config))
    cfg, w = load_peft_adapter(exported)
    other = "model.layers.0.self_attn.q_proj"
    scaling = lambda p, alpha: alpha / cfg["ranks"][p] ** 0.5  # noqa: E731
    effective = cfg["scale"] * np.array(w[f"{other}.lora_b"])
    alpha_other = config["alpha_pattern"].get(other, config["lora_alpha"])
    np.testing.assert_allclose(effective, scaling(other, alpha_other) * np.array(base_w[f"{other}.lora_b"]), rtol=1e-5)


def test_bad_peft_adapters_give_clear_errors(ranked_adapter, tmp_path):
    exported = export_peft(ranked_adapter, tmp_path / "peft")
    config = json.loads((exported / "adapter_config.json").read_text())
    for field, value in (("use_dora", True), ("peft_type", "IA3"), ("bias", "all"), ("fan_in_fan_out", True)):
        (exported / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(OptiqFileError, match=rf"adapter_config.json: field '{field}' is"):
            load_peft_adapter(exported)
    bad_rank = {**config, "rank_pattern": {**config["rank_pattern"], "model.layers.0.self_attn.q_proj": 7}}
    (exported / "adapter_config.json").write_text(json.dumps(bad_rank))
    with pytest.raises(OptiqFileError, match=r"rank for model.layers.0.self_attn.q_proj is 7"):
        load_peft_adapter(exported)
    (exported / "adapter_model.safetensors").rename(exported / "adapter_model.bin")
    with pytest.raises(OptiqFileError, match=r"adapter_model.safetensors: file not found \(adapter_model.bin"):
        load_peft_adapter(exported)


def _hf_logits(float_path, peft_dir=None):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(float_path), torch_dtype=torch.float32)
    if peft_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(peft_dir))
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(PROBE)).logits.numpy()


@pytest.mark.slow
def test_peft_library_loads_the_export(ranked_adapter, adapter_logits, tiny_float_path, tmp_path):
    pytest.importorskip("peft")
    exported = export_peft(ranked_adapter, tmp_path / "peft")
    hf_base = _hf_logits(tiny_float_path)
    hf_adapted = _hf_logits(tiny_float_path, exported)
    assert np.abs(hf_adapted - hf_base).max() > 1e-2
    np.testing.assert_allclose(hf_adapted, adapter_logits, atol=2e-3)


@pytest.mark.slow
def test_adapter_made_by_peft_mounts_in_mlx(tiny_float_path, tmp_path):
    pytest.importorskip("peft")
    import torch
    from mlx_lm import load
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM.from_pretrained(str(tiny_float_path), torch_dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        layers_to_transform=[1, 3],
        rank_pattern={"model.layers.3.mlp.down_proj": 8},
        alpha_pattern={"model.layers.3.mlp.down_proj": 8},
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        expected = peft_model(torch.tensor(PROBE)).logits.numpy()
    peft_model.save_pretrained(str(tmp_path / "made_by_peft"))

    mlx_lm_optiq.disable()
    model, _ = load(str(tiny_float_path))
    mount_peft_adapter(model, tmp_path / "made_by_peft")
    ranks = {p: adapter_files.module_rank(m) for p, m in adapter_files.lora_modules(model).items()}
    assert ranks["model.layers.3.mlp.down_proj"] == 8 and ranks["model.layers.1.self_attn.q_proj"] == 4
    assert len(ranks) == 6
    np.testing.assert_allclose(np.array(logits(model)), expected, atol=2e-3)
    # and as a stock mlx-lm adapter directory
    imported = import_peft(tmp_path / "made_by_peft", tmp_path / "imported", base_model=tiny_float_path)
    stock, _ = load(str(tiny_float_path), adapter_path=str(imported))
    np.testing.assert_allclose(np.array(logits(stock)), expected, atol=2e-3)
    assert Path(imported / "optiq_lora_config.json").is_file()


# Every field of the wrong type or value: (field, value, words the error must contain). Each
# of these ended in a traceback (AttributeError, TypeError, ZeroDivisionError, re.error, ...)
# or was silently accepted before the schema check (issue 16).
MALFORMED_FIELDS = [
    ("rank_pattern", [1, 2], "an object {module pattern: value} or null"),
    ("rank_pattern", "q_proj", "an object {module pattern: value} or null"),
    ("rank_pattern", {"q_proj": "4"}, "expected a positive integer"),
    ("rank_pattern", {"q_proj": 0}, "expected a positive integer"),
    ("rank_pattern", {"q_proj": 4.0}, "expected a positive integer"),
    ("rank_pattern", {"(unclosed": 4}, "is not a valid module pattern"),
    ("alpha_pattern", "16", "an object {module pattern: value} or null"),
    ("alpha_pattern", {"q_proj": None}, "expected a finite number"),
    ("alpha_pattern", {"q_proj": True}, "expected a finite number"),
    ("r", "8", "a positive integer"),
    ("r", 0, "a positive integer"),
    ("r", None, "a positive integer"),
    ("lora_alpha", "16", "a finite number"),
    ("lora_alpha", [16], "a finite number"),
    ("use_rslora", "yes", "true or false"),
    ("lora_dropout", "0.1", "a number in [0, 1)"),
    ("lora_dropout", 1.5, "a number in [0, 1)"),
    ("base_model_name_or_path", 7, "a string or null"),
    ("target_modules", {"q": 1}, "a module name, a list of them"),
    ("layers_to_transform", ["1"], "a layer index"),
    ("inference_mode", "true", "true or false"),
    ("lora_bias", True, "a bias on lora_B"),
    ("layer_replication", [[0, 2]], "replicated layers"),
]


@pytest.mark.parametrize("field,value,words", MALFORMED_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in MALFORMED_FIELDS])
def test_peft_config_schema_names_file_and_field(ranked_adapter, tmp_path_factory, field, value, words):
    exported = export_peft(ranked_adapter, tmp_path_factory.mktemp("schema") / "peft")
    config = json.loads((exported / "adapter_config.json").read_text())
    (exported / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(OptiqFileError) as e:
        load_peft_adapter(exported)
    message = str(e.value)
    assert message.startswith(str(exported / "adapter_config.json")) and repr(field) in message, message
    assert words in message, message


def test_peft_unreadable_files_give_clear_errors(ranked_adapter, tmp_path):
    exported = export_peft(ranked_adapter, tmp_path / "peft")
    config_file, weights_file = exported / "adapter_config.json", exported / "adapter_model.safetensors"
    good_config, good_weights = config_file.read_bytes(), weights_file.read_bytes()
    for content, words in [
        (b"\xff\xfe\x00binary", "not valid JSON|not a JSON text file"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[1, 2]", "expected a JSON object at the top level"),
        (b'{"peft_type": "LORA", "r": 1' + b"9" * 5000 + b"}", "not valid JSON"),
    ]:
        config_file.write_bytes(content)
        with pytest.raises(OptiqFileError, match=words) as e:
            load_peft_adapter(exported)
        assert str(e.value).startswith(str(config_file)) and len(str(e.value)) < 400
    config_file.write_bytes(good_config)

    from safetensors.numpy import save_file

    for tensors, words in [
        (None, "cannot read safetensors"),
        ({"base_model.model.x.lora_A.weight": np.ones(4, np.float32)}, "expected a matrix"),
        ({"base_model.model.x.lora_A.weight": np.ones((2, 4), np.int32)}, "expected a floating type"),
        (
            {
                "base_model.model.x.lora_A.weight": np.ones((0, 4), np.float32),
                "base_model.model.x.lora_B.weight": np.ones((4, 0), np.float32),
            },
            "lora_A is",
        ),
    ]:
        if tensors is None:
            weights_file.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
        else:
            save_file(tensors, str(weights_file))
        with pytest.raises(OptiqFileError, match=words) as e:
            load_peft_adapter(exported)
        assert str(e.value).startswith(str(weights_file)), str(e.value)
    weights_file.write_bytes(good_weights)
    load_peft_adapter(exported)  # the untouched files still load
