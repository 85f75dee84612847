"""Shared fixtures: real models and text from ../shared, float references made once per session."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OPTIQ_SHARED", REPO.parent / "shared")).resolve()


def _require(path):
    if not path.exists():
        pytest.fail(f"{path} is missing: tests need ../shared beside the repo (or OPTIQ_SHARED)")
    return path


@pytest.fixture(scope="session")
def shared_dir():
    return _require(SHARED)


@pytest.fixture(scope="session")
def tiny_q4_path(shared_dir):
    """Real SmolLM2 weights, first 4 blocks, MLX 4-bit g32 (embedding 8-bit)."""
    return _require(shared_dir / "models" / "smollm2-135m-instruct-4layer-q4-exact")


@pytest.fixture(scope="session")
def full_q4_path(shared_dir):
    return _require(shared_dir / "models" / "smollm2-135m-instruct-q4-exact")


def _dequantize(src, dst, dtype):
    """Stock `mlx_lm.convert -d --dtype DTYPE`, in this process (a fresh interpreter costs seconds of
    imports): the hooks are off here (session fixtures are set up before any test enables them)."""
    from mlx_lm.convert import convert

    import mlx_lm_optiq

    assert not mlx_lm_optiq.enabled_patches(), "the float references are written by stock mlx-lm"
    convert(str(src), mlx_path=str(dst), dequantize=True, dtype=dtype)
    return dst


@pytest.fixture(scope="session")
def tiny_float_path(tiny_q4_path, tmp_path_factory):
    """The 4-layer model dequantized to float32 (CPU matmuls are fastest in fp32)."""
    return _dequantize(tiny_q4_path, tmp_path_factory.mktemp("tiny") / "float32", "float32")


@pytest.fixture(scope="session")
def full_float_path(full_q4_path, tmp_path_factory):
    """The full SmolLM2 dequantized to float16: the project's float reference model."""
    return _dequantize(full_q4_path, tmp_path_factory.mktemp("full") / "float16", "float16")


@pytest.fixture(scope="session")
def austen(shared_dir):
    """Read one Austen novel: austen('persuasion') -> str."""

    def read(name):
        return _require(shared_dir / "data" / "text" / f"{name}.txt").read_text()

    return read


@pytest.fixture
def optiq_env():
    """Environment for console-script subprocesses with the hooks switched on."""
    env = dict(os.environ)
    env["MLX_LM_OPTIQ"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def hooks_enabled():
    import mlx_lm_optiq
    from tests.helpers import optiq

    with optiq():
        yield mlx_lm_optiq
