"""Mixed-precision weights benchmark: ours vs uniform 4-bit, mlx-lm mixed_4_6 and dynamic_quant.

    python benchmarks/weights.py [--model ../shared/models/smollm2-135m-instruct-q4-exact]

One run, side by side: every configuration is built from the same float model
(the model's dequantization: stock convert's float source), quantized with stock
`quantize_model`, its true bits per weight taken from `compute_bits_per_weight`,
then evaluated against the float model on held-out text (calibrate on one Austen
novel, evaluate on another). Evaluation uses simulated quantization: each
quantized model is dequantized into fp32 (same weights as the real kernels use).
Ours clips group ranges by activation-weighted error (convert's default; in the sweep and
the written model alike); "ours (exact, stock ranges)" is planned from a second exact sweep
without clipping, to show what the clipping adds. Sweep wall times: our exact sweep and
Fisher estimate, and a naive sweep (a full forward per module and candidate) timed on a
subset of modules and extrapolated.

    python benchmarks/weights.py --timing-only [--timing-blocks 0,10,20,29] [--bits 4,8 --groups 64]

times only the sweeps, side by side in one run, on every module of the named blocks of
the real model: naive (full forward per probe, reference computed once per batch), ours
exact with block replay only (one forward per probe, as before probe stacking), ours exact
with stacked probes, ours exact at the device default, and ours fisher (all modules).
"""

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"


def _ints(spec):
    """ "4,8" -> [4, 8]."""
    return [int(v) for v in str(spec).split(",") if v.strip()]


def _calibration_jsonl(text_path, dst, chunk_chars=4000):
    """The calibration novel as {"text": ...} records of about `chunk_chars` characters."""
    text = Path(text_path).read_text()
    with open(dst, "w") as f:
        for i in range(0, len(text), chunk_chars):
            f.write(json.dumps({"text": text[i : i + chunk_chars]}) + "\n")
    return dst


def _timed_sweep(measure, **kw):
    """(table, wall seconds, per-probe seconds) of one measure_sensitivity call."""
    stamps = []
    t0 = time.perf_counter()
    table = (
        measure(on_probe=lambda b, p: stamps.append(time.perf_counter()), **kw)
        if kw.get("method") == "exact"
        else measure(**kw)
    )
    wall = time.perf_counter() - t0
    # intervals between finished (batch, module) probes; the first one also holds the reference pass
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return table, wall, (statistics.median(gaps) if gaps else None), len(stamps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(SHARED / "models" / "smollm2-135m-instruct-q4-exact"))
    p.add_argument("--calibration-text", default=str(SHARED / "data" / "text" / "persuasion.txt"))
    p.add_argument("--eval-text", default=str(SHARED / "data" / "text" / "emma.txt"))
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--sequence-length", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-sequence-length", type=int, default=512)
    p.add_argument("--bits", default="3,4,5,6,8", help="our candidate bits")
    p.add_argument("--groups", default="32,64,128", help="our candidate group sizes")
    p.add_argument(
        "--extra-candidates",
        default="nvfp4:16",
        help="our candidates in mlx's other formats ('' for none); 'ours (exact, affine only)' plans "
        "without them from the same sweep",
    )
    p.add_argument("--naive-modules", type=int, default=6, help="modules timed with the naive sweep")
    p.add_argument(
        "--clipping",
        choices=("activation", "none"),
        default="activation",
        help="group ranges of our sweeps and models (convert's --optiq-clipping)",
    )
    p.add_argument(
        "--skip-stock-ranges",
        action="store_true",
        help="with --clipping activation: skip the extra exact sweep behind 'ours (exact, stock ranges)'",
    )
    p.add_argument("--output", help="write all numbers as JSON here")
    p.add_argument("--report", help="only print the tables of a previous run's --output JSON")
    p.add_argument("--timing-only", action="store_true", help="only time the sensitivity sweeps (see above)")
    p.add_argument("--timing-blocks", default="0,10,20,29", help="--timing-only: blocks whose modules are timed")
    args = p.parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return
    if args.timing_only:
        data = timing(args)
        print(timing_report(data))
        if args.output:
            Path(args.output).write_text(json.dumps(data, indent=1))
        return

    import mlx.core as mx
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
    from mlx_lm.utils import compute_bits_per_weight, dequantize_model, load, quantize_model

    from mlx_lm_optiq import quality
    from mlx_lm_optiq.core import calibration
    from mlx_lm_optiq.core.formats import candidate_key, make_candidates, parse_candidates, top_level_quantization
    from mlx_lm_optiq.core.model_tree import quantizable_modules
    from mlx_lm_optiq.weights import clipping, plan, sweep

    device = str(mx.default_device())
    print(f"device {device}, mlx {mx.__version__}, {platform.machine()}", flush=True)
    t_start = time.perf_counter()
    qmodel, tokenizer, config = load(args.model, return_config=True, lazy=True)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    base = dequantize_model(qmodel)  # the float source stock convert quantizes (fp16 here)
    mx.eval(base.parameters())
    reference = quality.float32_model(copy.deepcopy(base))

    tmp = Path(tempfile.mkdtemp(prefix="optiq-bench-"))
    calib = calibration.load_calibration(
        tokenizer,
        _calibration_jsonl(args.calibration_text, tmp / "calib.jsonl"),
        num_samples=args.num_samples,
        sequence_length=args.sequence_length,
    )
    eval_tokens = quality.text_tokens(tokenizer, args.eval_text, args.eval_tokens, args.eval_sequence_length)

    # --- sensitivity sweeps -------------------------------------------------
    affine = make_candidates(_ints(args.bits), _ints(args.groups))
    extra = parse_candidates(args.extra_candidates) if args.extra_candidates else []
    cands = parse_candidates(affine + extra)
    common = dict(
        model_path=args.model, tokens=calib, candidates=cands, reference="float", progress=False, clipping=args.clipping
    )
    # Untimed warm-up: the backend builds its kernels once per process (MLX-CUDA JIT-compiles
    # them: ~15 s on the H200), which neither the timed sweeps below nor the naive one should pay.
    sweep.measure_sensitivity(
        **dict(common, tokens=calib[:1]), method="exact", modules=list(quantizable_modules(base))[1:3]
    )
    table_exact, t_exact, probe_exact, n_probes = _timed_sweep(sweep.measure_sensitivity, method="exact", **common)
    table_stock_ranges = None
    if args.clipping != "none" and not args.skip_stock_ranges:
        table_stock_ranges = sweep.measure_sensitivity(**dict(common, clipping="none"), method="exact")
    table_fisher, t_fisher, _, _ = _timed_sweep(sweep.measure_sensitivity, method="fisher", **common)
    paths = list(table_exact["modules"])
    step = max(1, len(paths) // args.naive_modules)
    subset = paths[::step][: args.naive_modules]
    table_naive, t_naive_sub, probe_naive, n_naive = _timed_sweep(
        sweep.measure_sensitivity, method="exact", modules=subset, reuse_hidden_states=False, **common
    )
    if probe_naive is None:
        raise SystemExit("--naive-modules: time at least 2 modules (or 2 batches) so a per-probe time exists")
    # extrapolate: median seconds per (batch, module) probe x every (batch, module) of the full sweep
    t_naive = probe_naive * n_probes
    # the issue's naive sweep has none of reference reuse, hidden-state reuse and sample
    # batching: one sample per forward (its reference is still computed once per sample)
    _, _, probe_naive1, _ = _timed_sweep(
        sweep.measure_sensitivity, method="exact", modules=subset, reuse_hidden_states=False, batch_size=1, **common
    )
    t_naive1 = probe_naive1 * len(paths) * calib.shape[0]
    agree = max(
        abs(table_naive["modules"][m]["kl"][k] - table_exact["modules"][m]["kl"][k])
        / max(table_exact["modules"][m]["kl"][k], 1e-12)
        for m in subset
        for k in table_naive["modules"][m]["kl"]
    )
    print(
        f"sweeps: exact {t_exact:.1f}s, fisher {t_fisher:.1f}s, naive {t_naive:.1f}s (extrapolated from "
        f"{len(subset)} modules, {probe_naive:.3f}s/probe x {n_probes} probes); "
        f"naive vs exact KL max rel diff {agree:.2e}",
        flush=True,
    )

    # --- configurations ------------------------------------------------------
    results = {}

    def build(name, group_size, bits, predicate=None, target=None, layers=None, mode="affine"):
        model = copy.deepcopy(base)
        model, _ = quantize_model(model, copy.deepcopy(config), group_size, bits, mode=mode, quant_predicate=predicate)
        if layers is not None:
            plan.check_quantized(model, layers)
        bpw = compute_bits_per_weight(model)
        if target is not None and bpw > target + 1e-12:
            raise RuntimeError(f"{name}: {bpw} bits per weight exceeds its target {target}")
        sim = quality.float32_model(model)
        r = quality.evaluate(reference, {name: sim}, eval_tokens, progress=False)
        results[name] = dict(r[name], bpw=bpw, target=target)
        results["reference"] = r["reference"]
        print(
            f"  {name:<34} bpw {bpw:.4f}  KL {r[name]['kl']:.5f}  top-1 {r[name]['top1']:.4f}  "
            f"PPL {r[name]['ppl']:.3f}",
            flush=True,
        )
        del sim, model

    print("configurations (simulated quantization, fp32 compute):", flush=True)
    build("uniform 4-bit g64", 64, 4)
    build("uniform 4-bit g32", 32, 4)
    build("mlx-lm mixed_4_6", 64, 4, mixed_quant_predicate_builder("mixed_4_6", base, 64))
    for c in extra:  # stock mlx-lm offers these too (`-q --q-mode nvfp4`): a baseline at their size
        build(f"uniform {candidate_key(**c)}", c["group_size"], c["bits"], mode=c["mode"])
    targets = {
        "uniform 4-bit g64": results["uniform 4-bit g64"]["bpw"],
        "mlx-lm mixed_4_6": results["mlx-lm mixed_4_6"]["bpw"],
        "uniform 4-bit g32": results["uniform 4-bit g32"]["bpw"],
    }

    # mlx-lm dynamic_quant: its gradient sensitivities and threshold search (CLI defaults 4:64 low, 5:64 high)
    t0 = time.perf_counter()
    dq_sens = dict(estimate_sensitivities(copy.deepcopy(reference), calib, 4, 64, 5, 64))
    t_dynamic = time.perf_counter() - t0
    for at, target in targets.items():
        threshold = estimate_threshold(base, dq_sens, target, 4, 64, 5, 64)

        def dq_predicate(p, m, threshold=threshold):
            if not hasattr(m, "to_quantized"):
                return False
            return {"bits": 5, "group_size": 64} if dq_sens[p] > threshold else True

        # its threshold search may overshoot the target a little: recorded as measured, not enforced
        build(f"mlx-lm dynamic_quant @ {at}", 64, 4, dq_predicate)
        results[f"mlx-lm dynamic_quant @ {at}"]["target"] = target
        runs = [("exact", table_exact, cands), ("fisher", table_fisher, cands)]
        if extra:
            runs.append(("exact, affine only", table_exact, affine))
        if table_stock_ranges is not None:
            runs.append(("exact, stock ranges", table_stock_ranges, cands))
        for method, table, options in runs:
            pl = plan.plan_for_model(base, config, table, options, target)
            gs, bits, mode = top_level_quantization(options)
            build(
                f"ours ({method}) @ {at}",
                gs,
                bits,
                plan.quant_predicate(pl["layers"], clipping.from_table(table)),
                target,
                pl["layers"],
                mode,
            )

    data = {
        "results": results,
        "sweeps": {
            "exact_s": t_exact,
            "fisher_s": t_fisher,
            "naive_extrapolated_s": t_naive,
            "naive1_extrapolated_s": t_naive1,
            "naive1_probe_s": probe_naive1,
            "num_samples": int(calib.shape[0]),
            "naive_subset": subset,
            "naive_probe_s": probe_naive,
            "exact_probe_s": probe_exact,
            "probes": n_probes,
            "naive_vs_exact_max_rel_diff": agree,
            "dynamic_quant_s": t_dynamic,
        },
        "setup": {
            "model": args.model,
            "num_modules": len(paths),
            "candidates": [candidate_key(**c) for c in cands],
            "clipping": args.clipping,
            "calibration": f"{calib.shape[0]}x{calib.shape[1]} tokens of {Path(args.calibration_text).name}",
            "evaluation": f"{eval_tokens.size} tokens of {Path(args.eval_text).name}",
            "device": device,
            "total_s": time.perf_counter() - t_start,
        },
        "device": device,
        "table_exact": table_exact,
        "table_fisher": table_fisher,
        "table_exact_stock_ranges": table_stock_ranges,
    }
    print()
    print(report(data))
    if args.output:
        Path(args.output).write_text(json.dumps(data, indent=1))


def timing(args):
    """Sweep timings only, on every module of `--timing-blocks`, in one process."""
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    from mlx_lm_optiq.core import calibration
    from mlx_lm_optiq.core.formats import candidate_key, make_candidates
    from mlx_lm_optiq.core.model_tree import load_float_model, quantizable_modules
    from mlx_lm_optiq.weights import sweep

    device = str(mx.default_device())
    tokenizer = load_tokenizer(Path(args.model))
    tmp = Path(tempfile.mkdtemp(prefix="optiq-bench-"))
    calib = calibration.load_calibration(
        tokenizer,
        _calibration_jsonl(args.calibration_text, tmp / "calib.jsonl"),
        num_samples=args.num_samples,
        sequence_length=args.sequence_length,
    )
    cands = make_candidates(_ints(args.bits), _ints(args.groups))
    blocks = _ints(args.timing_blocks)
    lazy = load_float_model(args.model)[0]
    num_blocks = len(lazy.layers)
    if max(blocks) >= num_blocks:
        raise SystemExit(f"--timing-blocks: the model has blocks 0..{num_blocks - 1}, got {blocks}")
    modules = [m for m in quantizable_modules(lazy) if any(m.startswith(f"model.layers.{b}.") for b in blocks)]
    del lazy
    common = dict(model_path=args.model, tokens=calib, candidates=cands, reference="float", progress=False)
    # The issue's three speed-ups over a naive sweep are reference reuse, hidden-state reuse and
    # batching samples; "naive, one sample per forward" has none but the first (its reference is
    # still computed once per sample, not once per probe), "naive" also batches samples.
    runs = [
        (
            "naive1",
            "naive, one sample per forward",
            dict(method="exact", modules=modules, reuse_hidden_states=False, batch_probes=False, batch_size=1),
        ),
        (
            "naive",
            "naive: full forward per probe (reference once per batch)",
            dict(method="exact", modules=modules, reuse_hidden_states=False, batch_probes=False),
        ),
        (
            "replay",
            "ours exact, block replay only (before stacking)",
            dict(method="exact", modules=modules, batch_probes=False),
        ),
        ("stacked", "ours exact, replay + stacked probes", dict(method="exact", modules=modules, batch_probes=True)),
        ("fisher", "ours fisher (all modules, whole model)", dict(method="fisher")),
    ]
    rows, tables = {}, {}
    for name, label, kw in runs:
        t0, c0 = time.perf_counter(), time.process_time()
        tables[name] = sweep.measure_sensitivity(**common, **kw)
        rows[name] = dict(
            label=label,
            wall_s=time.perf_counter() - t0,
            cpu_s=time.process_time() - c0,
            probes_per_pass=tables[name].get("probes_per_pass"),
        )
        print(f"  {label}: {rows[name]['wall_s']:.1f}s wall, {rows[name]['cpu_s']:.1f}s CPU", flush=True)
    for name in ("naive1", "replay", "stacked"):
        rows[name]["max_rel_diff_vs_naive"] = max(
            abs(tables[name]["modules"][m]["kl"][k] - v) / max(v, 1e-12)
            for m in modules
            for k, v in tables["naive"]["modules"][m]["kl"].items()
        )
        rows[name]["max_abs_diff_vs_naive_per_token"] = max(
            abs(tables[name]["modules"][m]["kl"][k] - v)
            for m in modules
            for k, v in tables["naive"]["modules"][m]["kl"].items()
        )
    return {
        "rows": rows,
        "device": device,
        "model": args.model,
        "num_blocks": num_blocks,
        "blocks": blocks,
        "modules": len(modules),
        "candidates": [candidate_key(**c) for c in cands],
        "calibration": f"{calib.shape[0]}x{calib.shape[1]} tokens of {Path(args.calibration_text).name}",
        "mlx": mx.__version__,
    }


def timing_report(data):
    rows = data["rows"]
    naive = rows["naive"]
    naive1 = rows.get("naive1")  # absent in runs before this row existed
    lines = [
        f"{'sensitivity sweep':<54} {'wall s':>8} {'CPU s':>8} {'naive/this (wall)':>18} {'(CPU)':>7}"
        + (f" {'naive-1-sample/this (wall)':>27}" if naive1 else "")
    ]
    for r in rows.values():
        lines.append(
            f"{r['label']:<54} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} "
            f"{naive['wall_s'] / r['wall_s']:>17.2f}x {naive['cpu_s'] / r['cpu_s']:>6.2f}x"
            + (f" {naive1['wall_s'] / r['wall_s']:>26.2f}x" if naive1 else "")
        )
    lines.append(
        f"timed: every module of blocks {data['blocks']} of {data['num_blocks']} ({data['modules']} modules) "
        f"x candidates {data['candidates']}, calibration {data['calibration']}, float reference, "
        f"device {data['device']}, mlx {data['mlx']}; each exact run's wall time includes loading the "
        "model and the reference pass; fisher covers every module of the model"
    )
    for name in [n for n in ("naive1", "replay", "stacked") if n in rows]:
        r = rows[name]
        lines.append(
            f"{name} vs naive KL: max rel diff {r['max_rel_diff_vs_naive']:.1e}, max abs diff "
            f"{r['max_abs_diff_vs_naive_per_token']:.1e} nats/token; probes per pass {r['probes_per_pass']}"
        )
    lines.append("caveat: the float reference was dequantized from a 4-bit original (GGUF Q4_1).")
    return "\n".join(lines)


# A baseline is compared with ours when it uses at least our bits per weight but
# is at the same operating point (at most this much more).
SAME_POINT_BPW = 0.05


def report(data):
    """The side-by-side tables of one run (also re-rendered from its JSON with --report)."""
    results, sw = data["results"], data["sweeps"]
    ref = results["reference"]
    baselines = [n for n in results if n != "reference" and not n.startswith("ours")]
    # the issue's baselines are affine; "uniform nvfp4:16" and the like are extra (a second column)
    issue_baselines = [n for n in baselines if not n.startswith("uniform") or "-bit" in n]
    extra = len(issue_baselines) < len(baselines)
    lines = [
        f"{'configuration':<44} {'BPW':>7} {'KLD':>9} {'top-1':>7} {'PPL':>8} {'ΔPPL':>8} {'KLD/best':>9}"
        + (f" {'KLD/best (all)':>15}" if extra else ""),
        f"{'float reference':<44} {'':>7} {'':>9} {'':>7} {ref['ppl']:>8.3f}",
    ]

    def ratio(r, names):
        # conservative: a baseline that landed slightly below our BPW (dynamic_quant's threshold
        # search does) still counts as the same point
        rivals = [results[b]["kl"] for b in names if abs(results[b]["bpw"] - r["bpw"]) <= SAME_POINT_BPW]
        return f"{r['kl'] / min(rivals):.3f}" if rivals else ""

    for name, r in results.items():
        if name == "reference":
            continue
        ours = name.startswith("ours")
        lines.append(
            f"{name:<44} {r['bpw']:>7.4f} {r['kl']:>9.5f} {r['top1']:>7.4f} {r['ppl']:>8.3f} "
            f"{r['ppl'] - ref['ppl']:>+8.3f} {ratio(r, issue_baselines) if ours else '':>9}"
            + (f" {ratio(r, baselines) if ours else '':>15}" if extra else "")
        )
    lines.append(
        f"KLD/best: our KLD / the lowest KLD of the issue's baselines (uniform 4-bit g64/g32, mixed_4_6, "
        f"dynamic_quant) with BPW within ±{SAME_POINT_BPW} of ours"
        + ("; (all): also counting the uniform float-format baselines" if extra else "")
    )
    naive = sw["naive_extrapolated_s"]
    naive1 = sw.get("naive1_extrapolated_s")  # absent in runs before this row existed
    sweep_rows = [
        ("naive, one sample per forward (extrapolated)", naive1),
        ("naive, samples batched (extrapolated)", naive),
        ("ours exact (replay; stacked probes off-CPU)", sw["exact_s"]),
        ("ours fisher", sw["fisher_s"]),
        ("mlx-lm dynamic_quant sensitivities (2 options)", sw["dynamic_quant_s"]),
    ]
    lines += [
        "",
        f"{'sensitivity sweep (all modules, all candidates)':<48} {'seconds':>9} {'naive/this':>11}"
        + (f" {'naive-1-sample/this':>20}" if naive1 else ""),
    ]
    for label, t in sweep_rows:
        if t is None:
            continue
        lines.append(f"{label:<48} {t:>9.1f} {naive / t:>10.1f}x" + (f" {naive1 / t:>19.1f}x" if naive1 else ""))
    lines += [
        f"naive: {sw['naive_probe_s']:.3f}s per (module, batch) probe on {len(sw['naive_subset'])} modules x "
        f"{sw['probes']} probes; its KL equals the exact sweep's (max rel diff "
        f"{sw['naive_vs_exact_max_rel_diff']:.1e}); ours exact/fisher: total wall time incl. loading"
    ]
    if naive1:
        lines.append(
            f"naive, one sample per forward: {sw['naive1_probe_s']:.3f}s per (module, sample) probe x "
            f"{data['setup']['num_modules']} modules x {sw['num_samples']} samples"
        )
    st = data.get("setup")
    if st:
        lines.append(
            f"model {st['model']} ({st['num_modules']} quantizable modules); candidates {st['candidates']}; "
            f"our group ranges: {st.get('clipping', 'none (stock min/max)')}; "
            f"calibration {st['calibration']}; evaluation {st['evaluation']}; device {st['device']}; "
            f"simulated quantization (dequantized to fp32); total {st['total_s']:.0f}s"
        )
    lines.append(
        "caveat: the float reference was dequantized from a 4-bit original (GGUF Q4_1), so absolute losses "
        "differ from the original bf16 model; the comparisons between configurations are real measurements."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
