"""Quality of quantized models against their float reference on held-out text.

    python -m mlx_lm_optiq.quality --model Q [--model Q2 ...] --reference F --text FILE

prints, per model: perplexity, ΔPPL vs the reference, mean KL(reference || model)
per token, top-1 agreement and bits per weight (as mlx-lm counts it).
`--compute quantized` runs the real quantized kernels; `--compute simulated`
dequantizes every quantized layer into an fp32 model first (the same numbers up
to float rounding, and fast with BLAS on CPU); `auto` uses real kernels on a GPU
or for small inputs and says which it used.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core import model_tree
from mlx_lm_optiq.core.errors import OptiqError, user_errors
from mlx_lm_optiq.core.jsonio import write_json
from mlx_lm_optiq.weights.metadata import METADATA_FILE, calibration_source

EVAL_KIND = "optiq-eval"
# Above this many tokens, CPU evaluation with real quantized kernels is too slow
# (no BLAS for quantized matmuls): `auto` switches to simulated quantization.
AUTO_QUANTIZED_MAX_TOKENS = 256


class EvalError(OptiqError):
    pass


def read_text(text_path: str | Path) -> str:
    """The evaluation text; a missing or non-UTF-8 file is an EvalError naming it."""
    path = Path(text_path)
    if not path.is_file():
        raise EvalError(f"--text {path}: file not found")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"--text {path}: not a UTF-8 text file (byte {e.start})") from None


def text_tokens(
    tokenizer: Any, text_path: str | Path, num_tokens: int, sequence_length: int, skip_tokens: int = 0
) -> Any:
    """(num_sequences, sequence_length) token array from a text file; errors name the file."""
    import mlx.core as mx

    ids = tokenizer.encode(read_text(text_path))
    need = skip_tokens + num_tokens
    if num_tokens < sequence_length or num_tokens % sequence_length:
        raise EvalError(f"--num-tokens {num_tokens} must be a positive multiple of --sequence-length {sequence_length}")
    if len(ids) < need:
        raise EvalError(f"--text {text_path}: has {len(ids)} tokens, need {need} (--skip-tokens + --num-tokens)")
    ids = ids[skip_tokens:need]
    return mx.array(ids).reshape(-1, sequence_length)


def float32_model(model: Any) -> Any:
    """Dequantize every quantized layer and cast to fp32, evaluated (simulated quantization)."""
    import mlx.core as mx

    model, _ = model_tree.dequantize(model)
    model_tree.cast_floats(model, mx.float32)
    mx.eval(model.parameters())
    return model


def _log_softmax(logits):
    import mlx.core as mx

    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def evaluate(reference: Any, models: Mapping[str, Any], tokens: Any, progress: bool = True) -> dict[str, dict]:
    """Compare `models` ({name: model}) with `reference` on `tokens` (N, L).

    Returns {name: {"ppl", "kl", "top1", "nll", "num_tokens"}} plus "reference": {"ppl", "nll"}.
    KL and top-1 are over every position; PPL over the next-token targets.
    """
    import mlx.core as mx
    from tqdm import tqdm

    sums = {name: {"nll": 0.0, "kl": 0.0, "top1": 0.0} for name in models}
    ref_nll = 0.0
    n_pred = n_pos = 0
    for row in tqdm(range(tokens.shape[0]), desc="evaluating", disable=not progress, file=sys.stderr):
        seq = tokens[row : row + 1]
        targets = seq[:, 1:]
        ref_lp = _log_softmax(reference(seq))
        ref_p = mx.exp(ref_lp)
        ref_top = mx.argmax(ref_lp, axis=-1)
        nll = -mx.take_along_axis(ref_lp[:, :-1], targets[..., None], axis=-1).sum()
        ref_nll += nll.item()
        for name, model in models.items():
            lp = _log_softmax(model(seq))
            kl = (ref_p * (ref_lp - lp)).sum()
            top1 = (mx.argmax(lp, axis=-1) == ref_top).sum()
            nll = -mx.take_along_axis(lp[:, :-1], targets[..., None], axis=-1).sum()
            mx.eval(kl, top1, nll)
            s = sums[name]
            s["nll"] += nll.item()
            s["kl"] += kl.item()
            s["top1"] += top1.item()
        n_pred += targets.size
        n_pos += seq.size
    out = {"reference": {"nll": ref_nll / n_pred, "ppl": math.exp(ref_nll / n_pred)}}
    for name, s in sums.items():
        out[name] = {
            "nll": s["nll"] / n_pred,
            "ppl": math.exp(s["nll"] / n_pred),
            "kl": s["kl"] / n_pos,
            "top1": s["top1"] / n_pos,
            "num_tokens": n_pos,
        }
    return out


def load_reference(path: str | Path) -> tuple[Any, Any, bool]:
    """(the float reference as fp32, its tokenizer, whether the checkpoint was quantized).

    A quantized checkpoint is dequantized (and reported: its "float" is not the original).
    """
    from mlx_lm.utils import load_tokenizer

    model, config = model_tree.load_float_model(path, "float32", lazy=False)
    tokenizer = load_tokenizer(model_tree.resolve_model_path(path), eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, model_tree.is_quantized_checkpoint(config)


def load_for_eval(path: str | Path, compute: str) -> tuple[Any, float, str]:
    """(model to run, bits per weight of the checkpoint, compute actually used)."""
    from mlx_lm.utils import compute_bits_per_weight, load

    model, _ = load(str(path))
    bpw = compute_bits_per_weight(model)
    quantized = model_tree.is_quantized(model)
    if compute == "simulated" or not quantized:
        return float32_model(model), bpw, "simulated" if quantized else "float"
    return model, bpw, "quantized"


def resolve_compute(compute: str, num_tokens: int) -> str:
    if compute != "auto":
        return compute
    import mlx.core as mx

    if mx.default_device() == mx.gpu or num_tokens <= AUTO_QUANTIZED_MAX_TOKENS:
        return "quantized"
    return "simulated"


def check_not_calibration_text(model_path: str | Path, text_path: str | Path) -> None:
    """Refuse to evaluate on the text a model was calibrated on (its sidecar says which)."""
    sidecar = Path(model_path) / METADATA_FILE
    used = calibration_source(model_path)
    if used and used != "bundled" and Path(used).resolve() == Path(text_path).resolve():
        raise EvalError(
            f"--text {text_path} is the calibration text of {model_path} "
            f"({sidecar}: sensitivity.calibration); evaluate on held-out text"
        )


def _number(value: float, decimals: int) -> str:
    """`value` with `decimals` places, except where that hides it: beyond a million (the PPL
    of an untrained or broken model) 4 significant digits, and a nonzero value that would
    round to 0 (the KL of a near-lossless model) in scientific notation."""
    if math.isfinite(value) and abs(value) >= 1e6:
        return f"{value:.4g}"
    if value and abs(value) < 0.5 * 10**-decimals:
        return f"{value:.2e}"
    return f"{value:.{decimals}f}"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """Columns sized from their widest cell and two spaces apart; `align` has one "<" (left)
    or ">" (right) per column. Fixed widths broke alignment as soon as one value was wide."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [f"{str(c):{a}{w}}" for c, a, w in zip(r, align, widths)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_table(results: Mapping[str, dict], info: Mapping[str, dict]) -> str:
    """The results as aligned columns: model, bpw, PPL, ΔPPL, KL, top-1, compute."""
    ref = results["reference"]
    ref_bpw = f"{info['reference']['bpw']:.3f}"
    rows = [["reference (float)", ref_bpw, _number(ref["ppl"], 3), "0.000", "0.00000", "1.0000", "fp32"]]
    for name, r in results.items():
        if name == "reference":
            continue
        rows.append(
            [
                name,
                f"{info[name]['bpw']:.3f}",
                _number(r["ppl"], 3),
                _number(r["ppl"] - ref["ppl"], 3),
                _number(r["kl"], 5),
                f"{r['top1']:.4f}",
                info[name]["compute"],
            ]
        )
    return render_table(["model", "bpw", "PPL", "ΔPPL", "KL", "top-1", "compute"], rows, "<>>>>><")


PROG = "python -m mlx_lm_optiq.quality"

EPILOG = """\
columns:
  bpw      bits per weight as mlx-lm counts them (scales and biases included); the
           reference runs in fp32, so it says 32
  PPL      perplexity of the model on the text; ΔPPL = PPL - the reference's PPL
  KL       mean KL(reference || model) per token, in nats (0 = same distribution)
  top-1    share of positions whose most likely next token matches the reference's
  compute  quantized (real kernels), simulated (dequantized to fp32: same numbers up to
           float rounding) or float (an unquantized model)

example:
  python -m mlx_lm_optiq.quality --model OUT --model UNIFORM --reference FLOAT \\
      --text HELD_OUT.txt --output eval.json
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option's help says its default, so `--help` is the reference."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="Quantized model directory or Hugging Face repo; repeat to compare several (required).",
    )
    parser.add_argument(
        "--reference",
        required=True,
        help="Float reference model; a quantized checkpoint is dequantized to fp32 and said so (required).",
    )
    parser.add_argument(
        "--text", required=True, help="Held-out text file, not the text the models were calibrated on (required)."
    )
    parser.add_argument(
        "--num-tokens",
        type=int,
        default=2048,
        help="Tokens to score, a multiple of --sequence-length (default: %(default)s).",
    )
    parser.add_argument(
        "--sequence-length", type=int, default=512, help="Tokens per scored sequence (default: %(default)s)."
    )
    parser.add_argument(
        "--skip-tokens", type=int, default=0, help="Start this many tokens into the text (default: %(default)s)."
    )
    parser.add_argument(
        "--compute",
        choices=["auto", "quantized", "simulated"],
        default="auto",
        help=(
            "quantized: real quantized kernels; simulated: dequantize to fp32 first (fast with BLAS on CPU); "
            f"auto: quantized on a GPU or up to {AUTO_QUANTIZED_MAX_TOKENS} tokens, else simulated "
            "(default: %(default)s)."
        ),
    )
    parser.add_argument(
        "--output", help="Also write the results as JSON (kind optiq-eval) here (default: none, print only)."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    """Errors the user caused (`OptiqError`: a flag, a file, a model path) are one
    `python -m mlx_lm_optiq.quality: error: ...` line and exit status 1, found before any model
    is loaded where they can be; anything else keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors(parser.prog):
        return _run(args)


def _run(args: Any) -> dict[str, dict]:
    for path in (args.reference, *args.model):  # every model path and config.json, before loading any
        model_tree.read_model_config(model_tree.resolve_model_path(path))
    read_text(args.text)
    for m in args.model:
        check_not_calibration_text(m, args.text)
    compute = resolve_compute(args.compute, args.num_tokens)
    reference, tokenizer, ref_was_quantized = load_reference(args.reference)
    from mlx_lm.utils import compute_bits_per_weight

    info = {"reference": {"bpw": compute_bits_per_weight(reference), "compute": "fp32"}}
    tokens = text_tokens(tokenizer, args.text, args.num_tokens, args.sequence_length, args.skip_tokens)
    models = {}
    for path in args.model:
        name = str(path)
        if name in models:
            raise EvalError(f"--model {name} given twice")
        models[name], bpw, used = load_for_eval(path, compute)
        info[name] = {"bpw": bpw, "compute": used}
    results = evaluate(reference, models, tokens)
    print(format_table(results, info))
    note = "reference dequantized from a quantized checkpoint to fp32" if ref_was_quantized else "reference run in fp32"
    print(
        f"[{tokens.size} tokens of {args.text}; {note}; compute: "
        + ", ".join(f"{k}={v['compute']}" for k, v in info.items() if k != "reference")
        + "]"
    )
    if args.output:
        write_json(
            args.output,
            {
                "text": str(args.text),
                "num_tokens": int(tokens.size),
                "sequence_length": args.sequence_length,
                "skip_tokens": args.skip_tokens,
                "reference": str(args.reference),
                "reference_dequantized": ref_was_quantized,
                "results": {k: dict(v, **info.get(k, {})) for k, v in results.items()},
            },
            kind=EVAL_KIND,
        )
    return results


if __name__ == "__main__":
    main()
