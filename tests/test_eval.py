"""`python -m mlx_lm_optiq.quality`: PPL, KL and top-1 vs the float model on held-out text."""

import json
import re
import subprocess
import sys

import pytest

from mlx_lm_optiq import quality
from mlx_lm_optiq.core.jsonio import write_json


@pytest.fixture(scope="module")
def uniform_models(tiny_float_path, tmp_path_factory):
    """Stock mlx-lm uniform 4-bit and 8-bit (g64) conversions of the 4-layer float model, in this
    process (the import of mlx_lm is most of a small convert's time) with the hooks off."""
    from mlx_lm.convert import convert

    import mlx_lm_optiq

    base = tmp_path_factory.mktemp("uniform")
    out = {bits: base / f"q{bits}" for bits in (4, 8)}
    assert not mlx_lm_optiq.enabled_patches()  # stock mlx-lm's convert
    for bits, dst in out.items():
        convert(str(tiny_float_path), mlx_path=str(dst), quantize=True, q_bits=bits, q_group_size=64)
    return out


def test_eval_command_reports_quality_on_held_out_text(uniform_models, tiny_float_path, shared_dir, tmp_path, capsys):
    """The command's main in this process (its `python -m` entry point: test_help_documents_...)."""
    text = shared_dir / "data" / "text" / "emma.txt"
    report = tmp_path / "eval.json"
    capsys.readouterr()
    quality.main(
        [
            "--model",
            str(uniform_models[4]),
            "--model",
            str(uniform_models[8]),
            "--reference",
            str(tiny_float_path),
            "--text",
            str(text),
            "--num-tokens",
            "256",
            "--sequence-length",
            "128",
            "--skip-tokens",
            "1000",
            "--compute",
            "simulated",
            "--output",
            str(report),
        ]
    )
    printed = capsys.readouterr().out
    assert "256 tokens of" in printed and "compute:" in printed and "simulated" in printed
    data = json.loads(report.read_text())
    assert data["kind"] == "optiq-eval" and data["num_tokens"] == 256
    q4, q8 = data["results"][str(uniform_models[4])], data["results"][str(uniform_models[8])]
    ref = data["results"]["reference"]
    # 8-bit is far closer to the float model than 4-bit on every metric
    assert 0 < q8["kl"] < q4["kl"] / 5
    assert q4["top1"] < q8["top1"] <= 1
    assert abs(q8["ppl"] - ref["ppl"]) < abs(q4["ppl"] - ref["ppl"])
    # fp32 source: fp32 scales and biases add 1 bit per weight at group 64
    assert q4["bpw"] == pytest.approx(5.0, abs=0.01) and q8["bpw"] == pytest.approx(9.0, abs=0.01)
    assert q4["compute"] == "simulated" and data["reference_dequantized"] is False


def test_simulated_quantization_matches_real_kernels(uniform_models, tiny_float_path, austen):
    """Dequantized-fp32 evaluation gives the numbers of the real quantized kernels."""
    reference, tokenizer, _ = quality.load_reference(tiny_float_path)
    real, bpw_real, used_real = quality.load_for_eval(uniform_models[4], "quantized")
    sim, bpw_sim, used_sim = quality.load_for_eval(uniform_models[4], "simulated")
    assert (used_real, used_sim) == ("quantized", "simulated") and bpw_real == bpw_sim
    ids = tokenizer.encode(austen("emma")[5000:9000])[:64]
    import mlx.core as mx

    tokens = mx.array(ids).reshape(1, 64)
    res = quality.evaluate(reference, {"real": real, "sim": sim}, tokens, progress=False)
    assert res["real"]["kl"] > 0.01
    assert res["sim"]["kl"] == pytest.approx(res["real"]["kl"], rel=0.02)
    assert res["sim"]["ppl"] == pytest.approx(res["real"]["ppl"], rel=0.01)


def test_eval_refuses_the_calibration_text_and_names_bad_inputs(tmp_path, shared_dir):
    text = shared_dir / "data" / "text" / "persuasion.txt"
    model = tmp_path / "m"
    model.mkdir()
    write_json(
        model / "optiq_metadata.json", {"sensitivity": {"calibration": {"source": str(text)}}}, kind="optiq-metadata"
    )
    with pytest.raises(quality.EvalError, match="is the calibration text of"):
        quality.check_not_calibration_text(model, text)
    quality.check_not_calibration_text(model, shared_dir / "data" / "text" / "emma.txt")

    class Tok:
        def encode(self, s):
            return list(range(len(s.split())))

    with pytest.raises(quality.EvalError, match="--text .*missing.txt: file not found"):
        quality.text_tokens(Tok(), tmp_path / "missing.txt", 256, 128)
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(quality.EvalError, match="has 5 tokens, need 256"):
        quality.text_tokens(Tok(), short, 256, 128)
    with pytest.raises(quality.EvalError, match="multiple of --sequence-length"):
        quality.text_tokens(Tok(), short, 100, 128)


def _cells(line):
    """(start, end) of each cell: runs of text whose words are one space apart (columns are two)."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+(?: \S+)*", line)]


def test_table_columns_stay_aligned_for_huge_and_tiny_values():
    """A 4-layer (non-LM) model's PPL is ~1e8; fixed widths pushed every later column right."""
    results = {
        "reference": {"ppl": 3.87654},
        "q4": {"ppl": 110093487.333, "kl": 14.2, "top1": 0.0123},
        "a/long/path/to/model-mixed-4.5": {"ppl": 3.9, "kl": 3.2e-9, "top1": 0.99999},
        "broken": {"ppl": float("inf"), "kl": float("nan"), "top1": 0.0},
        "negative": {"ppl": 1.5, "kl": 0.0, "top1": 1.0},
    }
    info = {"reference": {"bpw": 32.0}}
    info.update({k: {"bpw": 4.503, "compute": "simulated"} for k in results if k != "reference"})
    lines = quality.format_table(results, info).splitlines()
    assert len(lines) == len(results) + 1
    cells = [_cells(line) for line in lines]
    assert all(len(c) == 7 for c in cells), lines
    for col in range(7):
        # model and compute are left-aligned (same start), the numbers right-aligned (same end)
        edge = 0 if col in (0, 6) else 1
        assert len({c[col][edge] for c in cells}) == 1, (col, lines)
    assert "1.101e+08" in lines[2] and "3.20e-09" in lines[3]  # huge and tiny values stay legible


def test_help_documents_every_option_with_its_default():
    res = subprocess.run([sys.executable, "-m", "mlx_lm_optiq.quality", "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m mlx_lm_optiq.quality ")
    options = res.stdout.split("options:", 1)[1].split("\ncolumns:", 1)[0]
    text = " ".join(options.split())
    for action in quality.build_parser()._actions:
        if action.dest == "help":
            continue
        flag = action.option_strings[0]
        # the option's own help entry: from its flag to the next option's flag
        entry_start = re.compile(r"(?:^| )--[a-z-]+ (?:[A-Z_]+|\{[a-z,]+\}) ")
        start = next(m.start() for m in entry_start.finditer(text) if m.group().strip().startswith(flag + " "))
        entry = entry_start.split(text[start + 1 :], maxsplit=2)[1]
        default = "none" if action.default is None else action.default
        assert ("(required)" if action.required else f"(default: {default}") in entry, (flag, entry)
