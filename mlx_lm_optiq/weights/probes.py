"""Probes of the sensitivity sweep: the model with one module changed, and the KL it causes.

A *probe* measures KL(P_ref || P_probe) of the next-token distribution on one batch,
where the probe model differs from the reference in one module only.

Reference modes (what "ref" and "probe" are):
  float    ref = the float model; probe = float model with module m quantized
           (quantize -> dequantize) at candidate c (`FloatProbe`).
  low-bit  ref = every module at its cheapest applicable candidate (real quantized
           modules, built one module at a time from the lazily loaded float
           checkpoint) with m raised to its most expensive candidate ("top");
           probe = the same with m at c (`LowBitProbe`).

Block replay (`Forward`): the reference logits and the hidden states entering every
block are computed once per batch; a probe of a module in block i replays the
recorded output of block i-1 and runs only blocks i.. (lm_head probes run only the
head). With stacked probes, block i is re-run once per probe on its recorded call
arguments and the perturbed outputs of several probes go through blocks i+1.. and
the head as one forward of the model on the tiled tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_lm_optiq.core.errors import OptiqError
from mlx_lm_optiq.core.formats import Candidate, candidate_key
from mlx_lm_optiq.core.model_tree import quantizable_modules, set_module
from mlx_lm_optiq.weights.clipping import Clipper

if TYPE_CHECKING:
    import mlx.core as mx


class SensitivityError(OptiqError):
    """Bad arguments or inputs to a sensitivity sweep."""


def log_line(msg: str, rank: int = 0) -> None:
    """Print a progress line of the sweep (rank 0 only, so a sharded sweep logs once)."""
    if rank == 0:
        print(f"[optiq] {msg}", flush=True)


def qdq(w: mx.array, cand: Candidate) -> mx.array:
    """Quantize then dequantize `w` (simulated quantization, same arithmetic as the real kernels)."""
    import mlx.core as mx

    g, b, mode = cand["group_size"], cand["bits"], cand["mode"]
    packed = mx.quantize(w, g, b, mode=mode)
    biases = packed[2] if len(packed) > 2 else None
    return mx.dequantize(packed[0], packed[1], biases, g, b, mode=mode)


def model_bytes(model: Any) -> int:
    """Bytes the model's parameters occupy."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# ---------------------------------------------------------------- KL


def log_probs(logits: mx.array) -> mx.array:
    """float32 log-softmax over the vocabulary."""
    import mlx.core as mx

    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def kl_sum_lazy(ref_p: mx.array, ref_lp: mx.array, lp: mx.array) -> mx.array:
    """Sum over tokens of KL(ref || probe), as a lazy scalar."""
    import mlx.core as mx

    kl = (ref_p * (ref_lp - lp)).sum(axis=-1)
    # KL is >= 0; float32 rounding can make an exactly-zero KL come out at -1e-9.
    return mx.maximum(kl, 0.0).sum()


def kl_sum(ref_p: mx.array, ref_lp: mx.array, lp: mx.array) -> float:
    """Sum over tokens of KL(ref || probe), as a Python float."""
    return kl_sum_lazy(ref_p, ref_lp, lp).item()


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
        return int(path[len(prefix) :].split(".")[0])
    if path.split(".")[-1] == "lm_head":
        return num_blocks
    return 0  # embeddings and anything else outside the blocks: run everything


class Forward:
    """Log-probs of the model on one batch, optionally starting from a recorded block output.

    With `batch_probes`, probes of modules inside blocks are stacked: block i is run
    once per probe on its recorded call arguments, and the perturbed outputs of
    several probes go through blocks i+1.. and the head as ONE forward of the model
    on the tiled tokens (see `stacked`).
    """

    def __init__(self, model: Any, reuse_hidden_states: bool, batch_probes: bool = False):
        self.model = model
        self.layers, self.prefix = _block_list(model) if reuse_hidden_states else (None, None)
        self.batched = bool(batch_probes and self.layers)
        self.outputs = self.calls = None
        self.kl_floor = None  # per-token KL of an unperturbed stacked probe (0.0: bit-identical)

    @property
    def num_blocks(self) -> int:
        return len(self.layers) if self.layers else 0

    def start_block(self, path: str) -> int:
        return _start_block(path, self.prefix, self.num_blocks) if self.layers else 0

    def reference(self, tokens: mx.array) -> mx.array:
        """Run the whole model, recording every block's output; returns log-probs."""
        import mlx.core as mx

        if not self.layers:
            return log_probs(self.model(tokens))
        outputs, calls, saved = [], [], list(self.layers)
        try:
            self.layers[:] = [_Record(layer, calls, outputs) for layer in saved]
            lp = log_probs(self.model(tokens))
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

    def block_of(self, path: str) -> int | None:
        """Index of the block holding module `path`, or None (embedding, head, no block list)."""
        if not self.layers or not self.prefix or not path.startswith(self.prefix):
            return None
        return int(path[len(self.prefix) :].split(".")[0])

    def block_output(self, i: int) -> mx.array:
        """Block i (with whatever weights it has now) on its recorded reference inputs."""
        args, kwargs = self.calls[i]
        return self.layers[i](*args, **kwargs)

    def stacked(self, tokens: mx.array, i: int, hidden: mx.array) -> mx.array:
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
            return log_probs(self.model(mx.concatenate([tokens] * k, axis=0)))
        finally:
            self.layers[:] = saved

    def __call__(self, tokens: mx.array, start: int) -> mx.array:
        if start == 0 or not self.layers:
            return log_probs(self.model(tokens))
        saved = list(self.layers)
        try:
            for j in range(start):
                self.layers[j] = _Replay(saved[j], self.outputs[j])
            return log_probs(self.model(tokens))
        finally:
            self.layers[:] = saved


# ---------------------------------------------------------------- float reference


class FloatProbe:
    """Float reference: a probe swaps in the simulated-quantized weight of one module."""

    def __init__(
        self,
        model: Any,
        modules: dict[str, Any],
        applicable: dict[str, list[Candidate]],
        quant_dtype: Any,
        clip: Clipper | None = None,
    ):
        self.model, self.modules, self.applicable, self.quant_dtype = model, modules, applicable, quant_dtype
        self.clip = clip

    def probe_weight(self, path: str, weight: mx.array, cand: Candidate) -> mx.array:
        """`weight` as the writer will quantize it (in the checkpoint's dtype, clipped), dequantized."""
        w = weight.astype(self.quant_dtype)
        if self.clip is not None:
            w = self.clip(path, w, cand)
        return qdq(w, cand).astype(weight.dtype)

    def run(
        self, path: str, forward: Forward, tokens: mx.array, start: int, ref_p: mx.array, ref_lp: mx.array
    ) -> dict[str, float]:
        """{candidate key: KL sum} of module `path` on one batch, one forward per candidate."""
        module = self.modules[path]
        weight = module.weight
        sums = {}
        try:
            for c in self.applicable[path]:
                module.weight = self.probe_weight(path, weight, c)
                sums[candidate_key(**c)] = kl_sum(ref_p, ref_lp, forward(tokens, start))
        finally:
            module.weight = weight
        return sums

    def run_block(
        self, paths: list[str], forward: Forward, tokens: mx.array, block: int, probes_per_pass: int
    ) -> dict[str, dict[str, float]]:
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
            kls = [kl_sum_lazy(ref_p[r], ref_lp[r], lp[r]) for r in rows]
            mx.eval(kls)
            for (path, key, _), kl in zip(chunk, kls):
                sums[path][key] = kl.item()
            del lp, outs, kls
        return sums


# ---------------------------------------------------------------- low-bit reference


class _FloatWeights:
    """Fresh lazy float weights of single modules (low-bit mode), never the whole model.

    A float checkpoint is re-opened lazily (mx.load + the model's own sanitize);
    each weight is handed out once per opening, so it is freed after use instead
    of staying materialised. A quantized input is dequantized module by module.
    """

    def __init__(self, model_path, model, quantized_modules):
        self.model_path, self.model, self.quantized = Path(model_path), model, quantized_modules
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


class LowBitProbe:
    """Low-bit reference: the model at each module's cheapest candidate, one module raised per probe.

    model_path: the checkpoint (float weights are re-read from it one module at a time);
    quantized_modules: {path: original quantized module} when the input was quantized.
    """

    def __init__(
        self,
        model_path: str | Path,
        model: Any,
        quantized_modules: dict[str, Any],
        applicable: dict[str, list[Candidate]],
        dtype: Any,
        rank: int = 0,
        progress: bool = True,
    ):
        import mlx.core as mx
        from tqdm import tqdm

        self.model, self.applicable, self.dtype = model, applicable, dtype
        self.float_weights = _FloatWeights(model_path, model, quantized_modules)
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
            set_module(model, path, q)
            del weight
        model.set_dtype(dtype)
        mx.eval(model.parameters())
        self.clip = None
        log_line(f"low-bit reference built: {model_bytes(model) / 2**20:.1f} MiB", rank)

    def quantized(self, path: str, weight: mx.array, cand: Candidate) -> Any:
        """Module `path` really quantized at `cand` from its float `weight` (clipped if set)."""
        if self.clip is not None:
            weight = self.clip(path, weight, cand)
        return _quantized_module(self.templates[path], weight, cand, self.dtype)

    def rebuild_clipped(self, clipper: Clipper, modules: dict[str, Any] | list[str], progress: bool) -> None:
        """Re-quantize the reference's modules with clipped ranges (one float weight at a time)."""
        from tqdm import tqdm

        self.clip = clipper
        for path in tqdm(
            [p for p in modules if self.applicable[p] and p in clipper.moments],
            desc="Clipping the low-bit reference",
            disable=not progress,
        ):
            q = self.quantized(path, self.float_weights(path), self.applicable[path][0])
            self.low[path] = q
            set_module(self.model, path, q)

    def run(
        self, path: str, forward: Forward, tokens: mx.array, start: int, ref_p: mx.array, ref_lp: mx.array
    ) -> dict[str, float]:
        """{candidate key: KL sum} of module `path` on one batch, relative to `path` at its top candidate."""
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
            set_module(self.model, path, top)
            top_lp = forward(tokens, start)
            top_p = mx.exp(top_lp)
            mx.eval(top_lp, top_p)
            sums[candidate_key(**cands[-1])] = 0.0
            for c in cands[1:-1]:
                set_module(self.model, path, self.quantized(path, weight, c))
                sums[candidate_key(**c)] = kl_sum(top_p, top_lp, forward(tokens, start))
            # The cheapest candidate is the reference model itself: no forward needed.
            sums[candidate_key(**cands[0])] = kl_sum(top_p, top_lp, ref_lp)
        finally:
            set_module(self.model, path, self.low[path])
        return sums
