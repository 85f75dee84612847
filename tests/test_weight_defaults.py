"""Issue 13 item 4: `--optiq-target-bpw T` alone measures with the backend's defaults (16
candidates everywhere; fisher on 16x256 tokens on a CPU, exact on 16x512 on a GPU), a value the
user gives wins, re-planning keeps the table's candidates, and one line says what was chosen."""

import json

import pytest

from mlx_lm_optiq.core import backend
from mlx_lm_optiq.core.config import ConfigError, field_help
from mlx_lm_optiq.core.formats import candidate_key, parse_candidates
from mlx_lm_optiq.weights import pipeline
from mlx_lm_optiq.weights.config import (
    CPU_DEFAULTS,
    DEFAULT_CANDIDATES,
    DISTILL_DEFAULT_MAX_S,
    EXACT_DEFAULT_MAX_S,
    GPU_DEFAULTS,
    GPU_DISTILL_STEPS,
    LOW_BIT_BELOW_BPW,
    WeightsConfig,
    measurement_defaults,
)

SIXTEEN = parse_candidates(DEFAULT_CANDIDATES)


def _flag(field):
    return "--optiq-" + field.replace("_", "-")


@pytest.mark.parametrize(
    ("name", "method", "length"), [("cpu", "fisher", 256), ("cuda", "exact", 512), ("metal", "exact", 512)]
)
def test_defaults_per_backend(monkeypatch, name, method, length):
    monkeypatch.setattr(backend, "compute_backend", lambda: name)
    c = WeightsConfig(target_bpw=4.5)
    assert c.backend == name
    assert c.candidates == SIXTEEN and len(SIXTEEN) == 16
    assert (c.sensitivity_method, c.num_samples, c.sequence_length) == (method, 16, length)
    assert c.defaulted == ("candidates", "sensitivity_method", "num_samples", "sequence_length")
    assert c.sweep_settings().method == method
    assert c.calibration_sizes() == {"num_samples": 16, "sequence_length": length}
    assert measurement_defaults(name) == (CPU_DEFAULTS if name == "cpu" else GPU_DEFAULTS)


def test_user_values_win_and_replans_take_no_defaults(monkeypatch):
    monkeypatch.setattr(backend, "compute_backend", lambda: "cpu")
    c = WeightsConfig(target_bpw=4.5, sensitivity_method="exact", num_samples=2, candidates="4:64,8:64")
    assert (c.sensitivity_method, c.num_samples, c.sequence_length) == ("exact", 2, 256)
    assert [candidate_key(**x) for x in c.candidates] == ["4:64", "8:64"]
    assert c.defaulted == ("sequence_length",)
    # bits or a group size given: their own defaults, not the 16 candidates
    assert [candidate_key(**x) for x in WeightsConfig(target_bpw=5, candidate_bits="4").candidates] == ["4:64"]
    assert "candidates" not in WeightsConfig(target_bpw=5, q_group_size=128).defaulted
    # fisher cannot resume or run on the low-bit reference: a defaulted method yields to exact
    c = WeightsConfig(target_bpw=4.5, checkpoint="sweep.json")
    assert c.sensitivity_method == "exact" and c.sweep_settings().checkpoint_path == "sweep.json"
    assert WeightsConfig(target_bpw=4.5, reference="low-bit", writer="rtn").sensitivity_method == "exact"
    # re-planning measures nothing: no measuring backend, nothing defaulted, the table's candidates
    # (the backend is asked only for the distillation default: off on a CPU)
    c = WeightsConfig(target_bpw=4.5, sensitivity="t.json")
    assert (c.backend, c.defaulted, c.candidates, c.sensitivity_method) == (None, (), None, None)
    assert c.distill_steps is None


def test_help_texts_state_the_per_backend_defaults():
    helps = field_help(WeightsConfig)
    assert "default fisher on a CPU, exact on a GPU" in helps["sensitivity_method"]
    assert "default 256 on a CPU, 512 on a GPU" in helps["sequence_length"]
    assert "default 16)" in helps["num_samples"]
    assert DEFAULT_CANDIDATES in helps["candidates"]


def test_the_line_on_a_gpu_and_on_a_cpu(monkeypatch):
    monkeypatch.setattr(backend, "compute_backend", lambda: "cuda")
    gpu = pipeline.measurement_line(WeightsConfig(target_bpw=4.5), SIXTEEN, 134_515_008, _flag)
    assert gpu.startswith("weights sensitivity on cuda: method exact, 16 candidates (")
    assert "calibration 16x512 tokens of the bundled set, writer gptq: ~56 s (rough: " in gpu
    assert gpu.endswith(
        "cuda defaults for --optiq-candidates, --optiq-sensitivity-method, --optiq-num-samples, --optiq-sequence-length"
    )
    monkeypatch.setattr(backend, "compute_backend", lambda: "cpu")
    cpu = pipeline.measurement_line(WeightsConfig(target_bpw=4.5, num_samples=8), SIXTEEN, 134_515_008, _flag)
    assert "on cpu: method fisher, 16 candidates" in cpu and "8x256 tokens" in cpu
    assert "cpu defaults for --optiq-candidates, --optiq-sensitivity-method, --optiq-sequence-length (GPU" in cpu
    assert "(GPU defaults: --optiq-sensitivity-method exact --optiq-sequence-length 512, ~" in cpu
    assert "--optiq-num-samples" not in cpu  # given: not a default, not an alternative
    mine = pipeline.measurement_line(
        WeightsConfig(target_bpw=4.5, sensitivity_method="exact", num_samples=1, sequence_length=8),
        SIXTEEN,
        1000,
        _flag,
    )
    assert "cpu defaults for --optiq-candidates;" not in mine and mine.endswith("cpu defaults for --optiq-candidates")
    line = pipeline.measurement_line(WeightsConfig(target_bpw=4.5, checkpoint="c.json"), SIXTEEN, 1000, _flag)
    assert "method exact: a --optiq-checkpoint resumes only an exact sweep" in line


def test_a_default_convert_says_what_it_chose_and_measures_it(tiny_float_path, tmp_path, hooks_enabled, capsys):
    """A real convert of the 4-layer model with only a target (and a small calibration, given):
    the line comes before the sweep, and the sidecar records the defaulted method and candidates.
    The source is the session's fp32 copy (CPU quantizes fp32 fastest: the 16 candidates' errors are
    most of the time); a quantized source's own reference is test_convert's."""
    from mlx_lm import convert

    out = tmp_path / "mixed"
    convert(
        str(tiny_float_path),
        mlx_path=str(out),
        quantize=True,
        optiq_target_bpw=3.4,  # below LOW_BIT_BELOW_BPW: the 2-bit pair joins the 16
        optiq_num_samples=1,
        optiq_sequence_length=32,
        optiq_clipping="none",  # fast; the defaults under test are candidates and method
        optiq_writer="rtn",
    )
    err = capsys.readouterr().err
    expected = "on cpu: method fisher" if backend.compute_backend() == "cpu" else "method exact"
    line = next(x for x in err.splitlines() if "weights sensitivity on" in x)
    assert line.startswith("[INFO] optiq: weights sensitivity on") and expected in line
    assert "defaults for --optiq-candidates, --optiq-sensitivity-method (" in line or line.endswith(
        "--optiq-sensitivity-method"
    )
    assert "(with 2:32,2:64: the target is below 3.7 BPW)" in line
    assert err.index("weights sensitivity on") < err.index("Sensitivity (")
    meta = json.loads((out / "optiq_metadata.json").read_text())
    assert meta["method"] == ("fisher" if backend.compute_backend() == "cpu" else "exact")
    assert {candidate_key(**c) for c in meta["candidates"]} == set(DEFAULT_CANDIDATES.split(",")) | {"2:32", "2:64"}
    # 3.4 BPW is below the 16 candidates' cheapest plan: the plan needs (and uses) 2-bit layers
    assert meta["achieved_bpw"] <= 3.4 and any(e["bits"] == 2 for e in meta["layers"].values())
    config = json.loads((out / "config.json").read_text())
    assert any(v.get("bits") == 2 for v in config["quantization"].values() if isinstance(v, dict))


def test_low_targets_add_the_2_bit_candidates(monkeypatch):
    """Below LOW_BIT_BELOW_BPW the defaulted set gains 2:32,2:64 (docs/weights.md, quality vs BPW:
    0.69x KL at 3.51 BPW); from there up, and whenever the user names candidates, it does not."""
    monkeypatch.setattr(backend, "compute_backend", lambda: "cpu")
    keys = lambda c: [candidate_key(**x) for x in c.candidates]  # noqa: E731
    low = WeightsConfig(target_bpw=3.5)
    assert keys(low) == [candidate_key(**x) for x in parse_candidates(DEFAULT_CANDIDATES + ",2:32,2:64")]
    assert "candidates" in low.defaulted
    assert keys(WeightsConfig(target_bpw=LOW_BIT_BELOW_BPW)) == [candidate_key(**x) for x in SIXTEEN]
    assert keys(WeightsConfig(target_bpw=3.0, candidates="3:64,4:64")) == ["3:64", "4:64"]
    assert keys(WeightsConfig(target_bpw=3.0, candidate_bits="3,4")) == ["3:64", "4:64"]
    line = pipeline.measurement_line(low, low.candidates, 134_515_008, _flag)
    assert "18 candidates" in line and "(with 2:32,2:64: the target is below 3.7 BPW)" in line
    assert "(with 2:" not in pipeline.measurement_line(WeightsConfig(target_bpw=4.5), SIXTEEN, 134_515_008, _flag)


def test_a_defaulted_fisher_yields_to_exact_when_the_float_model_does_not_fit(monkeypatch):
    """fisher needs the float model's gradients; `reference` auto picks the low-bit one when the
    float model does not fit, so a defaulted method measures exact there (a given one is kept and
    the sweep refuses it, naming both)."""
    from mlx_lm_optiq.weights import sweep

    monkeypatch.setattr(backend, "compute_backend", lambda: "cpu")
    monkeypatch.setattr(sweep, "_memory_budget", lambda: 1000)
    c = WeightsConfig(target_bpw=4.5)
    pipeline.fit_method_to_model(c, 10_000, SIXTEEN)
    assert c.sensitivity_method == "exact" and "does not fit" in pipeline.measurement_line(c, SIXTEEN, 10_000)
    given = WeightsConfig(target_bpw=4.5, sensitivity_method="fisher")
    pipeline.fit_method_to_model(given, 10_000, SIXTEEN)
    assert given.sensitivity_method == "fisher"
    fits = WeightsConfig(target_bpw=4.5)
    pipeline.fit_method_to_model(fits, 10, SIXTEEN)
    assert fits.sensitivity_method == "fisher" and fits.method_note is None


def test_a_defaulted_exact_yields_to_fisher_where_it_would_take_too_long(monkeypatch):
    """On a GPU the default is the exact sweep while its rough time stays within
    EXACT_DEFAULT_MAX_S (the bundled model: seconds); an 8B model measures with fisher and the line
    says why and how to ask for exact. A given method, a checkpoint, the low-bit reference or a
    float model that does not fit keep exact."""
    from mlx_lm_optiq.weights import sweep

    monkeypatch.setattr(backend, "compute_backend", lambda: "cuda")
    monkeypatch.setattr(sweep, "_memory_budget", lambda: 140 * 2**30)
    small, big = 134_515_008, 8_030_261_248
    assert pipeline.typical_seconds("cuda", "exact", small, 16 * 512, SIXTEEN) < EXACT_DEFAULT_MAX_S
    c = WeightsConfig(target_bpw=4.5)
    pipeline.fit_method_to_model(c, small, SIXTEEN)
    assert c.sensitivity_method == "exact" and c.method_note is None
    c = WeightsConfig(target_bpw=4.5)
    pipeline.fit_method_to_model(c, big, SIXTEEN)
    assert c.sensitivity_method == "fisher" and c.sweep_settings().method == "fisher"
    line = pipeline.measurement_line(c, SIXTEEN, big, _flag)
    assert "on cuda: method fisher" in line and "method fisher: the exact sweep would take ~" in line
    assert "give --optiq-sensitivity-method exact to run it" in line
    kept = [
        WeightsConfig(target_bpw=4.5, sensitivity_method="exact"),
        WeightsConfig(target_bpw=4.5, checkpoint="sweep.json"),
        WeightsConfig(target_bpw=4.5, reference="low-bit", writer="rtn"),
    ]
    for c in kept:
        pipeline.fit_method_to_model(c, big, SIXTEEN)
        assert c.sensitivity_method == "exact"
    monkeypatch.setattr(sweep, "_memory_budget", lambda: 2**30)  # auto will measure with the low-bit reference
    c = WeightsConfig(target_bpw=4.5)
    pipeline.fit_method_to_model(c, big, SIXTEEN)
    assert c.sensitivity_method == "exact"


@pytest.mark.parametrize(("name", "method", "length"), [("cpu", "fisher", 256), ("cuda", "exact", 512)])
def test_the_table_command_takes_the_same_defaults(monkeypatch, tiny_q4_path, tmp_path, capsys, name, method, length):
    """`python -m mlx_lm_optiq.weights` without flags measures what the convert would (same table of
    per-backend defaults); a checkpoint makes a defaulted method exact (fisher cannot resume)."""
    from mlx_lm_optiq.weights import cli

    monkeypatch.setattr(backend, "compute_backend", lambda: name)
    seen = []

    def fake_measure(model_path, tokens, candidates, settings, **kw):
        seen.append((candidates, settings.method, tokens.shape))
        raise SystemExit(7)

    monkeypatch.setattr(cli, "measure_sensitivity", fake_measure)
    for extra, want in (([], method), (["--checkpoint", str(tmp_path / "c.json")], "exact")):
        with pytest.raises(SystemExit):
            cli.main(["--model", str(tiny_q4_path), "--output", str(tmp_path / "t.json"), *extra])
        candidates, got, shape = seen.pop()
        assert candidates == SIXTEEN and got == want and tuple(shape) == (16, length)
    # the method is fitted to the model's size as the convert's is: exact too long here -> fisher
    monkeypatch.setattr(pipeline, "EXACT_DEFAULT_MAX_S", 0.0)
    for extra, want in (([], "fisher"), (["--method", "exact"], "exact")):
        with pytest.raises(SystemExit):
            cli.main(["--model", str(tiny_q4_path), "--output", str(tmp_path / "t.json"), *extra])
        assert seen.pop()[1] == want
    line = "method fisher: the exact sweep would take ~"
    assert (line in capsys.readouterr().out) == (name == "cuda")


def test_the_table_command_keeps_a_zero_the_user_gave(tiny_q4_path, tmp_path, capsys):
    """A value given is the user's even when it is falsy: `--num-samples 0` is an error naming
    the field, not silently the default."""
    from mlx_lm_optiq.weights import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(tiny_q4_path), "--output", str(tmp_path / "t.json"), "--num-samples", "0"])
    assert e.value.code == 1 and "num_samples must be >= 1, got 0" in capsys.readouterr().err


def test_distillation_is_a_gpu_default_fitted_to_the_model(monkeypatch):
    """Distillation after writing is on by default on a GPU (GPU_DISTILL_STEPS: seconds for the
    bundled model on an H200, the best held-out KL measured there) and off on a CPU (minutes a
    step); a defaulted one is dropped, with the line saying why and how to ask, where it would
    take over DISTILL_DEFAULT_MAX_S (an 8B model), where the float teacher does not fit, or where
    a re-planned table does not record its calibration text. Asked for, it stays; 0 turns it off."""
    from mlx_lm_optiq.weights import sweep

    monkeypatch.setattr(sweep, "_memory_budget", lambda: 140 * 2**30)
    small, big = 134_515_008, 8_030_261_248
    monkeypatch.setattr(backend, "compute_backend", lambda: "cpu")
    c = WeightsConfig(target_bpw=3.5)
    assert (c.distill_steps, c.distill_defaulted) == (None, False)
    assert pipeline.distill_line(c, small, 256) is None
    monkeypatch.setattr(backend, "compute_backend", lambda: "cuda")
    assert pipeline.distill_seconds("cuda", small, GPU_DISTILL_STEPS, 512) < DISTILL_DEFAULT_MAX_S
    assert pipeline.distill_seconds("cuda", big, GPU_DISTILL_STEPS, 512) > DISTILL_DEFAULT_MAX_S
    c = WeightsConfig(target_bpw=3.5)
    assert (c.distill_steps, c.distill_defaulted) == (GPU_DISTILL_STEPS, True)
    pipeline.fit_distill_to_model(c, small, 512)
    assert c.distill_steps == GPU_DISTILL_STEPS
    line = pipeline.distill_line(c, small, 512, _flag)
    assert line.startswith(f"distillation: {GPU_DISTILL_STEPS} steps after writing, ~")
    assert line.endswith("(the cuda default; --optiq-distill-steps 0 turns it off)")
    c = WeightsConfig(target_bpw=3.5)
    pipeline.fit_distill_to_model(c, big, 512)
    assert c.distill_steps is None
    line = pipeline.distill_line(c, big, 512, _flag)
    assert line.startswith(f"distillation off: {GPU_DISTILL_STEPS} steps would take ~")
    assert f"give --optiq-distill-steps {GPU_DISTILL_STEPS} to run them" in line
    asked = WeightsConfig(target_bpw=3.5, distill_steps=GPU_DISTILL_STEPS)
    pipeline.fit_distill_to_model(asked, big, 512)
    assert asked.distill_steps == GPU_DISTILL_STEPS and pipeline.distill_line(asked, big, 512).endswith("(asked)")
    assert WeightsConfig(target_bpw=3.5, distill_steps=0).distill_steps is None
    assert WeightsConfig(target_bpw=3.5, reference="low-bit", writer="rtn").distill_steps is None
    with pytest.raises(ConfigError, match="distill_steps: expected a whole number >= 0"):
        WeightsConfig(target_bpw=3.5, distill_steps=-1)
    replan = WeightsConfig(target_bpw=3.5, sensitivity="t.json")
    assert replan.distill_steps == GPU_DISTILL_STEPS
    assert pipeline.distill_calibration(replan, {}, "t.json") == (None, 0)
    assert replan.distill_steps is None
    assert "t.json does not record the calibration text" in pipeline.distill_line(replan, small, 0)
    monkeypatch.setattr(sweep, "_memory_budget", lambda: 2**30)
    c = WeightsConfig(target_bpw=3.5)
    pipeline.fit_distill_to_model(c, big, 512)
    assert c.distill_steps is None and "does not fit in memory" in c.distill_note


def test_a_quantized_source_that_does_not_fit_measures_with_fisher_held_quantized(monkeypatch):
    """Issue 13 item 5: a quantized source whose dequantization does not fit keeps fisher (CPU) or
    gets it instead of exact (GPU: exact would need the low-bit reference, hours at 70B), with the
    float reference held quantized; the line says so and that the writer is rtn; a table that was
    held quantized is written with rtn, and gptq asked for is an error naming the writer. A
    checkpoint or the low-bit reference keep exact; a float source keeps the earlier rules."""
    from mlx_lm_optiq.weights import sweep

    monkeypatch.setattr(sweep, "_memory_budget", lambda: 2**30)
    big = 70_553_706_496  # the 70B llama shape
    for name, note in (("cpu", None), ("cuda", "fisher: the dequantized model does not fit in memory")):
        monkeypatch.setattr(backend, "compute_backend", lambda name=name: name)
        c = WeightsConfig(target_bpw=4.5)
        pipeline.fit_method_to_model(c, big, SIXTEEN, quantized=True)
        assert c.sensitivity_method == "fisher"
        assert (c.method_note or None) == note or c.method_note.startswith(note)
        assert pipeline.holds_quantized(c, big, True) and not pipeline.holds_quantized(c, big, False)
        line = pipeline.measurement_line(c, SIXTEEN, big, _flag, held_chunks=7)
        assert "writer rtn" in line and "float reference held quantized" in line
        assert "~7 chunks of modules, one backward per sample and chunk (~112 backward passes" in line
        assert "rtn because gptq loads the whole float model" in line
        float_source = WeightsConfig(target_bpw=4.5)
        pipeline.fit_method_to_model(float_source, big, SIXTEEN)
        assert float_source.sensitivity_method == "exact"  # the low-bit reference, as before
    kept = [
        WeightsConfig(target_bpw=4.5, checkpoint="sweep.json"),
        WeightsConfig(target_bpw=4.5, reference="low-bit", writer="rtn"),
    ]
    for c in kept:
        pipeline.fit_method_to_model(c, big, SIXTEEN, quantized=True)
        assert c.sensitivity_method == "exact" and not pipeline.holds_quantized(c, big, True)
    monkeypatch.setattr(sweep, "_memory_budget", lambda: 2**50)  # fits: resident, as before
    assert not pipeline.holds_quantized(WeightsConfig(target_bpw=4.5), big, True)
    held = {"reference": "float", "held_quantized": {"chunks": 7, "chunk_bytes": 2**36, "backward_passes": 112}}
    assert pipeline.resolve_writer(WeightsConfig(target_bpw=4.5), held) == "rtn"
    assert "does not fit in memory" in pipeline.writer_reason(WeightsConfig(target_bpw=4.5), held)
    assert pipeline.resolve_writer(WeightsConfig(target_bpw=4.5), {"reference": "float"}) == "gptq"
    with pytest.raises(ConfigError, match="writer: gptq loads the whole float model"):
        pipeline.resolve_writer(WeightsConfig(target_bpw=4.5, writer="gptq"), held)
