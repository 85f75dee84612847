"""Convert extension: `--optiq-kv-target-bits 4.5` writes a per-layer KV plan (kv_config.json)
next to the converted model.

The plan is measured on the model as converted (dequantized to float32 for the
measurement), so it reflects the weights that will actually run; `mlx_lm.load`
of the output folder then picks the plan up (hooks/generate.py), and so does
`mlx_lm.server` (hooks/server_kv.py).
"""

from .. import kv, kv_config

# dest (without optiq_) -> default; any of them without --optiq-kv-target-bits is an error
_MEASURE_OPTIONS = {
    "kv_candidates": None,
    "kv_data": None,
    "kv_prefix_tokens": kv.DEFAULT_PREFIX_TOKENS,
    "kv_scored_tokens": kv.DEFAULT_SCORED_TOKENS,
    "kv_num_windows": 1,
    "kv_probe": "exact",
    "kv_context_length": 8192,
    "kv_quantized_kv_start": 0,
}


def _flag(name):
    return "--optiq-" + name.replace("_", "-")


def add_arguments(group):
    group.add_argument("--optiq-kv-target-bits", type=float, default=None,
                       help="Per-layer KV cache: measure each layer's KV sensitivity and write kv_config.json "
                            "for this average bits per cached element (fp16 = 16; 4-bit g64 = 4.5).")
    kv.add_measure_arguments(lambda flag, **kw: group.add_argument(flag, **{**kw, "default": None}),
                             prefix="optiq-kv-")


def is_requested(options):
    if options.get("kv_target_bits") is not None:
        return True
    stray = [k for k in _MEASURE_OPTIONS if options.get(k) is not None]
    if stray:
        raise ValueError(f"{', '.join(_flag(k) for k in stray)} need --optiq-kv-target-bits")
    return False


def _measure_options(options):
    return {k[len("kv_"):]: (options[k] if options.get(k) is not None else d) for k, d in _MEASURE_OPTIONS.items()}


def before_convert(call, options):
    # fail on bad flags before the (long) conversion, naming the flag
    target = options["kv_target_bits"]
    if not (0 < target <= kv_config.FLOAT_BITS):
        raise ValueError(f"--optiq-kv-target-bits is {target}, expected a number in (0, {kv_config.FLOAT_BITS}]")
    kv.check_measure_options(_measure_options(options), flag=lambda n: _flag("kv_" + n.replace("-", "_")))


def after_convert(out_dir, call, options):
    plan, _ = kv.make_plan(out_dir, options["kv_target_bits"], _measure_options(options),
                           model_name=str(call["hf_path"]))
    path = kv_config.save_kv_config(plan, out_dir / kv_config.FILENAME)
    print(f"[mlx_lm_optiq] wrote {path.name}: {plan.summary()}; average {plan.achieved_bits} KV bits")
