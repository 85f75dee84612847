"""Per-layer KV cache benchmark: quality (CPU, real model) and speed/memory/serving (GPU).

  quality   KLD / top-1 agreement of next-token distributions vs the float KV cache, for
            uniform K4/V4, uniform K8/V8 and a per-layer plan (kv_config.json), on text
            the plan was not calibrated on. Run on CPU with the fp32 float reference.
  gpu       everything that needs the accelerator, on a random-weight 1B-class llama built
            with mlx-lm's own model class (speed and memory do not depend on weight values):
            attention  decode attention at long context: fp16 SDPA vs ours (dequantize the
                       used prefix + fp SDPA) vs stock quantized SDPA; stock crash probes
            memory     KV bytes and *peak* memory after an N-token prefill + decode
            server     aggregate generated tokens/s with C concurrent clients on loopback:
                       stock float (batched), stock --kv-bits 4 (unbatched), ours (batched)
            budget     the same at a fixed memory budget (the device cut to --budget-gib):
                       stock float all batched / serialized vs ours all batched

Examples (docs/kv.md has the latest tables):
  python benchmarks/kv.py quality --model /tmp/smollm2-f32 --plan kv_config.json \
      --text ../shared/data/text/emma.txt
  python benchmarks/kv.py gpu --tokenizer DIR --out $OUT
"""

import argparse
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_lm_optiq.kv.caches import MixedQuantizedKVCache, Packing
from tests.helpers import ServerProcess

GROUP = 64


# ----------------------------------------------------------------------------- quality (CPU)


def _variants(model, plan_paths):
    from mlx_lm_optiq.kv.apply import make_plan_cache
    from mlx_lm_optiq.kv.geometry import average_bits, cache_geometry
    from mlx_lm_optiq.kv.plan_file import load_kv_config, plan_from_dict

    geometry = cache_geometry(model)
    n = len(geometry)

    def uniform(k, v):
        data = {
            "layers": [
                {"layer": i, "cache_slot": i, "scheme": "affine", "k_bits": k, "v_bits": v, "group_size": GROUP}
                for i in range(n)
            ]
        }
        return plan_from_dict(data, source=f"uniform K{k}/V{v} g{GROUP}")

    plans = [
        ("float KV (reference)", None),
        ("uniform K8/V8 g64", uniform(8, 8)),
        ("uniform K4/V4 g64", uniform(4, 4)),
    ] + [(f"per-layer {path}", load_kv_config(path, model)) for path in plan_paths]
    out = []
    for name, plan in plans:
        bits = 16.0 if plan is None else average_bits(plan.slots, geometry)
        out.append((name, bits, (lambda p=plan: None if p is None else make_plan_cache(model, p))))
    return out


def quality(args):
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = load(args.model)
    ids = tok.encode(Path(args.text).read_text())
    step = len(ids) // (args.windows + 1)
    windows = [ids[(w + 1) * step - args.context // 2 :][: args.context] for w in range(args.windows)]
    variants = _variants(model, args.plan)
    rows = {name: {"kl": 0.0, "top1": 0.0, "n": 0, "bits": bits} for name, bits, _ in variants}
    for window in tqdm(windows, desc="windows"):
        x = mx.array(window)[None]
        ref = None
        for name, _, make in variants:
            cache = make() or make_prompt_cache(model)
            logits = model(x, cache=cache)[0, args.skip :].astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if ref is None:
                ref = logp
            kl = mx.sum(mx.exp(ref) * (ref - logp), axis=-1)
            agree = mx.argmax(ref, axis=-1) == mx.argmax(logp, axis=-1)
            r = rows[name]
            r["kl"] += kl.sum().item()
            r["top1"] += agree.sum().item()
            r["n"] += kl.size
    print(
        f"\nquality: {args.model}, {args.windows} windows x {args.context} tokens of {Path(args.text).name}, "
        f"scored after token {args.skip} (vs the float KV cache, same weights)"
    )
    print("| KV cache | avg bits/elem | mean KLD | top-1 agree |\n|---|---|---|---|")
    for name, bits, _ in variants:
        r = rows[name]
        print(f"| {name} | {bits:.2f} | {r['kl'] / r['n']:.5f} | {100 * r['top1'] / r['n']:.2f}% |")


# ----------------------------------------------------------------------------- GPU helpers

LLAMA_1B = dict(
    model_type="llama",
    hidden_size=2048,
    num_hidden_layers=16,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    rms_norm_eps=1e-5,
    vocab_size=49152,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
)

# A ~4.5-bit per-layer plan for the 16-layer model (fp16 scales: K4/V4 g64 = 4.5 bits):
# layer 0 kept at 8 bits, a few K8/V4, the rest K4/V4 and K4/V2. Speed and memory depend
# on the bit mix only; the real model's plan (quality) comes from `python -m mlx_lm_optiq.kv`.
SYNTHETIC_PLAN = [(8, 8)] + [(8, 4)] * 2 + [(4, 4)] * 6 + [(4, 2)] * 7
# The 8B shape of issue 14 (head_dim 128): 27x K4/V4 + 4x K4/V2 + 1x K8/V8 = 4.5 bits.
LLAMA_8B = dict(
    LLAMA_1B,
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    head_dim=128,
    vocab_size=128256,
    tie_word_embeddings=False,
)
PLAN_8B = [(8, 8)] + [(4, 2)] * 4 + [(4, 4)] * 27
# --tiny: a CPU smoke run of the gpu command (same code paths, toy sizes)
LLAMA_TINY = dict(
    LLAMA_1B, hidden_size=256, num_hidden_layers=4, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2
)


def synthetic_plan(n):
    if n == len(SYNTHETIC_PLAN):
        return SYNTHETIC_PLAN
    if n == len(PLAN_8B):
        return PLAN_8B
    return ([(8, 8), (8, 4), (4, 4), (4, 2)] * n)[:n]


def build_random_model(out_dir, tokenizer_dir, shape=LLAMA_1B):
    """Save a random-weight 1B llama (fp16) with a real tokenizer and the synthetic plan."""
    import shutil

    from mlx.utils import tree_map
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    from mlx_lm_optiq.core.jsonio import write_json

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**shape))
    model.update(tree_map(lambda p: p.astype(mx.float16), model.parameters()))
    mx.eval(model.parameters())
    save_model(out_dir, model)
    save_config(dict(shape, torch_dtype="float16"), out_dir / "config.json")
    for f in Path(tokenizer_dir).glob("tokenizer*"):
        shutil.copy(f, out_dir / f.name)
    layers = [
        {"layer": i, "cache_slot": i, "scheme": "affine", "k_bits": k, "v_bits": v, "group_size": GROUP}
        for i, (k, v) in enumerate(synthetic_plan(shape["num_hidden_layers"]))
    ]
    write_json(
        out_dir / "optiq_kv_plan.json",
        {"model": "random llama-1b", "quantized_kv_start": 0, "num_cache_slots": len(layers), "layers": layers},
        kind="optiq-kv-config",
    )
    return out_dir


def _time(fn, iters=100, pipelined=False):
    """µs per call of fn. pipelined: each iteration's graph is built while the device still runs
    the previous one (mx.async_eval, as mlx-lm's decode loop does), so host-side graph building
    and per-eval overhead hide behind device time wherever the device is the slower side."""
    for _ in range(3):  # the CUDA backend compiles kernels at first use
        mx.eval(fn())
    mx.synchronize()
    tic = time.perf_counter()
    for _ in range(iters):
        if pipelined:
            mx.async_eval(fn())
        else:
            mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - tic) / iters * 1e6


def attention(contexts, head_dim=64, batches=(1,), layers=8, pipelined=True):
    """One decode step's attention at long context, side by side: µs per layer call, timed
    over `layers` calls on distinct caches per eval (as a decode step runs them; one call
    per eval would mostly time MLX's per-eval overhead, ~70 µs on the H200), and with the
    evals pipelined (`_time`), as mlx-lm's decode loop runs them, unless `pipelined` is off
    (each eval waited for: the tables before 2026-12-04)."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    from mlx_lm_optiq.kv import cuda_attention
    from mlx_lm_optiq.kv.attention import PackedKV

    H, KV, D = 32, 8, head_dim
    fused = mx.cuda.is_available()
    print(
        f"\nattention: one decode step, 32 query / 8 KV heads, head_dim {D}, fp16, group {GROUP}; "
        f"µs per layer call ({layers} layers' calls per eval, distinct caches, "
        f"{'evals pipelined' if pipelined else 'each eval waited for'})"
    )
    print(
        "| batch | context | fp16 SDPA | ours K4/V4 tensor cores | ratio vs fp16 | same, tiles staged | ratio | "
        "ours K4/V4 fp32 FMAs | ratio | ours K8/V4 tensor cores | ours K4/V4 dequant+SDPA | "
        "stock 4-bit quantized SDPA | stock, unaligned length (L-249) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )

    def per_call(fn, n, iters=20):
        return _time(lambda: [fn(i) for i in range(n)], iters=iters, pipelined=pipelined) / n

    for B in batches:
        for L in contexts:
            mx.random.seed(1)
            q = mx.random.normal((B, H, 1, D)).astype(mx.float16)
            kf = [mx.random.normal((B, KV, L, D)).astype(mx.float16) for _ in range(layers)]
            vf = [mx.random.normal((B, KV, L, D)).astype(mx.float16) for _ in range(layers)]
            mx.eval(q, kf, vf)
            scale = D**-0.5
            fp = per_call(lambda i: mx.fast.scaled_dot_product_attention(q, kf[i], vf[i], scale=scale), layers)
            packed = {}
            for kb, vb in ((4, 4), (8, 4)):
                pk, pv = Packing(kb, GROUP, D, mx.float16), Packing(vb, GROUP, D, mx.float16)
                packed[kb, vb] = [(PackedKV(pk.pack(k), pk), PackedKV(pv.pack(v), pv)) for k, v in zip(kf, vf)]
                mx.eval([(a.data, b.data) for a, b in packed[kb, vb]])
            c44, c84 = packed[4, 4], packed[8, 4]
            deq = per_call(
                lambda i: mx.fast.scaled_dot_product_attention(
                    q, c44[i][0].dequantize(), c44[i][1].dequantize(), scale=scale
                ),
                layers,
            )

            def ours(kernel, caches):
                if not fused:
                    return float("nan")
                return per_call(lambda i: cuda_attention.attention(q, *caches[i], scale, kernel=kernel), layers)

            mma, staged, simt = ours("mma", c44), ours("mma-staged", c44), ours("simt", c44)
            mma84 = ours("mma", c84)
            # stock: mx.quantize's three arrays per layer, the same calls per eval as the rows above
            stock_kv = [
                (mx.quantize(k, group_size=GROUP, bits=4), mx.quantize(v, group_size=GROUP, bits=4))
                for k, v in zip(kf, vf)
            ]
            kf = vf = packed = c44 = c84 = None  # free the float and packed caches before the stock rows
            mx.eval(stock_kv)

            def stock(i, length):
                keys, values = (tuple(a[..., :length, :] for a in t) for t in stock_kv[i])
                return quantized_scaled_dot_product_attention(
                    q, keys, values, scale=scale, mask=None, group_size=GROUP, bits=4
                )

            cells = []
            for length in (L, L - 249):  # an aligned length, then one a decode step reaches too
                try:
                    cells.append(f"{per_call(lambda i, n=length: stock(i, n), layers, iters=5):.0f}")
                except Exception as e:  # the crash is the measurement: report it
                    cells.append(f"fails: {str(e).splitlines()[0][:70]}")
            stock_kv = None
            print(
                f"| {B} | {L} | {fp:.0f} | {mma:.0f} | {mma / fp:.2f}x | {staged:.0f} | {staged / fp:.2f}x | "
                f"{simt:.0f} | {simt / fp:.2f}x | "
                f"{mma84:.0f} | {deq:.0f} | {' | '.join(cells)} |",
                flush=True,
            )


def micro(contexts):
    """Dequantize and dequantize+SDPA alone: packed layout vs three separate arrays (µs per call)."""
    H, KV, D = 32, 8, 64
    print("\nmicro: K = V (same tensor), 32 query / 8 KV heads, head_dim 64, fp16 (µs per call)")
    for L in contexts:
        q = mx.random.normal((1, H, 1, D)).astype(mx.float16)
        k = mx.random.normal((1, KV, L, D)).astype(mx.float16)
        row = [f"L={L} fp16={_time(lambda: mx.fast.scaled_dot_product_attention(q, k, k, scale=0.125)):.0f}"]
        for bits in (4, 8):
            p = Packing(bits, GROUP, D, mx.float16)
            pk, sep = p.pack(k), mx.quantize(k, group_size=GROUP, bits=bits)
            mx.eval(pk, sep)

            def deq_sep():
                return mx.dequantize(*sep, group_size=GROUP, bits=bits)

            row.append(f"b{bits}: deq_sep={_time(deq_sep):.0f} deq_packed={_time(lambda: p.unpack(pk)):.0f}")
            row.append(
                f"sdpa_sep={_time(lambda: mx.fast.scaled_dot_product_attention(q, deq_sep(), deq_sep(), scale=0.125)):.0f}"
            )
            row.append(
                f"sdpa_packed={_time(lambda: mx.fast.scaled_dot_product_attention(q, p.unpack(pk), p.unpack(pk), scale=0.125)):.0f}"
            )
        print(" ".join(row), flush=True)


def memory(model_dir, contexts, plan_path, decode=16):
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_lm_optiq.kv.apply import make_plan_cache
    from mlx_lm_optiq.kv.plan_file import load_kv_config

    model, _ = load(str(model_dir))
    plan = load_kv_config(plan_path, model)
    n = len(model.layers)
    variants = [
        ("fp16 KVCache (stock)", lambda: make_prompt_cache(model)),
        ("ours uniform K4/V4 g64", lambda: [MixedQuantizedKVCache(4, 4, GROUP) for _ in range(n)]),
        ("ours per-layer (~4.5 bits)", lambda: make_plan_cache(model, plan)),
    ]
    print(
        f"\nmemory: {Path(model_dir).name} ({n} layers, {model.args.num_key_value_heads} KV heads x 64), prefill in 2048-token chunks + {decode} "
        "decode steps, batch 1"
    )
    print("| context | KV cache | KV bytes | peak memory above weights | decode ms/token |\n|---|---|---|---|---|")
    for L in contexts:
        tokens = mx.random.randint(0, model.args.vocab_size, (1, L))
        for name, make in variants:
            mx.clear_cache()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            cache = make()
            for s in range(0, L, 2048):
                mx.eval(model(tokens[:, s : s + 2048], cache=cache))
            y = mx.array([[1]])
            mx.synchronize()
            tic = time.perf_counter()
            for _ in range(decode):
                y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
                mx.eval(y)
            ms = (time.perf_counter() - tic) / decode * 1e3
            kv = sum(c.nbytes for c in cache)
            peak = mx.get_peak_memory() - base
            print(f"| {L} | {name} | {kv / 2**20:.0f} MiB | {peak / 2**20:.0f} MiB | {ms:.1f} |")
            del cache
    return plan


def _post(port, body, timeout):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


# A server process started with OPTIQ_BENCH_RESERVE_BYTES=N first allocates and keeps an N-byte
# array on the device: what is left is the memory budget of the `budget` part (a smaller GPU).
_RESERVE = (
    "import os, mlx.core as mx; _n = int(os.environ.get('OPTIQ_BENCH_RESERVE_BYTES', '0')); "
    "_reserve = [mx.zeros((1 << 28,), mx.uint8) for _ in range(_n >> 28)]; mx.eval(_reserve); "
)


def _start_server(model_dir, flags, optiq, log_path, env=None):
    """A stock or optiq-enabled mlx_lm.server on a free port (tests.helpers.ServerProcess)."""
    code = _RESERVE + (
        (
            "import sys, mlx_lm_optiq; mlx_lm_optiq.enable(); from mlx_lm.server import main; "
            "sys.argv = ['mlx_lm.server'] + sys.argv[1:]; main()"
        )
        if optiq
        else "import sys; from mlx_lm.server import main; sys.argv = ['mlx_lm.server'] + sys.argv[1:]; main()"
    )
    return ServerProcess(
        model_dir,
        *flags,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        log_path=log_path,
        command=[sys.executable, "-c", code],
        timeout=120,
    )


def _prompts(tokenizer_dir, clients, prompt_tokens):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(Path(tokenizer_dir))
    mx.random.seed(2)
    ids = mx.random.randint(300, 20000, (clients, prompt_tokens)).tolist()
    return [tok.decode(i) for i in ids]


def _round(port, prompts, max_tokens, timeout=600):
    """All clients at once; returns (completion tokens, wall seconds, errors)."""
    counts = [0] * len(prompts)
    errors = []

    def client(j):
        try:
            out = _post(port, {"prompt": prompts[j], "max_tokens": max_tokens, "temperature": 0.0}, timeout)
            counts[j] = out["usage"]["completion_tokens"]
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(j,)) for j in range(len(prompts))]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - tic, errors


def server(model_dir, out_dir, clients, prompt_tokens, max_tokens, plan_path, stock_kv_bits=True):
    prompts = _prompts(model_dir, 2 * clients, prompt_tokens)
    warmup, prompts = prompts[:clients], prompts[clients:]
    ours = ["--optiq-kv-config", str(plan_path)]
    configs = [("stock, float KV (batched)", [], False, {})]
    if stock_kv_bits:
        configs.append(
            (
                "stock --kv-bits 4 (unbatched; quantized_kv_start 5000 never reached: an upper bound)",
                ["--kv-bits", "4"],
                False,
                {},
            )
        )
    configs.append(
        ("ours --optiq-kv-config, dequantize+SDPA attention", ours, True, {"MLX_LM_OPTIQ_KV_ATTENTION": "dequantize"})
    )
    configs.append(("ours --optiq-kv-config, default attention (fused on CUDA)", ours, True, {}))
    print(
        f"\nserver: {clients} concurrent clients on loopback, ~{prompt_tokens}-token prompts, "
        f"{max_tokens} new tokens each, temperature 0 (after a warm-up round of the same shape)"
    )
    print("| server | aggregate gen tok/s | wall s | ratio vs stock float batched |\n|---|---|---|---|")
    results = {}
    for i, (name, flags, optiq, env) in enumerate(configs):
        srv = _start_server(model_dir, flags, optiq, Path(out_dir) / f"server{i}.log", env)
        try:
            # same workload, other prompts: kernel compilation and allocation happen here
            _round(srv.port, warmup, max_tokens)
            tokens, wall, errors = _round(srv.port, prompts, max_tokens)
        finally:
            srv.stop()
        results[name] = (tokens / wall, wall, errors)
    stock_float = results[configs[0][0]][0]
    for name, (tps, wall, errors) in results.items():
        note = f" (errors: {errors[:1]})" if errors else ""
        print(f"| {name} | {tps:.1f} | {wall:.1f} | {tps / stock_float:.2f}x |{note}")
    if not stock_kv_bits:
        return
    # stock --kv-bits 4 once quantization starts (what a user with long prompts gets)
    srv = _start_server(
        model_dir, ["--kv-bits", "4", "--quantized-kv-start", "0"], False, Path(out_dir) / "server_crash_probe.log"
    )
    try:
        _post(srv.port, {"prompt": prompts[0], "max_tokens": 8}, 120)
        probe = "served"
    except Exception as e:
        probe = f"request failed: {e!r}"[:200]
    finally:
        srv.stop()
    print(f"\nstock `mlx_lm.server --kv-bits 4 --quantized-kv-start 0`, one request: {probe}")


def _device_memory_bytes():
    """Total memory of GPU 0 (nvidia-smi), or None when it cannot be read."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.split()[0]) * 2**20
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def budget(
    model_dir,
    out_dir,
    budget_gib,
    clients,
    prompt_tokens,
    max_tokens,
    plan_path,
    stock_concurrency,
    timeout,
    prefill_step,
):
    """Throughput at a fixed memory budget: the device is cut to `budget_gib` (the rest is held by
    an array allocated first in each server process), then `clients` requests with
    `prompt_tokens`-token prompts arrive at once. Stock float KV is run as is (all requests batched:
    its KV does not fit) and limited to `stock_concurrency` decoding requests (what a user of that
    GPU must do: serialize); ours batches them all with the per-layer plan. No prompt cache
    (`--prompt-cache-size 0`): every prompt is unique, and a cached KV would eat the budget."""
    # OPTIQ_BENCH_DEVICE_BYTES: the device size to assume (a CPU smoke run of this part)
    total = int(os.environ.get("OPTIQ_BENCH_DEVICE_BYTES", 0)) or _device_memory_bytes()
    if total is None and budget_gib:
        raise SystemExit("budget: cannot read the device memory (nvidia-smi)")
    # budget 0: the whole device, no reserve (a workload sized to overflow stock's KV on it)
    reserve = total - int(budget_gib * 2**30) if budget_gib else 0
    if reserve < 0:
        raise SystemExit(f"budget: {budget_gib} GiB is more than the device's {total / 2**30:.0f} GiB")
    prompts = _prompts(model_dir, clients + 2, prompt_tokens)
    warmup, prompts = prompts[:2], prompts[2:]
    env = {"OPTIQ_BENCH_RESERVE_BYTES": str(reserve)}
    common = ["--prompt-cache-size", "0", "--prefill-step-size", str(prefill_step)]
    sc = str(stock_concurrency)
    # mlx_lm.server decodes at most --decode-concurrency requests at once (default 32): "all
    # batched" must say so, or more than 32 clients would quietly run in waves.
    every = ["--decode-concurrency", str(clients)]
    configs = [
        (f"stock, float KV, all {clients} batched", common + every, False),
        (
            f"stock, float KV, {sc} at a time (--decode-concurrency {sc} --prompt-concurrency {min(8, stock_concurrency)})",
            common + ["--decode-concurrency", sc, "--prompt-concurrency", str(min(8, stock_concurrency))],
            False,
        ),
        (
            f"ours --optiq-kv-config, all {clients} batched",
            common + every + ["--optiq-kv-config", str(plan_path)],
            True,
        ),
    ]
    print(
        f"\nbudget: {f'the device cut to {budget_gib} GiB (of {total / 2**30:.0f})' if budget_gib else 'the whole device'}, "
        f"{clients} clients at once, "
        f"~{prompt_tokens}-token prompts, {max_tokens} new tokens each, temperature 0, --prefill-step-size "
        f"{prefill_step} (after 2 warm-up requests)"
    )
    print("| server | aggregate gen tok/s | wall s | completed | note |\n|---|---|---|---|---|")
    rows = []
    for i, (name, flags, optiq) in enumerate(configs):
        log = Path(out_dir) / f"budget{i}.log"
        srv = _start_server(model_dir, flags, optiq, log, env)
        try:
            _round(srv.port, warmup, 8, timeout)
            tokens, wall, errors = _round(srv.port, prompts, max_tokens, timeout)
            alive = srv.proc.poll() is None
        finally:
            srv.stop()
        text = log.read_text(errors="replace")
        oom = next((ln.strip()[:160] for ln in text.splitlines() if "out of memory" in ln.lower()), "")
        done = len(prompts) - len(errors)
        note = (oom or (errors[0][:120] if errors else "")) + ("" if alive else " (server process died)")
        rows.append((name, tokens / wall if done else 0.0, wall, done))
        print(f"| {name} | {tokens / wall:.1f} | {wall:.1f} | {done}/{len(prompts)} | {note} |", flush=True)
    completed_stock = [r[1] for r in rows[:2] if r[3] == len(prompts)]
    if completed_stock and rows[2][3] == len(prompts):
        print(f"ours vs the best stock row that completed: {rows[2][1] / max(completed_stock):.2f}x")


def gpu(args):
    print(f"device: {mx.default_device()}, mlx {mx.__version__}")
    if args.model:  # a real model and its measured plan instead of the random one
        if not args.plan:
            raise SystemExit("--model needs --plan (the model's kv_config.json)")
        model_dir, plan_path = Path(args.model), Path(args.plan)
    elif not ({"memory", "server", "budget"} & set(args.parts)):
        model_dir = plan_path = None  # attention/micro need no model
    else:
        if not args.tokenizer:
            raise SystemExit("gpu: pass --tokenizer DIR (random model) or --model DIR --plan FILE")
        shape = LLAMA_TINY if args.tiny else {"1b": LLAMA_1B, "8b": LLAMA_8B}[args.shape]
        name = "tiny" if args.tiny else args.shape
        model_dir = build_random_model(Path(args.work) / f"llama-{name}-random", args.tokenizer, shape)
        plan_path = model_dir / "optiq_kv_plan.json"
    if "attention" in args.parts:
        attention(
            args.attention_contexts,
            128 if args.shape == "8b" else 64,
            args.attention_batches,
            args.attention_layers,
            pipelined=not args.attention_blocking,
        )
    if "micro" in args.parts:
        micro(args.attention_contexts)
    if "memory" in args.parts:
        memory(model_dir, args.memory_contexts, plan_path)
    if "budget" in args.parts:
        budget(
            model_dir,
            args.out,
            args.budget_gib,
            args.clients,
            args.prompt_tokens[0],
            args.max_tokens,
            plan_path,
            args.stock_concurrency,
            args.timeout,
            args.prefill_step_size,
        )
    if "server" in args.parts:
        for prompt_tokens in args.prompt_tokens:
            server(
                model_dir, args.out, args.clients, prompt_tokens, args.max_tokens, plan_path, not args.no_stock_kv_bits
            )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality", help="KLD/top-1 vs float KV on the real model (CPU)")
    q.add_argument("--model", required=True, help="float (fp32) model folder")
    q.add_argument("--plan", required=True, nargs="+", help="per-layer kv_config.json(s) for that model")
    q.add_argument("--text", required=True, help="evaluation text (not the plan's calibration text)")
    q.add_argument("--context", type=int, default=1024)
    q.add_argument("--windows", type=int, default=2)
    q.add_argument("--skip", type=int, default=256, help="score positions after this many tokens of context")
    g = sub.add_parser("gpu", help="attention / memory / server benchmarks on a random 1B llama")
    g.add_argument("--tokenizer", help="folder with tokenizer.json (SmolLM2's) for the random model")
    g.add_argument("--model", help="serve/measure this real model instead of a random one (needs --plan)")
    g.add_argument("--plan", help="with --model: its per-layer kv_config.json")
    g.add_argument("--work", default="/tmp/kvbench")
    g.add_argument("--out", default=".")
    g.add_argument("--attention-contexts", type=int, nargs="+", default=[8192, 32768, 65536])
    g.add_argument("--memory-contexts", type=int, nargs="+", default=[8192, 32768])
    g.add_argument("--clients", type=int, default=8)
    g.add_argument("--prompt-tokens", type=int, nargs="+", default=[1024])
    g.add_argument("--shape", choices=["1b", "8b"], default="1b", help="random llama shape (8b: head_dim 128)")
    g.add_argument("--attention-batches", type=int, nargs="+", default=[1])
    g.add_argument(
        "--attention-layers", type=int, default=8, help="distinct caches (layers) timed per eval in the attention part"
    )
    g.add_argument(
        "--attention-blocking",
        action="store_true",
        help="attention part: wait for each eval before building the next (the tables before 2026-12-04)",
    )
    g.add_argument("--no-stock-kv-bits", action="store_true", help="skip the stock --kv-bits rows and crash probe")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument(
        "--parts",
        nargs="+",
        default=["attention", "memory", "server"],
        choices=["attention", "micro", "memory", "server", "budget"],
    )
    g.add_argument(
        "--budget-gib",
        type=float,
        default=40.0,
        help="budget: device memory left to each server (0: the whole device, no reserve)",
    )
    g.add_argument("--stock-concurrency", type=int, default=8, help="budget: stock's serialized decode concurrency")
    g.add_argument("--timeout", type=float, default=600.0, help="budget: seconds a client waits for its answer")
    g.add_argument(
        "--prefill-step-size",
        type=int,
        default=2048,
        help="budget: every server's --prefill-step-size (stock default 2048)",
    )
    g.add_argument("--tiny", action="store_true", help="toy model sizes: a quick CPU check of the code paths")
    args = p.parse_args()
    {"quality": quality, "gpu": gpu}[args.cmd](args)


if __name__ == "__main__":
    main()
