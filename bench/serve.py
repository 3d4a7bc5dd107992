"""Benchmark `bbsmall serve`: closed-loop clients against the server with batching on and off, side by side.

Two servers start on free loopback ports, one with `--max-batch 64` and one with `--max-batch 1`. For each
number of concurrent clients, each client sends a chat completion, waits for it, and sends the next until
the level's time is up; the two servers take turns level by level. Reported per level (medians over the
repeats): replies/s, p50 and p99 latency, and the mean batch size and generate time from /metrics.

The clients are keep-alive HTTP/1.1 connections on asyncio streams, not an HTTP library: on a small machine
the load generator shares the cores with the server, and a general-purpose async client costs several times
more CPU per request (enough to starve the batches it is meant to fill).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


def parse_args():
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="--model for the servers (default: the embedded demo model)")
    parser.add_argument("--clients", default="1,8,32,64", help="concurrent clients per level")
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per level and server")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all levels (medians are reported)")
    parser.add_argument("--max-batch", type=int, default=64, help="--max-batch of the batching server")
    parser.add_argument("--server-flags", default="--num-beams 1 --max-length 32",
                        help="generation flags both servers get (default: greedy, up to 31 tokens)")
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

    def batches(self) -> tuple[float, float, float]:
        """(generate calls, conversations, seconds generating) so far, from /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return tuple(float(re.search(rf"^{name} (\S+)$", text, re.M).group(1)) for name in (
            "bbsmall_batch_size_count", "bbsmall_batch_size_sum", "bbsmall_generate_duration_seconds_sum"))


class Connection:
    """One keep-alive HTTP/1.1 connection to the server."""

    def __init__(self, port: int):
        self.port, self.reader, self.writer = port, None, None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, body) of a POST; reconnects when the server closed the connection."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split(" ", 2)[1])
        length = int(re.search(r"^content-length:\s*(\d+)", head, re.I | re.M).group(1))
        data = await self.reader.readexactly(length)
        if re.search(r"^connection:\s*close", head, re.I | re.M):
            self.close()
        return status, data

    def close(self) -> None:
        """Close the connection (the next post reconnects)."""
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def closed_loop(port: int, model: str, clients: int, seconds: float, timeout: float) -> dict:
    """`clients` loops of request-then-wait for `seconds`; replies/s and latencies of what completed."""
    latencies, failures = [], 0
    began = time.perf_counter()
    stop_at = began + seconds

    async def one_client(index: int) -> None:
        nonlocal failures
        connection, turn = Connection(port), index
        try:
            while time.perf_counter() < stop_at:
                body = json.dumps({"model": model, "messages": [
                    {"role": "user", "content": PROMPTS[turn % len(PROMPTS)]}]}).encode()
                start = time.perf_counter()
                status, data = await asyncio.wait_for(connection.post("/v1/chat/completions", body), timeout)
                if status == 200 and json.loads(data)["choices"][0]["message"]["content"]:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures += 1
                turn += clients
        finally:
            connection.close()

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")  # noqa: E731
    return {"replies_per_s": len(latencies) / elapsed, "p50": pick(0.50), "p99": pick(0.99),
            "replies": len(latencies), "failures": failures}


def measure(server: Server, model: str, clients: int, args) -> dict:
    """One level on one server, with its mean batch size."""
    calls_before, rows_before, seconds_before = server.batches()
    result = asyncio.run(closed_loop(server.port, model, clients, args.seconds, args.timeout))
    calls_after, rows_after, seconds_after = server.batches()
    calls = calls_after - calls_before
    result["mean_batch"] = (rows_after - rows_before) / calls if calls else float("nan")
    result["generate_s"] = (seconds_after - seconds_before) / calls if calls else float("nan")
    return result


def median(runs: list[dict], key: str) -> float:
    """The median of one measure over the rounds."""
    return statistics.median(run[key] for run in runs)


def speedup(on: list[dict], off: list[dict]) -> float:
    """The median over rounds of on/off replies/s (each round's pair ran back to back on the same machine)."""
    return statistics.median(a["replies_per_s"] / b["replies_per_s"] for a, b in zip(on, off))


def main() -> int:
    """Start both servers, run every level on each in turns, report."""
    args = parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    common = args.server_flags.split() + (["--model", args.model] if args.model else [])
    model = "bbsmall-demo" if args.model is None else None
    log_dir = tempfile.mkdtemp(prefix="bbsmall-bench-serve-")
    print(f"machine: {machine()}")
    print(f"servers: {' '.join(common)}; logs in {log_dir}", flush=True)
    servers = {"on": Server("on", common + ["--max-batch", str(args.max_batch), "--warmup-lengths", "16"], log_dir),
               "off": Server("off", common + ["--max-batch", "1", "--warmup-lengths", "16"], log_dir)}
    try:
        for server in servers.values():
            server.wait_ready()
        model = model or httpx.get(servers["on"].url + "/v1/models", timeout=30).json()["data"][0]["id"]
        runs = {(mode, n): [] for mode in servers for n in levels}
        for repeat in range(args.repeats):
            for n in levels:
                order = ("on", "off") if repeat % 2 == 0 else ("off", "on")
                for mode in order:
                    runs[mode, n].append(measure(servers[mode], model, n, args))
                    r = runs[mode, n][-1]
                    print(f"  round {repeat + 1}, {n} clients, batching {mode}: {r['replies_per_s']:.1f} replies/s, "
                          f"p50 {r['p50']:.3f} s, p99 {r['p99']:.3f} s, mean batch {r['mean_batch']:.1f} "
                          f"({r['generate_s']:.3f} s per generate call), "
                          f"{r['failures']} failed", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    report(runs, levels, args)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def report(runs: dict, levels: list[int], args) -> None:
    """The side-by-side table and the targets at 32 clients."""
    print(f"\nmedians of {args.repeats} rounds, {args.seconds:.0f} s per level and server (speed-up: the median "
          "of the rounds' on/off ratios)\n")
    print("| clients | replies/s on | replies/s off | speed-up | p50 on (s) | p99 on (s) | p50 off (s) | "
          "p99 off (s) | mean batch on | mean batch off | generate call on (s) | generate call off (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in levels:
        on, off = runs["on", n], runs["off", n]
        print(f"| {n} | {median(on, 'replies_per_s'):.1f} | {median(off, 'replies_per_s'):.1f} | "
              f"{speedup(on, off):.2f}x | {median(on, 'p50'):.3f} | "
              f"{median(on, 'p99'):.3f} | {median(off, 'p50'):.3f} | {median(off, 'p99'):.3f} | "
              f"{median(on, 'mean_batch'):.1f} | {median(off, 'mean_batch'):.1f} | "
              f"{median(on, 'generate_s'):.3f} | {median(off, 'generate_s'):.3f} |")
    if 32 in levels and 1 in levels:
        ratio = speedup(runs["on", 32], runs["off", 32])
        single, p99 = median(runs["on", 1], "p50"), median(runs["on", 32], "p99")
        print(f"\n32 clients: {ratio:.2f}x the replies/s of batching off (target >= 4x: "
              f"{'met' if ratio >= 4 else 'not met'}); p99 {p99:.3f} s = {p99 / single:.2f}x the single-client "
              f"latency {single:.3f} s (target <= 2x: {'met' if p99 <= 2 * single else 'not met'})")


if __name__ == "__main__":
    sys.exit(main())
