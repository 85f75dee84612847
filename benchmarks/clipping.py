"""Quantizer experiment: stock min/max groups vs clipped group ranges, same bits per module.

    python benchmarks/clipping.py --float out/quickstart/float \
        --table docs/results/weights-h200-32x512.json --target 5.0071

The quantizer alone, on a fixed plan: what choosing each group's range by a clipping search
buys (the product's clipping.py; convert clips by default, `--optiq-clipping none` does not).
The plan comes from a saved sensitivity table (`benchmarks/weights.py --output` JSON, key
table_exact, or an optiq_metadata.json) at --target BPW, or is uniform (--uniform 4:64). For
every affine linear layer each group's [min, max] is shrunk by the alpha in {1, 0.975, ...,
0.7} with the least error, then the clipped weight is quantized by mx.quantize as stock would:
  - mse: error = sum (w - q)^2 (clipping.Clipper with unit moments)
  - activation: error = sum E[x^2] (w - q)^2, with E[x^2] the layer's input second moments
    on --calibration-text (AWQ's clipping criterion; what convert does)
The embedding keeps the stock quantization. All three models are evaluated side by side
against the float model on held-out text (simulated quantization, fp32).
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--float", required=True, help="float model directory (e.g. mlx_lm.convert -d output)")
    p.add_argument("--table", help="benchmarks/weights.py JSON (table_exact) or optiq_metadata.json")
    p.add_argument("--target", type=float, help="BPW of the plan made from --table")
    p.add_argument("--uniform", help="instead of a plan: one candidate for every module, e.g. 4:64")
    p.add_argument("--calibration-text", default=str(SHARED / "data" / "text" / "persuasion.txt"))
    p.add_argument("--eval-text", default=str(SHARED / "data" / "text" / "emma.txt"))
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--output", help="write the numbers as JSON here")
    args = p.parse_args(argv)
    if (args.uniform is None) == (args.table is None):
        raise SystemExit("give either --table with --target, or --uniform")

    import mlx.core as mx

    from mlx_lm_optiq import quality
    from mlx_lm_optiq.core.formats import candidate_key, parse_candidates
    from mlx_lm_optiq.core.model_tree import load_float_model, quantizable_modules
    from mlx_lm_optiq.weights import clipping, plan
    from mlx_lm_optiq.weights.probes import qdq

    if args.uniform:
        cand = parse_candidates(args.uniform)[0]
        choice = lambda path: cand  # noqa: E731
        what = f"uniform {args.uniform}"
    else:
        if args.target is None:
            raise SystemExit("--table needs --target")
        data = json.loads(Path(args.table).read_text())
        table = data.get("table_exact") or data.get("sensitivity")
        if table is None:
            raise SystemExit(f"{args.table}: no 'table_exact' (weights.py JSON) or 'sensitivity' (sidecar) field")
        cands = parse_candidates([candidate_key(**c) for c in table["candidates"]])
        float_model, config = load_float_model(args.float)
        layers = plan.plan_for_model(float_model, config, table, cands, args.target)["layers"]
        del float_model
        choice = layers.__getitem__
        what = f"plan at {args.target} BPW from {args.table}"

    reference, tokenizer, _ = quality.load_reference(args.float)
    calib = quality.text_tokens(tokenizer, args.calibration_text, args.calibration_tokens, 256)
    eval_tokens = quality.text_tokens(tokenizer, args.eval_text, args.eval_tokens, 512)
    models = {}
    clippers = None
    for name in ("stock min/max", "mse clipping", "activation clipping"):
        model, _, _ = quality.load_reference(args.float)
        modules = quantizable_modules(model)
        if clippers is None:
            moments = clipping.input_moments(model, list(modules), calib)
            clippers = {
                "mse clipping": clipping.Clipper({p: mx.ones_like(m) for p, m in moments.items()}),
                "activation clipping": clipping.Clipper(moments),
            }
        for path, module in modules.items():
            c = choice(path)
            if "group_size" not in c:  # a module the plan keeps in float
                continue
            w = module.weight
            if name in clippers:
                w = clippers[name](path, w, c)
            module.weight = qdq(w, c).astype(module.weight.dtype)
        mx.eval(model.parameters())
        models[name] = model
        print(f"built: {name}", flush=True)
    results = quality.evaluate(reference, models, eval_tokens, progress=False)
    base = results["stock min/max"]["kl"]
    print(
        f"\n{what}; moments from {calib.size} tokens of {Path(args.calibration_text).name}; "
        f"evaluated on {eval_tokens.size} tokens of {Path(args.eval_text).name}"
    )
    print(f"{'quantizer':<22} {'KLD':>9} {'top-1':>7} {'PPL':>8} {'KLD vs stock':>13}")
    for name in models:
        r = results[name]
        print(f"{name:<22} {r['kl']:>9.5f} {r['top1']:>7.4f} {r['ppl']:>8.3f} {r['kl'] / base:>12.3f}x")
    if args.output:
        Path(args.output).write_text(json.dumps({"setup": what, "results": results}, indent=1))


if __name__ == "__main__":
    main()
