"""Convert extension: sensitivity-aware mixed-precision weights (`--optiq-target-bpw`).

Flow: dequantize a quantized source (stock `-q` cannot re-quantize it), measure
or load the per-module sensitivity table, plan bits per module exactly under the
budget, hand stock convert a `quant_predicate` returning each module's dict, then
reload the written model with stock mlx-lm to check every layer and the BPW, and
write optiq_metadata.json. Optionally rewrite a multi-modal checkpoint as text only.
"""

import shutil
import sys
from pathlib import Path

from .. import clipping, metadata, plan

_FLOAT_SOURCE = ".optiq-float-source"

# Every flag this extension owns (dest without the optiq_ prefix): the flow only
# runs when one of them is set, and the others then need --optiq-target-bpw.
_PLAN_OPTIONS = ("candidate_bits", "group_sizes", "candidates", "calibration", "num_samples", "sequence_length",
                 "sensitivity", "sensitivity_method", "reference", "checkpoint", "protect", "clipping")


def add_arguments(group):
    group.add_argument("--optiq-target-bpw", type=float, default=None,
                       help="Mixed precision: average bits per weight (as mlx-lm counts it, scales included) "
                            "to spend where the measured KL divergence says it matters.")
    group.add_argument("--optiq-candidate-bits", default=None,
                       help="Comma-separated bit widths to choose from per module (default 4,8).")
    group.add_argument("--optiq-group-sizes", default=None,
                       help="Comma-separated group sizes to choose from (default: --q-group-size or 64).")
    group.add_argument("--optiq-candidates", default=None,
                       help="Explicit comma-separated candidates instead of bits x group sizes: BITS:GROUP "
                            "(affine) or MODE:GROUP for mlx's float formats, e.g. 3:64,4:64,nvfp4:16,8:64.")
    group.add_argument("--optiq-calibration", default=None,
                       help="Calibration JSONL, one {'text': ...} or {'messages': [...]} per line (default: the bundled set).")
    group.add_argument("--optiq-num-samples", type=int, default=None, help="Calibration sequences (default 16).")
    group.add_argument("--optiq-sequence-length", type=int, default=None, help="Tokens per sequence (default 512).")
    group.add_argument("--optiq-sensitivity", default=None,
                       help="Plan from a saved sensitivity table (or a converted model's optiq_metadata.json) "
                            "instead of measuring.")
    group.add_argument("--optiq-sensitivity-method", choices=["exact", "fisher"], default=None,
                       help="exact: measured KL per module and candidate; fisher: fast second-order estimate.")
    group.add_argument("--optiq-reference", choices=["auto", "float", "low-bit"], default=None,
                       help="Reference model of the KL measurement (default auto).")
    group.add_argument("--optiq-clipping", choices=["activation", "none"], default=None,
                       help="Group ranges, measured and written alike: clipped where the calibration "
                            "activations say it lowers the layer's output error (default activation), or "
                            "stock min/max (none).")
    group.add_argument("--optiq-checkpoint", default=None,
                       help="Resume file for the sensitivity sweep (written as it goes).")
    group.add_argument("--optiq-protect", default=None,
                       help=f"Comma-separated modules to keep at their most precise candidate: {','.join(plan.PROTECTIONS)}.")
    group.add_argument("--optiq-text-only", action="store_true", default=None,
                       help="Write only the text model of a multi-modal checkpoint (drop vision/audio weights and config).")


def is_requested(options):
    if options.get("target_bpw") is not None:
        return True
    stray = [k for k in _PLAN_OPTIONS if options.get(k) is not None]
    if stray:
        flags = ", ".join("--optiq-" + k.replace("_", "-") for k in stray)
        raise plan.PlanError(f"{flags} need --optiq-target-bpw")
    return bool(options.get("text_only"))


def before_convert(call, options):
    staging = Path(call["mlx_path"]).parent
    state = options.setdefault("_weights_state", {})
    if options.get("target_bpw") is None:
        return
    if call.get("dequantize"):
        raise plan.PlanError("--optiq-target-bpw quantizes: it cannot be combined with -d/--dequantize")
    if call.get("quant_predicate") is not None:
        raise plan.PlanError("--optiq-target-bpw chooses the bits per layer: it cannot be combined with --quant-predicate")
    mode = call.get("q_mode") or "affine"
    if options.get("candidates") is not None:
        both = [f for f in ("candidate_bits", "group_sizes") if options.get(f) is not None]
        if both:
            raise plan.PlanError(f"--optiq-candidates lists every candidate: drop --optiq-{both[0].replace('_', '-')}")
        if mode != "affine":
            raise plan.PlanError(f"--optiq-candidates names each candidate's format: drop --q-mode {mode}")
        candidates = plan.parse_candidates(options["candidates"])
    else:
        bits = plan.parse_int_list(options.get("candidate_bits") or "4,8", "--optiq-candidate-bits")
        groups = plan.parse_int_list(options.get("group_sizes"), "--optiq-group-sizes") or [call.get("q_group_size") or 64]
        candidates = plan.make_candidates(bits, groups, mode)
    protect = plan.parse_protect(options.get("protect"))

    base_model = call["hf_path"]
    table = None
    if options.get("sensitivity") is not None:  # read first: a bad file fails before any work
        measuring = [k for k in ("calibration", "num_samples", "sequence_length", "sensitivity_method",
                                 "reference", "checkpoint", "clipping") if options.get(k) is not None]
        if measuring:
            flags = ", ".join("--optiq-" + k.replace("_", "-") for k in measuring)
            raise plan.PlanError(f"{flags} configure measuring, which --optiq-sensitivity skips: drop one or the other")
        source = str(options["sensitivity"])
        table = metadata.load_sensitivity(source)
    model_path = plan.resolve_model_path(base_model, call.get("revision"))
    float_path = model_path
    from mlx_lm.utils import load_config

    if plan.is_quantized_checkpoint(load_config(model_path)):
        print("[INFO] optiq: dequantizing the quantized source to plan and re-quantize it", file=sys.stderr)
        float_path = plan.write_float_source(model_path, staging / _FLOAT_SOURCE)
        call["hf_path"] = str(float_path)
    model, config = plan.load_float_model(float_path)

    if table is None:
        source = "measured sensitivity"
        table = _measure(model_path, candidates, options)
    plan.check_table_matches(table, model, source)
    result = plan.make_plan(model, config, table, candidates, options["target_bpw"],
                            dtype_arg=call.get("dtype"), protect=protect, source=source)
    del model
    print(f"[INFO] optiq: planned {result['achieved_bpw']:.4f} bits per weight "
          f"(target {options['target_bpw']}, cheapest possible {result['min_bpw']:.4f})", file=sys.stderr)
    state.update(table=table, plan=result, candidates=candidates, base_model=str(base_model))
    call["quantize"] = True
    call["q_group_size"], call["q_bits"], call["q_mode"] = plan.top_level_quantization(candidates)
    call["quant_predicate"] = plan.quant_predicate(result["layers"], clipping.from_table(table))


def _measure(model_path, candidates, options):
    from mlx_lm.utils import load_tokenizer

    from .. import calibration, sensitivity

    tokenizer = load_tokenizer(model_path)
    tokens = calibration.load_calibration(
        tokenizer, options.get("calibration"),
        num_samples=options.get("num_samples") or 16,
        sequence_length=options.get("sequence_length") or 512,
    )
    table = sensitivity.measure_sensitivity(
        str(model_path), tokens, candidates,
        method=options.get("sensitivity_method") or "exact",
        reference=options.get("reference") or "auto",
        checkpoint_path=options.get("checkpoint"),
        clipping=options.get("clipping") or "activation",
    )
    calib = options.get("calibration")
    table["calibration"]["source"] = str(Path(calib).resolve()) if calib else "bundled"
    return table


def after_convert(out_dir, call, options):
    state = options.get("_weights_state", {})
    staging = Path(out_dir).parent
    shutil.rmtree(staging / _FLOAT_SOURCE, ignore_errors=True)
    bpw = None
    if "plan" in state:
        bpw = plan.verify_converted(out_dir, state["plan"]["layers"], options["target_bpw"], state["plan"]["predicted_bits"])
        print(f"[INFO] optiq: reloaded with stock mlx-lm: {bpw:.4f} bits per weight, every planned layer as planned",
              file=sys.stderr)
    extra = {}
    if options.get("text_only"):
        info = plan.make_text_only(out_dir)
        extra["text_only"] = {k: v for k, v in info.items() if k != "renamed"}
        print(f"[INFO] optiq: text-only {info['text_model_type']} model written "
              f"(dropped config {info['dropped_config']})", file=sys.stderr)
    if "plan" in state:
        metadata.write_metadata(out_dir, base_model=state["base_model"], table=state["table"],
                                plan=state["plan"], target_bpw=options["target_bpw"], achieved_bpw=bpw,
                                candidates=state["candidates"], extra=extra,
                                rename=info["renamed"] if options.get("text_only") else None)
