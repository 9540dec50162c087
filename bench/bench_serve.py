"""Serving throughput: `clmtune serve` with request batching vs the same server one request at a time.

    python bench/bench_serve.py                  # 1, 4, 16 concurrent clients, 64 new tokens (a few minutes)
    python bench/bench_serve.py --clients 16 --rounds 2

Two servers run side by side as child processes (`clmtune serve --model builtin:gpt2-zh-small`, one torch thread
each, only one busy at a time): ``--max-batch 16`` (requests that arrive together are decoded as one batch) and
``--max-batch 1`` (one request at a time: the queue hands the model one request, the others wait). Closed-loop
clients (asyncio + httpx): each of ``c`` clients sends a request, waits for the full answer, sends the next.
Request k always gets prompt k mod 6 and seed k, sampling at temperature 1 with up to 64 new tokens, so both
servers generate the same tokens; the script checks that their texts are equal. Levels are measured in turns
(batched, one-at-a-time, batched ...) so that a neighbour's load on this shared machine hits both.
Reports requests/s, generated tokens/s, p50/p95 latency per level; writes bench/results/serve_gpt2zh_cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import result_path  # noqa: E402  (bench/common.py)
MODEL = "builtin:gpt2-zh-small"
PROMPTS = ["这家酒店的早餐", "房间很干净，服务员", "位置很好，离地铁站", "今天天气不错，我们", "价格有点贵，但是",
           "下次出差还会"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE.parent / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "clmtune", "serve", "--model", MODEL, "--port", str(port),
                             "--device", "cpu", "--max-batch", str(max_batch), "--max-queue", "256"], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the max_batch={max_batch} server did not start")


async def level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    counter = iter(range(requests))
    latencies, texts, tokens = [], {}, 0

    async def client(http: httpx.AsyncClient):
        nonlocal tokens
        for k in counter:
            body = {"model": MODEL, "prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": max_tokens, "seed": k,
                    "temperature": 1.0}
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/completions", json=body)
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            data = r.json()
            texts[k] = data["choices"][0]["text"]
            tokens += data["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"clients": clients, "requests": requests, "seconds": round(seconds, 3),
            "requests_per_s": round(requests / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "generated_tokens": tokens, "p50_latency_s": round(statistics.median(latencies), 3),
            "p95_latency_s": round(q[18], 3), "texts": [texts[k] for k in sorted(texts)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=3, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--out", default=str(result_path("serve", "gpt2zh")))
    args = ap.parse_args()
    servers = {"batched": start_server(16, args.threads), "one_at_a_time": start_server(1, args.threads)}
    results: dict = {"batched": [], "one_at_a_time": []}
    try:
        for mode, (_, url) in servers.items():  # warm-up: first forward, allocator, tokenizer caches
            asyncio.run(level(url, 2, 2, 8))
        for c in [int(x) for x in args.clients.split(",")]:
            for mode, (_, url) in servers.items():
                r = asyncio.run(level(url, c, c * args.rounds, args.max_tokens))
                results[mode].append(r)
                print(f"{mode:>14} clients={c:>2}: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.0f} tok/s, "
                      f"p50 {r['p50_latency_s']:.2f}s, p95 {r['p95_latency_s']:.2f}s", flush=True)
            same = results["batched"][-1]["texts"] == results["one_at_a_time"][-1]["texts"]
            print(f"{'':>14} same texts from both servers: {same}", flush=True)
            results["batched"][-1]["same_texts_as_one_at_a_time"] = same
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    for mode in results:
        for r in results[mode]:
            r.pop("texts")
    speedup = {str(b["clients"]): round(b["requests_per_s"] / o["requests_per_s"], 2)
               for b, o in zip(results["batched"], results["one_at_a_time"])}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    out = {"model": MODEL, "max_tokens": args.max_tokens, "threads_per_server": args.threads, "results": results,
           "speedup_requests_per_s": speedup, "cpu": cpu, "cores": os.cpu_count(),
           "load_average_before_after": [list(LOAD0), list(os.getloadavg())],
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print("speedup (requests/s, batched / one at a time):", speedup, "->", args.out)


LOAD0 = os.getloadavg()

if __name__ == "__main__":
    main()
