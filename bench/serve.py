"""Benchmark `bbsmall serve`: the decode engine against static batches, under open-loop Poisson arrivals.

Two servers start on free loopback ports: `--scheduler engine` and `--scheduler batch --max-batch 64`. A load
level of n clients' worth sends n x `--per-client-rate` requests per second (a client sending a message every
second or so), with exponential gaps: arrivals do not wait for replies, so a slow server builds a queue, as
under real traffic. Every request is a streamed greedy chat
completion (`temperature: 0`); its time to first token is when the first chunk with text arrives (static
batches send the whole reply at once), its latency when the stream ends. The servers take turns level by
level; per level and server: replies/s, time to first token p50/p99, latency p50/p99 (medians over rounds).

The clients are raw asyncio connections, not an HTTP library: on a small machine the load generator shares
the cores with the server, and a general-purpose async client costs several times more CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time

import httpx

from bbsmall_jax.testing.machine import describe as machine
from bbsmall_jax.testing.server import ServeProcess, ServerFailed

PROMPTS = [f"{opening} {topic}?" for opening in ("hi! do you like", "what do you think about")
           for topic in ("dogs", "cats", "pizza", "music", "football", "rain", "books", "movies", "school", "work",
                         "coffee", "travel", "summer", "games", "cars", "cooking")]
TEXT = re.compile(rb'"content": "[^"]')  # a chunk carrying reply text (the role chunk's content is "")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="--model for the servers (default: the embedded demo model)")
    parser.add_argument("--clients", default="1,8,32,64", help="load levels, in clients' worth")
    parser.add_argument("--per-client-rate", type=float, default=1.0, help="requests per second per client")
    parser.add_argument("--seconds", type=float, default=15.0, help="arrival time per level and server")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all levels (medians are reported)")
    parser.add_argument("--server-flags", default="--num-beams 1 --max-length 32",
                        help="generation flags both servers get (default: greedy, up to 31 tokens)")
    parser.add_argument("--slots", type=int, default=64, help="the engine's slots (and the batcher's --max-batch)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    return parser.parse_args()


class Server(ServeProcess):
    """A named `bbsmall serve` subprocess whose log goes to LOG_DIR/NAME.log."""

    def __init__(self, name: str, flags: list[str], log_dir: str):
        self.name = name
        super().__init__(["--no-access-log", *flags], os.path.join(log_dir, f"{name}.log"))

    def wait_ready(self, timeout: float = 1800) -> None:
        try:
            super().wait_ready(timeout)
        except ServerFailed as err:
            raise SystemExit(f"{self.name} {err}") from None


async def streamed_request(port: int, body: bytes) -> tuple[float, float]:
    """(time to the first chunk with text, time to the end of the stream) of one streamed POST, in seconds;
    raises on anything but a complete 200 stream."""
    began = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n")[0].decode())
        first, received = None, b""
        while True:  # chunked transfer encoding
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                break
            data = await reader.readexactly(size + 2)
            received += data
            if first is None and TEXT.search(data):
                first = time.perf_counter() - began
        if not received.rstrip().endswith(b"data: [DONE]") or b'"error"' in received:
            raise RuntimeError("the stream did not complete")
        done = time.perf_counter() - began
        return (done if first is None else first), done
    finally:
        writer.close()


def request_body(model: str, index: int) -> bytes:
    return json.dumps({"model": model, "stream": True, "temperature": 0,
                       "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]}).encode()


async def open_loop(port: int, model: str, rate: float, seconds: float, timeout: float, seed: int) -> dict:
    """Poisson arrivals at `rate` per second for `seconds`; replies/s over the time to the last reply, and the
    quantiles of what completed."""
    rng, results, failures = random.Random(seed), [], 0
    began = time.perf_counter()

    async def one(index: int) -> None:
        nonlocal failures
        try:
            results.append(await asyncio.wait_for(streamed_request(port, request_body(model, index)), timeout))
        except Exception:  # noqa: BLE001 - counted, reported
            failures += 1

    tasks, at, index = [], 0.0, 0
    while True:
        at += rng.expovariate(rate)
        if at >= seconds:
            break
        await asyncio.sleep(max(0.0, began + at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(index)))
        index += 1
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    first = sorted(r[0] for r in results)
    whole = sorted(r[1] for r in results)
    pick = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"replies_per_s": len(results) / elapsed, "ttft_p50": pick(first, 0.5), "ttft_p99": pick(first, 0.99),
            "p50": pick(whole, 0.5), "p99": pick(whole, 0.99), "replies": len(results), "failures": failures}


def single_latency(server: Server, model: str, timeout: float) -> float:
    """The median latency of 20 requests sent one at a time."""
    async def run():
        return [(await asyncio.wait_for(streamed_request(server.port, request_body(model, i)), timeout))[1]
                for i in range(20)]
    return statistics.median(asyncio.run(run()))


def main() -> int:
    args = parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    common = args.server_flags.split() + (["--model", args.model] if args.model else [])
    log_dir = tempfile.mkdtemp(prefix="bbsmall-bench-serve-")
    print(f"machine: {machine()}")
    print(f"servers: {' '.join(common)}; logs in {log_dir}", flush=True)
    servers = {"engine": Server("engine", common + ["--scheduler", "engine", "--slots", str(args.slots)], log_dir),
               "batch": Server("batch", common + ["--scheduler", "batch", "--max-batch", str(args.slots),
                                                  "--warmup-lengths", "16"], log_dir)}
    try:
        for server in servers.values():
            server.wait_ready()
        model = httpx.get(servers["engine"].url + "/v1/models", timeout=30).json()["data"][0]["id"]
        for name, server in servers.items():
            print(f"{name}: single-request latency {single_latency(server, model, args.timeout):.3f} s (median of 20, "
                  "one at a time)", flush=True)
        runs = {(name, n): [] for name in servers for n in levels}
        for repeat in range(args.repeats):
            for n in levels:
                order = list(servers) if repeat % 2 == 0 else list(servers)[::-1]
                for name in order:
                    r = asyncio.run(open_loop(servers[name].port, model, n * args.per_client_rate, args.seconds,
                                              args.timeout, seed=repeat * 1000 + n))
                    runs[name, n].append(r)
                    print(f"  round {repeat + 1}, {n} clients' worth, {name}: {r['replies_per_s']:.1f} replies/s, "
                          f"first token p50 {r['ttft_p50']:.3f} s p99 {r['ttft_p99']:.3f} s, latency p50 "
                          f"{r['p50']:.3f} s p99 {r['p99']:.3f} s, {r['failures']} failed", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    report(runs, levels, args)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def report(runs: dict, levels: list[int], args) -> None:
    """The side-by-side table and the targets at 32 clients."""
    med = lambda name, n, key: statistics.median(r[key] for r in runs[name, n])  # noqa: E731
    print(f"\nmedians of {args.repeats} rounds, {args.seconds:.0f} s of arrivals per level and server, "
          f"{args.per_client_rate:g} requests/s per client\n")
    print("| clients' worth | replies/s engine | replies/s batch | first token p50 engine (s) | first token p99 "
          "engine (s) | first token p50 batch (s) | latency p50 engine (s) | latency p99 engine (s) | "
          "latency p50 batch (s) | latency p99 batch (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in levels:
        print(f"| {n} | {med('engine', n, 'replies_per_s'):.1f} | {med('batch', n, 'replies_per_s'):.1f} | "
              f"{med('engine', n, 'ttft_p50'):.3f} | {med('engine', n, 'ttft_p99'):.3f} | "
              f"{med('batch', n, 'ttft_p50'):.3f} | {med('engine', n, 'p50'):.3f} | {med('engine', n, 'p99'):.3f} | "
              f"{med('batch', n, 'p50'):.3f} | {med('batch', n, 'p99'):.3f} |")
    if 32 in levels and 1 in levels:
        for name in ("engine", "batch"):
            ratio = med(name, 32, "p99") / med(name, 1, "p99")
            print(f"{name}: p99 at 32 clients' worth = {ratio:.2f}x the single-client p99")
        print(f"engine at 32: {med('engine', 32, 'replies_per_s') / med('batch', 32, 'replies_per_s'):.2f}x the "
              f"batch server's replies/s; first token p50 {med('engine', 32, 'ttft_p50') * 1000:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
