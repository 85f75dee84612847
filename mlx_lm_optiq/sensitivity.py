"""Per-module quantization sensitivity: how much does quantizing one module move the output?

For every quantizable module (every `to_quantized` leaf: attention and MLP
projections, MoE experts, embeddings, lm_head) and every candidate
(bits, group_size, mode), the table holds the mean per-token KL divergence
KL(P_ref || P_probe) of the next-token distribution on calibration tokens, where
the probe model differs from the reference in that one module only.

Reference modes (what "ref" and "probe" are):
  float    ref = the float model; probe = float model with module m quantized
           (quantize -> dequantize) at candidate c. kl[m][c] is the damage of
           quantizing m alone at c. A quantized input checkpoint is dequantized
           first and that dequantization is the float reference.
  low-bit  for models whose float weights exceed memory. The base model is every
           module at its cheapest applicable candidate (real quantized modules,
           built one module at a time from the lazily loaded float checkpoint).
           For module m the reference is the base model with m raised to its most
           expensive applicable candidate ("top"); kl[m][c] = KL(P_{m at top} ||
           P_{m at c}), all other modules at their cheapest candidate. So
           kl[m][top] = 0 and kl[m][cheapest] is the loss from moving m down from
           top to cheapest. The values are losses relative to "m at top" measured
           in the low-bit context, comparable across modules and candidates, which
           is what the knapsack needs; they exclude the (unmeasured) damage of the
           top candidate itself.
  auto     float when the float model fits comfortably in memory, else low-bit.

Methods:
  exact    one forward per (module, candidate, batch). The reference logits and
           the hidden states entering every block are computed once per batch;
           a probe of a module in block i replays the recorded output of block
           i-1 and runs only blocks i.. (lm_head probes run only the head).
  fisher   one backward per calibration sample (float reference only): diagonal
           Fisher F = sum over samples of (d log p(y)/dW)^2 with y sampled from the
           model, and kl[m][c] ~= 0.5 * sum(F * (W - Q_c(W))^2) / num_tokens — the
           second-order estimate of the same KL, in the same units.

Group ranges (clipping="activation", the default): every probe quantizes with each
affine group's range clipped by activation-weighted error (clipping.py), from input
moments measured on the calibration tokens and stored in the table, so the writer
clips exactly what was measured. clipping="none": stock min/max ranges.
"""

import argparse
import hashlib
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from . import clipping as clip
from .allocate import quantized_bits
from .io_utils import OptiqFileError, read_json, write_json

TABLE_KIND = "optiq-sensitivity"
CHECKPOINT_KIND = "optiq-sensitivity-checkpoint"
METHODS = ("exact", "fisher")
REFERENCES = ("auto", "float", "low-bit")
FORMAT_BITS = {"mxfp4": 4, "mxfp8": 8, "nvfp4": 4}
# Memory for the (batch, length, vocab) float32 arrays a probe holds at once
# (reference log-probs and probabilities, probe logits/log-probs).
_LOGITS_BUDGET_BYTES = 1 << 30
# auto picks the float reference when the float model takes at most this share of memory.
_FLOAT_SHARE = 0.6


class SensitivityError(ValueError):
    """Bad arguments or inputs to a sensitivity sweep."""


def _log(msg, rank=0):
    if rank == 0:
        print(f"[optiq] {msg}", flush=True)


# ---------------------------------------------------------------- candidates


def candidate_key(bits, group_size, mode="affine"):
    """Table key of a candidate: "4:64" for affine, "mxfp4:32" for other modes."""
    return f"{bits}:{group_size}" if mode == "affine" else f"{mode}:{group_size}"


def parse_candidate(spec):
    """A candidate dict {"bits","group_size","mode"} from a dict, (bits, gs[, mode]) or "4:64"/"mxfp4:32"."""
    if isinstance(spec, dict):
        try:
            bits, group_size = int(spec["bits"]), int(spec["group_size"])
        except (KeyError, TypeError, ValueError):
            raise SensitivityError(
                f"candidate {spec!r}: expected integer fields 'bits' and 'group_size'"
            ) from None
        mode = spec.get("mode", "affine")
    elif isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        bits, group_size = int(spec[0]), int(spec[1])
        mode = spec[2] if len(spec) == 3 else "affine"
    elif isinstance(spec, str) and re.fullmatch(r"[a-z0-9]+:\d+", spec):
        head, gs = spec.split(":")
        group_size = int(gs)
        if head.isdigit():
            bits, mode = int(head), "affine"
        elif head in FORMAT_BITS:
            bits, mode = FORMAT_BITS[head], head
        else:
            raise SensitivityError(f"candidate {spec!r}: unknown mode {head!r}")
    else:
        raise SensitivityError(
            f"candidate {spec!r}: expected 'BITS:GROUP' (e.g. 4:64), 'MODE:GROUP' (e.g. mxfp4:32), "
            "a (bits, group_size[, mode]) pair or a dict"
        )
    if mode in FORMAT_BITS and bits != FORMAT_BITS[mode]:
        raise SensitivityError(f"candidate {spec!r}: mode {mode} has {FORMAT_BITS[mode]} bits, got {bits}")
    return {"bits": bits, "group_size": group_size, "mode": mode}


def bits_per_weight(cand):
    """Storage bits per weight of a candidate (packed bits + scale/bias overhead)."""
    g = cand["group_size"]
    return quantized_bits(g, cand["bits"], g, cand["mode"]) / g


def cheapest_first(cands):
    """Candidates ordered by storage cost (bits per weight), then bits; ties keep their order."""
    return sorted(cands, key=lambda c: (bits_per_weight(c), c["bits"]))


def normalize_candidates(candidates):
    """Validated candidate dicts, cheapest first; each is tried once with mx.quantize."""
    import mlx.core as mx

    if isinstance(candidates, str):
        candidates = [c for c in candidates.split(",") if c.strip()]
    if not candidates:
        raise SensitivityError("no quantization candidates given")
    out, seen = [], set()
    for spec in candidates:
        c = parse_candidate(spec.strip() if isinstance(spec, str) else spec)
        key = candidate_key(**c)
        if key in seen:
            continue
        seen.add(key)
        try:
            mx.eval(mx.quantize(mx.zeros((32, 128)), c["group_size"], c["bits"], mode=c["mode"]))  # nvfp4 rejects tiny shapes
        except (ValueError, RuntimeError) as e:
            raise SensitivityError(f"candidate {key}: mx.quantize rejects it ({e})") from None
        out.append(c)
    return cheapest_first(out)


def _applicable(module_shape, cands):
    """Candidates whose group size divides the module's input dim (the others cannot be used)."""
    return [c for c in cands if module_shape[-1] % c["group_size"] == 0]


# ---------------------------------------------------------------- modules


def quantizable_modules(model):
    """{path: module} of every `to_quantized` leaf, in model order.

    Raises when the model has already-quantized leaves: their float weights are
    gone, so they must be dequantized first (measure_sensitivity does that).
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    out = {}
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if "scales" in module:
            raise SensitivityError(
                f"module {path} is already quantized ({type(module).__name__}); "
                "dequantize the model first (mlx_lm.utils.dequantize_model)"
            )
        if hasattr(module, "to_quantized"):
            if not isinstance(module.get("weight"), mx.array):
                raise SensitivityError(f"module {path} ({type(module).__name__}) has no 'weight' array")
            out[path] = module
    return out


def _get_module(model, path):
    node = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


def _set_module(model, path, module):
    parent_path, _, name = path.rpartition(".")
    parent = _get_module(model, parent_path) if parent_path else model
    if isinstance(parent, list):
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def _qdq(w, cand):
    """Quantize then dequantize `w` (simulated quantization, same arithmetic as the real kernels)."""
    import mlx.core as mx

    g, b, mode = cand["group_size"], cand["bits"], cand["mode"]
    packed = mx.quantize(w, g, b, mode=mode)
    biases = packed[2] if len(packed) > 2 else None
    return mx.dequantize(packed[0], packed[1], biases, g, b, mode=mode)


# ---------------------------------------------------------------- block replay


class _Replay:
    """Stands in for one block during a forward: returns that block's recorded output.

    Attribute reads go to the real block, because model loops read per-block
    attributes (e.g. llama's `layer.use_sliding`).
    """

    def __init__(self, layer, output):
        self._layer, self._output = layer, output

    def __call__(self, *args, **kwargs):
        return self._output

    def __getattr__(self, name):
        return getattr(self._layer, name)


class _Record(_Replay):
    """Runs the real block, keeping its call arguments and its output."""

    def __init__(self, layer, calls, sink):
        super().__init__(layer, None)
        self._calls, self._sink = calls, sink

    def __call__(self, *args, **kwargs):
        out = self._layer(*args, **kwargs)
        self._calls.append((args, kwargs))
        self._sink.append(out)
        return out


def _block_list(model):
    """(the model's list of blocks, the path prefix of its entries) or (None, None)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        return None, None
    first = layers[0]
    for name, module in model.named_modules():
        if module is first and name.endswith(".0"):
            return layers, name[:-1]
    return None, None


def _start_block(path, prefix, num_blocks):
    """First block a change to module `path` can affect (num_blocks: only the head)."""
    if prefix and path.startswith(prefix):
        return int(path[len(prefix):].split(".")[0])
    if path.split(".")[-1] == "lm_head":
        return num_blocks
    return 0  # embeddings and anything else outside the blocks: run everything


class _Forward:
    """Log-probs of the model on one batch, optionally starting from a recorded block output.

    With `batch_probes`, probes of modules inside blocks are stacked: block i is run
    once per probe on its recorded call arguments, and the perturbed outputs of
    several probes go through blocks i+1.. and the head as ONE forward of the model
    on the tiled tokens (see `stacked`).
    """

    def __init__(self, model, reuse_hidden_states, batch_probes=False):
        self.model = model
        self.layers, self.prefix = _block_list(model) if reuse_hidden_states else (None, None)
        self.batched = bool(batch_probes and self.layers)
        self.outputs = self.calls = None
        self.kl_floor = None  # per-token KL of an unperturbed stacked probe (0.0: bit-identical)

    @property
    def num_blocks(self):
        return len(self.layers) if self.layers else 0

    def start_block(self, path):
        return _start_block(path, self.prefix, self.num_blocks) if self.layers else 0

    def reference(self, tokens):
        """Run the whole model, recording every block's output; returns log-probs."""
        import mlx.core as mx

        if not self.layers:
            return _log_probs(self.model(tokens))
        outputs, calls, saved = [], [], list(self.layers)
        try:
            self.layers[:] = [_Record(layer, calls, outputs) for layer in saved]
            lp = _log_probs(self.model(tokens))
        finally:
            self.layers[:] = saved
        if len(outputs) != len(saved):
            raise SensitivityError(
                f"the model called {len(outputs)} of its {len(saved)} blocks once each; "
                "pass reuse_hidden_states=False for this architecture"
            )
        mx.eval(lp, outputs)
        self.outputs = outputs
        # Block inputs are earlier blocks' outputs (no copy); block 0's is the embedding.
        self.calls = calls if self.batched else None
        return lp

    def block_of(self, path):
        """Index of the block holding module `path`, or None (embedding, head, no block list)."""
        if not self.layers or not self.prefix or not path.startswith(self.prefix):
            return None
        return int(path[len(self.prefix):].split(".")[0])

    def block_output(self, i):
        """Block i (with whatever weights it has now) on its recorded reference inputs."""
        args, kwargs = self.calls[i]
        return self.layers[i](*args, **kwargs)

    def stacked(self, tokens, i, hidden):
        """Log-probs of k probes at once: `hidden` is k outputs of block i stacked on axis 0.

        The model's own forward runs on the tokens tiled k times (so masks etc. are
        built for the stacked batch); blocks 0..i return `hidden` and blocks i+1.. run.
        """
        import mlx.core as mx

        k = hidden.shape[0] // tokens.shape[0]
        saved = list(self.layers)
        try:
            for j in range(i + 1):
                self.layers[j] = _Replay(saved[j], hidden)
            return _log_probs(self.model(mx.concatenate([tokens] * k, axis=0)))
        finally:
            self.layers[:] = saved

    def __call__(self, tokens, start):
        if start == 0 or not self.layers:
            return _log_probs(self.model(tokens))
        saved = list(self.layers)
        try:
            for j in range(start):
                self.layers[j] = _Replay(saved[j], self.outputs[j])
            return _log_probs(self.model(tokens))
        finally:
            self.layers[:] = saved


def _log_probs(logits):
    import mlx.core as mx

    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _kl_sum_lazy(ref_p, ref_lp, lp):
    """Sum over tokens of KL(ref || probe), as a lazy scalar."""
    import mlx.core as mx

    kl = (ref_p * (ref_lp - lp)).sum(axis=-1)
    # KL is >= 0; float32 rounding can make an exactly-zero KL come out at -1e-9.
    return mx.maximum(kl, 0.0).sum()


def _kl_sum(ref_p, ref_lp, lp):
    """Sum over tokens of KL(ref || probe), as a Python float."""
    return _kl_sum_lazy(ref_p, ref_lp, lp).item()


# ---------------------------------------------------------------- loading


def _resolve_path(model_path):
    path = Path(model_path)
    if path.exists():
        return path
    from mlx_lm.utils import _download

    return Path(_download(str(model_path)))


def _float_dtype_of(model):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32


def _memory_budget():
    import mlx.core as mx

    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _load_lazy(model_path):
    """The model with lazy weights, a quantized input dequantized (still lazy).

    Returns (model, info) with info = {"quantized_input": config quantization or None,
    "quantized_modules": {path: original quantized module} (quantized input only),
    "float_dtype": dtype the float weights have}.
    """
    from mlx_lm.utils import dequantize_model, load_model

    model, config = load_model(model_path, lazy=True)
    quantization = config.get("quantization")
    originals = {}
    if quantization is not None:
        for name, module in model.named_modules():
            if "scales" in module and hasattr(module, "bits"):
                originals[name] = module
        dequantize_model(model)
    return model, {
        "quantized_input": quantization,
        "quantized_modules": originals,
        "float_dtype": _float_dtype_of(model),
    }


class _FloatWeights:
    """Fresh lazy float weights of single modules (low-bit mode), never the whole model.

    A float checkpoint is re-opened lazily (mx.load + the model's own sanitize);
    each weight is handed out once per opening, so it is freed after use instead
    of staying materialised. A quantized input is dequantized module by module.
    """

    def __init__(self, model_path, model, quantized_modules):
        self.model_path, self.model, self.quantized = model_path, model, quantized_modules
        self._lazy = {}

    def __call__(self, path):
        import mlx.core as mx

        if self.quantized:
            m = self.quantized[path]
            return mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, mode=m.mode)
        key = f"{path}.weight"
        if key not in self._lazy:
            weights = {}
            for f in sorted(self.model_path.glob("model*.safetensors")):
                weights.update(mx.load(str(f)))
            if hasattr(self.model, "sanitize"):
                weights = self.model.sanitize(weights)
            self._lazy = weights
        if key not in self._lazy:
            raise SensitivityError(f"{self.model_path}: no weight {key!r} in the checkpoint")
        return self._lazy.pop(key)


def _quantized_module(template, weight, cand, dtype):
    """A real quantized copy of `template` (a float module) with `weight`, computing in `dtype`."""
    import mlx.core as mx

    placeholder = template.weight
    template.weight = weight
    try:
        q = template.to_quantized(group_size=cand["group_size"], bits=cand["bits"], mode=cand["mode"])
    finally:
        template.weight = placeholder
    q.set_dtype(dtype)
    mx.eval(q.parameters())
    return q


# ---------------------------------------------------------------- checkpoint


class _Checkpoint:
    """Partial KL sums, saved after each (batch, module) so an interrupted sweep resumes."""

    def __init__(self, path, fingerprint):
        self.path = Path(path) if path else None
        self.fingerprint = fingerprint
        self.sums, self.done = {}, set()
        if self.path and self.path.exists():
            data = read_json(self.path, kind=CHECKPOINT_KIND, required=["fingerprint", "sums", "done"])
            for field, value in fingerprint.items():
                if data["fingerprint"].get(field) != value:
                    raise SensitivityError(
                        f"{self.path}: field 'fingerprint.{field}' is {data['fingerprint'].get(field)!r} "
                        f"but this sweep has {value!r}; delete the checkpoint or use another path"
                    )
            self.sums = data["sums"]
            self.done = {(int(b), p) for b, p in data["done"]}
            _log(f"resuming from {self.path}: {len(self.done)} (batch, module) probes already done")

    def record(self, batch, path, kl_sums):
        entry = self.sums.setdefault(path, {})
        for key, value in kl_sums.items():
            entry[key] = entry.get(key, 0.0) + value
        self.done.add((batch, path))
        if self.path:
            write_json(
                self.path,
                {"fingerprint": self.fingerprint, "sums": self.sums, "done": sorted(self.done)},
                kind=CHECKPOINT_KIND,
            )


# ---------------------------------------------------------------- the sweep


def _tokens_info(tokens):
    import mlx.core as mx

    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise SensitivityError(f"tokens must be a (num_samples, sequence_length >= 2) array, got {tokens.shape}")
    arr = np.asarray(tokens.astype(mx.int32))
    return {
        "num_samples": int(arr.shape[0]),
        "sequence_length": int(arr.shape[1]),
        "tokens": int(arr.size),
        "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
    }


def measure_sensitivity(
    model_path,
    tokens,
    candidates,
    *,
    method="exact",
    reference="auto",
    checkpoint_path=None,
    progress=True,
    group=None,
    batch_size=None,
    modules=None,
    reuse_hidden_states=True,
    batch_probes=None,
    dtype=None,
    memory_budget=None,
    seed=0,
    on_probe=None,
    clipping="activation",
):
    """Measure the sensitivity table of the model at `model_path` (see the module docstring).

    tokens: (N, L) calibration tokens (calibration.load_calibration).
    candidates: "4:64,8:64", ["4:64", "mxfp4:32"], [(4, 64)] or candidate dicts.
    group: an mx.distributed group; modules (exact) or samples (fisher) are split
      over its ranks and the results summed, so every rank returns the full table.
    batch_size: samples per forward (default: what fits a 1 GiB logits budget).
    modules: measure only these module paths (default: every quantizable module).
    reuse_hidden_states: False runs the full model for every probe (for checking).
    batch_probes: stack the probes of a block's modules into shared forwards of the
      later blocks and the head (float reference, exact method); False: one forward
      per probe; None (default): stack on a GPU, not on the CPU (no gain there).
      Same numbers either way (to float rounding).
    dtype: compute dtype (default float32 on CPU, the checkpoint's float dtype elsewhere).
    memory_budget: bytes `reference="auto"` compares the float model against; on a
      GPU, stacked probe passes may use 10% of it (at least 1 GiB) for logits.
    on_probe(batch_index, module_path): called after each module finishes a batch.
    clipping: "activation" (default): every probe quantizes the module's weight with
      group ranges clipped by activation-weighted error (clipping.py), input moments
      measured on `tokens` and stored in the table so the writer clips identically;
      "none": stock min/max ranges.
    """
    import mlx.core as mx
    from tqdm import tqdm

    if method not in METHODS:
        raise SensitivityError(f"method must be one of {METHODS}, got {method!r}")
    if reference not in REFERENCES:
        raise SensitivityError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if clipping not in clip.METHODS:
        raise SensitivityError(f"clipping must be one of {clip.METHODS}, got {clipping!r}")
    cands = normalize_candidates(candidates)
    keys = [candidate_key(**c) for c in cands]
    tokens = mx.array(tokens)
    calib = _tokens_info(tokens)
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)

    model_path = _resolve_path(model_path)
    model, info = _load_lazy(model_path)
    if info["quantized_input"] is not None:
        q = info["quantized_input"]
        _log(
            f"{model_path} is quantized ({q.get('bits')}-bit, group {q.get('group_size')}): "
            "the float reference is its dequantization",
            rank,
        )
    every_module = quantizable_modules(model)
    shapes = {p: list(m.weight.shape) for p, m in every_module.items()}
    applicable = {p: _applicable(shapes[p], cands) for p in every_module}
    all_modules = every_module
    if modules is not None:
        wanted = set(modules)
        unknown = sorted(wanted - set(every_module))
        if unknown:
            raise SensitivityError(f"modules {unknown} are not quantizable modules of {model_path}")
        all_modules = {p: m for p, m in every_module.items() if p in wanted}
    for p in all_modules:
        if not applicable[p]:
            _log(f"{p}: input dim {shapes[p][-1]} fits no candidate group size; recorded with no KL entries", rank)

    if dtype is None:
        dtype = mx.float32 if mx.default_device() == mx.cpu else info["float_dtype"]
    elif isinstance(dtype, str):
        dtype = getattr(mx, dtype)
    if reference == "auto":
        from mlx.utils import tree_flatten

        float_bytes = sum(v.size for _, v in tree_flatten(model.parameters())) * dtype.size
        budget = memory_budget or _memory_budget()
        reference = "float" if float_bytes <= _FLOAT_SHARE * budget else "low-bit"
        _log(
            f"reference=auto: float model needs {float_bytes / 2**30:.2f} GiB of "
            f"{budget / 2**30:.1f} GiB -> {reference}",
            rank,
        )
    if method == "fisher" and reference != "float":
        raise SensitivityError(
            "method='fisher' needs gradients of the float model, so it needs reference='float' "
            "(the low-bit reference is only available with method='exact')"
        )
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab is not None and (int(tokens.max().item()) >= vocab or int(tokens.min().item()) < 0):
        raise SensitivityError(
            f"calibration tokens must be ids in [0, {vocab}) for {model_path}, got "
            f"[{tokens.min().item()}, {tokens.max().item()}] (tokenized with another model's tokenizer?)"
        )
    if batch_size is None:
        vocab_bytes = 4 * 4 * _vocab_size(model)
        batch_size = max(1, min(calib["num_samples"], _LOGITS_BUDGET_BYTES // (vocab_bytes * calib["sequence_length"])))
    batch_size = int(batch_size)
    # Stacked probes of one pass hold ~3 (rows, length, vocab) arrays (logits, their float32
    # copy, log-probs) plus the reference pass's log-probs and probabilities. The CPU gains
    # nothing from bigger passes (it is compute bound), a GPU gains from fewer, larger ones
    # (a small model's forward is launch bound).
    pass_bytes = _LOGITS_BUDGET_BYTES
    if mx.default_device() != mx.cpu:
        pass_bytes = max(pass_bytes, int(0.1 * (memory_budget or _memory_budget())))
    if batch_probes is None:
        batch_probes = mx.default_device() != mx.cpu
    probes_per_pass = 1
    if batch_probes and method == "exact" and vocab is not None:
        # + the in-pass reference log-probs and probabilities (8 bytes)
        probes_per_pass = max(1, pass_bytes // (20 * batch_size * calib["sequence_length"] * int(vocab)))

    table = {
        "model": str(model_path),
        "method": method,
        "reference": reference,
        "calibration": calib,
        "candidates": cands,
        "float_reference": (
            "dequantized from the quantized input" if info["quantized_input"] is not None else "float checkpoint"
        ),
        "modules": {},
    }

    quant_dtype = info["float_dtype"]
    started = time.perf_counter(), time.process_time()

    def measure_moments():
        # Every rank measures on all tokens: identical moments, so identical clipping.
        moments = clip.input_moments(model, list(all_modules), tokens, batch_size)
        _log(f"clipping: input moments of {len(moments)} modules measured on {calib['tokens']} tokens", rank)
        return clip.Clipper(moments)

    clipper = None
    if reference == "float":  # both methods; fisher needs it (checked above)
        info["quantized_modules"] = {}  # the dequantized weights are all we need
        model.set_dtype(dtype)
        mx.eval(model.parameters())
        if clipping != "none":
            clipper = measure_moments()
    if method == "fisher":
        sums = _fisher_sweep(model, all_modules, applicable, tokens, quant_dtype, rank, size, group, progress,
                             seed, clipper)
    else:
        fingerprint = dict(
            model=str(model_path), method=method, reference=reference, candidates=keys,
            calibration_sha256=calib["sha256"], batch_size=batch_size, modules=list(all_modules),
            dtype=str(dtype), rank=rank, size=size, clipping=clipping,
        )
        ckpt_path = checkpoint_path
        if ckpt_path is not None and size > 1:
            ckpt_path = f"{checkpoint_path}.rank{rank}-of-{size}"
        ckpt = _Checkpoint(ckpt_path, fingerprint)
        mine = [p for i, p in enumerate(all_modules) if i % size == rank]
        if reference == "float":
            probe = _FloatProbe(model, all_modules, applicable, quant_dtype, clipper)
        else:
            probe = _LowBitProbe(model_path, model, info, all_modules, applicable, dtype, rank, progress)
            if clipping != "none":
                # The float model is never resident here: the moments come from the low-bit
                # reference, which is then rebuilt with clipped ranges.
                clipper = measure_moments()
                probe.rebuild_clipped(clipper, all_modules, progress and rank == 0)
        # What the reference model occupies (the whole point of the low-bit mode).
        table["reference_model_bytes"] = _nbytes(model)
        forward = _exact_sweep(model, probe, mine, tokens, batch_size, ckpt, reuse_hidden_states, rank, progress,
                               on_probe, probes_per_pass)
        table["probes_per_pass"] = probes_per_pass if forward.batched else 1
        if forward.kl_floor is not None:
            table["stacked_probe_kl_floor"] = forward.kl_floor
        sums = ckpt.sums
        if size > 1:
            sums = _all_sum_table(sums, list(all_modules), keys, applicable, group)

    _log(
        f"{method} sweep ({reference} reference, {len(all_modules)} modules, {len(cands)} candidates, "
        f"{calib['tokens']} tokens): {time.perf_counter() - started[0]:.1f}s wall, "
        f"{time.process_time() - started[1]:.1f}s CPU",
        rank,
    )
    table["clipping"] = clip.to_table(clipping, clipper.moments if clipper is not None else None)
    num_tokens = calib["tokens"]
    for p in all_modules:
        table["modules"][p] = {
            "num_params": int(np.prod(shapes[p])),
            "shape": shapes[p],
            "kl": {candidate_key(**c): sums.get(p, {})[candidate_key(**c)] / num_tokens for c in applicable[p]},
        }
    return table


def _vocab_size(model):
    args = getattr(model, "args", None)
    vocab = getattr(args, "vocab_size", None)
    if vocab is None:
        raise SensitivityError("cannot infer the vocabulary size (model.args.vocab_size); pass batch_size")
    return int(vocab)


class _FloatProbe:
    """Float reference: a probe swaps in the simulated-quantized weight of one module."""

    def __init__(self, model, modules, applicable, quant_dtype, clip=None):
        self.model, self.modules, self.applicable, self.quant_dtype = model, modules, applicable, quant_dtype
        self.clip = clip

    def probe_weight(self, path, weight, cand):
        """`weight` as the writer will quantize it (in the checkpoint's dtype, clipped), dequantized."""
        w = weight.astype(self.quant_dtype)
        if self.clip is not None:
            w = self.clip(path, w, cand)
        return _qdq(w, cand).astype(weight.dtype)

    def run(self, path, forward, tokens, start, ref_p, ref_lp):
        module = self.modules[path]
        weight = module.weight
        sums = {}
        try:
            for c in self.applicable[path]:
                module.weight = self.probe_weight(path, weight, c)
                sums[candidate_key(**c)] = _kl_sum(ref_p, ref_lp, forward(tokens, start))
        finally:
            module.weight = weight
        return sums

    def run_block(self, paths, forward, tokens, block, probes_per_pass):
        """{path: {key: KL sum}} for modules of one block, probes stacked in passes of the model.

        All passes of a block have the same number of slots S (the last one padded with
        the unperturbed output), and slot k of a probe pass is compared with slot k of
        one reference pass of S unperturbed copies. Why: BLAS/GPU kernels round a row
        differently depending on how many rows the matmul has and where the row sits, so
        the reference must go through exactly the same kernels as its probe for the
        unperturbed part of the model to cancel (as it does when the reference and the
        probe are separate forwards of the same shape). Cost: one extra pass per block.
        """
        import mlx.core as mx

        probes = []  # (path, candidate key, perturbed output of `block`)
        for path in paths:
            module = self.modules[path]
            weight = module.weight
            try:
                for c in self.applicable[path]:
                    module.weight = self.probe_weight(path, weight, c)
                    out = forward.block_output(block)
                    mx.eval(out)
                    probes.append((path, candidate_key(**c), out))
            finally:
                module.weight = weight
        sums = {p: {} for p in paths}
        if not probes:
            return sums
        n, slots = tokens.shape[0], min(probes_per_pass, len(probes))
        unperturbed = forward.outputs[block]
        ref_lp = forward.stacked(tokens, block, mx.concatenate([unperturbed] * slots, axis=0))
        ref_p = mx.exp(ref_lp)
        mx.eval(ref_lp, ref_p)
        for s in range(0, len(probes), slots):
            chunk = probes[s : s + slots]
            outs = [o for _, _, o in chunk] + [unperturbed] * (slots - len(chunk))
            lp = forward.stacked(tokens, block, mx.concatenate(outs, axis=0))
            rows = [slice(k * n, (k + 1) * n) for k in range(len(chunk))]
            kls = [_kl_sum_lazy(ref_p[r], ref_lp[r], lp[r]) for r in rows]
            mx.eval(kls)
            for (path, key, _), kl in zip(chunk, kls):
                sums[path][key] = kl.item()
            del lp, outs, kls
        return sums


class _LowBitProbe:
    """Low-bit reference: the model at each module's cheapest candidate, one module raised per probe."""

    def __init__(self, model_path, model, info, modules, applicable, dtype, rank, progress):
        import mlx.core as mx
        from tqdm import tqdm

        self.model, self.applicable, self.dtype = model, applicable, dtype
        self.float_weights = _FloatWeights(model_path, model, info["quantized_modules"])
        # Every quantizable module, not just the measured ones, goes to its cheapest
        # candidate: that is the reference model.
        self.templates = quantizable_modules(model)
        self.low = {}
        for path, template in tqdm(
            self.templates.items(), desc="Building the low-bit reference", disable=not progress or rank != 0
        ):
            cands = applicable[path]
            weight = template.weight
            # The template keeps a zero-size weight: it only provides class, bias and sizes.
            template.weight = mx.zeros((0,), dtype=weight.dtype)
            if not cands:
                template.weight = weight.astype(dtype)
                mx.eval(template.weight)
                self.low[path] = template
                continue
            q = _quantized_module(template, weight, cands[0], dtype)
            self.low[path] = q
            _set_module(model, path, q)
            del weight
        model.set_dtype(dtype)
        mx.eval(model.parameters())
        self.clip = None
        _log(f"low-bit reference built: {_nbytes(model) / 2**20:.1f} MiB", rank)

    def quantized(self, path, weight, cand):
        if self.clip is not None:
            weight = self.clip(path, weight, cand)
        return _quantized_module(self.templates[path], weight, cand, self.dtype)

    def rebuild_clipped(self, clipper, modules, progress):
        """Re-quantize the reference's modules with clipped ranges (one float weight at a time)."""
        from tqdm import tqdm

        self.clip = clipper
        for path in tqdm([p for p in modules if self.applicable[p] and p in clipper.moments],
                         desc="Clipping the low-bit reference", disable=not progress):
            q = self.quantized(path, self.float_weights(path), self.applicable[path][0])
            self.low[path] = q
            _set_module(self.model, path, q)

    def run(self, path, forward, tokens, start, ref_p, ref_lp):
        import mlx.core as mx

        cands = self.applicable[path]
        if not cands:
            return {}
        if len(cands) == 1:
            return {candidate_key(**cands[0]): 0.0}
        weight = self.float_weights(path)
        sums = {}
        try:
            top = self.quantized(path, weight, cands[-1])
            _set_module(self.model, path, top)
            top_lp = forward(tokens, start)
            top_p = mx.exp(top_lp)
            mx.eval(top_lp, top_p)
            sums[candidate_key(**cands[-1])] = 0.0
            for c in cands[1:-1]:
                _set_module(self.model, path, self.quantized(path, weight, c))
                sums[candidate_key(**c)] = _kl_sum(top_p, top_lp, forward(tokens, start))
            # The cheapest candidate is the reference model itself: no forward needed.
            sums[candidate_key(**cands[0])] = _kl_sum(top_p, top_lp, ref_lp)
        finally:
            _set_module(self.model, path, self.low[path])
        return sums


def _nbytes(model):
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _exact_sweep(model, probe, mine, tokens, batch_size, ckpt, reuse, rank, progress, on_probe, probes_per_pass=1):
    """Run every pending (batch, module) probe; returns the _Forward (its kl_floor, batched flag)."""
    import mlx.core as mx
    from tqdm import tqdm

    # Stacking needs at least 2 probes a pass; the low-bit probe keeps one forward per probe.
    forward = _Forward(model, reuse, batch_probes=probes_per_pass > 1 and hasattr(probe, "run_block"))
    num = tokens.shape[0]
    batches = [(b, tokens[s : s + batch_size]) for b, s in enumerate(range(0, num, batch_size))]
    todo = sum(1 for b, _ in batches for p in mine if (b, p) not in ckpt.done)
    bar = tqdm(total=todo, desc="Sensitivity (exact)", unit="module", disable=not progress or rank != 0)
    checked = False
    for b, batch in batches:
        pending = [p for p in mine if (b, p) not in ckpt.done]
        if not pending:
            continue
        ref_lp = forward.reference(batch)
        ref_p = mx.exp(ref_lp)
        mx.eval(ref_p)
        if forward.layers and not checked:
            _check_replay(forward, batch, ref_lp, rank)
            checked = True
        i = 0
        while i < len(pending):
            block = forward.block_of(pending[i]) if forward.batched else None
            group = [pending[i]]
            # Modules of the same block share their stacked passes.
            while block is not None and i + len(group) < len(pending) \
                    and forward.block_of(pending[i + len(group)]) == block:
                group.append(pending[i + len(group)])
            i += len(group)
            bar.set_postfix_str(group[0] if len(group) == 1 else f"block {block} ({len(group)} modules)",
                                refresh=False)
            if block is None:
                results = {group[0]: probe.run(group[0], forward, batch, forward.start_block(group[0]), ref_p, ref_lp)}
            else:
                results = probe.run_block(group, forward, batch, block, probes_per_pass)
            for path in group:
                ckpt.record(b, path, results[path])
                bar.update(1)
                if on_probe is not None:
                    on_probe(b, path)
        del ref_lp, ref_p
        forward.outputs = forward.calls = None
    bar.close()
    return forward


def _check_replay(forward, batch, ref_lp, rank):
    """Replaying recorded block outputs must reproduce the reference; else run full forwards."""
    import mlx.core as mx

    start = max(1, forward.num_blocks // 2)
    diff = mx.abs(forward(batch, start) - ref_lp).max().item()
    if not diff <= 1e-3:
        _log(f"replaying block outputs changed the log-probs by {diff:.2e}: using full forwards", rank)
        forward.layers = None
        forward.batched = False
        return
    if forward.batched:
        # A stacked pass of [recorded output, block `start` re-run on its recorded inputs] must
        # reproduce the reference log-probs, and match a stacked pass of two recorded outputs
        # (the in-pass reference) exactly: kl_floor is their KL, 0.0 when rounding depends only
        # on a row's slot and the pass size, which is what run_block relies on.
        n = batch.shape[0]
        recorded = forward.outputs[start]
        lp = forward.stacked(batch, start, mx.concatenate([recorded, forward.block_output(start)]))
        ref = forward.stacked(batch, start, mx.concatenate([recorded, recorded]))
        diff = max(mx.abs(lp[:n] - ref_lp).max().item(), mx.abs(lp[n:] - ref_lp).max().item())
        if not diff <= 1e-3:
            _log(f"stacking probes changed the log-probs by {diff:.2e}: one forward per probe", rank)
            forward.batched = False
            forward.calls = None
            return
        forward.kl_floor = _kl_sum(mx.exp(ref), ref, lp) / (2 * batch.size)


def _all_sum_table(sums, paths, keys, applicable, group):
    """Sum the ranks' partial tables (each (module, candidate) was measured by one rank)."""
    import mlx.core as mx

    index = {k: i for i, k in enumerate(keys)}
    local = np.zeros((len(paths), len(keys)), dtype=np.float64)
    for i, p in enumerate(paths):
        for k, v in sums.get(p, {}).items():
            local[i, index[k]] = v
    total = mx.distributed.all_sum(mx.array(local), group=group, stream=mx.cpu)
    total = np.array(total)
    return {
        p: {candidate_key(**c): float(total[i, index[candidate_key(**c)]]) for c in applicable[p]}
        for i, p in enumerate(paths)
    }


def _fisher_sweep(model, modules, applicable, tokens, quant_dtype, rank, size, group, progress, seed, clipper=None):
    """Diagonal Fisher from one backward per sample (model already at its compute dtype);
    returns {path: {key: predicted KL sum}}."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from tqdm import tqdm

    model.freeze()
    for m in modules.values():
        m.unfreeze(keys=["weight"], recurse=False)

    def loss_fn(model, x, key):
        logits = model(x).astype(mx.float32)
        # Labels sampled from the model make E[g g^T] the true Fisher (not the empirical one).
        y = mx.random.categorical(mx.stop_gradient(logits), key=key)
        return nn.losses.cross_entropy(logits, y, reduction="sum")

    grad_fn = nn.value_and_grad(model, loss_fn)
    fisher = {p: mx.zeros(m.weight.shape, dtype=mx.float32) for p, m in modules.items()}
    mine = [i for i in range(tokens.shape[0]) if i % size == rank]
    for i in tqdm(mine, desc="Sensitivity (fisher)", unit="sample", disable=not progress or rank != 0):
        _, grads = grad_fn(model, tokens[i : i + 1], mx.random.key(seed * 1_000_003 + i))
        grads = dict(tree_flatten(grads))
        for p in modules:
            fisher[p] = fisher[p] + grads[f"{p}.weight"].astype(mx.float32) ** 2
        mx.eval(list(fisher.values()))
    model.unfreeze()
    if size > 1:
        for p in modules:
            fisher[p] = mx.distributed.all_sum(fisher[p], group=group, stream=mx.cpu)
    sums = {}
    desc = "Fisher: clipped quantization errors" if clipper is not None else "Fisher: quantization errors"
    for p, m in tqdm(modules.items(), desc=desc, unit="module", disable=not progress or rank != 0):
        w = m.weight.astype(quant_dtype)
        sums[p] = {}
        for c in applicable[p]:
            err = (w - _qdq(clipper(p, w, c) if clipper is not None else w, c)).astype(mx.float32)
            sums[p][candidate_key(**c)] = 0.5 * (fisher[p] * err * err).sum().item()
    return sums


# ---------------------------------------------------------------- table files


def save_table(table, path):
    """Write a sensitivity table (kind optiq-sensitivity, format_version 1)."""
    _validate_table(table, path)
    return write_json(path, table, kind=TABLE_KIND)


def load_table(path):
    """Read and validate a sensitivity table; errors name the file and the field."""
    table = read_json(path, kind=TABLE_KIND, required=["model", "method", "reference", "calibration", "candidates", "modules"])
    _validate_table(table, path)
    return table


def _validate_table(table, path):
    def bad(field, expected):
        raise OptiqFileError(f"{path}: field {field} {expected}")

    if table.get("method") not in METHODS:
        bad("'method'", f"must be one of {list(METHODS)}, got {table.get('method')!r}")
    if table.get("reference") not in ("float", "low-bit"):
        bad("'reference'", f"must be 'float' or 'low-bit', got {table.get('reference')!r}")
    calib = table.get("calibration")
    if not isinstance(calib, dict):
        bad("'calibration'", "must be an object")
    for f in ("num_samples", "sequence_length", "tokens"):
        if not isinstance(calib.get(f), int) or calib[f] < 1:
            bad(f"'calibration.{f}'", f"must be a positive integer, got {calib.get(f)!r}")
    if not isinstance(calib.get("sha256"), str):
        bad("'calibration.sha256'", "must be a string")
    cands = table.get("candidates")
    if not isinstance(cands, list) or not cands:
        bad("'candidates'", "must be a non-empty list")
    keys = set()
    for i, c in enumerate(cands):
        if not isinstance(c, dict) or not isinstance(c.get("bits"), int) or not isinstance(c.get("group_size"), int) \
                or not isinstance(c.get("mode"), str):
            bad(f"'candidates[{i}]'", f"must be {{'bits': int, 'group_size': int, 'mode': str}}, got {c!r}")
        keys.add(candidate_key(c["bits"], c["group_size"], c["mode"]))
    mods = table.get("modules")
    if not isinstance(mods, dict) or not mods:
        bad("'modules'", "must be a non-empty object")
    for p, entry in mods.items():
        where = f"'modules[{p!r}]"
        if not isinstance(entry, dict):
            bad(where + "'", "must be an object")
        if not isinstance(entry.get("num_params"), int) or entry["num_params"] < 1:
            bad(where + ".num_params'", f"must be a positive integer, got {entry.get('num_params')!r}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape) \
                or math.prod(shape) != entry["num_params"]:
            bad(where + ".shape'", f"must be a list of positive ints with product num_params, got {shape!r}")
        kl = entry.get("kl")
        if not isinstance(kl, dict):
            bad(where + ".kl'", "must be an object")
        for k, v in kl.items():
            if k not in keys:
                bad(f"{where}.kl[{k!r}]'", f"is not one of the table's candidates {sorted(keys)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(f"{where}.kl[{k!r}]'", f"must be a finite number >= 0, got {v!r}")
    if "clipping" in table:
        clip.validate_table_entry(table["clipping"], mods, path)


# ---------------------------------------------------------------- command line


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m mlx_lm_optiq.sensitivity",
        description="Measure per-module quantization sensitivity (KL divergence) of an mlx-lm model.",
    )
    parser.add_argument("--model", required=True, help="local model directory or Hugging Face repo")
    parser.add_argument("--output", required=True, help="sensitivity table to write (JSON)")
    parser.add_argument("--candidates", default="4:64,8:64", help="comma-separated, e.g. 2:64,4:64,8:64 or mxfp4:32")
    parser.add_argument("--method", choices=METHODS, default="exact")
    parser.add_argument("--reference", choices=REFERENCES, default="auto")
    parser.add_argument("--clipping", choices=clip.METHODS, default="activation",
                        help="group ranges of every probe: clipped by activation-weighted error, or stock min/max")
    parser.add_argument("--calibration", default=None, help="JSONL with 'text' or 'messages' (default: bundled set)")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--checkpoint", default=None, help="resume file for an interrupted sweep")
    parser.add_argument("--modules", default=None, help="comma-separated module paths (default: all)")
    parser.add_argument("--no-reuse-hidden-states", action="store_true", help="full forward per probe (slow; for checking)")
    parser.add_argument("--batch-probes", choices=("auto", "on", "off"), default="auto",
                        help="stack probes of one block into shared forwards (auto: on a GPU only)")
    parser.add_argument("--distributed", action="store_true", help="shard over mx.distributed ranks (mlx.launch)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None):
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    from .calibration import load_calibration

    args = build_parser().parse_args(argv)
    group = mx.distributed.init() if args.distributed else None
    model_path = _resolve_path(args.model)
    tokenizer = load_tokenizer(model_path)
    tokens = load_calibration(tokenizer, args.calibration, args.num_samples, args.sequence_length, args.seed)
    table = measure_sensitivity(
        model_path, tokens, args.candidates, method=args.method, reference=args.reference,
        checkpoint_path=args.checkpoint, progress=not args.quiet, group=group, batch_size=args.batch_size,
        modules=args.modules.split(",") if args.modules else None,
        reuse_hidden_states=not args.no_reuse_hidden_states, batch_probes={"auto": None, "on": True, "off": False}[args.batch_probes], seed=args.seed,
        clipping=args.clipping,
    )
    table["calibration"]["source"] = args.calibration or "bundled"
    if group is None or group.rank() == 0:
        save_table(table, args.output)
        _log(f"wrote {args.output} ({len(table['modules'])} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
