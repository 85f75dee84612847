"""Distilling the written model's scales and biases (weights/distill.py, `--optiq-distill-steps`).

Why: the distillation rewrites tensors of a finished model; these check that its CPU path computes
what the stock quantized modules compute (outputs and the scale/bias gradients DWQ trains on),
that a real convert records it in the sidecar, and that what is written is what was measured.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.weights import distill
from mlx_lm_optiq.weights.config import WeightsConfig


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_simulated_modules_compute_and_differentiate_as_the_stock_ones(bits):
    mx.random.seed(bits)
    q = nn.QuantizedLinear.from_linear(nn.Linear(128, 48), group_size=64, bits=bits)
    e = nn.QuantizedEmbedding.from_embedding(nn.Embedding(50, 128), group_size=32, bits=bits)
    cls = distill._simulated_class()
    sq, se = cls(q), cls(e)
    assert (sq.bits, sq.group_size, sq.mode) == (bits, 64, "affine")
    x, ids = mx.random.normal((3, 128)), mx.array([0, 7, 49])
    assert mx.allclose(sq(x), q(x), atol=1e-4, rtol=1e-4)
    assert mx.array_equal(se(ids), e(ids))
    assert mx.allclose(se.as_linear(x), e.as_linear(x), atol=1e-4, rtol=1e-4)

    def grads(module):
        def f(params):
            module.update(params)
            return (module(x) ** 2).sum()

        g = mx.grad(f)({"scales": module["scales"], "biases": module["biases"]})
        return g["scales"], g["biases"]

    for ours, stock in zip(grads(sq), grads(q)):
        assert mx.allclose(ours, stock, atol=1e-3, rtol=1e-3)
    assert distill.trained_modules(nn.Sequential(sq)) == ([] if bits == 8 else ["layers.0"])


def test_distill_steps_is_checked_with_the_other_settings():
    assert WeightsConfig(target_bpw=4.5, distill_steps=3).distill_steps == 3
    assert WeightsConfig(target_bpw=4.5, distill_steps=0).distill_steps is None  # off (a GPU defaults it on)
    with pytest.raises(ConfigError, match="distill_steps"):
        WeightsConfig(target_bpw=4.5, distill_steps=-2)
    with pytest.raises(ConfigError, match="distill_steps.*low-bit"):
        WeightsConfig(target_bpw=4.5, distill_steps=2, reference="low-bit", writer="rtn")
    with pytest.raises(ConfigError, match="need `target_bpw`"):
        WeightsConfig(distill_steps=2)


def test_a_convert_distils_and_writes_what_it_measured(tiny_q4_path, tmp_path, hooks_enabled, capsys):
    """The 4-layer model planned over 3/4-bit candidates, written by round to nearest, distilled
    for 3 steps of 4x32 tokens (~5 s a step here: the 49152-token head): the sidecar records the run; the model reloads with stock mlx-lm at the planned
    size; when kept, its KL on the held-out windows is the recorded one (what was measured is
    what was written), lower than before; when not kept, the un-distilled one."""
    from mlx_lm.convert import convert
    from mlx_lm.utils import load_model, load_tokenizer

    from mlx_lm_optiq.core.model_tree import load_float_model

    out = tmp_path / "out"
    convert(
        hf_path=str(tiny_q4_path),
        mlx_path=str(out),
        quantize=True,
        optiq_target_bpw=4.0,
        optiq_candidates="3:64,4:64",
        optiq_num_samples=2,
        optiq_sequence_length=32,
        optiq_writer="rtn",
        optiq_clipping="none",  # stock ranges: the clipping search is test_clipping's subject, and slow here
        optiq_distill_steps=3,
    )
    meta = json.loads((out / "optiq_metadata.json").read_text())
    d = meta["distill"]
    assert d["steps"] == 3 and d["batch_size"] == 4 and d["sequence_length"] == 32
    assert d["modules"] > 0 and d["compute"] == "simulated fp32"
    assert d["valid_kl_before"] > 0 and d["valid_kl_after"] > 0
    assert d["learning_rate"] == distill.learning_rate_for(d["valid_kl_before"])
    printed = "".join(capsys.readouterr())
    assert "distilling scales and biases against the float model: 3 steps of 4x32 tokens" in printed
    assert "[INFO] optiq: distillation: 3 steps after writing, ~" in printed and "(asked)" in printed
    assert meta["achieved_bpw"] <= 4.0

    teacher, _ = load_float_model(tiny_q4_path, "float32", lazy=False)
    student = distill.simulated(load_model(out)[0])
    _, valid = distill.windows(load_tokenizer(out), None, 32, 3)
    measured = distill.kl_on(teacher, student, valid)
    if d["kept"]:
        assert d["valid_kl_after"] < d["valid_kl_before"]
        assert measured == pytest.approx(d["valid_kl_after"], rel=2e-2)
        assert "distilled " in printed
    else:
        assert measured == pytest.approx(d["valid_kl_before"], rel=2e-2)
        assert "distillation not kept" in printed


def test_a_replan_whose_table_does_not_record_its_calibration_refuses_to_distill(full_q4_path, tmp_path, hooks_enabled):
    """Distillation trains on the text the table was measured on: a sidecar without it is an error
    naming the flag and the missing fields, before any dequantizing or writing (never the bundled
    set by default)."""
    from pathlib import Path

    from mlx_lm.convert import convert

    from mlx_lm_optiq.weights.plan import PlanError

    sidecar = json.loads(
        (Path(__file__).parents[1] / "docs/results/quickstart-clipping-optiq_metadata.json").read_text()
    )
    del sidecar["sensitivity"]["calibration"]["source"]
    table = tmp_path / "optiq_metadata.json"
    table.write_text(json.dumps(sidecar))
    with pytest.raises(PlanError, match=r"--optiq-distill-steps: distils on .*'calibration.source'"):
        convert(
            hf_path=str(full_q4_path),
            mlx_path=str(tmp_path / "out"),
            quantize=True,
            optiq_sensitivity=str(table),
            optiq_target_bpw=4.5,
            optiq_distill_steps=2,
        )
    assert not (tmp_path / "out").exists()


def test_a_backend_failure_while_training_keeps_the_written_model(tiny_q4_path, tmp_path, monkeypatch):
    """MLX failing inside the training (seen once on the H200: `cuGraphAddKernelNode ... invalid
    argument`) ends the distillation only: the model written before it is untouched, the summary
    says why, and the convert can finish."""
    import shutil

    import mlx_lm.quant.dwq as dwq

    out = tmp_path / "written"
    shutil.copytree(tiny_q4_path, out)
    before = {f.name: f.read_bytes() for f in out.glob("*.safetensors")}

    def fails(*args, **kwargs):
        raise RuntimeError("cuGraphAddKernelNode(&node, graph_, NULL, 0, &params) failed: invalid argument")

    monkeypatch.setattr(dwq, "dwq_quantize", fails)
    lines = []
    d = distill.distill(out, tiny_q4_path, None, 32, 2, log=lines.append)
    assert d["kept"] is False and d["reason"].startswith("training failed: RuntimeError: cuGraphAddKernelNode")
    assert d["valid_kl_before"] >= 0
    assert lines and "distillation not kept (training failed" in lines[-1]
    assert {f.name: f.read_bytes() for f in out.glob("*.safetensors")} == before


def test_the_learning_rate_follows_how_far_the_written_model_is():
    """3e-5 where the written model is far from the float one (3.5/4.5 BPW: it beat 1e-5), 1e-5 near
    it (5.0 BPW: 3e-5 raised the KL there, 1e-5 lowered it 0.79x)."""
    assert distill.learning_rate_for(0.65) == distill.learning_rate_for(0.131) == distill.LEARNING_RATE == 3e-5
    assert distill.learning_rate_for(0.0715) == distill.NEAR_LEARNING_RATE == 1e-5
    assert distill.learning_rate_for(distill.NEAR_KL) == 3e-5
