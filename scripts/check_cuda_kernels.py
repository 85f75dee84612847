"""Compile the CUDA kernel sources of mlx_lm_optiq with NVRTC, without a GPU.

Why: the fused KV attention kernels (`mlx_lm_optiq/kv/cuda_attention.py`) only run on the lent
GPU, where a compile error costs device time. NVRTC compiles on any x86 machine, so every
template variant the Python side can ask for is compiled here first (sm_90, C++17). The
kernel signature is this script's approximation of what `mx.fast.cuda_kernel` generates
(typed input pointers, `<name>_shape` / `<name>_strides` arrays, template constants as
`constexpr`): it catches errors in our sources, not in MLX's wrapping; behaviour is still
checked only by `tests/test_kv_attention_device.py` on the device.

    pip download --no-deps -d /tmp/nvrtc nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12
    python scripts/check_cuda_kernels.py --wheels /tmp/nvrtc
"""

import argparse
import ctypes
import itertools
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_lm_optiq.kv import cuda_attention  # noqa: E402

PRELUDE = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\ntypedef long long int64_t;\n"
FLOAT_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}


def unpack(wheels: Path) -> tuple[Path, Path]:
    """(libnvrtc.so, include dir) from the two NVIDIA wheels in `wheels` (unzipped once)."""
    out = wheels / "unpacked"
    if not out.exists():
        for w in wheels.glob("*.whl"):
            with zipfile.ZipFile(w) as z:
                z.extractall(out)
    libs = sorted(out.glob("nvidia/cuda_nvrtc/lib/libnvrtc.so*"))
    include = out / "nvidia/cuda_runtime/include"
    if not libs or not (include / "cuda_fp16.h").exists():
        raise SystemExit(f"{wheels}: expected the nvidia-cuda-nvrtc-cu12 and nvidia-cuda-runtime-cu12 wheels")
    return libs[0], include


def source(body: str, consts: dict, inputs: list, outputs: list) -> str:
    lines = [PRELUDE, cuda_attention._HEADER]
    for k, v in consts.items():
        if isinstance(v, bool):
            lines.append(f"constexpr bool {k} = {'true' if v else 'false'};")
        elif isinstance(v, str):
            lines.append(f"using {k} = {v};")
        else:
            lines.append(f"constexpr int {k} = {v};")
    params = []
    for name, ty in inputs:
        params += [f"const {ty}* {name}", f"const int64_t* {name}_shape", f"const int64_t* {name}_strides"]
    params += [f"{ty}* {name}" for name, ty in outputs]
    lines.append(f"__global__ void kernel({', '.join(params)}) {{\n{body}\n}}")
    return "\n".join(lines)


def variants():
    """(label, source) of every split/merge variant the Python side can request (one head dim:
    the others only change constants)."""
    outs = [("o_part", "float"), ("m_part", "float"), ("l_part", "float")]
    common = dict(D=128, G=64, NREP=4, L=1, R=4, RP=4, WARPS=4, TARGET_WARPS=4096, MIN_CHUNK=64, SCALE_BITS=0x3DB504F3)
    for dt, (kb, vb), mask in itertools.product(
        ["float16", "bfloat16"],
        itertools.product(cuda_attention.MMA_BITS, repeat=2),
        ["none", "bool", "additive", "causal"],
    ):
        t = FLOAT_TYPES[dt]
        consts = dict(BF=dt == "bfloat16", TS=t, **common, KB=kb, VB=vb)
        consts.update(HAS_MASK=mask in ("bool", "additive"), MASK_BOOL=mask == "bool", CAUSAL=mask == "causal")
        ins = [("q", t), ("kp", "unsigned char"), ("vp", "unsigned char"), ("mask", "bool" if mask == "bool" else t)]
        yield f"mma {dt} K{kb}V{vb} {mask}", source(cuda_attention._MMA_SPLIT_SOURCE, consts, ins, outs)
    for dt, (kb, vb) in itertools.product(FLOAT_TYPES, [(2, 2), (3, 5), (4, 4), (6, 8)]):
        t = FLOAT_TYPES[dt]
        consts = dict(TS=t, **common, KB=kb, VB=vb, HAS_MASK=True, MASK_BOOL=False, CAUSAL=True)
        ins = [("q", t), ("kp", "unsigned char"), ("vp", "unsigned char"), ("mask", t)]
        yield f"simt {dt} K{kb}V{vb}", source(cuda_attention._SPLIT_SOURCE, consts, ins, outs)
    for dt, t in FLOAT_TYPES.items():
        yield f"merge {dt}", source(cuda_attention._MERGE_SOURCE, dict(T=t, D=128, SP=8), outs, [("out", t)])


def compile_source(lib, include: Path, src: str, arch: str) -> str | None:
    """None when NVRTC compiles `src`, else its log."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"kernel.cu", 0, None, None):
        raise SystemExit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"-default-device", b"-I" + str(include).encode()]
    status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return log.value.decode(errors="replace") if status else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", type=Path, default=Path("/tmp/nvrtc"), help="folder with the two NVIDIA wheels")
    p.add_argument("--arch", default="compute_90", help="NVRTC --gpu-architecture (the H200: compute_90)")
    args = p.parse_args()
    libpath, include = unpack(args.wheels)
    lib = ctypes.CDLL(str(libpath))
    failed = 0
    for label, src in variants():
        log = compile_source(lib, include, src, args.arch)
        print(f"{'ok  ' if log is None else 'FAIL'} {label}")
        if log is not None:
            failed += 1
            print(log)
    print(f"{failed} of the variants failed to compile" if failed else "every variant compiles")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
