"""TurboQuant KV cache vs mlx-lm's affine QuantizedKVCache, side by side in one run.

Quality (any backend; CPU uses fp32 compute with the float reference):
    python benchmarks/turbo.py quality --model ../shared/models/smollm2-135m-instruct-q4-exact \
        --text ../shared/data/text/persuasion.txt --num-tokens 2048
  The model is dequantized to fp32 (the float reference). Every scheme runs the
  same tokens through the model in chunks with its cache quantizing from token 0,
  and is compared position by position with the float KVCache run:
  mean KL(float-KV || scheme), top-1 agreement, bits per channel (norms/scales
  counted at fp16, as served) and cache bytes.

Decode speed (meant for the GPU; random weights, since speed does not depend on them):
    python benchmarks/turbo.py speed --contexts 1024 8192 --steps 64
  A llama model of the given shape in fp16; each cache is prefilled to the
  context, then `--steps` greedy decode steps are timed. Ratios are against the
  fp16 KVCache and against affine at the same bits, all from this one run. The
  "attention" column says which TurboQuant attention ran: on CUDA every turbo scheme
  is timed with the fused kernel (kv/cuda_turbo.py, the default there) and again with
  the MLX reference graph (MLX_LM_OPTIQ_TURBO_ATTENTION=reference), side by side;
  `--turbo-paths` picks (elsewhere only the reference exists).

Decode-step attention microbenchmark (one layer, any backend; CPU-friendly):
    python benchmarks/turbo.py attention --contexts 4096 8192 16384 --bits 2 3 4
  A cache holding `context` random K/V vectors; each timed decode step appends one token
  (TurboQuant: quantizes it) and attends over the cache: best and median wall-clock and
  best process CPU time of `--repeats` steps, for a float KVCache + MLX's SDPA and for
  TurboQuant caches (per attention path, as for speed). "turbo{b} append only" times the
  append alone (rotate, nearest code, pack, write): the quantize share of a step. Public API
  only, so the same script times an older checkout (before/after comparisons in docs/turbo.md).
"""

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlx_lm_optiq.hooks.turbo import patch_attention
from mlx_lm_optiq.kv import cuda_turbo, turbo

DEFAULT_MODEL = REPO.parent / "shared" / "models" / "smollm2-135m-instruct-q4-exact"
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "text" / "persuasion.txt"


def scheme_names(bits_list, with_prod, turbo_only_bits=()):
    names = []
    for b in bits_list:
        names += [f"affine{b}", f"turbo{b}"] + ([f"turbo{b}-prod"] if with_prod else [])
    return names + [f"turbo{b:g}" for b in turbo_only_bits]


def _turbo_spec(name):
    """'turbo3.5-prod' -> (3.5, 'prod')"""
    b, _, mode = name[len("turbo") :].partition("-")
    return (float(b) if "." in b else int(b)), mode or "mse"


def make_caches(name, num_layers, group_size, seed):
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    if name == "float":
        return [KVCache() for _ in range(num_layers)]
    if name.startswith("affine"):
        b = int(name[len("affine") :])
        return [QuantizedKVCache(group_size=group_size, bits=b) for _ in range(num_layers)]
    if name.startswith("turbo"):
        b, mode = _turbo_spec(name)
        return [turbo.TurboQuantKVCache(bits=b, seed=seed + 2 * i, key_mode=mode) for i in range(num_layers)]
    raise ValueError(f"unknown scheme {name!r}")


def bits_per_channel(name, head_dim, group_size):
    if name == "float":
        return 16.0
    if name.startswith("affine"):
        return turbo.affine_bits_per_channel(int(name[len("affine") :]), group_size)
    b, mode = _turbo_spec(name)
    k = turbo.TurboQuantizer(head_dim, b, mode=mode).bits_per_channel()
    v = turbo.TurboQuantizer(head_dim, b).bits_per_channel()
    return (k + v) / 2


def head_dim_of(model):
    args = model.args
    return getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads


def run_sequence(model, tokens, caches, chunk):
    """Log-probs (L, vocab) of `tokens` (1, L) fed in chunks through `caches`."""
    out = []
    for s in range(0, tokens.shape[1], chunk):
        logits = model(tokens[:, s : s + chunk], cache=caches).astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(lp)
        out.append(lp[0])
    return mx.concatenate(out, axis=0)


def quality(args):
    from mlx.utils import tree_map
    from mlx_lm.utils import dequantize_model, load
    from tqdm import tqdm

    text = Path(args.text)
    if not text.is_file():
        raise SystemExit(f"--text {text}: file not found")
    model, tokenizer = load(str(args.model))
    model = dequantize_model(model)
    model.update(
        tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters())
    )
    mx.eval(model.parameters())
    ids = tokenizer.encode(text.read_text())
    if len(ids) < args.skip_tokens + args.num_tokens:
        raise SystemExit(f"--text {text}: has {len(ids)} tokens, need {args.skip_tokens + args.num_tokens}")
    tokens = mx.array(ids[args.skip_tokens : args.skip_tokens + args.num_tokens])[None]
    n_layers, hd = len(model.layers), head_dim_of(model)

    ref = run_sequence(model, tokens, make_caches("float", n_layers, args.group_size, args.seed), args.chunk)
    ref_p, ref_top = mx.exp(ref), mx.argmax(ref, axis=-1)
    rows = []
    for name in tqdm(scheme_names(args.bits, args.prod, args.turbo_bits), desc="schemes", file=sys.stderr):
        caches = make_caches(name, n_layers, args.group_size, args.seed)
        t0 = time.perf_counter()
        lp = run_sequence(model, tokens, caches, args.chunk)
        kl = (ref_p * (ref - lp)).sum(-1)
        rows.append(
            {
                "scheme": name,
                "bits_per_channel": bits_per_channel(name, hd, args.group_size),
                "kl": kl.mean().item(),
                "kl_p99": sorted(kl.tolist())[int(0.99 * (kl.size - 1))],
                "top1": (mx.argmax(lp, -1) == ref_top).mean().item(),
                "cache_bytes": sum(c.nbytes for c in caches),
                "seconds": time.perf_counter() - t0,
            }
        )
    info = {
        "model": str(args.model),
        "text": str(text),
        "num_tokens": args.num_tokens,
        "skip_tokens": args.skip_tokens,
        "chunk": args.chunk,
        "group_size": args.group_size,
        "head_dim": hd,
        "device": str(mx.default_device()),
    }
    print(f"# quality: {info}")
    print("| scheme | bits/channel | mean KL vs float KV | p99 KL | top-1 agree | KL ratio vs affine same bits |")
    print("|---|---|---|---|---|---|")
    by_name = {r["scheme"]: r for r in rows}
    for r in rows:
        b = r["scheme"].split("-")[0].lstrip("afinetrubo")
        affine = by_name.get(f"affine{b}")
        ratio = f"{r['kl'] / affine['kl']:.3f}" if affine and affine["kl"] > 0 else "n/a"
        print(
            f"| {r['scheme']} | {r['bits_per_channel']:.3f} | {r['kl']:.5f} | {r['kl_p99']:.4f} | "
            f"{100 * r['top1']:.2f}% | {ratio} |"
        )
    return {"quality": {"info": info, "rows": rows}}


def random_llama(args):
    from mlx.utils import tree_map
    from mlx_lm.models import llama

    cfg = dict(
        model_type="llama",
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads,
        rms_norm_eps=1e-5,
        vocab_size=args.vocab_size,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    )
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    dtype = getattr(mx, args.dtype)
    model.update(tree_map(lambda a: a.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    return model, cfg


def decode_speed(model, caches, context, steps, chunk):
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    prompt = mx.random.randint(0, model.args.vocab_size, (1, context))
    affine = [c for c in caches if isinstance(c, QuantizedKVCache)]
    if affine:
        # mlx-lm's own route (kv_bits + quantized_kv_start): prefill in float, then to_quantized;
        # its quantized prefill attention has no CUDA kernel for these shapes
        prefill = [KVCache() for _ in caches]
    else:
        prefill = caches
    for s in range(0, context, chunk):
        mx.eval(model(prompt[:, s : s + chunk], cache=prefill))
    if affine:
        caches[:] = [c.to_quantized(group_size=a.group_size, bits=a.bits) for c, a in zip(prefill, affine)]
    tok = mx.array([[1]])
    for _ in range(3):  # warm-up (kernel compilation, allocations)
        tok = mx.argmax(model(tok, cache=caches)[:, -1:], axis=-1)
        mx.eval(tok)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = mx.argmax(model(tok, cache=caches)[:, -1:], axis=-1)
        mx.eval(tok)
    return steps / (time.perf_counter() - t0)


@contextlib.contextmanager
def turbo_path(path):
    """TurboQuant attention through `path` ("cuda": the fused kernel where it covers the call,
    "reference": the MLX graph) for the block, via MLX_LM_OPTIQ_TURBO_ATTENTION."""
    saved = os.environ.get(cuda_turbo.ENV_VAR)
    os.environ[cuda_turbo.ENV_VAR] = path
    try:
        yield
    finally:
        if saved is None:
            del os.environ[cuda_turbo.ENV_VAR]
        else:
            os.environ[cuda_turbo.ENV_VAR] = saved


def turbo_paths(args):
    """The TurboQuant attention paths to time: the requested ones this backend can run."""
    runnable = ["cuda", "reference"] if cuda_turbo.selected_path() == "cuda" else ["reference"]
    return [p for p in (args.turbo_paths or runnable) if p in runnable]


def speed(args):
    model, cfg = random_llama(args)
    hd = cfg["head_dim"]
    rows = []
    paths = turbo_paths(args)
    for context in args.contexts:
        for name in ["float"] + scheme_names(args.bits, args.prod, args.turbo_bits):
            for path in paths if name.startswith("turbo") else ["-"]:
                caches = make_caches(name, cfg["num_hidden_layers"], args.group_size, args.seed)
                row = {
                    "context": context,
                    "scheme": name,
                    "attention": path,
                    "bits_per_channel": bits_per_channel(name, hd, args.group_size),
                }
                try:
                    with turbo_path(path) if path != "-" else contextlib.nullcontext():
                        row["tok_s"] = decode_speed(model, caches, context, args.steps, args.chunk)
                    row["cache_bytes"] = sum(c.nbytes for c in caches)
                except Exception as e:  # reported in the table, e.g. a kernel missing on this backend
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                del caches
                mx.clear_cache()
    info = {
        "model": {
            k: cfg[k]
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
        },
        "dtype": args.dtype,
        "steps": args.steps,
        "device": str(mx.default_device()),
    }
    print(f"# decode speed: {info}")
    print(
        "| context | scheme | attention | bits/channel | decode tok/s | × float KV | × affine same bits "
        "| × turbo reference | cache MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same_ctx = {
            x["scheme"]: x for x in rows if x["context"] == r["context"] and x["attention"] in ("-", "reference")
        }
        base = same_ctx["float"].get("tok_s")
        b = r["scheme"].split("-")[0].lstrip("afinetrubo")
        aff = same_ctx.get(f"affine{b}", {}).get("tok_s")
        ref = same_ctx.get(r["scheme"], {}).get("tok_s") if r["attention"] == "cuda" else None
        head = f"| {r['context']} | {r['scheme']} | {r['attention']} | {r['bits_per_channel']:.3f} |"
        if "error" in r:
            print(f"{head} {r['error']} | | | | |")
            continue
        fmt = lambda x: f"{x:.2f}" if x else "n/a"  # noqa: E731
        print(
            f"{head} {r['tok_s']:.1f} | {fmt(base and r['tok_s'] / base)} | {fmt(aff and r['tok_s'] / aff)} | "
            f"{fmt(ref and r['tok_s'] / ref)} | {r['cache_bytes'] / 2**20:.1f} |"
        )
    return {"speed": {"info": info, "rows": rows}}


def attention(args):
    from mlx_lm.models.cache import KVCache

    dtype = getattr(mx, args.dtype)
    B, hq, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    rows = []
    for context in args.contexts:
        k1, k2, k3 = mx.random.split(mx.random.key(context), 3)
        k = mx.random.normal((B, hkv, context + 1, d), key=k1).astype(dtype)
        v = mx.random.normal((B, hkv, context + 1, d), key=k2).astype(dtype)
        q = mx.random.normal((B, hq, 1, d), key=k3).astype(dtype)
        mx.eval(k, v, q)
        # Each cache holds `context` tokens; every timed step appends one token (as decoding
        # does: the context grows, the buffers grow every 256 tokens) and attends over all.
        runs = [(None, "-")] + [(b, p) for b in args.bits for p in [*turbo_paths(args), "append only"]]
        for b, path in runs:
            cache = KVCache() if b is None else turbo.TurboQuantKVCache(head_dim=d, bits=b, seed=0)
            cache.update_and_fetch(k[:, :, :context], v[:, :, :context])
            mx.eval(cache.state)

            def step(cache=cache, b=b, path=path):
                keys, values = cache.update_and_fetch(k[:, :, context:], v[:, :, context:])
                if b is None:
                    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale)
                if path == "append only":
                    return keys.full_keys, keys.full_values
                with turbo_path(path):
                    return turbo.turbo_scaled_dot_product_attention(q, keys, scale, None)

            if b is None:
                scheme = f"float {args.dtype} (KVCache + SDPA)"
            else:
                scheme = f"turbo{b} append only" if path == "append only" else f"turbo{b} [{path}]"
            rows.append({"context": context, "scheme": scheme, **_timed(step, args.repeats)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            del cache
    info = {
        "batch": B,
        "heads": hq,
        "kv_heads": hkv,
        "head_dim": d,
        "dtype": args.dtype,
        "device": str(mx.default_device()),
    }
    print(f"# decode-step attention: {info}")
    print("| context | scheme | best ms | median ms | best CPU ms | × float SDPA (best) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["context"] == r["context"] and x["scheme"].startswith("float"))
        print(
            f"| {r['context']} | {r['scheme']} | {r['best_ms']:.2f} | {r['median_ms']:.2f} | {r['cpu_ms']:.2f} | "
            f"{r['best_ms'] / base['best_ms']:.2f} |"
        )
    return {"attention": {"info": info, "rows": rows}}


def _timed(step, repeats):
    """Best and median wall-clock ms of `step`, and its best process CPU ms (all threads): on a
    shared machine the CPU time is less disturbed by other processes than the wall clock."""
    for _ in range(2):  # warm-up
        mx.eval(step())
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        mx.eval(step())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    times.sort()
    return {"best_ms": 1e3 * times[0], "median_ms": 1e3 * times[len(times) // 2], "cpu_ms": 1e3 * min(cpu)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("quality", "speed", "attention"):
        s = sub.add_parser(name)
        s.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
        s.add_argument("--group-size", type=int, default=64, help="affine group size (default 64)")
        s.add_argument("--seed", type=int, default=0, help="TurboQuant rotation seed (layer i uses seed+2i)")
        s.add_argument("--prod", action="store_true", help="also TurboQuant_prod keys (QJL residual)")
        s.add_argument(
            "--turbo-bits",
            type=float,
            nargs="*",
            default=[],
            help="extra TurboQuant-only widths, e.g. 2.5 3.5 (fractional: channels split between widths)",
        )
        s.add_argument("--json", help="write the rows here as JSON")
        s.add_argument(
            "--turbo-paths",
            nargs="+",
            choices=["cuda", "reference"],
            help="TurboQuant attention paths to time (default: every one this backend runs: cuda and "
            "reference on CUDA, reference elsewhere)",
        )
    q = sub.choices["quality"]
    q.add_argument("--model", default=str(DEFAULT_MODEL))
    q.add_argument("--text", default=str(DEFAULT_TEXT))
    q.add_argument("--num-tokens", type=int, default=2048)
    q.add_argument("--skip-tokens", type=int, default=2000, help="skip the front matter")
    q.add_argument("--chunk", type=int, default=512, help="prefill chunk (as mlx-lm's prefill_step_size)")
    s = sub.choices["speed"]
    s.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    s.add_argument("--steps", type=int, default=64)
    s.add_argument("--chunk", type=int, default=2048)
    s.add_argument("--dtype", default="float16")
    s.add_argument("--hidden-size", type=int, default=2048)  # Llama-3.2-1B shape
    s.add_argument("--layers", type=int, default=16)
    s.add_argument("--intermediate-size", type=int, default=8192)
    s.add_argument("--heads", type=int, default=32)
    s.add_argument("--kv-heads", type=int, default=8)
    s.add_argument("--vocab-size", type=int, default=128256)
    a = sub.choices["attention"]
    a.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384])
    a.add_argument("--repeats", type=int, default=20)
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--heads", type=int, default=9, help="query heads (default: SmolLM2-135M's 9)")
    a.add_argument("--kv-heads", type=int, default=3)
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    for b in args.bits:
        if b not in (2, 3, 4, 5, 6):
            p.error(f"--bits {b}: expected 2..6 (widths both mlx affine and TurboQuant support)")
    patch_attention()
    result = {"quality": quality, "speed": speed, "attention": attention}[args.what](args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
