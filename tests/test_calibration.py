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


@pytest.fixture(scope="module")
def base_model_tokenizer(tiny_q4_path, tmp_path_factory):
    """The 4-layer model's tokenizer with its chat template removed: a base model's tokenizer."""
    import shutil

    from mlx_lm.utils import load_tokenizer

    d = tmp_path_factory.mktemp("base-model") / "model"
    shutil.copytree(tiny_q4_path, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer = load_tokenizer(d)
    assert getattr(tokenizer, "chat_template", None) is None
    return tokenizer


def test_default_set_works_for_a_tokenizer_without_chat_template(base_model_tokenizer, capsys):
    """Issue 16 item 17: the bundled set has chats; a base model renders them as plain
    'role: content' text (and says so in one line) instead of failing, for convert and the KV
    planner alike (both read calibration text through core.calibration)."""
    from mlx_lm_optiq.core.calibration import plain_chat_text
    from mlx_lm_optiq.kv.pipeline import token_windows

    tokens = np.array(load_calibration(base_model_tokenizer, num_samples=4, sequence_length=64))
    assert tokens.shape == (4, 64)
    notes = [line for line in capsys.readouterr().err.splitlines() if "no chat template" in line]
    assert len(notes) == 1 and "chat.jsonl" in notes[0] and "plain 'role: content' text" in notes[0]
    chat = next(v for kind, v in read_records(DEFAULT_DIR / "chat.jsonl") if kind == "messages")
    plain = base_model_tokenizer.encode(plain_chat_text(chat))
    stream = token_stream(base_model_tokenizer).tolist()
    assert any(stream[i : i + len(plain)] == plain for i in range(len(stream) - len(plain)))
    assert plain_chat_text(chat).startswith(f"{chat[0]['role']}: {chat[0]['content']}")
    windows = token_windows(base_model_tokenizer, None, 2, 48)  # the KV planner's default text
    assert len(windows) == 2 and windows[0].shape == (48,)


def test_a_binary_calibration_file_is_named(tokenizer, tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(256)))
    with pytest.raises(CalibrationError, match=r"calib.jsonl: not a UTF-8 text file \(byte 0\)"):
        load_calibration(tokenizer, path, num_samples=1, sequence_length=4)
    path.write_text('{"text": ' * 5000 + '"a"' + "}" * 5000 + "\n")
    with pytest.raises(CalibrationError, match=r"calib.jsonl:1: not valid JSON \(nested too deeply\)"):
        load_calibration(tokenizer, path, num_samples=1, sequence_length=4)
