"""What LoRA can repair of a quantized base: the quantization residual of each adapted module.

A LoRA module on a quantized layer computes x @ (Q + scale * (A @ B)^T) with Q the dequantized
base weight. The residual R = W_float - Q is known exactly when the float weights are at hand,
and its singular spectrum says how much of it a rank-r update can remove: the best rank-r
approximation (Eckart-Young) leaves sum_{k>r} sigma_k^2 of ||R||_F^2. Two features use it:

- rank scaling `by_residual` (`residual_gains` -> `ranks.allocate_by_gain`): each rank step of
  module m gains w_m * sigma_{m,r+1}^2, with w_m = KL_m / ||R_m||_F^2, the module's measured
  sensitivity at its written format per unit of residual energy; so a step is worth the share
  of the module's measured output damage (the sidecar's KL) that the step's energy removes. The
  KL is a second-order quantity in the weight error, so to first order it is proportional to
  the residual energy; the weighting makes a step on a layer the network is sensitive to worth
  more than the same energy on one it is not, and the spectrum makes the first ranks of a
  low-rank residual worth more than the flat tail of a noise-like one.
- LoftQ initialisation (`loftq_init`, PEFT's `init_lora_weights="loftq"` with loftq_iter=1):
  A/B start as the truncated SVD of R, so base + adapter starts at the best rank-r
  approximation of the float model instead of at the quantized one.

Where the float weights come from (`float_source`): with load-time quantization of a float base
(`load_in_*`, `load_mixed`) the model path itself; for an already-quantized base, the source
model its optiq_metadata.json records (`base_model`; a quantized source is dequantized, the
float reference every optiq measurement uses). Without either there is no residual: an error
says which flag to use, never a silent fallback. The residual is taken against the base layer
the adapter actually sits on (its dequantized weights), so whatever wrote it (RTN, GPTQ,
activation-aware clipping) R is exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.formats import candidate_key
from mlx_lm_optiq.core.jsonio import OptiqFileError


@dataclass
class Residual:
    """The truncated SVD of one module's residual R = W_float - Q, (output_dims, input_dims).

    sigma: the top k singular values (descending, fp64), u: (out, k), vt: (k, in), with k the
    largest rank the run may give the module (kept so LoftQ needs no second decomposition).
    """

    sigma: np.ndarray
    u: np.ndarray
    vt: np.ndarray
    rest: float = 0.0  # energy of the singular values beyond `sigma`

    @property
    def energy(self) -> float:
        """||R||_F^2."""
        return float(np.sum(self.sigma**2)) + self.rest

    def captured(self, rank: int) -> float:
        """Share of ||R||_F^2 the best rank-`rank` approximation removes (0 when R is 0)."""
        total = self.energy
        return float(np.sum(self.sigma[:rank] ** 2) / total) if total > 0 else 0.0


def float_source(
    model_path: str | Path, load_scheme: str | None, metadata: Mapping | None, field: str = "rank_scaling"
) -> str:
    """Where the float weights of a run's base come from (module docstring); errors name the flag.

    load_scheme: the run's load-time quantization (a `LoraTrainingConfig.load_scheme`) or None.
    metadata: the run's optiq_metadata.json as read, or None. field: the config field the error names.
    """
    if load_scheme is not None:
        return str(model_path)
    source = (metadata or {}).get("base_model")
    if not source:
        raise ConfigError(
            field,
            "by_residual ranks and `lora_init` loftq need the float weights of the quantized base: load a float "
            "`--model` with `load_mixed` (per-layer bits of an optiq_metadata.json) or `load_in_4bits`, or "
            "train on a model our convert wrote (its optiq_metadata.json records the source model as "
            "'base_model'); this run has neither",
        )
    return str(source)


def _dequantized(base: Any) -> Any:
    import mlx.core as mx
    import mlx.nn as nn

    if isinstance(base, nn.QuantizedLinear):
        return mx.dequantize(
            base.weight,
            base.scales,
            getattr(base, "biases", None),
            group_size=base.group_size,
            bits=base.bits,
            mode=getattr(base, "mode", "affine"),
        )
    return base.weight


def base_layers(model: Any, paths: list[str]) -> dict[str, Any]:
    """{path: the Linear/QuantizedLinear under the LoRA layer at path}."""
    modules = dict(model.named_modules())
    return {p: getattr(modules[p], "linear", modules[p]) for p in paths}


def compute_residuals(
    model: Any, paths: list[str], source: str | Path, max_rank: int, progress: bool = True
) -> dict[str, Residual]:
    """{path: Residual} of the base under each LoRA layer at `paths` against the float `source`.

    The float model is opened lazily (a quantized source lazily dequantized) and read one
    module at a time; the decomposition (`top_svd`) runs in numpy on the CPU (SmolLM2-135M: 211
    modules of at most 576 x 1536). A float module whose shape differs from the base's is an error: `source`
    is not the model this base was quantized from.
    """
    import mlx.core as mx
    from tqdm import tqdm

    from mlx_lm_optiq.core.model_tree import get_module, load_float_model

    try:
        float_model, _ = load_float_model(source)
    except (OSError, ValueError) as e:
        raise OptiqFileError(f"{source}: cannot load the float source of the quantized base ({e})") from None
    bases = base_layers(model, paths)
    out = {}
    for path in tqdm(paths, desc="optiq: quantization residuals (SVD)", disable=not progress):
        try:
            w = get_module(float_model, path).weight
        except (AttributeError, IndexError, KeyError):
            raise OptiqFileError(f"{source}: has no module {path}: not the float source of this base") from None
        q = _dequantized(bases[path])
        if tuple(w.shape) != tuple(q.shape):
            raise OptiqFileError(
                f"{source}: module {path} is {tuple(w.shape)}, the quantized base's {tuple(q.shape)}: "
                "not the float source of this base"
            )
        r = np.array((w.astype(mx.float32) - q.astype(mx.float32)), dtype=np.float32)
        out[path] = top_svd(r, max_rank)
    return out


def top_svd(r: np.ndarray, k: int) -> Residual:
    """The top-`k` singular triplets of `r` and its exact Frobenius energy.

    Through the eigenpairs of the smaller Gram matrix (R R^T or R^T R, at most 576 x 576 on
    SmolLM2; product in fp64, eigensolve in fp32): a full SVD of a 576 x 1536 matrix takes seconds
    on a loaded 2-core CPU, this a fraction of that. sigma_i come out within ~1e-6 of sigma_max
    (measured 1.5e-7 on a 3-bit down_proj residual), far below any gain the allocation compares. `sigma` holds the top k values
    then a last entry carrying the energy of all the rest, so `energy` stays ||R||_F^2 exactly.
    """
    import mlx.core as mx

    r64 = r.astype(np.float64)
    out_dims, in_dims = r64.shape
    k = max(1, min(int(k), out_dims, in_dims))
    gram = r64 @ r64.T if out_dims <= in_dims else r64.T @ r64
    # MLX's CPU eigensolver: numpy/scipy LAPACK took 5-10 s per 576 x 576 Gram matrix of a
    # (nearly white, clustered) quantization residual on the shared CPU, MLX's 0.1 s.
    vals, vecs = mx.linalg.eigh(mx.array(gram.astype(np.float32)), stream=mx.cpu)
    vals, vecs = np.array(vals, dtype=np.float64), np.array(vecs, dtype=np.float64)
    order = np.argsort(vals)[::-1][:k]
    sigma = np.sqrt(np.clip(vals[order], 0.0, None))
    vecs = vecs[:, order]
    safe = np.where(sigma > 0, sigma, 1.0)
    if out_dims <= in_dims:
        u = vecs
        vt = ((r64.T @ u) / safe).T
    else:
        vt = vecs.T
        u = (r64 @ vecs) / safe
    zero = sigma <= 0
    u[:, zero], vt[zero] = 0.0, 0.0
    rest = max(float(np.sum(r64 * r64)) - float(np.sum(sigma**2)), 0.0)
    return Residual(sigma=sigma, u=u.astype(np.float32), vt=vt.astype(np.float32), rest=rest)


def written_kl(entry: Mapping, path: str, metadata_path: str | Path) -> float:
    """The sidecar's measured KL of a layer at the format it was written in (0 for float layers).

    That is the output damage this layer's residual does on its own, the quantity the rank steps
    are to remove; a sidecar without it is an error naming the field (never a guessed weight).
    """
    bits = entry.get("bits", 16)
    if bits >= 16:
        return 0.0
    key = candidate_key(int(bits), entry.get("group_size"), entry.get("mode", "affine"))
    kl = (entry.get("kl") or {}).get(key)
    if not isinstance(kl, (int, float)) or isinstance(kl, bool) or not math.isfinite(kl):
        raise OptiqFileError(
            f"{metadata_path}: field 'layers.{path}.kl' has no measured KL for the written format {key!r} "
            "(needed by rank scaling by_residual: it weights the module's residual by its sensitivity)"
        )
    return max(float(kl), 0.0)


def residual_gains(
    residuals: Mapping[str, Residual], layers: Mapping[str, Mapping], metadata_path: str | Path, max_rank: int
) -> dict[str, np.ndarray]:
    """{path: gains[r]}: what raising the module's rank from r to r+1 removes, for r < max_rank.

    gain = KL_m * sigma_{r+1}^2 / ||R_m||^2 (module docstring): the share of the module's
    measured damage that step removes. Zero past the matrix rank and for a zero residual.
    """
    missing = [p for p in residuals if p not in layers]
    if missing:
        raise OptiqFileError(
            f"{metadata_path}: field 'layers' has no entry for LoRA target(s) {missing[:5]}; "
            "by_residual weights every adapted module by its measured KL"
        )
    gains = {}
    for path, res in residuals.items():
        kl = written_kl(layers[path], path, metadata_path)
        g = np.zeros(max_rank)
        n = min(max_rank, res.sigma.size)
        if res.energy > 0 and kl > 0:
            g[:n] = kl * res.sigma[:n] ** 2 / res.energy
        gains[path] = g
    return gains


def loftq_init(model: Any, ranks: Mapping[str, int], residuals: Mapping[str, Residual], scale: float) -> None:
    """Set every LoRA layer's A/B to the truncated SVD of its residual at its own rank (LoftQ, 1 step).

    mlx-lm computes y = base(x) + scale * (x @ lora_a) @ lora_b, lora_a (in, r), lora_b (r, out),
    so scale * lora_a @ lora_b must be R_r^T = V_r diag(s_r) U_r^T. Each side takes sqrt(s_r)
    and 1/sqrt(scale): balanced factors, so neither starts orders of magnitude larger than the
    other (Adam's steps are per-parameter, the balance is what training sees).
    """
    import mlx.core as mx

    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale != 0):
        raise ConfigError("lora_init", f"loftq needs a nonzero LoRA scale, got {scale!r}")
    modules = dict(model.named_modules())
    for path, rank in ranks.items():
        res = residuals[path]
        layer = modules[path]
        r = min(int(rank), res.u.shape[1])
        root = np.sqrt(res.sigma[:r] / abs(scale))
        a = np.zeros((res.vt.shape[1], int(rank)), np.float32)
        b = np.zeros((int(rank), res.u.shape[0]), np.float32)
        a[:, :r] = res.vt[:r].T * root
        b[:r] = (res.u[:, :r] * root).T * math.copysign(1.0, scale)
        layer.lora_a = mx.array(a).astype(layer.lora_a.dtype)
        layer.lora_b = mx.array(b).astype(layer.lora_b.dtype)
    mx.eval(model.parameters())
