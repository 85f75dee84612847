"""Text-only conversion of multi-modal checkpoints (`text_only` of WeightsConfig).

mlx-lm loads multi-modal checkpoints as a wrapper holding the text model in
`language_model` (its sanitize drops the vision/audio towers). Writing that text model
on its own, with `text_config` as the config, gives a checkpoint stock mlx-lm loads as
the plain text architecture, without the vision/audio weights, config and processor files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.model_tree import ModelError

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
_TEXT_PREFIX = "language_model."


def make_text_only(out_dir: str | Path) -> dict[str, Any]:
    """Rewrite a converted multi-modal checkpoint in `out_dir` as its plain text model.

    The logits of the rewritten model are checked unchanged.
    Returns {"text_model_type", "dropped_config", "dropped_files", "renamed": a function old path -> new}.
    """
    import mlx.core as mx
    from mlx_lm.utils import load_model, save_config, save_model

    out_dir = Path(out_dir)
    model, config = load_model(out_dir, lazy=True)
    text_config = config.get("text_config")
    if not isinstance(text_config, dict) or "model_type" not in text_config or not hasattr(model, "language_model"):
        raise ConfigError(
            "text_only",
            f"{out_dir}/config.json (model_type {config.get('model_type')!r}) is not a "
            "multi-modal checkpoint that mlx-lm loads as a wrapper around a text model "
            "(expected a 'text_config' with a 'model_type' and a 'language_model' submodule)",
        )
    text_model = model.language_model
    mx.eval(text_model.parameters())  # the files are replaced below
    probe = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    expected = model(probe).astype(mx.float32)
    mx.eval(expected)

    new_config = dict(text_config)
    for key in ("quantization", "quantization_config"):
        if key in config:
            new_config[key] = {strip_text_prefix(k): v for k, v in config[key].items()}
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
        raise ModelError(f"{out_dir}: the text-only model does not reproduce the multi-modal model's logits")
    return {
        "text_model_type": new_config["model_type"],
        "dropped_config": dropped_config,
        "dropped_files": dropped_files,
        "renamed": strip_text_prefix,
    }


def strip_text_prefix(path: str) -> str:
    """A module path of the multi-modal wrapper as the text-only model names it."""
    return path[len(_TEXT_PREFIX) :] if path.startswith(_TEXT_PREFIX) else path
