"""Calibration sets: the bundled default, user JSONL (text and chat), and clear errors."""

import json

import numpy as np
import pytest

from mlx_lm_optiq.core.calibration import (
    DEFAULT_DIR,
    CalibrationError,
    load_calibration,
    read_records,
    token_stream,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_q4_path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_q4_path)


def _write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_bundled_set_is_small_and_has_prose_code_and_chat(tokenizer):
    files = sorted(DEFAULT_DIR.glob("*.jsonl"))
    assert 50_000 <= sum(f.stat().st_size for f in files) <= 150_000
    kinds = [kind for f in files for kind, _ in read_records(f)]
    assert kinds.count("messages") >= 10 and kinds.count("text") >= 20
    prose = (DEFAULT_DIR / "prose.jsonl").read_text()
    assert "Catherine Morland" in prose  # Northanger Abbey, not the novels we evaluate on
    # 512-token windows: the default 16 samples fit with room to spare.
    assert len(token_stream(tokenizer)) >= 16 * 512 * 2


def test_default_samples_are_deterministic_and_distinct(tokenizer):
    a = np.array(load_calibration(tokenizer, num_samples=8, sequence_length=128, seed=0))
    b = np.array(load_calibration(tokenizer, num_samples=8, sequence_length=128, seed=0))
    c = np.array(load_calibration(tokenizer, num_samples=8, sequence_length=128, seed=1))
    assert a.shape == (8, 128) and a.dtype == np.int32
    assert (a == b).all() and not (a == c).all()
    assert len({row.tobytes() for row in a}) == 8


def test_user_jsonl_text_and_chat(tokenizer, tmp_path, austen):
    persuasion = austen("persuasion")[:6000]
    chat = {
        "messages": [
            {"role": "user", "content": "Name a novel by Jane Austen."},
            {"role": "assistant", "content": "Persuasion, published in 1817."},
        ]
    }
    path = _write(tmp_path / "calib.jsonl", [{"text": persuasion}, "", chat])
    tokens = np.array(load_calibration(tokenizer, path, num_samples=3, sequence_length=64))
    assert tokens.shape == (3, 64)
    stream = token_stream(tokenizer, path)
    rendered = tokenizer.apply_chat_template(chat["messages"], tokenize=False)
    chat_ids = tokenizer.encode(rendered, add_special_tokens=False)
    # The chat is rendered with the template (its role markers are in the stream), after the text.
    n = len(chat_ids)
    assert stream[-n - 1 : -1].tolist() == list(chat_ids)
    assert "<|im_start|>assistant" in rendered


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "calib.jsonl:2: not valid JSON"),
        ('["a list"]', "calib.jsonl:2: expected a JSON object"),
        ('{"txt": "typo"}', "calib.jsonl:2: expected exactly one of the fields 'text' or 'messages'"),
        ('{"text": "a", "messages": []}', "calib.jsonl:2: expected exactly one of the fields"),
        ('{"text": ""}', "calib.jsonl:2: field 'text' must be a non-empty string"),
        ('{"messages": "hello"}', "calib.jsonl:2: field 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user"}]}', "calib.jsonl:2: field 'messages[0]' must be an object"),
    ],
)
def test_corrupt_jsonl_names_file_line_and_field(tokenizer, tmp_path, line, message):
    path = _write(tmp_path / "calib.jsonl", [{"text": "fine first line"}, line])
    with pytest.raises(CalibrationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_calibration(tokenizer, path, num_samples=1, sequence_length=4)


def test_too_little_text_and_missing_file(tokenizer, tmp_path):
    path = _write(tmp_path / "small.jsonl", [{"text": "Only a few words here."}])
    with pytest.raises(CalibrationError, match=r"small.jsonl: \d+ tokens make only 0 windows of 512"):
        load_calibration(tokenizer, path, num_samples=1, sequence_length=512)
    with pytest.raises(CalibrationError, match="nothere.jsonl: calibration file not found"):
        load_calibration(tokenizer, tmp_path / "nothere.jsonl")
    with pytest.raises(CalibrationError, match="num_samples must be >= 1"):
        load_calibration(tokenizer, path, num_samples=0)
