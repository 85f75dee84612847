"""Calibration text for sensitivity measurement: a bundled default set or a user JSONL.

A calibration file is JSON Lines; each non-blank line is an object with either
  {"text": "..."}                                   plain text, or
  {"messages": [{"role": "user", "content": "..."}, ...]}   a chat, rendered
with the tokenizer's chat template. Other fields (e.g. "source") are ignored.
A base model's tokenizer has no chat template: its chats are rendered as plain
"role: content" lines instead (one line says so), so the default set, which has
chats, works on every model.

All records are tokenized, joined (separated by the EOS token) into one stream,
cut into non-overlapping windows of `sequence_length` tokens, and `num_samples`
windows are drawn with a seeded RNG: the same file, tokenizer and seed always give
the same tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_lm_optiq.core.errors import OptiqError

if TYPE_CHECKING:
    import mlx.core as mx

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "data" / "calibration"


class CalibrationError(OptiqError):
    """A calibration file is malformed or too small for the requested samples."""


def default_files() -> list[Path]:
    """The bundled set: Northanger Abbey excerpts, code and chat samples (see its README)."""
    files = sorted(DEFAULT_DIR.glob("*.jsonl"))
    if not files:
        raise CalibrationError(f"{DEFAULT_DIR}: the bundled calibration set is missing (no *.jsonl)")
    return files


def read_records(path: str | Path) -> list[dict]:
    """Parse a calibration JSONL into a list of ("text", str) / ("messages", list) records."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    records = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(
            f"{path}: not a UTF-8 text file (byte {e.start}); expected JSON Lines with 'text' or 'messages'"
        ) from None
    except OSError as e:
        raise CalibrationError(f"{path}: cannot be read ({e.strerror or e})") from None
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{where}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise CalibrationError(f"{where}: not valid JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise CalibrationError(f"{where}: expected a JSON object with 'text' or 'messages'")
        has_text, has_messages = "text" in obj, "messages" in obj
        if has_text == has_messages:
            raise CalibrationError(
                f"{where}: expected exactly one of the fields 'text' or 'messages', "
                f"got {sorted(k for k in obj if k in ('text', 'messages')) or 'neither'}"
            )
        if has_text:
            if not isinstance(obj["text"], str) or not obj["text"].strip():
                raise CalibrationError(f"{where}: field 'text' must be a non-empty string")
            records.append(("text", obj["text"]))
            continue
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise CalibrationError(f"{where}: field 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise CalibrationError(
                    f"{where}: field 'messages[{i}]' must be an object with string 'role' and 'content'"
                )
        records.append(("messages", messages))
    if not records:
        raise CalibrationError(f"{path}: no records (expected JSON lines with 'text' or 'messages')")
    return records


def plain_chat_text(messages: list[dict]) -> str:
    """A chat as plain text, one "role: content" line per message (for a tokenizer without a template)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _encode_records(tokenizer, path, records):
    """Token ids of each record: text as is, chats through the chat template (or as plain text
    when the tokenizer has none: a base model's calibration must not fail on the default set)."""
    templated = getattr(tokenizer, "chat_template", None) is not None
    out, plain = [], 0
    for kind, value in records:
        if kind == "text":
            ids = tokenizer.encode(value)
        elif templated:
            rendered = tokenizer.apply_chat_template(value, tokenize=False)
            # The template already carries any BOS/role tokens it needs.
            ids = tokenizer.encode(rendered, add_special_tokens=False)
        else:
            ids = tokenizer.encode(plain_chat_text(value))
            plain += 1
        out.append(list(ids))
    if plain:
        print(
            f"[INFO] optiq: {path}: the tokenizer has no chat template; its {plain} chat record(s) "
            "are calibrated on as plain 'role: content' text",
            file=sys.stderr,
        )
    return out


def token_stream(tokenizer: Any, path: str | Path | None = None) -> np.ndarray:
    """All records of `path` (default: the bundled set) as one int32 token stream."""
    files = default_files() if path is None else [Path(path)]
    eos = getattr(tokenizer, "eos_token_id", None)
    stream = []
    for f in files:
        for ids in _encode_records(tokenizer, f, read_records(f)):
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
    return np.asarray(stream, dtype=np.int32)


def load_calibration(
    tokenizer: Any, path: str | Path | None = None, num_samples: int = 16, sequence_length: int = 512, seed: int = 0
) -> mx.array:
    """(num_samples, sequence_length) int32 calibration tokens.

    path=None uses the bundled default set. Windows are non-overlapping slices of
    the joined token stream, chosen with `seed` and returned in stream order.
    """
    import mlx.core as mx

    if int(num_samples) < 1:
        raise CalibrationError(f"num_samples must be >= 1, got {num_samples}")
    if int(sequence_length) < 2:
        raise CalibrationError(f"sequence_length must be >= 2, got {sequence_length}")
    stream = token_stream(tokenizer, path)
    num_windows = len(stream) // sequence_length
    if num_windows < num_samples:
        source = "the bundled calibration set" if path is None else str(path)
        raise CalibrationError(
            f"{source}: {len(stream)} tokens make only {num_windows} windows of "
            f"{sequence_length} tokens; {num_samples} samples were requested "
            "(give more text, fewer samples or a shorter sequence length)"
        )
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(num_windows, size=num_samples, replace=False))
    windows = stream[: num_windows * sequence_length].reshape(num_windows, sequence_length)
    return mx.array(windows[picks])
