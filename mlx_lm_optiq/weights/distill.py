"""Distil the written model's affine scales and biases against the float model (mlx-lm's DWQ).

Why: after the plan chose every module's format and the writer rounded its weights, the model
still drifts from the float model because each module was rounded for its own output, not for
the whole network's. Training only the per-group scales and biases (codes and formats fixed, so
the size is exactly the plan's) on the float model's next-token distributions pulls the errors of
all modules together back towards it. Measured on the bundled model (docs/weights.md,
"Distillation"): the 3.5-BPW plan, GPTQ-written, held-out KL 0.946 -> 0.597 after 22 steps of 4
windows of 256 tokens on the CPU (~14 min on 2 cores).

How: `mlx_lm.quant.dwq.dwq_quantize` (stock DWQ: it unfreezes the scales and biases of every
affine module below 8 bits, Adam on the KL against `target_fn`; we pass temperature 1, the KL
the plan minimises, where its default is 2) run on our written model, the float model as the teacher. On a CPU every quantized module is swapped for a
simulated twin with the same attributes (`bits`, `group_size`, `mode`: what DWQ unfreezes by)
that computes dequantize -> fp32 matmul, because MLX's CPU quantized matmul has no BLAS (stock
`mlx_lm.dwq` needed 549 s for its first validation batch here); `mx.dequantize` has a vjp in the
scales and biases equal to `mx.quantized_matmul`'s (the test checks it). Elsewhere the stock
quantized modules train as they are. The result is kept only if the validation windows' KL went
down and every trained value is finite; otherwise the written tensors stay and the summary says
why.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core import calibration, model_tree
from mlx_lm_optiq.core.backend import compute_backend

BATCH_SIZE = 4  # windows per step (mlx_lm.dwq's CLI default)
VALID_WINDOWS = 4  # calibration windows held out to check the distillation helped
# Adam (with bias correction, as mlx_lm.dwq runs it; its CLI default is 1e-6) at a rate chosen by how
# far the written model is from the float one (its KL on the held-out calibration windows): far
# (3.5 BPW, 0.65-0.97) 3e-5 beat 1e-5 (held-out Emma KL 0.597 vs 0.721) and 3e-5 helped at 4.5 BPW
# (0.131 -> 0.096 on the H200); near (5.0 BPW, 0.0715) 3e-5 made it worse (-> 0.0876, not kept)
# where 1e-5 lowered it (-> 0.0549; held-out Emma 0.0681 -> 0.0541). docs/weights.md, "Distillation".
LEARNING_RATE = 3e-5
NEAR_LEARNING_RATE = 1e-5
NEAR_KL = 0.1  # below this starting KL, NEAR_LEARNING_RATE


def learning_rate_for(kl_before: float) -> float:
    """The Adam rate for a written model whose held-out calibration KL is `kl_before`."""
    return NEAR_LEARNING_RATE if kl_before < NEAR_KL else LEARNING_RATE


# The KL's softmax temperature: 1, the KL the plan minimises and the evaluation measures. DWQ's
# default 2 lowered the bundled model's 3.5-BPW held-out KL 0.82x in 22 steps at lr 1e-5, the plain KL 0.76x
# (docs/weights.md, "Distillation").
TEMPERATURE = 1.0


class DistillError(ValueError):
    """The distillation cannot run as asked (names the setting and what was expected)."""


def windows(tokenizer: Any, text: str | Path | None, sequence_length: int, steps: int) -> tuple[list, list]:
    """(train, valid) rows of (tokens, 0) as mlx_lm's DWQ datasets give them: every
    non-overlapping window of `sequence_length` tokens of the calibration text, the last
    VALID_WINDOWS held out, the others repeated in order until `steps` batches are filled."""
    stream = calibration.token_stream(tokenizer, text)
    n = len(stream) // sequence_length
    if n < VALID_WINDOWS + 1:
        raise DistillError(
            f"distill_steps: the calibration text makes {n} windows of {sequence_length} tokens; "
            f"distillation needs at least {VALID_WINDOWS + 1} ({VALID_WINDOWS} held out to check it)"
        )
    rows = [stream[i * sequence_length : (i + 1) * sequence_length].tolist() for i in range(n)]
    train, valid = rows[: n - VALID_WINDOWS], rows[n - VALID_WINDOWS :]
    need = steps * BATCH_SIZE
    train = [train[i % len(train)] for i in range(need)]
    return [(t, 0) for t in train], [(t, 0) for t in valid]


def simulated(model: Any) -> Any:
    """Swap every quantized Linear/Embedding of `model` for its simulated twin (`_simulated_class`:
    dequantize -> float matmul, same parameters and attributes), in place; floats to fp32."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    simulated_class = _simulated_class()
    swaps = [
        (path, simulated_class(m))
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    ]
    model.update_modules(tree_unflatten(swaps))
    model_tree.cast_floats(model, mx.float32)
    return model


@functools.cache
def _simulated_class() -> type:
    """The `Simulated` module class (built on first use: this module imports mlx lazily)."""
    import mlx.core as mx
    import mlx.nn as nn

    class Simulated(nn.Module):
        """A quantized Linear or Embedding computed as dequantize -> float matmul / gather (fp32 on a
        CPU: BLAS), same parameters and attributes as the stock module it replaces."""

        def __init__(self, q: Any):
            super().__init__()
            self.embedding = isinstance(q, nn.QuantizedEmbedding)
            self.group_size, self.bits, self.mode = q.group_size, q.bits, q.mode
            for name, value in q.items():
                if isinstance(value, mx.array):
                    self[name] = value
            self.freeze()

        def _weight(self, rows: Any = None) -> Any:
            w, s, b = self["weight"], self["scales"], self.get("biases")
            if rows is not None:
                w, s, b = w[rows], s[rows], (b[rows] if b is not None else None)
            return mx.dequantize(w, s, b, group_size=self.group_size, bits=self.bits, mode=self.mode)

        def __call__(self, x: Any) -> Any:
            if self.embedding:
                return self._weight(x)
            y = x @ self._weight().T
            return y + self["bias"] if "bias" in self else y

        def as_linear(self, x: Any) -> Any:
            return x @ self._weight().T

    return Simulated


def trained_modules(model: Any) -> list[str]:
    """Paths of the modules DWQ trains (its own rule: affine, below 8 bits)."""
    return [
        p
        for p, m in model.named_modules()
        if hasattr(m, "bits") and hasattr(m, "group_size") and getattr(m, "mode", None) == "affine" and m.bits < 8
    ]


def kl_on(teacher: Any, student: Any, rows: list) -> float:
    """Mean per-token KL(teacher || student) on the windows `rows` (quality.evaluate's KL)."""
    import mlx.core as mx

    from mlx_lm_optiq import quality

    tokens = mx.array([t for t, _ in rows])
    return quality.evaluate(teacher, {"student": student}, tokens, progress=False)["student"]["kl"]


def distill(
    out_dir: str | Path,
    float_source: str | Path,
    text: str | Path | None,
    sequence_length: int,
    steps: int,
    *,
    learning_rate: float | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Distil the scales and biases of the model written in `out_dir` against the float model at
    `float_source` for `steps` steps on windows of the calibration `text` (None: the bundled set),
    and rewrite them in place when they helped. Returns the summary the sidecar records."""
    import mlx.core as mx
    import mlx.optimizers as optimizers
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import load_model, load_tokenizer

    from mlx_lm_optiq.weights import gptq

    start = time.perf_counter()
    out_dir = Path(out_dir)
    train, valid = windows(load_tokenizer(out_dir), text, sequence_length, steps)
    backend = compute_backend()
    cpu = backend == "cpu"
    # Simulated on a CPU (its quantized matmul is unusably slow) and on CUDA (MLX-CUDA 0.32's
    # quantized matmul fails inside its graph on our mixed-format models: `cuGraphAddKernelNode
    # ... invalid argument`, measured on the H200); stock quantized modules on Metal.
    simulate = backend in ("cpu", "cuda")
    dtype = mx.float32 if cpu else None
    teacher, _ = model_tree.load_float_model(float_source, dtype, lazy=False)
    student, _ = load_model(out_dir)
    if simulate:
        student = simulated(student)
    student.freeze()  # DWQ unfreezes the scales and biases; norms and float layers stay as written
    mx.eval(student.parameters())
    paths = trained_modules(student)
    summary: dict[str, Any] = {
        "method": "mlx_lm.quant.dwq.dwq_quantize",
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "sequence_length": sequence_length,
        "learning_rate": learning_rate,  # None until chosen (learning_rate_for)
        "temperature": TEMPERATURE,
        "modules": len(paths),
        "compute": "simulated fp32" if simulate else "quantized",
    }
    if not paths:
        return {**summary, "kept": False, "reason": "no affine module below 8 bits to train"}
    before = kl_on(teacher, student, valid)
    if learning_rate is None:  # by how far the written model is from the float one
        learning_rate = learning_rate_for(before)
    summary["learning_rate"] = learning_rate
    modules = dict(student.named_modules())
    train_dtype = mx.float32 if simulate else modules[paths[0]]["scales"].dtype  # DWQ casts its fp32 copy to this
    mx.random.seed(seed)
    try:
        dwq_quantize(
            student,
            lambda batch, idx, split: teacher(batch),
            optimizers.Adam(learning_rate=learning_rate, bias_correction=True),
            train,
            valid,
            batch_size=BATCH_SIZE,
            max_seq_length=sequence_length,
            seed=seed,
            dtype=train_dtype,
            temperature=TEMPERATURE,
        )
        student.eval()
        after = kl_on(teacher, student, valid)
    except RuntimeError as e:
        # MLX's backend failing mid-training (once on the H200: `cuGraphAddKernelNode ... invalid
        # argument`, where the same run then passed): the model written before it is complete and
        # stays; the convert goes on, says so and records it, rather than losing the whole run.
        reason = f"training failed: {type(e).__name__}: {e}"
        log(f"distillation not kept ({reason}); the written model is unchanged")
        return {**summary, "valid_kl_before": before, "kept": False, "reason": reason}
    written = gptq.scales_dtypes(out_dir, paths)
    tensors = {
        p: {"scales": modules[p]["scales"].astype(written[p]), "biases": modules[p]["biases"].astype(written[p])}
        for p in paths
    }
    mx.eval(tensors)
    finite = all(bool(mx.isfinite(a).all()) for t in tensors.values() for a in t.values())
    summary.update(valid_kl_before=before, valid_kl_after=after, seconds=round(time.perf_counter() - start, 1))
    if not finite or not math.isfinite(after) or after >= before:
        reason = "a trained value is not finite" if not finite else "the held-out windows' KL did not go down"
        log(f"distillation not kept ({reason}: {before:.4f} -> {after:.4f}); the written model is unchanged")
        return {**summary, "kept": False, "reason": reason}
    gptq.write_compensated(out_dir, tensors)
    log(
        f"distilled {len(paths)} modules' scales and biases for {steps} steps: KL on {len(valid)} held-out "
        f"calibration windows {before:.4f} -> {after:.4f} ({after / before:.3f}x); {summary['seconds']:.0f}s"
    )
    return {**summary, "kept": True}
