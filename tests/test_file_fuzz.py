"""Every JSON format we read, fed a few hundred generated malformed variants of a valid file.

For kv_config.json, optiq_metadata.json, the sensitivity table and optiq_lora_config.json,
each variant (a changed type, a deleted / added / misspelt key, a truncated or binary file,
nesting deeper than the parser allows) must either read back or raise our one file error
(`OptiqFileError`, which `KVConfigError` is) whose message names the file: never a
TypeError, KeyError, UnicodeDecodeError, RecursionError or any other exception. In-process
reader calls only (no model, no mlx work): the whole file runs in a few seconds.
"""

import base64
import copy
import json
import math
import random

import numpy as np
import pytest

from mlx_lm_optiq.core.jsonio import OptiqFileError, write_json
from mlx_lm_optiq.kv import plan_file
from mlx_lm_optiq.lora import adapter_files
from mlx_lm_optiq.weights import metadata, table

VARIANTS = 300  # per format (plus the fixed whole-file corruptions)

# Values of every JSON type, including ones that look right but are not (a string number,
# a bool where an int goes, NaN, a huge number, nesting).
ODD_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    7,
    1e308,
    -2.5,
    float("nan"),
    float("inf"),
    "",
    "abc",
    "4",
    "8/4:64",
    [],
    [1, 2],
    ["a"],
    {},
    {"x": 1},
    {"8/4:64": "lots"},
]


def _deep_text(depth, kind):
    """JSON text nested `depth` deep (built as text: json.dumps itself cannot nest that far)."""
    return ("[" * depth + "1" + "]" * depth) if kind == "list" else ('{"k": ' * depth + "1" + "}" * depth)


DEEP = "__deep__"  # placeholder value that `_dump` replaces with nested JSON text


def _paths(node, prefix=()):
    """Every (path to a value) in a JSON tree, containers included."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


def mutate(base, rng):
    """One malformed variant of `base`: (payload object, None) or (None, raw bytes)."""
    data = copy.deepcopy(base)
    paths = [p for p in _paths(data) if p]
    op = rng.choice(["type", "type", "type", "delete", "delete", "add", "typo", "deep", "two"])
    if op == "two":  # two changes at once
        data, _ = mutate(data, rng)
        return mutate(data, rng)
    path = rng.choice(paths)
    parent, key = _get(data, path[:-1]), path[-1]
    if op == "type":
        parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    elif op == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif op == "add":
        target = parent if isinstance(parent, dict) else data
        target[rng.choice(["extra", "k_bitz", "notes", "Layers"])] = rng.choice(ODD_VALUES)
    elif op == "typo" and isinstance(parent, dict):
        parent[str(key)[:-1] + "z"] = parent.pop(key)
    else:  # deep: nesting the parser takes, or not
        parent[key] = f"{DEEP}{rng.choice(['list', 'dict'])}:{rng.choice([50, 900, 5000])}"
    return data, None


def _dump(payload):
    """The payload as JSON text (NaN/Infinity as Python's json writes them), deep placeholders expanded."""
    text = json.dumps(payload)
    while f'"{DEEP}' in text:
        start = text.index(f'"{DEEP}')
        end = text.index('"', start + 1)
        kind, depth = text[start + 1 + len(DEEP) : end].split(":")
        text = text[:start] + _deep_text(int(depth), kind) + text[end + 1 :]
    return text


def whole_file_variants(base):
    """Corruptions of the file itself rather than of one field."""
    text = json.dumps(base)
    rng = random.Random(7)
    raw = [
        b"",
        b"\x00\xff\xfe binary \x89PNG\r\n",
        bytes(rng.randrange(256) for _ in range(300)),
        b"[" * 100_000,
        b'{"a": ' * 50_000,
        json.dumps([base]).encode(),
        b"null",
        b'"a string"',
        "\ufeff".encode() + text.encode(),  # a BOM
        text.encode("utf-16"),
    ]
    raw += [text[: rng.randrange(1, len(text))].encode() for _ in range(20)]  # truncated
    return raw


def _check(reader, path, payload, raw):
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(_dump(payload))
    try:
        reader(path)
    except OptiqFileError as e:
        assert str(path) in str(e) or path.name in str(e), f"error does not name the file: {e}"
        return True
    return False


def _fuzz(reader, base, path, seed):
    """Run every variant through `reader`; returns how many were refused."""
    assert not _check(reader, path, base, None), "the valid base must read back"
    rng = random.Random(seed)
    refused = 0
    for raw in whole_file_variants(base):
        assert _check(reader, path, None, raw), f"accepted a corrupt file: {raw[:60]!r}"
        refused += 1
    for i in range(VARIANTS):
        payload, raw = mutate(base, rng)
        try:
            refused += _check(reader, path, payload, raw)
        except Exception as e:  # noqa: BLE001 - the point: nothing but OptiqFileError escapes
            pytest.fail(f"variant {i} raised {type(e).__name__}: {e!s:.300}\n{_dump(payload)[:600]}")
    return refused


# ---------------------------------------------------------------- valid bases (as our writers write them)


def kv_config_base():
    layers = []
    for i in range(4):
        entry = {"layer": i, "cache_slot": i, "scheme": "affine", "k_bits": 8, "v_bits": 4, "group_size": 64}
        if i == 1:
            entry = {"layer": i, "cache_slot": i, "scheme": "none"}
        if i == 2:
            entry = {"layer": i, "cache_slot": i, "scheme": "turbo", "k_bits": 3, "v_bits": 3, "seed": 4}
        entry.update(cache="KVCache", n_kv_heads=3, k_head_dim=64, v_head_dim=64, kl={"8/4:64": 0.001, "4/4:64": 0.01})
        layers.append(entry)
    return {
        "format_version": 1,
        "kind": plan_file.KIND,
        "model": "smollm2-135m-instruct-4layer",
        "target_bits": 6.0,
        "achieved_bits": 5.9,
        "context_length": 8192,
        "quantized_kv_start": 0,
        "num_cache_slots": 4,
        "layers": layers,
        "sensitivity": {"probe": "exact", "prefix_tokens": 64, "scored_tokens": 16, "num_windows": 1},
    }


def table_base():
    moments = base64.b64encode(np.ones(64, dtype="<f4").tobytes()).decode("ascii")
    from mlx_lm_optiq.weights.clipping import GRID

    return {
        "format_version": 1,
        "kind": table.TABLE_KIND,
        "model": "m",
        "method": "exact",
        "reference": "float",
        "calibration": {"num_samples": 1, "sequence_length": 64, "tokens": 64, "sha256": "0" * 64, "source": "bundled"},
        "candidates": [
            {"bits": 4, "group_size": 64, "mode": "affine"},
            {"bits": 8, "group_size": 64, "mode": "affine"},
        ],
        "float_reference": "float checkpoint",
        "reference_model_bytes": 1000,
        "probes_per_pass": 1,
        "modules": {
            "model.layers.0.mlp.up_proj": {
                "num_params": 128 * 64,
                "shape": [128, 64],
                "kl": {"4:64": 0.01, "8:64": 0.0},
            },
            "model.embed_tokens": {"num_params": 256 * 64, "shape": [256, 64], "kl": {"4:64": 0.2, "8:64": 0.001}},
        },
        "clipping": {
            "method": "activation",
            "grid": list(GRID),
            "moments_dtype": "float32",
            "moments": {"model.layers.0.mlp.up_proj": moments},
        },
    }


def metadata_base():
    sensitivity = table_base()
    del sensitivity["format_version"], sensitivity["kind"]  # as measured (not read from a file)
    return {
        "format_version": 1,
        "kind": metadata.METADATA_KIND,
        "base_model": "m",
        "method": "exact",
        "reference": "float",
        "clipping": "activation",
        "target_bpw": 6.0,
        "achieved_bpw": 5.99,
        "candidates": sensitivity["candidates"],
        "layers": {
            "model.layers.0.mlp.up_proj": {
                "bits": 8,
                "group_size": 64,
                "mode": "affine",
                "num_params": 128 * 64,
                "kl": {"4:64": 0.01, "8:64": 0.0},
                "protected": "first-block",
            },
            "model.embed_tokens": {"bits": 16, "num_params": 256 * 64, "kl": {}},
        },
        "sensitivity": sensitivity,
        "text_only": {"text_model_type": "llama"},
    }


def lora_record_base():
    return {
        "format_version": 1,
        "kind": adapter_files.RECORD_KIND,
        "base_model": "m",
        "fine_tune_type": "lora",
        "rank_scaling": "by_bits",
        "base_rank": 8,
        "padded_rank": 11,
        "scale": 20.0,
        "dropout": 0.0,
        "metadata": "m/optiq_metadata.json",
        "budget_params": 100,
        "trainable_params": 90,
        "modules": {
            "model.layers.0.mlp.up_proj": {"rank": 11, "input_dims": 576, "output_dims": 1536, "bits": 6, "kl": 0.01},
            "model.layers.0.mlp.down_proj": {"rank": 5, "input_dims": 1536, "output_dims": 576},
        },
    }


# ---------------------------------------------------------------- the readers


def test_kv_config_reader_refuses_malformed_files_by_name(tmp_path):
    refused = _fuzz(plan_file.read_kv_config, kv_config_base(), tmp_path / "kv_config.json", seed=1)
    assert refused > VARIANTS // 2  # most changes to a tight format are errors, not silently read


def test_sensitivity_table_readers_refuse_malformed_files_by_name(tmp_path):
    path = tmp_path / "table.json"
    refused = _fuzz(table.read_table, table_base(), path, seed=2)
    assert refused > VARIANTS // 2
    _fuzz(metadata.load_sensitivity, table_base(), path, seed=3)


def test_metadata_readers_refuse_malformed_files_by_name(tmp_path):
    path = tmp_path / "optiq_metadata.json"
    refused = _fuzz(metadata.read_metadata, metadata_base(), path, seed=4)
    assert refused > VARIANTS // 2
    _fuzz(metadata.load_sensitivity, metadata_base(), path, seed=5)


def test_lora_record_reader_refuses_malformed_files_by_name(tmp_path):
    path = tmp_path / adapter_files.RECORD_FILE
    refused = _fuzz(lambda p: adapter_files.read_record(p.parent), lora_record_base(), path, seed=6)
    assert refused > VARIANTS // 2


def test_files_our_writers_produce_still_read(tmp_path):
    """Strictness about unknown keys must not refuse what our own writers produced, old or new
    (every key they ever wrote is allowed; a file without the newer optional fields reads too)."""
    kv = kv_config_base()
    plan = plan_file.plan_from_dict(kv, "kv")
    assert plan_file.plan_to_dict(plan)["sensitivity"] == kv["sensitivity"]  # written back as read
    old_kv = copy.deepcopy(kv)
    del old_kv["sensitivity"]["probe"], old_kv["context_length"]  # before the probe field existed
    for e in old_kv["layers"]:
        for k in ("cache", "n_kv_heads", "k_head_dim", "v_head_dim", "kl"):
            e.pop(k)
    write_json(tmp_path / "kv_config.json", old_kv, kind=plan_file.KIND)
    assert len(plan_file.read_kv_config(tmp_path).slots) == 4
    old_table = table_base()
    for k in ("clipping", "float_reference", "reference_model_bytes", "probes_per_pass"):
        del old_table[k]  # a table from before clipping and stacked probes
    del old_table["calibration"]["source"]
    table.write_table(old_table, tmp_path / "t.json")
    assert set(table.read_table(tmp_path / "t.json")["modules"]) == set(old_table["modules"])
    write_json(tmp_path / "m" / metadata.METADATA_FILE, {"layers": {"a": {"bits": 16}}}, kind=metadata.METADATA_KIND)
    assert metadata.read_metadata(tmp_path / "m")["layers"]["a"]["bits"] == 16  # hand-written: layers only
    record = lora_record_base()
    record["rank_scaling"], record["metadata"], record["budget_params"] = "imported", None, None  # PEFT import
    adapter_files.write_record(tmp_path / "ad", record)
    assert adapter_files.read_record(tmp_path / "ad")["rank_scaling"] == "imported"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["layers"][0].update(kl=5), "field 'layers[0].kl' must be an object"),
        (lambda d: d["layers"][0].update(kl=[1, 2]), "field 'layers[0].kl' must be an object"),
        (lambda d: d["layers"][0].update(kl="abc"), "field 'layers[0].kl' must be an object"),
        (lambda d: d.update(num_cache_slots="4"), "field 'num_cache_slots' is '4'"),
        (
            lambda d: d["layers"][0].update(k_bitz=4),
            "unknown key(s) at field 'layers[0]': 'k_bitz' (did you mean 'k_bits'?)",
        ),
        (lambda d: d.update(notes="x"), "unknown key(s) at the top level: 'notes'"),
        (
            lambda d: d["layers"][1].update(k_bits=4, v_bits=4),
            "field(s) ['k_bits', 'v_bits'] do not apply to scheme 'none'",
        ),
        (
            lambda d: d["layers"][0].update(kl={"8/4:64": math.nan}),
            "field 'layers[0].kl.8/4:64' must be a finite number",
        ),
    ],
)
def test_kv_config_errors_name_file_and_field(tmp_path, edit, message):
    """Issue 16 item 13, one case each: these were tracebacks (TypeError/ValueError) or silently read."""
    data = kv_config_base()
    edit(data)
    path = tmp_path / "kv_config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(plan_file.KVConfigError) as e:
        plan_file.read_kv_config(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
