"""Many adapters on one base: aggregate decode throughput and memory per adapter.

Side by side in one run, on the same model and the same prompts:
  * ours  — `mlx_lm.server` with the mlx_lm_optiq hooks and N adapters mounted
            (`--optiq-adapter name=path`); requests pick an adapter with "model": name.
  * stock — plain `mlx_lm.server`; requests pick an adapter with
            {"model": <model path>, "adapters": <adapter path>}, which reloads the
            model whenever the adapter changes and drains the running batch.
Each server gets N concurrent requests on the base, then N concurrent requests on
N distinct adapters; aggregate tokens/s = completion tokens / wall time.
Memory per adapter is measured in-process (mx.get_active_memory) around mounting.

    python benchmarks/adapters.py --model ../shared/models/smollm2-135m-instruct-q4-exact
    python benchmarks/adapters.py --model M --random-layers 30   # random weights, M's shapes and tokenizer
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.helpers
from tests.helpers import ServerProcess, request_json, write_random_adapter

SERVER_CODE = (
    "import sys\n"
    "if sys.argv[1] == 'ours':\n"
    "    import mlx_lm_optiq; mlx_lm_optiq.enable()\n"
    "import mlx_lm.server\n"
    "sys.argv = ['mlx_lm.server'] + sys.argv[2:]\n"
    "sys.modules['mlx_lm.server'].main()\n"
)

WORDS = (
    "the quiet garden behind the old house was full of late roses and the sound of bees "
    "while the letters from town arrived each morning with news of ships and weddings"
).split()


def prompt_text(i: int, run: int, n_words: int) -> str:
    words = [WORDS[(i * 7 + run * 13 + k) % len(WORDS)] for k in range(n_words)]
    return f"Note {run}-{i}: " + " ".join(words)


def build_random_model(src: str | Path, dst: str | Path, num_layers: int, bits: int) -> Path:
    """A model with `src`'s architecture and tokenizer, `num_layers` blocks, random weights."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    config = json.loads((Path(src) / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    config["num_hidden_layers"] = num_layers
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    if bits:
        model, config = quantize_model(model, config, 64, bits)
    dst = Path(dst)
    dst.mkdir(parents=True)
    save_model(dst, model)
    save_config(config, dst / "config.json")
    for f in Path(src).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, dst / f.name)
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"random model: {num_layers} layers, {n / 1e6:.0f}M stored values, {bits or 16}-bit", flush=True)
    return dst


def http(port: int, path: str, body: dict | None = None, timeout: float = 600) -> dict:
    status, out = request_json(port, "POST" if body is not None else "GET", path, body, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"{path}: HTTP {status}: {out}")
    return out


class Server(ServerProcess):
    """Our server (`kind` "ours": the hooks enabled in-process) or stock mlx_lm.server on a free port."""

    def __init__(
        self,
        kind: str,
        model: Path,
        adapters: dict[str, Path],
        log_dir: str | Path,
        extra: tuple[str, ...] = (),
        log_name: str | None = None,
    ) -> None:
        flags = list(extra)
        if kind == "ours":
            for name, path in adapters.items():
                flags += ["--optiq-adapter", f"{name}={path}"]
        env = {k: v for k, v in os.environ.items() if k != "MLX_LM_OPTIQ"}
        self.kind = kind
        log = Path(log_dir) / (log_name or f"server-{kind}.log")
        super().__init__(
            model, *flags, env=env, log_path=log, command=[sys.executable, "-c", SERVER_CODE, kind], timeout=300
        )

    def stop(self, keep_log_in: str | Path | None = None) -> None:
        super().stop(timeout=60)
        if keep_log_in:
            shutil.copy(self.log_path, Path(keep_log_in) / self.log_path.name)


def concurrent(port: int, bodies: list[dict]) -> tuple[int, float]:
    """Send the bodies at once; (total completion tokens, wall seconds)."""
    tokens = [0] * len(bodies)
    errors = []

    def one(i):
        try:
            tokens[i] = http(port, "/v1/completions", bodies[i])["usage"]["completion_tokens"]
        except Exception as e:  # reported below, never counted as throughput
            errors.append(f"request {i}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    if errors:
        raise RuntimeError("; ".join(errors))
    return sum(tokens), wall


def measure_memory(model_path: Path, adapters: dict[str, Path]) -> dict[str, float]:
    from mlx_lm.utils import load_model

    from mlx_lm_optiq.adapters import adapter_rows, mount_adapter, read_adapter

    model, _ = load_model(Path(model_path))
    mx.eval(model.parameters())
    gc.collect()
    before = mx.get_active_memory()
    weights = {name: read_adapter(path) for name, path in adapters.items()}
    mx.eval([[a, b] for w in weights.values() for a, b, _ in w.layers.values()])
    for name, w in weights.items():
        mount_adapter(model, name, w)
    del weights
    gc.collect()
    mounted = mx.get_active_memory()
    with adapter_rows(model, list(adapters)):  # first mixed batch builds the stacked A/B
        mx.eval(model(mx.zeros((len(adapters), 4), dtype=mx.int32)))
    gc.collect()
    stacked = mx.get_active_memory()
    file_bytes = sum((Path(p) / "adapters.safetensors").stat().st_size for p in adapters.values())
    del model
    gc.collect()
    mx.clear_cache()
    n = len(adapters)
    return {
        "file_mb": file_bytes / n / 1e6,
        "mounted_mb": (mounted - before) / n / 1e6,
        "with_stacks_mb": (stacked - before) / n / 1e6,
    }


def measure_idle_overhead(
    model_path: Path, adapters: dict[str, Path], n_rows: int, max_tokens: int, rounds: int = 3
) -> tuple[float, float]:
    """Decode tokens/s of mlx-lm's BatchGenerator on base rows: no adapters vs N mounted but idle.

    In-process (hooks on, as in the server), alternating the two set-ups so both see the
    same machine load; returns (tok/s without, tok/s with idle adapters).
    """
    from mlx_lm.utils import load_model

    import mlx_lm_optiq
    from mlx_lm_optiq.adapters import mount_adapter, unmount_adapter

    mlx_lm_optiq.enable()
    import mlx_lm.server  # noqa: F401  (installs the batch-engine hooks)
    from mlx_lm.generate import BatchGenerator

    model, _ = load_model(Path(model_path))
    prompts = [[(7 * i + k) % 1000 + 10 for k in range(16)] for i in range(n_rows)]

    def decode_rate():
        gen = BatchGenerator(model, max_tokens=max_tokens, completion_batch_size=n_rows, prefill_batch_size=n_rows)
        gen.insert(prompts)
        with gen.stats() as stats:
            done = 0
            while done < n_rows:
                done += sum(r.finish_reason is not None for r in gen.next_generated())
        gen.close()
        return stats.generation_tokens / stats.decode_time

    decode_rate()  # warm-up
    plain, idle = [], []
    for _ in range(rounds):
        plain.append(decode_rate())
        for name, path in adapters.items():
            mount_adapter(model, name, path)
        idle.append(decode_rate())
        for name in adapters:
            unmount_adapter(model, name)
    mlx_lm_optiq.disable()
    return statistics.median(plain), statistics.median(idle)


def measure_mixed_rows(
    model_path: Path, adapters: dict[str, Path], prompt_tokens: int = 200, steps: int = 32, rounds: int = 3
) -> dict[str, tuple[float, float] | str]:
    """In-process cost of one batch with a row per adapter, for each way of computing mixed rows.

    Prefill (ms) and decode (ms per step) of len(adapters) rows: all on the base, all on one
    adapter (the single-adapter path, stock LoRA's arithmetic), and one distinct adapter
    per row with each `MIXED_ROWS_METHODS` entry; set-ups alternate over `rounds`.
    """
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    from mlx_lm_optiq.adapters import mounting, rows

    model, _ = load_model(Path(model_path))
    names = list(adapters)
    for name in names:
        mounting.mount_adapter(model, name, adapters[name])
    x = mx.random.randint(10, 1000, (len(names), prompt_tokens), key=mx.random.key(0))

    def run(row_names, method, compiled=True):
        rows.MIXED_ROWS_METHOD = method
        rows.COMPILE_DECODE = compiled
        try:
            cache = make_prompt_cache(model)
            with mounting.adapter_rows(model, row_names):
                t0 = time.perf_counter()
                logits = model(x, cache=cache)
                mx.eval(logits)
                t1 = time.perf_counter()
                y = mx.argmax(logits[:, -1:], axis=-1)
                for _ in range(steps):
                    y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
                    mx.eval(y)
                t2 = time.perf_counter()
        finally:
            rows.MIXED_ROWS_METHOD = None
            rows.COMPILE_DECODE = True
        return (t1 - t0) * 1e3, (t2 - t1) / steps * 1e3

    setups = [
        ("base rows", [None] * len(names), None, True),
        ("one adapter on every row", [names[0]] * len(names), None, True),
    ]
    setups += [
        (f"{len(names)} adapters, {m}{'' if c else ' (eager decode)'}", names, m, c)
        for m in rows.MIXED_ROWS_METHODS
        for c in (True, False)
    ]
    times = {label: [] for label, *_ in setups}
    failed = {}
    for label, row_names, method, compiled in setups:  # warm-up: kernels, allocator
        try:
            run(row_names, method, compiled)
        except Exception as e:  # e.g. an op without a kernel on this backend: reported, not fatal
            failed[label] = f"{type(e).__name__}: {str(e)[:200]}"
    setups = [s for s in setups if s[0] not in failed]
    for _ in range(rounds):
        for label, row_names, method, compiled in setups:
            times[label].append(run(row_names, method, compiled))
    for name in names:
        mounting.unmount_adapter(model, name)
    out = {
        label: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for label, ts in times.items()
        if ts
    }
    out.update({label: error for label, error in failed.items()})
    return out


def _mixed_json(mixed):
    return {
        k: {"failed": v} if isinstance(v, str) else {"prefill": v[0], "decode_step": v[1]} for k, v in mixed.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="model directory (also the tokenizer/shape source for --random-layers)"
    )
    parser.add_argument(
        "--random-layers", type=int, default=None, help="benchmark a random-weight model with this many blocks"
    )
    parser.add_argument("--random-bits", type=int, default=4, help="quantize the random model (0: keep fp16)")
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-stock", action="store_true", help="only our server (stock reloads are slow on CPU)")
    parser.add_argument("--skip-server", action="store_true", help="only the in-process measurements")
    parser.add_argument(
        "--server-mixed-rows",
        choices=["default", "fastest"],
        default="default",
        help="fastest: serve with the mixed-rows method that decoded fastest in-process "
        "(MLX_LM_OPTIQ_MIXED_ROWS, when it is not set already)",
    )
    parser.add_argument(
        "--server-variants",
        default=None,
        help="comma-separated METHOD[:eager] list: run our server once per mixed-rows variant "
        "(MLX_LM_OPTIQ_MIXED_ROWS / MLX_LM_OPTIQ_COMPILE_DECODE=0), e.g. take,take:eager,masked",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--log-dir", default=None, help="copy the server logs here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="optiq-adapters-bench-"))
    model = Path(args.model)
    if args.random_layers:
        model = build_random_model(args.model, work / "model", args.random_layers, args.random_bits)
    adapters = {}
    for i in range(args.num_adapters):
        adapters[f"ad{i}"] = write_random_adapter(model, work / f"ad{i}", seed=100 + i, rank=args.rank)
    print(f"{args.num_adapters} adapters of rank {args.rank} on every linear layer of every block", flush=True)

    memory = measure_memory(model, adapters)
    print(
        f"memory per adapter: file {memory['file_mb']:.2f} MB, mounted {memory['mounted_mb']:.2f} MB, "
        f"with mixed-batch stacks {memory['with_stacks_mb']:.2f} MB",
        flush=True,
    )

    n = args.num_adapters
    plain_rate, idle_rate = measure_idle_overhead(model, adapters, n, args.max_tokens)
    print(
        f"BatchGenerator decode, {n} base rows: {plain_rate:.1f} tok/s without adapters, "
        f"{idle_rate:.1f} tok/s with {n} mounted but idle ({idle_rate / plain_rate:.3f}x)",
        flush=True,
    )
    mixed = measure_mixed_rows(model, adapters)
    print(f"\nin-process forward, {n} rows, {200}-token prefill + 32 decode steps (median of 3 alternating rounds)")
    print("| rows | prefill ms | decode ms/step | decode vs base rows |\n|---|---|---|---|")
    base_step = mixed["base rows"][1]
    for label, value in mixed.items():
        if isinstance(value, str):
            print(f"| {label} | failed: {value} | | |", flush=True)
            continue
        prefill_ms, step_ms = value
        print(f"| {label} | {prefill_ms:.1f} | {step_ms:.2f} | {base_step / step_ms:.2f}x |", flush=True)
    if args.skip_server:
        if args.out:
            Path(args.out).write_text(
                json.dumps(
                    {
                        "device": str(mx.default_device()),
                        "model": args.model,
                        "random_layers": args.random_layers,
                        "num_adapters": n,
                        "rank": args.rank,
                        "memory_per_adapter": memory,
                        "idle_decode_tokens_per_s": {"no_adapters": plain_rate, "adapters_mounted_idle": idle_rate},
                        "mixed_rows_in_process_ms": _mixed_json(mixed),
                    },
                    indent=2,
                )
            )
        return
    from mlx_lm_optiq.adapters.rows import MIXED_ROWS_METHODS

    if args.server_mixed_rows == "fastest" and not os.environ.get("MLX_LM_OPTIQ_MIXED_ROWS"):
        timed = {
            m: mixed[f"{n} adapters, {m}"][1]
            for m in MIXED_ROWS_METHODS
            if not isinstance(mixed.get(f"{n} adapters, {m}", ""), str)
        }
        os.environ["MLX_LM_OPTIQ_MIXED_ROWS"] = min(timed, key=timed.get)
    variants = [None]  # our server as configured by the environment
    if args.server_variants:
        variants = [v.strip() for v in args.server_variants.split(",") if v.strip()]
        for v in variants:
            if v.split(":")[0] not in MIXED_ROWS_METHODS or v.count(":") > 1 or (":" in v and not v.endswith(":eager")):
                raise SystemExit(
                    f"--server-variants: {v!r} is not METHOD or METHOD:eager with METHOD in {MIXED_ROWS_METHODS}"
                )
    runs = [("ours", v) for v in variants] + ([] if args.skip_stock else [("stock", None)])
    base_id = str(model.resolve())
    results = {}
    saved_env = dict(os.environ)
    for kind, variant in runs:
        if variant is not None:
            os.environ["MLX_LM_OPTIQ_MIXED_ROWS"] = variant.split(":")[0]
            os.environ["MLX_LM_OPTIQ_COMPILE_DECODE"] = "0" if variant.endswith(":eager") else "1"
        label = (
            kind
            if kind == "stock"
            else (
                f"ours ({os.environ.get('MLX_LM_OPTIQ_MIXED_ROWS') or 'default'}"
                f"{', eager decode' if os.environ.get('MLX_LM_OPTIQ_COMPILE_DECODE') == '0' else ''})"
            )
        )
        print(f"server: {label}", flush=True)
        server = Server(
            kind, model, adapters, work, log_name="server-" + "".join(c if c.isalnum() else "-" for c in label) + ".log"
        )
        try:

            def bodies(run, scenario):
                out = []
                for i in range(n):
                    body = {
                        "prompt": prompt_text(i, run, args.prompt_words),
                        "max_tokens": args.max_tokens,
                        "temperature": 0.0,
                        "model": base_id,
                    }
                    if scenario == "adapters":
                        if kind == "ours":
                            body["model"] = f"ad{i}"
                        else:
                            body["adapters"] = str(adapters[f"ad{i}"])
                    out.append(body)
                return out

            concurrent(server.port, bodies(-1, "base"))  # warm-up (kernels, allocator)
            concurrent(server.port, bodies(-2, "adapters"))
            for scenario in ["base", "adapters"]:
                rates = []
                for run in range(args.repeats):
                    toks, wall = concurrent(server.port, bodies(run + (0 if scenario == "base" else 100), scenario))
                    rates.append(toks / wall)
                    print(
                        f"{label} {scenario:8s} run {run}: {toks} tokens in {wall:.2f}s = {toks / wall:.1f} tok/s",
                        flush=True,
                    )
                results[(label, scenario)] = statistics.median(rates)
        finally:
            server.stop(keep_log_in=args.log_dir)
            os.environ.clear()
            os.environ.update(saved_env)

    device = str(mx.default_device())
    print()
    print(f"| server | {n} requests on | aggregate tok/s | vs the same server, base |")
    print("|---|---|---|---|")
    for (label, scenario), rate in results.items():
        what = "the base" if scenario == "base" else f"{n} distinct adapters"
        print(
            f"| {'stock mlx_lm.server' if label == 'stock' else label} | {what} | {rate:.1f} | "
            f"{rate / results[(label, 'base')]:.2f}x |"
        )
    print()
    for label in dict.fromkeys(label for label, _ in results):
        if label == "stock":
            continue
        line = f"{label}, {n} adapters / base: {results[(label, 'adapters')] / results[(label, 'base')]:.2f}x (goal >= 0.8x)"
        if ("stock", "adapters") in results:
            line += f"; / stock, {n} adapters: {results[(label, 'adapters')] / results[('stock', 'adapters')]:.2f}x"
        print(line)
    print(
        f"idle adapters, in-process BatchGenerator decode: {idle_rate / plain_rate:.3f}x of no adapters (goal >= 0.97x)"
    )
    print(
        f"memory per adapter (rank {args.rank}): file {memory['file_mb']:.2f} MB, mounted "
        f"{memory['mounted_mb']:.2f} MB, with mixed-batch stacks {memory['with_stacks_mb']:.2f} MB"
    )
    print(
        f"device: {device}; model: {args.model}"
        + (f" (random weights, {args.random_layers} layers)" if args.random_layers else "")
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "device": device,
                    "model": args.model,
                    "random_layers": args.random_layers,
                    "num_adapters": n,
                    "rank": args.rank,
                    "max_tokens": args.max_tokens,
                    "server_mixed_rows": os.environ.get("MLX_LM_OPTIQ_MIXED_ROWS") or "default",
                    "tokens_per_s": {f"{k}/{sc}": v for (k, sc), v in results.items()},
                    "memory_per_adapter": memory,
                    "idle_decode_tokens_per_s": {"no_adapters": plain_rate, "adapters_mounted_idle": idle_rate},
                    "mixed_rows_in_process_ms": _mixed_json(mixed),
                },
                indent=2,
            )
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
