"""The fused CUDA TurboQuant attention (kv/cuda_turbo.py) on a machine without a GPU.

The kernel itself runs only on CUDA (tests/test_turbo_device.py). Here a numpy emulation of
its indexing, written from the CUDA source line by line (block -> (row, KV head, split)
mapping, query rotation, 16-bit staging of packed rows into odd-word-padded tiles, code
extraction from the bit planes at the kernel's offsets, the online softmax per lane, the
value lanes' 64-bit windows, the split merge and the rotation back), is run with the
template constants the Python side computes (`kernel_constants`) and compared with the MLX
reference attention. Stale tile words are filled with random garbage, so reading outside a
staged row would show. Also: which calls the dispatcher sends to the kernel, the
environment variable, and the errors."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_optiq.core import backend
from mlx_lm_optiq.kv import cuda_attention, cuda_turbo, turbo

# ---------------------------------------------------------------- the emulation


def _turbo_code(w, N, B, OFF, j):
    """turbo_code<N, B, OFF>(w, j) for every lane: w (lanes, words) uint64."""
    c = np.zeros(w.shape[0], dtype=np.uint64)
    sh, bit0 = 0, OFF * 8
    for pw in (4, 2, 1):
        if B & pw:
            bit = bit0 + j * pw
            c |= ((w[:, bit >> 5] >> np.uint64(bit & 31)) & np.uint64((1 << pw) - 1)) << np.uint64(sh)
            sh += pw
            bit0 += N * pw
    return c


def _turbo_codes(row, N, B, OFF, DPL, j0):
    """turbo_codes<N, B, OFF, DPL>(row, j0) for one lane (row: uint64 words of the staged tile)."""
    c = [0] * DPL
    sh, bit0 = 0, OFF * 8
    for pw in (4, 2, 1):
        if B & pw:
            bit = bit0 + j0 * pw
            x = ((int(row[(bit >> 5) + 1]) << 32) | int(row[bit >> 5])) >> (bit & 31)
            for i in range(DPL):
                c[i] |= ((x >> (i * pw)) & ((1 << pw) - 1)) << sh
            sh += pw
            bit0 += N * pw
    return c


def _half_at(words, at):
    h = (words >> np.uint64((at & 2) * 8)) & np.uint64(0xFFFF)
    return np.asarray(h, dtype=np.uint16).view(np.float16).astype(np.float64)


def _split_job(S, HKV, batch, target_warps, min_chunk, warps, block, warp):
    """cuda_attention._HEADER's split_job, line by line."""
    BH = batch * HKV
    want = (target_warps + BH - 1) // BH
    splits = max(1, min((S + min_chunk - 1) // min_chunk, want))
    chunk = ((S + splits - 1) // splits + 31) // 32 * 32
    NS = (S + chunk - 1) // chunk
    groups = (NS + warps - 1) // warps
    bh = block // groups
    return NS, chunk, bh // HKV, bh % HKV, (block % groups) * warps + warp


def emulate(queries, kv, scale, mask, rng):
    """What cuda_turbo.attention's two kernels compute, in numpy (float64 arithmetic)."""
    kq, vq = kv.key_quantizer, kv.value_quantizer
    B, n_q, L, D = queries.shape
    n = kv.length
    keys = np.array(kv.full_keys[:, :, :n])
    values = np.array(kv.full_values[:, :, :n])
    n_kv = keys.shape[1]
    c = cuda_turbo.kernel_constants(queries.shape, kq, vq, n_kv, scale)
    R, RP, NREP, DPL, WARPS = c["R"], c["RP"], c["NREP"], D // 32, c["WARPS"]
    cb_arr, rot_t, rot = (np.array(a, dtype=np.float64) for a in cuda_turbo._tables(kq, vq))
    sm_scale = float(np.array([c["SCALE_BITS"]], dtype=np.int32).view(np.float32)[0])
    q = np.array(queries.astype(mx.float32), dtype=np.float64)
    causal = isinstance(mask, str) and L > 1
    m_arr = None
    if mask is not None and not isinstance(mask, str):
        m_arr = np.array(mask)
        while m_arr.ndim < 4:
            m_arr = m_arr[None]
        m_arr = np.broadcast_to(m_arr, (B, n_q, L, n))
    chunk, NS = cuda_attention._split_plan(B * n_kv, n, c["TARGET_WARPS"], c["MIN_CHUNK"])
    rows = B * n_q * L
    o_part = np.full((rows * NS, D), np.nan)
    m_part = np.full((rows, NS), np.nan)
    l_part = np.full((rows, NS), np.nan)
    seen = set()
    blocks = B * n_kv * -(-NS // WARPS)
    for block in range(blocks):
        for warp in range(WARPS):
            ns, ch, b, kvh, split = _split_job(n, n_kv, B, c["TARGET_WARPS"], c["MIN_CHUNK"], WARPS, block, warp)
            assert (ns, ch) == (NS, chunk)  # the device plan is the host's
            if split >= NS:
                continue
            assert (b, kvh, split) not in seen
            seen.add((b, kvh, split))
            qraw = np.zeros((R, D))
            for r in range(R):
                qraw[r] = q[b, kvh * NREP + r // L, r % L]
            qs = np.zeros((D, RP))
            qs[:, :R] = (qraw @ rot_t).T * sm_scale
            start, end = split * chunk, min(split * chunk + chunk, n)
            m = np.full(R, -np.inf)
            lsum = np.zeros((R, 32))
            acc = np.zeros((R, 32, DPL))
            # per-warp tiles, stale words random (rows past `tn` keep them)
            ktile = rng.integers(0, 2**32, 32 * c["KROW"] + 1, dtype=np.uint64).astype(np.uint32)
            vtile = rng.integers(0, 2**32, 32 * c["VROW"] + 1, dtype=np.uint64).astype(np.uint32)
            for t0 in range(start, end, 32):
                tn = min(32, end - t0)
                k16, v16 = ktile.view(np.uint16), vtile.view(np.uint16)
                for t in range(tn):
                    k16[t * 2 * c["KROW"] : t * 2 * c["KROW"] + c["KW2"]] = keys[b, kvh, t0 + t].view(np.uint16)
                    v16[t * 2 * c["VROW"] : t * 2 * c["VROW"] + c["VW2"]] = values[b, kvh, t0 + t].view(np.uint16)
                kw = ktile[: 32 * c["KROW"]].reshape(32, c["KROW"]).astype(np.uint64)
                vrows = vtile.astype(np.uint64)
                p = t0 + np.arange(32)
                part = np.zeros((RP, 32))
                for j in range(c["KN0"]):
                    cv = cb_arr[_turbo_code(kw, c["KN0"], c["KB0"], 0, j).astype(np.int64)]
                    part += qs[j][:, None] * cv[None]
                for j in range(c["KN1"]):
                    code = _turbo_code(kw, c["KN1"], c["KB1"], c["KOFF1"], j).astype(np.int64)
                    part += qs[c["KN0"] + j][:, None] * cb_arr[c["CBK1"] + code][None]
                kn = _half_at(kw[:, c["KNORM"] >> 2], c["KNORM"])
                vn = _half_at(vrows[np.arange(32) * c["VROW"] + (c["VNORM"] >> 2)], c["VNORM"])
                s = kn[None] * part[:R]
                for r in range(R):
                    hq, l_ = kvh * NREP + r // L, r % L
                    if causal:
                        s[r] = np.where(p > n - L + l_, -np.inf, s[r])
                    if m_arr is not None:
                        mv = m_arr[b, hq, l_, np.minimum(p, n - 1)]
                        s[r] = np.where(mv, s[r], -np.inf) if m_arr.dtype == np.bool_ else s[r] + mv
                valid = p < end
                s[:, ~valid] = -np.inf
                vn = np.where(valid, vn, 0.0)
                ps = np.zeros((32, RP))
                for r in range(R):
                    mnew = max(m[r], s[r].max())
                    corr = 1.0 if mnew == -np.inf else math.exp(m[r] - mnew)
                    pr = np.where(s[r] == -np.inf, 0.0, np.exp(s[r] - mnew))
                    lsum[r] = lsum[r] * corr + pr
                    ps[:, r] = pr * vn
                    acc[r] *= corr
                    m[r] = mnew
                for t in range(tn):
                    vrow = vrows[t * c["VROW"] :]
                    for lane in range(32):
                        dim0 = lane * DPL
                        if c["VN1"] == 0 or dim0 < c["VN0"]:
                            codes = _turbo_codes(vrow, c["VN0"], c["VB0"], 0, DPL, dim0)
                            cv = cb_arr[[c["CBV0"] + x for x in codes]]
                        else:
                            codes = _turbo_codes(vrow, c["VN1"], c["VB1"], c["VOFF1"], DPL, dim0 - c["VN0"])
                            cv = cb_arr[[c["CBV1"] + x for x in codes]]
                        acc[:, lane] += ps[t, :R, None] * cv[None]
            for r in range(R):
                hq, l_ = kvh * NREP + r // L, r % L
                rowid = ((b * n_q + hq) * L + l_) * NS + split
                o_part[rowid] = acc[r].reshape(-1)
                m_part[rowid // NS, split] = m[r]
                l_part[rowid // NS, split] = lsum[r].sum()
    assert len(seen) == B * n_kv * NS  # every split of every (row, KV head) exactly once
    # the merge kernel: thread (sp, d) folds splits sp, sp + SP, ...; then the SP results; then o' R_v
    SP = cuda_turbo.merge_constants(queries.dtype, D)["SP"]
    out = np.zeros((rows, D))
    for row in range(rows):
        ms, ls, os_ = [], [], []
        for sp in range(SP):
            mm, ll, oo = -np.inf, 0.0, np.zeros(D)
            for s_ in range(sp, NS, SP):
                mk = m_part[row, s_]
                if mk == -np.inf:
                    continue
                mn = max(mm, mk)
                a = 0.0 if mm == -np.inf else math.exp(mm - mn)
                w = math.exp(mk - mn)
                oo = oo * a + w * o_part[row * NS + s_]
                ll = ll * a + w * l_part[row, s_]
                mm = mn
            ms.append(mm), ls.append(ll), os_.append(oo)
        M = max(ms)
        num, den = np.zeros(D), 0.0
        for mk, lk, ok in zip(ms, ls, os_):
            if mk != -np.inf:
                num, den = num + math.exp(mk - M) * ok, den + math.exp(mk - M) * lk
        out[row] = (num / den if den > 0 else np.zeros(D)) @ rot
    return out.reshape(B, n_q, L, D)


def turbo_case(B, n_q, n_kv, L, S, D, kbits, vbits, pad=5, seed=0):
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    kq = turbo.get_quantizer(D, kbits, seed, "mse")
    vq = turbo.get_quantizer(D, vbits, seed + 1, "mse")
    keys = kq.pack(mx.random.normal((B, n_kv, S + pad, D), key=k1))
    values = vq.pack(mx.random.normal((B, n_kv, S + pad, D), key=k2))
    return mx.random.normal((B, n_q, L, D), key=k3), turbo.TurboKV(kq, vq, keys, values, S)


def left_padded_mask(B, L, S, additive=False):
    from mlx_lm.models.base import create_causal_mask

    m = create_causal_mask(L, offset=S - L, left_padding=mx.array([(7 * i) % max(S - L, 1) for i in range(B)]))
    return mx.where(m, 0.0, -mx.inf) if additive else m


CASES = [
    # B, n_q, n_kv, L, S, D, key bits, value bits, mask
    ((2, 8, 2, 1, 77, 64, 3, 3), "bool"),
    ((1, 9, 3, 2, 130, 64, 2.5, 4), "causal"),
    ((2, 4, 1, 3, 45, 128, 1, 6), "additive"),
    ((1, 4, 4, 1, 300, 64, 2.25, 5), None),  # several splits; 16 coords at 3 bits, 48 at 2
    ((1, 16, 1, 1, 33, 256, 4, 3.5), "bool"),
    ((1, 2, 1, 1, 1, 128, 2, 2), None),
]


@pytest.mark.parametrize("case,mask_kind", CASES, ids=lambda c: str(c))
def test_emulated_kernel_matches_the_reference(case, mask_kind):
    B, n_q, n_kv, L, S, D, kb, vb = case
    q, kv = turbo_case(*case)
    mask = {
        None: None,
        "causal": "causal",
        "bool": left_padded_mask(B, L, S),
        "additive": left_padded_mask(B, L, S, True),
    }[mask_kind]
    assert cuda_turbo.why_unsupported(q, kv, mask) is None
    ref = np.array(turbo.reference_attention(q, kv, D**-0.5, mask))
    got = emulate(q, kv, D**-0.5, mask, np.random.default_rng(0))
    assert np.abs(got - ref).max() < 2e-5 * max(1.0, np.abs(ref).max())


# ---------------------------------------------------------------- the pack kernel


def _pack_byte(cs, k, c):
    """turbo_pack_byte<N0, B0, N1, B1>(cs, k), line by line."""
    off = 0
    for seg in range(2):
        N, B, first = (c["N1"], c["B1"], c["N0"]) if seg else (c["N0"], c["B0"], 0)
        sh = 0
        for pw in (4, 2, 1):
            if B & pw:
                nb = N * pw // 8
                if k < off + nb:
                    per, j0 = 8 // pw, first + (k - off) * (8 // pw)
                    return sum(((int(cs[j0 + t]) >> sh) & ((1 << pw) - 1)) << (t * pw) for t in range(per))
                off += nb
                sh += pw
    return 0


def emulate_pack(quantizer, x):
    """What the pack kernel writes for x (B, H, L, dim), in numpy float32."""
    c = cuda_turbo.pack_constants(quantizer)
    rot_t, bnd = (np.array(a) for a in cuda_turbo._pack_tables(quantizer))
    xs = np.array(x.astype(mx.float32)).reshape(-1, c["D"])
    out = np.zeros((xs.shape[0], c["WIDTH"]), dtype=np.uint8)
    for row, xv in enumerate(xs):
        norm = np.float32(np.sqrt(np.sum(xv * xv, dtype=np.float32)))
        y = (xv / max(norm, np.float32(1e-30))) @ rot_t
        cs = np.zeros(c["D"], dtype=np.uint8)
        for d in range(c["D"]):
            B, b0 = (c["B0"], 0) if c["N1"] == 0 or d < c["N0"] else (c["B1"], c["BND1"])
            idx = 0
            for s_ in reversed(range(B)):
                if y[d] > bnd[b0 + idx + (1 << s_) - 1]:
                    idx += 1 << s_
            cs[d] = idx
        nbits = int(np.float16(norm).view(np.uint16))
        for k in range(c["WIDTH"]):
            out[row, k] = nbits & 0xFF if k == c["NORM"] else nbits >> 8 if k == c["NORM"] + 1 else _pack_byte(cs, k, c)
    return out.reshape(*x.shape[:-1], c["WIDTH"])


@pytest.mark.parametrize("D,bits", [(64, 3), (64, 1), (128, 2.5), (64, 6), (256, 3.5), (128, 4), (64, 5)])
def test_emulated_pack_kernel_writes_the_rows_pack_writes(D, bits):
    q = turbo.get_quantizer(D, bits, 3, "mse")
    x = mx.random.normal((2, 3, 5, D), key=mx.random.key(D + int(bits * 2))) * 4
    want = np.array(q.pack(x))
    got = emulate_pack(q, x)
    assert got.shape == want.shape
    # float32 sums in another order can move a coordinate lying within rounding of a code
    # boundary to the other code: allow none here (random data; the device test counts them)
    assert np.array_equal(got, want)


# ---------------------------------------------------------------- dispatch


def test_path_selection_and_clear_errors(monkeypatch):
    monkeypatch.delenv(cuda_turbo.ENV_VAR, raising=False)
    q, kv = turbo_case(1, 4, 2, 1, 40, 64, 3, 3)
    assert cuda_turbo.selected_path() == "reference"  # CPU: the MLX graph
    monkeypatch.setenv(cuda_turbo.ENV_VAR, "fastest")
    with pytest.raises(
        ValueError, match="MLX_LM_OPTIQ_TURBO_ATTENTION='fastest'.*expected one of auto, reference, cuda"
    ):
        cuda_turbo.selected_path()
    monkeypatch.setenv(cuda_turbo.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="needs MLX's CUDA backend"):
        cuda_turbo.selected_path()
    with pytest.raises(RuntimeError, match="needs MLX's CUDA backend"):  # not a silent fallback
        turbo.turbo_scaled_dot_product_attention(q, kv, 0.125, None)
    with pytest.raises(RuntimeError, match="needs MLX's CUDA backend"):  # the pack kernel too
        kv.key_quantizer.pack(mx.zeros((1, 1, 1, 64)))
    monkeypatch.setenv(cuda_turbo.ENV_VAR, "reference")
    assert cuda_turbo.selected_path() == "reference"
    monkeypatch.setattr(backend, "compute_backend", lambda: "cuda")
    assert cuda_turbo.selected_path() == "reference"
    monkeypatch.setenv(cuda_turbo.ENV_VAR, "cuda")
    assert cuda_turbo.selected_path() == "cuda"
    monkeypatch.setenv(cuda_turbo.ENV_VAR, "auto")
    assert cuda_turbo.selected_path() == "cuda"


def test_which_calls_take_the_kernel(monkeypatch):
    """On CUDA (faked here) decode-shaped calls go to the kernel; prefill chunks, "prod" keys
    and the reference setting go to the MLX graph; a direct kernel call it cannot take raises."""
    monkeypatch.delenv(cuda_turbo.ENV_VAR, raising=False)
    q, kv = turbo_case(2, 8, 2, 1, 50, 64, 3, 3)  # packed before the backend is faked
    q4, kv4 = turbo_case(1, 8, 2, 4, 50, 128, 3, 3)
    q5, kv5 = turbo_case(1, 8, 2, 5, 50, 64, 3, 3)
    prod = turbo.TurboKV(
        turbo.get_quantizer(64, 3, 0, "prod"),
        kv.value_quantizer,
        turbo.get_quantizer(64, 3, 0, "prod").pack(mx.random.normal((2, 2, 50, 64))),
        kv.full_values[:, :, :50],
        50,
    )
    monkeypatch.setattr(backend, "compute_backend", lambda: "cuda")
    calls = []
    monkeypatch.setattr(cuda_turbo, "attention", lambda q, kv, scale, mask: calls.append(q.shape) or "kernel")
    assert turbo.turbo_scaled_dot_product_attention(q, kv, 0.125, left_padded_mask(2, 1, 50)) == "kernel"
    # 16 query rows per KV head: still the kernel
    assert turbo.turbo_scaled_dot_product_attention(q4, kv4, 0.1, "causal") == "kernel"
    assert calls == [(2, 8, 1, 64), (1, 8, 4, 128)]
    out = turbo.turbo_scaled_dot_product_attention(q5, kv5, 0.125, "causal")  # 20 rows: the reference
    assert isinstance(out, mx.array) and out.shape == (1, 8, 5, 64) and len(calls) == 2
    assert "'prod' mode" in cuda_turbo.why_unsupported(q, prod, None)
    assert isinstance(turbo.turbo_scaled_dot_product_attention(q, prod, 0.125, None), mx.array) and len(calls) == 2
    monkeypatch.setenv(cuda_turbo.ENV_VAR, "reference")
    assert isinstance(turbo.turbo_scaled_dot_product_attention(q, kv, 0.125, None), mx.array) and len(calls) == 2


def test_which_packs_take_the_kernel(monkeypatch):
    """On CUDA (faked) TurboQuantizer.pack of (B, H, L, dim) input in a float dtype takes the
    fused pack kernel; "prod" quantizers, other head dims and the reference setting the MLX graph."""
    monkeypatch.delenv(cuda_turbo.ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "compute_backend", lambda: "cuda")
    calls = []
    real_pack = cuda_turbo.pack
    monkeypatch.setattr(cuda_turbo, "pack", lambda q, x: calls.append(x.shape) or "kernel")
    x = mx.random.normal((1, 2, 3, 64))
    assert turbo.get_quantizer(64, 3, 0, "mse").pack(x) == "kernel" and calls == [(1, 2, 3, 64)]
    assert isinstance(turbo.get_quantizer(64, 3, 0, "prod").pack(x), mx.array)
    assert "'prod' mode" in cuda_turbo.why_not_pack(turbo.get_quantizer(64, 3, 0, "prod"), x)
    assert "head dim 96" in cuda_turbo.why_not_pack(turbo.get_quantizer(96, 3, 0, "mse"), mx.zeros((1, 1, 1, 96)))
    assert "input of shape" in cuda_turbo.why_not_pack(turbo.get_quantizer(64, 3, 0, "mse"), x[0])
    monkeypatch.setenv(cuda_turbo.ENV_VAR, "reference")
    assert isinstance(turbo.get_quantizer(64, 3, 0, "mse").pack(x), mx.array) and len(calls) == 1
    with pytest.raises(ValueError, match="fused CUDA TurboQuant pack does not cover this call: 'prod' mode"):
        real_pack(turbo.get_quantizer(64, 3, 0, "prod"), x)


def test_the_kernel_says_which_calls_it_does_not_cover():
    q, kv = turbo_case(1, 8, 2, 1, 40, 64, 3, 3)
    assert cuda_turbo.why_unsupported(q, kv, None) is None
    q96, kv96 = turbo_case(1, 4, 2, 1, 40, 96, 3, 3)
    assert "head dims" in cuda_turbo.why_unsupported(q96, kv96, None)
    q20, kv20 = turbo_case(1, 8, 2, 5, 40, 64, 3, 3)
    assert "prefill takes the reference" in cuda_turbo.why_unsupported(q20, kv20, "causal")
    assert "mask 'sliding'" in cuda_turbo.why_unsupported(q, kv, "sliding")
    assert "mask of shape" in cuda_turbo.why_unsupported(q, kv, mx.ones((1, 1, 1, 39), dtype=mx.bool_))
    assert "queries in" in cuda_turbo.why_unsupported(q.astype(mx.int32), kv, None)
    q_odd, kv_odd = turbo_case(1, 8, 2, 1, 40, 64, 2.125, 3)  # 8 coords at 3 bits, 56 at 2: 19-byte rows
    assert "packed rows of 19/26 bytes" in cuda_turbo.why_unsupported(q_odd, kv_odd, None)
    with pytest.raises(ValueError, match="fused CUDA TurboQuant attention does not cover this call: head dims"):
        cuda_turbo.attention(q96, kv96, 0.1, None)


def test_layout_constants_follow_the_packed_row():
    """The constants the kernel decodes with, for the default 3-bit cache at head dim 64: one
    segment of 64 three-bit codes (a 2-bit plane of 16 bytes, a 1-bit plane of 8), the fp16
    norm at byte 24, 26-byte rows staged as 7 words (odd: distinct banks)."""
    q = turbo.get_quantizer(64, 3, 0, "mse")
    assert cuda_turbo.segment_layout(q) == dict(N0=64, B0=3, N1=0, B1=0, OFF1=24, NORM=24, W2=13, ROW=7)
    q = turbo.get_quantizer(64, 3.5, 0, "mse")  # 32 coords at 4 bits, 32 at 3
    assert cuda_turbo.segment_layout(q) == dict(N0=32, B0=4, N1=32, B1=3, OFF1=16, NORM=28, W2=15, ROW=9)
    for D in cuda_turbo.HEAD_DIMS:
        for bits in turbo.SUPPORTED_BITS:
            kq = turbo.get_quantizer(D, bits, 0, "mse")
            c = cuda_turbo.kernel_constants((1, 16, 1, D), kq, kq, 1, 0.1)
            assert c["WARPS"] >= 1 and c["KROW"] % 2 == 1 and c["KROW"] * 4 >= kq.width
