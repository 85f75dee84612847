"""`python -m mlx_lm_optiq.kv`: re-planning from a written kv_config.json, model paths, where the plan went.

Real model: the 4-layer SmolLM2 from ../shared, measured once (short windows, three candidates).
"""

import contextlib
import io
import json

import pytest

from mlx_lm_optiq.core import backend
from mlx_lm_optiq.core.jsonio import write_json
from mlx_lm_optiq.kv import cli, pipeline, plan_file

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
