"""Row routing: one forward pass whose batch rows use different adapters.

`mounting.adapter_rows(model, names)` turns the names into a `RowSlots` (one adapter
slot per row, None for a base row). A `MultiLoRALinear` whose rows are mixed asks this
module for the adapters' pairs stacked side by side (`stack_pairs`) and computes every
row's LoRA in one go (`apply_mixed_rows`), by one of three methods:

  "gather": per-row gathered A/B (`mx.gather_mm`): fewest FLOPs; fastest on the CPU
    (mlx 0.32.4 has no working CUDA path for it: cuGraphAddKernelNode fails, so it is
    refused there at start-up). mlx's CPU gather_mm takes float32 only, so this method
    stacks the adapters and computes the LoRA term in float32 whatever their dtype.
  "take": the rows' A/B gathered with `mx.take`, then batched matmuls: the default off
    the CPU (measured on an H200: 0.47x of base-row throughput in the server on a
    30-layer SmolLM2-shaped model, against 0.14x for "masked", whose prefill stalls
    there; masked decodes faster in-process and served a 1B shape at 0.73x).
  "masked": every adapter's A side by side, one matmul for all, a per-row mask that
    keeps each row's own adapter (scale folded in), one matmul with every B: fewer
    kernels per layer whatever the number of adapters, more FLOPs.

Every method isolates rows arithmetically: no value of one adapter's A or B reaches a
row that does not use it. "gather" and "take" only ever read the row's own pair (base
rows read an all-zero slot); "masked" selects each row's own columns of x @ A with
`where`, not a multiply (another adapter's column may overflow to inf for this row's
input, and inf * 0 is NaN), and the B it then multiplies is finite (adapters are
checked when read, `mounting.check_adapter_values`), so 0 * B adds nothing.

MLX_LM_OPTIQ_MIXED_ROWS=gather|take|masked sets the method for a process (None: by
device); MLX_LM_OPTIQ_COMPILE_DECODE=0 turns off the compiled decode step. Both are
read once at import and checked there, so a typo stops a server at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import mlx.core as mx

MIXED_ROWS_METHODS = ("gather", "take", "masked")


def _checked_method(method: str, name: str) -> str:
    if method not in MIXED_ROWS_METHODS:
        raise ValueError(f"{name} is {method!r}, expected one of {list(MIXED_ROWS_METHODS)}")
    return method


def _refuse_gather_on_cuda(method: str, name: str, on_cuda: bool) -> None:
    """gather on a CUDA device kills the server at its first mixed batch (mlx 0.32.4:
    `cuGraphAddKernelNode ... invalid argument` inside mx.gather_mm), so it is refused
    when the process starts, not found by the first request."""
    if method == "gather" and on_cuda:
        raise ValueError(
            f"{name} is 'gather', which does not run on CUDA (mx.gather_mm fails in mlx {mx.__version__});"
            " use 'take' (the default off the CPU) or 'masked'"
        )


def _default_device_is_cuda() -> bool:
    cuda = getattr(mx, "cuda", None)
    return cuda is not None and cuda.is_available() and mx.default_device() != mx.cpu


# Module attributes (not constants): tests and benchmarks set them to compare methods.
MIXED_ROWS_METHOD = os.environ.get("MLX_LM_OPTIQ_MIXED_ROWS") or None
if MIXED_ROWS_METHOD is not None:
    _checked_method(MIXED_ROWS_METHOD, "MLX_LM_OPTIQ_MIXED_ROWS")
    _refuse_gather_on_cuda(MIXED_ROWS_METHOD, "MLX_LM_OPTIQ_MIXED_ROWS", _default_device_is_cuda())

# A decode step calls every adapted layer once on one token per row: there the few
# small ops below cost more in graph building and kernel launches than in arithmetic,
# so they run as one compiled function (traced once per batch size). Prefill shapes
# vary with every prompt, so prefill runs them eagerly. False (MLX_LM_OPTIQ_COMPILE_DECODE=0):
# always eager.
_COMPILE_ENV = os.environ.get("MLX_LM_OPTIQ_COMPILE_DECODE", "1")
if _COMPILE_ENV not in ("0", "1"):
    raise ValueError(f"MLX_LM_OPTIQ_COMPILE_DECODE is {_COMPILE_ENV!r}, expected 0 or 1")
COMPILE_DECODE = _COMPILE_ENV == "1"


def mixed_rows_method() -> str:
    """The method for the next mixed forward: MIXED_ROWS_METHOD, else gather on the CPU, take elsewhere."""
    if MIXED_ROWS_METHOD is None:
        return "gather" if mx.default_device() == mx.cpu else "take"
    return _checked_method(MIXED_ROWS_METHOD, "mlx_lm_optiq.adapters.rows.MIXED_ROWS_METHOD")


def _rows_gather(y, x, a, b, scales, index):
    # a, b are float32 (stack_pairs): the CPU gather_mm rejects any other dtype
    z = mx.gather_mm(mx.gather_mm(x.astype(a.dtype), a, rhs_indices=index), b, rhs_indices=index)
    return y + (scales[index][:, None, None] * z).astype(x.dtype)


def _rows_take(y, x, a, b, scales, index):
    z = (x @ mx.take(a, index, axis=0)) @ mx.take(b, index, axis=0)
    return y + (scales[index][:, None, None] * z).astype(x.dtype)


def _rows_masked(y, x, a_all, b_all, mask):
    # where, not a multiply: another adapter's column of x @ a_all may be inf for this row
    xa = x @ a_all
    return y + (mx.where(mask != 0, xa * mask, 0) @ b_all).astype(x.dtype)


_ROWS_EAGER = {"gather": _rows_gather, "take": _rows_take, "masked": _rows_masked}
_ROWS_COMPILED = {name: mx.compile(fn) for name, fn in _ROWS_EAGER.items()}

# RowSlots.uniform when the rows do not all use one slot.
MIXED = object()


class RowSlots:
    """The adapter slot of every batch row for one forward (None: a base row).

    `owner` is the adapter registry the slots belong to: a layer of another model
    ignores the selection. Mixed rows get their gather index and method once here,
    not in every adapted layer.
    """

    def __init__(self, owner: object, n_slots: int, slots: tuple[int | None, ...]) -> None:
        self.owner = owner
        self.n_slots = n_slots
        self.slots = slots
        first = slots[0] if slots else None
        self.uniform = first if all(s == first for s in slots) else MIXED
        if self.uniform is MIXED:
            self.index = mx.array([self.n_slots if s is None else s for s in slots], dtype=mx.uint32)
            self.method = mixed_rows_method()
        self._masks: dict = {}

    def mask(self, rank: int, scales: tuple[float, ...], dtype: mx.Dtype) -> mx.array:
        """(rows, 1, n_slots*rank): row i keeps the columns of its own slot, times its scale.
        Built once per forward for all layers sharing (rank, scales, dtype)."""
        key = (rank, scales, dtype)
        m = self._masks.get(key)
        if m is None:
            cols = [0.0] * (len(self.slots) * self.n_slots * rank)
            width = self.n_slots * rank
            for i, s in enumerate(self.slots):
                if s is not None and s < self.n_slots:
                    cols[i * width + s * rank : i * width + (s + 1) * rank] = [scales[s]] * rank
            m = self._masks[key] = mx.array(cols, dtype=dtype).reshape(len(self.slots), 1, width)
        return m


def stack_layout(method: str) -> str:
    """The stacked layout a method computes with (a layer keeps one until its adapters or the layout change)."""
    return {"masked": "concatenated", "gather": "stacked-float32"}.get(method, "stacked")


def stack_pairs(
    entries: Mapping[int, tuple[mx.array, mx.array, float]],
    n_slots: int,
    method: str,
    input_dims: int,
    output_dims: int,
) -> tuple[Any, ...]:
    """One layer's adapters (slot -> (a, b, scale)) stacked for mixed rows, ranks zero-padded to the largest.

    gather, take: (A (n+1, in, r), B (n+1, r, out), scales (n+1,)); slot n is the all-zero
    base slot that base rows point at; float32 for gather. masked: (A (in, n*r), B (n*r, out), r, scales)
    with slot s in columns/rows s*r..(s+1)*r. Slots >= n_slots (mounted after this
    forward began) are left out.
    """
    entries = {s: e for s, e in entries.items() if s < n_slots}
    r = max([a.shape[1] for a, _, _ in entries.values()] + [1])
    dtypes = {t.dtype for a, b, _ in entries.values() for t in (a, b)}
    dtype = dtypes.pop() if len(dtypes) == 1 and method != "gather" else mx.float32
    scales = [0.0] * (n_slots + 1)
    a_stack = mx.zeros((n_slots + 1, input_dims, r), dtype=dtype)
    b_stack = mx.zeros((n_slots + 1, r, output_dims), dtype=dtype)
    for slot, (a, b, scale) in entries.items():
        a_stack[slot, :, : a.shape[1]] = a.astype(dtype)
        b_stack[slot, : b.shape[0], :] = b.astype(dtype)
        scales[slot] = scale
    if method != "masked":
        arrays = (a_stack, b_stack, mx.array(scales, dtype=dtype))
    else:
        a_all = a_stack[:n_slots].transpose(1, 0, 2).reshape(input_dims, n_slots * r)
        b_all = b_stack[:n_slots].reshape(n_slots * r, output_dims)
        arrays = (a_all, b_all, r, tuple(scales[:n_slots]))
    mx.eval([t for t in arrays if isinstance(t, mx.array)])
    return arrays


def apply_mixed_rows(y: mx.array, x: mx.array, stacked: tuple[Any, ...], rows: RowSlots) -> mx.array:
    """y plus each row's own LoRA of x, with `stacked` from `stack_pairs(..., rows.method, ...)`.

    A one-token step (decode) runs the compiled function unless COMPILE_DECODE is off.
    """
    if x.ndim != 3 or x.shape[0] != len(rows.slots):
        raise ValueError(f"adapter_rows: {len(rows.slots)} rows were selected but the layer input has shape {x.shape}")
    method = rows.method
    fn = (_ROWS_COMPILED if COMPILE_DECODE and x.shape[1] == 1 else _ROWS_EAGER)[method]
    if method != "masked":
        a, b, scales = stacked
        return fn(y, x, a, b, scales, rows.index)
    a_all, b_all, r, scales = stacked
    return fn(y, x, a_all, b_all, rows.mask(r, scales, a_all.dtype))
