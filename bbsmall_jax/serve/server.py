"""Running the server: the model, decode engine (or batcher) and app from the command's flags, under uvicorn
with a SIGTERM drain."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import Callable

import uvicorn

from bbsmall_jax.generation.engine import DecodeEngine
from bbsmall_jax.generation.prepare import bucket_length
from bbsmall_jax.runtime.models import DEMO_NAME
from bbsmall_jax.runtime.responder import Responder
from bbsmall_jax.serve.access import AccessPolicy, parse_origins
from bbsmall_jax.serve.app import Service, create_app
from bbsmall_jax.serve.batcher import RequestBatcher, power_of_two_buckets
from bbsmall_jax.serve.engine_worker import EngineWorker
from bbsmall_jax.serve.flags import parse_sizes
from bbsmall_jax.serve.metrics import ServerMetrics
from bbsmall_jax.serve.schemas import MAX_N
from bbsmall_jax.serve.settings import Defaults

log = logging.getLogger("uvicorn.error")
DEMO_MODEL_ID = "bbsmall-demo"


def model_id(args: argparse.Namespace) -> str:
    """The name clients pass as `model`: --model-name, else the --model given, else (or for demo) bbsmall-demo."""
    if args.model_name:
        return args.model_name
    if args.model in (None, DEMO_NAME):
        return DEMO_MODEL_ID
    return os.path.basename(os.path.normpath(args.model)) if os.path.isdir(args.model) else args.model


def build_service(args: argparse.Namespace, responder: Responder) -> Service:
    """The Service for a loaded responder and the serving flags."""
    model = responder.model
    positions = model.config.max_position_embeddings
    # --sample's fixed key is dropped: a key is drawn per request (or made from the request's seed)
    flag_kwargs = {k: v for k, v in responder.generation_kwargs.items() if k != "prng_key"}
    responder.generation_kwargs = flag_kwargs
    defaults = Defaults.resolve(model.generation_config, flag_kwargs,
                                min(responder.max_reply_length(), positions), positions, args.strict_max_tokens)
    metrics = ServerMetrics()
    warmup_lengths = parse_sizes(args.warmup_lengths, "--warmup-lengths", allow_none=True)
    if args.scheduler in ("auto", "engine"):  # its steps cost what the slots in use cost, on any backend
        worker = EngineWorker(responder, metrics, _engine(args, responder, defaults), max_queue=args.max_queue,
                              seed=args.seed, warm_up=bool(warmup_lengths))
    else:
        lengths = sorted({bucket_length(min(n, responder.max_context_tokens), positions) for n in warmup_lengths})
        buckets = (parse_sizes(args.batch_buckets, "--batch-buckets") if args.batch_buckets
                   else power_of_two_buckets(args.max_batch))
        worker = RequestBatcher(responder, metrics, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                max_queue=args.max_queue, batch_buckets=buckets,
                                warmup=[(defaults.default_settings(), length) for length in lengths], seed=args.seed)
    access = AccessPolicy(args.api_key, parse_origins(args.allowed_origins), args.host)
    return Service(responder, worker, metrics, defaults, model_id(args), max_body_bytes=args.max_body_bytes,
                   drain_timeout=args.drain_timeout, access=access, body_timeout=args.body_timeout,
                   strict_fields=args.strict_fields)


def _engine(args: argparse.Namespace, responder: Responder, defaults: Defaults) -> DecodeEngine:
    """The decode engine for the server's settings: every reply length and context the server accepts, beam
    searches of the server's width and up to `MAX_N` sampled choices per lane (fewer with fewer slots)."""
    width = min(max(defaults.num_beams, MAX_N), args.slots)
    engine = DecodeEngine(responder.model, responder.generation_kwargs, slots=args.slots, group_width=width,
                          steps=args.engine_steps, max_length=defaults.max_tokens_limit + 1,
                          max_context=responder.max_context_tokens)
    if engine.spec.slots != args.slots:
        log.info("--slots %d rounded up to %d: whole lanes of %d slots on each device", args.slots,
                 engine.spec.slots, width)
    return engine


class QuietHealthChecks(logging.Filter):
    """Leaves `/health` polls (load balancers, orchestrators) out of uvicorn's access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        path = args[2] if len(args) > 2 else ""  # uvicorn's access record: (client, method, path, version, status)
        return not (isinstance(path, str) and path.split("?")[0] in ("/health", "/health/live"))


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the service when SIGTERM/SIGINT starts the graceful shutdown."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame) -> None:
        """Start draining on the event loop (a signal handler must not take the service's locks)."""
        if self.service.loop is not None and not self.service.draining:
            log.info("bbsmall serve: draining in-flight requests, then exiting")
            self.service.loop.call_soon_threadsafe(self.service.begin_drain)
        super().handle_exit(sig, frame)


def serve(args: argparse.Namespace, make_responder: Callable[[], Responder]) -> int:
    """Load the model, serve until SIGTERM/SIGINT, drain, and return 0 (128 + signal if stopped before serving)."""
    holder: dict = {}

    def before_or_after_uvicorn(sig: int, frame) -> None:
        if "service" in holder and holder["service"].stopped:
            return  # uvicorn re-raises the signal it shut down for; the drain is done, so exit normally
        raise SystemExit(128 + sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, before_or_after_uvicorn)
    service = holder["service"] = build_service(args, make_responder())
    config = uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level=args.log_level,
                            access_log=not args.no_access_log, timeout_graceful_shutdown=args.drain_timeout,
                            lifespan="on")
    logging.getLogger("uvicorn.access").addFilter(QuietHealthChecks())
    log.info("bbsmall serve: model %s on http://%s:%d (chat page at /)", service.model_id, args.host, args.port)
    DrainingServer(config, service).run()
    return 0 if service.stopped else 1
