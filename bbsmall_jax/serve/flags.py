"""The flags of `bbsmall serve` and their checks (no JAX here: bad flags answer before the model loads)."""

from __future__ import annotations

import argparse
import os
import socket

from bbsmall_jax.errors import UsageError
from bbsmall_jax.serve.access import parse_origins


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The serving flags of `bbsmall serve` (the model and generation flags are the CLI's)."""
    group = parser.add_argument_group("serving")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    group.add_argument("--model-name", help="the id clients pass as `model` (default: --model, or bbsmall-demo)")
    group.add_argument("--scheduler", choices=("auto", "engine", "batch"), default="auto",
                       help="engine: requests join decode slots between steps and stream their tokens; batch: "
                            "queued requests grouped into whole generate calls, each reply sent whole; auto "
                            "(default): engine")
    group.add_argument("--slots", type=int, default=32, help="engine: requests decoded together (default 32)")
    group.add_argument("--engine-steps", type=int, default=8,
                       help="engine: decoding steps per program call, between which requests join, leave and "
                            "stream (default 8)")
    group.add_argument("--max-batch", type=int, default=32, help="batch: most conversations in one generate call")
    group.add_argument("--max-wait-ms", type=float, default=10.0,
                       help="batch: longest a request waits for others to fill its batch (default 10)")
    group.add_argument("--batch-buckets", metavar="SIZES",
                       help="batch: batch sizes compiled, e.g. 1,8,32; a batch is padded up to the next "
                            "(default: powers of two up to --max-batch)")
    group.add_argument("--warmup-lengths", default="16,32", metavar="TOKENS",
                       help="batch: context-length buckets compiled at start for every batch size, with the "
                            "default settings, or none (default 16,32); the engine compiles all of its programs, "
                            "or none with 'none'")
    group.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503 (default 256)")
    group.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    group.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds SIGTERM waits for in-flight requests (default 30)")
    group.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                       help="the server's log level (default info)")
    group.add_argument("--no-access-log", action="store_true", help="do not log each request")
    group.add_argument("--api-key", default=os.environ.get("BBSMALL_API_KEY") or None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on every /v1/ request (default: $BBSMALL_API_KEY, "
                            "else no key)")
    group.add_argument("--allowed-origins", metavar="ORIGINS",
                       help="comma-separated origins (https://app.example.com) whose pages may call the server, "
                            "or * for any (default: the server's own page only)")
    group.add_argument("--strict-max-tokens", action="store_true",
                       help="answer a max_tokens over the model's limit with 400 (default: cap it to the limit)")
    group.add_argument("--strict-fields", action="store_true",
                       help="answer unknown request fields with 400, as OpenAI does (default: ignore them and log "
                            "their names, as vLLM does)")
    group.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds a request body may take to arrive before a 408 (default 30)")


def parse_sizes(text: str, flag: str, allow_none: bool = False) -> tuple[int, ...]:
    """"1,2,8" -> (1, 2, 8); "none" -> () where allowed; anything else is an error naming the flag."""
    if allow_none and text.strip().lower() in ("none", "0", ""):
        return ()
    try:
        sizes = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers such as 1,2,4") from None
    if not sizes or sizes[0] < 1:
        raise UsageError(f"{flag} {text!r}: expected positive integers")
    return sizes


def check_flags(args: argparse.Namespace) -> None:
    """Clear errors for the serving flags, before the model loads."""
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected 0-65535")
    for name, minimum in (("max_batch", 1), ("max_queue", 1), ("max_body_bytes", 1024), ("slots", 1),
                          ("engine_steps", 1)):
        if getattr(args, name) < minimum:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {minimum}")
    if args.max_wait_ms < 0:
        raise UsageError(f"--max-wait-ms {args.max_wait_ms}: must be >= 0")
    for name in ("drain_timeout", "body_timeout"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be > 0")
    if args.api_key is not None and (not args.api_key.strip() or not args.api_key.isprintable()
                                     or not args.api_key.isascii() or " " in args.api_key):
        raise UsageError("--api-key (or BBSMALL_API_KEY): the key must be printable ASCII without spaces")
    parse_origins(args.allowed_origins)
    if args.batch_buckets is not None:
        buckets = parse_sizes(args.batch_buckets, "--batch-buckets")
        odd = [b for b in buckets if b & (b - 1)]
        if odd:
            raise UsageError(f"--batch-buckets: {odd[0]} is not a power of two (generate pads batches to one)")
        if buckets[-1] < args.max_batch:
            raise UsageError(f"--batch-buckets {args.batch_buckets}: the largest ({buckets[-1]}) is below "
                             f"--max-batch {args.max_batch}")
    parse_sizes(args.warmup_lengths, "--warmup-lengths", allow_none=True)
    check_address(args.host, args.port)


def check_address(host: str, port: int) -> None:
    """Refuse, naming it, a --host that does not resolve or a --host/--port this machine cannot listen on
    (a port in use, a foreign address), before minutes go into loading the model."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UsageError(f"--host {host!r} does not resolve to an address ({getattr(err, 'strerror', err)})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise UsageError(f"cannot listen on --host {host} --port {port}: {err.strerror or err}") from None
