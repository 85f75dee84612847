"""Scale of the weights convert (issue 13 item 5): our whole `mlx_lm.convert --optiq-target-bpw`
(sweep + planning + writing + stock reload check) on a random-weight model of a real LLM's shape.

    python benchmarks/weights_scale.py --shape 8b                                  # bf16 source, defaults
    python benchmarks/weights_scale.py --shape 70b --source q4 --output-dir /dev/shm/optiq-scale  # defaults
    python benchmarks/weights_scale.py --shape tiny                                # CPU smoke run, seconds

Speed and memory do not depend on the weight values, so a random-weight model of the 8B/70B
llama shape (hidden size, layers, MLP width, GQA heads, 128k vocabulary) measures what a user's
convert of such a model costs; the plan it finds means nothing. The source is built with
mlx-lm's own model class one block at a time (a 70B float source would not fit in memory:
`--source q4` stores it 4-bit, as the 4-bit checkpoints users re-quantize from), with the
bundled SmolLM2 tokenizer (token ids < 49152 of the 128k embedding). The convert runs in its
own process with the optiq hooks on and only the flags `--convert` adds (the backend defaults
otherwise); its [INFO] lines, the wall time, and the process's peak device memory are printed,
and written to --out as JSON. A built source is reused from --workdir.

The 70B from a 4-bit source with the defaults: its dequantization (141 GB in bf16) does not fit
in memory, so the Fisher sweep holds the model quantized (~40 GB) and makes one chunk of modules
float at a time (weights/sweep.py, "Held quantized"; samples x chunks backward passes), and the
writer is rtn (gptq would load the whole float model). An rtn write from a quantized source
re-quantizes it module by module from the source itself (weights/pipeline.py `write_model`):
no dequantized copy on disk or in memory. Disk: the source (~40 GB, 4-bit g64 with bf16 scales)
in --workdir, and under --output-dir the converted model (~40 GB at 4.5 BPW; written to a
staging directory there and renamed). Both on one disk need ~80 GB: more than the 1-GPU
device's 64 GiB, so give the output another filesystem (`--output-dir /dev/shm/...`: ~40 GB of
its 128 GiB of memory, beside the process). Only a gptq write from a quantized source (a source
whose float model fits: the default writer there) still stages the dequantized copy (2 bytes a
parameter) beside the output. The space under --output-dir is checked before the convert starts
(`check_space`); nothing of this was measured on the device yet.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OPTIQ_SHARED", REPO.parent / "shared"))

LLAMA = dict(
    model_type="llama",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    vocab_size=128256,
)
SHAPES = {
    "tiny": dict(LLAMA, hidden_size=256, num_hidden_layers=2, intermediate_size=768, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=49152),
    "1b": dict(LLAMA, hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64),
    "8b": dict(LLAMA, hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128),
    "70b": dict(LLAMA, hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8, head_dim=128),
}  # fmt: skip


def parameter_count(shape: str) -> int:
    """Parameters of the llama `shape` (embedding, head, attention and MLP projections; norms left out)."""
    c = SHAPES[shape]
    h, heads, kv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    attention = 2 * h * heads * hd + 2 * h * kv * hd
    mlp = 3 * h * c["intermediate_size"]
    heads_and_embedding = (1 if c["tie_word_embeddings"] else 2) * c["vocab_size"] * h
    return c["num_hidden_layers"] * (attention + mlp) + heads_and_embedding


def stages_float_copy(shape: str, source: str, extra: dict) -> bool:
    """Whether the convert will stage the dequantized float copy beside its output: only a quantized
    source written with gptq (asked for, or the default where its float model fits in memory and the
    reference is not the low-bit one); rtn re-quantizes the source module by module without one."""
    if source != "q4":
        return False
    if extra.get("optiq_writer") is not None:
        return extra["optiq_writer"] == "gptq"
    if extra.get("optiq_reference") == "low-bit":
        return False
    from mlx_lm_optiq.weights import pipeline

    return pipeline._float_fits(parameter_count(shape))  # else held quantized: rtn


def check_space(shape: str, source: str, out_dir: Path, bpw: float, staged: bool = False) -> None:
    """Refuse to start a convert whose output (and, when `staged` (`stages_float_copy`), the
    dequantized bf16 copy in its staging directory) would not fit the free space under `out_dir`:
    a 70B convert would otherwise fail after the sweep, with a full disk. The source is not
    counted: it is already on its disk (--workdir)."""
    n = parameter_count(shape)
    need = n * bpw / 8 * 1.05 + (2 * n if staged else 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    if need > free:
        copy = f" + the dequantized float copy ({2 * n / 1e9:.0f} GB)" if staged else ""
        raise SystemExit(
            f"[scale] --output-dir {out_dir}: {free / 1e9:.0f} GB free, the convert needs ~{need / 1e9:.0f} GB "
            f"(the {bpw:g}-BPW output{copy}): choose a larger --output-dir"
        )


def build_source(shape: str, source: str, dst: Path, tokenizer_from: Path) -> Path:
    """A random-weight llama of `shape` at dst (bf16, or 4-bit g64 for --source q4), built and
    evaluated one block at a time so that only the stored model (plus one float block) is ever
    in memory. Written to a temporary directory and renamed: an interrupted build leaves none."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import save_config, save_model

    if (dst / "config.json").is_file():
        return dst
    t0 = time.perf_counter()
    config = dict(SHAPES[shape])
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))  # parameters are lazy until evaluated
    model.set_dtype(mx.bfloat16)
    if source == "q4":
        nn.quantize(model, group_size=64, bits=4)
        config["quantization"] = {"group_size": 64, "bits": 4}
    for block in [model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head]:
        mx.eval(block.parameters())
        mx.clear_cache()
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model)
    save_config(config, tmp / "config.json")
    for f in Path(tokenizer_from).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, tmp / f.name)
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    tmp.rename(dst)
    print(
        f"[scale] built {shape} ({source}): {n / 1e9:.2f}G stored values in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return dst


CONVERT = """
import json, sys, time
import mlx.core as mx
import mlx_lm_optiq
mlx_lm_optiq.enable()
from mlx_lm.convert import convert
src, out, bpw, extra = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
t0 = time.perf_counter()
convert(hf_path=src, mlx_path=out, quantize=True, optiq_target_bpw=bpw, **extra)
print(json.dumps({"convert_s": time.perf_counter() - t0, "peak_gib": mx.get_peak_memory() / 2**30,
                  "device": str(mx.default_device())}))
"""


def run_logged(cmd: list[str], log_path: Path, t0: float) -> list[tuple[float, str]]:
    """Run `cmd` (stdout and stderr together) and write every line or progress-bar update to
    log_path as it comes, prefixed with the seconds since t0; return the (seconds, line) list.
    Progress bars redraw with a carriage return, so those count as line ends too."""
    lines: list[tuple[float, str]] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        pending = b""
        while chunk := proc.stdout.read1(65536):
            *done, pending = re.split(rb"[\r\n]", pending + chunk)
            for raw in done:
                if raw.strip():
                    t, line = time.perf_counter() - t0, raw.decode(errors="replace").rstrip()
                    lines.append((t, line))
                    log.write(f"[+{t:7.1f}s] {line}\n")
            log.flush()
        if pending.strip():
            lines.append((time.perf_counter() - t0, pending.decode(errors="replace").rstrip()))
        proc.wait()
    if proc.returncode != 0:
        lines.append((time.perf_counter() - t0, f"exit {proc.returncode}"))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--source", choices=("bf16", "q4"), default="bf16", help="How the random source is stored.")
    p.add_argument("--bpw", type=float, default=4.5, help="--optiq-target-bpw of the convert.")
    p.add_argument(
        "--convert",
        default="{}",
        help='Extra convert keywords as JSON, e.g. \'{"optiq_reference": "low-bit"}\' (default: none, the backend defaults).',
    )
    p.add_argument("--tokenizer", default=str(SHARED / "models" / "smollm2-135m-instruct-q4-exact"))
    p.add_argument("--workdir", default="/tmp/optiq-weights-scale")
    p.add_argument(
        "--output-dir",
        default=None,
        help="Where the converted model and the convert's staging directory go, e.g. /dev/shm/... when the "
        "disk cannot hold the source and the output (the 70B q4 on a 64 GiB disk; default: --workdir).",
    )
    p.add_argument("--out", default=None, help="Write the result as JSON here.")
    p.add_argument("--build-only", action="store_true", help="Build the source in --workdir and stop.")
    p.add_argument(
        "--log",
        default=None,
        help="The convert's whole output (progress bars included), each line prefixed with the seconds since "
        "it started, written as it comes: a run stopped early still shows its rates (default: beside the output).",
    )
    args = p.parse_args(argv)
    try:
        extra = json.loads(args.convert)
    except json.JSONDecodeError as e:
        raise SystemExit(
            f'--convert: not JSON ({e}); expected a JSON object such as {{"optiq_reference": "low-bit"}}'
        ) from None
    if not isinstance(extra, dict):
        raise SystemExit("--convert: expected a JSON object of convert keywords")
    work = Path(args.workdir)
    src = build_source(args.shape, args.source, work / f"src-{args.shape}-{args.source}", Path(args.tokenizer))
    if args.build_only:
        return None
    out_dir = Path(args.output_dir) if args.output_dir else work
    out = out_dir / f"out-{args.shape}-{args.source}-{args.bpw:g}"
    shutil.rmtree(out, ignore_errors=True)
    check_space(args.shape, args.source, out_dir, args.bpw, stages_float_copy(args.shape, args.source, extra))
    cmd = [sys.executable, "-u", "-c", CONVERT, str(src), str(out), str(args.bpw), json.dumps(extra)]
    log_path = Path(args.log) if args.log else out.with_name(out.name + ".log")
    t0 = time.perf_counter()
    lines = run_logged(cmd, log_path, t0)
    wall = time.perf_counter() - t0
    info = [f"[+{t:.0f}s] {line}" for t, line in lines if line.startswith(("[INFO]", "[optiq]"))]
    print("\n".join(info))
    if not lines or not lines[-1][1].startswith("{"):
        print("\n".join(line for _, line in lines[-40:]), file=sys.stderr)
        raise SystemExit(f"[scale] convert failed (its whole output, timed: {log_path})")
    result = json.loads(lines[-1][1])
    result.update(shape=args.shape, source=args.source, bpw=args.bpw, convert=extra, wall_s=wall, log=info)
    print(
        f"[scale] {args.shape} ({args.source} source) -> {args.bpw:g} BPW: convert {result['convert_s']:.0f} s "
        f"(process {wall:.0f} s), peak {result['peak_gib']:.1f} GiB on {result['device']}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
