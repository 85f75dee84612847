"""Small file helpers shared by every feature: versioned JSON and atomic outputs."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.errors import OptiqError, brief


class OptiqFileError(OptiqError):
    """A file we read is missing, malformed, or of the wrong kind/version."""


class OutputExistsError(OptiqError, FileExistsError):
    """The output path of a run already exists (stock convert refuses it too; nothing is overwritten)."""


def _umask_mode(mode):
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs are meant to be
    # shared like any file the user writes, so apply the process umask instead.
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_json(path: str | Path, payload: dict, kind: str, format_version: int = 1) -> Path:
    """Write `payload` as JSON with `kind`/`format_version` first, atomically."""
    path = Path(path)
    data = {"format_version": format_version, "kind": kind}
    data.update({k: v for k, v in payload.items() if k not in ("format_version", "kind")})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_json(
    path: str | Path, kind: str | None = None, supported_versions: Sequence[int] = (1,), required: Sequence[str] = ()
) -> dict:
    """Read a JSON file we (or the user) wrote; errors name the file and field.

    With `kind`, the header and `required` fields are checked (`check_header`); without it the
    object is returned as read, for a caller that dispatches on `data["kind"]` itself and then
    checks the header of the kind it found (one read of the file, whatever its kind).
    """
    path = Path(path)
    if not path.is_file():
        raise OptiqFileError(f"{path}: file not found")
    data = parse_json_bytes(_read_bytes(path), path)
    if not isinstance(data, dict):
        raise OptiqFileError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    if kind is not None:
        check_header(data, path, kind, supported_versions, required)
    return data


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:  # permissions, a vanished file, ...
        raise OptiqFileError(f"{path}: cannot be read ({e.strerror or e})") from None


def parse_json_bytes(raw: bytes, path: str | Path) -> Any:
    """Parse the bytes of a JSON file; every way they can be wrong is an OptiqFileError naming `path`.

    Binary or non-UTF-8 content and nesting too deep for the parser are input errors like
    a syntax error, not a UnicodeDecodeError / RecursionError traceback.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OptiqFileError(f"{path}: not a JSON text file (not UTF-8 at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise OptiqFileError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise OptiqFileError(f"{path}: not valid JSON (nested too deeply)") from None


def check_keys(
    obj: Mapping[str, Any],
    allowed: Iterable[str],
    path: str | Path,
    field: str = "",
    error: type[OptiqFileError] | None = None,
) -> None:
    """Raise OptiqFileError (or its subclass `error`) naming every key of `obj` not in `allowed`
    (a misspelt field must not be silently ignored); `field` is where `obj` sits ("layers[3]"),
    "" for the top level."""
    allowed = list(allowed)
    unknown = [k for k in obj if k not in allowed]
    if not unknown:
        return
    where = f"field '{field}'" if field else "the top level"
    hints = []
    for k in unknown[:5]:
        close = difflib.get_close_matches(str(k), allowed, n=1)
        hints.append(f"{brief(k, 40)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise (error or OptiqFileError)(
        f"{path}: unknown key(s) at {where}: {', '.join(hints)}{more}; expected only {sorted(allowed)}"
    )


def check_header(
    data: dict, path: str | Path, kind: str, supported_versions: Sequence[int] = (1,), required: Sequence[str] = ()
) -> dict:
    """Check an object read from `path`: its `kind`, `format_version` and `required` fields; returns it."""
    if data.get("kind") != kind:
        raise OptiqFileError(f"{path}: field 'kind' is {brief(data.get('kind'))}, expected {kind!r}")
    version = data.get("format_version")
    if isinstance(version, bool) or version not in supported_versions:
        raise OptiqFileError(
            f"{path}: field 'format_version' is {brief(version)}, expected one of {list(supported_versions)}"
        )
    for field in required:
        if field not in data:
            raise OptiqFileError(f"{path}: missing required field {field!r}")
    return data


@contextlib.contextmanager
def atomic_output_dir(final_path: str | Path) -> Iterator[Path]:
    """Yield a staging directory that becomes `final_path` only on success.

    An interrupted run leaves a hidden `.NAME.optiq-partial-*` directory beside
    the target, never something at `final_path` that looks complete.
    """
    final_path = Path(final_path)
    if final_path.exists():
        raise OutputExistsError(
            f"Cannot save to the path {final_path} as it already exists."
            " Please delete the file/directory or specify a new path to save to."
        )
    final_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.optiq-partial-", dir=final_path.parent))
    os.chmod(staging, _umask_mode(0o777))
    try:
        yield staging
        os.replace(staging, final_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
