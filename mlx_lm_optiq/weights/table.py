"""The sensitivity table file (kind optiq-sensitivity): its one writer, reader and validator.

A table holds, for every measured module, its size and the mean per-token KL of
quantizing that module alone at each candidate (weights/sweep.py measures it). It is
written on its own (`python -m mlx_lm_optiq.weights --output T`) and embedded as the
`sensitivity` field of a converted model's optiq_metadata.json (weights/metadata.py),
and both are validated here with the same rules. Layout:

    {"format_version": 1, "kind": "optiq-sensitivity",
     "model": str, "method": "exact"|"fisher", "reference": "float"|"low-bit",
     "calibration": {"num_samples", "sequence_length", "tokens": int >= 1, "sha256": str, ...},
     "candidates": [{"bits": int, "group_size": int, "mode": str}, ...],
     "modules": {path: {"num_params": int, "shape": [int, ...], "kl": {candidate key: float >= 0}}},
     "clipping": {...}   (optional, weights/clipping.py; absent in tables older than clipping)
     "held_quantized": {"chunks", "chunk_bytes", "backward_passes": int >= 1}   (optional: a Fisher
         sweep that held a quantized input quantized, weights/sweep.py; absent otherwise, and in
         older tables. Same values as the resident float reference; the writer reads it: rtn)
     ... informational fields (float_reference, probes_per_pass, reference_model_bytes, ...)}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.errors import brief
from mlx_lm_optiq.core.formats import candidate_key
from mlx_lm_optiq.core.jsonio import OptiqFileError, check_header, check_keys, read_json, write_json
from mlx_lm_optiq.weights import clipping

TABLE_KIND = "optiq-sensitivity"
METHODS = ("exact", "fisher")
# What a table records as its reference ("auto" is resolved to one of these before measuring).
REFERENCES = ("float", "low-bit")
REQUIRED_FIELDS = ("model", "method", "reference", "calibration", "candidates", "modules")
# Every field a table may hold (what every version of the sweep wrote, plus the header a table
# read from its own file keeps when it is embedded in optiq_metadata.json); any other key is a
# typo or another file, refused by name rather than ignored.
TABLE_FIELDS = (
    "format_version",
    "kind",
    *REQUIRED_FIELDS,
    "float_reference",
    "reference_model_bytes",
    "probes_per_pass",
    "stacked_probe_kl_floor",
    "clipping",
    "held_quantized",
)
HELD_QUANTIZED_FIELDS = ("chunks", "chunk_bytes", "backward_passes")
CALIBRATION_FIELDS = ("num_samples", "sequence_length", "tokens", "sha256", "source")
MODULE_FIELDS = ("num_params", "shape", "kl")
CANDIDATE_FIELDS = ("bits", "group_size", "mode")


def write_table(table: dict[str, Any], path: str | Path) -> Path:
    """Validate and write a sensitivity table (kind optiq-sensitivity, format_version 1)."""
    validate_table(table, path)
    return write_json(path, table, kind=TABLE_KIND)


def read_table(path: str | Path) -> dict[str, Any]:
    """Read and validate a sensitivity table file; errors name the file and the field."""
    return table_from_file_data(read_json(path), path)


def table_from_file_data(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The table in an object already read from `path` (header and fields checked, then validated)."""
    return validate_table(check_header(data, path, TABLE_KIND, required=REQUIRED_FIELDS), path)


def validate_table(table: Any, where: str | Path, field: str = "") -> dict[str, Any]:
    """Check the structure and numbers of a sensitivity table; returns it.

    where: the file, named first in every error ("PATH: field 'modules.x.kl.4:64' ...").
    field: prefix of the field names when the table sits inside another file
    ("sensitivity." in optiq_metadata.json).
    """

    def bad(name, expected):
        raise OptiqFileError(f"{where}: field '{field}{name}' {expected}")

    def positive_int(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if not isinstance(table, dict):
        raise OptiqFileError(
            f"{where}: field '{field.rstrip('.') or '(top level)'}' must be a sensitivity "
            f"table object, got {type(table).__name__}"
        )
    for name in REQUIRED_FIELDS:
        if name not in table:
            raise OptiqFileError(f"{where}: missing required field '{field}{name}'")
    check_keys(table, TABLE_FIELDS, where, field.rstrip("."))
    if not isinstance(table["model"], str):
        bad("model", f"must be a string, got {brief(table['model'])}")
    if not isinstance(table["method"], str) or table["method"] not in METHODS:
        bad("method", f"must be one of {list(METHODS)}, got {brief(table['method'])}")
    if not isinstance(table["reference"], str) or table["reference"] not in REFERENCES:
        bad("reference", f"must be one of {list(REFERENCES)}, got {brief(table['reference'])}")
    calib = table["calibration"]
    if not isinstance(calib, dict):
        bad("calibration", f"must be an object, got {brief(calib)}")
    check_keys(calib, CALIBRATION_FIELDS, where, f"{field}calibration")
    for name in ("num_samples", "sequence_length", "tokens"):
        value = calib.get(name)
        if not positive_int(value):
            bad(f"calibration.{name}", f"must be a positive integer, got {brief(value)}")
    if not isinstance(calib.get("sha256"), str):
        bad("calibration.sha256", f"must be a string, got {brief(calib.get('sha256'))}")
    if "source" in calib and not isinstance(calib["source"], str):
        bad("calibration.source", f"must be a string, got {brief(calib['source'])}")
    cands = table["candidates"]
    if not isinstance(cands, list) or not cands:
        bad("candidates", f"must be a non-empty list, got {brief(cands)}")
    keys = set()
    for i, c in enumerate(cands):
        if (
            not isinstance(c, dict)
            or not positive_int(c.get("bits"))
            or not positive_int(c.get("group_size"))
            or not isinstance(c.get("mode"), str)
        ):
            bad(f"candidates[{i}]", f"must be {{'bits': int, 'group_size': int, 'mode': str}}, got {brief(c)}")
        check_keys(c, CANDIDATE_FIELDS, where, f"{field}candidates[{i}]")
        keys.add(candidate_key(c["bits"], c["group_size"], c["mode"]))
    mods = table["modules"]
    if not isinstance(mods, dict) or not mods:
        bad("modules", f"must be a non-empty object of module path -> entry, got {brief(mods)}")
    for path, entry in mods.items():
        at = f"modules.{path}"
        if not isinstance(entry, dict):
            bad(at, f"must be an object, got {brief(entry)}")
        check_keys(entry, MODULE_FIELDS, where, f"{field}{at}")
        n = entry.get("num_params")
        if not positive_int(n):
            bad(f"{at}.num_params", f"must be a positive integer, got {brief(n)}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not shape or not all(positive_int(s) for s in shape) or math.prod(shape) != n:
            bad(f"{at}.shape", f"must be a list of positive ints with product num_params, got {brief(shape)}")
        kl = entry.get("kl")
        if not isinstance(kl, dict):
            bad(f"{at}.kl", f"must be an object of candidate key -> KL, got {brief(kl)}")
        for key, v in kl.items():
            if key not in keys:
                bad(f"{at}.kl.{key}", f"is not one of the table's candidates {sorted(keys)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(f"{at}.kl.{key}", f"must be a finite number >= 0, got {brief(v)}")
    if "clipping" in table:
        clipping.validate_table_entry(table["clipping"], mods, where, f"{field}clipping")
    if "held_quantized" in table:
        held = table["held_quantized"]
        if not isinstance(held, dict):
            bad(
                "held_quantized", f"must be an object {{'chunks', 'chunk_bytes', 'backward_passes'}}, got {brief(held)}"
            )
        check_keys(held, HELD_QUANTIZED_FIELDS, where, f"{field}held_quantized")
        for name in HELD_QUANTIZED_FIELDS:
            if not positive_int(held.get(name)):
                bad(f"held_quantized.{name}", f"must be a positive integer, got {brief(held.get(name))}")
    return table
