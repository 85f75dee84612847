"""Sensitivity-aware LoRA through `mlx_lm.lora` (issue 5), on the real 4-layer SmolLM2.

The by_bits adapter the tests share is trained through the real console entry point (`python -m
mlx_lm lora`) with MLX_LM_OPTIQ=1; the other runs call stock `mlx_lm.<command>.main()` in this
process (hooks on as that variable turns them on; a fresh interpreter costs seconds of imports per
run). All train on the fp32 dequantized model (fast CPU matmuls) with per-layer bits
from stock mlx-lm's `mixed_4_6` recipe and KLs measured here; the QLoRA flags are
exercised on the same float model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.jsonio import OptiqFileError, write_json
from mlx_lm_optiq.lora import adapter_files
from mlx_lm_optiq.lora.config import RANK_SCALING_MODES, locate_metadata
from mlx_lm_optiq.lora.ranks import (
    allocate_ranks,
    budget_params,
    layer_sensitivity,
    lora_params,
    mode_ranks,
    rank_cost,
    rank_weights,
)
from mlx_lm_optiq.weights.metadata import read_metadata
from tests.helpers import assert_lora_cli_error, main_of, optiq

PROBE = [[1, 504, 3458, 282, 4649, 314, 253, 1121, 30, 378, 2102, 314, 4372, 28]]


# ---------------------------------------------------------------- helpers (test_peft uses them too)


def make_sidecar(float_path, text, out_file, kl_tokens=32):
    """optiq_metadata.json for `float_path`: bits per layer from stock mlx-lm's mixed_4_6 recipe,
    KL at 4:64 measured by simulated quantization of each linear layer alone."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import load

    model, tokenizer = load(str(float_path))
    recipe = mixed_quant_predicate_builder("mixed_4_6", model, 64)
    ids = mx.array(tokenizer.encode(text)[:kl_tokens])[None]
    ref = nn.log_softmax(model(ids).astype(mx.float32), axis=-1)
    p_ref = mx.exp(ref)
    layers = {}
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        choice = recipe(path, module)
        bits, group = (choice["bits"], choice["group_size"]) if isinstance(choice, dict) else (4, 64)
        weight = module.weight
        module.weight = mx.dequantize(*mx.quantize(weight, 64, 4), group_size=64, bits=4)
        kl = (p_ref * (ref - nn.log_softmax(model(ids).astype(mx.float32), axis=-1))).sum(-1).mean().item()
        module.weight = weight
        layers[path] = {
            "bits": bits,
            "group_size": group,
            "mode": "affine",
            "num_params": int(weight.size),
            "kl": {"4:64": kl},
        }
    layers["model.embed_tokens"] = {
        "bits": 8,
        "group_size": 64,
        "mode": "affine",
        "num_params": int(model.model.embed_tokens.weight.size),
        "kl": {},
    }
    write_json(
        out_file,
        {
            "base_model": str(float_path),
            "method": "exact",
            "reference": "float",
            "candidates": [
                {"bits": 4, "group_size": 64, "mode": "affine"},
                {"bits": 6, "group_size": 64, "mode": "affine"},
            ],
            "layers": layers,
        },
        kind="optiq-metadata",
    )
    return Path(out_file)


def small_dataset(shared_dir, out_dir, n_train=8, n_valid=4, chars=160):
    """Short prompt/completion pairs from ../shared's GSM-Symbolic (short sequences: fast CPU steps)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid)):
        rows = [json.loads(line) for line in (shared_dir / "data" / "gsm_symbolic" / f"{split}.jsonl").open()][:n]
        with open(out_dir / f"{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps({"prompt": r["prompt"][:chars], "completion": r["completion"][:chars]}) + "\n")
    return out_dir


def run_mlx_lm(command, args, env, check=True, cwd=None):
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_lm", command, *map(str, args)], env=env, capture_output=True, text=True, cwd=cwd
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mlx_lm {command} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def train_args(model, data, adapter_path, *extra, iters=2):
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
        2,
        "--max-seq-length",
        64,
        "--val-batches",
        1,
        "--steps-per-eval",
        1000,
        "--steps-per-report",
        1,
        "--save-every",
        1000,
        "--num-layers",
        -1,
        "--learning-rate",
        "1e-3",
        "--seed",
        0,
        *extra,
    ]


def stock_env():
    return {k: v for k, v in os.environ.items() if k != "MLX_LM_OPTIQ"}


def logits(model):
    out = model(mx.array(PROBE))
    mx.eval(out)
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sidecar(tiny_float_path, austen, tmp_path_factory):
    return make_sidecar(
        tiny_float_path, austen("persuasion")[5000:9000], tmp_path_factory.mktemp("sidecar") / "optiq_metadata.json"
    )


@pytest.fixture(scope="module")
def data_dir(shared_dir, tmp_path_factory):
    return small_dataset(shared_dir, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def by_bits_adapter(tiny_float_path, sidecar, data_dir, tmp_path_factory):
    """A by_bits adapter trained through the real `mlx_lm lora` command."""
    env = dict(os.environ, MLX_LM_OPTIQ="1")
    out = tmp_path_factory.mktemp("lora") / "by_bits"
    proc = run_mlx_lm(
        "lora",
        train_args(
            tiny_float_path, data_dir, out, "--optiq-rank-scaling", "by_bits", "--rank", 8, "--optiq-metadata", sidecar
        ),
        env,
    )
    assert "[optiq] rank scaling by_bits" in proc.stdout
    return out


# ---------------------------------------------------------------- rank allocation


def test_allocate_ranks_moves_capacity_at_constant_budget(sidecar, tiny_float_path):
    from mlx_lm.utils import load

    model, _ = load(str(tiny_float_path))
    dims = {
        p: (m.weight.shape[1], m.weight.shape[0])
        for p, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in p
    }
    metadata = read_metadata(sidecar)
    max_step = max(rank_cost(d) for d in dims.values())
    for base_rank in (1, 4, 8, 16):
        budget = budget_params(dims, base_rank)
        for mode in (m for m in RANK_SCALING_MODES if m != "by_residual"):  # needs residuals: test_lora_residual
            ranks = mode_ranks(mode, dims, base_rank, metadata, sidecar)
            used = lora_params(dims, ranks)
            assert used <= budget and budget - used < max_step, (mode, base_rank, used, budget)
            assert min(ranks.values()) >= 1
    ranks = mode_ranks("by_bits", dims, 8, metadata, sidecar)
    bits = {p: metadata["layers"][p]["bits"] for p in dims}
    six = [ranks[p] for p in dims if bits[p] == 6]
    four = [ranks[p] for p in dims if bits[p] == 4]
    assert six and four and min(six) > max(four)
    # rank ~ bits: 6-bit layers get ~1.5x the rank of 4-bit ones
    assert abs((sum(six) / len(six)) / (sum(four) / len(four)) - 1.5) < 0.25
    ranks = mode_ranks("by_kl", dims, 8, metadata, sidecar)
    kl = {p: metadata["layers"][p]["kl"]["4:64"] for p in dims}
    most, least = max(dims, key=kl.get), min(dims, key=kl.get)
    assert ranks[most] > ranks[least]
    assert mode_ranks("constant", dims, 8) == {p: 8 for p in dims}


def test_bad_sidecars_give_clear_errors(sidecar, tmp_path):
    dims = {"model.layers.0.self_attn.q_proj": (576, 576), "model.layers.0.mlp.down_proj": (1536, 576)}
    good = json.loads(sidecar.read_text())

    wrong_kind = tmp_path / "wrong_kind.json"
    wrong_kind.write_text(json.dumps({**good, "kind": "optiq-kv-config"}))
    with pytest.raises(OptiqFileError, match=r"wrong_kind.json: field 'kind'"):
        read_metadata(wrong_kind)

    no_bits = tmp_path / "no_bits.json"
    layers = dict(good["layers"])
    layers["model.layers.0.self_attn.q_proj"] = {"kl": {"4:64": 0.1}}
    no_bits.write_text(json.dumps({**good, "layers": layers}))
    with pytest.raises(OptiqFileError, match=r"no_bits.json: field 'layers.model.layers.0.self_attn.q_proj.bits'"):
        read_metadata(no_bits)

    no_kl = json.loads(sidecar.read_text())
    del no_kl["layers"]["model.layers.0.mlp.down_proj"]["kl"]
    with pytest.raises(OptiqFileError, match=r"layers.model.layers.0.mlp.down_proj.kl"):
        mode_ranks("by_kl", dims, 8, no_kl, "side.json")

    partial = json.loads(sidecar.read_text())
    del partial["layers"]["model.layers.0.mlp.down_proj"]
    with pytest.raises(OptiqFileError, match=r"no entry for LoRA target.*model.layers.0.mlp.down_proj"):
        mode_ranks("by_bits", dims, 8, partial, "side.json")

    with pytest.raises(ConfigError, match="rank_scaling: unknown mode 'by_vibes'"):
        rank_weights("by_vibes", list(dims), good)

    with pytest.raises(
        OptiqFileError, match=r"optiq_metadata.json: file not found.*`metadata`.*`rank_scaling` constant"
    ):
        locate_metadata(tmp_path)


def test_by_bits_without_sidecar_fails_clearly(tiny_float_path, tmp_path):
    """Through the hooked train_model, as `mlx_lm lora` calls it, on a model with no sidecar."""
    import types

    import mlx_lm.lora
    from mlx_lm.utils import load

    model, _ = load(str(tiny_float_path))
    args = types.SimpleNamespace(
        **{
            **mlx_lm.lora.CONFIG_DEFAULTS,
            "model": str(tiny_float_path),
            "adapter_path": str(tmp_path / "ad"),
            "num_layers": -1,
            "optiq_rank_scaling": "by_bits",
            "optiq_metadata": None,
        }
    )
    with optiq():
        with pytest.raises(
            OptiqFileError,
            match=rf"{tiny_float_path}/optiq_metadata.json: file not found"
            r".*--optiq-metadata.*--optiq-rank-scaling constant",
        ):
            mlx_lm.lora.train_model(args, model, [], [])
        args.optiq_rank_scaling = "by_magic"  # a YAML value skips argparse's choices
        with pytest.raises(ValueError, match="optiq_rank_scaling: got 'by_magic'"):
            mlx_lm.lora.train_model(args, model, [], [])
        args.optiq_rank_scaling, args.optiq_max_rank = None, 16  # flags that would be ignored are refused
        with pytest.raises(
            ValueError, match="--optiq-max-rank / optiq_max_rank: only applies with --optiq-rank-scaling"
        ):
            mlx_lm.lora.run(args)
        args.optiq_max_rank, args.optiq_metadata = None, "side.json"
        with pytest.raises(ValueError, match="--optiq-metadata / optiq_metadata: is read by --optiq-rank-scaling, "):
            mlx_lm.lora.run(args)
    assert not (tmp_path / "ad" / "adapters.safetensors").exists()
    with pytest.raises(ConfigError, match="max_rank: 4 is below the base rank 8"):
        allocate_ranks({"a": (4, 4)}, {"a": 1.0}, 8, max_rank=4)


# ---------------------------------------------------------------- training output


def test_by_bits_training_keeps_budget_and_records_ranks(by_bits_adapter, sidecar):
    record = adapter_files.read_record(by_bits_adapter)
    assert record["rank_scaling"] == "by_bits" and record["base_rank"] == 8
    modules = record["modules"]
    assert len(modules) == 28  # 7 linear layers x 4 blocks (--num-layers -1)
    budget = sum(8 * (m["input_dims"] + m["output_dims"]) for m in modules.values())
    used = sum(m["rank"] * (m["input_dims"] + m["output_dims"]) for m in modules.values())
    assert record["budget_params"] == budget and record["trainable_params"] == used
    assert used <= budget and budget - used < max(m["input_dims"] + m["output_dims"] for m in modules.values())
    bits = json.loads(sidecar.read_text())["layers"]
    assert all(m["bits"] == bits[p]["bits"] for p, m in modules.items())
    assert len({m["rank"] for m in modules.values()}) > 1

    padded = max(m["rank"] for m in modules.values())
    assert record["padded_rank"] == padded
    stock_config = json.loads((by_bits_adapter / "adapter_config.json").read_text())
    assert stock_config["lora_parameters"]["rank"] == padded
    assert stock_config["optiq_rank_scaling"] == "by_bits"
    weights = mx.load(str(by_bits_adapter / "adapters.safetensors"))
    assert len(weights) == 56
    for path, m in modules.items():
        a, b = weights[f"{path}.lora_a"], weights[f"{path}.lora_b"]
        assert a.shape == (m["input_dims"], padded) and b.shape == (padded, m["output_dims"])
        assert not mx.any(a[:, m["rank"] :]).item() and not mx.any(b[m["rank"] :]).item()
        assert mx.any(b[: m["rank"]]).item()  # trained (lora_b starts at zero)


def test_stock_reload_matches_compact_reload(by_bits_adapter, tiny_float_path):
    from mlx_lm import load

    import mlx_lm_optiq

    mlx_lm_optiq.disable()
    stock_model, _ = load(str(tiny_float_path), adapter_path=str(by_bits_adapter))
    base_model, _ = load(str(tiny_float_path))
    with optiq():
        compact_model, _ = load(str(tiny_float_path), adapter_path=str(by_bits_adapter))
    record = adapter_files.read_record(by_bits_adapter)
    compact_layers = adapter_files.lora_modules(compact_model)
    assert {p: adapter_files.module_rank(m) for p, m in compact_layers.items()} == adapter_files.record_ranks(record)
    assert {adapter_files.module_rank(m) for m in adapter_files.lora_modules(stock_model).values()} == {
        record["padded_rank"]
    }
    compact_params = sum(m.lora_a.size + m.lora_b.size for m in compact_layers.values())
    assert compact_params == record["trainable_params"]
    stock, compact, base = logits(stock_model), logits(compact_model), logits(base_model)
    assert mx.abs(stock - compact).max().item() < 1e-4
    assert mx.abs(stock - base).max().item() > 1e-2  # the adapter does something


def test_stock_generate_cli_same_text_as_compact_load(by_bits_adapter, tiny_float_path, capsys):
    from mlx_lm import generate, load

    import mlx_lm_optiq

    prompt = "The capital of France"
    args = [
        "--model",
        tiny_float_path,
        "--adapter-path",
        by_bits_adapter,
        "--prompt",
        prompt,
        "--max-tokens",
        8,
        "--ignore-chat-template",
        "--temp",
        0,
    ]
    assert not mlx_lm_optiq.enabled_patches()  # stock `mlx_lm.generate`'s main, in-process: the hooks are off
    capsys.readouterr()
    main_of("generate", args)
    stock = capsys.readouterr().out.split("==========")[1].strip()
    with optiq():
        model, tokenizer = load(str(tiny_float_path), adapter_path=str(by_bits_adapter))
    ours = generate(model, tokenizer, prompt, max_tokens=8).strip()
    assert stock and stock == ours


def test_fuse_with_stock_fuse(by_bits_adapter, tiny_float_path, tmp_path):
    from mlx_lm import load

    import mlx_lm_optiq

    fused = tmp_path / "fused"
    assert not mlx_lm_optiq.enabled_patches()  # stock `mlx_lm.fuse`, in-process: the hooks are off
    main_of("fuse", ["--model", tiny_float_path, "--adapter-path", by_bits_adapter, "--save-path", fused])
    fused_model, _ = load(str(fused))
    adapted, _ = load(str(tiny_float_path), adapter_path=str(by_bits_adapter))
    assert mx.abs(logits(fused_model) - logits(adapted)).max().item() < 1e-3


def test_resume_from_padded_adapter(by_bits_adapter, tiny_float_path, sidecar, data_dir, tmp_path, capsys):
    """Resuming a by_bits adapter restores its ranks from its optiq_lora_config.json, with or
    without --optiq-rank-scaling (issue 16 item 12: without the flag, stock loaded the padded file
    into constant-rank layers and wrote an adapter whose ranks disagreed with its config)."""
    resumed = tmp_path / "resumed"
    # learning rate 0: the resumed weights must come out unchanged, which they
    # only do if the padded file was loaded into the compact layers correctly
    args = train_args(
        tiny_float_path, data_dir, resumed, "--resume-adapter-file", by_bits_adapter / "adapters.safetensors", iters=1
    )
    args[args.index("--learning-rate") + 1] = "0"
    capsys.readouterr()
    with optiq():
        main_of("lora", args)
    printed = capsys.readouterr().out
    assert "by_bits ranks are restored from" in printed and "at the planned per-layer ranks" in printed
    before = mx.load(str(by_bits_adapter / "adapters.safetensors"))
    after = mx.load(str(resumed / "adapters.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        assert mx.array_equal(before[k], after[k]), k
    config = json.loads((resumed / "adapter_config.json").read_text())
    assert config["resume_adapter_file"] == str(by_bits_adapter / "adapters.safetensors")
    original, restored = adapter_files.read_record(by_bits_adapter), adapter_files.read_record(resumed)
    assert adapter_files.record_ranks(restored) == adapter_files.record_ranks(original)
    assert restored["rank_scaling"] == "by_bits" and config["lora_parameters"]["rank"] == original["padded_rank"]
    adapter_files.check_adapter_dir(resumed)  # record, tensors and stock config agree

    # a plan the file does not fit (constant rank 2 would cut off trained columns) is refused
    record = adapter_files.read_record(by_bits_adapter)
    with pytest.raises(ValueError, match="non-zero values beyond the recorded rank 2"):
        adapter_files.fit_adapter_weights(before, {p: 2 for p in record["modules"]}, source="resume")
    too_big = {p: record["padded_rank"] + 1 for p in record["modules"]}
    with pytest.raises(ValueError, match="smaller than the recorded rank"):
        adapter_files.fit_adapter_weights(before, too_big, source="resume")


def _lora_args(tiny_float_path, adapter_path, **overrides):
    """The namespace stock `mlx_lm.lora` main() hands to run()/train_model, for in-process runs."""
    import types

    import mlx_lm.lora

    values = {
        **mlx_lm.lora.CONFIG_DEFAULTS,
        "model": str(tiny_float_path),
        "adapter_path": str(adapter_path),
        "num_layers": -1,
        "optiq_rank_scaling": None,
        "optiq_metadata": None,
    }
    values.update(overrides)
    return types.SimpleNamespace(**values)


def test_resume_refuses_flags_that_contradict_the_record(by_bits_adapter, tiny_float_path, tmp_path):
    import mlx_lm.lora
    from mlx_lm.utils import load

    model, _ = load(str(tiny_float_path))
    resume = str(by_bits_adapter / "adapters.safetensors")
    with optiq():
        args = _lora_args(tiny_float_path, tmp_path / "ad", resume_adapter_file=resume, optiq_rank_scaling="by_kl")
        with pytest.raises(
            ValueError,
            match=r"--optiq-rank-scaling / optiq_rank_scaling: is by_kl, but the adapter being resumed was trained "
            r"with rank scaling by_bits \(.*optiq_lora_config.json\); a resumed run keeps its ranks",
        ):
            mlx_lm.lora.train_model(args, model, [], [])
        args = _lora_args(tiny_float_path, tmp_path / "ad", resume_adapter_file=resume, fine_tune_type="dora")
        with pytest.raises(ValueError, match="--fine-tune-type: is dora, but the adapter being resumed is lora"):
            mlx_lm.lora.train_model(args, model, [], [])
    assert not (tmp_path / "ad").exists()


def test_command_line_errors_are_one_line(tiny_float_path, tmp_path, monkeypatch, capsys):
    """Issue 16 item 8: `mlx_lm.lora` with a bad optiq flag prints one `mlx_lm.lora: error:` line
    (exit 1, no traceback) before it loads anything."""

    base = ["mlx_lm.lora", "--model", str(tiny_float_path), "--train", "--adapter-path", str(tmp_path / "ad")]
    with optiq():
        for extra, message in (
            (["--optiq-max-rank", "4"], "--optiq-max-rank / optiq_max_rank: only applies with --optiq-rank-scaling"),
            (["--rank", "0"], "--rank / rank: expected a positive integer, got 0"),
            (
                ["--optiq-rank-scaling", "by_bits", "--optiq-metadata", str(tmp_path / "none.json")],
                f"{tmp_path / 'none.json'}: file not found",
            ),
        ):
            assert_lora_cli_error(monkeypatch, capsys, [*base, *extra], message)


def test_every_save_of_a_rank_scaled_run_is_stock_loadable_as_it_appears(tiny_float_path, sidecar, data_dir, tmp_path):
    """Issue 16 item 12: a by_bits run killed after its first save left compact-rank files that stock
    mlx-lm cannot load. Checked mid-run, right after the first save (what a kill then leaves):
    stock's own load_adapters loads the adapter directory and computes what the run's model does."""
    import mlx_lm.lora
    import mlx_lm.tuner.utils
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load

    adapter_dir = tmp_path / "ad"
    args = _lora_args(
        tiny_float_path,
        adapter_dir,
        data=str(data_dir),
        train=True,
        iters=3,
        save_every=1,
        batch_size=2,
        max_seq_length=64,
        val_batches=1,
        steps_per_eval=1000,
        steps_per_report=1,
        learning_rate=1e-3,
        optiq_rank_scaling="by_bits",
        optiq_metadata=str(sidecar),
    )
    checked = []

    class AfterFirstSave(TrainingCallback):
        def on_train_loss_report(self, info):
            if info["iteration"] != 2:  # iteration 1 saved; its save was mirrored before step 2
                return
            files = sorted(p.name for p in adapter_dir.glob("*adapters.safetensors"))
            assert files == ["0000001_adapters.safetensors", "adapters.safetensors"], files
            stock_load_adapters = mlx_lm.tuner.utils.load_adapters.__wrapped__  # stock's own code
            fresh, _ = load(str(tiny_float_path))
            stock_load_adapters(fresh, str(adapter_dir))
            record = adapter_files.read_record(adapter_dir)
            assert {adapter_files.module_rank(m) for m in adapter_files.lora_modules(fresh).values()} == {
                record["padded_rank"]
            }
            compact, _ = load(str(tiny_float_path))
            adapter_files.load_compact_adapters(compact, adapter_dir)
            assert mx.abs(logits(fresh) - logits(compact)).max().item() < 1e-4
            checked.append(True)

    with optiq():
        model, tokenizer = load(str(tiny_float_path))
        train_set, valid_set, _ = load_dataset(args, tokenizer)
        mlx_lm.lora.train_model(args, model, train_set, valid_set, AfterFirstSave())
    assert checked == [True]
    assert not (adapter_dir / ".optiq-compact-saves").exists()
    adapter_files.check_adapter_dir(adapter_dir)


def test_lora_info_flags_a_record_that_disagrees_with_the_tensors(by_bits_adapter, tmp_path, capsys):
    """Issue 16 item 12: lora_info printed a summary (exit 0) of a record that lies about its tensors."""
    import shutil

    from mlx_lm_optiq.lora import info

    for edit, message in (
        (lambda r: r["modules"]["model.layers.1.mlp.up_proj"].update(rank=99), "smaller than the recorded rank 99"),
        (lambda r: r["modules"]["model.layers.0.self_attn.q_proj"].update(input_dims=7), "the record says 7 -> 576"),
        (lambda r: r["modules"].pop("model.layers.3.mlp.down_proj"), "modules the record does not list"),
        (lambda r: r.update(padded_rank=3), "the record's padded_rank is 3"),
    ):
        ad = tmp_path / "ad"
        shutil.rmtree(ad, ignore_errors=True)
        shutil.copytree(by_bits_adapter, ad)
        record = json.loads((ad / adapter_files.RECORD_FILE).read_text())
        edit(record)
        (ad / adapter_files.RECORD_FILE).write_text(json.dumps(record))
        with pytest.raises(SystemExit) as e:
            info.main([str(ad)])
        err = capsys.readouterr().err
        assert e.value.code == 1 and "Traceback" not in err
        assert err.startswith("python -m mlx_lm_optiq.lora.info: error: ") and "disagrees" in err and message in err
    config = json.loads((by_bits_adapter / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 8  # what a run killed before finalize_adapter_dir used to leave
    shutil.rmtree(ad)
    shutil.copytree(by_bits_adapter, ad)
    (ad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        info.main([str(ad)])
    assert "adapter_config.json has lora_parameters.rank 8 but the tensors have rank" in capsys.readouterr().err


def test_yaml_config_by_kl_dora(tiny_float_path, sidecar, data_dir, tmp_path):
    config = tmp_path / "lora.yaml"
    out = tmp_path / "by_kl"
    config.write_text(
        f"model: {tiny_float_path}\ntrain: true\ndata: {data_dir}\nadapter_path: {out}\n"
        "fine_tune_type: dora\niters: 1\nbatch_size: 2\nmax_seq_length: 64\nval_batches: 1\n"
        "steps_per_eval: 1000\nnum_layers: 2\nlearning_rate: 1.0e-3\n"
        f"optiq_rank_scaling: by_kl\noptiq_metadata: {sidecar}\n"
        "lora_parameters:\n  rank: 4\n  scale: 10.0\n  dropout: 0.0\n"
    )
    with optiq():
        main_of("lora", ["-c", config])
    record = adapter_files.read_record(out)
    assert record["rank_scaling"] == "by_kl" and record["fine_tune_type"] == "dora"
    assert record["base_rank"] == 4 and record["scale"] == 10.0
    modules = record["modules"]
    assert len(modules) == 14 and all(p.startswith(("model.layers.2.", "model.layers.3.")) for p in modules)
    most = max(modules, key=lambda p: modules[p]["kl"])
    least = min(modules, key=lambda p: modules[p]["kl"])
    assert modules[most]["rank"] > modules[least]["rank"]
    assert record["trainable_params"] <= record["budget_params"]
    # DoRA magnitudes ride along; stock mlx-lm reloads the padded file
    from mlx_lm import load

    import mlx_lm_optiq

    mlx_lm_optiq.disable()
    stock_model, _ = load(str(tiny_float_path), adapter_path=str(out))
    with optiq():
        compact_model, _ = load(str(tiny_float_path), adapter_path=str(out))
    assert type(compact_model.model.layers[3].mlp.down_proj).__name__ == "DoRALinear"
    assert mx.abs(logits(stock_model) - logits(compact_model)).max().item() < 1e-4


def test_lora_info_cli(by_bits_adapter, tiny_float_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_lm_optiq.lora.info", str(by_bits_adapter)],
        capture_output=True,
        text=True,
        check=True,
    )
    record = adapter_files.read_record(by_bits_adapter)
    assert f"base model:        {tiny_float_path}" in proc.stdout
    assert f"{record['trainable_params']:,} in 28 modules" in proc.stdout
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[-2:]}
    assert set(rows) == {"4", "6"}
    assert int(rows["6"][2]) > int(rows["4"][4])  # min rank of 6-bit layers > max rank of 4-bit ones


def test_disable_restores_lora_symbols():
    import mlx_lm.lora
    import mlx_lm.tuner.utils
    from mlx_lm.tuner.dora import DoRALinear

    dora_from_base = vars(DoRALinear)["from_base"]
    originals = (
        mlx_lm.lora.train_model,
        mlx_lm.lora.linear_to_lora_layers,
        mlx_lm.lora.load,
        mlx_lm.lora.load_adapters,
        mlx_lm.tuner.utils.load_adapters,
        mlx_lm.lora.build_parser,
        mlx_lm.lora.main,
        mlx_lm.lora.train,
    )
    with optiq():
        assert mlx_lm.lora.train_model is not originals[0]
        assert mlx_lm.tuner.utils.load_adapters is not originals[4]
        assert mlx_lm.lora.load_adapters is mlx_lm.tuner.utils.load_adapters
        assert vars(DoRALinear)["from_base"] is not dora_from_base
    assert vars(DoRALinear)["from_base"] is dora_from_base
    assert (
        mlx_lm.lora.train_model,
        mlx_lm.lora.linear_to_lora_layers,
        mlx_lm.lora.load,
        mlx_lm.lora.load_adapters,
        mlx_lm.tuner.utils.load_adapters,
        mlx_lm.lora.build_parser,
        mlx_lm.lora.main,
        mlx_lm.lora.train,
    ) == originals


@pytest.mark.slow
def test_by_kl_on_a_model_converted_by_optiq(tiny_float_path, data_dir, tmp_path, hooks_enabled):
    """The whole path: our mlx_lm.convert writes the sidecar; mlx_lm.lora finds it next to the model.

    The convert runs through the hooked Python API (its command line is test_convert's) on a few
    cheap candidates with stock rounding: this test is about the sidecar the lora run finds."""
    from mlx_lm import convert  # the hooked one

    converted = tmp_path / "optiq-mixed"
    convert(
        str(tiny_float_path),
        mlx_path=str(converted),
        quantize=True,
        optiq_target_bpw=5.6,
        optiq_candidates="3:64,4:64,8:64",
        optiq_num_samples=1,
        optiq_sequence_length=64,
        optiq_clipping="none",
        optiq_writer="rtn",
    )
    sidecar = json.loads((converted / "optiq_metadata.json").read_text())
    args = train_args(converted, data_dir, tmp_path / "ad", "--optiq-rank-scaling", "by_kl", "--rank", 4, iters=1)
    args[args.index("--max-seq-length") + 1] = 32
    args[args.index("--batch-size") + 1] = 1
    main_of("lora", args)  # stock `mlx_lm.lora`'s main, the hooks on
    record = adapter_files.read_record(tmp_path / "ad")
    assert record["metadata"] == str(converted / "optiq_metadata.json")
    for path, entry in record["modules"].items():
        assert entry["bits"] == sidecar["layers"][path]["bits"]
        assert entry["kl"] == layer_sensitivity(sidecar["layers"][path])
    assert record["trainable_params"] <= record["budget_params"]
    assert len({m["rank"] for m in record["modules"].values()}) > 2


def test_layer_sensitivity_reads_the_lowest_bit_candidate_whatever_its_format():
    # nvfp4 is a 4-bit candidate: lower than 8-bit, higher than 3-bit
    assert layer_sensitivity({"kl": {"8:64": 0.01, "nvfp4:16": 0.3}}) == 0.3
    assert layer_sensitivity({"kl": {"nvfp4:16": 0.3, "3:64": 0.9, "8:64": 0.01}}) == 0.9
