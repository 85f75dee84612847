"""Sensitivity sweeps on real SmolLM2 weights: exact, hidden-state reuse, resume, fisher,
2-rank sharding, low-bit reference memory, and table/candidate validation."""

import json
import math
import os
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_lm_optiq.core.formats import FormatError, candidate_key, check_with_mlx, parse_candidates
from mlx_lm_optiq.core.jsonio import OptiqFileError
from mlx_lm_optiq.core.model_tree import ModelError, quantizable_modules
from mlx_lm_optiq.weights.sweep import SensitivityError, measure_sensitivity
from mlx_lm_optiq.weights.table import read_table, write_table
from tests.helpers import free_port

CANDS = "4:64,8:64"
NUM_SAMPLES, SEQ_LEN = 2, 32
# A few modules of different kinds and depths, for the tests that need not sweep everything.
SOME = [
    "model.layers.1.mlp.down_proj",
    "model.layers.2.self_attn.v_proj",
    "model.layers.3.mlp.up_proj",
    "model.layers.3.self_attn.o_proj",
]


@pytest.fixture(scope="module")
def tokens(tiny_q4_path):
    from mlx_lm.utils import load_tokenizer

    from mlx_lm_optiq.core.calibration import load_calibration

    return load_calibration(load_tokenizer(tiny_q4_path), num_samples=NUM_SAMPLES, sequence_length=SEQ_LEN)


@pytest.fixture(scope="module")
def exact(tiny_float_path, tokens):
    """The full exact sweep of the 4-layer float model, two batches of one sample."""
    start = time.perf_counter()
    table = measure_sensitivity(tiny_float_path, tokens, CANDS, reference="float", batch_size=1, progress=False)
    print(f"\nexact sweep, {len(table['modules'])} modules x 2 candidates: {time.perf_counter() - start:.1f}s")
    return table


def _leaves_with_to_quantized(path):
    """Independent count: every leaf module of the model that has `to_quantized`."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    model, _ = load_model(path, lazy=True)
    return {p for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module) if hasattr(m, "to_quantized")}


def test_exact_sweep_covers_every_module(exact, tiny_float_path):
    leaves = _leaves_with_to_quantized(tiny_float_path)
    assert set(exact["modules"]) == leaves
    assert len(leaves) == 4 * 7 + 1  # 7 projections per block + the tied embedding/lm_head
    assert exact["reference"] == "float" and exact["method"] == "exact"
    assert exact["calibration"]["tokens"] == NUM_SAMPLES * SEQ_LEN
    for path, entry in exact["modules"].items():
        assert set(entry["kl"]) == {"4:64", "8:64"}, path
        assert all(v >= 0 and math.isfinite(v) for v in entry["kl"].values()), path
        assert entry["num_params"] == math.prod(entry["shape"])
    emb = exact["modules"]["model.embed_tokens"]
    assert emb["shape"] == [49152, 576]
    # The tied embedding (also the lm_head) is the most sensitive module, as measured on the full model.
    assert emb["kl"]["4:64"] == max(e["kl"]["4:64"] for e in exact["modules"].values())
    sensitive = [e for e in exact["modules"].values() if e["kl"]["4:64"] > 1e-3]
    assert len(sensitive) >= 10
    for e in sensitive:
        assert e["kl"]["8:64"] < e["kl"]["4:64"] / 10


def test_table_round_trip(exact, tmp_path):
    path = write_table(exact, tmp_path / "table.json")
    assert json.loads(path.read_text())["kind"] == "optiq-sensitivity"
    assert read_table(path)["modules"] == exact["modules"]


def test_hidden_state_reuse_equals_full_forward(exact, tiny_float_path, tokens):
    mods = ["model.layers.1.mlp.down_proj", "model.layers.3.self_attn.v_proj"]
    start = time.perf_counter()
    naive = measure_sensitivity(
        tiny_float_path,
        tokens,
        CANDS,
        reference="float",
        batch_size=1,
        progress=False,
        modules=mods,
        reuse_hidden_states=False,
    )
    print(f"\nnaive (full forward per probe), {len(mods)} modules: {time.perf_counter() - start:.1f}s")
    for p in mods:
        for k, v in naive["modules"][p]["kl"].items():
            assert v == pytest.approx(exact["modules"][p]["kl"][k], rel=1e-5, abs=1e-7), (p, k)


# Stacked probes round the perturbation's propagation through other kernels (more rows per
# matmul), so they agree with one-forward-per-probe to float32 accuracy: about 2e-7 nats per
# token absolute (measured), i.e. ~1e-4 relative for the sensitive (>1e-3) entries.
STACKED_REL, STACKED_ABS = 1e-3, 1e-6


def test_stacked_probes_equal_one_forward_per_probe(exact, tiny_float_path, tokens):
    # All modules of block 0 (first block: its inputs are the recorded embeddings) and two of block 3.
    mods = [p for p in exact["modules"] if p.startswith("model.layers.0.")] + SOME[2:]
    start = time.perf_counter()
    table = measure_sensitivity(
        tiny_float_path, tokens, CANDS, reference="float", batch_size=1, progress=False, modules=mods, batch_probes=True
    )
    print(
        f"\nstacked probes, {len(mods)} modules: {time.perf_counter() - start:.1f}s, "
        f"{table['probes_per_pass']} probes per pass"
    )
    assert table["probes_per_pass"] > 1
    # The unperturbed model stacked in a pass reproduces its in-pass reference bit for bit.
    assert table["stacked_probe_kl_floor"] == 0.0
    for p in mods:
        for k, v in exact["modules"][p]["kl"].items():
            assert table["modules"][p]["kl"][k] == pytest.approx(v, rel=STACKED_REL, abs=STACKED_ABS), (p, k)
    assert "probes_per_pass" in exact and exact["probes_per_pass"] == 1  # CPU default: no stacking


def test_resume_after_interrupt(exact, tiny_float_path, tokens, tmp_path):
    ckpt = tmp_path / "sweep.ckpt.json"
    calls = []

    def interrupt_after_three(batch, path):
        calls.append((batch, path))
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interrupt")

    # Stacked probes: block 3's two modules share passes and are checkpointed one by one.
    kw = dict(reference="float", batch_size=1, progress=False, modules=SOME, checkpoint_path=ckpt, batch_probes=True)
    with pytest.raises(KeyboardInterrupt):
        measure_sensitivity(tiny_float_path, tokens, CANDS, on_probe=interrupt_after_three, **kw)
    assert ckpt.exists()
    resumed_calls = []
    table = measure_sensitivity(
        tiny_float_path, tokens, CANDS, on_probe=lambda b, p: resumed_calls.append((b, p)), **kw
    )
    total = NUM_SAMPLES * len(SOME)
    assert len(resumed_calls) == total - 3
    assert not set(resumed_calls) & set(calls)
    for p in SOME:
        assert table["modules"][p]["kl"] == pytest.approx(
            exact["modules"][p]["kl"], rel=STACKED_REL, abs=STACKED_ABS
        ), p
    # A finished checkpoint resumes to the same table with no probes at all.
    again = []
    assert (
        measure_sensitivity(tiny_float_path, tokens, CANDS, on_probe=lambda b, p: again.append(p), **kw)["modules"]
        == table["modules"]
    )
    assert again == []
    # A checkpoint from another configuration is refused, naming the file and the field.
    with pytest.raises(SensitivityError, match=r"sweep.ckpt.json: field 'fingerprint.candidates'"):
        measure_sensitivity(tiny_float_path, tokens, "4:32,8:64", **kw)


def test_fisher_estimate_ranks_like_exact(exact, tiny_float_path, tokens):
    from scipy.stats import spearmanr

    start = time.perf_counter()
    fisher = measure_sensitivity(tiny_float_path, tokens, CANDS, method="fisher", reference="float", progress=False)
    print(f"\nfisher, {len(fisher['modules'])} modules: {time.perf_counter() - start:.1f}s")
    assert fisher["method"] == "fisher" and set(fisher["modules"]) == set(exact["modules"])
    paths = sorted(exact["modules"])
    ex = [exact["modules"][p]["kl"][k] for p in paths for k in ("4:64", "8:64")]
    fi = [fisher["modules"][p]["kl"][k] for p in paths for k in ("4:64", "8:64")]
    assert all(v >= 0 for v in fi)
    rho_all = spearmanr(ex, fi).statistic
    rho_4bit = spearmanr(ex[0::2], fi[0::2]).statistic  # ranking of modules at one candidate
    print(f"spearman(exact, fisher): all pairs {rho_all:.3f}, modules at 4:64 {rho_4bit:.3f}")
    assert rho_all > 0.8 and rho_4bit > 0.6


def test_fisher_accumulates_in_chunks_to_the_same_table(tiny_float_path, tokens, monkeypatch):
    """The Fisher accumulators are updated a few modules per eval (an 8B model updated all at
    once ran out of memory on an H200): one module per eval gives the same table, bit for bit."""
    from mlx_lm_optiq.weights import sweep

    kw = dict(method="fisher", reference="float", clipping="none", progress=False)
    whole = measure_sensitivity(tiny_float_path, tokens[:2], "4:64", **kw)
    monkeypatch.setattr(sweep, "_FISHER_CHUNK_BYTES", 1)
    assert measure_sensitivity(tiny_float_path, tokens[:2], "4:64", **kw)["modules"] == whole["modules"]


def test_two_rank_sharded_sweep_equals_single_process(exact, tiny_float_path, tmp_path):
    out = tmp_path / "sharded.json"
    mods = SOME[:2]
    env = {k: v for k, v in os.environ.items() if k != "MLX_LM_OPTIQ"}
    launcher = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    cmd = [
        launcher,
        "--backend",
        "ring",
        "-n",
        "2",
        "--starting-port",
        str(free_port()),
        "--",
        sys.executable,
        "-m",
        "mlx_lm_optiq.weights",
        "--model",
        str(tiny_float_path),
        "--output",
        str(out),
        "--candidates",
        CANDS,
        "--reference",
        "float",
        "--num-samples",
        str(NUM_SAMPLES),
        "--sequence-length",
        str(SEQ_LEN),
        "--batch-size",
        "1",
        "--modules",
        ",".join(mods),
        "--distributed",
        "--quiet",
        "--checkpoint",
        str(tmp_path / "ckpt.json"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = read_table(out)
    # Each rank measured (and checkpointed) only its own share: modules alternate in model order.
    shares = [json.loads((tmp_path / f"ckpt.json.rank{r}-of-2").read_text())["sums"] for r in (0, 1)]
    assert list(shares[0]) == [mods[0]] and list(shares[1]) == [mods[1]]
    assert table["calibration"]["sha256"] == exact["calibration"]["sha256"]
    # Same numbers; float32 BLAS reductions in another process (thread split) differ by ~1e-8.
    for p in mods:
        assert table["modules"][p]["kl"] == pytest.approx(exact["modules"][p]["kl"], rel=1e-6), p


def test_quantized_input_is_dequantized_with_a_log_line(tiny_q4_path, tokens, capsys):
    table = measure_sensitivity(
        tiny_q4_path, tokens, CANDS, reference="float", progress=False, modules=["model.layers.0.mlp.down_proj"]
    )
    assert "is quantized (4-bit, group 32): the float reference is its dequantization" in capsys.readouterr().out
    assert table["float_reference"] == "dequantized from the quantized input"
    kl = table["modules"]["model.layers.0.mlp.down_proj"]["kl"]
    assert 0 < kl["8:64"] < kl["4:64"]


def test_low_bit_reference_keeps_memory_near_the_low_bit_model(full_float_path, tiny_q4_path):
    """Peak MLX memory of a low-bit sweep of full SmolLM2 (fp16 checkpoint) vs a float sweep."""
    from mlx_lm.utils import load_tokenizer

    from mlx_lm_optiq.core.calibration import load_calibration

    tokens = load_calibration(load_tokenizer(tiny_q4_path), num_samples=1, sequence_length=16)
    mods = ["model.layers.28.self_attn.v_proj", "model.layers.29.mlp.down_proj"]
    float_file_bytes = (full_float_path / "model.safetensors").stat().st_size
    peaks, tables = {}, {}
    for ref in ("auto", "float"):
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        # auto with a budget the float model does not fit picks the low-bit reference.
        tables[ref] = measure_sensitivity(
            full_float_path,
            tokens,
            "2:64,4:64,8:64",
            reference=ref,
            progress=False,
            modules=mods,
            memory_budget=float_file_bytes,
        )
        peaks[ref] = mx.get_peak_memory() - base
    low, flt = tables["auto"], tables["float"]
    assert low["reference"] == "low-bit"
    print(
        f"\npeak MLX memory: low-bit {peaks['auto'] / 2**20:.0f} MiB, float {peaks['float'] / 2**20:.0f} MiB, "
        f"fp16 checkpoint {float_file_bytes / 2**20:.0f} MiB"
    )
    # The whole model at 2:64 is ~48 MiB; the float (fp32 compute) reference needs > 500 MiB.
    assert peaks["float"] > float_file_bytes
    assert peaks["auto"] < 0.4 * float_file_bytes
    # "Near the low-bit model": the model itself plus one module's float weight and activations.
    assert low["reference_model_bytes"] < 60 * 2**20
    assert peaks["auto"] < 2 * low["reference_model_bytes"]
    for p in mods:
        kl = low["modules"][p]["kl"]
        # Low-bit meaning: loss relative to the module at its top candidate.
        assert kl["8:64"] == 0.0 and kl["2:64"] > kl["4:64"] > 0, p
        assert flt["modules"][p]["kl"]["2:64"] > flt["modules"][p]["kl"]["4:64"] > flt["modules"][p]["kl"]["8:64"]


def test_candidates_and_modules_are_validated(tiny_float_path, tokens):
    assert candidate_key(4, 64) == "4:64" and candidate_key(4, 32, "mxfp4") == "mxfp4:32"
    assert [candidate_key(**c) for c in check_with_mlx(parse_candidates("8:64,4:32,mxfp4:32,4:64"))] == [
        "mxfp4:32",
        "4:64",
        "4:32",
        "8:64",
    ]
    with pytest.raises(FormatError, match="candidate '4-64'"):
        measure_sensitivity(tiny_float_path, tokens, ["4-64"], progress=False)
    with pytest.raises(FormatError, match="mxfp4 has group size 32, got 64"):
        measure_sensitivity(tiny_float_path, tokens, "mxfp4:64", progress=False)
    with pytest.raises(FormatError, match="candidate nvfp4:64: mx.quantize rejects it"):
        check_with_mlx([{"bits": 4, "group_size": 64, "mode": "nvfp4"}])
    with pytest.raises(SensitivityError, match=r"modules \['model.layers.9.mlp.up_proj'\] are not quantizable"):
        measure_sensitivity(tiny_float_path, tokens, CANDS, modules=["model.layers.9.mlp.up_proj"], progress=False)
    with pytest.raises(SensitivityError, match=r"calibration tokens must be ids in \[0, 49152\)"):
        measure_sensitivity(tiny_float_path, tokens + 49152, CANDS, progress=False)
    with pytest.raises(SensitivityError, match="method='fisher' needs"):
        measure_sensitivity(tiny_float_path, tokens, CANDS, method="fisher", reference="low-bit", progress=False)


def test_group_size_not_dividing_a_module_is_recorded_not_dropped(tiny_float_path, tokens):
    # 576 = 2^6 * 9: group 128 fits no module of SmolLM2, group 64 fits all.
    table = measure_sensitivity(
        tiny_float_path,
        tokens,
        "4:64,4:128",
        reference="float",
        progress=False,
        modules=["model.layers.0.self_attn.k_proj"],
    )
    entry = table["modules"]["model.layers.0.self_attn.k_proj"]
    assert set(entry["kl"]) == {"4:64"}
    assert [candidate_key(**c) for c in table["candidates"]] == ["4:128", "4:64"]


def test_quantizable_modules_refuses_quantized_models(tiny_q4_path):
    from mlx_lm.utils import load_model

    model, _ = load_model(tiny_q4_path, lazy=True)
    with pytest.raises(ModelError, match="model.embed_tokens is already quantized"):
        quantizable_modules(model)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.update(kind="other"), "field 'kind' is 'other'"),
        (lambda t: t.pop("modules"), "missing required field 'modules'"),
        (
            lambda t: t["modules"]["model.embed_tokens"]["kl"].update({"4:64": -1.0}),
            r"field 'modules.model.embed_tokens.kl.4:64' must be a finite number >= 0",
        ),
        (
            lambda t: t["modules"]["model.embed_tokens"]["kl"].update({"3:64": 0.1}),
            r"kl.3:64' is not one of the table's candidates",
        ),
        (lambda t: t["modules"]["model.embed_tokens"].update(shape=[1, 2]), r"\.shape' must be a list"),
        (lambda t: t["calibration"].pop("sha256"), "field 'calibration.sha256' must be a string"),
        (lambda t: t.update(candidates=[{"bits": "4"}]), r"field 'candidates\[0\]' must be"),
    ],
)
def test_corrupt_table_errors_name_file_and_field(exact, tmp_path, mutate, message):
    data = json.loads(json.dumps({"format_version": 1, "kind": "optiq-sensitivity", **exact}))
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OptiqFileError, match=message) as err:
        read_table(path)
    assert str(err.value).startswith(f"{path}: ")


def test_truncated_table_file(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('{"format_version": 1, "kind": "optiq-sensi')
    with pytest.raises(OptiqFileError, match="cut.json: not valid JSON"):
        read_table(path)


def test_command_line_errors_are_one_line_before_loading(tiny_q4_path, tmp_path, capsys, monkeypatch):
    """Issue 16 items 8/11: `python -m mlx_lm_optiq.weights` reports a bad flag combination, model
    folder or calibration file as one line (exit 1) before it loads or measures anything."""
    from mlx_lm_optiq.weights import cli, sweep

    monkeypatch.setattr(sweep, "measure_sensitivity", lambda *a, **k: pytest.fail("measured"))
    garbage = tmp_path / "model"
    garbage.mkdir()
    (garbage / "config.json").write_bytes(b"\x00\x01\x02")
    binary = tmp_path / "calib.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    out = ["--output", str(tmp_path / "t.json")]
    for argv, message in (
        (
            ["--model", str(tiny_q4_path), "--method", "fisher", "--checkpoint", "c.json"],
            "a checkpoint resumes an exact",
        ),
        (["--model", str(tiny_q4_path), "--candidates", "4:48"], "candidate group sizes must be among"),
        (["--model", str(garbage)], f"{garbage}/config.json: not valid JSON"),
        (["--model", str(tiny_q4_path), "--calibration", str(binary)], f"{binary}: not a UTF-8 text file"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, *out])
        err = capsys.readouterr().err
        assert e.value.code == 1 and "Traceback" not in err, err
        assert err.strip().startswith("python -m mlx_lm_optiq.weights: error: ") and message in err, err
    assert not (tmp_path / "t.json").exists()
