"""Serving under load: `lightune serve` with two adapters, requests mixed 50/50, batched vs a naive server.

batched: the default server: one worker runs the requests waiting together, rows of both adapters in one
         forward pass (peft's per-row adapter_names) when the adapters allow it
naive:   `--batching off`: one request at a time, set_adapter and the request's own forward passes

Each server is started as a real process on 127.0.0.1 (a free port) and driven by an async load generator
(httpx): C clients, each sending its next request when the last one is answered, until --requests are answered
or --seconds have passed. For 1, 8 and 32 clients it prints requests/s, texts/s, p50/p95/p99 latency, errors
(503s, the deliberate answer of a full queue, counted apart) and the server's peak RSS, then texts/s of batched
over naive, and the model's own share of that gain: the texts/s of the adapter alone (lightune's Classifier, no
server, no HTTP) in passes of one request's texts against passes of the server's batch size (32); the rest of the
gain is the per-request cost (HTTP, adapter switch, thread hand-offs) that batching spreads over a pass. Time it
on an otherwise idle machine.

    python benchmarks/bench_serve.py                              # trains two small MiniLM adapters first
    python benchmarks/bench_serve.py --run-dir runs/a --run-dir runs/b --json serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", action="append", dest="run_dirs", metavar="RUN_DIR",
                   help="a finished adapter run; give two (default: train two small MiniLM LoRA runs first)")
    p.add_argument("--data", default="rotten_tomatoes", help="where the request texts come from (its test split)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    p.add_argument("--requests", type=int, default=400, help="requests per level, at most")
    p.add_argument("--seconds", type=float, default=60, help="time per level, at most")
    p.add_argument("--texts-per-request", type=int, default=2)
    p.add_argument("--modes", nargs="+", choices=("batched", "naive"), default=["batched", "naive"])
    p.add_argument("--max-queue", type=int, default=32, help="the server's --max-queue")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def quick_runs(output_dir: str) -> list[str]:
    """Two small LoRA runs of all-MiniLM-L6-v2 (mean-pooled, the packaged model's default) on the packaged short
    reviews, with two seeds: two adapters, quick to train (the benchmark measures serving, not training)."""
    from lightune.config import load_config
    from lightune.training import run_training

    runs = []
    for seed in (0, 1):
        cfg = load_config(overrides=dict(data="rotten_tomatoes", train_size=320, eval_size=64, max_steps=20, seed=seed,
                                         output_dir=output_dir, run_name=f"bench-serve-{seed}"))
        runs.append(str(run_training(cfg, progress=False).run_dir))
    return runs


def request_texts(source: str, n: int = 500) -> list[str]:
    from lightune.config import from_dict
    from lightune.data import build_splits

    splits = build_splits(from_dict({"data": source, "train_size": 10, "eval_size": n}))
    return list(splits.test["text"])[:n]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run_dirs: list[str], mode: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "lightune", "serve", *run_dirs, "--name", "a", "--name", "b", "--port", str(port),
               "--device", args.device, "--max-queue", str(args.max_queue),
               "--batching", "on" if mode == "batched" else "off"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit(f"bench_serve: the {mode} server did not start: {server.communicate()[1][-2000:]}")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (VmRSS) or its peak since it started (VmHWM), in MB, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def drive(url: str, texts: list[str], clients: int, args, pid: int) -> dict:
    """C clients sending requests (adapters a and b alternating) until args.requests are answered or
    args.seconds have passed; latencies of the 200s, counts of the rest, the server's peak RSS meanwhile."""
    import httpx

    rng = random.Random(clients)
    latencies, statuses, sent = [], {}, 0
    peak_rss, stop_at = rss_mb(pid), time.monotonic() + args.seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < args.requests and time.monotonic() < stop_at:
            sent += 1
            body = {"texts": rng.sample(texts, args.texts_per_request), "adapter": "ab"[sent % 2]}
            start = time.perf_counter()
            try:
                response = await http.post(url + "/predict", json=body)
                status = response.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            if status == 200:
                latencies.append(time.perf_counter() - start)
            statuses[status] = statuses.get(status, 0) + 1

    async def sample_rss(done: asyncio.Event) -> None:
        nonlocal peak_rss
        while not done.is_set():
            peak_rss = max(peak_rss, rss_mb(pid))
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        for _ in range(3):  # warm-up: first passes, thread pools, connections
            await http.post(url + "/predict", json={"texts": texts[:args.texts_per_request], "adapter": "a"})
        done = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(done))
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
        done.set()
        await sampler
    ok = statuses.get(200, 0)
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"clients": clients, "seconds": seconds, "answered": ok, "requests_per_s": ok / seconds,
            "texts_per_s": ok * args.texts_per_request / seconds, "p50_ms": quantiles[49] * 1000,
            "p95_ms": quantiles[94] * 1000, "p99_ms": quantiles[98] * 1000, "busy_503": statuses.get(503, 0),
            "errors": {str(k): v for k, v in statuses.items() if k not in (200, 503)}, "peak_rss_mb": peak_rss}


def model_alone(run_dir: str, texts: list[str], args, pass_texts: int = 32) -> dict:
    """texts/s of one adapter without a server (Classifier, merged) in passes of one request's texts and in full
    passes of the server's batch size: their ratio is what bigger passes alone gain on this machine."""
    from lightune.inference import Classifier

    classifier = Classifier(run_dir, device=args.device, batch_size=pass_texts)
    sample = texts[:256]
    classifier.predict(sample[:pass_texts])  # warm-up

    def rate(size: int) -> float:
        start = time.perf_counter()
        for i in range(0, len(sample), size):
            classifier.predict(sample[i:i + size])
        return len(sample) / (time.perf_counter() - start)

    per_request, full = rate(args.texts_per_request), rate(pass_texts)
    return {"pass_texts": pass_texts, "per_request_texts_per_s": per_request, "full_pass_texts_per_s": full,
            "full_pass_gain": full / per_request}


def bench_mode(run_dirs: list[str], mode: str, texts: list[str], args) -> list[dict]:
    server, url = start_server(run_dirs, mode, args)
    try:
        results = [{"mode": mode, **asyncio.run(drive(url, texts, clients, args, server.pid))}
                   for clients in args.clients]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return results


def print_table(results: list[dict]) -> None:
    print(f"{'mode':8} {'clients':>7} {'req/s':>8} {'texts/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'503s':>5} {'errors':>6} {'peak RSS MB':>11}")
    for r in results:
        print(f"{r['mode']:8} {r['clients']:>7} {r['requests_per_s']:>8.1f} {r['texts_per_s']:>8.1f} "
              f"{r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['busy_503']:>5} "
              f"{sum(r['errors'].values()):>6} {r['peak_rss_mb']:>11.0f}")
    by_key = {(r["mode"], r["clients"]): r for r in results}
    for clients in sorted({r["clients"] for r in results}):
        if ("batched", clients) in by_key and ("naive", clients) in by_key:
            ratio = by_key[("batched", clients)]["texts_per_s"] / by_key[("naive", clients)]["texts_per_s"]
            print(f"{clients} clients: batched texts/s = {ratio:.2f} x naive")


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        run_dirs = args.run_dirs or quick_runs(tmp)
        if len(run_dirs) != 2:
            sys.exit("bench_serve: give two --run-dir (or none, to train two small runs)")
        texts = request_texts(args.data)
        results = [r for mode in args.modes for r in bench_mode(run_dirs, mode, texts, args)]
        alone = model_alone(run_dirs[0], texts, args)
    print(f"{args.texts_per_request} texts per request from {args.data}; two adapters, 50/50; at most "
          f"{args.requests} requests or {args.seconds:g} s per level")
    print_table(results)
    print(f"model alone (Classifier, no server): {alone['per_request_texts_per_s']:.1f} texts/s in passes of "
          f"{args.texts_per_request} texts, {alone['full_pass_texts_per_s']:.1f} in passes of {alone['pass_texts']}: "
          f"bigger passes alone gain {alone['full_pass_gain']:.2f}x on this machine")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "json"}, "results": results,
                       "model_alone": alone}, out, indent=2)


if __name__ == "__main__":
    main()
