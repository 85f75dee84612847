"""`python -m mlx_lm_optiq.kv`: re-planning from a written kv_config.json, model paths, where the plan went.

Real model: the 4-layer SmolLM2 from ../shared, measured once (short windows, three candidates).
"""

import contextlib
import io
import json

import pytest

from mlx_lm_optiq.core import backend
from mlx_lm_optiq.core.errors import OptiqError
from mlx_lm_optiq.core.jsonio import write_json
from mlx_lm_optiq.hooks import convert_kv
from mlx_lm_optiq.kv import cli, pipeline, plan_file
from mlx_lm_optiq.kv.candidates import DEFAULT_KV_CANDIDATES
from mlx_lm_optiq.kv.config import CPU_DEFAULTS, GPU_DEFAULTS, MEASUREMENT_FIELDS

CANDIDATES = "8/8:64,4/4:64,2/2:64"
REFERENCE_BLAS = "/v/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0"


def _main(argv):
    """(exit code, stdout, stderr) of the CLI; argparse errors exit with 2."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def measured(tiny_q4_path, shared_dir, tmp_path_factory):
    """One measured plan, written to a relative --output, on a CPU 'with the reference BLAS'."""
    d = tmp_path_factory.mktemp("kvcli")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        mp.setattr(backend, "_warned", False)
        mp.setattr(backend, "on_cpu", lambda: True)
        mp.setattr(backend, "cpu_blas_library", lambda: REFERENCE_BLAS)
        rc, out, err = _main(
            [
                tiny_q4_path,
                "--target-bits",
                "6",
                "-o",
                "plans/kv_config.json",
                "--sensitivity-out",
                "table.json",
                "--data",
                shared_dir / "data/text/persuasion.txt",
                "--prefix-tokens",
                "64",
                "--scored-tokens",
                "16",
                "--candidates",
                CANDIDATES,
            ]
        )
    assert rc == 0, err
    return {"dir": d, "plan": d / "plans" / "kv_config.json", "table": d / "table.json", "out": out, "err": err}


def test_says_where_the_plan_was_written_and_warns_about_a_slow_blas_once(measured):
    assert measured["out"].startswith(f"wrote {measured['plan'].resolve()}: ")  # absolute, though -o was relative
    assert measured["err"].count("[WARNING] optiq: MLX computes on the CPU with the slow reference BLAS") == 1


def test_says_in_one_line_what_it_measures_before_the_first_probe(measured):
    """Issue 14: one line, before the progress bar, names the backend, the settings (which came
    from the CPU defaults, and what a GPU would use instead) and probes x estimated time."""
    err = measured["err"]
    lines = [line for line in err.splitlines() if line.startswith("[INFO] optiq: KV measurement")]
    assert len(lines) == 1, err
    line = lines[0]
    # 4 slots x 3 candidates (2/2 included), 1 window; --probe and --num-windows left to the CPU defaults
    assert line.startswith(
        "[INFO] optiq: KV measurement on cpu: probe fast, 3 candidates, 1 window of 64 + 16 scored tokens, "
        "bits for a 8192-token context: 12 probes x ~"
    ), line
    assert line.endswith(
        "; cpu defaults for --num-windows, --probe (GPU defaults, more thorough but slower on a CPU: --probe exact)"
    )
    assert err.index(line) < err.index("KV sensitivity (fast)")


def _config_built(argv, monkeypatch, backend_name):
    """The KVPlanConfig `python -m mlx_lm_optiq.kv ARGV` hands to plan_kv on `backend_name` (nothing is measured)."""
    seen = []

    def stop(model_path, config, **kw):
        seen.append(config)
        raise OptiqError("stopped before measuring")

    monkeypatch.setattr(backend, "compute_backend", lambda: backend_name)
    monkeypatch.setattr(cli, "plan_kv", stop)
    rc, _, err = _main(argv)
    assert rc == 2 and err.strip().endswith("error: stopped before measuring"), err
    return seen[0]


def _settings(config):
    return tuple(getattr(config, name) for name in MEASUREMENT_FIELDS)


@pytest.mark.parametrize("backend_name", ["cpu", "cuda", "metal"])
def test_measurement_defaults_follow_the_backend_and_flags_win(backend_name, tiny_q4_path, tmp_path, monkeypatch):
    """Issue 14: with no measurement flag a CPU gets its cheap defaults (the fast probe over 256 tokens after a
    512-token prefix: minutes, not hours, on 2 cores), a GPU today's thorough ones; any flag
    given wins over its default, on the CLI and on convert alike, and the rest stay the backend's."""
    assert _settings(CPU_DEFAULTS) == (DEFAULT_KV_CANDIDATES, 512, 256, 1, "fast")
    assert _settings(GPU_DEFAULTS) == (DEFAULT_KV_CANDIDATES, 1536, 128, 1, "exact")
    expected = CPU_DEFAULTS if backend_name == "cpu" else GPU_DEFAULTS
    base = [tiny_q4_path, "--target-bits", "4.5", "-o", tmp_path / "kv.json"]

    config = _config_built(base, monkeypatch, backend_name)
    assert _settings(config) == _settings(expected)
    assert config.backend == backend_name and config.defaulted == MEASUREMENT_FIELDS

    flags = ["--probe", "exact", "--prefix-tokens", "256", "--num-windows", "2", "--candidates", "8/4:64"]
    config = _config_built(base + flags, monkeypatch, backend_name)
    assert (config.probe, config.prefix_tokens, config.num_windows, config.candidates) == (
        "exact",
        256,
        2,
        ((8, 4, 64),),
    )
    assert config.scored_tokens == expected.scored_tokens and config.defaulted == ("scored_tokens",)

    # mlx_lm.convert --optiq-kv-*: the same defaults, the same precedence
    config = convert_kv.before_convert({}, {"kv_target_bits": 4.5})
    assert _settings(config) == _settings(expected)
    config = convert_kv.before_convert({}, {"kv_target_bits": 4.5, "kv_probe": "exact", "kv_scored_tokens": 32})
    assert (config.probe, config.scored_tokens, config.prefix_tokens) == ("exact", 32, expected.prefix_tokens)

    # re-planning from a table measures nothing: no backend default is filled in
    table = tmp_path / "table.json"
    table.write_text("{}")
    config = _config_built(base + ["--sensitivity", table], monkeypatch, backend_name)
    assert config.backend is None and config.probe is None and config.candidates is None


def test_kv_config_replans_another_budget_without_measuring(measured, tiny_q4_path, tmp_path, monkeypatch):
    def no_measuring(*a, **k):
        raise AssertionError("measured although a kv_config.json was given")

    monkeypatch.setattr(pipeline, "load_float_reference", no_measuring)
    monkeypatch.setattr(pipeline, "measure_kv_sensitivity", no_measuring)
    first = json.loads(measured["plan"].read_text())
    for target in ("3", "4.5"):
        from_config, from_table = tmp_path / f"c{target}.json", tmp_path / f"t{target}.json"
        rc, out, err = _main(
            [tiny_q4_path, "--target-bits", target, "-o", from_config, "--sensitivity", measured["plan"]]
        )
        assert rc == 0, err
        assert out.startswith(f"wrote {from_config.resolve()}: ")
        rc, _, err = _main(
            [tiny_q4_path, "--target-bits", target, "-o", from_table, "--sensitivity", measured["table"]]
        )
        assert rc == 0, err
        again, table_plan = json.loads(from_config.read_text()), json.loads(from_table.read_text())
        assert again["target_bits"] == float(target) and again["achieved_bits"] <= float(target)
        # the same plan as from the measured table itself, and the same KLs carried on
        assert again["layers"] == table_plan["layers"]
        assert [e["kl"] for e in again["layers"]] == [e["kl"] for e in first["layers"]]
        assert again["sensitivity"] == first["sensitivity"]
    assert {e.get("k_bits") for e in json.loads((tmp_path / "c3.json").read_text())["layers"]} >= {2}
    # a model folder holding the plan works too
    rc, _, err = _main(
        [tiny_q4_path, "--target-bits", "3", "-o", tmp_path / "d.json", "--sensitivity", measured["plan"].parent]
    )
    assert rc == 0, err


def test_candidates_restrict_a_replan_and_unmeasured_ones_are_named(measured, tiny_q4_path, tmp_path):
    rc, _, err = _main(
        [
            tiny_q4_path,
            "--target-bits",
            "5",
            "-o",
            tmp_path / "a.json",
            "--sensitivity",
            measured["plan"],
            "--candidates",
            "8/8:64,4/4:64",
        ]
    )
    assert rc == 0, err
    plan = plan_file.read_kv_config(tmp_path / "a.json")
    assert {(s.k_bits, s.v_bits) for s in plan.slots if s.scheme == "affine"} <= {(8, 8), (4, 4)}
    rc, _, err = _main(
        [
            tiny_q4_path,
            "--target-bits",
            "4",
            "-o",
            tmp_path / "b.json",
            "--sensitivity",
            measured["plan"],
            "--candidates",
            "4/2:32,4/4:64",
        ]
    )
    assert rc == 2 and not (tmp_path / "b.json").exists()
    assert (
        f"--candidates: ['4/2:32'] not measured in {measured['plan']} (slot 0 has ['2/2:64', '4/4:64', '8/8:64'])"
        in err
    )


def test_a_kv_config_without_measurements_is_a_clear_error(tiny_q4_path, tmp_path):
    rows = [
        {"layer": i, "cache_slot": i, "scheme": "affine", "k_bits": 8, "v_bits": 4, "group_size": 64} for i in range(4)
    ]
    hand = write_json(tmp_path / "hand.json", {"layers": rows}, kind=plan_file.KIND)
    rc, _, err = _main([tiny_q4_path, "--target-bits", "4", "-o", tmp_path / "o.json", "--sensitivity", hand])
    assert rc == 2 and f"{hand}: layers[0] has no field 'cache'" in err
    for row in rows:
        row.update(cache="KVCache", n_kv_heads=3, k_head_dim=64, v_head_dim=64)
    write_json(hand, {"layers": rows}, kind=plan_file.KIND)
    rc, _, err = _main([tiny_q4_path, "--target-bits", "4", "-o", tmp_path / "o.json", "--sensitivity", hand])
    assert rc == 2 and f"{hand}: no layer holds measured KLs (field 'layers[i].kl')" in err
    rows[1]["kl"] = {"8/4:64": "lots"}
    write_json(hand, {"layers": rows}, kind=plan_file.KIND)
    rc, _, err = _main([tiny_q4_path, "--target-bits", "4", "-o", tmp_path / "o.json", "--sensitivity", hand])
    assert rc == 2 and f"{hand}: field 'layers[1].kl.8/4:64' must be a finite number >= 0, got 'lots'" in err
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("typo", ["{tmp}/no-such-model", "./no-such-model", "../no/such/model"])
def test_a_mistyped_local_path_is_named_before_anything_loads(typo, tmp_path, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("loaded or looked up on the hub")

    import mlx_lm.utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "load_float_reference", no_loading)
    monkeypatch.setattr(mlx_lm.utils, "_download", no_loading)
    model = typo.format(tmp=tmp_path)
    for extra in ([], ["-o", str(tmp_path / "kv.json")]):
        rc, out, err = _main([model, "--target-bits", "4", *extra])
        assert rc == 2 and err.strip().endswith(f"error: {model}: no such model directory"), err
        assert "Traceback" not in err


def test_a_failed_hub_lookup_names_the_model(tmp_path, monkeypatch):
    import mlx_lm.utils

    def offline(*a, **k):
        raise OSError("Got: ConnectError: [Errno -2] Name or service not known\nAn error happened ...")

    monkeypatch.setattr(mlx_lm.utils, "_download", offline)
    rc, _, err = _main(["org/no-such-model", "--target-bits", "4", "-o", tmp_path / "kv.json"])
    assert rc == 2
    assert err.strip().endswith(
        "error: org/no-such-model: no such model directory, and the Hugging Face Hub lookup failed "
        "(Got: ConnectError: [Errno -2] Name or service not known)"
    )


def test_bad_inputs_are_one_line_before_the_model_loads(tiny_q4_path, tmp_path, monkeypatch):
    """Issue 16 items 8/17: a binary --data text or a garbage config.json is a parser error naming
    the file (no UnicodeDecodeError text, no traceback), found before the model is loaded."""

    def no_loading(*a, **k):
        raise AssertionError("loaded the model before checking the inputs")

    monkeypatch.setattr(pipeline, "load_float_reference", no_loading)
    binary = tmp_path / "text.txt"
    binary.write_bytes(b"\xff\xfe\x00binary" * 10)
    rc, _, err = _main([tiny_q4_path, "--target-bits", "4", "-o", tmp_path / "kv.json", "--data", binary])
    assert rc == 2 and err.strip().endswith(f"error: --data: {binary}: not a UTF-8 text file (byte 0)"), err
    garbage = tmp_path / "model"
    garbage.mkdir()
    (garbage / "config.json").write_text('{"model_type": "no-such-architecture"}')
    rc, _, err = _main([garbage, "--target-bits", "4"])
    assert rc == 2 and f"error: {garbage}/config.json: field 'model_type' is 'no-such-architecture'" in err, err
    assert "Traceback" not in err
