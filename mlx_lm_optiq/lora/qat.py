"""QAT at each layer's own bits: LoRA trained through the rounding that fuse + re-quantization applies.

Why. A LoRA adapter trained on a float base is fused (`mlx_lm.fuse`) into float weights
W + ΔW; re-quantizing that model to a mixed-precision plan (an `optiq_metadata.json`) rounds
every weight again, and a small ΔW is largely rounded away. Training *through* that rounding
keeps the adapter's gain: every LoRA-adapted linear layer computes

    y = x @ fq(W + ΔW)ᵀ,   ΔW = (scale · lora_bᵀ) @ lora_aᵀ   (what `LoRALinear.fuse` adds)

where fq = quantize → dequantize at that module's bits / group size / mode from the sidecar
(round to nearest, `mx.quantize`, exactly what re-quantization with `requantize` does). The
rounding has no useful gradient, so it is a straight-through estimator: the gradient of
fq(z) is taken as that of z. `QATLoRALinear` computes it as

    y = x @ stop_gradient(fq(W + ΔW))ᵀ + (z − stop_gradient(z)),   z = scale · (x @ lora_a) @ lora_b

whose value is exactly x @ fq(W + ΔW)ᵀ (z − z is 0) and whose gradient for lora_a / lora_b is
the straight-through one (fq(z) = z + stop_gradient(q(z) − z) differentiated through W + ΔW),
without ever forming the full dL/dW that the literal formula would compute and discard.
Modules without an adapter are fake-quantized in place at their plan format (their weight is
frozen), so the training forward is the forward of the model that fuse + `requantize` write.

The adapter saved is a plain stock LoRA adapter (lora_a / lora_b): `mlx_lm.fuse` fuses it into
the float base; `requantize` then writes that fused model at exactly the sidecar's formats.

The base must be a float checkpoint (a quantized one is refused: fuse must add ΔW to the float
weights, since q(q(W) + ΔW) is not q(W + ΔW)); dequantize a quantized model first with
`mlx_lm.convert --hf-path M -d --mlx-path F`. DoRA is refused (its fused weight is normalized
per output, not W + ΔW). The rounding is round-to-nearest (RTN); re-writing the fused model with
GPTQ (`--optiq-writer gptq`) would round differently from what training saw.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.errors import OptiqError
from mlx_lm_optiq.core.jsonio import OptiqFileError, atomic_output_dir, write_json
from mlx_lm_optiq.core.model_tree import resolve_model_path
from mlx_lm_optiq.lora.config import MIXED_LOAD_SCHEME, MetadataNotFound
from mlx_lm_optiq.lora.qlora import float_checkpoint_config, plan_mixed
from mlx_lm_optiq.weights.metadata import METADATA_FILE, METADATA_KIND, find_metadata, read_metadata

Format = dict[str, Any]  # {"group_size", "bits", "mode"} of one module (qlora.QuantParams)
QAT_PURPOSE = "QAT trains on the float model that fuse and re-quantization start from"
REQUANTIZE_PURPOSE = "re-quantization to a plan starts from the float model (e.g. fused onto the float base)"
DEQUANTIZE_HINT = "dequantize it first: mlx_lm.convert --hf-path MODEL -d --dtype float32 --mlx-path FLOAT"


def fake_quantize(w: mx.array, fmt: Mapping[str, Any]) -> mx.array:
    """quantize → dequantize `w` at `fmt` (round to nearest), in `w`'s dtype: the weight the real
    quantized layer holds, as a float matrix (same rounding as `nn.QuantizedLinear.from_linear`)."""
    group_size, bits, mode = fmt["group_size"], fmt["bits"], fmt.get("mode", "affine")
    parts = mx.quantize(w, group_size, bits, mode=mode)
    biases = parts[2] if len(parts) > 2 else None
    return mx.dequantize(parts[0], parts[1], biases, group_size=group_size, bits=bits, mode=mode).astype(w.dtype)


def straight_through(w: mx.array, fmt: Mapping[str, Any]) -> mx.array:
    """fq(w) = w + stop_gradient(q(w) − w): the rounding's value with the identity's gradient.

    The literal STE; `QATLoRALinear` computes the same value and the same adapter gradients
    more cheaply (see the module docstring). Kept as the reference the tests compare with.
    """
    return w + mx.stop_gradient(fake_quantize(w, fmt) - w)


class QATLoRALinear(LoRALinear):
    """A LoRA layer whose forward is the fused layer re-quantized at `fmt`: x @ fq(W + ΔW)ᵀ.

    Same parameters (linear, lora_a, lora_b) and `fuse` as stock `LoRALinear`, so training
    saves, and stock mlx-lm loads and fuses, a plain LoRA adapter.
    """

    @staticmethod
    def from_lora(lora: LoRALinear, fmt: Mapping[str, Any]) -> QATLoRALinear:
        """Wrap an existing LoRA layer (keeps its linear, lora_a, lora_b, scale and dropout)."""
        layer = QATLoRALinear.__new__(QATLoRALinear)
        nn.Module.__init__(layer)
        for key, value in lora.items():  # linear, dropout, lora_a, lora_b: the same objects
            layer[key] = value
        layer.scale = lora.scale
        layer.group_size, layer.bits, layer.mode = int(fmt["group_size"]), int(fmt["bits"]), fmt.get("mode", "affine")
        layer._no_grad = set(lora._no_grad)  # lora_a/lora_b stay as trainable as they were
        layer._training = lora.training
        layer.linear.freeze()  # the base weight gets no gradient through the rounding: it never trains
        return layer

    @property
    def format(self) -> Format:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def merged_weight(self) -> mx.array:
        """W + ΔW computed exactly as stock `LoRALinear.fuse` computes the fused weight."""
        weight = self.linear.weight
        delta = ((self.scale * self.lora_b.T) @ self.lora_a.T).astype(weight.dtype)
        return weight + delta

    def quantized_weight(self) -> mx.array:
        """fq(W + ΔW): the weight `requantize` writes for this layer after fuse."""
        return fake_quantize(self.merged_weight(), self.format)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """The layer this one trains as: W + ΔW quantized at its format (a `QuantizedLinear`), as
        `mlx_lm.fuse` + `requantize` write it; `dequantize=True` gives the float W + ΔW (stock's fuse)."""
        fused = super().fuse(dequantize=True)
        if dequantize:
            return fused
        return nn.QuantizedLinear.from_linear(fused, self.group_size, self.bits, mode=self.mode)

    def _branch(self, x: mx.array) -> mx.array:
        return (self.scale * ((x @ self.lora_a) @ self.lora_b)).astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ mx.stop_gradient(self.quantized_weight()).T
        if "bias" in self.linear:
            y = y + self.linear.bias
        z = self._branch(self.dropout(x))
        # training with dropout: the rounding sees the undropped update, the gradient the dropped one
        dropped = self.training and getattr(self.dropout, "_p_1", 1.0) < 1.0
        z_value = self._branch(x) if dropped else z
        return y + (z - mx.stop_gradient(z_value))


def locate_sidecar(model_path: str | Path, metadata: str | Path | None = None) -> Path:
    """The sidecar whose per-module formats are used: `metadata`, else the one next to the model."""
    try:
        return find_metadata(model_path, metadata)
    except (OptiqFileError, FileNotFoundError) as e:
        raise MetadataNotFound(
            "metadata", f"{e} (QAT and re-quantization use the per-module formats of an optiq_metadata.json)"
        ) from None


def check_base(
    model_path: str | Path, metadata: str | Path | None = None, field: str = "qat", purpose: str = QAT_PURPOSE
) -> Path:
    """Before loading: the model is a float checkpoint (a quantized one is a ConfigError on `field`,
    saying `purpose`) and the sidecar exists and is valid (MetadataNotFound / OptiqFileError naming it)."""
    path = resolve_model_path(model_path)
    float_checkpoint_config(
        path, field, f"the model is quantized, but {purpose} (q(q(W) + ΔW) is not q(W + ΔW)); " + DEQUANTIZE_HINT
    )
    read_metadata(locate_sidecar(path, metadata))
    return path


def plan_formats(
    model: Any, model_path: str | Path, metadata: str | Path | None = None
) -> tuple[dict[str, Format | bool], Path]:
    """({module path: format, or False to stay float}, sidecar path) for the float `model`.

    Read before LoRA layers go on (paths are the bare modules'). Every quantizable module needs an
    entry with a group size that divides its input dims (errors name the sidecar field).
    """
    mpath = locate_sidecar(model_path, metadata)
    if any("scales" in m for _, m in model.named_modules()):
        raise ConfigError("qat", f"{model_path}: the loaded model is quantized; " + DEQUANTIZE_HINT)
    return plan_mixed(model, read_metadata(mpath), mpath), mpath


def apply_qat(model: Any, formats: Mapping[str, Format | bool]) -> dict[str, int]:
    """Put QAT on a model whose LoRA layers are on: adapted modules become `QATLoRALinear` at their
    format, every other planned module is fake-quantized in place (its weight is frozen). Modules
    the plan keeps float stay float. Returns counts {"adapted", "fake_quantized", "float"}."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.dora import DoRALinear

    modules = dict(model.named_modules())
    wrapped, counts = [], {"adapted": 0, "fake_quantized": 0, "float": 0}
    for path, fmt in formats.items():
        module = modules.get(path)
        if module is None:
            raise OptiqError(f"QAT: module {path} of the plan is not in the model")
        if isinstance(module, DoRALinear):
            raise ConfigError("qat", f"{path} is a DoRA layer: QAT supports `fine_tune_type` lora only")
        if not fmt:
            counts["float"] += 1
            continue
        if isinstance(module, QATLoRALinear):
            continue
        if isinstance(module, LoRALinear):
            if not isinstance(module.linear, nn.Linear) or isinstance(module.linear, nn.QuantizedLinear):
                raise ConfigError("qat", f"{path}: the LoRA layer's base is {type(module.linear).__name__}, not float")
            wrapped.append((path, QATLoRALinear.from_lora(module, fmt)))
            counts["adapted"] += 1
        elif "lora_a" in module:
            raise ConfigError("qat", f"{path}: QAT supports linear LoRA layers, not {type(module).__name__}")
        else:
            module.weight = fake_quantize(module.weight, fmt)
            counts["fake_quantized"] += 1
    if wrapped:
        model.update_modules(tree_unflatten(wrapped))
    mx.eval(model.parameters())
    return counts


def requantize(
    float_model: str | Path,
    out_path: str | Path,
    metadata: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Write `float_model` (e.g. `mlx_lm.fuse`'s output on a float base) quantized at exactly the
    sidecar's per-module formats, RTN, as a stock mlx-lm model with the sidecar beside it.

    metadata: the sidecar (default: the one next to `float_model`). The written config has
    per-module quantization entries (stock `mlx_lm.load` reads them); the sidecar is copied with
    `writer` {"method": "rtn"} and `clipping` "none", since that is how these weights were rounded.
    """
    from mlx_lm.utils import save

    from mlx_lm_optiq.lora.qlora import load_quantized

    src = check_base_for_requantize(float_model, metadata)
    mpath = locate_sidecar(src, metadata)
    sidecar = read_metadata(mpath)
    model, tokenizer, config = load_quantized(src, MIXED_LOAD_SCHEME, metadata_path=mpath, progress=progress)
    out_path = Path(out_path)
    with atomic_output_dir(out_path) as staging:
        save(staging, src, model, tokenizer, config, donate_model=False)
        carried = {k: v for k, v in sidecar.items() if k not in ("kind", "format_version")}
        carried["writer"] = {"method": "rtn", "source": "mlx_lm_optiq.lora.qat.requantize"}
        carried["clipping"] = "none"
        write_json(staging / METADATA_FILE, carried, kind=METADATA_KIND)
        for extra in ("chat_template.jinja",):
            if (src / extra).is_file() and not (staging / extra).exists():
                shutil.copy(src / extra, staging / extra)
    return out_path


def check_base_for_requantize(float_model: str | Path, metadata: str | Path | None = None) -> Path:
    """`float_model` resolved; a quantized checkpoint is a ConfigError on `model` (it would round twice)."""
    return check_base(float_model, metadata, field="model", purpose=REQUANTIZE_PURPOSE)


def main(argv: list[str] | None = None) -> None:
    """python -m mlx_lm_optiq.lora.qat --model FUSED --metadata SIDECAR --mlx-path OUT"""
    import argparse

    from mlx_lm_optiq.core.errors import user_errors

    parser = argparse.ArgumentParser(
        prog="python -m mlx_lm_optiq.lora.qat",
        description="Re-quantize a float model (e.g. mlx_lm.fuse's output) to exactly the per-module formats "
        "of an optiq_metadata.json (round to nearest), as a stock mlx-lm model.",
    )
    parser.add_argument("--model", required=True, help="The float model (local path or hub id).")
    parser.add_argument("--metadata", default=None, help="optiq_metadata.json (default: the one next to --model).")
    parser.add_argument("--mlx-path", required=True, help="Where to write the quantized model (must not exist).")
    args = parser.parse_args(argv)

    def render(e):
        return e.render(lambda f: "--" + f.replace("_", "-")) if isinstance(e, ConfigError) else str(e)

    with user_errors(parser.prog, render=render):
        out = requantize(args.model, args.mlx_path, args.metadata)
    print(f"[optiq] wrote {out} at the per-module formats of its {METADATA_FILE}")


if __name__ == "__main__":
    main()
