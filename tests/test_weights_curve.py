"""benchmarks/weights_curve.py on a real (4-layer) model: a tiny run end to end, then a resumed one.

Why: the curve's JSON and SVG are what docs/weights.md shows; this checks that a real run
writes finite numbers, keeps ours within each target, draws one polyline per series, and
that a re-run reuses what is cached instead of writing the models again.
"""

import json
import math
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def curve(monkeypatch, capsys):
    """The benchmark's main() in this interpreter (a fresh one costs seconds of imports per run):
    run(args) -> what it printed. Its sys.path entries and benchmarks/ modules are undone after."""
    import importlib.util

    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("_weights_curve_under_test", REPO / "benchmarks" / "weights_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(args):
        capsys.readouterr()
        module.main([str(a) for a in args])
        return capsys.readouterr().out

    yield run
    benchmarks = str(REPO / "benchmarks")
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(benchmarks):
            del sys.modules[name]


@pytest.mark.slow
def test_curve_tiny_run_json_svg_and_resume(tiny_q4_path, austen, tmp_path, curve):
    work, output, figure = tmp_path / "work", tmp_path / "curve.json", tmp_path / "curve.svg"
    # excerpts: tokenizing two whole novels would take most of the test's time
    calib, held_out = tmp_path / "calib.txt", tmp_path / "held_out.txt"
    calib.write_text(austen("persuasion")[:20000])
    held_out.write_text(austen("emma")[:20000])
    args = [
        "--calibration-text",
        calib,
        "--eval-text",
        held_out,
        "--model",
        tiny_q4_path,
        "--workdir",
        work,
        "--output",
        output,
        "--svg",
        figure,
        "--candidates",
        "4:64",
        "--two-bit",
        "2:64",
        "--grid",
        "4.5",
        "--two-bit-grid",
        "3.5",
        "--anchors",
        "uniform",
        "--uniform-bits",
        "3,4",
        "--uniform-groups",
        "64",
        "--num-samples",
        "1",
        "--sequence-length",
        "32",
        "--eval-tokens",
        "64",
        "--eval-sequence-length",
        "32",
        "--plot-range",
        "3.0:5.0",
        "--no-progress",
        # ours written by round to nearest: GPTQ (the default writer, ~10 s a point here) is
        # test_gptq's subject; this one checks the curve's points, outputs and resume
        "--writer",
        "rtn",
        # the convert's distillation (a GPU's default) on ours: one step, the path end to end
        "--distill-on-ours",
        "4.6",
        "--distill-steps",
        "1",
    ]
    printed = curve(args)
    data = json.loads(output.read_text())
    points = data["points"]
    series = {p["series"] for p in points}
    assert not data.get("failed"), [f["error"] for f in data["failed"]]
    assert series == {"ours", "ours + 2-bit", "uniform RTN g64", "ours + distillation"}
    (distilled,) = [p for p in points if p["series"] == "ours + distillation"]
    assert distilled["distill"]["steps"] == 1 and distilled["distill"]["sequence_length"] == 32
    assert distilled["distill"]["valid_kl_before"] > 0 and isinstance(distilled["distill"]["kept"], bool)
    for p in points:
        assert all(math.isfinite(p[k]) for k in ("bpw", "kl", "top1", "ppl", "seconds")), p
        assert p["kl"] >= 0 and p["num_tokens"] == 64
        if p["kind"] == "ours":
            assert p["bpw"] <= p["target"] + 1e-9, p
            assert p["writer"] == "rtn" and "gptq_modules" not in p, p
    # a grid point snaps onto the uniform anchor's exact BPW (4.5 -> 4-bit g64's size); the 2-bit
    # series is planned at its own grid point, below what the 4-bit candidate alone can reach
    uniform = {p["label"]: p["bpw"] for p in points if p["series"] == "uniform RTN g64"}
    assert [p["target"] for p in points if p["series"] == "ours"] == pytest.approx([uniform["4-bit g64"]], abs=1e-4)
    assert [p["target"] for p in points if p["series"] == "ours + 2-bit"] == [3.5]
    assert "| anchor | BPW | anchor KL |" in printed and "| target | ours KL | ours + 2-bit KL |" in printed
    assert "| target | student: ours KL (series) | ours + distillation KL |" in printed

    assert data["setup"]["writer"] == "rtn"

    svg = figure.read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    drawn = re.findall(r'<polyline class="series" data-series="([^"]+)" points="([^"]+)"', svg)
    assert sorted(name for name, _ in drawn) == sorted(series)
    for name, coords in drawn:
        n = sum(1 for p in points if p["series"] == name)
        assert len(coords.split()) == n
    assert 'class="reference"' in svg  # the uniform 4-bit g64 level

    # resumed: nothing is written again, the same numbers come back
    again = curve(args)
    assert "writing" not in again
    assert json.loads(output.read_text())["points"] == points
