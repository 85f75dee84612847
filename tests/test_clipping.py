"""Activation-aware clipping on the real 4-layer SmolLM2: the search's error model, input
moments, that the sweep measures exactly the model the writer writes, and the table field."""

import base64
import copy
import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_optiq.core.jsonio import OptiqFileError
from mlx_lm_optiq.core.model_tree import quantizable_modules
from mlx_lm_optiq.weights import clipping, plan
from mlx_lm_optiq.weights.probes import qdq
from mlx_lm_optiq.weights.sweep import measure_sensitivity
from mlx_lm_optiq.weights.table import read_table, write_table

MODULE = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def tokens(tiny_q4_path):
    from mlx_lm.utils import load_tokenizer

    from mlx_lm_optiq.core.calibration import load_calibration

    return load_calibration(load_tokenizer(tiny_q4_path), num_samples=2, sequence_length=32)


@pytest.fixture(scope="module")
def float_model(tiny_float_path):
    from mlx_lm.utils import load_model

    return load_model(tiny_float_path)


@pytest.fixture(scope="module")
def moments(float_model, tokens):
    model, _ = float_model
    return clipping.input_moments(model, list(quantizable_modules(model)), tokens, batch_size=2)


def _weighted_error(w, q, m):
    return (m * (q.astype(mx.float32) - w.astype(mx.float32)) ** 2).sum().item()


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 64), (5, 128), (6, 32), (8, 64)])
def test_search_error_model_is_stock_quantization(float_model, moments, bits, group):
    """_affine_errors at every alpha equals the weighted error of stock mx.quantize of the clipped weight."""
    model, _ = float_model
    w = quantizable_modules(model)[MODULE].weight  # float32
    cand = {"bits": bits, "group_size": group, "mode": "affine"}
    exact = w.reshape(w.shape[0], -1, group)
    lo, hi = exact.min(-1, keepdims=True), exact.max(-1, keepdims=True)
    imp = moments[MODULE].reshape(1, -1, group)
    for i in (0, 3, 8, 12):
        idx = mx.full(exact.shape[:2], i, dtype=mx.uint8)
        ours = clipping._affine_errors(exact, imp, lo, hi, idx[None, ..., None], bits)[0]
        stock_q = qdq(clipping.apply_alphas(w, cand, idx), cand).reshape(exact.shape)
        stock = (imp * (stock_q - exact) ** 2).sum(-1)
        assert mx.allclose(ours, stock, rtol=1e-5, atol=0).item(), (bits, group, i)


def test_clipping_lowers_the_weighted_error_of_every_module(float_model, moments):
    model, _ = float_model
    clip = clipping.Clipper(moments)
    ratios = []
    for path, module in quantizable_modules(model).items():
        if path not in moments:
            continue
        for cand in ({"bits": 3, "group_size": 64, "mode": "affine"}, {"bits": 4, "group_size": 32, "mode": "affine"}):
            w = module.weight
            clipped = clip(path, w, cand)
            assert clipped.shape == w.shape and clipped.dtype == w.dtype
            stock = _weighted_error(w, qdq(w, cand), moments[path])
            ours = _weighted_error(w, qdq(clipped, cand), moments[path])
            assert ours <= stock * (1 + 1e-6), (path, cand)
            ratios.append(ours / stock)
    print(f"\nweighted error, clipped / stock: median {np.median(ratios):.3f}, max {max(ratios):.3f}")
    assert np.median(ratios) < 0.9


def test_input_moments_are_the_layer_inputs_and_the_model_is_restored(float_model, tokens):
    model, _ = float_model
    modules = quantizable_modules(model)
    before = {p: id(m) for p, m in modules.items()}
    got = clipping.input_moments(model, list(modules), tokens, batch_size=1)
    assert {p: id(m) for p, m in quantizable_modules(model).items()} == before
    assert "model.embed_tokens" not in got  # called on token ids
    assert set(got) == set(modules) - {"model.embed_tokens"}
    layer = model.model.layers[0]
    x = layer.input_layernorm(model.model.embed_tokens(tokens)).astype(mx.float32)
    expect = (x**2).reshape(-1, x.shape[-1]).mean(0)
    for p in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        assert mx.allclose(got[p], expect, rtol=1e-4, atol=1e-6).item(), p


def test_float_formats_and_modules_without_moments_are_left_stock(float_model, moments):
    model, _ = float_model
    clip = clipping.Clipper(moments)
    mods = quantizable_modules(model)
    w = mods[MODULE].weight
    assert clip(MODULE, w, {"bits": 4, "group_size": 16, "mode": "nvfp4"}) is w
    emb = mods["model.embed_tokens"].weight
    assert clip("model.embed_tokens", emb, {"bits": 4, "group_size": 64, "mode": "affine"}) is emb
    with pytest.raises(clipping.ClippingError, match="input channels"):
        clip(MODULE, w[:, :64], {"bits": 4, "group_size": 64, "mode": "affine"})


def _kl_per_token(reference, model, tokens):
    total = 0.0
    for i in range(tokens.shape[0]):
        ref = reference(tokens[i : i + 1]).astype(mx.float32)
        out = model(tokens[i : i + 1]).astype(mx.float32)
        ref_lp = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
        lp = out - mx.logsumexp(out, axis=-1, keepdims=True)
        total += (mx.exp(ref_lp) * (ref_lp - lp)).sum().item()
    return total / tokens.size


@pytest.mark.parametrize("method", ["activation", "none"])
def test_the_sweep_measures_the_model_the_writer_writes(tiny_float_path, float_model, tokens, method):
    """One module at 3:64: the table's KL is the KL of the model that stock quantize_model writes
    through our quant_predicate (clipped ranges included), measured independently."""
    from mlx_lm.utils import load_model, quantize_model

    table = measure_sensitivity(
        tiny_float_path,
        tokens,
        "3:64",
        reference="float",
        modules=[MODULE],
        batch_size=1,
        progress=False,
        clipping=method,
    )
    assert table["clipping"]["method"] == method
    written, config = load_model(tiny_float_path)
    layers = {MODULE: {"bits": 3, "group_size": 64, "mode": "affine"}}
    written, _ = quantize_model(
        written, copy.deepcopy(config), 64, 3, quant_predicate=plan.quant_predicate(layers, clipping.from_table(table))
    )
    reference, _ = float_model
    measured = table["modules"][MODULE]["kl"]["3:64"]
    assert _kl_per_token(reference, written, tokens) == pytest.approx(measured, rel=1e-4)
    stock, _ = load_model(tiny_float_path)
    stock, _ = quantize_model(stock, copy.deepcopy(config), 64, 3, quant_predicate=plan.quant_predicate(layers))
    clipped_scales = dict(written.named_modules())[MODULE].scales
    stock_scales = dict(stock.named_modules())[MODULE].scales
    if method == "none":
        assert mx.array_equal(clipped_scales, stock_scales).item()
    else:  # clipped groups have smaller scales, and the module's KL is lower
        assert (mx.abs(clipped_scales) <= mx.abs(stock_scales) * (1 + 1e-6)).all().item()
        assert (mx.abs(clipped_scales) < mx.abs(stock_scales) * 0.99).mean().item() > 0.3
        assert measured < _kl_per_token(reference, stock, tokens)


def test_low_bit_and_fisher_sweeps_record_clipping(tiny_float_path, tokens):
    mods = [MODULE, "model.layers.2.self_attn.v_proj"]
    # one calibration sequence: the low-bit reference runs the CPU's slow quantized kernels
    tokens = tokens[:1]
    kl = {}
    for reference, method in (("low-bit", "exact"), ("float", "fisher")):
        for clip in ("activation", "none"):
            t = measure_sensitivity(
                tiny_float_path,
                tokens,
                "3:64,8:64",
                reference=reference,
                method=method,
                modules=mods,
                progress=False,
                clipping=clip,
            )
            assert t["clipping"]["method"] == clip
            assert set(t["clipping"].get("moments", {})) == (set(mods) if clip == "activation" else set())
            kl[reference, clip] = sum(t["modules"][p]["kl"]["3:64"] for p in mods)
    # clipped 3-bit ranges lose less, whichever reference or estimate measures them
    assert kl["low-bit", "activation"] < kl["low-bit", "none"]
    assert kl["float", "activation"] < kl["float", "none"]


def test_table_field_round_trip_and_errors(tiny_float_path, tokens, tmp_path):
    table = measure_sensitivity(
        tiny_float_path, tokens, "4:64", reference="float", modules=[MODULE], batch_size=2, progress=False
    )
    write_table(table, tmp_path / "t.json")
    loaded = read_table(tmp_path / "t.json")
    clip = clipping.from_table(loaded)
    raw = mx.array(np.frombuffer(base64.b64decode(table["clipping"]["moments"][MODULE]), dtype="<f4"))
    assert mx.array_equal(clip.moments[MODULE], raw).item()
    assert clipping.from_table({k: v for k, v in loaded.items() if k != "clipping"}) is None  # older tables

    def corrupt(mutate, message):
        data = json.loads((tmp_path / "t.json").read_text())
        mutate(data["clipping"])
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(OptiqFileError, match=message):
            read_table(tmp_path / "bad.json")

    width = table["modules"][MODULE]["shape"][-1]
    corrupt(lambda c: c.update(method="awq"), r"bad.json: field 'clipping.method' must be one of")
    corrupt(
        lambda c: c["moments"].update({MODULE: c["moments"][MODULE][:40]}),
        rf"clipping.moments.{MODULE}' holds \d+ floats, expected {width}",
    )
    corrupt(lambda c: c["moments"].update({MODULE: "not base64!"}), r"is not base64")
    corrupt(lambda c: c["moments"].update({"model.nope": c["moments"][MODULE]}), r"names no module of the table")
    corrupt(lambda c: c.update(grid=[1.0, 0.5]), r"field 'clipping.grid' must be")
    neg = base64.b64encode(np.full(width, -1.0, dtype="<f4").tobytes()).decode()
    corrupt(lambda c: c["moments"].update({MODULE: neg}), r"must be finite second moments >= 0")
    with pytest.raises(Exception, match="clipping must be one of"):
        measure_sensitivity(tiny_float_path, tokens, "4:64", modules=[MODULE], progress=False, clipping="mse")
