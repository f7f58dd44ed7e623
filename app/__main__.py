"""Serve a run folder over HTTP: ``python -m app --model-dir RUN_DIR [--host H] [--port P]``.

``--models-dir DIR`` serves every run folder under ``DIR`` instead, each named after its
subfolder (``--default-model NAME`` picks the one a request without ``model`` gets). The
run folders are checked every ``--reload-interval-seconds`` (5) for a newly committed
checkpoint, which replaces the served one without dropping a request.

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
from app.protocol import ConnectionLimits, limited_protocol
from app.settings import ENV_PREFIX, Settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve a trained run folder over HTTP. Flags override the WORDRNN_* "
        "environment variables.",
    )
    parser.add_argument("--model-dir", help="the run folder written by the trainer")
    parser.add_argument(
        "--models-dir",
        help="serve every run folder in this folder instead, each named after its subfolder",
    )
    parser.add_argument(
        "--default-model",
        metavar="NAME",
        help="the model of requests without 'model' (default: the only one, else the "
        "subfolder named 'default')",
    )
    parser.add_argument(
        "--reload-interval-seconds",
        type=float,
        metavar="SECONDS",
        help="check the run folders for a new checkpoint this often (default 5; 0: never)",
    )
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
        "keys (added to WORDRNN_API_KEYS and the key file; default: none)",
    )
    parser.add_argument(
        "--api-key-file",
        dest="api_keys_file",
        metavar="PATH",
        help="accept the keys in PATH too: one a line, blank lines and # comments skipped "
        "(WORDRNN_API_KEYS_FILE)",
    )
    parser.add_argument(
        "--rate-limit",
        metavar="LIMITS",
        help="requests each API key (else each client address) may make, e.g. 60/minute or "
        "'10/second;100/minute'; 429 past it (WORDRNN_RATE_LIMIT; default: no limit)",
    )
    # The benchmark's HTTP ceiling (bench/serve_load.py): POST /bench/generate-noop.
    parser.add_argument("--bench-noop", action="store_true", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


FLAGS = (
    "model_dir",
    "models_dir",
    "default_model",
    "reload_interval_seconds",
    "host",
    "port",
    "device",
    "root_path",
    "log_level",
    "log_format",
    "forwarded_allow_ips",
    "engine",
    "api_keys",
    "api_keys_file",
    "rate_limit",
    "bench_noop",
)
# Flags not spelled as their setting: one ``--api-key`` for each key.
FLAG_NAMES = {"api_keys": "--api-key", "api_keys_file": "--api-key-file"}


def build_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top.

    ``--api-key`` adds to the keys of the environment and the key file instead of replacing
    them.
    """
    overrides = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    flag_keys = overrides.pop("api_keys", [])
    settings = Settings(**overrides)
    if not flag_keys:
        return settings
    return Settings(**overrides, api_keys=[*settings.api_keys, *flag_keys])


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
        http=limited_protocol(
            ConnectionLimits(
                max_header_bytes=settings.max_header_bytes,
                header_timeout=settings.header_timeout_seconds,
                body_timeout=settings.body_timeout_seconds,
            )
        ),
        ws="none",  # the app has no WebSocket route; the limits above are HTTP's
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
                flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
                source = f"{flag} or {source}"
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
