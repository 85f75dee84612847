"""Rank scaling benchmark: constant vs by_bits vs by_kl LoRA at the same parameter budget.

Same data, same seeds, same number of trainable LoRA parameters (within one rank step);
only the distribution of rank over the layers changes. Reports the validation loss after
--iters steps (mean +- sd over --seeds) and its ratio to constant rank, side by side in one run.

Base model: SmolLM2-135M dequantized from its 4-bit original (fp32), then quantized per layer
(simulated: quantize -> dequantize, so CPU matmuls stay fast) with the bits of the sidecar --
QLoRA on a mixed-precision model. The sidecar's bits come from --metadata (an optiq convert's
optiq_metadata.json) or, without it, from stock mlx-lm's `mixed_4_6` recipe, with per-layer KLs
measured here (each linear layer alone at 4-bit g64, calibration text: Emma).
Training uses mlx-lm's own pieces: linear_to_lora_layers, tuner.trainer.train/evaluate.

    python benchmarks/lora.py                      # defaults: full SmolLM2, CPU-sized run
    python benchmarks/lora.py --iters 200 --num-layers -1 --max-seq-length 256   # GPU-sized
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OPTIQ_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models" / "smollm2-135m-instruct-q4-exact"))
    p.add_argument(
        "--float-path",
        default="/tmp/optiq-bench/smollm2-f32",
        help="Where the dequantized fp32 reference is cached (made if missing).",
    )
    p.add_argument("--metadata", default=None, help="optiq_metadata.json with per-layer bits (and kl).")
    p.add_argument("--data", default=str(SHARED / "data" / "gsm_symbolic"))
    p.add_argument("--calibration", default=str(SHARED / "data" / "text" / "emma.txt"))
    p.add_argument("--kl-tokens", type=int, default=64)
    p.add_argument("--modes", default="constant,by_bits,by_kl")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--train-examples", type=int, default=400)
    p.add_argument("--valid-examples", type=int, default=32)
    p.add_argument("--out", default=None, help="Write the results as JSON here.")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="Only print the table of these --out files (one process per mode, same settings).",
    )
    return p.parse_args()


def ensure_float(model, float_path):
    float_path = Path(float_path)
    if not (float_path / "config.json").is_file():
        env = {k: v for k, v in os.environ.items() if k != "MLX_LM_OPTIQ"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mlx_lm",
                "convert",
                "--hf-path",
                model,
                "-d",
                "--dtype",
                "float32",
                "--mlx-path",
                str(float_path),
            ],
            check=True,
            env=env,
            capture_output=True,
        )
    return float_path


def make_metadata(float_path, calibration_text, kl_tokens, out_file):
    """bits from stock mlx-lm's mixed_4_6 recipe; KL of each linear layer alone at 4:64 (measured)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import load
    from tqdm import tqdm

    from mlx_lm_optiq.core.jsonio import write_json

    model, tokenizer = load(str(float_path))
    recipe = mixed_quant_predicate_builder("mixed_4_6", model, 64)
    ids = mx.array(tokenizer.encode(calibration_text)[:kl_tokens])[None]
    ref = nn.log_softmax(model(ids).astype(mx.float32), axis=-1)
    p_ref = mx.exp(ref)
    layers = {}
    linears = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    for path, module in tqdm(linears, desc="KL per layer"):
        choice = recipe(path, module)
        bits = choice["bits"] if isinstance(choice, dict) else 4
        w = module.weight
        module.weight = mx.dequantize(*mx.quantize(w, 64, 4), group_size=64, bits=4)
        kl = (p_ref * (ref - nn.log_softmax(model(ids).astype(mx.float32), axis=-1))).sum(-1).mean().item()
        module.weight = w
        layers[path] = {"bits": bits, "group_size": 64, "mode": "affine", "num_params": int(w.size), "kl": {"4:64": kl}}
    write_json(
        out_file,
        {"base_model": str(float_path), "method": "exact", "reference": "float", "layers": layers},
        kind="optiq-metadata",
    )
    return out_file


def simulate_quantization(model, layers):
    """Replace each linear weight by its quantize->dequantize at the sidecar's bits (fp32 compute)."""
    import mlx.core as mx
    import mlx.nn as nn

    for path, module in model.named_modules():
        entry = layers.get(path)
        if isinstance(module, nn.Linear) and entry and entry["bits"] < 16:
            g, b = entry.get("group_size", 64), entry["bits"]
            module.weight = mx.dequantize(*mx.quantize(module.weight, g, b), group_size=g, bits=b)
    mx.eval(model.parameters())


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


def run_one(args, float_path, metadata_path, layers, mode, seed, workdir):
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from mlx_lm_optiq.lora import adapter_files
    from mlx_lm_optiq.lora.config import LoraTrainingConfig
    from mlx_lm_optiq.lora.pipeline import apply_rank_plan, plan_ranks

    model, tokenizer = load(str(float_path))
    simulate_quantization(model, layers)
    train_set, valid_set = load_data(args, tokenizer, workdir)
    np.random.seed(seed)
    mx.random.seed(seed)
    model.freeze()
    lora_parameters = {"rank": args.rank, "scale": 20.0, "dropout": 0.0}
    linear_to_lora_layers(model, args.num_layers, lora_parameters)
    adapter_dir = Path(workdir) / f"{mode}-{seed}"
    config = LoraTrainingConfig(rank_scaling=mode, metadata=metadata_path)
    plan = plan_ranks(config, model, args.rank, float_path)
    mx.random.seed(seed)  # same init stream for every mode
    apply_rank_plan(model, plan, lora_parameters, use_dora=False, adapter_path=adapter_dir, base_model=float_path)
    record = adapter_files.read_record(adapter_dir)
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
    train_s = time.perf_counter() - t0
    val = evaluate(
        model=model, dataset=valid_set, batch_size=args.batch_size, num_batches=-1, max_seq_length=args.max_seq_length
    )
    return {
        "mode": mode,
        "seed": seed,
        "val_loss": float(val),
        "train_s": train_s,
        "trainable_params": record["trainable_params"],
        "budget_params": record["budget_params"],
        "ranks": sorted({m["rank"] for m in record["modules"].values()}),
    }


def base_val_loss(args, float_path, layers, workdir):
    from mlx_lm.tuner.trainer import evaluate
    from mlx_lm.utils import load

    model, tokenizer = load(str(float_path))
    simulate_quantization(model, layers)
    _, valid_set = load_data(args, tokenizer, workdir)
    return float(
        evaluate(
            model=model,
            dataset=valid_set,
            batch_size=args.batch_size,
            num_batches=-1,
            max_seq_length=args.max_seq_length,
        )
    )


def main():
    args = parse_args()
    if args.merge:
        return merge(args.merge)
    import mlx.core as mx

    from mlx_lm_optiq.weights.metadata import read_metadata

    float_path = ensure_float(args.model, args.float_path)
    workdir = Path(tempfile.mkdtemp(prefix="optiq-lora-bench-"))
    metadata_path = args.metadata or make_metadata(
        float_path, Path(args.calibration).read_text()[20000:60000], args.kl_tokens, workdir / "optiq_metadata.json"
    )
    layers = read_metadata(metadata_path)["layers"]
    print(f"device: {mx.default_device()}; sidecar: {metadata_path}")
    base = base_val_loss(args, float_path, layers, workdir)
    results = []
    for mode in args.modes.split(","):
        for seed in map(int, args.seeds.split(",")):
            r = run_one(args, float_path, metadata_path, layers, mode, seed, workdir)
            print(
                f"[bench] {mode:9s} seed {seed}: val loss {r['val_loss']:.4f} "
                f"({r['trainable_params']} params, train {r['train_s']:.0f}s)",
                flush=True,
            )
            results.append(r)

    print_table(vars(args), base, results)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "base_val_loss": base, "runs": results}, indent=2))


def print_table(a, base, results):
    modes = list(dict.fromkeys(r["mode"] for r in results))

    def stats(mode):
        vals = [r["val_loss"] for r in results if r["mode"] == mode]
        mean = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        return mean, sd, vals

    const_mean = stats("constant")[0] if "constant" in modes else None
    print()
    print(
        f"SmolLM2-135M, QLoRA on {_base_label(a)}, rank budget {a['rank']}, num_layers {a['num_layers']}, "
        f"{a['iters']} iters x batch {a['batch_size']} x {a['max_seq_length']} tokens, lr {a['learning_rate']}, "
        f"seeds {a['seeds']}; validation: {a['valid_examples']} GSM-Symbolic examples (held-out templates)"
    )
    print(f"validation loss before training (no adapter): {base:.4f}")
    print()
    print("| rank scaling | trainable params | ranks used | val loss (mean ± sd) | vs constant | per seed |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        mean, sd, vals = stats(mode)
        one = next(r for r in results if r["mode"] == mode)
        ratio = f"{mean / const_mean:.4f}x" if const_mean else "-"
        print(
            f"| {mode} | {one['trainable_params']:,} (budget {one['budget_params']:,}) | "
            f"{min(one['ranks'])}-{max(one['ranks'])} | {mean:.4f} ± {sd:.4f} | {ratio} | "
            + ", ".join(f"{v:.4f}" for v in vals)
            + " |"
        )


def _base_label(a):
    """What the simulated QLoRA base was quantized with: the sidecar's bits, or mlx-lm's mixed_4_6."""
    if not a.get("metadata"):
        return "simulated mlx-lm mixed_4_6 (4/6-bit g64)"
    try:
        layers = json.loads(Path(a["metadata"]).read_text())["layers"]
    except (OSError, ValueError, KeyError):
        return f"simulated bits of {a['metadata']}"
    linear = [e["bits"] for p, e in layers.items() if "embed" not in p and "lm_head" not in p]
    counts = ", ".join(f"{linear.count(b)}x {b}-bit" for b in sorted(set(linear)))
    return f"simulated bits of {Path(a['metadata']).name} (linear layers: {counts})"


def merge(files):
    """Print one table from several --out files of the same settings (modes run as separate processes)."""
    loaded = [json.loads(Path(f).read_text()) for f in files]
    keys = [k for k in loaded[0]["args"] if k not in ("modes", "out", "merge")]
    for d in loaded[1:]:
        diff = [k for k in keys if d["args"].get(k) != loaded[0]["args"].get(k)]
        if diff:
            raise SystemExit(f"--merge: runs differ in {diff}; only runs with the same settings compare")
    print_table(loaded[0]["args"], loaded[0]["base_val_loss"], [r for d in loaded for r in d["runs"]])


if __name__ == "__main__":
    main()
