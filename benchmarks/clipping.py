"""Quantizer experiment: stock min/max groups vs clipped group ranges, same bits per module.

    python benchmarks/clipping.py --float out/quickstart/float \
        --table docs/results/weights-h200-32x512.json --target 5.0071

Not a product path (yet): it measures what choosing each group's range by a clipping search
would buy on top of a mixed-precision plan. The plan comes from a saved sensitivity table
(`benchmarks/weights.py --output` JSON, key table_exact, or an optiq_metadata.json) at --target
BPW, or is uniform (--uniform 4:64). For every quantizable linear layer each group's
[min, max] is shrunk by a factor alpha in {1, 0.975, ..., 0.7}, the alpha with the least error
kept, then the clipped weight is quantized by mx.quantize as stock would:
  - mse: error = sum (w - q)^2
  - activation: error = sum E[x^2] (w - q)^2, with E[x^2] the layer's input second moments
    on --calibration-text (AWQ's clipping criterion)
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
GRID = tuple(1 - 0.025 * i for i in range(13))


def input_moments(model, modules, tokens):
    """{path: mean x^2 over calibration tokens} of the input of every nn.Linear in `modules`."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_lm_optiq.sensitivity import _set_module

    class Recorder(nn.Module):
        def __init__(self, linear, store, path):
            super().__init__()
            self.linear = linear
            object.__setattr__(self, "_at", (store, path))

        def __call__(self, x):
            store, path = self._at
            store[path] = store.get(path, 0) + (x.astype(mx.float32) ** 2).reshape(-1, x.shape[-1]).sum(0)
            return self.linear(x)

    store = {}
    linears = {p: m for p, m in modules.items() if isinstance(m, nn.Linear)}
    for p, m in linears.items():
        _set_module(model, p, Recorder(m, store, p))
    try:
        for i in range(tokens.shape[0]):
            mx.eval(model(tokens[i : i + 1]), list(store.values()))
    finally:
        for p, m in linears.items():
            _set_module(model, p, m)
    return {p: v / tokens.size for p, v in store.items()}


def clipped_qdq(w, cand, weights=None):
    """Quantize-dequantize of `w` with each group's range clipped by the best alpha of GRID."""
    import mlx.core as mx

    from mlx_lm_optiq.sensitivity import _qdq

    g = cand["group_size"]
    groups = w.astype(mx.float32).reshape(-1, g)
    if weights is None:
        weights = mx.ones((w.shape[-1],))
    wg = mx.broadcast_to(weights.reshape(1, -1, g), (w.shape[0], w.shape[-1] // g, g)).reshape(-1, g)
    lo, hi = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
    best_err = best_alpha = None
    for alpha in GRID:
        err = (wg * (_qdq(mx.clip(groups, lo * alpha, hi * alpha), cand) - groups) ** 2).sum(-1)
        if best_err is None:
            best_err, best_alpha = err, mx.full(err.shape, alpha)
        else:
            better = err < best_err
            best_err, best_alpha = mx.where(better, err, best_err), mx.where(better, alpha, best_alpha)
        mx.eval(best_err, best_alpha)
    a = best_alpha[:, None]
    return _qdq(mx.clip(groups, lo * a, hi * a), cand).reshape(w.shape).astype(w.dtype)


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

    from mlx_lm_optiq import eval as ev
    from mlx_lm_optiq import plan
    from mlx_lm_optiq.sensitivity import _qdq, quantizable_modules

    if args.uniform:
        cand = plan.parse_candidates(args.uniform, "--uniform")[0]
        choice = lambda path: cand  # noqa: E731
        what = f"uniform {args.uniform}"
    else:
        if args.target is None:
            raise SystemExit("--table needs --target")
        data = json.loads(Path(args.table).read_text())
        table = data.get("table_exact") or data.get("sensitivity")
        if table is None:
            raise SystemExit(f"{args.table}: no 'table_exact' (weights.py JSON) or 'sensitivity' (sidecar) field")
        cands = plan.parse_candidates([plan.candidate_key(**c) for c in table["candidates"]])
        float_model, config = plan.load_float_model(args.float)
        layers = plan.make_plan(float_model, config, table, cands, args.target)["layers"]
        del float_model
        choice = layers.__getitem__
        what = f"plan at {args.target} BPW from {args.table}"

    reference, tokenizer, _ = ev.load_reference(args.float)
    calib = ev.text_tokens(tokenizer, args.calibration_text, args.calibration_tokens, 256)
    eval_tokens = ev.text_tokens(tokenizer, args.eval_text, args.eval_tokens, 512)
    models = {}
    moments = None
    for name in ("stock min/max", "mse clipping", "activation clipping"):
        model, _, _ = ev.load_reference(args.float)
        modules = quantizable_modules(model)
        if moments is None:
            moments = input_moments(model, modules, calib)
        for path, module in modules.items():
            c = choice(path)
            if "group_size" not in c:  # a module the plan keeps in float
                continue
            if name == "stock min/max" or path not in moments:
                module.weight = _qdq(module.weight, c).astype(module.weight.dtype)
            else:
                module.weight = clipped_qdq(module.weight, c, moments[path] if name.startswith("activation") else None)
        mx.eval(model.parameters())
        models[name] = model
        print(f"built: {name}", flush=True)
    results = ev.evaluate(reference, models, eval_tokens, progress=False)
    base = results["stock min/max"]["kl"]
    print(f"\n{what}; moments from {calib.size} tokens of {Path(args.calibration_text).name}; "
          f"evaluated on {eval_tokens.size} tokens of {Path(args.eval_text).name}")
    print(f"{'quantizer':<22} {'KLD':>9} {'top-1':>7} {'PPL':>8} {'KLD vs stock':>13}")
    for name in models:
        r = results[name]
        print(f"{name:<22} {r['kl']:>9.5f} {r['top1']:>7.4f} {r['ppl']:>8.3f} {r['kl'] / base:>12.3f}x")
    if args.output:
        Path(args.output).write_text(json.dumps({"setup": what, "results": results}, indent=1))


if __name__ == "__main__":
    main()
