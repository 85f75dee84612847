"""Compile the CUDA kernel sources of mlx_lm_optiq with NVRTC, without a GPU.

Why: the fused KV attention kernels (`mlx_lm_optiq/kv/cuda_attention.py` for the affine caches,
`mlx_lm_optiq/kv/cuda_turbo.py` for TurboQuant) only run on the lent GPU, where a compile error
costs device time. NVRTC compiles on any x86 machine, so every
template variant the Python side can ask for is compiled here first (sm_90, C++17). The
kernel signature is this script's approximation of what `mx.fast.cuda_kernel` generates
(typed input pointers, `<name>_shape` / `<name>_strides` arrays, template constants as
`constexpr`): it catches errors in our sources, not in MLX's wrapping; behaviour is still
checked only by `tests/test_kv_attention_device.py` on the device.

    pip download --no-deps -d /tmp/nvrtc nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12
    python scripts/check_cuda_kernels.py --wheels /tmp/nvrtc [--kernels affine turbo]
    python scripts/check_cuda_kernels.py --compare HEAD~1   # a refactor: which variants' PTX changed
"""

import argparse
import ctypes
import itertools
import re
import sys
import zipfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from mlx_lm_optiq.kv import cuda_attention, cuda_turbo, turbo  # noqa: E402

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


def source(body: str, consts: dict, inputs: list, outputs: list, header: str = cuda_attention._HEADER) -> str:
    lines = [PRELUDE, header]
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
    for dt, (kb, vb), mask, staged in itertools.product(
        ["float16", "bfloat16"],
        itertools.product(cuda_attention.MMA_BITS, repeat=2),
        ["none", "bool", "additive", "causal"],
        [False, True],
    ):
        t = FLOAT_TYPES[dt]
        consts = dict(BF=dt == "bfloat16", STAGED=staged, TS=t, **common, KB=kb, VB=vb)
        consts.update(HAS_MASK=mask in ("bool", "additive"), MASK_BOOL=mask == "bool", CAUSAL=mask == "causal")
        ins = [("q", t), ("kp", "unsigned char"), ("vp", "unsigned char"), ("mask", "bool" if mask == "bool" else t)]
        yield (
            f"mma{'-staged' if staged else ''} {dt} K{kb}V{vb} {mask}",
            source(cuda_attention._MMA_SPLIT_SOURCE, consts, ins, outs),
        )
    # staged tiles at the other head dims and the widest rows (their warps per block, as the
    # Python side picks them: static shared memory is checked when the kernel compiles)
    from mlx_lm_optiq.kv.caches import Packing

    for D, kb, vb, g, scales in [(64, 8, 4, 32, "float16"), (256, 8, 8, 32, "float16"), (256, 8, 8, 32, "float32")]:
        t = FLOAT_TYPES["float16"]
        width = {b: Packing(b, g, D, getattr(mx, scales)).width for b in (kb, vb)}
        consts = dict(common, D=D, G=g, WARPS=cuda_attention._mma_warps_per_block(width[kb], width[vb]))
        consts.update(BF=False, STAGED=True, TS=FLOAT_TYPES[scales], KB=kb, VB=vb)
        consts.update(HAS_MASK=False, MASK_BOOL=False, CAUSAL=False)
        ins = [("q", t), ("kp", "unsigned char"), ("vp", "unsigned char"), ("mask", t)]
        label = f"mma-staged D{D} K{kb}V{vb} g{g} {scales} scales, {consts['WARPS']} warps"
        yield label, source(cuda_attention._MMA_SPLIT_SOURCE, consts, ins, outs)
    for dt, (kb, vb) in itertools.product(FLOAT_TYPES, [(2, 2), (3, 5), (4, 4), (6, 8)]):
        t = FLOAT_TYPES[dt]
        consts = dict(TS=t, **common, KB=kb, VB=vb, HAS_MASK=True, MASK_BOOL=False, CAUSAL=True)
        ins = [("q", t), ("kp", "unsigned char"), ("vp", "unsigned char"), ("mask", t)]
        yield f"simt {dt} K{kb}V{vb}", source(cuda_attention._SPLIT_SOURCE, consts, ins, outs)
    for dt, t in FLOAT_TYPES.items():
        yield f"merge {dt}", source(cuda_attention._MERGE_SOURCE, dict(T=t, D=128, SP=8), outs, [("out", t)])


def turbo_variants():
    """(label, source) of the TurboQuant split/merge variants the Python side can request. The
    constants come from `cuda_turbo.kernel_constants` on real quantizers, so what compiles here
    is what `cuda_turbo.attention` asks for. The code that differs between calls is the code
    layout (one segment of each width 1-6, or two segments of a fractional width, at bit offsets
    that depend on the head dim), the mask kind and the query dtype; the query rows, head dim
    and warps per block change loop bounds and shared-memory sizes."""
    outs = [("o_part", "float"), ("m_part", "float"), ("l_part", "float")]

    def variant(D, kbits, vbits, n_q, n_kv, L, dt, mask):
        kq, vq = turbo.TurboQuantizer(D, kbits, seed=0), turbo.TurboQuantizer(D, vbits, seed=1)
        consts = dict(cuda_turbo.kernel_constants((1, n_q, L, D), kq, vq, n_kv, D**-0.5))
        consts.update(HAS_MASK=mask in ("bool", "additive"), MASK_BOOL=mask == "bool", CAUSAL=mask == "causal")
        t = FLOAT_TYPES[dt]
        ins = [("q", t), ("kp", "unsigned char"), ("vp", "unsigned char")]
        ins += [("mask", "bool" if mask == "bool" else t), ("cb", "float"), ("rot_t", "float")]
        label = f"turbo D{D} K{kbits:g}V{vbits:g} rows {n_q // n_kv}x{L} {dt} {mask} warps {consts['WARPS']}"
        return label, source(cuda_turbo._SPLIT_SOURCE, consts, ins, outs, cuda_turbo._TURBO_HEADER)

    for kb, vb in itertools.product(turbo.SUPPORTED_BITS, repeat=2):  # every integer width pair
        yield variant(128, kb, vb, 8, 2, 1, "float16", "bool")
    for bits in (1.5, 2.5, 3.5, 4.5, 5.5, 2.25, 3.75):  # two segments, at the splits' byte offsets
        yield variant(64, bits, bits, 4, 1, 1, "float16", "bool")
        yield variant(128, bits, 3, 4, 1, 1, "bfloat16", "none")
    for dt, mask in itertools.product(FLOAT_TYPES, ["none", "bool", "additive", "causal"]):
        yield variant(64, 3, 3, 9, 3, 2 if mask == "causal" else 1, dt, mask)
    for D, (n_q, n_kv, L), bits in itertools.product(
        cuda_turbo.HEAD_DIMS, [(1, 1, 1), (3, 1, 1), (12, 1, 1), (4, 1, 4), (16, 1, 1)], (3, 6)
    ):
        yield variant(D, bits, bits, n_q, n_kv, L, "float16", "bool")
    for D, bits in itertools.product(cuda_turbo.HEAD_DIMS, [*turbo.SUPPORTED_BITS, 2.5, 3.5, 3.75]):
        consts = dict(cuda_turbo.pack_constants(turbo.TurboQuantizer(D, bits, seed=0)))
        for dt in FLOAT_TYPES if (D, bits) == (128, 3) else ["float16"]:
            yield (
                f"turbo pack D{D} {bits:g} bits {dt}",
                source(
                    cuda_turbo._PACK_SOURCE,
                    consts,
                    [("x", FLOAT_TYPES[dt]), ("rot_t", "float"), ("bnd", "float")],
                    [("out", "unsigned char")],
                    cuda_turbo._TURBO_HEADER,
                ),
            )
    for dt, D in itertools.product(FLOAT_TYPES, cuda_turbo.HEAD_DIMS):
        consts = {**cuda_turbo.merge_constants(getattr(mx, dt), D), "T": FLOAT_TYPES[dt]}
        yield (
            f"turbo merge D{D} {dt}",
            source(
                cuda_turbo._MERGE_SOURCE,
                consts,
                outs + [("rot", "float")],
                [("out", FLOAT_TYPES[dt])],
                cuda_turbo._TURBO_HEADER,
            ),
        )


def compile_source(lib, include: Path, src: str, arch: str, want_ptx: bool = False) -> tuple[str | None, str]:
    """(None when NVRTC compiles `src`, else its log; the PTX when asked for and compiled, else "")."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"kernel.cu", 0, None, None):
        raise SystemExit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"-default-device", b"-I" + str(include).encode()]
    status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = ""
    if want_ptx and not status:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return (log.value.decode(errors="replace") if status else None), ptx


def instructions(ptx: str) -> Counter:
    """The PTX's lines as a multiset, register numbers and block labels erased: two sources whose
    kernels differ only in instruction order and register allocation compare equal."""
    lines = (line.strip() for line in ptx.splitlines())
    return Counter(
        re.sub(r"%(r|rd|f|fd|p|rs|h|hh)\d+", r"%\1", re.sub(r"\$L__BB\d+_\d+", "L", line))
        for line in lines
        if line and not line.startswith("//")
    )


def sources_at(rev: str, kernels: list[str]) -> dict[str, str]:
    """{label: source} of every variant as the kernel modules stood at git revision `rev` (their
    text read with git show and executed as stand-ins, so a refactor can be compared with the
    code before it: same labels, same constants)."""
    import subprocess
    import types

    def load(name: str, path: str) -> types.ModuleType:
        text = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout
        module = types.ModuleType(name)
        module.__file__ = path
        exec(compile(text, f"{rev}:{path}", "exec"), module.__dict__)
        return module

    global cuda_attention, cuda_turbo
    now = cuda_attention, cuda_turbo, sys.modules["mlx_lm_optiq.kv.cuda_attention"]
    try:
        cuda_attention = load("mlx_lm_optiq.kv.cuda_attention", "mlx_lm_optiq/kv/cuda_attention.py")
        sys.modules["mlx_lm_optiq.kv.cuda_attention"] = cuda_attention  # what cuda_turbo imports
        cuda_turbo = load("mlx_lm_optiq.kv.cuda_turbo", "mlx_lm_optiq/kv/cuda_turbo.py")
        return dict(chosen_variants(kernels))
    finally:
        cuda_attention, cuda_turbo, sys.modules["mlx_lm_optiq.kv.cuda_attention"] = now


def chosen_variants(kernels: list[str]):
    yield from variants() if "affine" in kernels else ()
    yield from turbo_variants() if "turbo" in kernels else ()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", type=Path, default=Path("/tmp/nvrtc"), help="folder with the two NVIDIA wheels")
    p.add_argument("--arch", default="compute_90", help="NVRTC --gpu-architecture (the H200: compute_90)")
    p.add_argument(
        "--kernels", nargs="+", choices=["affine", "turbo"], default=["affine", "turbo"], help="which kernels"
    )
    p.add_argument(
        "--compare",
        metavar="REV",
        help="also compile every variant as the kernel sources stood at git revision REV and say which "
        "compile to a different PTX instruction multiset (a refactor's check without a GPU)",
    )
    args = p.parse_args()
    libpath, include = unpack(args.wheels)
    lib = ctypes.CDLL(str(libpath))
    before = sources_at(args.compare, args.kernels) if args.compare else {}
    failed, changed = 0, []
    for label, src in chosen_variants(args.kernels):
        log, ptx = compile_source(lib, include, src, args.arch, want_ptx=label in before)
        note = ""
        if log is None and label in before:
            old_log, old_ptx = compile_source(lib, include, before[label], args.arch, want_ptx=True)
            if old_log is None and instructions(old_ptx) != instructions(ptx):
                changed.append(label)
                note = f"  (PTX differs from {args.compare})"
        print(f"{'ok  ' if log is None else 'FAIL'} {label}{note}")
        if log is not None:
            failed += 1
            print(log)
    print(f"{failed} of the variants failed to compile" if failed else "every variant compiles")
    if args.compare:
        same = sum(1 for label, _ in chosen_variants(args.kernels) if label in before) - len(changed)
        print(
            f"{same} compile to the same PTX instructions as at {args.compare} (order and registers aside), "
            f"{len(changed)} differ" + (f": {', '.join(changed)}" if changed else "")
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
