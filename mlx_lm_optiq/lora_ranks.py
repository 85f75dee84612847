"""Per-module LoRA ranks that move adapter capacity toward sensitive layers.

Stock mlx-lm gives every adapted linear layer the same rank r. Here each module
gets its own rank from a per-module weight (its quantization bits, or its
measured sensitivity), under the constraint that the total number of trainable
LoRA parameters equals what constant rank r would use, within one rank step:
capacity is moved, not added.

A LoRA module with input dims i and output dims o costs r * (i + o) parameters
(lora_a is (i, r), lora_b is (r, o)); DoRA's magnitude vector does not depend on
the rank and is left out of the budget.
"""

import math
from pathlib import Path

from .io_utils import OptiqFileError, read_json
from .sensitivity import FORMAT_BITS as _FORMAT_BITS

MODES = ("constant", "by_bits", "by_kl")
METADATA_FILE = "optiq_metadata.json"
# No module may take more than this many times the base rank: with by_kl the
# measured KLs span orders of magnitude and one layer would otherwise take most
# of the budget.
DEFAULT_MAX_RANK_FACTOR = 4


def rank_cost(dims):
    """Trainable parameters per unit of rank for a module with (input_dims, output_dims)."""
    input_dims, output_dims = dims
    return input_dims + output_dims


def budget_params(dims_by_module, base_rank):
    """Trainable LoRA parameters constant rank `base_rank` uses on these modules."""
    return base_rank * sum(rank_cost(d) for d in dims_by_module.values())


def lora_params(dims_by_module, ranks):
    return sum(ranks[name] * rank_cost(d) for name, d in dims_by_module.items())


def allocate_ranks(dims_by_module, weights, base_rank, min_rank=1, max_rank=None):
    """Integer ranks proportional to `weights`, at the parameter budget of constant `base_rank`.

    dims_by_module: {module path: (input_dims, output_dims)}
    weights: {module path: positive float}, e.g. quantization bits or KL.
    Ranks are clipped to [min_rank, max_rank] (water-filling: the proportionality
    constant is solved so the clipped continuous ranks spend the budget exactly),
    then rounded down and topped up greedily (largest shortfall first) while the
    budget allows. Result: total <= budget and budget - total < the cost of one
    rank step of any module that could still grow.
    """
    if base_rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {base_rank}")
    max_rank = max_rank or DEFAULT_MAX_RANK_FACTOR * base_rank
    if max_rank < base_rank:
        raise ValueError(f"--optiq-max-rank {max_rank} is below the base rank {base_rank}: the budget cannot be spent")
    names = list(dims_by_module)
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"no rank weight for LoRA modules {missing[:5]}")
    for n in names:
        w = weights[n]
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise ValueError(f"rank weight for {n} must be a positive number, got {w!r}")
    cost = {n: rank_cost(dims_by_module[n]) for n in names}
    budget = base_rank * sum(cost.values())

    def spend(scale):
        return sum(min(max(scale * weights[n], min_rank), max_rank) * cost[n] for n in names)

    # Bisection on the proportionality constant: spend() is monotone in it.
    lo, hi = 0.0, 1.0
    while spend(hi) < budget and hi < 1e30:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if spend(mid) < budget:
            lo = mid
        else:
            hi = mid
    target = {n: min(max(hi * weights[n], min_rank), max_rank) for n in names}
    ranks = {n: max(min_rank, int(math.floor(target[n] + 1e-9))) for n in names}
    left = budget - sum(ranks[n] * cost[n] for n in names)
    # Top up: the module furthest below its continuous target first; stop when
    # no module's one-rank step fits in what is left.
    while True:
        growable = [n for n in names if ranks[n] < max_rank and cost[n] <= left]
        if not growable:
            break
        n = max(growable, key=lambda k: (target[k] - ranks[k], -names.index(k)))
        ranks[n] += 1
        left -= cost[n]
    return ranks


def find_metadata(model_path, metadata_path=None):
    """Path of the optiq_metadata.json sidecar to use, or a clear error.

    `metadata_path` (the --optiq-metadata flag) wins; otherwise the sidecar next
    to the model's weights.
    """
    if metadata_path is not None:
        path = Path(metadata_path)
        if not path.is_file():
            raise OptiqFileError(f"--optiq-metadata {path}: file not found")
        return path
    model_dir = Path(model_path)
    if not model_dir.is_dir():
        from mlx_lm.utils import hf_repo_to_path

        model_dir = Path(hf_repo_to_path(str(model_path)))
    path = model_dir / METADATA_FILE
    if not path.is_file():
        raise OptiqFileError(
            f"{path}: file not found. Rank scaling by_bits/by_kl (and --optiq-load-mixed) need the "
            f"per-layer sidecar written by `MLX_LM_OPTIQ=1 mlx_lm.convert --optiq-...`; pass "
            f"--optiq-metadata PATH to use one from elsewhere, or use --optiq-rank-scaling constant"
        )
    return path


def read_metadata(path):
    """The sidecar's `layers` table, validated: {module path: layer entry}."""
    data = read_json(path, kind="optiq-metadata", required=["layers"])
    layers = data["layers"]
    if not isinstance(layers, dict) or not layers:
        raise OptiqFileError(f"{path}: field 'layers' must be a non-empty object of module path -> entry")
    for name, entry in layers.items():
        if not isinstance(entry, dict):
            raise OptiqFileError(f"{path}: field 'layers.{name}' must be an object, got {type(entry).__name__}")
        bits = entry.get("bits")
        if not isinstance(bits, (int, float)) or isinstance(bits, bool) or bits <= 0:
            raise OptiqFileError(f"{path}: field 'layers.{name}.bits' must be a positive number, got {bits!r}")
    return data


def layer_sensitivity(entry):
    """The measured sensitivity of one sidecar layer: its KL at the lowest-bit candidate.

    That is the damage quantizing this layer alone does to the model's output
    distribution, the quantity the mixed-precision allocation ranked it by.
    """
    kl = entry.get("kl")
    if not isinstance(kl, dict) or not kl:
        return None
    def bits_of(key):
        head = str(key).split(":")[0]
        if head in _FORMAT_BITS:  # "nvfp4:16" is a 4-bit candidate
            return float(_FORMAT_BITS[head])
        return float(head) if head.replace(".", "", 1).isdigit() else math.inf
    key = min(kl, key=bits_of)
    return kl[key]


def rank_weights(mode, module_names, metadata, metadata_path="optiq_metadata.json"):
    """Per-module rank weights for `mode`, read from the sidecar; errors name file and field."""
    if mode not in MODES:
        raise ValueError(f"--optiq-rank-scaling: unknown mode {mode!r}; expected one of {list(MODES)}")
    if mode == "constant":
        return {n: 1.0 for n in module_names}
    layers = metadata["layers"]
    missing = [n for n in module_names if n not in layers]
    if missing:
        raise OptiqFileError(
            f"{metadata_path}: field 'layers' has no entry for LoRA target(s) {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; the sidecar must cover every adapted module"
        )
    if mode == "by_bits":
        return {n: float(layers[n]["bits"]) for n in module_names}
    weights = {}
    for n in module_names:
        kl = layer_sensitivity(layers[n])
        if not isinstance(kl, (int, float)) or isinstance(kl, bool) or not math.isfinite(kl):
            raise OptiqFileError(
                f"{metadata_path}: field 'layers.{n}.kl' must map candidates like '4:64' to measured KLs "
                f"(needed by --optiq-rank-scaling by_kl), got {layers[n].get('kl')!r}"
            )
        # A KL can measure as exactly 0 (or a hair below from rounding): keep it
        # positive so the module still gets min_rank, never a zero weight.
        weights[n] = max(float(kl), 1e-12)
    return weights


def plan_ranks(mode, dims_by_module, base_rank, metadata=None, metadata_path="optiq_metadata.json",
               max_rank=None):
    """{module path: rank} for `mode` at the budget of constant `base_rank`."""
    names = list(dims_by_module)
    if mode == "constant":
        return {n: base_rank for n in names}
    if metadata is None:
        raise OptiqFileError(f"--optiq-rank-scaling {mode} needs an optiq_metadata.json sidecar")
    weights = rank_weights(mode, names, metadata, metadata_path)
    return allocate_ranks(dims_by_module, weights, base_rank, max_rank=max_rank)


def apply_rank_plan(model, run_args, options, lora_parameters, use_dora=False, resume=None):
    """Re-rank the LoRA layers stock `linear_to_lora_layers` just made; write the rank record.

    Called (through the mlx_lm.lora hook) inside `train_model`, right after the
    stock conversion and before training. `resume` is a --resume-adapter-file,
    padded or compact, loaded at the planned ranks (its cut-off part must be zero).
    Returns {module path: rank}.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from . import lora_io

    mode = options.get("rank_scaling") or "constant"
    modules = lora_io.lora_modules(model)
    if not modules:
        raise ValueError("--optiq-rank-scaling: the model has no LoRA layers to rank (check --num-layers / keys)")
    dims = {name: lora_io.module_dims(m) for name, m in modules.items()}
    base_rank = int(lora_parameters["rank"])
    metadata, metadata_path = None, None
    if mode != "constant" or options.get("metadata"):
        metadata_path = find_metadata(run_args.model, options.get("metadata"))
        metadata = read_metadata(metadata_path)
    else:
        candidate = Path(run_args.model) / METADATA_FILE
        if candidate.is_file():  # only to record bits next to constant ranks
            metadata_path, metadata = candidate, read_metadata(candidate)
    ranks = plan_ranks(mode, dims, base_rank, metadata, metadata_path, max_rank=options.get("max_rank"))
    lora_io.build_lora_modules(
        model, ranks, scale=lora_parameters["scale"], dropout=lora_parameters.get("dropout", 0.0),
        use_dora=use_dora,
    )
    if resume is not None:
        print(f"[optiq] Loading fine-tuned weights from {resume} at the planned per-layer ranks")
        weights = lora_io.fit_adapter_weights(mx.load(str(resume)), ranks, source=str(resume))
        params = dict(tree_flatten(model.parameters()))
        bad = [k for k, w in weights.items() if k not in params or params[k].shape != w.shape]
        if bad:
            raise ValueError(f"--resume-adapter-file {resume}: tensors {bad[:5]} do not fit the planned ranks")
        model.load_weights(list(weights.items()), strict=False)

    layers = metadata["layers"] if metadata else {}
    entries = {}
    for name in dims:
        entry = {"rank": ranks[name], "input_dims": dims[name][0], "output_dims": dims[name][1]}
        if name in layers:
            entry["bits"] = layers[name]["bits"]
            kl = layer_sensitivity(layers[name])
            if kl is not None:
                entry["kl"] = kl
        entries[name] = entry
    budget = budget_params(dims, base_rank)
    used = lora_params(dims, ranks)
    record = {
        "base_model": str(run_args.model),
        "fine_tune_type": "dora" if use_dora else "lora",
        "rank_scaling": mode,
        "base_rank": base_rank,
        "padded_rank": None,
        "scale": lora_parameters["scale"],
        "dropout": lora_parameters.get("dropout", 0.0),
        "metadata": str(metadata_path) if metadata_path else None,
        "budget_params": budget,
        "trainable_params": used,
        "modules": entries,
    }
    lora_io.write_record(run_args.adapter_path, record)
    hist = {}
    for r in ranks.values():
        hist[r] = hist.get(r, 0) + 1
    print(
        f"[optiq] rank scaling {mode}: {len(ranks)} LoRA modules, ranks "
        + ", ".join(f"{r}x{n}" for r, n in sorted(hist.items()))
        + f"; {used} LoRA parameters vs {budget} at constant rank {base_rank}"
    )
    return ranks
