"""The resume file of an exact sweep (kind optiq-sensitivity-checkpoint): its one reader and writer.

It holds the partial KL sums of every (batch, module) probe done so far and a
fingerprint of the sweep's configuration; a checkpoint of another configuration is
refused, naming the field that differs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.errors import brief
from mlx_lm_optiq.core.jsonio import OptiqFileError, check_keys, read_json, write_json
from mlx_lm_optiq.weights.probes import SensitivityError, log_line

CHECKPOINT_KIND = "optiq-sensitivity-checkpoint"


class SweepCheckpoint:
    """Partial KL sums, saved after each (batch, module) so an interrupted sweep resumes.

    path None: kept in memory only. `sums` is {module path: {candidate key: KL sum}},
    `done` the set of (batch index, module path) already measured.
    """

    def __init__(self, path: str | Path | None, fingerprint: dict[str, Any]):
        self.path = Path(path) if path else None
        self.fingerprint = fingerprint
        self.sums: dict[str, dict[str, float]] = {}
        self.done: set[tuple[int, str]] = set()
        if self.path and self.path.exists():
            data = read_json(self.path, kind=CHECKPOINT_KIND, required=["fingerprint", "sums", "done"])
            _validate(data, self.path)
            for field, value in fingerprint.items():
                if data["fingerprint"].get(field) != value:
                    raise SensitivityError(
                        f"{self.path}: field 'fingerprint.{field}' is {brief(data['fingerprint'].get(field), 300)} "
                        f"but this sweep has {brief(value, 300)}; delete the checkpoint or use another path"
                    )
            self.sums = data["sums"]
            self.done = {(int(b), p) for b, p in data["done"]}
            log_line(f"resuming from {self.path}: {len(self.done)} (batch, module) probes already done")

    def record(self, batch: int, path: str, kl_sums: dict[str, float]) -> None:
        """Add one probe's KL sums and save the file (when there is one)."""
        entry = self.sums.setdefault(path, {})
        for key, value in kl_sums.items():
            entry[key] = entry.get(key, 0.0) + value
        self.done.add((batch, path))
        if self.path:
            write_json(
                self.path,
                {"fingerprint": self.fingerprint, "sums": self.sums, "done": sorted(self.done)},
                kind=CHECKPOINT_KIND,
            )


def _validate(data: dict[str, Any], path: Path) -> None:
    """The resume file's fields have the types the sweep resumes from (OptiqFileError naming the field)."""

    def bad(field, expected, value):
        raise OptiqFileError(f"{path}: field '{field}' must be {expected}, got {brief(value)}")

    check_keys(data, ("format_version", "kind", "fingerprint", "sums", "done"), path)
    if not isinstance(data["fingerprint"], dict):
        bad("fingerprint", "an object", data["fingerprint"])
    sums = data["sums"]
    if not isinstance(sums, dict) or not all(
        isinstance(entry, dict)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in entry.values())
        for entry in sums.values()
    ):
        bad("sums", "an object of module path -> {candidate key: finite KL sum}", sums)
    done = data["done"]
    if not isinstance(done, list) or not all(
        isinstance(d, list) and len(d) == 2 and isinstance(d[0], int) and isinstance(d[1], str) for d in done
    ):
        bad("done", "a list of [batch index, module path] pairs", done)
