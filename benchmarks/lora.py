"""LoRA rank scaling and LoftQ init on bases our convert wrote (issue 15, item 1).

QLoRA on mixed-precision SmolLM2 bases written by our `mlx_lm.convert --optiq-target-bpw` (one
sensitivity sweep, planned at every --bpw; exact sweep on a GPU, fisher on the CPU: the backend
defaults). Each base is the real quantized model (quantized matmuls), its optiq_metadata.json
records the source model, so every module's quantization residual R = W - Q is exact (against the
weights as written, GPTQ and clipping included). Modes, at the same LoRA parameter budget:

    constant          stock mlx-lm LoRA (linear_to_lora_layers; no optiq code touches the run)
    constant+loftq    constant rank, A/B from the truncated SVD of R (PEFT's LoftQ idea, 1 step)
    by_bits           rank proportional to the layer's bits
    by_residual       greedy on sensitivity-weighted residual singular values
    by_residual+loftq both

per --ranks budget and --seeds seed, trained on ../shared/data/gsm_symbolic train (mlx-lm's
trainer, prompt masked, mlx_lm.lora's learning rate), validated on all of the held-out-template
validation file every --steps-per-eval steps and scored at the best step (its adapter restored):
validation loss and exact-answer accuracy (greedy batch_generate, the last number of the answer
against raw_valid.jsonl's). Mean +- sd and per-seed values, ratios vs constant, step-0 and
final-step losses, training/validation curves, JSON output.

    python benchmarks/lora.py --tiny                                  # CPU smoke test, 4-layer model
    python benchmarks/lora.py --jobs 12 --compute simulated           # GPU (H200): full SmolLM2, both budgets
    python benchmarks/lora.py --bpw 3.5 --out a.json; python benchmarks/lora.py --bpw 4.5 --out b.json
    python benchmarks/lora.py --merge a.json b.json  # one table from several runs

Training runs are separate processes (`--worker`), --jobs at a time: a 135M model leaves an H200
mostly idle. Results are kept in --workdir and reused, so an interrupted run resumes.
"""

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OPTIQ_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO))

MODES = ("constant", "constant+loftq", "by_bits", "by_residual", "by_residual+loftq")
# GPU defaults: ~1 epoch of train.jsonl (1705 examples) per run, validation loss on all 295
# held-out examples; exact answers on 128 prompts (a 135M model solves ~0-2%: 295 prompts took
# 50-90 s of a ~175 s run on the H200 and told nothing more)
GPU = {
    "iters": 200,
    "steps_per_eval": 50,
    "batch_size": 8,
    "valid_examples": 295,
    "accuracy_examples": 128,
    "max_tokens": 256,
}
TINY = {
    "model": str(SHARED / "models" / "smollm2-135m-instruct-4layer-q4-exact"),
    "bpw": [4.5, 3.5],
    "ranks": [4],
    "seeds": [0],
    "iters": 3,
    "steps_per_eval": 1,
    "batch_size": 2,
    "max_seq_length": 256,  # GSM prompts are ~100-200 tokens: shorter leaves no completion token to score
    "valid_examples": 4,
    "accuracy_examples": 2,
    "max_tokens": 8,
    "train_examples": 64,
    "num_samples": 4,
    "sequence_length": 128,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 4-layer model, a few steps (defaults above).")
    p.add_argument("--model", default=str(SHARED / "models" / "smollm2-135m-instruct-q4-exact"))
    p.add_argument("--bpw", type=float, nargs="+", default=[4.5, 3.5], help="Target BPW of each base.")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16], help="Rank budgets (constant-rank r).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-layers", type=int, default=-1, help="LoRA on the last N blocks (-1: all).")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-seq-length", type=int, default=1024, help="Longest GSM example is < 600 tokens.")
    p.add_argument(
        "--learning-rate",
        type=float,
        default=1e-5,
        help="mlx_lm.lora's default (the stock anchor as users run it); 2e-4 overfit GSM's train templates in 200 steps",
    )
    p.add_argument(
        "--steps-per-eval",
        type=int,
        default=None,
        help="Validation loss every N steps (all of valid); runs are scored at their best step. Default 50 (tiny: 1).",
    )
    p.add_argument("--scale", type=float, default=20.0, help="lora_parameters.scale (mlx-lm's default 20).")
    p.add_argument("--train-examples", type=int, default=None, help="Default: all of train.jsonl.")
    p.add_argument("--valid-examples", type=int, default=None, help="Validation-loss examples (valid.jsonl).")
    p.add_argument("--accuracy-examples", type=int, default=None, help="Exact-answer prompts (raw_valid.jsonl).")
    p.add_argument("--max-tokens", type=int, default=None, help="Generation length for the exact answer.")
    p.add_argument("--num-samples", type=int, default=None, help="Convert's calibration sequences (its default).")
    p.add_argument("--sequence-length", type=int, default=None, help="Convert's calibration length (its default).")
    p.add_argument("--jobs", type=int, default=1, help="Training processes at a time.")
    p.add_argument(
        "--compute",
        choices=("quantized", "simulated"),
        default="quantized",
        help="quantized: the base's quantized kernels (QLoRA as users run it); simulated: the base "
        "dequantized to float layers holding Q(W) (same values; for backends whose kernels fail)",
    )
    p.add_argument(
        "--workdir", default=None, help="Bases, caches and per-run results (default /tmp/optiq-lora-bench[-tiny])."
    )
    p.add_argument("--data", default=str(SHARED / "data" / "gsm_symbolic"))
    p.add_argument("--out", default=None, help="Write all results as JSON here.")
    p.add_argument("--merge", nargs="+", default=None, help="Only print the table of these --out files.")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        given = {a.dest for a in p._actions if hasattr(args, a.dest) and a.default != getattr(args, a.dest)}
        for k, v in TINY.items():
            if k not in given or getattr(args, k) is None:
                setattr(args, k, v)
    for k, v in GPU.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.workdir = Path(args.workdir or ("/tmp/optiq-lora-bench-tiny" if args.tiny else "/tmp/optiq-lora-bench"))
    return args


# ---------------------------------------------------------------- preparation (parent process)


def convert_base(args, bpw, sensitivity=None):
    """Our convert at `bpw` (the Python API of mlx_lm.convert with the optiq hooks), in a subprocess."""
    out = args.workdir / f"base-{bpw:g}"
    if (out / "optiq_metadata.json").is_file():
        return out
    kwargs = {"optiq_target_bpw": bpw}
    if sensitivity is not None:
        kwargs["optiq_sensitivity"] = str(sensitivity)  # one sweep, planned at every budget
    else:
        # The 16 default candidates, pinned: below 3.7 BPW the product's default adds 2-bit ones
        # (since 2026-12-03), and the bases of docs/lora.md's runs were planned without them.
        from mlx_lm_optiq.weights.config import DEFAULT_CANDIDATES

        kwargs["optiq_candidates"] = DEFAULT_CANDIDATES
    if args.num_samples and sensitivity is None:  # measuring settings: the first base only
        kwargs["optiq_num_samples"] = args.num_samples
    if args.sequence_length and sensitivity is None:
        kwargs["optiq_sequence_length"] = args.sequence_length
    code = (
        "import mlx_lm_optiq, json, sys; mlx_lm_optiq.enable()\n"
        "from mlx_lm.convert import convert\n"
        f"convert(hf_path={args.model!r}, mlx_path={str(out)!r}, quantize=True, **json.loads(sys.argv[1]))\n"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], check=True, cwd=REPO)
    print(f"[bench] base {bpw} BPW written in {time.perf_counter() - t0:.0f} s: {out}", flush=True)
    return out


def lora_paths(base, num_layers):
    """The module paths stock linear_to_lora_layers adapts on `base` (same for every run)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from mlx_lm_optiq.lora import adapter_files

    model, _ = load(str(base), lazy=True)
    model.freeze()
    linear_to_lora_layers(model, num_layers, {"rank": 1, "scale": 1.0, "dropout": 0.0})
    return model, list(adapter_files.lora_modules(model))


def residual_cache(args, base, k):
    """Top-k residual SVD of every adapted module of `base`, once (npz), for every run on it."""
    import numpy as np

    from mlx_lm_optiq.lora import residual
    from mlx_lm_optiq.weights.metadata import read_metadata

    cache = base / f"residuals-k{k}-n{args.num_layers}.npz"
    if cache.is_file():
        return cache
    t0 = time.perf_counter()
    model, paths = lora_paths(base, args.num_layers)
    source = residual.float_source(base, None, read_metadata(base))
    res = residual.compute_residuals(model, paths, source, k)
    arrays = {}
    for p, r in res.items():
        arrays.update({f"{p}|sigma": r.sigma, f"{p}|u": r.u, f"{p}|vt": r.vt, f"{p}|rest": np.array(r.rest)})
    np.savez(cache, **arrays)
    print(f"[bench] residuals of {len(paths)} modules (top {k}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return cache


def load_residuals(cache, k):
    import numpy as np

    from mlx_lm_optiq.lora.residual import Residual

    data = np.load(cache)
    paths = sorted({key.split("|")[0] for key in data.files})
    out = {}
    for p in paths:
        sigma, u, vt = data[f"{p}|sigma"], data[f"{p}|u"], data[f"{p}|vt"]
        rest = float(data[f"{p}|rest"]) + float((sigma[k:] ** 2).sum())
        out[p] = Residual(sigma=sigma[:k], u=u[:, :k], vt=vt[:k], rest=rest)
    return out


def prepare_data(args):
    """train/valid subsets (prompt/completion JSONL) and the exact-answer prompts with their answers."""
    src, out = Path(args.data), args.workdir / "data"
    out.mkdir(parents=True, exist_ok=True)
    train = (src / "train.jsonl").read_text().splitlines()
    valid = (src / "valid.jsonl").read_text().splitlines()
    raw = [json.loads(line) for line in (src / "raw_valid.jsonl").read_text().splitlines()]
    if args.train_examples:
        train = train[: args.train_examples]
    (out / "train.jsonl").write_text("\n".join(train) + "\n")
    (out / "valid.jsonl").write_text("\n".join(valid[: args.valid_examples]) + "\n")
    rows = [json.loads(line) for line in valid]
    if len(rows) != len(raw) or any(r["prompt"] != q["question"] for r, q in zip(rows, raw)):
        raise SystemExit(f"{src}: valid.jsonl and raw_valid.jsonl are not the same questions in the same order")
    answers = [{"question": q["question"], "answer": q["answer"]} for q in raw[: args.accuracy_examples]]
    (out / "answers.json").write_text(json.dumps(answers))
    return out


# ---------------------------------------------------------------- one run (worker process)


def final_number(text):
    """The answer a completion gives: the number after '####' (the data's format), else its last number."""
    tail = text.split("####", 1)[1] if "####" in text else text
    nums = re.findall(r"-?\d[\d,]*\.?\d*", tail)
    if not nums:
        return None
    pick = nums[0] if "####" in text else nums[-1]
    try:
        return float(pick.replace(",", "").rstrip("."))
    except ValueError:
        return None


def exact_accuracy(model, tokenizer, answers, max_tokens, batch=128):
    from mlx_lm.generate import batch_generate

    correct = 0
    for i in range(0, len(answers), batch):
        chunk = answers[i : i + batch]
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": a["question"]}], add_generation_prompt=True, return_dict=False
            )
            for a in chunk
        ]
        texts = batch_generate(
            model, tokenizer, prompts, max_tokens=max_tokens, completion_batch_size=batch, prefill_batch_size=32
        ).texts
        for a, t in zip(chunk, texts):
            got, want = final_number(t), final_number(a["answer"])
            correct += got is not None and want is not None and abs(got - want) < 1e-6
    return correct / max(1, len(answers))


def run_worker(job_file):
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from mlx_lm_optiq.lora import adapter_files
    from mlx_lm_optiq.lora.config import LoraTrainingConfig
    from mlx_lm_optiq.lora.pipeline import apply_rank_plan, plan_ranks

    job = json.loads(Path(job_file).read_text())
    a = types.SimpleNamespace(**job["args"])
    if mx.default_device() == mx.gpu:
        # --jobs processes share one GPU and each MLX allocator caches freed buffers up to the
        # whole device: without a cap the first generation after training ran out of memory
        mx.set_cache_limit(2 << 30)
    t_start = time.perf_counter()
    model, tokenizer = load(job["base"])
    if getattr(a, "compute", "quantized") == "simulated":
        # the base's quantized layers as float layers holding exactly Q(W): the same function as
        # the quantized kernels up to rounding, and it runs where they do not (MLX-CUDA 0.32.4
        # failed on these mixed formats at batch 8 x 1024: cuGraphAddKernelNode invalid argument)
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
    ns = types.SimpleNamespace(data=job["data"], train=True, test=False, mask_prompt=True, hf_dataset=False)
    train_set, valid_set, _ = load_dataset(ns, tokenizer)
    train_set, valid_set = CacheDataset(train_set), CacheDataset(valid_set)
    answers = json.loads((Path(job["data"]) / "answers.json").read_text())
    mode, rank, seed = job["mode"], job["rank"], job["seed"]
    result = {k: job[k] for k in ("bpw", "mode", "rank", "seed")}
    np.random.seed(seed)
    mx.random.seed(seed)
    model.freeze()
    if mode != "none":
        lora_parameters = {"rank": rank, "scale": a.scale, "dropout": 0.0}
        linear_to_lora_layers(model, a.num_layers, lora_parameters)  # stock: the constant anchor as is
        adapter_dir = Path(job["result"]).with_suffix("")
        adapter_dir.mkdir(parents=True, exist_ok=True)
        if mode != "constant":
            scaling, _, init = mode.partition("+")
            config = LoraTrainingConfig(rank_scaling=scaling, lora_init=init or None)
            k = max(job["k"], rank)
            residuals = load_residuals(job["residuals"], k) if scaling == "by_residual" or init else None
            plan = plan_ranks(config, model, rank, job["base"], progress=False, residuals=residuals)
            mx.random.seed(seed)
            apply_rank_plan(
                model, plan, lora_parameters, use_dora=False, adapter_path=adapter_dir, base_model=job["base"]
            )
            record = adapter_files.read_record(adapter_dir)
            result["trainable_params"], result["budget_params"] = record["trainable_params"], record["budget_params"]
            result["ranks"] = sorted({m["rank"] for m in record["modules"].values()})
            captured = [
                (m["residual_energy"], m["residual_captured"])
                for m in record["modules"].values()
                if "residual_energy" in m
            ]
            if captured:
                result["residual_captured"] = sum(e * c for e, c in captured) / sum(e for e, _ in captured)
        else:
            dims = [adapter_files.module_dims(m) for m in adapter_files.lora_modules(model).values()]
            result["trainable_params"] = result["budget_params"] = rank * sum(i + o for i, o in dims)
            result["ranks"] = [rank]
        best = {}

        class Curves(TrainingCallback):
            """Training and validation curves into the result, and the best validation checkpoint.

            GSM-Symbolic's validation templates are not in train: after about one epoch at a high
            learning rate the adapter has memorized train's templates (train loss 0.1) and the
            held-out loss is far above the untrained base's (docs/lora.md), so runs are compared at
            their best validation step (early stopping), the final step reported beside it."""

            def on_train_loss_report(self, info):
                result.setdefault("train_curve", []).append([info["iteration"], round(info["train_loss"], 4)])

            def on_val_loss_report(self, info):
                loss = float(info["val_loss"])
                result.setdefault("val_curve", []).append([info["iteration"], round(loss, 4)])
                if not best or loss < best["loss"]:
                    params = dict(tree_flatten(model.trainable_parameters()))  # immutable arrays: a snapshot
                    best.update(loss=loss, step=info["iteration"], params=params)

        t0 = time.perf_counter()
        train(
            model=model,
            training_callback=Curves(),
            optimizer=optim.Adam(learning_rate=a.learning_rate),
            train_dataset=train_set,
            val_dataset=valid_set,  # all of it, before the first step and every --steps-per-eval
            args=TrainingArgs(
                batch_size=a.batch_size,
                iters=a.iters,
                val_batches=-1,
                steps_per_report=max(1, a.iters // 10),
                steps_per_eval=a.steps_per_eval,
                steps_per_save=10**9,
                adapter_file=str(adapter_dir / "adapters.safetensors"),
                max_seq_length=a.max_seq_length,
            ),
        )
        result["train_s"] = time.perf_counter() - t0
        result["val_loss_init"] = result["val_curve"][0][1]
    model.eval()
    mx.clear_cache()
    result["val_loss"] = float(
        evaluate(model, valid_set, a.batch_size, num_batches=-1, max_seq_length=a.max_seq_length)
    )
    if mode != "none":
        result["val_loss_final"] = result["val_loss"]
        result["val_curve"].append([a.iters, round(result["val_loss"], 4)])
        result["best_step"] = a.iters
        if best["loss"] < result["val_loss"]:  # back to the best checkpoint for the scores below
            model.update(tree_unflatten(list(best["params"].items())))
            result["val_loss"], result["best_step"] = best["loss"], best["step"]
    t0 = time.perf_counter()
    result["accuracy"] = exact_accuracy(model, tokenizer, answers, a.max_tokens)
    result["generate_s"] = time.perf_counter() - t0
    result["total_s"] = time.perf_counter() - t_start
    result["device"] = str(mx.default_device())
    Path(job["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------- orchestration


def main():
    args = parse_args()
    if args.worker:
        return run_worker(args.worker)
    if args.merge:
        loaded = [json.loads(Path(f).read_text()) for f in args.merge]
        return print_tables(loaded[0]["args"], [r for d in loaded for r in d["runs"]])
    import mlx.core as mx

    t_all = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"[bench] device {mx.default_device()}; workdir {args.workdir}", flush=True)
    data = prepare_data(args)
    k = 4 * max(args.ranks)  # by_residual's rank cap (4x the budget rank) at the largest budget
    needs_residuals = any(m.startswith("by_residual") or "loftq" in m for m in args.modes)
    # One sweep (the first base), then every other base re-planned from it; each base's residuals
    # are computed while the next base is written, and its runs start as soon as it is ready.
    first = convert_base(args, args.bpw[0])
    svd_lock = threading.Lock()  # residual SVDs run in this process: one at a time

    def prepare(bpw):
        base = first if bpw == args.bpw[0] else convert_base(args, bpw, first / "optiq_metadata.json")
        if not needs_residuals:
            return base, None
        with svd_lock:
            return base, residual_cache(args, base, k)

    prep = ThreadPoolExecutor(max_workers=2)
    ready = {bpw: prep.submit(prepare, bpw) for bpw in args.bpw}
    runs_dir = args.workdir / "runs"
    runs_dir.mkdir(exist_ok=True)
    jobs = []  # in --ranks order (the first budget completes first), each base's no-adapter run first
    for r in args.ranks:
        for bpw in args.bpw:
            jobs += [("none", 0, 0, bpw)] if r == args.ranks[0] else []
            jobs += [(m, r, s, bpw) for m in args.modes for s in args.seeds]
    keep = {k: v for k, v in vars(args).items() if k not in ("workdir", "merge", "worker", "out")}
    run_settings = {k: v for k, v in keep.items() if k not in ("bpw", "modes", "ranks", "seeds", "jobs")}
    settings = hashlib.sha1(json.dumps(run_settings, sort_keys=True).encode()).hexdigest()[:8]

    def launch(job):
        mode, rank, seed, bpw = job
        base, cache = ready[bpw].result()
        name = f"{bpw:g}-{mode}-r{rank}-s{seed}-{settings}"  # a result is reused only at the same settings
        result = runs_dir / f"{name}.json"
        if result.is_file():
            return json.loads(result.read_text())
        spec = {
            "args": keep,
            "base": str(base),
            "data": str(data),
            "mode": mode,
            "rank": rank,
            "seed": seed,
            "bpw": bpw,
            "k": k,
            "residuals": str(cache) if cache else None,
            "result": str(result),
        }
        job_file = runs_dir / f"{name}.job.json"
        job_file.write_text(json.dumps(spec))
        log = runs_dir / f"{name}.log"
        with open(log, "w") as f:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", str(job_file)], stdout=f, stderr=subprocess.STDOUT, cwd=REPO
            )
        if proc.returncode != 0:
            print(f"[bench] {name} FAILED (exit {proc.returncode}); log: {log}\n" + log.read_text()[-2000:], flush=True)
            return None
        return json.loads(result.read_text())

    results, t0, done = [], time.perf_counter(), 0
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for r in pool.map(launch, jobs):
            done += 1
            if r is None:
                continue
            results.append(r)
            elapsed = time.perf_counter() - t0
            print(
                f"[bench] {done}/{len(jobs)} {r['bpw']:g} BPW {r['mode']:18s} r{r['rank']:<2} seed {r['seed']}: "
                f"val loss {r['val_loss']:.4f}, accuracy {r['accuracy']:.3f} ({r['total_s']:.0f} s); "
                f"estimated {elapsed / done * (len(jobs) - done):.0f} s left at this pace",
                flush=True,
            )
    payload = {"args": {**keep, "workdir": str(args.workdir)}, "runs": results, "wall_s": time.perf_counter() - t_all}
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2))
    print_tables(payload["args"], results)
    print(f"\n[bench] total {payload['wall_s']:.0f} s")


def _stats(vals):
    mean = statistics.fmean(vals)
    return mean, (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def print_tables(a, results):
    """One markdown table per base: every mode and rank budget, ratios vs constant side by side."""
    bpws = sorted({r["bpw"] for r in results}, reverse=True)
    print(
        f"\nSmolLM2-135M ({Path(a['model']).name}), QLoRA on our convert's bases; {a['iters']} iters x batch "
        f"{a['batch_size']} (max {a['max_seq_length']} tokens, prompt masked), lr {a['learning_rate']}, scale "
        f"{a['scale']}, num_layers {a['num_layers']}, seeds {a['seeds']}; validation: {a['valid_examples']} "
        f"held-out-template GSM-Symbolic examples (loss), {a['accuracy_examples']} prompts (exact answer, greedy, "
        f"{a['max_tokens']} tokens); base compute: {a.get('compute', 'quantized')}"
    )
    for bpw in bpws:
        here = [r for r in results if r["bpw"] == bpw]
        base = next((r for r in here if r["mode"] == "none"), None)
        print(
            f"\n### base {bpw:g} BPW"
            + (f" (no adapter: val loss {base['val_loss']:.4f}, accuracy {base['accuracy']:.3f})" if base else "")
        )
        print(
            "\n| rank | mode | params (budget) | ranks | step-0 val loss | val loss mean ± sd | vs constant | at step | final-step val loss "
            "| accuracy mean ± sd | Δ vs constant | per seed (loss / acc) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for rank in sorted({r["rank"] for r in here if r["mode"] != "none"}):
            modes = [m for m in MODES if any(r["mode"] == m and r["rank"] == rank for r in here)]
            const = [r for r in here if r["rank"] == rank and r["mode"] == "constant"]
            c_loss = _stats([r["val_loss"] for r in const])[0] if const else None
            c_acc = _stats([r["accuracy"] for r in const])[0] if const else None
            for mode in modes:
                rs = sorted((r for r in here if r["rank"] == rank and r["mode"] == mode), key=lambda r: r["seed"])
                lm, ls = _stats([r["val_loss"] for r in rs])
                am, asd = _stats([r["accuracy"] for r in rs])
                ratio = f"{lm / c_loss:.4f}x" if c_loss else "-"
                # runs before early stopping (no val_curve) were scored at their last step
                init = "{:.4f}".format(_stats([r["val_loss_init"] for r in rs])[0])
                steps = ",".join(str(r.get("best_step", a["iters"])) for r in rs)
                final = "{:.4f}".format(_stats([r.get("val_loss_final", r["val_loss"]) for r in rs])[0])
                delta = f"{100 * (am - c_acc):+.1f} pt" if c_acc is not None else "-"
                print(
                    f"| {rank} | {mode} | {rs[0]['trainable_params']:,} ({rs[0]['budget_params']:,}) | "
                    f"{min(rs[0]['ranks'])}-{max(rs[0]['ranks'])} | {init} | {lm:.4f} ± {ls:.4f} | {ratio} | {steps} | "
                    f"{final} | {am:.3f} ± {asd:.3f} | {delta} | "
                    + ", ".join(f"{r['val_loss']:.4f}/{r['accuracy']:.3f}" for r in rs)
                    + " |"
                )


if __name__ == "__main__":
    main()
