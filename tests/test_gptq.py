"""Error-compensated writing (weights/gptq.py) on the real 4-layer SmolLM2: GPTQ lowers the output
error of 3- and 4-bit modules on their calibration inputs, the written model reloads in stock
`mlx_lm.load` with exactly the tensors computed, fp16 sources with huge inputs stay finite, and a
non-finite value is refused with an error naming the module."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.model_tree import load_float_model, quantizable_modules
from mlx_lm_optiq.weights import clipping, gptq, pipeline
from mlx_lm_optiq.weights.config import WeightsConfig

BLOCK = "model.layers.1"
QKV = [f"{BLOCK}.self_attn.{n}_proj" for n in ("q", "k", "v")]
DOWN = f"{BLOCK}.mlp.down_proj"


def _cand(key):
    bits, group = key.split(":")
    return {"bits": int(bits), "group_size": int(group), "mode": "affine"}


def _dequantized(arrays, cand):
    return mx.dequantize(arrays["weight"], arrays["scales"], arrays["biases"], cand["group_size"], cand["bits"])


@pytest.fixture(scope="module")
def tokens(tiny_q4_path):
    from mlx_lm.utils import load_tokenizer

    from mlx_lm_optiq.core.calibration import load_calibration

    return load_calibration(load_tokenizer(tiny_q4_path), num_samples=4, sequence_length=128)


@pytest.fixture(scope="module")
def float_model(tiny_float_path):
    model, _ = load_float_model(tiny_float_path, "float32", lazy=False)
    return model


@pytest.fixture(scope="module")
def hessians(float_model, tokens):
    """The input Hessians of every module of the float model (one forward)."""
    return gptq.input_hessians(float_model, list(quantizable_modules(float_model)), tokens, batch_size=4)


def test_hessians_are_the_module_inputs_and_shared_inputs_share_one(float_model, tokens, hessians):
    hessians, group_of = hessians
    paths = [*QKV, f"{BLOCK}.self_attn.o_proj", f"{BLOCK}.mlp.gate_proj", f"{BLOCK}.mlp.up_proj", DOWN]
    assert "model.embed_tokens" not in group_of  # called on token ids
    assert len({group_of[p] for p in QKV}) == 1 and group_of[paths[4]] == group_of[paths[5]]
    assert len({group_of[p] for p in paths}) == 4
    assert len(hessians) == 4 * len(float_model.model.layers)
    x = float_model.model.embed_tokens(tokens)
    for layer in float_model.model.layers[:1]:
        x = layer(x, mask="causal")
    x = float_model.model.layers[1].input_layernorm(x).reshape(-1, x.shape[-1])
    expect = x.T @ x / x.shape[0]
    assert mx.allclose(hessians[group_of[QKV[0]]], expect, rtol=1e-3, atol=1e-4 * mx.abs(expect).max().item()).item()


@pytest.mark.parametrize("key", ["3:64", "4:64"])
def test_gptq_lowers_the_output_error_on_calibration_inputs(float_model, tokens, hessians, key):
    """Against the RTN writer (stock rounding of the activation-clipped weight, what the writer wrote
    before) and plain stock rounding, per module: q/k/v (shared Hessian, rows of three modules
    compensated together) and down_proj (1536 inputs)."""
    cand = _cand(key)
    layers = {p: cand for p in [*QKV, DOWN]}
    moments = clipping.input_moments(float_model, list(layers), tokens, batch_size=4)
    clip = clipping.Clipper(moments)
    write_dtypes = {p: mx.float16 for p in layers}
    tensors, summary = gptq.compensate(float_model, layers, tokens, write_dtypes, clip=clip, hessians=hessians)
    assert summary["compensated"] == sorted(layers) and not summary["round_to_nearest"]
    hessians, group_of = hessians
    modules = dict(float_model.named_modules())
    g, b = cand["group_size"], cand["bits"]
    for p in layers:
        w = modules[p].weight.astype(mx.float16)
        h = hessians[group_of[p]]
        ours = gptq.output_error(w, _dequantized(tensors[p], cand), h)
        rtn = gptq.output_error(w, mx.dequantize(*mx.quantize(clip(p, w, cand), g, b), g, b), h)
        stock = gptq.output_error(w, mx.dequantize(*mx.quantize(w, g, b), g, b), h)
        assert ours < 0.7 * rtn and ours < 0.7 * stock, (p, key, ours / rtn, ours / stock)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_codes_is_the_layout_of_mx_quantize(bits):
    w = mx.random.normal((8, 256), key=mx.random.key(bits))
    for g in (32, 64, 128):
        packed, scales, biases = mx.quantize(w, g, bits)
        codes = mx.dequantize(packed, mx.ones_like(scales), mx.zeros_like(biases), g, bits)
        assert np.array_equal(np.array(gptq.pack_codes(codes, bits)), np.array(packed))


def test_pack_codes_of_a_row_shorter_than_32_codes():
    """16 codes of 2 bits fill one word: the zero padding to a block of 32 is cut off again."""
    codes = mx.array([[(j * 3 + r) % 4 for j in range(16)] for r in range(3)], dtype=mx.float32)
    want = [[sum(((j * 3 + r) % 4) << (2 * j) for j in range(16))] for r in range(3)]
    assert np.array(gptq.pack_codes(codes, 2)).tolist() == want


def test_written_model_reloads_in_stock_load_with_the_tensors_computed(
    tiny_float_path, float_model, tokens, hessians, tmp_path
):
    """Stock convert writes a plan covering every affine bit width and group size (and nvfp4,
    which stays at round to nearest); the writer replaces the planned tensors in its safetensors;
    stock `mlx_lm.load` then holds exactly the computed tensors, whose dequantization is the
    GPTQ result to the stored dtype's rounding and better than what stock wrote."""
    from mlx.utils import tree_unflatten
    from mlx_lm import load
    from mlx_lm.convert import convert
    from mlx_lm.utils import load_model

    from mlx_lm_optiq.weights.plan import check_quantized, quant_predicate

    blocks = ["model.layers.0", "model.layers.2"]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj"]
    keys = ["2:32", "3:64", "4:32", "5:64", "6:32", "8:64", "2:64", "3:32", "4:64", "5:32"]
    layers = {f"{b}.{n}": _cand(k) for (b, n), k in zip([(b, n) for b in blocks for n in names], keys)}
    layers["model.layers.0.mlp.up_proj"] = _cand("6:64")
    layers["model.layers.2.mlp.up_proj"] = _cand("8:32")
    layers["model.layers.0.mlp.down_proj"] = _cand("3:128")
    layers["model.layers.2.mlp.down_proj"] = _cand("4:128")
    layers["model.layers.3.mlp.down_proj"] = {"bits": 4, "group_size": 16, "mode": "nvfp4"}
    out = tmp_path / "model"
    convert(
        str(tiny_float_path), mlx_path=str(out), quantize=True, dtype="float16", quant_predicate=quant_predicate(layers)
    )
    stock = mx.load(str(out / "model.safetensors"))
    write_dtypes = gptq.scales_dtypes(out, list(layers))
    assert {d for p, d in write_dtypes.items() if layers[p]["mode"] == "affine"} == {mx.float16}
    tensors, summary = gptq.compensate(float_model, layers, tokens, write_dtypes, hessians=hessians)
    assert set(tensors) == set(layers) - {"model.layers.3.mlp.down_proj"}
    assert list(summary["round_to_nearest"]) == ["model.layers.3.mlp.down_proj"]
    gptq.write_compensated(out, tensors)

    model, _ = load(str(out))
    check_quantized(model, layers)
    modules = dict(model.named_modules())
    hessians, group_of = hessians
    floats = dict(float_model.named_modules())
    for p, arrays in tensors.items():
        m, cand = modules[p], layers[p]
        for part in ("weight", "scales", "biases"):
            assert mx.array_equal(m[part], arrays[part]).item(), (p, part)
        assert mx.array_equal(stock[f"{p}.scales"], arrays["scales"]).item(), p  # same grid as stock
        loaded = mx.dequantize(m.weight, m.scales, m.biases, cand["group_size"], cand["bits"])
        assert mx.isfinite(loaded).all().item()
        # the loaded values are the codes on the stored grid, q * scale + bias in fp16: the values
        # GPTQ fed its errors back from (gptq_codes)
        g = cand["group_size"]
        s, b = mx.repeat(arrays["scales"], g, axis=1), mx.repeat(arrays["biases"], g, axis=1)
        codes = mx.dequantize(m.weight, mx.ones_like(m.scales), mx.zeros_like(m.biases), g, cand["bits"])
        assert codes.dtype == mx.float16 and mx.array_equal(loaded, codes * s + b).item(), p
        w = floats[p].weight.astype(mx.float16)
        stock_dq = mx.dequantize(stock[f"{p}.weight"], stock[f"{p}.scales"], stock[f"{p}.biases"], g, cand["bits"])
        h = hessians[group_of[p]]
        assert gptq.output_error(w, loaded, h) < gptq.output_error(w, stock_dq, h), p
    nv = "model.layers.3.mlp.down_proj"
    assert mx.array_equal(modules[nv].weight, stock[f"{nv}.weight"]).item()  # left as stock wrote it
    # in memory (benchmarks): the same tensors put into a stock-quantized model give the same model
    again, _ = load_model(out)  # stock's model loader (the tokenizer is not needed here)
    again.update(tree_unflatten(list(stock.items())))
    gptq.apply_to_model(again, tensors)
    for p in tensors:
        assert mx.array_equal(dict(again.named_modules())[p].weight, modules[p].weight).item(), p
    with pytest.raises(RuntimeError, match=r"model.layers.0.self_attn.q_proj.scales: .* does not match"):
        gptq.apply_to_model(again, {"model.layers.0.self_attn.q_proj": {"scales": mx.zeros((3, 3), dtype=mx.float16)}})


@pytest.fixture
def fp16_loud_model(tiny_float_path, tokens):
    """The model in fp16, block 1's q/k/v inputs scaled so that x^T x overflows fp16."""
    model, _ = load_float_model(tiny_float_path, "float16", lazy=False)
    x = model.model.layers[0](model.model.embed_tokens(tokens), mask="causal")
    norm = model.model.layers[1].input_layernorm
    peak = mx.abs(norm(x)).max().item()
    norm.weight = norm.weight * (2000.0 / peak)  # inputs up to 2e3: finite in fp16, their squares are not
    return model


def test_fp16_source_with_huge_inputs_writes_finite_compensated_weights(fp16_loud_model, tokens):
    model = fp16_loud_model  # computing in fp16 too (fp16 matmuls are slow on CPU: few tokens)
    tokens = tokens[:2, :64]
    x = model.model.embed_tokens(tokens[:1])
    x = model.model.layers[1].input_layernorm(model.model.layers[0](x, mask="causal"))
    assert mx.isfinite(x).all().item()
    x2 = x.reshape(-1, x.shape[-1])
    assert not mx.isfinite(x2.T @ x2).all().item()  # an fp16 x^T x (stock mlx_lm.gptq) overflows
    cand = _cand("4:64")
    layers = {p: cand for p in QKV}
    hessians, group_of = gptq.input_hessians(model, QKV, tokens, batch_size=2)
    tensors, _ = gptq.compensate(model, layers, tokens, {p: mx.float16 for p in layers}, hessians=(hessians, group_of))
    modules = dict(model.named_modules())
    for p in QKV:
        assert all(mx.isfinite(a).all().item() for a in tensors[p].values() if mx.issubdtype(a.dtype, mx.floating))
        written = _dequantized(tensors[p], cand)
        assert mx.isfinite(written).all().item()
        w, h = modules[p].weight, hessians[group_of[p]]
        assert mx.isfinite(h).all().item()
        assert gptq.output_error(w, written, h) < gptq.output_error(w, mx.dequantize(*mx.quantize(w, 64, 4), 64, 4), h)


def test_non_finite_values_are_refused_naming_the_module(float_model, tokens):
    path = QKV[1]
    module = dict(float_model.named_modules())[path]
    weight = module.weight
    cand = _cand("4:64")
    bad = weight.at[3, 5].add(float("inf"))
    module.weight = bad
    try:
        with pytest.raises(gptq.WriterError, match=rf"{path}: .*non-finite.*refusing to write"):
            gptq.compensate(float_model, {path: cand}, tokens[:1], {path: mx.float16})
    finally:
        module.weight = weight
    # an input Hessian that overflowed
    h = mx.eye(64).at[2, 2].add(float("nan"))
    with pytest.raises(gptq.WriterError, match=rf"{path}: the calibration inputs are not finite"):
        gptq.inverse_hessian_factor(h, label=path)
    # the factor: U upper with U^T U = (H + damp * mean(diag H) * I)^-1; a never-seen channel
    # (zero diagonal) gets a unit diagonal
    x = mx.random.normal((256, 48), key=mx.random.key(0))
    h = (x.T @ x / 256).at[7, :].multiply(0.0).at[:, 7].multiply(0.0)
    u, damp = gptq.inverse_hessian_factor(h, label=path)
    assert u.dtype == mx.float32 and damp == gptq.DAMP
    assert mx.allclose(u, mx.triu(u)).item()
    fixed = h.at[7, 7].add(1.0)
    damped = fixed + damp * mx.mean(mx.diagonal(fixed)) * mx.eye(48)
    assert mx.allclose((u.T @ u) @ damped, mx.eye(48), atol=1e-4).item()
    # an indefinite H (eigenvalue -2): damping is raised tenfold until it factorises, or refused
    _, damp = gptq.inverse_hessian_factor(mx.array([[1.0, 3.0], [3.0, 1.0]]), label=path)
    assert damp == pytest.approx(10.0)
    with pytest.raises(gptq.WriterError, match=rf"{path}: the input Hessian cannot be factorised"):
        gptq.inverse_hessian_factor(mx.array([[1.0, 1e3], [1e3, 1.0]]), label=path)
    # finite codes and scales whose dequantization overflows fp16: the check before writing
    codes = mx.full((2, 64), 15.0)
    scales = mx.full((2, 1), 6e4, dtype=mx.float16)
    with pytest.raises(gptq.WriterError, match=rf"{path}: its 4:64 weights would dequantize to non-finite"):
        gptq.packed_module(path, codes, scales, mx.zeros_like(scales), cand)


def test_a_factorisation_failing_on_the_worker_thread_stops_the_writer_naming_the_module(float_model, tokens, hessians):
    """compensate factorises the next Hessian on a worker thread while the current one's columns
    are rounded: a failure there surfaces as the same WriterError, naming the module."""
    hs, group_of = hessians
    o_proj, down = f"{BLOCK}.self_attn.o_proj", DOWN
    n = hs[group_of[down]].shape[0]
    # positive diagonal, strongly indefinite (eigenvalue 1 - 1e3): no damping rescues it
    bad = 1e3 * mx.ones((n, n)) - (1e3 - 1.0) * mx.eye(n)
    given = ({**hs, group_of[down]: bad}, group_of)
    plan = {o_proj: _cand("4:64"), down: _cand("4:64")}  # o_proj first: down's H is the "next" one
    with pytest.raises(gptq.WriterError, match=rf"{down}: the input Hessian cannot be factorised"):
        gptq.compensate(float_model, plan, tokens[:1], {o_proj: mx.float16, down: mx.float16}, hessians=given)


def test_writer_option_is_validated_once_and_spelled_as_the_flag(tiny_q4_path, tmp_path, hooks_enabled):
    with pytest.raises(ConfigError, match=r"writer: expected one of rtn, gptq, got 'fast'"):
        WeightsConfig(target_bpw=4.5, writer="fast")
    with pytest.raises(ConfigError, match=r"writer: need `target_bpw`"):
        WeightsConfig(writer="gptq")
    with pytest.raises(ConfigError, match=r"writer: gptq needs the float model"):
        WeightsConfig(target_bpw=4.5, writer="gptq", reference="low-bit")
    low_bit = {"reference": "low-bit"}
    assert pipeline.resolve_writer(WeightsConfig(target_bpw=4.5), low_bit) == "rtn"
    assert pipeline.resolve_writer(WeightsConfig(target_bpw=4.5), {"reference": "float"}) == gptq.DEFAULT_WRITER
    with pytest.raises(ConfigError, match="writer: gptq needs the float model"):
        pipeline.resolve_writer(WeightsConfig(target_bpw=4.5, writer="gptq"), low_bit)
    from mlx_lm import convert

    from mlx_lm_optiq.weights.plan import PlanError

    with pytest.raises(PlanError, match=r"--optiq-writer: expected one of rtn, gptq, got 'fast'"):
        convert(
            str(tiny_q4_path), mlx_path=str(tmp_path / "o"), quantize=True, optiq_target_bpw=4.5, optiq_writer="fast"
        )
    assert not (tmp_path / "o").exists()


def test_replanning_rounds_on_the_tables_own_calibration_tokens(tiny_q4_path, tokens):
    from mlx_lm_optiq.weights.sweep import _tokens_info

    table = {"calibration": dict(_tokens_info(tokens), source="bundled")}
    got = pipeline.table_calibration_tokens(tiny_q4_path, table, "t.json")
    assert mx.array_equal(got, tokens).item()
    table["calibration"]["sha256"] = "0" * 64
    with pytest.raises(ConfigError, match=r"writer: gptq rounds on the calibration tokens of t.json.*sha256"):
        pipeline.table_calibration_tokens(tiny_q4_path, table, "t.json")
    del table["calibration"]["source"]
    with pytest.raises(ConfigError, match=r"writer: .*does not record it \(field 'calibration.source'\)"):
        pipeline.table_calibration_tokens(tiny_q4_path, table, "t.json")


def test_hessians_recorded_block_by_block_write_what_one_forward_writes(float_model, tokens, hessians, monkeypatch):
    """Without precomputed Hessians the writer records them a few blocks at a time (what lets a
    70B model's Hessians fit): with a budget below one block's, every block is its own chunk and
    a partial forward; the written tensors are the ones computed from one full forward's."""
    layers = {
        f"model.layers.{i}.{n}": _cand(k)
        for i in (0, 2, 3)
        for n, k in (("self_attn.q_proj", "4:64"), ("self_attn.k_proj", "3:64"))
    }
    modules = dict(float_model.named_modules())
    chunks = gptq.hessian_chunks(list(reversed(layers)), modules, budget=1)
    assert [sorted({p.split(".")[2] for p in c}) for c in chunks] == [["0"], ["2"], ["3"]]  # model order
    assert gptq.hessian_chunks(list(layers), modules, budget=1 << 40) == [list(layers)]
    write_dtypes = dict.fromkeys(layers, mx.float32)
    whole, _ = gptq.compensate(float_model, layers, tokens, write_dtypes, hessians=hessians)
    recorded = []
    real = gptq.input_hessians
    monkeypatch.setattr(gptq, "input_hessians", lambda m, paths, *a: recorded.append(paths) or real(m, paths, *a))
    monkeypatch.setattr(gptq, "_HESSIAN_BYTES", 1)
    chunked, summary = gptq.compensate(float_model, layers, tokens, write_dtypes)
    assert len(recorded) == 3 and summary["compensated"] == sorted(layers)
    for p in layers:
        for k in ("weight", "scales", "biases"):
            assert mx.array_equal(whole[p][k], chunked[p][k]).item(), (p, k)
