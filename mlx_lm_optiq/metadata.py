"""`optiq_metadata.json`: the sidecar written next to a mixed-precision model.

It records the plan (bits per layer, measured KL per candidate) and the full
sensitivity table, so a new target can be planned from it without measuring
again (`--optiq-sensitivity OUT/optiq_metadata.json`).
"""

import math
from pathlib import Path

from . import clipping
from .io_utils import OptiqFileError, read_json, write_json

METADATA_FILE = "optiq_metadata.json"
METADATA_KIND = "optiq-metadata"
SENSITIVITY_KIND = "optiq-sensitivity"

_TABLE_FIELDS = ("model", "method", "candidates", "modules")


def write_metadata(out_dir, *, base_model, table, plan, target_bpw, achieved_bpw, candidates,
                   extra=None, rename=None):
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


def read_metadata(path):
    path = Path(path)
    if path.is_dir():
        path = path / METADATA_FILE
    data = read_json(path, kind=METADATA_KIND, required=["layers", "sensitivity", "target_bpw", "achieved_bpw"])
    if not isinstance(data["layers"], dict):
        raise OptiqFileError(f"{path}: field 'layers' must be an object of module path -> choice")
    for name, entry in data["layers"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("bits"), int):
            raise OptiqFileError(f"{path}: field 'layers.{name}.bits' must be an integer")
    validate_table(data["sensitivity"], f"{path}: field 'sensitivity'")
    return data


def validate_table(table, where):
    """Check the structure and numbers of a sensitivity table; errors name the field."""
    if not isinstance(table, dict):
        raise OptiqFileError(f"{where}: expected a sensitivity table object")
    for field in _TABLE_FIELDS:
        if field not in table:
            raise OptiqFileError(f"{where}: missing required field {field!r}")
    if not isinstance(table["modules"], dict) or not table["modules"]:
        raise OptiqFileError(f"{where}: field 'modules' must be a non-empty object")
    if not isinstance(table["candidates"], list) or not table["candidates"]:
        raise OptiqFileError(f"{where}: field 'candidates' must be a non-empty list")
    for name, mod in table["modules"].items():
        if not isinstance(mod, dict):
            raise OptiqFileError(f"{where}: field 'modules.{name}' must be an object")
        n = mod.get("num_params")
        if not isinstance(n, int) or n <= 0:
            raise OptiqFileError(f"{where}: field 'modules.{name}.num_params' must be a positive integer, got {n!r}")
        shape = mod.get("shape")
        if not isinstance(shape, list) or not shape or not all(isinstance(s, int) for s in shape):
            raise OptiqFileError(f"{where}: field 'modules.{name}.shape' must be a list of integers, got {shape!r}")
        kl = mod.get("kl")
        if not isinstance(kl, dict):
            raise OptiqFileError(f"{where}: field 'modules.{name}.kl' must be an object of candidate -> KL")
        for key, v in kl.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise OptiqFileError(f"{where}: field 'modules.{name}.kl.{key}' must be a finite number, got {v!r}")
    if "clipping" in table:
        clipping.validate_table_entry(table["clipping"], table["modules"], where)
    return table


def load_sensitivity(path):
    """A sensitivity table from a table file or from a model's optiq_metadata.json."""
    path = Path(path)
    if path.is_dir():
        path = path / METADATA_FILE
    data = read_json(path)
    kind = data.get("kind")
    if kind == METADATA_KIND:
        return read_metadata(path)["sensitivity"]
    if kind == SENSITIVITY_KIND:
        from .sensitivity import load_table

        return load_table(path)
    raise OptiqFileError(
        f"{path}: field 'kind' is {kind!r}, expected {SENSITIVITY_KIND!r} (a saved sensitivity table) "
        f"or {METADATA_KIND!r} (an optiq_metadata.json of a converted model)"
    )
