"""The slow-BLAS warning: which BLAS MLX's CPU matmuls call, and one warning line when it is the reference one."""

import os
import subprocess
import sys

import pytest

from mlx_lm_optiq.core import backend

REFERENCE = "/v/lib/python3.11/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(backend, "_warned", False)
    monkeypatch.setattr(backend, "on_cpu", lambda: True)
    return monkeypatch


def test_reference_blas_warns_once_with_the_fix(fresh, capsys):
    fresh.setattr(backend, "cpu_blas_library", lambda: REFERENCE)
    assert backend.warn_if_slow_blas() is True
    assert backend.warn_if_slow_blas() is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "[WARNING] optiq: MLX computes on the CPU with the slow reference BLAS"
    )
    assert "libblas-bd8a282c.so.3.10.0" in err and ". scripts/env.sh" in err and "LD_PRELOAD=" in err


@pytest.mark.parametrize(
    "library",
    [
        OPENBLAS,
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",  # Debian's alternative: OpenBLAS
        "/opt/intel/oneapi/mkl/lib/libmkl_rt.so.2",
        "/usr/lib/libblis.so.4",
        None,  # unknown (not Linux, no /proc): never a false alarm
    ],
)
def test_fast_or_unknown_blas_is_silent(fresh, capsys, library):
    fresh.setattr(backend, "cpu_blas_library", lambda: library)
    assert backend.warn_if_slow_blas() is False
    assert capsys.readouterr().err == ""


def test_no_warning_off_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(backend, "_warned", False)
    monkeypatch.setattr(backend, "on_cpu", lambda: False)  # Metal or CUDA
    monkeypatch.setattr(backend, "cpu_blas_library", lambda: REFERENCE)
    assert backend.warn_if_slow_blas() is False and capsys.readouterr().err == ""


def _detected(preload):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    code = (
        "from mlx_lm_optiq.core import backend as b; l = b.cpu_blas_library(); print(l, l and b.is_reference_blas(l))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_detects_the_library_mlx_really_calls():
    library, reference = _detected(None)
    if "mlx_cpu.libs" in library:  # the mlx-cpu wheel's own netlib BLAS
        assert reference == "True"
    if os.path.exists(OPENBLAS):
        library, reference = _detected(OPENBLAS)  # the preload wins symbol lookup
        assert "openblas" in library and reference == "False"
