"""Serve a run folder over HTTP: ``python -m app --model-dir RUN_DIR [--host H] [--port P]``.

``--engine batched`` (the default) steps every active request together, one forward pass per
step; ``--engine naive`` generates each request alone, one after the other (``WORDRNN_ENGINE``).

Flags override the ``WORDRNN_*`` environment (see ``app/settings.py``). The model is loaded
and warmed up before the port is opened; a bad checkpoint or device ends the process with
one line on stderr that names the file (exit status 1), bad settings with exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn
from pydantic import ValidationError

from app.errors import StartupError
from app.logs import log_config
from app.main import create_app
from app.settings import ENV_PREFIX, Settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve a trained run folder over HTTP. Flags override the WORDRNN_* "
        "environment variables.",
    )
    parser.add_argument("--model-dir", help="the run folder written by the trainer")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000; 0: any free)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--root-path", help="the sub-path a reverse proxy serves the app under")
    parser.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"], default=None
    )
    parser.add_argument(
        "--log-format", choices=["text", "json"], help="text (default) or json: one object a line"
    )
    parser.add_argument(
        "--forwarded-allow-ips",
        help="proxies whose X-Forwarded-* headers are believed: comma-separated addresses or "
        "networks, or * (default 127.0.0.1,::1)",
    )
    parser.add_argument(
        "--engine",
        choices=["batched", "naive"],
        help="batched (default): continuous batching, every active request advanced in one "
        "forward pass per step; naive: each request generates alone",
    )
    parser.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on the model endpoints; repeat for several "
        "keys (default: WORDRNN_API_KEYS, else none)",
    )
    # The benchmark's HTTP ceiling (bench/serve_load.py): POST /bench/generate-noop.
    parser.add_argument("--bench-noop", action="store_true", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


FLAGS = (
    "model_dir",
    "host",
    "port",
    "device",
    "root_path",
    "log_level",
    "log_format",
    "forwarded_allow_ips",
    "engine",
    "api_keys",
    "bench_noop",
)


def build_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    overrides = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    return Settings(**overrides)


def _stop(signum: int, frame: FrameType | None) -> None:
    # While serving, uvicorn takes the signal, shuts down gracefully, then sends it again to
    # this handler: the exit unwinds through the lifespan, which closes the engine.
    raise SystemExit(0)


async def _serve(settings: Settings) -> None:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=log_config(settings.log_level, settings.log_format),
        access_log=False,  # app.logs writes the access log, with request ids
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
        lifespan="off",  # run below, so that a start-up failure is ours to report
    )
    async with app.router.lifespan_context(app):
        # What start-up built (torch, the model, the app) lives as long as the process: keep
        # the cyclic GC from rescanning it, whose full passes otherwise stall every request,
        # and the inference thread, for ~0.1 s under load.
        gc.freeze()
        await uvicorn.Server(config).serve()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = build_settings(args)
    except ValidationError as exc:
        for err in exc.errors():
            name = ".".join(str(part) for part in err["loc"])
            source = f"{ENV_PREFIX}{name.upper()}"
            if name in FLAGS:
                source = "--" + name.replace("_", "-") + " or " + source
            print(f"error: setting {name} ({source}): {err['msg']}", file=sys.stderr)
        return 2
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(_serve(settings))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
