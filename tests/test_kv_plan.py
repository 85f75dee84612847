"""Per-layer KV plans: measurement, allocation, kv_config.json, scripts path, convert flag, bad configs.

Real model: the 4-layer SmolLM2 from ../shared (dequantized to fp32 in-process for
measurement); tiny random qwen3_next (linear attention + attention) and gemma3
(sliding window + global) built with mlx-lm's classes for the cache layouts.
"""

import itertools
import json
import shutil
import sys

import mlx.core as mx
import pytest

from mlx_lm_optiq.core.jsonio import write_json
from mlx_lm_optiq.kv import apply, cli, pipeline, plan_file, sensitivity
from mlx_lm_optiq.kv.caches import MixedQuantizedKVCache
from mlx_lm_optiq.kv.candidates import KVCandidate, parse_kv_candidates
from mlx_lm_optiq.kv.geometry import average_bits, cache_geometry
from tests.helpers import QUANTIZED_KV_NOISE, assert_greedy_matches_solo, optiq, replay_solo_logprobs
from tests.tiny_models import tiny_hybrid, tiny_sliding

PREFIX, SCORED = 128, 32
CANDIDATES = parse_kv_candidates("8/8:64,8/4:64,4/4:64,4/2:32,2/2:64")


@pytest.fixture(scope="module")
def tiny_float(tiny_q4_path):
    return pipeline.load_float_reference(tiny_q4_path)


@pytest.fixture(scope="module")
def persuasion_windows(tiny_float, shared_dir):
    _, tokenizer = tiny_float
    return pipeline.token_windows(tokenizer, str(shared_dir / "data/text/persuasion.txt"), 1, PREFIX + SCORED)


@pytest.fixture(scope="module")
def table(tiny_float, persuasion_windows):
    model, _ = tiny_float
    return sensitivity.measure_kv_sensitivity(model, persuasion_windows, PREFIX, CANDIDATES, progress=False)


def _kl(e, key):
    return e["kl"][key]


def test_sensitivity_table_is_ordered_by_precision(table):
    assert [e["slot"] for e in table["slots"]] == [0, 1, 2, 3]
    for e in table["slots"]:
        assert e["cache"] == "KVCache" and e["n_kv_heads"] == 3 and e["k_head_dim"] == 64
        assert set(e["kl"]) == {KVCandidate(*c).key for c in CANDIDATES}
        assert all(v >= 0 for v in e["kl"].values())
        assert _kl(e, "8/8:64") < _kl(e, "8/4:64") < _kl(e, "4/4:64") < _kl(e, "2/2:64")
        assert _kl(e, "2/2:64") > 1e-3  # 2-bit KV visibly hurts: the probe is not a no-op


@pytest.mark.parametrize("probe", ["exact", "fast"])
def test_layer_replay_equals_full_forward(tiny_float, persuasion_windows, probe):
    model, _ = tiny_float
    cands = [(4, 2, 32)]
    fast = sensitivity.measure_kv_sensitivity(model, persuasion_windows, PREFIX, cands, progress=False, probe=probe)
    slow = sensitivity.measure_kv_sensitivity(
        model, persuasion_windows, PREFIX, cands, progress=False, reuse_layers=False, probe=probe
    )
    for a, b in zip(fast["slots"], slow["slots"]):
        assert a["kl"]["4/2:32"] == pytest.approx(b["kl"]["4/2:32"], rel=1e-4, abs=1e-7)


def test_exact_probe_is_the_single_layer_plan_as_served(tiny_float, persuasion_windows, table):
    model, _ = tiny_float
    geometry = cache_geometry(model)
    for slot in (0, 2):
        only = sensitivity.uniform_plan(geometry, 2, 2, 64)
        for s in only.slots:
            if s.slot != slot:
                s.scheme, s.k_bits, s.v_bits, s.group_size = "none", None, None, None
        joint = sensitivity.evaluate_plan_kl(model, persuasion_windows, PREFIX, only)
        assert table["slots"][slot]["kl"]["2/2:64"] == pytest.approx(joint, rel=2e-3)


def test_allocation_is_exact_and_within_budget(table):
    geometry = sensitivity.table_geometry(table)
    options = [[None] + [KVCandidate.parse(k) for k in e["kl"]] for e in table["slots"]]
    for target in (3.0, 4.5, 6.0):
        plan = sensitivity.allocate_kv(table, target)
        assert plan.achieved_bits <= target + 1e-9
        best = None
        for combo in itertools.product(*options):  # brute force over every per-slot choice
            slots = [
                plan_file.SlotPlan(
                    slot=i,
                    layer=i,
                    scheme="none" if c is None else "affine",
                    k_bits=c and c[0],
                    v_bits=c and c[1],
                    group_size=c and c[2],
                )
                for i, c in enumerate(combo)
            ]
            if average_bits(slots, geometry) <= target:
                kl = sum(0 if c is None else table["slots"][i]["kl"][KVCandidate(*c).key] for i, c in enumerate(combo))
                best = kl if best is None else min(best, kl)
        assert sensitivity.plan_kl(plan) == pytest.approx(best, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="below the cheapest plan"):
        sensitivity.allocate_kv(table, 2.0)


def test_mixed_plan_beats_uniform_4bit_and_runtime_matches_simulation(tiny_float, persuasion_windows, table):
    model, _ = tiny_float
    geometry = cache_geometry(model)
    uniform = sensitivity.uniform_plan(geometry, 4, 4, 64)  # 4.5 bits, like stock --kv-bits 4
    bits = average_bits(uniform.slots, geometry)
    plan = sensitivity.allocate_kv(table, bits)
    assert plan.achieved_bits <= bits
    planned = sensitivity.evaluate_plan_kl(model, persuasion_windows, PREFIX, plan)
    flat = sensitivity.evaluate_plan_kl(model, persuasion_windows, PREFIX, uniform)
    assert planned <= flat * (1 + 1e-6)  # the whole plan, simulated from token 0, not just the sum

    # between grid points the optimum must mix (upgrading some layers beats any uniform fit)
    plan = sensitivity.allocate_kv(table, 5.5)
    assert len({s.describe() for s in plan.slots}) > 1 and plan.achieved_bits <= 5.5
    mixed = sensitivity.evaluate_plan_kl(model, persuasion_windows, PREFIX, plan)
    assert mixed < flat

    # the real per-layer caches compute what the measurement simulated
    tokens = persuasion_windows[0][None, :48]
    real = model(tokens, cache=apply.make_plan_cache(model, plan))
    sim = model(tokens, cache=sensitivity.simulated_plan_cache(model, plan))
    assert mx.max(mx.abs(real - sim)).item() < 1e-3


def test_kv_config_round_trip_and_cli(tiny_q4_path, tmp_path, shared_dir, capsys):
    out = tmp_path / "kv_config.json"
    sens = tmp_path / "sensitivity.json"
    rc = cli.main(
        [
            str(tiny_q4_path),
            "--target-bits",
            "5",
            "-o",
            str(out),
            "--sensitivity-out",
            str(sens),
            "--data",
            str(shared_dir / "data/text/persuasion.txt"),
            "--prefix-tokens",
            "96",
            "--scored-tokens",
            "16",
            "--candidates",
            "8/8:64,4/4:64,2/2:64",
        ]
    )
    assert rc == 0 and "average" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["format_version"] == 1 and data["kind"] == "optiq-kv-config"
    assert data["num_cache_slots"] == 4 and data["achieved_bits"] <= 5
    assert [(e["layer"], e["cache_slot"]) for e in data["layers"]] == [(i, i) for i in range(4)]
    assert all(set(e["kl"]) == {"8/8:64", "4/4:64", "2/2:64"} for e in data["layers"])
    with pytest.raises(SystemExit):  # refuses to overwrite
        cli.main([str(tiny_q4_path), "--target-bits", "5", "-o", str(out), "--sensitivity", str(sens)])
    rc = cli.main([str(tiny_q4_path), "--target-bits", "3", "-o", str(out), "--force", "--sensitivity", str(sens)])
    plan = plan_file.read_kv_config(out)
    assert plan.target_bits == 3 and plan.achieved_bits <= 3
    assert all(s.scheme == "affine" for s in plan.slots) and min(s.k_bits for s in plan.slots) == 2


def _write_plan(path, rows, **extra):
    layers = [dict(layer=i, cache_slot=i, **r) for i, r in enumerate(rows)]
    payload = {"model": "test", "quantized_kv_start": 0, "num_cache_slots": len(layers), "layers": layers}
    payload.update(extra)
    write_json(path, payload, kind=plan_file.KIND)
    return path


A84 = {"scheme": "affine", "k_bits": 8, "v_bits": 4, "group_size": 64}
NONE = {"scheme": "none"}


@pytest.fixture
def model_dir(tiny_q4_path, tmp_path):
    """A copy of the 4-layer model folder (its kv_config.json is ours to write)."""
    d = tmp_path / "model"
    shutil.copytree(tiny_q4_path, d)
    return d


def test_generate_picks_up_plan_from_model_folder(model_dir, hooks_enabled):
    import mlx_lm
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    rows = [NONE, A84, {"scheme": "affine", "k_bits": 4, "v_bits": 2, "group_size": 32}, A84]
    _write_plan(model_dir / "kv_config.json", rows)
    model, tok = mlx_lm.load(str(model_dir))
    assert apply.attached_plan(model) is not None
    cache = make_prompt_cache(model)
    text = mlx_lm.generate(model, tok, "The capital of France is", max_tokens=6, prompt_cache=cache)
    assert type(cache[0]) is KVCache
    assert [(c.k_bits, c.v_bits, c.group_size) for c in cache[1:]] == [(8, 4, 64), (4, 2, 32), (8, 4, 64)]
    assert all(isinstance(c, MixedQuantizedKVCache) and c.quantized for c in cache[1:])

    # same tokens as the plan's caches handed to stock generate with the hooks off
    hooks_enabled.disable()
    stock = mlx_lm.generate(
        model,
        tok,
        "The capital of France is",
        max_tokens=6,
        prompt_cache=apply.make_plan_cache(model, apply.attached_plan(model)),
    )
    float_text = mlx_lm.generate(model, tok, "The capital of France is", max_tokens=6)
    hooks_enabled.enable()
    assert text == stock

    # switched off for a block: float caches; kv_bits together with a plan is refused
    cache = make_prompt_cache(model)
    with apply.use_kv_config(None):
        assert mlx_lm.generate(model, tok, "The capital of France is", max_tokens=6, prompt_cache=cache) == float_text
    assert all(type(c) is KVCache for c in cache)
    with pytest.raises(ValueError, match="kv_bits=4 cannot be combined"):
        mlx_lm.generate(model, tok, "Hello", max_tokens=2, kv_bits=4)


def test_batch_generate_keeps_batching_with_the_plan(tiny_float, hooks_enabled):
    from mlx_lm import batch_generate
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = tiny_float
    rows = [NONE, A84, {"scheme": "affine", "k_bits": 4, "v_bits": 2, "group_size": 32}, A84]
    plan = plan_file.plan_from_dict({"layers": [dict(layer=i, cache_slot=i, **r) for i, r in enumerate(rows)]})
    prompts = [tok.encode("Anne Elliot was"), tok.encode("It is a truth universally acknowledged that")]
    with apply.use_kv_config(plan, model=model):
        res = batch_generate(
            model, tok, prompts, max_tokens=5, return_prompt_caches=True, return_token_ids=True, return_logprobs=True
        )
        # the single-request path (its caches from the hooked make_prompt_cache), replayed on the batched tokens
        solo = [
            replay_solo_logprobs(model, p, t, prompt_cache=make_prompt_cache(model))
            for p, t in zip(prompts, res.token_ids)
        ]
    for caches in res.caches:
        assert type(caches[0]).__name__ == "KVCache"
        assert [(c.k_bits, c.v_bits, c.group_size) for c in caches[1:]] == [(8, 4, 64), (4, 2, 32), (8, 4, 64)]
        assert all(isinstance(c, MixedQuantizedKVCache) and c.quantized for c in caches[1:])
    # batched rows compute what the single-request path does
    assert [len(t) for t in res.token_ids] == [5, 5]
    for row, (tokens, token_logprobs, s) in enumerate(zip(res.token_ids, res.logprobs, solo)):
        assert_greedy_matches_solo(
            tokens, s, token_logprobs=token_logprobs, noise=QUANTIZED_KV_NOISE, label=f"row {row}"
        )


def test_use_kv_config_and_quantized_kv_start(tiny_float, tmp_path, hooks_enabled):
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = tiny_float
    path = _write_plan(tmp_path / "kv_config.json", [A84, NONE, NONE, A84], quantized_kv_start=12)
    prompt = tok.encode("It was a truth universally")  # fewer than 12 tokens
    assert len(prompt) < 12
    cache = make_prompt_cache(model)
    states = []
    with apply.use_kv_config(path, model=model):
        for _ in stream_generate(model, tok, prompt, max_tokens=10, prompt_cache=cache):
            states.append((cache[0].offset, cache[0].quantized))
    assert isinstance(cache[0], MixedQuantizedKVCache) and isinstance(cache[3], MixedQuantizedKVCache)
    assert states[0][1] is False  # short context stays float ...
    assert states[-1][1] is True  # ... and is quantized once the cache reaches quantized_kv_start
    assert all(q == (off > 12) for off, q in states)


def test_max_kv_size_keeps_the_window_on_planned_slots(tiny_float, tmp_path, hooks_enabled):
    """--max-kv-size makes every slot a RotatingKVCache (models without make_cache): planned
    slots become quantized sliding windows of the same size, never unbounded caches."""
    from mlx_lm.models.cache import RotatingKVCache

    from mlx_lm_optiq.kv.caches import MixedQuantizedRotatingKVCache

    model, tok = tiny_float
    plan = plan_file.load_kv_config(_write_plan(tmp_path / "kv_config.json", [A84, NONE, NONE, A84]), model)

    def max_kv_size_caches():  # what make_prompt_cache(model, max_kv_size=16) builds without make_cache
        return [RotatingKVCache(max_size=16, keep=4) for _ in range(4)]

    cache = apply.apply_plan(max_kv_size_caches(), plan)
    assert [type(c).__name__ for c in cache] == [
        "MixedQuantizedRotatingKVCache",
        "RotatingKVCache",
        "RotatingKVCache",
        "MixedQuantizedRotatingKVCache",
    ]
    assert (cache[0].max_size, cache[0].keep, cache[0].k_bits, cache[0].v_bits) == (16, 4, 8, 4)
    x = mx.array(tok.encode("It was a truth universally acknowledged, that a single man in possession"))[None]
    y = model(x, cache=cache)
    for _ in range(4):
        y = model(mx.argmax(y[:, -1:], axis=-1), cache=cache)
    assert isinstance(cache[0], MixedQuantizedRotatingKVCache) and cache[0].quantized
    assert cache[0].keys.shape[2] == 16 and bool(mx.isfinite(y).all())
    turbo = plan_file.load_kv_config(
        _write_plan(tmp_path / "turbo.json", [{"scheme": "turbo", "k_bits": 3, "v_bits": 3}, NONE, NONE, A84]), model
    )
    with pytest.raises(
        ValueError, match=r"turbo.json: layers\[0\] wants turbo K3/V3 but the prompt cache holds a sliding"
    ):
        apply.apply_plan(max_kv_size_caches(), turbo)


BAD = [
    (lambda rows: rows[:3], None, "has 3 cache slots but the model builds 4"),
    (lambda rows: [rows[0], {**A84, "group_size": 128}, *rows[2:]], None, "does not divide"),
    (lambda rows: [rows[0], {**A84, "k_bits": 7}, *rows[2:]], None, "field 'k_bits' is 7"),
    (lambda rows: [rows[0], {**A84, "group_size": 48}, *rows[2:]], None, "field 'group_size' is 48"),
    (lambda rows: [{"scheme": "fp8"}, *rows[1:]], None, "field 'scheme' is 'fp8'"),
    (lambda rows: [rows[0], {"scheme": "affine", "k_bits": 8}, *rows[2:]], None, "field 'v_bits' is None"),
    (lambda rows: rows, {"quantized_kv_start": -1}, "quantized_kv_start"),
    (lambda rows: [rows[0], {**A84, "k_head_dim": 128}, *rows[2:]], None, "field 'k_head_dim' is 128 but"),
    (lambda rows: [{**NONE, "cache": "RotatingKVCache"}, *rows[1:]], None, "field 'cache' is 'RotatingKVCache'"),
    (lambda rows: rows, {"kind": "optiq-sensitivity"}, "field 'kind'"),
    (lambda rows: rows, {"format_version": 9}, "field 'format_version'"),
    (lambda rows: rows, {"num_cache_slots": 5}, "num_cache_slots"),
]


@pytest.mark.parametrize("edit,top,message", BAD)
def test_bad_configs_fail_at_load_naming_file_and_field(tiny_float, tmp_path, edit, top, message):
    model, _ = tiny_float
    rows = edit([A84, A84, NONE, A84])
    path = _write_plan(tmp_path / "kv_config.json", rows)
    if top:
        data = json.loads(path.read_text())
        data.update(top)
        path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as err:
        plan_file.load_kv_config(path, model)
    assert str(path) in str(err.value)


def test_layer_index_mismatch_and_duplicate_slots(tiny_float, tmp_path):
    model, _ = tiny_float
    path = _write_plan(tmp_path / "kv_config.json", [A84, A84, NONE, A84])
    data = json.loads(path.read_text())
    data["layers"][2]["layer"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="field 'layer' is 7"):
        plan_file.load_kv_config(path, model)
    data["layers"][2]["layer"], data["layers"][2]["cache_slot"] = 2, 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="exactly one entry per cache slot"):
        plan_file.load_kv_config(path, model)


def test_mismatched_folder_config_fails_at_load(model_dir, hooks_enabled):
    import mlx_lm

    _write_plan(model_dir / "kv_config.json", [A84, A84])
    with pytest.raises(ValueError, match="has 2 cache slots but the model builds 4"):
        mlx_lm.load(str(model_dir))


def test_hybrid_model_keeps_recurrent_state_float(tmp_path, hooks_enabled):
    from mlx_lm.generate import generate_step

    model = tiny_hybrid()
    geometry = cache_geometry(model)
    assert [g.kind for g in geometry] == ["ArraysCache", "KVCache", "ArraysCache", "KVCache"]
    windows = [mx.arange(1, 81) % 500]
    table = sensitivity.measure_kv_sensitivity(model, windows, 64, [(8, 8, 64), (2, 2, 64)], progress=False)
    assert [bool(e["kl"]) for e in table["slots"]] == [False, True, False, True]
    plan = sensitivity.allocate_kv(table, 3.0, context_length=1024)
    assert [s.scheme for s in plan.slots] == ["none", "affine", "none", "affine"]
    assert plan.achieved_bits == pytest.approx(2.5)  # recurrent state is not KV: only attention layers count

    cache = apply.make_plan_cache(model, plan)
    assert [type(c).__name__ for c in cache] == ["ArraysCache", "MixedQuantizedKVCache"] * 2
    with apply.use_kv_config(plan):
        steps = list(zip(range(4), generate_step(mx.array([1, 2, 3, 4, 5]), model)))
    assert len(steps) == 4

    # quantizing a slot that holds no KV is refused, naming the slot
    bad = plan_file.KVPlan(
        slots=[
            plan_file.SlotPlan(slot=i, layer=i, scheme="affine", k_bits=8, v_bits=8, group_size=64) for i in range(4)
        ],
        source="bad.json",
    )
    with pytest.raises(
        ValueError, match=r"bad.json: layers\[0\].*ArraysCache, which it cannot quantize; use scheme 'none'"
    ):
        plan_file.validate_plan(bad, model)


WINDOW = 16  # shorter than the prompts below: the sliding caches rotate and evict


def test_sliding_window_layers_are_measured_and_quantized(hooks_enabled):
    from mlx_lm.generate import generate_step

    from mlx_lm_optiq.kv.caches import MixedQuantizedRotatingKVCache

    model = tiny_sliding(window=WINDOW)
    geometry = cache_geometry(model)
    assert [g.kind for g in geometry] == ["RotatingKVCache", "KVCache"] * 2 and geometry[0].window == WINDOW
    windows = [mx.arange(1, 81) % 500]
    table = sensitivity.measure_kv_sensitivity(model, windows, 64, [(8, 8, 64), (2, 2, 64)], progress=False)
    assert all(e["kl"] for e in table["slots"])  # sliding slots are measured too
    for e in table["slots"]:
        assert e["kl"]["2/2:64"] > e["kl"]["8/8:64"] >= 0
    fast = sensitivity.measure_kv_sensitivity(model, windows, 64, [(2, 2, 64)], progress=False, probe="fast")
    assert all(e["kl"]["2/2:64"] > 0 for e in fast["slots"])  # the float-prefix probe copies rotating caches
    # budget: a sliding slot holds only its window (16 of 1024 tokens), so quantizing it buys little
    plan = sensitivity.allocate_kv(table, 3.0, context_length=1024)
    assert plan.achieved_bits <= 3.0
    assert average_bits(plan.slots, geometry, 1024) == pytest.approx(plan.achieved_bits, abs=1e-4)

    # a real quantized rotating cache computes what the simulation computes, through rotation
    plan = sensitivity.uniform_plan(geometry, 4, 2, 64)
    plan_file.validate_plan(plan, model)
    prompt = mx.arange(3, 43) % 500  # 40 tokens > WINDOW

    def greedy(cache, n=12):
        return [int(t) for t, _ in zip(range(n), generate_step(prompt, model, max_tokens=n, prompt_cache=cache))]

    cache = apply.make_plan_cache(model, plan)
    assert [type(c).__name__ for c in cache] == ["MixedQuantizedRotatingKVCache", "MixedQuantizedKVCache"] * 2
    real = greedy(cache)
    assert isinstance(cache[0], MixedQuantizedRotatingKVCache) and cache[0].quantized
    assert cache[0].offset > 40 and cache[0].keys.shape[2] == WINDOW and cache[0].keys.dtype == mx.uint8
    assert real == greedy(sensitivity.simulated_plan_cache(model, plan))
    x = prompt[None]
    got = model(x, cache=apply.make_plan_cache(model, plan))
    want = model(x, cache=sensitivity.simulated_plan_cache(model, plan))
    assert mx.allclose(got, want, atol=1e-4)
    assert not mx.allclose(got, model(x), atol=1e-3)  # 2-bit values really change the outputs

    # TurboQuant has no sliding-window cache: refused, naming the slot
    turbo = plan_file.plan_from_dict(
        {
            "layers": [{"layer": 0, "cache_slot": 0, "scheme": "turbo", "k_bits": 3, "v_bits": 3}]
            + [{"layer": i, "cache_slot": i, "scheme": "none"} for i in range(1, 4)]
        },
        source="turbo.json",
    )
    with pytest.raises(
        ValueError, match=r"turbo.json: layers\[0\].*needs a KVCache, but this slot is a RotatingKVCache"
    ):
        plan_file.validate_plan(turbo, model)


@pytest.mark.parametrize("quantized_kv_start", [0, 8])
def test_sliding_window_caches_batch_like_single_requests(quantized_kv_start, hooks_enabled):
    """BatchGenerator (left padding, merge, extend, filter, extract) with quantized rotating caches
    computes what one request at a time computes, with prompts longer and shorter than the window.
    (A batch switches to quantized storage once, when its longest row reaches quantized_kv_start,
    as the full-attention batch cache does: the start is below every prompt length here, so rows
    switch as they do alone.) Compared up to the noise another batch shape brings (tests.helpers):
    each row's single request is replayed on the batched tokens."""
    from mlx_lm.generate import BatchGenerator

    from mlx_lm_optiq.kv.caches import MixedQuantizedKVCache, MixedQuantizedRotatingKVCache

    gen = sys.modules["mlx_lm.generate"]
    model = tiny_sliding(window=WINDOW)
    plan = sensitivity.uniform_plan(cache_geometry(model), 8, 4, 64)
    plan.quantized_kv_start = quantized_kv_start

    def plan_cache(*_):
        return apply.make_plan_cache(model, plan)

    prompts = [[int(t) for t in (mx.arange(n) * 7 + s) % 500] for n, s in ((30, 1), (9, 2), (21, 3))]
    max_tokens = [10, 14, 6]
    original = gen.make_prompt_cache
    gen.make_prompt_cache = plan_cache
    try:
        batch = BatchGenerator(model, max_tokens=14)
        uids = batch.insert(prompts[:2], max_tokens=max_tokens[:2])
        got = {u: [] for u in uids}
        kinds = set()
        for r in batch.next_generated():
            got[r.uid].append((r.token, r.logprobs))
        # a request joining the running batch: its caches are extended into the batch's
        late = batch.insert(prompts[2:], max_tokens=max_tokens[2:])
        uids += late
        got.update({u: [] for u in late})
        while responses := batch.next_generated():
            for r in responses:
                got[r.uid].append((r.token, r.logprobs))
                if r.finish_reason is not None:
                    kinds |= {type(c) for c in r.prompt_cache}
        batch.close()
    finally:
        gen.make_prompt_cache = original
    assert [len(got[u]) for u in uids] == max_tokens
    for row, (u, prompt) in enumerate(zip(uids, prompts)):
        tokens = [t for t, _ in got[u]]
        solo = replay_solo_logprobs(model, prompt, tokens, prompt_cache=plan_cache())
        assert_greedy_matches_solo(
            tokens, solo, logprobs=[lp for _, lp in got[u]], noise=QUANTIZED_KV_NOISE, label=f"row {row}"
        )
    assert kinds == {MixedQuantizedRotatingKVCache, MixedQuantizedKVCache}  # extracted rows keep their kind


def test_turbo_scheme_builds_turbo_cache(tiny_float, tmp_path, hooks_enabled):
    from mlx_lm import generate

    from mlx_lm_optiq.kv.turbo import TurboQuantKVCache

    model, tok = tiny_float
    turbo = {"scheme": "turbo", "k_bits": 4, "v_bits": 3}
    plan = plan_file.load_kv_config(_write_plan(tmp_path / "kv_config.json", [NONE, turbo, A84, turbo]), model)
    cache = apply.make_plan_cache(model, plan)
    assert isinstance(cache[1], TurboQuantKVCache) and isinstance(cache[3], TurboQuantKVCache)
    assert (cache[1].key_bits, cache[1].value_bits) == (4, 3) and cache[1].seed != cache[3].seed
    out = generate(model, tok, "Anne Elliot", max_tokens=4, prompt_cache=cache)
    assert isinstance(out, str) and cache[1].offset == cache[0].offset > 0
    bad = _write_plan(tmp_path / "bad.json", [NONE, {**turbo, "k_bits": 9}, A84, turbo])
    with pytest.raises(ValueError, match="field 'k_bits' is 9, expected one of .* for scheme 'turbo'"):
        plan_file.load_kv_config(bad, model)


def test_convert_flag_writes_kv_config(tiny_q4_path, tmp_path, shared_dir, hooks_enabled):
    import sys as _sys

    convert = _sys.modules["mlx_lm.convert"].convert
    out = tmp_path / "converted"
    convert(
        hf_path=str(tiny_q4_path),
        mlx_path=str(out),
        optiq_kv_target_bits=6.0,
        optiq_kv_data=str(shared_dir / "data/text/persuasion.txt"),
        optiq_kv_prefix_tokens=96,
        optiq_kv_scored_tokens=16,
        optiq_kv_candidates="8/8:64,4/4:64",
    )
    plan = plan_file.read_kv_config(out)
    assert plan.model == str(tiny_q4_path) and plan.achieved_bits <= 6
    assert (out / "config.json").is_file() and len(plan.slots) == 4
    with pytest.raises(ValueError, match="--optiq-kv-candidates need --optiq-kv-target-bits"):
        convert(hf_path=str(tiny_q4_path), mlx_path=str(tmp_path / "x"), optiq_kv_candidates="8/8:64")
    with pytest.raises(ValueError, match="--optiq-kv-candidates: '8/8' is not of the form"):
        convert(
            hf_path=str(tiny_q4_path), mlx_path=str(tmp_path / "y"), optiq_kv_target_bits=4.5, optiq_kv_candidates="8/8"
        )
    assert not (tmp_path / "y").exists()


# `python -m mlx_lm <command> ...` run once per argv list (JSON in argv[1]) in ONE interpreter, as the
# console script runs it (runpy of mlx_lm's __main__); each run's stderr and exit code are framed.
_CONSOLE_RUNS = """
import json, runpy, sys, traceback
for argv in json.loads(sys.argv[1]):
    sys.argv = ["mlx_lm", *argv]
    print("=== run", file=sys.stderr, flush=True)
    try:
        runpy.run_module("mlx_lm", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 1)
    except Exception:
        traceback.print_exc()
        code = 1
    print(f"=== exit {code}", file=sys.stderr, flush=True)
"""


def test_generate_console_script_uses_folder_plan_and_flags(model_dir, optiq_env):
    import json
    import subprocess

    _write_plan(model_dir / "kv_config.json", [NONE, A84, A84, A84])
    base = ["generate", "--model", str(model_dir), "--prompt", "Hi", "--max-tokens", "2"]
    runs = [base + ["--kv-bits", "4"], base + ["--optiq-kv-config", str(model_dir / "missing.json")]]
    proc = subprocess.run(
        [sys.executable, "-c", _CONSOLE_RUNS, json.dumps(runs)], env=optiq_env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = [chunk.rsplit("=== exit ", 1) for chunk in proc.stderr.split("=== run\n")[1:]]
    assert len(outs) == 2, proc.stderr[-3000:]
    (stderr, code), (stderr2, code2) = ((err, int(c)) for err, c in outs)
    assert code != 0
    assert "per-layer KV plan" in stderr and "3x K8/V4 g64" in stderr
    assert "kv_bits=4 cannot be combined with the per-layer KV plan" in stderr
    assert code2 == 2 and "--optiq-kv-config: " in stderr2 and "missing.json: file not found" in stderr2


def test_disable_restores_generate_symbols():
    import mlx_lm

    gen = sys.modules["mlx_lm.generate"]
    utils = sys.modules["mlx_lm.utils"]
    originals = (
        gen.generate_step,
        gen.maybe_quantize_kv_cache,
        gen.speculative_generate_step,
        utils.load,
        mlx_lm.load,
        gen.load,
        gen.setup_arg_parser,
    )
    with optiq():
        assert gen.generate_step is not originals[0] and mlx_lm.load is not originals[4]
        assert mlx_lm.load is utils.load and gen.load is utils.load
    now = (
        gen.generate_step,
        gen.maybe_quantize_kv_cache,
        gen.speculative_generate_step,
        utils.load,
        mlx_lm.load,
        gen.load,
        gen.setup_arg_parser,
    )
    assert all(a is b for a, b in zip(now, originals))
