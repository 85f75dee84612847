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

from mlx_lm_optiq.core.errors import brief
from mlx_lm_optiq.core.jsonio import OptiqFileError, check_header, check_keys, read_json, write_json
from mlx_lm_optiq.core.model_tree import resolve_model_path
from mlx_lm_optiq.weights import clipping
from mlx_lm_optiq.weights.table import TABLE_KIND, table_from_file_data, validate_table

METADATA_FILE = "optiq_metadata.json"
METADATA_KIND = "optiq-metadata"
# Every field a sidecar may hold (what every version of write_metadata wrote); any other key
# is refused by name (a misspelt field must not be ignored). Hand-written sidecars need only `layers`.
METADATA_FIELDS = (
    "format_version",
    "kind",
    "base_model",
    "method",
    "reference",
    "clipping",
    "target_bpw",
    "achieved_bpw",
    "candidates",
    "layers",
    "sensitivity",
    "text_only",
    "writer",
)
LAYER_FIELDS = ("bits", "group_size", "mode", "num_params", "kl", "protected")


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
    check_keys(data, METADATA_FIELDS, path)

    def bad(field, expected, value):
        raise OptiqFileError(f"{path}: field '{field}' must be {expected}, got {brief(value)}")

    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def positive_int(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    layers = data["layers"]
    if not isinstance(layers, dict) or not layers:
        bad("layers", "a non-empty object of module path -> entry", layers)
    for name, entry in layers.items():
        at = f"layers.{name}"
        if not isinstance(entry, dict):
            bad(at, "an object", entry)
        check_keys(entry, LAYER_FIELDS, path, at)
        bits = entry.get("bits")
        if not number(bits) or not bits > 0:
            bad(f"{at}.bits", "a positive number", bits)
        for key in ("group_size", "num_params"):
            if key in entry and not (positive_int(entry[key]) or (key == "num_params" and entry[key] == 0)):
                bad(f"{at}.{key}", "a positive integer", entry[key])
        for key in ("mode", "protected"):
            if key in entry and not isinstance(entry[key], str):
                bad(f"{at}.{key}", "a string", entry[key])
        kl = entry.get("kl", {})
        if not isinstance(kl, dict) or not all(number(v) for v in kl.values()):
            bad(f"{at}.kl", "an object of candidate key -> finite number", kl)
    for name in ("target_bpw", "achieved_bpw"):
        if name in data and not number(data[name]):
            bad(name, "a number", data[name])
    for name in ("base_model", "method", "reference", "clipping"):
        if data.get(name) is not None and not isinstance(data[name], str):
            bad(name, "a string", data[name])
    candidates = data.get("candidates")
    if candidates is not None:
        if not isinstance(candidates, list) or not all(
            isinstance(c, dict) and positive_int(c.get("bits")) and positive_int(c.get("group_size"))
            for c in candidates
        ):
            bad("candidates", "a list of {'bits': int, 'group_size': int, 'mode': str}", candidates)
    if data.get("text_only") is not None and not isinstance(data["text_only"], dict):
        bad("text_only", "an object", data["text_only"])
    writer = data.get("writer")  # how the weights were rounded (weights/gptq.py): informative
    if writer is not None and not (isinstance(writer, dict) and isinstance(writer.get("method"), str)):
        bad("writer", "an object with a string 'method' (rtn or gptq)", writer)
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
