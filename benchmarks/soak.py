"""Soak test of the multi-adapter server: concurrent mixed-adapter load, mount/unmount churn, disconnects.

One `mlx_lm.server` with the optiq hooks, some adapters mounted at start-up (`--optiq-adapter`)
and others churned at runtime (`--optiq-adapter-root`). For `--duration` seconds:
  * `--clients` threads send completions (streaming or not, chat or text) for the base, a
    start-up adapter or a churned one; a fraction of them hang up abruptly (a TCP reset)
    after the first chunks of a stream or before the answer;
  * one thread mounts and unmounts the churned adapters as fast as the server lets it;
  * /health is polled throughout.
It reports every outcome, the errors (anything but the expected answers), p50/p99 latency of
the completed requests, the server's RSS at the start, the end and its peak, and tracebacks
in the server log. Exit status 1 when there was an error or the server ended unhealthy.

Expected answers that are not errors: 404 for a churned adapter that is not mounted at that
moment, 409 for an unmount while that adapter has requests in flight.

    python benchmarks/soak.py                      # the 4-layer model, ~1-2 minutes on 2 CPU cores
    python benchmarks/soak.py --model M --duration 600 --clients 16 --json soak.json

Not part of the test suite (tests/test_adapter_api.py fuzzes the same endpoints in seconds).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import re
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo root: tests.helpers
from tests.helpers import HOST, MLX_LM_SERVER_SCRIPT, ServerProcess, write_random_adapter  # noqa: E402

DEFAULT_MODEL = REPO.parent / "shared" / "models" / "smollm2-135m-instruct-4layer-q4-exact"
PROMPTS = [
    "Hello, my name is",
    "The weather today is",
    "Once upon a time, in a quiet village,",
    "Write one sentence about ships and letters.",
    "Anne walked along the shore and",
]


def rss_kib(pid: int) -> int:
    """The resident set size of process `pid` in KiB (Linux /proc; 0 where it is not available)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def hang_up(conn: http.client.HTTPConnection) -> None:
    """Close the connection with a TCP reset, as a killed client does."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    conn.close()


class Stats:
    """Outcomes, latencies and errors, shared by the worker threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def count(self, outcome: str, latency: float | None = None, error: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if latency is not None:
                self.latencies.append(latency)
            if error is not None:
                self.errors.append(error)


def one_request(port: int, rng: random.Random, targets: list[tuple[str, str]], args, stats: Stats) -> None:
    """One completion for a random target; maybe hang up part-way."""
    kind, model = rng.choice(targets)
    stream = rng.random() < 0.5
    chat = rng.random() < 0.5
    prompt = rng.choice(PROMPTS)
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0.7, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    disconnect = rng.random() < args.disconnect_fraction
    conn = http.client.HTTPConnection(HOST, port, timeout=args.request_timeout)
    t0 = time.perf_counter()
    try:
        data = json.dumps(body).encode()
        conn.request("POST", path, data, {"Content-Type": "application/json", "Content-Length": str(len(data))})
        if disconnect and (not stream or rng.random() < 0.3):
            time.sleep(rng.uniform(0.0, 0.3))
            hang_up(conn)
            stats.count(f"{kind}: hung up before the answer")
            return
        resp = conn.getresponse()
        if resp.status == 404 and kind == "churned":
            resp.read()
            stats.count("churned: 404 (not mounted at that moment)")
            return
        if resp.status != 200:
            text = resp.read()[:300]
            stats.count(f"{kind}: HTTP {resp.status}", error=f"{kind} {model}: HTTP {resp.status} {text!r}")
            return
        if stream:
            chunks = 0
            while True:
                line = resp.fp.readline()
                if not line:
                    stats.count(f"{kind}: stream ended without [DONE]", error=f"{kind} {model}: no [DONE]")
                    return
                if line.startswith(b"data: "):
                    chunks += 1
                    if line.strip() == b"data: [DONE]":
                        break
                    json.loads(line[6:])
                    if disconnect and chunks >= 3:
                        hang_up(conn)
                        stats.count(f"{kind}: hung up mid-stream")
                        return
        else:
            out = json.loads(resp.read())
            if not out.get("choices"):
                stats.count(f"{kind}: malformed answer", error=f"{kind} {model}: {str(out)[:300]}")
                return
        stats.count(f"{kind}: completed", latency=time.perf_counter() - t0)
    except (OSError, http.client.HTTPException, ValueError) as e:
        stats.count(f"{kind}: {type(e).__name__}", error=f"{kind} {model}: {type(e).__name__}: {e}")
    finally:
        conn.close()


def admin(port: int, method: str, path: str, body: dict | None = None, timeout: float = 60) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else b""
        conn.request(method, path, data, {"Content-Length": str(len(data))})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def churn(port: int, names: list[str], deadline: float, args, stats: Stats) -> None:
    """Mount and unmount the churned adapters until `deadline`."""
    rng = random.Random(args.seed + 1)
    mounted = set(names)  # all mounted before the load starts
    while time.time() < deadline:
        name = rng.choice(names)
        try:
            if name in mounted:
                status = admin(port, "DELETE", f"/v1/adapters/{name}")
                if status == 200:
                    mounted.discard(name)
                    stats.count("churn: unmounted")
                elif status == 409:
                    stats.count("churn: unmount refused, in flight (409)")
                else:
                    stats.count(f"churn: unmount HTTP {status}", error=f"unmount {name}: HTTP {status}")
            else:
                status = admin(port, "POST", "/v1/adapters", {"name": name, "path": name})
                if status == 200:
                    mounted.add(name)
                    stats.count("churn: mounted")
                else:
                    stats.count(f"churn: mount HTTP {status}", error=f"mount {name}: HTTP {status}")
        except (OSError, http.client.HTTPException) as e:
            stats.count("churn: connection error", error=f"churn {name}: {type(e).__name__}: {e}")
        time.sleep(args.churn_interval)


def traceback_kinds(log_text: str) -> collections.Counter[str]:
    """{exception type: count} of the tracebacks in a server log (the line that ends each one)."""
    kinds: collections.Counter[str] = collections.Counter()
    lines = log_text.splitlines()
    exception = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))\b")
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):  # other threads' lines may interleave
            end = next((m[1] for ln in lines[i + 1 :] if (m := exception.match(ln))), "unknown")
            kinds[end] += 1
    return kinds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="base model (default: the 4-layer SmolLM2)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--clients", type=int, default=6, help="concurrent client threads (default 6)")
    parser.add_argument("--stable-adapters", type=int, default=2, help="adapters mounted at start-up (default 2)")
    parser.add_argument("--churned-adapters", type=int, default=2, help="adapters mounted/unmounted (default 2)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per completion (default 16)")
    parser.add_argument("--disconnect-fraction", type=float, default=0.15, help="requests that hang up (0.15)")
    parser.add_argument("--churn-interval", type=float, default=0.2, help="seconds between churn steps (0.2)")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--log", default=None, help="keep the server log here (default: a temporary file)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="optiq-soak-"))
    root = work / "adapters"
    root.mkdir()
    stable = [f"stable{i}" for i in range(args.stable_adapters)]
    churned = [f"churn{i}" for i in range(args.churned_adapters)]
    for i, name in enumerate(stable + churned):
        write_random_adapter(args.model, root / name, seed=100 + i, rank=4 + 2 * (i % 3), b_std=0.05)
    flags = ["--optiq-adapter-root", str(root)]
    for name in stable:
        flags += ["--optiq-adapter", f"{name}={root / name}"]
    log_path = Path(args.log) if args.log else work / "server.log"
    env = dict(os.environ, MLX_LM_OPTIQ="1", PYTHONUNBUFFERED="1")
    stats = Stats()
    no_disconnects = argparse.Namespace(**{**vars(args), "disconnect_fraction": 0.0})
    health: collections.Counter[int] = collections.Counter()
    with ServerProcess(args.model, *flags, env=env, log_path=log_path, command=MLX_LM_SERVER_SCRIPT) as server:
        port, pid = server.port, server.proc.pid
        for name in churned:
            assert admin(port, "POST", "/v1/adapters", {"name": name, "path": name}) == 200, name
        # warm up: one request per target, so RSS at the start includes the model and compiled paths
        targets = [("base", "default_model")] + [("stable", n) for n in stable] + [("churned", n) for n in churned]
        for _, model in targets:
            one_request(port, random.Random(0), [("warm-up", model)], no_disconnects, Stats())
        rss_start = rss_kib(pid)
        rss_peak = rss_start
        t_start = time.time()
        deadline = t_start + args.duration

        def client(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            while time.time() < deadline:
                one_request(port, rng, targets, args, stats)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        threads.append(threading.Thread(target=churn, args=(port, churned, deadline, args, stats), daemon=True))
        for t in threads:
            t.start()
        timeline = []  # (seconds since the start, RSS KiB) every ~10 s: growth that levels off vs a leak
        while any(t.is_alive() for t in threads):
            try:
                health[admin(port, "GET", "/health", timeout=10)] += 1
            except (OSError, http.client.HTTPException):
                health["no answer"] += 1
            rss = rss_kib(pid)
            rss_peak = max(rss_peak, rss)
            if not timeline or time.time() - t_start >= timeline[-1][0] + 10:
                timeline.append((round(time.time() - t_start), rss))
            time.sleep(1.0)
        for t in threads:
            t.join(timeout=args.request_timeout)
        wall = time.time() - t_start
        final_health = admin(port, "GET", "/health", timeout=10)
        final_ok = final_health == 200
        for name in stable[:1]:  # the server still answers a normal request
            probe = Stats()
            one_request(port, random.Random(1), [("final", name)], no_disconnects, probe)
            final_ok = final_ok and probe.outcomes.get("final: completed") == 1
        rss_end = rss_kib(pid)
        log_text = server.log_text()
    tracebacks = traceback_kinds(log_text)

    completed = sum(v for k, v in stats.outcomes.items() if k.endswith(": completed"))
    report = {
        "model": args.model,
        "duration_s": round(wall, 1),
        "clients": args.clients,
        "stable_adapters": len(stable),
        "churned_adapters": len(churned),
        "max_tokens": args.max_tokens,
        "requests": sum(v for k, v in stats.outcomes.items() if not k.startswith("churn:")),
        "completed": completed,
        "outcomes": dict(sorted(stats.outcomes.items())),
        "errors": len(stats.errors),
        "first_errors": stats.errors[:10],
        "latency_p50_s": round(percentile(stats.latencies, 0.5), 3),
        "latency_p99_s": round(percentile(stats.latencies, 0.99), 3),
        "latency_mean_s": round(statistics.fmean(stats.latencies), 3) if stats.latencies else None,
        "health_polls": {str(k): v for k, v in health.items()},
        "healthy_at_end": final_ok,
        "rss_mib_start": round(rss_start / 1024, 1),
        "rss_mib_end": round(rss_end / 1024, 1),
        "rss_mib_peak": round(rss_peak / 1024, 1),
        "rss_mib_timeline": [(t, round(k / 1024, 1)) for t, k in timeline],
        "server_log_tracebacks": dict(tracebacks),
    }
    print(
        f"soak: {report['duration_s']} s, {args.clients} clients, {len(stable)} start-up + "
        f"{len(churned)} churned adapters, model {args.model}"
    )
    for outcome, n in report["outcomes"].items():
        print(f"  {n:6d}  {outcome}")
    print(f"requests {report['requests']}, completed {completed}, errors {report['errors']}")
    print(f"latency of completed requests: p50 {report['latency_p50_s']} s, p99 {report['latency_p99_s']} s")
    print(
        f"server RSS: start {report['rss_mib_start']} MiB, end {report['rss_mib_end']} MiB, "
        f"peak {report['rss_mib_peak']} MiB"
    )
    print("server RSS over time (s: MiB): " + ", ".join(f"{t}: {m}" for t, m in report["rss_mib_timeline"]))
    print(f"/health polls: {report['health_polls']}; healthy at the end: {final_ok}")
    print(f"tracebacks in the server log: {dict(tracebacks) or 'none'}")
    for e in report["first_errors"]:
        print(f"  error: {e}")
    if tracebacks:
        print(f"server log: {log_path}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    disconnects = {"BrokenPipeError", "ConnectionResetError"}  # stock mlx-lm logs a client that hung up
    unexpected = sum(n for kind, n in tracebacks.items() if kind not in disconnects)
    return 0 if report["errors"] == 0 and final_ok and unexpected == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
