"""How fast `bbsmall`'s first-run errors answer: each bad command run as a new process, its exit code, the first
line of its message, and the median wall time over --repeats runs (the model must not load for any of them)."""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from bbsmall_jax.testing.machine import describe


def cases(scratch: str, busy_port: int) -> dict[str, list[str]]:
    """name -> the bbsmall arguments of one bad command, with the files it needs made in `scratch`."""
    source, done, model = (os.path.join(scratch, name) for name in ("in.jsonl", "done.jsonl", "model"))
    with open(source, "w") as f:
        f.write('{"context": ["hi"]}\n')
    open(done, "w").close()
    os.makedirs(model)
    open(os.path.join(model, "keep"), "w").close()
    generate = lambda *paths: ["generate", "--input", *paths[:1], "--output", *paths[1:]]
    return {
        "generate: input is a directory": generate(scratch, os.path.join(scratch, "o.jsonl")),
        "generate: output is /dev/full": generate(source, "/dev/full", "--overwrite"),
        "generate: output folder missing": generate(source, os.path.join(scratch, "nowhere", "o.jsonl")),
        "generate: output exists": generate(source, done),
        "generate: output is the input": generate(source, source, "--overwrite"),
        "generate: no such input": generate(os.path.join(scratch, "missing.jsonl"), os.path.join(scratch, "o.jsonl")),
        "serve: host does not resolve": ["serve", "--host", "no-such-host.invalid"],
        "serve: port in use": ["serve", "--port", str(busy_port)],
        "convert: target not empty": ["convert", "demo", model],
        "chat: no such model": ["chat", "--model", os.path.join(scratch, "no_model"), "--once", "hi"],
    }


def run(argv: list[str]) -> tuple[int, str, float]:
    """(exit code, first stderr line, wall seconds) of `python -m bbsmall_jax ARGV`."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bbsmall_jax", *argv], capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    return done.returncode, (done.stderr.strip().splitlines() or [""])[0], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (the median is reported)")
    args = parser.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as scratch, socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        print("| command | exit | median s | min s | message |\n|---|---|---|---|---|")
        for name, argv in cases(scratch, busy.getsockname()[1]).items():
            results = [run(argv) for _ in range(args.repeats)]
            times = [seconds for _, _, seconds in results]
            code, message, _ = results[0]
            print(f"| {name} | {code} | {statistics.median(times):.2f} | {min(times):.2f} | {message[:100]} |",
                  flush=True)
        left = sorted(set(os.listdir(scratch)) - {"in.jsonl", "done.jsonl", "model"})
        print(f"files left behind: {left or 'none'}; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
