"""`mlx_lm.convert --optiq-target-bpw`: measured mixed precision on the real 4-layer SmolLM2,
stock reload with the exact bits, re-planning from the sidecar, errors, atomicity, text-only."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import optiq

TARGET = 4.8
MEASURED_TOKENS = 16  # the calibration of the `measured` fixture: one sample of this many tokens
CONVERT = [sys.executable, "-m", "mlx_lm", "convert"]  # the `mlx_lm convert` subcommand form
CONVERT_SCRIPT = [os.path.join(os.path.dirname(sys.executable), "mlx_lm.convert")]  # the console script


def _stock_env():
    return {k: v for k, v in os.environ.items() if k != "MLX_LM_OPTIQ"}


def _convert_cli(args, env, command=CONVERT):
    return subprocess.run(command + args, env=env, capture_output=True, text=True)


def _partials(parent):
    return [p for p in parent.iterdir() if ".optiq-partial-" in p.name]


@pytest.fixture(scope="module")
def measured(tiny_q4_path, tmp_path_factory):
    """Console script, hooks on: measure sensitivity on the bundled calibration set, plan, write."""
    out = tmp_path_factory.mktemp("measured") / "mixed"
    env = dict(os.environ, MLX_LM_OPTIQ="1")
    res = _convert_cli(
        [
            "--hf-path",
            str(tiny_q4_path),
            "-q",
            "--optiq-target-bpw",
            str(TARGET),
            "--optiq-candidate-bits",
            "4,8",
            "--optiq-group-sizes",
            "32,64",
            "--optiq-sensitivity-method",  # the CPU default is fisher; this fixture checks the exact sweep
            "exact",
            "--optiq-num-samples",
            "1",
            "--optiq-sequence-length",
            str(MEASURED_TOKENS),  # short: each of the exact sweep's 116 probes runs the vocabulary head on them
            "--mlx-path",
            str(out),
        ],
        env,
        command=CONVERT_SCRIPT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Sensitivity (exact)" in res.stderr  # it measured
    return out


STOCK_RELOAD = """
import json, sys
import mlx.core as mx
from mlx_lm import load
from mlx_lm.utils import compute_bits_per_weight
assert 'mlx_lm_optiq' not in sys.modules
model, tok = load(sys.argv[1])
layers = {p: [m.bits, m.group_size] for p, m in model.named_modules() if hasattr(m, 'bits')}
modes = {p: m.mode for p, m in model.named_modules() if hasattr(m, 'bits')}
logits = model(mx.array([tok.encode('It was a truth universally acknowledged')]))
print(json.dumps({'layers': layers, 'modes': modes, 'bpw': compute_bits_per_weight(model),
                  'finite': bool(mx.isfinite(logits).all().item())}))
"""


def _stock_reload(path):
    res = subprocess.run(
        [sys.executable, "-c", STOCK_RELOAD, str(path)], env=_stock_env(), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _sidecar(path):
    return json.loads((path / "optiq_metadata.json").read_text())


def test_measured_convert_reloads_in_stock_mlx_lm_with_planned_bits(measured):
    meta = _sidecar(measured)
    config = json.loads((measured / "config.json").read_text())
    got = _stock_reload(measured)
    planned = {p: [c["bits"], c["group_size"]] for p, c in meta["layers"].items() if "group_size" in c}
    assert got["layers"] == planned
    assert {b for b, _ in planned.values()} == {4, 8}  # it really mixes
    for p, c in meta["layers"].items():  # always the explicit per-path dict
        assert config["quantization"][p] == {"bits": c["bits"], "group_size": c["group_size"], "mode": "affine"}
    assert got["bpw"] <= TARGET and got["bpw"] == pytest.approx(meta["achieved_bpw"], abs=1e-9)
    assert got["bpw"] > TARGET - 0.05
    assert got["finite"]
    # the sidecar carries the whole sensitivity table and its provenance
    assert meta["method"] == "exact" and meta["reference"] == "float"
    assert set(meta["sensitivity"]["modules"]) == set(meta["layers"])
    # clipped group ranges by default; the moments of every linear module travel with the table
    assert meta["clipping"] == "activation" and meta["sensitivity"]["clipping"]["method"] == "activation"
    assert set(meta["sensitivity"]["clipping"]["moments"]) == set(meta["layers"]) - {"model.embed_tokens"}
    assert meta["sensitivity"]["calibration"]["tokens"] == MEASURED_TOKENS
    assert all(set(e["kl"]) == {"4:32", "4:64", "8:32", "8:64"} for e in meta["layers"].values())


def test_explicit_candidates_mix_float_formats_and_reload_in_stock_mlx_lm(
    measured, tiny_q4_path, tmp_path, hooks_enabled
):
    """--optiq-candidates mixes nvfp4 (group 16, one fp8 scale per group: 4.5 bits) with affine
    8-bit; the config's top-level entry is itself valid (nvfp4:16, the smallest group)."""
    from mlx_lm import convert

    out = tmp_path / "nvfp4-mix"
    convert(
        str(tiny_q4_path),
        mlx_path=str(out),
        quantize=True,
        optiq_target_bpw=5.0,
        optiq_candidates="nvfp4:16,8:64",
        optiq_sensitivity_method="fisher",
        optiq_num_samples=1,
        optiq_sequence_length=64,
        optiq_clipping="none",  # fast: the subject is the formats (clipping and gptq: test_clipping, test_gptq)
        optiq_writer="rtn",
    )
    meta = _sidecar(out)
    config = json.loads((out / "config.json").read_text())
    got = _stock_reload(out)
    planned = {p: (c["bits"], c["group_size"], c["mode"]) for p, c in meta["layers"].items() if "group_size" in c}
    assert {(b, g, got["modes"][p]) for p, (b, g) in got["layers"].items()} == set(planned.values())
    assert {p: (*got["layers"][p], got["modes"][p]) for p in got["layers"]} == planned
    assert set(planned.values()) == {(4, 16, "nvfp4"), (8, 64, "affine")}  # it really mixes formats
    assert {k: config["quantization"][k] for k in ("bits", "group_size", "mode")} == {
        "bits": 4,
        "group_size": 16,
        "mode": "nvfp4",
    }
    assert 4.9 < got["bpw"] <= 5.0 and got["finite"]
    assert all(set(e["kl"]) == {"nvfp4:16", "8:64"} for e in meta["layers"].values())
    from mlx_lm_optiq.weights.plot import format_label

    assert {format_label(c) for c in meta["layers"].values()} == {"nvfp4", "8-bit"}


def test_bad_explicit_candidates_are_clear_errors(tiny_q4_path, tmp_path, hooks_enabled):
    from mlx_lm import convert

    from mlx_lm_optiq.weights.plan import PlanError

    for spec, message in (
        ("nvfp4:32", "--optiq-candidates: nvfp4 has group size 16, got 32"),
        ("4:48", "--optiq-candidates: candidate group sizes must be among 32,64,128, got 48"),
        ("fp4:16", "--optiq-candidates: candidate 'fp4:16': unknown mode 'fp4'"),
        ("", "--optiq-candidates: no candidates given"),
    ):
        with pytest.raises(PlanError, match=message):
            convert(
                str(tiny_q4_path),
                mlx_path=str(tmp_path / "o"),
                quantize=True,
                optiq_target_bpw=5.0,
                optiq_candidates=spec,
            )
    with pytest.raises(PlanError, match="--optiq-candidates: lists every candidate: drop --optiq-candidate-bits"):
        convert(
            str(tiny_q4_path),
            mlx_path=str(tmp_path / "o"),
            quantize=True,
            optiq_target_bpw=5.0,
            optiq_candidates="4:64,8:64",
            optiq_candidate_bits="4,8",
        )
    assert not (tmp_path / "o").exists()


def test_plot_of_a_converted_model(measured, tmp_path):
    """python -m mlx_lm_optiq.weights.plot writes the PNG; each module's KL is read at the cheapest
    candidate measured for it (a group that does not divide a layer has no KL there)."""
    pytest.importorskip("matplotlib")
    import copy
    import math

    from mlx_lm_optiq.weights.plot import cheapest_kl

    res = subprocess.run(
        [sys.executable, "-m", "mlx_lm_optiq.weights.plot", str(measured), "--output", str(tmp_path / "b.png")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = _sidecar(measured)
    q = meta["layers"]["model.layers.0.self_attn.q_proj"]
    assert cheapest_kl(q, meta["candidates"]) == q["kl"]["4:64"]  # 4:64 is cheaper than 4:32
    partial = copy.deepcopy(q)
    del partial["kl"]["4:64"]  # as when 64 does not divide the layer's input dims
    assert cheapest_kl(partial, meta["candidates"]) == q["kl"]["4:32"]
    assert all(not math.isnan(cheapest_kl(e, meta["candidates"])) for e in meta["layers"].values() if "kl" in e)


def test_replan_from_sidecar_with_python_api_does_not_measure(
    measured, tiny_q4_path, tmp_path, hooks_enabled, monkeypatch
):
    from mlx_lm import convert

    from mlx_lm_optiq.weights import sweep

    def no_measuring(*a, **k):
        raise AssertionError("measured although a sensitivity table was given")

    monkeypatch.setattr(sweep, "measure_sensitivity", no_measuring)
    out = tmp_path / "replanned"
    convert(
        str(tiny_q4_path),
        mlx_path=str(out),
        quantize=True,
        optiq_target_bpw=4.6,
        optiq_candidate_bits=[4, 8],
        optiq_group_sizes="32,64",
        optiq_sensitivity=str(measured / "optiq_metadata.json"),
    )
    meta = _sidecar(out)
    assert meta["target_bpw"] == 4.6 and 4.55 < meta["achieved_bpw"] <= 4.6
    assert meta["sensitivity"] == _sidecar(measured)["sensitivity"]
    eights = lambda m: sum(c["bits"] == 8 for c in m["layers"].values())  # noqa: E731
    assert eights(meta) < eights(_sidecar(measured))  # a lower target buys fewer 8-bit layers
    assert not _partials(tmp_path)
    # re-planning clips from the table's moments exactly as the measured convert did: a module
    # planned the same in both is written bit for bit the same
    import mlx.core as mx

    first, again = mx.load(str(measured / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    same = [
        p
        for p, c in meta["layers"].items()
        if p != "model.embed_tokens"
        and {k: c.get(k) for k in ("bits", "group_size")}
        == {k: _sidecar(measured)["layers"][p].get(k) for k in ("bits", "group_size")}
    ]
    assert same
    for p in same:
        for part in ("weight", "scales", "biases"):
            assert mx.array_equal(first[f"{p}.{part}"], again[f"{p}.{part}"]).item(), (p, part)


@pytest.fixture(scope="module")
def measured_with_3_bits(tiny_q4_path, tmp_path_factory):
    """A convert that measured 3-bit too (fisher, stock ranges, stock rounding, one short sample: fast)."""

    out = tmp_path_factory.mktemp("rich") / "mixed"
    with optiq():
        from mlx_lm import convert  # the hooked one

        convert(
            str(tiny_q4_path),
            mlx_path=str(out),
            quantize=True,
            optiq_target_bpw=4.8,
            optiq_candidates="3:64,4:64,8:64",
            optiq_sensitivity_method="fisher",
            optiq_clipping="none",
            optiq_writer="rtn",
            optiq_num_samples=1,
            optiq_sequence_length=64,
        )
    return out


def test_replan_from_sidecar_uses_the_candidates_it_measured(
    measured_with_3_bits, tiny_q4_path, tmp_path, hooks_enabled, monkeypatch, capsys
):
    """No candidate flag when re-planning: the sidecar's own candidates (3:64 included), not the
    4:64/8:64 defaults, which could not reach 4.0 bits per weight."""
    from mlx_lm import convert

    from mlx_lm_optiq.weights import sweep

    monkeypatch.setattr(sweep, "measure_sensitivity", lambda *a, **k: pytest.fail("measured again"))
    out = tmp_path / "replanned"
    convert(
        str(tiny_q4_path),
        mlx_path=str(out),
        quantize=True,
        optiq_target_bpw=4.0,
        optiq_sensitivity=str(measured_with_3_bits / "optiq_metadata.json"),
        optiq_writer="rtn",  # the subject is the candidates; gptq re-planning: test_replan_..._does_not_measure
    )
    meta = _sidecar(out)
    assert [f"{c['bits']}:{c['group_size']}" for c in meta["candidates"]] == ["3:64", "4:64", "8:64"]
    assert 3.9 < meta["achieved_bpw"] <= 4.0
    assert any(c["bits"] == 3 for c in meta["layers"].values())
    assert "no 2-bit candidates" not in capsys.readouterr().err  # 4.0 BPW: the 2-bit ones would not pay

    # below 3.7 BPW a measuring convert would add 2-bit candidates: the re-plan says how to get them
    convert(
        str(tiny_q4_path),
        mlx_path=str(tmp_path / "low"),
        quantize=True,
        optiq_target_bpw=3.6,
        optiq_sensitivity=str(measured_with_3_bits),
        optiq_writer="rtn",
    )
    err = capsys.readouterr().err
    assert "has no 2-bit candidates" in err and "--optiq-candidates 3:64,4:64,8:64,2:32,2:64" in err, err
    assert {c["bits"] for c in _sidecar(tmp_path / "low")["layers"].values()} <= {3, 4, 8}

    # candidate flags still restrict the choice to a subset of the measured ones
    subset = tmp_path / "subset"
    convert(
        str(tiny_q4_path),
        mlx_path=str(subset),
        quantize=True,
        optiq_target_bpw=4.6,
        optiq_candidate_bits="4,8",
        optiq_sensitivity=str(measured_with_3_bits),
        optiq_writer="rtn",
    )
    assert {c["bits"] for c in _sidecar(subset)["layers"].values()} == {4, 8}
    # ... and one the table did not measure is a clear error naming it
    from mlx_lm_optiq.weights.plan import PlanError

    with pytest.raises(PlanError, match=r"--optiq-sensitivity: .* did not measure candidate\(s\) \['2:64'\]"):
        convert(
            str(tiny_q4_path),
            mlx_path=str(tmp_path / "unmeasured"),
            quantize=True,
            optiq_target_bpw=4.0,
            optiq_candidates="2:64,4:64",
            optiq_sensitivity=str(measured_with_3_bits),
        )
    assert not (tmp_path / "unmeasured").exists()


def test_protections_keep_modules_at_their_most_precise_candidate(measured, tiny_q4_path, tmp_path, hooks_enabled):
    from mlx_lm import convert

    out = tmp_path / "protected"
    convert(
        str(tiny_q4_path),
        mlx_path=str(out),
        quantize=True,
        optiq_target_bpw=5.0,
        optiq_candidate_bits="4,8",
        optiq_group_sizes="32,64",
        optiq_protect="first-block",
        optiq_sensitivity=str(measured),
        optiq_writer="rtn",  # the subject is the plan; gptq re-planning: test_replan_..._does_not_measure
    )
    meta = _sidecar(out)
    got = _stock_reload(out)
    for p, c in meta["layers"].items():
        if ".layers.0." in p:
            assert c["bits"] == 8 and c["protected"] == "first-block"
            assert got["layers"][p] == [8, c["group_size"]]
        else:
            assert "protected" not in c
    assert got["bpw"] <= 5.0


def test_infeasible_target_is_a_clear_error_and_writes_nothing(
    measured, tiny_q4_path, tmp_path, hooks_enabled, monkeypatch, capsys
):
    """The hooked command line, in process (the subprocess forms: the console-script and interrupt tests)."""
    out = tmp_path / "too-small"
    code, err = _convert_main(
        [
            "--hf-path",
            str(tiny_q4_path),
            "-q",
            "--optiq-target-bpw",
            "4.2",
            "--optiq-sensitivity",
            str(measured / "optiq_metadata.json"),
            "--mlx-path",
            str(out),
        ],
        monkeypatch,
        capsys,
    )
    assert code != 0
    assert "--optiq-target-bpw: 4.2 is infeasible" in err and "4.50" in err
    assert not out.exists() and not _partials(tmp_path)


def test_corrupt_sensitivity_file_is_a_clear_error(
    tiny_q4_path, tmp_path, measured, hooks_enabled, monkeypatch, capsys
):
    bad = tmp_path / "table.json"
    meta = _sidecar(measured)
    meta["sensitivity"]["modules"]["model.layers.1.mlp.up_proj"]["kl"]["4:64"] = "lots"
    bad.write_text(json.dumps(meta))
    out = tmp_path / "out"
    code, err = _convert_main(
        [
            "--hf-path",
            str(tiny_q4_path),
            "-q",
            "--optiq-target-bpw",
            "4.8",
            "--optiq-sensitivity",
            str(bad),
            "--mlx-path",
            str(out),
        ],
        monkeypatch,
        capsys,
    )
    assert code != 0
    assert str(bad) in err and "modules.model.layers.1.mlp.up_proj.kl.4:64' must be a finite number" in err
    assert not out.exists()


def test_optiq_flags_without_target_are_refused(tiny_q4_path, tmp_path, hooks_enabled):
    from mlx_lm import convert

    from mlx_lm_optiq.weights.plan import PlanError

    with pytest.raises(PlanError, match="--optiq-candidate-bits: need --optiq-target-bpw"):
        convert(str(tiny_q4_path), mlx_path=str(tmp_path / "o"), quantize=True, optiq_candidate_bits="4,8")
    with pytest.raises(PlanError, match="--optiq-num-samples: configure measuring, which --optiq-sensitivity skips"):
        convert(
            str(tiny_q4_path),
            mlx_path=str(tmp_path / "o"),
            quantize=True,
            optiq_target_bpw=4.8,
            optiq_sensitivity=str(tmp_path / "t.json"),
            optiq_num_samples=4,
        )
    with pytest.raises(PlanError, match="--optiq-clipping: configure measuring, which --optiq-sensitivity skips"):
        convert(
            str(tiny_q4_path),
            mlx_path=str(tmp_path / "o"),
            quantize=True,
            optiq_target_bpw=4.8,
            optiq_sensitivity=str(tmp_path / "t.json"),
            optiq_clipping="none",
        )
    assert not (tmp_path / "o").exists()


def test_interrupted_convert_leaves_no_complete_looking_directory(tiny_q4_path, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        CONVERT
        + [
            "--hf-path",
            str(tiny_q4_path),
            "-q",
            "--optiq-target-bpw",
            "4.8",
            "--optiq-num-samples",
            "1",
            "--optiq-sequence-length",
            "32",
            "--mlx-path",
            str(out),
        ],
        env=dict(os.environ, MLX_LM_OPTIQ="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not _partials(tmp_path) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _partials(tmp_path), "convert never started staging"
        time.sleep(2)  # inside the dequantize/measure work
        assert proc.poll() is None, "convert finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    assert all(p.name.startswith(".") for p in _partials(tmp_path))  # hidden, clearly partial


def _make_multimodal(float_dir, dst):
    """A tiny mistral3-style vision-language checkpoint around the real 4-layer text model."""
    import shutil

    import mlx.core as mx
    import numpy as np

    dst.mkdir()
    text_config = json.loads((float_dir / "config.json").read_text())
    text_config["model_type"] = "mistral"
    weights = {"language_model." + k: v for k, v in mx.load(str(float_dir / "model.safetensors")).items()}
    rng = np.random.default_rng(0)
    weights["vision_tower.patch_conv.weight"] = mx.array(rng.standard_normal((32, 3, 4, 4)).astype(np.float32))
    weights["vision_tower.transformer.layers.0.attention.q_proj.weight"] = mx.array(
        rng.standard_normal((32, 32)).astype(np.float32)
    )
    weights["multi_modal_projector.linear_1.weight"] = mx.array(rng.standard_normal((576, 32)).astype(np.float32))
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    config = {
        "model_type": "mistral3",
        "architectures": ["Mistral3ForConditionalGeneration"],
        "text_config": text_config,
        "image_token_index": 10,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "spatial_merge_size": 2,
        "vision_config": {"model_type": "pixtral", "hidden_size": 32, "patch_size": 4},
        "audio_config": {"model_type": "whisper", "d_model": 32},
    }
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "PixtralImageProcessor"}))
    for f in float_dir.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, dst / f.name)
    return dst


def test_text_only_writes_the_plain_text_model(tiny_float_path, tmp_path, hooks_enabled):
    import mlx.core as mx
    from mlx_lm import convert
    from mlx_lm.utils import load_model

    mm = _make_multimodal(tiny_float_path, tmp_path / "vlm")
    out = tmp_path / "text-only"
    convert(str(mm), mlx_path=str(out), quantize=True, q_group_size=64, q_bits=4, optiq_text_only=True)
    both = tmp_path / "both"
    convert(str(mm), mlx_path=str(both), quantize=True, q_group_size=64, q_bits=4)  # stock, for comparison
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral"
    for key in ("text_config", "vision_config", "audio_config", "image_token_index", "vision_feature_layer"):
        assert key not in config
    assert config["quantization"] == {"bits": 4, "group_size": 64, "mode": "affine"}
    keys = list(mx.load(str(out / "model.safetensors")))
    assert keys and not [k for k in keys if k.startswith("language_model.") or "vision" in k or "projector" in k]
    assert not (out / "preprocessor_config.json").exists()
    text_model, _ = load_model(out)
    full_model, full_config = load_model(both)
    assert full_config["model_type"] == "mistral3"
    probe = mx.array([[1, 50, 200, 3000, 7]])
    assert mx.array_equal(text_model(probe), full_model(probe)).item()
    assert type(text_model).__module__.endswith("llama")


def test_misspelt_python_api_keyword_is_an_error_before_any_work(tiny_q4_path, tmp_path, hooks_enabled, monkeypatch):
    """`optiq_num_sample=2` (no s) must not silently measure with the default sample count."""
    from mlx_lm import convert  # the hooked one

    from mlx_lm_optiq.weights import sweep

    def never(*a, **k):
        raise AssertionError("measured despite a misspelt keyword")

    monkeypatch.setattr(sweep, "measure_sensitivity", never)
    out = tmp_path / "out"
    with pytest.raises(TypeError, match="unexpected keyword\\(s\\) optiq_num_sample; known: .*optiq_num_samples"):
        convert(str(tiny_q4_path), mlx_path=str(out), quantize=True, optiq_target_bpw=4.5, optiq_num_sample=2)
    assert not out.exists()


# ---------------------------------------------------------------- issue 16: errors the user can cause


def _convert_main(argv, monkeypatch, capsys):
    """(exit code, stderr) of the hooked `mlx_lm.convert` command line, in process."""
    import importlib

    monkeypatch.setattr(sys, "argv", ["mlx_lm.convert", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        importlib.import_module("mlx_lm.convert").main()  # the package binds `mlx_lm.convert` to the function
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def nothing_long(monkeypatch):
    """Fail the test if any long step (dequantizing the source, measuring) starts."""
    from mlx_lm_optiq.core import model_tree
    from mlx_lm_optiq.weights import sweep

    def never(*a, **k):
        raise AssertionError("started long work before the inputs were checked")

    monkeypatch.setattr(sweep, "measure_sensitivity", never)
    monkeypatch.setattr(model_tree, "write_float_source", never)


def test_command_line_errors_are_one_line_naming_the_input(
    tiny_q4_path, tmp_path, hooks_enabled, nothing_long, monkeypatch, capsys
):
    """Issue 16 item 8: every error a user can cause is `mlx_lm.convert: error: ...` naming the
    flag / file, exit status 1, no traceback, and before any long work; a bug keeps its traceback."""
    import importlib

    garbage = tmp_path / "garbage-model"
    garbage.mkdir()
    (garbage / "config.json").write_bytes(b"\x89\xff not json")
    binary = tmp_path / "calib.jsonl"
    binary.write_bytes(bytes(range(256)))
    out = ["--mlx-path", tmp_path / "out", "-q"]
    model = ["--hf-path", tiny_q4_path]
    for argv, message in (
        ([*model, "--optiq-target-bpw", "nan"], "--optiq-target-bpw: expected a positive number, got nan"),
        ([*model, "--optiq-target-bpw", "inf"], "--optiq-target-bpw: expected a positive number, got inf"),
        ([*model, "--optiq-target-bpw", "-3"], "--optiq-target-bpw: expected a positive number, got -3.0"),
        ([*model, "--optiq-target-bpw", "4.8", "--optiq-calibration", binary], f"{binary}: not a UTF-8 text file"),
        (["--hf-path", garbage, "--optiq-target-bpw", "4.8"], f"{garbage}/config.json: not a JSON text file"),
        (["--hf-path", "no such model", "--optiq-target-bpw", "4.8"], "no such local path, and not a valid Hugging"),
        (["--hf-path", tmp_path / "nope", "--optiq-target-bpw", "4.8"], f"{tmp_path}/nope: no such model directory"),
        (
            [*model, "--optiq-target-bpw", "4.8", "--optiq-sensitivity-method", "fisher", "--optiq-checkpoint", "c"],
            "--optiq-checkpoint: resumes an exact sweep; --optiq-sensitivity-method fisher",
        ),
    ):
        code, err = _convert_main([*argv, *out], monkeypatch, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and lines[-1].startswith("mlx_lm.convert: error: ") and message in lines[-1], (argv, err)
        assert "Traceback" not in err and not (tmp_path / "out").exists()
    # a bug (not an input error) is not dressed up as one
    from mlx_lm_optiq.weights import pipeline

    monkeypatch.setattr(pipeline, "plan_weights", lambda *a, **k: {}["a bug"])
    monkeypatch.setattr(sys, "argv", ["mlx_lm.convert", *map(str, [*model, "--optiq-target-bpw", "4.8", *out])])
    with pytest.raises(KeyError, match="a bug"):
        importlib.import_module("mlx_lm.convert").main()


def test_console_script_prints_the_error_without_traceback(tiny_q4_path, tmp_path):
    res = _convert_cli(
        ["--hf-path", str(tiny_q4_path), "-q", "--optiq-target-bpw", "inf", "--mlx-path", str(tmp_path / "o")],
        dict(os.environ, MLX_LM_OPTIQ="1"),
        command=CONVERT_SCRIPT,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert (
        res.stderr.strip().splitlines()[-1]
        == "mlx_lm.convert: error: --optiq-target-bpw: expected a positive number, got inf"
    )


def test_infeasible_targets_fail_before_measuring(tiny_q4_path, tmp_path, hooks_enabled, nothing_long):
    """Issue 16 item 9: the cheapest plan follows from the shapes; it used to take the whole sweep
    (and the dequantized copy of the source) to say that 4.5 is out of reach of 4:64/8:64."""
    from mlx_lm import convert

    from mlx_lm_optiq.core.allocate import InfeasibleBudget

    with pytest.raises(InfeasibleBudget, match=r"--optiq-target-bpw: 4.5 is infeasible.*already needs 4\.50"):
        convert(
            str(tiny_q4_path),
            mlx_path=str(tmp_path / "o"),
            quantize=True,
            optiq_target_bpw=4.5,
            optiq_candidates="4:64,8:64",
        )
    with pytest.raises(InfeasibleBudget, match=r"5.5 is infeasible.* with protections \['embeddings', 'first-block'"):
        convert(
            str(tiny_q4_path),
            mlx_path=str(tmp_path / "o"),
            quantize=True,
            optiq_target_bpw=5.5,
            optiq_protect="embeddings,first-block,last-block,lm-head",
        )
    assert not (tmp_path / "o").exists() and not _partials(tmp_path)


def test_a_table_missing_a_module_is_an_error_naming_it(measured, tiny_q4_path, tmp_path, hooks_enabled):
    """Issue 16 item 10: the module used to be left in float without a word (a 66 MB model for 25)."""
    from mlx_lm import convert

    from mlx_lm_optiq.weights.plan import PlanError

    meta = _sidecar(measured)
    del meta["sensitivity"]["modules"]["model.layers.2.mlp.down_proj"]
    del meta["sensitivity"]["clipping"]["moments"]["model.layers.2.mlp.down_proj"]
    bad = tmp_path / "table.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(PlanError, match=rf"{bad}: has no entry for 1 quantizable module\(s\) of this model "):
        convert(
            str(tiny_q4_path),
            mlx_path=str(tmp_path / "o"),
            quantize=True,
            optiq_target_bpw=5.0,
            optiq_sensitivity=str(bad),
        )
    assert not (tmp_path / "o").exists()


def test_quality_command_line_errors_are_one_line(tmp_path, capsys):
    """`python -m mlx_lm_optiq.quality` on a garbage model folder or a binary text: one line, exit 1."""
    from mlx_lm_optiq import quality

    garbage = tmp_path / "m"
    garbage.mkdir()
    (garbage / "config.json").write_text("[1, 2]")
    text = tmp_path / "t.txt"
    text.write_text("Some held-out text.")
    with pytest.raises(SystemExit) as e:
        quality.main(["--model", str(garbage), "--reference", str(garbage), "--text", str(text)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert (
        err.strip()
        == f"{quality.PROG}: error: {garbage}/config.json: expected a JSON object at the top level, got list"
    )
