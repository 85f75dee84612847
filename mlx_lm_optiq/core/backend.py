"""Which BLAS MLX's CPU backend multiplies with, and one warning when it is the slow one.

MLX's Linux CPU wheel (mlx-cpu) links the reference netlib BLAS (`mlx_cpu.libs/libblas-*.so`,
~3 GFLOP/s in fp32); with a system OpenBLAS preloaded (`. scripts/env.sh` sets LD_PRELOAD)
the same matmuls run ~20x faster, and a sensitivity sweep or a KV measurement several
times faster end to end. Nothing tells the user, so the long jobs call
`warn_if_slow_blas` once before they start.

Detection asks the dynamic linker, not the clock: a timed matmul can false-alarm on a
busy machine, and a list of loaded libraries can be fooled by a BLAS loaded with private
symbol names (numpy's bundled OpenBLAS). `cblas_sgemm` is the symbol MLX's CPU matmul
calls; ELF lookup searches the global scope (the program, LD_PRELOAD) before libmlx's own
dependencies, so the library that defines it in the global scope, else the one libmlx's
dependency tree defines, is the one MLX calls. Its address is mapped to a file through
/proc/self/maps. The warning fires only when that file is positively a reference BLAS
(`libblas*` / `libcblas*` outside any OpenBLAS, MKL, BLIS, ATLAS or Accelerate folder);
anything unknown (another OS, no /proc, a renamed symbol) stays silent, so it cannot
false-alarm. Apple Silicon never warns: MLX runs on Metal there, and its CPU path uses
Accelerate.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from pathlib import Path

_SYMBOL = "cblas_sgemm"
_FAST = re.compile(r"openblas|mkl|blis|atlas|accelerate|armpl|flexiblas", re.IGNORECASE)
_REFERENCE = re.compile(r"^libc?blas([-.]|$)")
_warned = False


def _address(handle: ctypes.CDLL) -> int | None:
    try:
        return ctypes.cast(getattr(handle, _SYMBOL), ctypes.c_void_p).value
    except AttributeError:
        return None


def _mapped_file(address: int) -> str | None:
    """The file /proc/self/maps shows at `address` (None when it is anonymous or unknown)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(None, 5)
            low, high = (int(x, 16) for x in parts[0].split("-"))
            if low <= address < high:
                return parts[5].strip() if len(parts) == 6 else None
    return None


def cpu_blas_library() -> str | None:
    """Path of the library whose `cblas_sgemm` MLX's CPU backend calls; None when it cannot tell.

    Linux only (reads /proc/self/maps); imports mlx.core.
    """
    if not sys.platform.startswith("linux") or not os.path.exists("/proc/self/maps"):
        return None
    try:
        import mlx.core as mx

        address = _address(ctypes.CDLL(None))  # the global scope: the program and LD_PRELOAD
        if address is None:
            libmlx = Path(mx.__file__).parent / "lib" / "libmlx.so"
            if not libmlx.is_file():
                return None
            address = _address(ctypes.CDLL(str(libmlx), mode=os.RTLD_NOLOAD | os.RTLD_LAZY))
        return _mapped_file(address) if address else None
    except (OSError, ValueError, ImportError):
        return None


def is_reference_blas(path: str) -> bool:
    """Whether `path` is the slow reference BLAS (netlib `libblas`/`libcblas`, not a fast one)."""
    real = os.path.realpath(path)
    return bool(_REFERENCE.match(Path(real).name)) and not _FAST.search(real) and not _FAST.search(path)


def on_cpu() -> bool:
    """Whether MLX computes on the CPU by default (no Metal or CUDA device in use)."""
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.cpu


def compute_backend() -> str:
    """Where MLX computes by default: "cpu", "cuda", "metal" (or "gpu" for another GPU backend).

    Long jobs pick their default effort from it (kv/config.py: a CPU measures the KV
    cache with cheaper defaults than a GPU). `on_cpu` decides first, so a GPU build whose
    default device was set to the CPU counts as a CPU, which is where the work then runs.
    """
    if on_cpu():
        return "cpu"
    import mlx.core as mx

    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return "gpu"


def path_from_env(env_var: str, paths: tuple[str, ...], auto: dict[str, str], fallback: str, kernel: str) -> str:
    """The computation path `env_var` selects among `paths` ("auto" or unset: `auto` per backend,
    `fallback` for another backend). Raises ValueError for an unknown value and RuntimeError
    for "cuda" on another backend: a path that cannot run is said (naming `kernel`), never
    silently swapped. One rule for every variable of this kind (the KV attention paths)."""
    requested = os.environ.get(env_var, "auto").strip().lower() or "auto"
    backend = compute_backend()
    if requested == "auto":
        return auto.get(backend, fallback)
    if requested not in paths:
        raise ValueError(f"{env_var}={requested!r}: expected one of auto, {', '.join(paths)}")
    if requested == "cuda" and backend != "cuda":
        raise RuntimeError(f"{env_var}=cuda: {kernel} needs MLX's CUDA backend (running on {backend})")
    return requested


def slow_blas_warning(library: str) -> str:
    """The one-line warning for a reference BLAS at `library`."""
    return (
        f"[WARNING] optiq: MLX computes on the CPU with the slow reference BLAS ({Path(library).name}); "
        "this runs several times faster with OpenBLAS preloaded: `. scripts/env.sh` in the mlx-lm-optiq "
        "checkout, or LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 "
        "(apt install libopenblas0-pthread)"
    )


def warn_if_slow_blas() -> bool:
    """Print `slow_blas_warning` to stderr once per process when MLX's CPU matmuls use the reference BLAS.

    Called by the long CPU jobs (the weights sensitivity sweep, the KV measurement) before
    they start. Returns whether it warned now.
    """
    global _warned
    if _warned or not on_cpu():
        return False
    library = cpu_blas_library()
    if library is None or not is_reference_blas(library):
        return False
    _warned = True
    print(slow_blas_warning(library), file=sys.stderr)
    return True
