"""`optiq_metadata.json`: the sidecar written next to a mixed-precision model; its one writer,
reader and validator.

It records the plan (bits per layer, measured KL per candidate) and the full
sensitivity table, so a new target can be planned from it without measuring again
(pass the sidecar as the sensitivity source of a convert), and LoRA can scale ranks
or load a base at the same per-layer bits from it. Layout (docs/ARCHITECTURE.md):

    {"format_version": 1, "kind": "optiq-metadata",
     "layers": {module path: {"bits": number > 0, "group_size", "mode", "num_params", "kl", ...}},  required
     "sensitivity": the sensitivity table (weights/table.py),                                      optional
     "target_bpw", "achieved_bpw": numbers,                                                        optional
     "base_model", "method", "reference", "clipping", "candidates", ...}

Sidecars written by convert have every field; hand-written or older ones (e.g. only
`layers`, for LoRA) are read too, and each consumer asks for the field it needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.jsonio import OptiqFileError, check_header, read_json, write_json
from mlx_lm_optiq.core.model_tree import resolve_model_path
from mlx_lm_optiq.weights import clipping
from mlx_lm_optiq.weights.table import TABLE_KIND, table_from_file_data, validate_table

METADATA_FILE = "optiq_metadata.json"
METADATA_KIND = "optiq-metadata"


def write_metadata(
    out_dir: str | Path,
    *,
    base_model: str | Path,
    table: dict[str, Any],
    plan: dict[str, Any],
    target_bpw: float,
    achieved_bpw: float,
    candidates: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
    rename: Callable[[str], str] | None = None,
) -> Path:
    """Write OUT/optiq_metadata.json (format in docs/ARCHITECTURE.md).

    rename: maps a planned module path to its path in the written model (text-only).
    """
    rename = rename or (lambda p: p)
    layers = {}
    for path, choice in plan["layers"].items():
        entry = dict(choice)
        mod = table["modules"].get(path, {})
        entry["num_params"] = int(mod.get("num_params", 0))
        entry["kl"] = dict(mod.get("kl", {}))
        if path in plan.get("protected", {}):
            entry["protected"] = plan["protected"][path]
        layers[rename(path)] = entry
    payload = {
        "base_model": str(base_model),
        "method": table.get("method"),
        "reference": table.get("reference"),
        "clipping": clipping.method_of(table),
        "target_bpw": float(target_bpw),
        "achieved_bpw": float(achieved_bpw),
        "candidates": candidates,
        "layers": layers,
        "sensitivity": table,
    }
    payload.update(extra or {})
    return write_json(Path(out_dir) / METADATA_FILE, payload, kind=METADATA_KIND)


def _sidecar_path(path):
    path = Path(path)
    return path / METADATA_FILE if path.is_dir() else path


def read_metadata(path: str | Path, required: Sequence[str] = ()) -> dict[str, Any]:
    """The validated sidecar at `path` (the file, or a model directory holding it).

    `layers` is required: a non-empty object whose entries are objects with a positive
    number `bits` (float layers say 16); `sensitivity` (a sensitivity table) and
    `target_bpw`/`achieved_bpw` (numbers) are checked when present. required: further
    top-level fields the caller needs (e.g. the plot needs "target_bpw", "achieved_bpw");
    a missing one is an error naming it.
    """
    path = _sidecar_path(path)
    data = read_json(path, kind=METADATA_KIND, required=["layers", *required])
    layers = data["layers"]
    if not isinstance(layers, dict) or not layers:
        raise OptiqFileError(f"{path}: field 'layers' must be a non-empty object of module path -> entry")
    for name, entry in layers.items():
        if not isinstance(entry, dict):
            raise OptiqFileError(f"{path}: field 'layers.{name}' must be an object, got {type(entry).__name__}")
        bits = entry.get("bits")
        if not isinstance(bits, (int, float)) or isinstance(bits, bool) or not bits > 0:
            raise OptiqFileError(f"{path}: field 'layers.{name}.bits' must be a positive number, got {bits!r}")
    for name in ("target_bpw", "achieved_bpw"):
        value = data.get(name)
        if name in data and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise OptiqFileError(f"{path}: field '{name}' must be a number, got {value!r}")
    if "sensitivity" in data:
        validate_table(data["sensitivity"], path, "sensitivity.")
    return data


def load_sensitivity(path: str | Path) -> dict[str, Any]:
    """A validated sensitivity table from a table file or from a model's optiq_metadata.json.

    path: a table file, a sidecar, or a model directory holding a sidecar. A sidecar
    without a `sensitivity` field is an error naming the field.
    """
    path = _sidecar_path(path)
    data = read_json(path)  # once: which kind it is decides how it is checked
    kind = data.get("kind")
    if kind == METADATA_KIND:
        check_header(data, path, METADATA_KIND, required=["sensitivity"])
        return validate_table(data["sensitivity"], path, "sensitivity.")
    if kind == TABLE_KIND:
        return table_from_file_data(data, path)
    raise OptiqFileError(
        f"{path}: field 'kind' is {kind!r}, expected {TABLE_KIND!r} (a saved sensitivity table) "
        f"or {METADATA_KIND!r} (an optiq_metadata.json of a converted model)"
    )


def calibration_source(model_dir: str | Path) -> str | None:
    """The calibration text a converted model's sensitivity was measured on, or None.

    From `sensitivity.calibration.source` of the sidecar in `model_dir` ("bundled", a file
    path, or absent). Lenient on purpose: the quality tool only uses it to refuse evaluating
    a model on its own calibration text, and a model without a (complete) sidecar is simply
    not checked. Reads through `read_json` like every reader here (kind and version checked).
    """
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        return None
    sensitivity = read_json(path, kind=METADATA_KIND).get("sensitivity")
    calib = sensitivity.get("calibration") if isinstance(sensitivity, dict) else None
    source = calib.get("source") if isinstance(calib, dict) else None
    return source if isinstance(source, str) else None


def find_metadata(model_path: str | Path, metadata_path: str | Path | None = None) -> Path:
    """Path of the sidecar to use: `metadata_path` when given, else the one next to the model's weights.

    model_path: a local model directory or a hub repo (its local snapshot). Errors are
    OptiqFileError naming the missing file; the caller adds how the user passes a path.
    """
    if metadata_path is not None:
        path = Path(metadata_path)
        if not path.is_file():
            raise OptiqFileError(f"{path}: file not found (the metadata path given)")
        return path
    path = resolve_model_path(model_path) / METADATA_FILE
    if not path.is_file():
        raise OptiqFileError(
            f"{path}: file not found. This needs the per-layer sidecar that a mixed-precision convert "
            "(MLX_LM_OPTIQ=1 mlx_lm.convert with a target BPW) writes next to the model; pass a metadata "
            "path to use one from elsewhere"
        )
    return path
