"""Serve a run folder over HTTP: ``python -m app --model-dir RUN_DIR [--host H] [--port P]``.

``--models-dir DIR`` serves every run folder under ``DIR`` instead, each named after its
subfolder. Every setting of `app.settings.Settings` has a flag named after it
(``WORDRNN_MAX_WORDS`` is ``--max-words``), which overrides the environment; the flags,
their help and the defaults it shows are all read from the settings, so that they cannot
drift apart (``python -m app --help`` lists them).

The model is loaded and warmed up before the port is opened; a bad checkpoint or device
ends the process with one line on stderr that names the file (exit status 1), bad settings
with exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any, Literal, get_args, get_origin

import uvicorn
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from app.errors import StartupError
from app.logs import log_config
from app.main import create_app
from app.protocol import ConnectionLimits, limited_protocol
from app.settings import ENV_PREFIX, Settings

# Flags not spelled as their setting: ``--api-key`` takes one key, and is repeated for more.
FLAG_NAMES = {"api_keys": "--api-key", "api_keys_file": "--api-key-file"}


def flag_name(name: str) -> str:
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _shown_default(field: FieldInfo) -> str | None:
    """The default as --help writes it; None for an unset or empty one, which says nothing."""
    value = field.get_default(call_default_factory=True)
    if value is None or value in ("", []):
        return None
    if isinstance(value, float):
        return f"{value:g}"  # 5, not 5.0, as the README writes it
    return str(value)


def _help(name: str, field: FieldInfo, note: str = "") -> str:
    where = f"{ENV_PREFIX}{name.upper()}"
    default = _shown_default(field)
    if default is not None:
        where += f"; default: {default}"
    text = " ".join(part for part in (field.description, note, f"[{where}]") if part)
    return text.replace("%", "%%")  # argparse %-formats help


def _argument(name: str, field: FieldInfo) -> dict[str, Any]:
    """How argparse reads one setting's flag.

    Values stay the strings typed: `Settings` converts and checks them as it does the
    environment's, so a bad value gets the same message, naming both. argparse is told
    only what changes the command line itself: choices (listed in --help, refused before
    anything starts), switches, and the repeated ``--api-key``.
    """
    argument: dict[str, Any] = {"dest": name, "default": None}
    note = ""
    if name == "api_keys":
        argument.update(action="append", metavar="KEY")
        note = "Repeat the flag for several keys: they add to the environment's and the file's."
    elif field.annotation is bool:
        argument["action"] = argparse.BooleanOptionalAction
    elif get_origin(field.annotation) is Literal:
        argument["choices"] = get_args(field.annotation)
    else:
        argument["metavar"] = name.rsplit("_", 1)[-1].upper()  # --max-words WORDS
    argument["help"] = _help(name, field, note)
    return argument


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags given; those not given are None, so the environment's value stands."""
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve a trained run folder over HTTP. Each flag overrides the WORDRNN_* "
        "environment variable its help names.",
    )
    for name, field in Settings.model_fields.items():
        parser.add_argument(flag_name(name), **_argument(name, field))
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top.

    ``--api-key`` adds to the keys of the environment and the key file instead of replacing
    them.
    """
    overrides = {name: value for name, value in vars(args).items() if value is not None}
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
            if name in Settings.model_fields:
                source = f"{flag_name(name)} or {source}"
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
