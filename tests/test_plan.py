"""Planning: exact optimum, BPW counted exactly as mlx-lm counts it, protections, bad tables."""

import itertools
import json
import math

import numpy as np
import pytest

from mlx_lm_optiq.core.allocate import InfeasibleBudget
from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.formats import (
    candidate_key,
    make_candidates,
    parse_candidates,
    quantized_bits,
    top_level_quantization,
)
from mlx_lm_optiq.core.jsonio import OptiqFileError
from mlx_lm_optiq.weights import metadata, plan
from mlx_lm_optiq.weights.config import DEFAULT_CANDIDATES, WeightsConfig


def _table(shapes, candidates, seed=0):
    """A table over real module shapes; KL values drawn so cheaper candidates lose more."""
    rng = np.random.default_rng(seed)
    mods = {}
    for path, shape in shapes.items():
        base = float(rng.uniform(1e-4, 1e-1))
        kl = {}
        for c in candidates:
            if shape[-1] % c["group_size"] == 0:
                kl[candidate_key(**c)] = base * 2.0 ** (-2 * c["bits"]) * (c["group_size"] / 64)
        mods[path] = {"num_params": math.prod(shape), "shape": list(shape), "kl": kl}
    return {
        "model": "test",
        "method": "exact",
        "reference": "float",
        "calibration": {"num_samples": 1, "sequence_length": 2, "tokens": 2, "sha256": "0"},
        "candidates": candidates,
        "modules": mods,
    }


@pytest.fixture(scope="module")
def tiny_float_model(tiny_q4_path):
    """The 4-layer SmolLM2 dequantized in memory (as convert's float source would be)."""
    from mlx_lm.utils import dequantize_model, load_model

    model, config = load_model(tiny_q4_path, lazy=True)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return dequantize_model(model), config


def _shapes(model):
    from mlx_lm_optiq.core.model_tree import quantizable_modules

    return {p: list(m.weight.shape) for p, m in quantizable_modules(model).items()}


def test_plan_is_the_exact_optimum_under_the_budget():
    cands = make_candidates([2, 4, 8], [64])
    shapes = {f"model.layers.{i}.mlp.up_proj": [64 * (i + 1), 128] for i in range(6)}
    table = _table(shapes, cands, seed=3)
    float_bits = {p: math.prod(s) * 16 for p, s in shapes.items()}
    total = sum(math.prod(s) for s in shapes.values()) + 1000
    fixed = 1000 * 16
    for target in (3.0, 4.2, 5.5, 7.0):
        result = plan.solve_plan(table, cands, target, total, fixed, float_bits, 16)
        best = None
        for combo in itertools.product(range(3), repeat=len(shapes)):
            bits = fixed + sum(
                quantized_bits(math.prod(s), cands[j]["bits"], 64) for s, j in zip(shapes.values(), combo)
            )
            if bits > target * total:
                continue
            val = sum(table["modules"][p]["kl"][candidate_key(**cands[j])] for p, j in zip(shapes, combo))
            best = val if best is None else min(best, val)
        got = sum(table["modules"][p]["kl"][candidate_key(**c)] for p, c in result["layers"].items())
        assert got == pytest.approx(best, rel=1e-12)
        assert result["predicted_bits"] <= target * total


def test_predicted_bits_equal_mlx_lm_count_after_quantizing(tiny_float_model, tiny_q4_path):
    """The plan's bit count is what compute_bits_per_weight reports on the quantized model."""
    import copy

    from mlx_lm.utils import compute_bits_per_weight, dequantize_model, get_total_parameters, load_model, quantize_model

    model, config = tiny_float_model
    cands = make_candidates([3, 4, 8], [32, 64])
    table = _table(_shapes(model), cands)
    for dtype_arg, target in ((None, 4.7), ("float32", 5.3)):
        result = plan.plan_for_model(model, config, table, cands, target, dtype=dtype_arg, protect=["first-block"])
        # a fresh copy, cast like stock convert does, quantized by stock quantize_model
        fresh = dequantize_model(load_model(tiny_q4_path, lazy=True)[0])
        if dtype_arg:
            import mlx.core as mx

            fresh.set_dtype(getattr(mx, dtype_arg))
        qmodel, qcfg = quantize_model(
            fresh, copy.deepcopy(config), 32, 3, quant_predicate=plan.quant_predicate(result["layers"])
        )
        plan.check_quantized(qmodel, result["layers"])
        bits = compute_bits_per_weight(qmodel) * get_total_parameters(qmodel)
        assert round(bits) == result["predicted_bits"]
        assert compute_bits_per_weight(qmodel) <= target
        assert result["predicted_bits"] > 0.99 * result["capacity_bits"], "budget left unused"
        for path, choice in result["layers"].items():
            assert qcfg["quantization"][path] == choice
        assert result["layers"]["model.layers.0.mlp.up_proj"]["bits"] == 8  # protected: its most precise candidate


def test_infeasible_target_names_the_minimum(tiny_float_model):
    model, config = tiny_float_model
    cands = make_candidates([4, 8], [64])
    table = _table(_shapes(model), cands)
    with pytest.raises(InfeasibleBudget, match=r"target_bpw: 4.0 is infeasible.*4\.50\d* bits per weight"):
        plan.plan_for_model(model, config, table, cands, 4.0)
    # protections raise the floor and are named in the message
    with pytest.raises(InfeasibleBudget, match="protections"):
        plan.plan_for_model(model, config, table, cands, 6.0, protect=["embeddings"])


def test_what_needs_no_measurement_is_checked_from_shapes_alone(tiny_float_model):
    """Issue 16 item 9: before any sweep, the cheapest plan follows from the module shapes (protected
    modules at their most precise candidate): exactly the minimum the measured plan then has, so an
    infeasible target or protection set fails in seconds, not after the measurement."""
    from mlx_lm.models import llama

    model, config = tiny_float_model
    cands = make_candidates([4, 8], [64])
    table = _table(_shapes(model), cands)
    for protect in ([], ["embeddings"], ["first-block", "last-block"]):
        measured = plan.plan_for_model(model, config, table, cands, 15.0, protect=protect)["min_bpw"]
        assert plan.check_feasible(model, config, cands, 15.0, protect=protect) == pytest.approx(measured, rel=1e-12)
    with pytest.raises(InfeasibleBudget, match=r"target_bpw: 4.5 is infeasible.*needs 4\.50\d* bits per weight"):
        plan.check_feasible(model, config, cands, 4.5)
    with pytest.raises(InfeasibleBudget, match=r"5.5 is infeasible.*with protections \['embeddings', 'first-block'"):
        plan.check_feasible(model, config, cands, 5.5, protect=["embeddings", "first-block", "last-block"])
    # protections that leave nothing to choose (a one-block model: first block + embeddings is all)
    one_block = llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=1,
            intermediate_size=128,
            num_attention_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=128,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    with pytest.raises(ConfigError, match="protect: embeddings,first-block protect every quantizable module"):
        plan.check_feasible(one_block, {"tie_word_embeddings": True}, cands, 8.0, protect=["embeddings", "first-block"])
    with pytest.raises(ConfigError, match="protect: lm-head: no quantizable module matches it"):
        plan.check_feasible(model, {}, cands, 8.0, protect=["lm-head"])  # untied: no lm_head module


def test_a_table_must_cover_every_quantizable_module(tiny_float_model):
    """Issue 16 item 10: a module missing from the table was left in float without a word."""
    model, _ = tiny_float_model
    table = _table(_shapes(model), make_candidates([4, 8], [64]))
    plan.check_table_matches(table, model, "t.json")
    del table["modules"]["model.layers.1.mlp.up_proj"], table["modules"]["model.embed_tokens"]
    with pytest.raises(
        plan.PlanError,
        match=r"t.json: has no entry for 2 quantizable module\(s\) of this model "
        r"\(model.embed_tokens, model.layers.1.mlp.up_proj\)",
    ):
        plan.check_table_matches(table, model, "t.json")


def test_protections_match_modules_and_reject_unknown(tiny_float_model):
    model, _ = tiny_float_model
    paths = list(_shapes(model))
    got = plan.protected_modules(paths, ["first-block", "last-block"])
    assert sorted({p.split(".")[2] for p in got}) == ["0", "3"] and len(got) == 14
    # SmolLM2 ties lm_head to the embedding: lm-head protects the embedding
    assert plan.protected_modules(paths, ["lm-head"], tied_embeddings=True) == {"model.embed_tokens": "lm-head"}
    with pytest.raises(ConfigError, match="protect: lm-head: no quantizable module"):
        plan.protected_modules(paths, ["lm-head"], tied_embeddings=False)
    with pytest.raises(ConfigError, match="protect: unknown protection"):
        plan.protected_modules(paths, ["attention"])


def test_missing_candidate_in_table_is_named(tiny_float_model):
    model, config = tiny_float_model
    table = _table(_shapes(model), make_candidates([4, 8], [64]))
    with pytest.raises(
        plan.PlanError, match=r"module 'model\.embed_tokens' has no measurement for candidate\(s\) \['4:32'"
    ):
        plan.plan_for_model(model, config, table, make_candidates([4, 8], [32, 64]), 5.0, source="t.json")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"format_version": 1, "kind": "optiq-kv-config"}), "field 'kind' is 'optiq-kv-config'"),
        (
            json.dumps(
                {"format_version": 1, "kind": "optiq-metadata", "layers": {}, "target_bpw": 4, "achieved_bpw": 4}
            ),
            "missing required field 'sensitivity'",
        ),
    ],
)
def test_corrupt_sensitivity_files_are_clear_errors(tmp_path, bad, message):
    f = tmp_path / "s.json"
    f.write_text(bad)
    with pytest.raises(OptiqFileError, match=message) as e:
        metadata.load_sensitivity(f)
    assert str(f) in str(e.value)


def test_non_finite_kl_in_sidecar_names_the_field(tmp_path):
    table = _table({"model.layers.0.mlp.up_proj": [8, 64]}, make_candidates([4], [64]))
    table["modules"]["model.layers.0.mlp.up_proj"]["kl"]["4:64"] = "NaN"
    f = tmp_path / "optiq_metadata.json"
    f.write_text(
        json.dumps(
            {
                "format_version": 1,
                "kind": "optiq-metadata",
                "layers": {},
                "target_bpw": 4,
                "achieved_bpw": 4,
                "sensitivity": table,
            }
        )
    )
    with pytest.raises(OptiqFileError, match=r"modules\.model\.layers\.0\.mlp\.up_proj\.kl\.4:64' must be a finite"):
        metadata.load_sensitivity(f)


def test_config_parses_candidates_once_and_names_fields():
    assert WeightsConfig(target_bpw=5, candidate_bits="4, 8", group_sizes=[32, 64]).candidates == make_candidates(
        [4, 8], [32, 64]
    )
    # defaults (tests/test_weight_defaults.py has them per backend): the 16 candidates; a stock
    # group size alone: the default bits at it; bits alone: at the stock group size (or 64)
    assert WeightsConfig(target_bpw=5).candidates == parse_candidates(DEFAULT_CANDIDATES)
    assert len(parse_candidates(DEFAULT_CANDIDATES)) == 16
    assert [candidate_key(**c) for c in WeightsConfig(target_bpw=5, q_group_size=32).candidates] == [
        "3:32",
        "4:32",
        "5:32",
        "6:32",
        "8:32",
    ]
    assert [candidate_key(**c) for c in WeightsConfig(target_bpw=5, candidate_bits="4,8").candidates] == [
        "4:64",
        "8:64",
    ]
    with pytest.raises(ConfigError, match="group_sizes: expected comma-separated integers"):
        WeightsConfig(target_bpw=5, group_sizes="64,abc")
    with pytest.raises(ConfigError, match="candidate_bits/group_sizes: candidate bits must be among"):
        WeightsConfig(target_bpw=5, candidate_bits=[7])
    with pytest.raises(ConfigError, match="protect: unknown protection"):
        WeightsConfig(target_bpw=5, protect="embeddings,attention")
    with pytest.raises(ConfigError, match="candidate_bits/num_samples: need `target_bpw`"):
        WeightsConfig(candidate_bits="4,8", num_samples=4)
    with pytest.raises(ConfigError, match="num_samples: configure measuring, which `sensitivity` skips"):
        WeightsConfig(target_bpw=5, sensitivity="t.json", num_samples=4)
    with pytest.raises(ConfigError, match="sensitivity_method: expected one of exact, fisher"):
        WeightsConfig(target_bpw=5, sensitivity_method="fast")
    for bad in (float("nan"), float("inf"), -3, "abc"):
        with pytest.raises(ConfigError, match="target_bpw: expected a positive number"):
            WeightsConfig(target_bpw=bad)
    # issue 16 item 11: fisher is one quick pass; a resume file would be silently ignored
    with pytest.raises(ConfigError, match="checkpoint: resumes an exact sweep; `sensitivity_method` fisher"):
        WeightsConfig(target_bpw=5, sensitivity_method="fisher", checkpoint="sweep.json")
    assert WeightsConfig(target_bpw=5, checkpoint="sweep.json").sweep_settings().checkpoint_path == "sweep.json"
    from mlx_lm_optiq.weights.probes import SensitivityError
    from mlx_lm_optiq.weights.sweep import SweepSettings

    with pytest.raises(SensitivityError, match="a checkpoint resumes an exact sweep; method 'fisher'"):
        SweepSettings(method="fisher", checkpoint_path="sweep.json")
    assert WeightsConfig(text_only=True).candidates is None  # nothing to plan
    # re-planning from a table without candidate flags: the table's candidates (the pipeline reads them)
    assert WeightsConfig(target_bpw=4, sensitivity="t.json").candidates is None
    assert WeightsConfig(target_bpw=4, sensitivity="t.json", q_group_size=32).candidates is None
    # given ones still restrict the choice
    assert [
        candidate_key(**c) for c in WeightsConfig(target_bpw=5, sensitivity="t.json", candidate_bits="4").candidates
    ] == ["4:64"]


def test_explicit_candidates_and_the_top_level_entry():
    cands = parse_candidates("8:64, nvfp4:16,4:64,4:64")
    # cheapest first (4:64 and nvfp4:16 both cost 4.5 bits: given order), deduplicated
    assert [candidate_key(**c) for c in cands] == ["nvfp4:16", "4:64", "8:64"]
    assert cands[0] == {"bits": 4, "group_size": 16, "mode": "nvfp4"}
    assert WeightsConfig(target_bpw=5, candidates="8:64, nvfp4:16,4:64,4:64").candidates == cands
    # the smallest group (stock quantize_model skips modules it does not divide), cheapest format at it
    assert top_level_quantization(cands) == (16, 4, "nvfp4")
    assert top_level_quantization(parse_candidates("3:64,4:32,8:32")) == (32, 4, "affine")
    assert top_level_quantization(parse_candidates("mxfp4:32,4:32,4:64")) == (32, 4, "mxfp4")
    with pytest.raises(ConfigError, match="candidates: mxfp8 has group size 32, got 64"):
        WeightsConfig(target_bpw=5, candidates="mxfp8:64")
    with pytest.raises(ConfigError, match="q_mode: .*other formats go in `candidates`"):
        WeightsConfig(target_bpw=5, candidate_bits=[4], group_sizes=[64], q_mode="nvfp4")
