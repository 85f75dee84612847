"""Choose one quantization (bits, group size) per module under a bits-per-weight budget.

The budget is counted exactly as `mlx_lm.utils.compute_bits_per_weight` counts
it on the converted model: every array's bytes (packed weights, scales, biases,
norms, float layers) divided by `get_total_parameters`. The choice minimising
the summed measured KL divergence is found exactly with `allocate.solve`.
"""

import math
import re
from fractions import Fraction

from .allocate import InfeasibleBudget, quantized_bits, solve

PROTECTIONS = ("embeddings", "lm-head", "first-block", "last-block")

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class PlanError(ValueError):
    pass


def candidate_key(bits, group_size, mode="affine"):
    """Table key of a candidate: "4:64" for affine, "mxfp4:32" for other modes."""
    return f"{bits}:{group_size}" if mode == "affine" else f"{mode}:{group_size}"


_AFFINE_BITS = (2, 3, 4, 5, 6, 8)
_AFFINE_GROUPS = (32, 64, 128)
# mlx's floating-point formats have one fixed group size each.
FORMAT_GROUPS = {"nvfp4": 16, "mxfp4": 32, "mxfp8": 32}


def _check_candidate(c, flag):
    if c["mode"] == "affine":
        if c["bits"] not in _AFFINE_BITS:
            raise PlanError(f"{flag}: candidate bits must be among {','.join(map(str, _AFFINE_BITS))}, got {c['bits']}")
        if c["group_size"] not in _AFFINE_GROUPS:
            raise PlanError(f"{flag}: candidate group sizes must be among 32,64,128, got {c['group_size']}")
    elif c["mode"] in FORMAT_GROUPS:
        if c["group_size"] != FORMAT_GROUPS[c["mode"]]:
            raise PlanError(f"{flag}: {c['mode']} has group size {FORMAT_GROUPS[c['mode']]}, got {c['group_size']}")
    else:
        raise PlanError(f"{flag}: unknown quantization mode {c['mode']!r}")


def make_candidates(bits_list, group_sizes, mode="affine"):
    """Every (bits, group_size) pair as candidate dicts, cheapest first."""
    if mode != "affine":
        raise PlanError(f"only affine quantization is supported for mixed precision, got q_mode {mode!r} "
                        "(other formats go in --optiq-candidates, e.g. 4:64,nvfp4:16,8:64)")
    cands = [{"bits": int(b), "group_size": int(g), "mode": mode} for b in bits_list for g in group_sizes]
    for c in cands:
        _check_candidate(c, "--optiq-candidate-bits/--optiq-group-sizes")
    return sorted(cands, key=lambda c: (c["bits"], -c["group_size"]))


def parse_candidates(spec, flag="--optiq-candidates"):
    """Candidate dicts from "4:64,nvfp4:16,8:64" (table keys: BITS:GROUP affine, MODE:GROUP), cheapest first."""
    from .sensitivity import SensitivityError, cheapest_first, parse_candidate

    keys = [k.strip() for k in spec.split(",") if k.strip()] if isinstance(spec, str) else list(spec)
    if not keys:
        raise PlanError(f"{flag}: no candidates given")
    out, seen = [], set()
    for k in keys:
        try:
            c = parse_candidate(k)
        except SensitivityError as e:
            raise PlanError(f"{flag}: {e}") from None
        _check_candidate(c, flag)
        if candidate_key(**c) not in seen:
            seen.add(candidate_key(**c))
            out.append(c)
    return cheapest_first(out)


def top_level_quantization(candidates):
    """(group_size, bits, mode) for the config's top-level "quantization" entry.

    Stock `quantize_model` skips a module whose input dim the top-level group size
    does not divide, so it is the smallest candidate group (group sizes are powers of
    two: that is their gcd); bits and mode are the cheapest candidate with that group,
    so the entry is itself a valid quantization. Every planned module has its own entry.
    """
    from .sensitivity import cheapest_first

    smallest = min(c["group_size"] for c in candidates)
    c = cheapest_first([c for c in candidates if c["group_size"] == smallest])[0]
    return c["group_size"], c["bits"], c["mode"]


def dtype_bits(dtype):
    return dtype.size * 8


def _weight_of(module):
    return module.weight


def budget_inputs(model, module_paths, cast_dtype=None, cast_predicate=None):
    """(total_params, fixed_bits, float_weight_bits) of `model` as it will be quantized.

    total_params: `get_total_parameters` (unchanged by quantization).
    fixed_bits: bits of every array that is not the weight of a module in
    `module_paths` (norms, biases, modules never quantized), after the dtype cast
    that stock convert applies (`cast_dtype`, `cast_predicate` as in mlx_lm.convert).
    float_weight_bits: {path: bits of that module's weight if kept in float}.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters

    cast_predicate = cast_predicate or (lambda _: True)

    def bits_of(name, arr):
        if cast_dtype is not None and cast_predicate(name) and mx.issubdtype(arr.dtype, mx.floating):
            return arr.size * dtype_bits(cast_dtype)
        return arr.nbytes * 8

    all_bits = sum(bits_of(k, v) for k, v in tree_flatten(model.parameters()))
    modules = dict(model.named_modules())
    float_weight_bits = {}
    for path in module_paths:
        if path not in modules:
            raise PlanError(f"module {path!r} of the sensitivity table is not in the model")
        float_weight_bits[path] = bits_of(f"{path}.weight", _weight_of(modules[path]))
    fixed = all_bits - sum(float_weight_bits.values())
    return get_total_parameters(model), fixed, float_weight_bits


def parse_protect(value):
    """"embeddings,lm-head" or a list -> list of protection names (validated later)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def protected_modules(paths, protect, tied_embeddings=False):
    """{path: protection name} for the requested protections; each must match something."""
    unknown = [p for p in protect if p not in PROTECTIONS]
    if unknown:
        raise PlanError(f"--optiq-protect: unknown protection(s) {unknown}; expected some of {list(PROTECTIONS)}")
    blocks = {p: int(m.group(1)) for p in paths if (m := _BLOCK.search(p))}
    out = {}
    for name in protect:
        if name == "embeddings":
            hit = [p for p in paths if "embed" in p.rsplit(".", 1)[-1]]
        elif name == "lm-head":
            hit = [p for p in paths if p.rsplit(".", 1)[-1] == "lm_head"]
            if not hit and tied_embeddings:
                # Tied models compute the output projection with the embedding matrix.
                hit = [p for p in paths if "embed" in p.rsplit(".", 1)[-1]]
        elif name in ("first-block", "last-block"):
            if not blocks:
                hit = []
            else:
                edge = min(blocks.values()) if name == "first-block" else max(blocks.values())
                hit = [p for p, b in blocks.items() if b == edge]
        if not hit:
            raise PlanError(f"--optiq-protect {name}: no quantizable module matches it in this model")
        for p in hit:
            out.setdefault(p, name)
    return out


def plan(table, candidates, target_bpw, total_params, fixed_bits, float_weight_bits, scale_bits,
         protect=None, source="sensitivity table"):
    """Exact per-module choice; returns a dict describing the plan.

    table: sensitivity table (`modules[path] = {"num_params", "shape", "kl": {key: float}}`).
    candidates: candidate dicts allowed for this conversion (subset of the table's).
    protect: {path: reason}; those modules get their lowest-KL candidate.
    Returns {"layers": {path: {"bits","group_size","mode"} or {"bits": float bits}},
             "predicted_bits": int, "capacity_bits": int, "achieved_bpw": float, "min_bpw": float}.
    """
    protect = protect or {}
    modules = table["modules"]
    target = Fraction(float(target_bpw))  # the exact binary value: result <= float(target) after division
    capacity_total = math.floor(target * total_params)
    capacity = capacity_total - fixed_bits
    paths, values, costs, options = [], [], [], []
    float_layers = {}
    for path, entry in modules.items():
        in_dim = int(entry["shape"][-1])
        n = int(entry["num_params"])
        kl = entry.get("kl", {})
        opts = [c for c in candidates if in_dim % c["group_size"] == 0]
        if not opts:
            # mlx cannot quantize this input width with any requested group size
            float_layers[path] = float_weight_bits[path]
            continue
        missing = [candidate_key(**c) for c in opts if candidate_key(**c) not in kl]
        if missing:
            raise PlanError(
                f"{source}: module {path!r} has no measurement for candidate(s) {missing} "
                f"(it has {sorted(kl)}); measure again with these candidates or choose from the measured ones"
            )
        vals = []
        for c in opts:
            v = kl[candidate_key(**c)]
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise PlanError(f"{source}: module {path!r} candidate {candidate_key(**c)}: kl must be a finite number, got {v!r}")
            vals.append(float(v))
        if path in protect:
            best = min(range(len(opts)), key=lambda j: (vals[j], -opts[j]["bits"], opts[j]["group_size"]))
            opts, vals = [opts[best]], [vals[best]]
        paths.append(path)
        options.append(opts)
        values.append(vals)
        costs.append([quantized_bits(n, c["bits"], c["group_size"], c["mode"], scale_bits) for c in opts])
    capacity -= sum(float_layers.values())
    cheapest = fixed_bits + sum(float_layers.values()) + sum(min(cs) for cs in costs)
    min_bpw = cheapest / total_params
    if cheapest > capacity_total:
        raise InfeasibleBudget(
            f"--optiq-target-bpw {target_bpw} is infeasible: the cheapest choice of the candidates "
            f"{[candidate_key(**c) for c in candidates]}"
            + (f" with protections {sorted(set(protect.values()))}" if protect else "")
            + f" already needs {min_bpw:.4f} bits per weight"
        )
    picks = solve(values, costs, capacity)
    layers = {}
    used = fixed_bits + sum(float_layers.values())
    for path, opts, cs, j in zip(paths, options, costs, picks):
        layers[path] = dict(opts[j])
        used += cs[j]
    for path, bits in float_layers.items():
        n = int(modules[path]["num_params"])
        layers[path] = {"bits": bits // n}
    assert used <= capacity_total, "solver exceeded the budget"
    return {
        "layers": layers,
        "predicted_bits": int(used),
        "capacity_bits": int(capacity_total),
        "total_params": int(total_params),
        "achieved_bpw": used / total_params,
        "min_bpw": min_bpw,
        "float_layers": sorted(float_layers),
        "protected": dict(protect),
    }


def quant_predicate(layers, clip=None):
    """A stock `quant_predicate` applying a plan: a dict for planned layers, False otherwise.

    clip: the table's clipping.Clipper (clipping.from_table), or None for stock ranges.
    """

    def predicate(path, module, config=None):
        choice = layers.get(path)
        if choice is None or "group_size" not in choice:
            return False
        if clip is not None:
            # Stock quantizes the module right after asking: handing it the clipped float
            # weight makes its own to_quantized write the clipped ranges the sweep measured.
            module.weight = clip(path, module.weight, choice)
        return dict(choice)

    return predicate


def check_quantized(model, layers):
    """Raise PlanError unless every planned module carries exactly its planned bits."""
    modules = dict(model.named_modules())
    wrong = []
    for path, choice in layers.items():
        m = modules.get(path)
        if m is None:
            wrong.append(f"{path}: missing")
        elif "group_size" in choice:
            got = (getattr(m, "bits", None), getattr(m, "group_size", None), getattr(m, "mode", "affine"))
            if got != (choice["bits"], choice["group_size"], choice["mode"]):
                wrong.append(f"{path}: planned {choice}, got bits={got[0]} group_size={got[1]} mode={got[2]}")
        elif hasattr(m, "bits"):
            wrong.append(f"{path}: planned float, got {m.bits}-bit")
    if wrong:
        raise PlanError("converted model does not match the plan: " + "; ".join(wrong[:10]))


# ---------------------------------------------------------------------------
# Conversion steps used by the convert hook (plain functions, no hook imports).

MODEL_CONVERSION_DTYPES = ("float16", "bfloat16", "float32")


def parse_int_list(value, flag):
    """"4,8" or [4, 8] -> [4, 8]; errors name the flag."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise PlanError(f"{flag}: expected comma-separated integers, got {value!r}") from None
    if not out:
        raise PlanError(f"{flag}: expected at least one integer, got {value!r}")
    return out


def resolve_model_path(path_or_repo, revision=None):
    """Local directory of a model: the path itself, or the hub snapshot mlx-lm would download."""
    from pathlib import Path

    p = Path(path_or_repo)
    if p.exists():
        return p
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    return Path(snapshot_download(str(path_or_repo), revision=revision, allow_patterns=DEFAULT_ALLOW_PATTERNS))


def is_quantized_checkpoint(config):
    return "quantization" in config or "quantization_config" in config


def write_float_source(model_path, dst):
    """Dequantize a quantized checkpoint into `dst` with mlx-lm's own functions.

    Stock convert cannot re-quantize quantized layers (QuantizedLinear has no
    `to_quantized`, so `-q` would silently keep the old bits); the dequantized
    copy is the float source every plan is made for.
    """
    from mlx_lm.utils import dequantize_model, load, save

    model, tokenizer, config = load(str(model_path), lazy=True, return_config=True)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    model = dequantize_model(model)
    save(dst, model_path, model, tokenizer, config)
    return dst


def conversion_dtype(config, dtype_arg):
    """The dtype stock convert casts float weights to (same rule as mlx_lm.convert)."""
    import mlx.core as mx

    dtype = dtype_arg or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return getattr(mx, dtype) if dtype in MODEL_CONVERSION_DTYPES else None


def load_float_model(model_path):
    from mlx_lm.utils import load_model

    from pathlib import Path

    model, config = load_model(Path(model_path), lazy=True)
    return model, config


def make_plan(model, config, table, candidates, target_bpw, dtype_arg=None, protect=(), source="sensitivity table"):
    """Plan for the float `model` as stock convert will cast and quantize it."""
    dtype = conversion_dtype(config, dtype_arg)
    cast_predicate = getattr(model, "cast_predicate", None)
    paths = list(table["modules"])
    total, fixed, float_weight_bits = budget_inputs(model, paths, dtype, cast_predicate)
    for path, mod in table["modules"].items():
        if float_weight_bits[path] % int(mod["num_params"]):
            raise PlanError(f"{source}: module {path!r} has num_params {mod['num_params']} that does not match the model")
    widths = {p: float_weight_bits[p] // int(table["modules"][p]["num_params"]) for p in paths}
    scale_bits = set(widths.values())
    if len(scale_bits) != 1:
        raise PlanError(f"float weights of the planned modules have mixed widths {sorted(scale_bits)}; pass --dtype")
    tied = bool(config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", False)))
    protected = protected_modules(paths, list(protect or ()), tied_embeddings=tied)
    return plan(table, candidates, target_bpw, total, fixed, float_weight_bits, scale_bits.pop(),
                protect=protected, source=source)


def check_table_matches(table, model, source):
    """Every module of the table exists in the model with the recorded shape."""
    modules = dict(model.named_modules())
    for path, entry in table["modules"].items():
        m = modules.get(path)
        if m is None or not hasattr(m, "weight"):
            raise PlanError(f"{source}: module {path!r} is not a weight module of this model; "
                            "was the table measured on another model?")
        if list(m.weight.shape) != list(entry["shape"]):
            raise PlanError(f"{source}: module {path!r} has shape {entry['shape']} in the table but "
                            f"{list(m.weight.shape)} in the model")


def verify_converted(out_dir, layers, target_bpw, predicted_bits):
    """Reload the written model with stock mlx-lm and check bits per layer and BPW; return BPW."""
    import json
    from pathlib import Path

    from mlx_lm.utils import compute_bits_per_weight, get_total_parameters, load_model

    out_dir = Path(out_dir)
    with open(out_dir / "config.json") as f:
        qcfg = json.load(f).get("quantization", {})
    for path, choice in layers.items():
        if "group_size" in choice and qcfg.get(path) != choice:
            raise PlanError(f"{out_dir}/config.json: quantization entry for {path!r} is {qcfg.get(path)!r}, "
                            f"planned {choice}")
    model, _ = load_model(out_dir, lazy=True)
    check_quantized(model, layers)
    bpw = compute_bits_per_weight(model)
    used = bpw * get_total_parameters(model)
    if bpw > float(target_bpw) or abs(used - predicted_bits) > 0.5:
        raise PlanError(f"converted model has {bpw:.6f} bits per weight ({used:.0f} bits); "
                        f"the plan predicted {predicted_bits} bits within target {target_bpw}")
    return bpw


# ---------------------------------------------------------------------------
# Text-only conversion of multi-modal checkpoints.

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
_TEXT_PREFIX = "language_model."


def make_text_only(out_dir):
    """Rewrite a converted multi-modal checkpoint in `out_dir` as its plain text model.

    mlx-lm loads multi-modal checkpoints as a wrapper holding the text model in
    `language_model` (vision/audio towers are dropped by its sanitize). This
    writes that text model on its own with `text_config` as the config, so the
    vision/audio weights, config and processor files are gone and stock
    mlx-lm loads it as the text architecture; the logits are checked unchanged.
    Returns {"text_model_type", "dropped_config", "dropped_files", "renamed": a function old path -> new}.
    """
    from pathlib import Path

    import mlx.core as mx
    from mlx_lm.utils import load_model, save_config, save_model

    out_dir = Path(out_dir)
    model, config = load_model(out_dir, lazy=True)
    text_config = config.get("text_config")
    if not isinstance(text_config, dict) or "model_type" not in text_config or not hasattr(model, "language_model"):
        raise PlanError(
            f"--optiq-text-only: {out_dir}/config.json (model_type {config.get('model_type')!r}) is not a "
            "multi-modal checkpoint that mlx-lm loads as a wrapper around a text model "
            "(expected a 'text_config' with a 'model_type' and a 'language_model' submodule)"
        )
    text_model = model.language_model
    mx.eval(text_model.parameters())  # the files are replaced below
    probe = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    expected = model(probe).astype(mx.float32)
    mx.eval(expected)

    new_config = dict(text_config)
    for key in ("quantization", "quantization_config"):
        if key in config:
            new_config[key] = {(k[len(_TEXT_PREFIX):] if k.startswith(_TEXT_PREFIX) else k): v
                               for k, v in config[key].items()}
    for key in ("eos_token_id", "bos_token_id"):
        if key in config and key not in new_config:
            new_config[key] = config[key]
    dropped_config = sorted(k for k in config if k not in new_config and k != "text_config")

    for f in list(out_dir.glob("model*.safetensors")) + [out_dir / "model.safetensors.index.json"]:
        if f.exists():
            f.unlink()
    dropped_files = [n for n in _PROCESSOR_FILES if (out_dir / n).exists()]
    for n in dropped_files:
        (out_dir / n).unlink()
    save_model(out_dir, text_model)
    save_config(new_config, out_dir / "config.json")

    reloaded, _ = load_model(out_dir, lazy=True)
    got = reloaded(probe).astype(mx.float32)
    if got.shape != expected.shape or not mx.allclose(got, expected, atol=1e-4, rtol=1e-4).item():
        raise PlanError(f"{out_dir}: the text-only model does not reproduce the multi-modal model's logits")
    return {"text_model_type": new_config["model_type"], "dropped_config": dropped_config,
            "dropped_files": dropped_files, "renamed": strip_text_prefix}


def strip_text_prefix(path):
    return path[len(_TEXT_PREFIX):] if path.startswith(_TEXT_PREFIX) else path
