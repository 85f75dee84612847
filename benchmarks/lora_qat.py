"""QAT at each layer's own bits: does fuse + re-quantization to the plan keep the adapter's gain?

One mixed-precision plan (an optiq_metadata.json; default: the quickstart's Fisher plan of
SmolLM2-135M at 4.503 BPW, 3/4/5/6-bit, groups 32/64/128, `docs/results/quickstart-optiq_metadata.json`)
and three ways to train a LoRA adapter for it, same data, seeds, rank and initial draw:

  qlora  plain QLoRA: LoRA on the base quantized to the plan (simulated: quantize -> dequantize in
         fp32). "fused": stock `mlx_lm.fuse` on that quantized base re-quantizes each layer at its
         format, q(q(W) + ΔW), computed in memory (`QATLoRALinear` at eval is exactly that forward).
  float  LoRA on the float base, no QAT; then real stock `mlx_lm.fuse` (subprocess, optiq off) onto
         the float base and `mlx_lm_optiq.lora.qat.requantize` to the plan (RTN), loaded back with
         stock `mlx_lm.load`.
  qat    `--optiq-qat` (mlx_lm_optiq.lora.qat.apply_qat): LoRA on the float base trained through the
         round-to-nearest quantization of W + ΔW at each layer's format; then the same fuse +
         requantize + load as `float`.

For each: validation loss of the adapter as trained ("unfused") and of the fused, re-quantized model,
and the gap in %. The claim under test: with QAT the gap is ~0 (the training forward *is* the
re-quantized model); without it the re-quantization costs the adapter's gain. Validation: held-out
GSM-Symbolic templates (../shared/data/gsm_symbolic/valid.jsonl), teacher-forced loss.

`--compute simulated` (default) evaluates the re-quantized model dequantized into fp32 (CPU matmuls use
BLAS; the same numbers as the quantized kernels up to float rounding); `--compute quantized` runs the
real kernels (use on a GPU).

    python benchmarks/lora_qat.py --tiny                       # 4-layer model, seconds (a smoke run)
    python benchmarks/lora_qat.py --iters 150 --seeds 0        # CPU-sized (the docs/lora.md numbers)
    # GPU-sized (H200; meant to take a few minutes, not measured yet):
    python benchmarks/lora_qat.py --iters 400 --seeds 0,1,2 --num-layers -1 --batch-size 8 \\
        --max-seq-length 256 --train-examples 2000 --valid-examples 100 --compute quantized --out qat.json
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OPTIQ_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO))
CONFIGS = ("qlora", "float", "qat")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Source model (default: ../shared SmolLM2, full or --tiny).")
    p.add_argument("--tiny", action="store_true", help="The 4-layer SmolLM2 (smoke run in seconds).")
    p.add_argument("--float-path", default=None, help="Cached fp32 dequantization of --model (made if missing).")
    p.add_argument("--metadata", default=str(REPO / "docs" / "results" / "quickstart-optiq_metadata.json"))
    p.add_argument("--data", default=str(SHARED / "data" / "gsm_symbolic"))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--train-examples", type=int, default=400)
    p.add_argument("--valid-examples", type=int, default=32)
    p.add_argument("--compute", choices=("simulated", "quantized"), default="simulated")
    p.add_argument("--workdir", default=None, help="Keep adapters and models here (default: a temp dir, removed).")
    p.add_argument("--out", default=None, help="Write the results as JSON here.")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="Only print one table from these --out files (e.g. one process per seed, same settings).",
    )
    args = p.parse_args(argv)
    name = "smollm2-135m-instruct-4layer-q4-exact" if args.tiny else "smollm2-135m-instruct-q4-exact"
    args.model = args.model or str(SHARED / "models" / name)
    args.float_path = args.float_path or f"/tmp/optiq-bench/{name}-f32"
    if args.tiny:
        args.num_layers = min(args.num_layers, 4)
    bad = [c for c in args.configs.split(",") if c not in CONFIGS]
    if bad:
        p.error(f"--configs: unknown {bad}; expected some of {list(CONFIGS)}")
    return args


def stock_env():
    return {k: v for k, v in os.environ.items() if k != "MLX_LM_OPTIQ"}


def ensure_float(model, float_path):
    """The fp32 dequantization of the shared 4-bit checkpoint (the project's float reference)."""
    float_path = Path(float_path)
    if not (float_path / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", model, "-d", "--dtype", "float32"]
            + ["--mlx-path", str(float_path)],
            check=True,
            env=stock_env(),
            capture_output=True,
        )
    return float_path


def load_data(args, tokenizer, workdir):
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset

    sub = Path(workdir) / "data"
    sub.mkdir(exist_ok=True)
    for split, n in (("train", args.train_examples), ("valid", args.valid_examples)):
        lines = (Path(args.data) / f"{split}.jsonl").read_text().splitlines()[:n]
        (sub / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    ns = types.SimpleNamespace(data=str(sub), train=True, test=False, mask_prompt=False, hf_dataset=False)
    train, valid, _ = load_dataset(ns, tokenizer)
    return CacheDataset(train), CacheDataset(valid)


def val_loss(args, model, valid_set):
    from mlx_lm.tuner.trainer import evaluate

    return float(
        evaluate(
            model=model,
            dataset=valid_set,
            batch_size=args.batch_size,
            num_batches=-1,
            max_seq_length=args.max_seq_length,
        )
    )


def quantized_base(float_path, formats):
    """The float model with every planned module fake-quantized at its format (QLoRA's base, simulated)."""
    from mlx_lm.utils import load

    from mlx_lm_optiq.lora import qat

    model, _ = load(str(float_path))
    qat.apply_qat(model, formats)  # no LoRA layers yet: every planned module is fake-quantized
    return model


def train_adapter(args, model, train_set, valid_set, seed, adapter_dir):
    """Stock mlx-lm training of the LoRA layers already on `model`; saves adapters + stock config."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.utils import save_config

    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_config(
        {
            "fine_tune_type": "lora",
            "num_layers": args.num_layers,
            "lora_parameters": {"rank": args.rank, "scale": args.scale, "dropout": 0.0},
        },
        adapter_dir / "adapter_config.json",
    )
    np.random.seed(seed)
    mx.random.seed(seed)
    t0 = time.perf_counter()
    train(
        model=model,
        optimizer=optim.Adam(learning_rate=args.learning_rate),
        train_dataset=train_set,
        val_dataset=valid_set,
        args=TrainingArgs(
            batch_size=args.batch_size,
            iters=args.iters,
            val_batches=1,
            steps_per_report=max(1, args.iters // 4),
            steps_per_eval=10**9,
            steps_per_save=10**9,
            adapter_file=str(adapter_dir / "adapters.safetensors"),
            max_seq_length=args.max_seq_length,
        ),
    )
    return time.perf_counter() - t0


def add_lora(args, model, seed):
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    mx.random.seed(seed)  # the same initial lora_a in every config
    linear_to_lora_layers(model, args.num_layers, {"rank": args.rank, "scale": args.scale, "dropout": 0.0})


def fuse_and_requantize(args, float_path, adapter_dir, metadata, valid_set):
    """Real stock `mlx_lm.fuse` onto the float base, our RTN re-quantization to the plan, stock load."""
    from mlx_lm.utils import dequantize_model, load

    from mlx_lm_optiq.lora import qat

    fused, requantized = adapter_dir / "fused", adapter_dir / "requantized"
    subprocess.run(
        [sys.executable, "-m", "mlx_lm", "fuse", "--model", str(float_path), "--adapter-path", str(adapter_dir)]
        + ["--save-path", str(fused)],
        check=True,
        env=stock_env(),
        capture_output=True,
    )
    qat.requantize(fused, requantized, metadata, progress=False)
    shutil.rmtree(fused)
    model, _ = load(str(requantized))
    if args.compute == "simulated":
        model = dequantize_model(model)
    loss = val_loss(args, model, valid_set)
    shutil.rmtree(requantized)
    return loss


def run_config(args, config, seed, float_path, formats, metadata, train_set, valid_set, workdir):
    from mlx_lm.utils import load

    from mlx_lm_optiq.lora import qat

    adapter_dir = Path(workdir) / f"{config}-{seed}"
    if config == "qlora":
        model = quantized_base(float_path, formats)
    else:
        model, _ = load(str(float_path))
    add_lora(args, model, seed)
    if config == "qat":
        qat.apply_qat(model, formats)
    train_s = train_adapter(args, model, train_set, valid_set, seed, adapter_dir)
    unfused = val_loss(args, model, valid_set)
    if config == "qlora":
        # stock fuse on a quantized base: each adapted layer's q(W) + ΔW re-quantized at its own format
        adapted = {p for p, m in model.named_modules() if "lora_a" in m}
        qat.apply_qat(model, {p: f for p, f in formats.items() if p in adapted})
        fused = val_loss(args, model, valid_set)
    else:
        fused = fuse_and_requantize(args, float_path, adapter_dir, metadata, valid_set)
    return {
        "config": config,
        "seed": seed,
        "unfused_val_loss": unfused,
        "fused_requantized_val_loss": fused,
        "gap_pct": 100.0 * (fused - unfused) / unfused,
        "train_s": train_s,
    }


def merge(files):
    """One table from several --out files of the same settings (seeds or configs run as separate processes)."""
    loaded = [json.loads(Path(f).read_text()) for f in files]
    keys = [k for k in loaded[0]["args"] if k not in ("seeds", "configs", "out", "merge", "workdir")]
    for d in loaded[1:]:
        diff = [k for k in keys if d["args"].get(k) != loaded[0]["args"].get(k)]
        if diff:
            raise SystemExit(f"--merge: runs differ in {diff}; only runs with the same settings compare")
    runs = [r for d in loaded for r in d["runs"]]
    summary = dict(loaded[0], runs=runs)
    summary["args"] = dict(loaded[0]["args"], seeds=",".join(dict.fromkeys(str(r["seed"]) for r in runs)))
    print_table(summary)
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge)
    import mlx.core as mx
    from mlx_lm.utils import load, load_model

    from mlx_lm_optiq.lora import qat

    t_start = time.perf_counter()
    float_path = ensure_float(args.model, args.float_path)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="optiq-lora-qat-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bare, _ = load_model(float_path, lazy=True)
    formats, metadata = qat.plan_formats(bare, float_path, args.metadata)
    del bare
    model, tokenizer = load(str(float_path))
    train_set, valid_set = load_data(args, tokenizer, workdir)
    base = {"float": val_loss(args, model, valid_set)}
    base["quantized"] = val_loss(args, quantized_base(float_path, formats), valid_set)
    del model
    print(f"device: {mx.default_device()}; plan: {metadata}; base losses {base}", flush=True)
    results = []
    for seed in map(int, args.seeds.split(",")):
        for config in args.configs.split(","):
            r = run_config(args, config, seed, float_path, formats, metadata, train_set, valid_set, workdir)
            print(
                f"[bench] {config:5s} seed {seed}: unfused {r['unfused_val_loss']:.4f}  fused+requantized "
                f"{r['fused_requantized_val_loss']:.4f}  gap {r['gap_pct']:+.2f}%  (train {r['train_s']:.0f}s)",
                flush=True,
            )
            results.append(r)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        "args": vars(args),
        "device": str(mx.default_device()),
        "plan": _plan_label(formats, metadata),
        "base_val_loss": base,
        "runs": results,
        "total_s": time.perf_counter() - t_start,
    }
    print_table(summary)
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


def _plan_label(formats, metadata):
    counts = {}
    for fmt in formats.values():
        key = f"{fmt['bits']}-bit" if fmt else "float"
        counts[key] = counts.get(key, 0) + 1
    return f"{Path(metadata).name}: " + ", ".join(f"{n}x {k}" for k, n in sorted(counts.items()))


def print_table(summary):
    a, runs = summary["args"], summary["runs"]

    def stats(values):
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return mean, sd

    print()
    print(
        f"{Path(a['model']).name} ({summary['device']}, compute {a['compute']}), plan {summary['plan']}; "
        f"LoRA rank {a['rank']} scale {a['scale']} on {a['num_layers']} layers, {a['iters']} iters x batch "
        f"{a['batch_size']} x {a['max_seq_length']} tokens, lr {a['learning_rate']}, seeds {a['seeds']}; "
        f"validation: {a['valid_examples']} GSM-Symbolic examples (held-out templates)"
    )
    base = summary["base_val_loss"]
    print(f"no adapter: float {base['float']:.4f}, quantized to the plan {base['quantized']:.4f}")
    print()
    print("| training | unfused val loss | fused + re-quantized | gap (mean ± sd) | per seed gap |")
    print("|---|---|---|---|---|")
    labels = {
        "qlora": "QLoRA on the quantized base (stock fuse re-quantizes)",
        "float": "LoRA on float, no QAT",
        "qat": "LoRA on float, `--optiq-qat`",
    }
    for config in dict.fromkeys(r["config"] for r in runs):
        rs = [r for r in runs if r["config"] == config]
        u, f, g = (stats([r[k] for r in rs]) for k in ("unfused_val_loss", "fused_requantized_val_loss", "gap_pct"))
        print(
            f"| {labels[config]} | {u[0]:.4f} ± {u[1]:.4f} | {f[0]:.4f} ± {f[1]:.4f} | {g[0]:+.2f}% ± {g[1]:.2f} | "
            + ", ".join(f"{r['gap_pct']:+.2f}%" for r in rs)
            + " |"
        )


if __name__ == "__main__":
    main()
