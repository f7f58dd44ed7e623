"""The service's settings, read from ``WORDRNN_*`` environment variables.

Nothing is read at import time: `Settings()` reads the environment when it is built, by
`app.main.create_app` or by the command line, whose flags override the environment.
List settings (CORS origins, API keys) take a comma-separated string or a JSON list.

The fields are the one list of settings: the command line's flags and their help are made
from them, and a test holds the README's table (names and defaults) against them. So each
field has a ``description``, which --help shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from limits import parse_many
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.logs import LogFormat

ENV_PREFIX = "WORDRNN_"

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


def read_key_file(path: Path) -> list[SecretStr]:
    """The keys in ``path``: one a line; blank lines and lines starting with ``#`` are skipped.

    An unreadable file, or one without a key, is an error that names the file: a typo in the
    path must not start a server that accepts no key at all.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot read the API key file {path}: {reason}") from None
    keys = []
    for number, line in enumerate(lines, start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if any(c.isspace() for c in key):
            raise ValueError(f"the API key file {path}, line {number}: a key holds a space")
        keys.append(SecretStr(key))
    if not keys:
        raise ValueError(f"the API key file {path} holds no key")
    return keys


def _split_list(value: object) -> object:
    """``"a, b"`` or ``'["a", "b"]'`` -> ``["a", "b"]``; other values pass through unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [item.strip() for item in text.split(",") if item.strip()]


class Settings(BaseSettings):
    """Where the model is, how to serve it, and the limits that keep one request cheap."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,
        extra="ignore",
        validate_default=True,
    )

    # Before model_dir: its validator needs exactly one of the two.
    models_dir: Path | None = Field(
        None,
        description="A folder of run folders: each subfolder holding manifest.json is a model "
        "named after the subfolder.",
    )
    model_dir: Path | None = Field(
        None, description="The run folder written by the trainer (one model, named after it)."
    )
    default_model: str | None = Field(
        None,
        description="The model a request without 'model' gets; unset: the only model, else the "
        "subfolder named 'default'.",
    )
    reload_interval_seconds: float = Field(
        5.0,
        ge=0,
        description="How often the run folders are checked for a newly committed checkpoint "
        "(and the models folder for new models); 0 turns reloading off.",
    )
    device: str = Field(
        "auto", description="auto (cuda when present, else cpu), cpu, cuda, cuda:N or mps."
    )
    host: str = Field("127.0.0.1", description="The address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="The port to listen on; 0: any free one.")
    root_path: str = Field(
        "", description="The sub-path a reverse proxy serves the app under, e.g. /textgen."
    )
    log_level: LogLevel = Field("info", description="The least severe log records written.")
    log_format: LogFormat = Field(
        "text", description="text (uvicorn's lines) or json (one JSON object a line)."
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1,::1",
        description="Comma-separated addresses or networks (or *) of the reverse proxies whose "
        "X-Forwarded-For and X-Forwarded-Proto headers are believed.",
    )
    shutdown_timeout_seconds: int = Field(
        8,
        ge=1,
        description="On SIGTERM, connections still open this long after the stop are closed.",
    )

    max_words: int = Field(500, ge=1, description="Most words one sample may generate.")
    max_samples: int = Field(8, ge=1, description="Most samples (n) one request may ask for.")
    max_seed_words: int = Field(
        1000, ge=1, description="Most seed words in a request (and words in a text to score)."
    )
    max_body_bytes: int = Field(65_536, ge=1_024, description="Largest request body accepted.")
    max_header_bytes: int = Field(
        16_384,
        ge=1_024,
        description="Largest request headers accepted (all lines together); past it the "
        "connection is refused (431) while the headers are still arriving.",
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A connection whose request line and headers are not complete this long "
        "after its first byte (or after it opened) is closed, with a 408 if a byte came.",
    )
    body_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="A connection whose request body stalls this long (no byte arrives) is "
        "closed, with a 408 when no response was started.",
    )
    max_pending: int = Field(
        256,
        ge=1,
        description="Requests queued or running before new ones get a 503 with Retry-After.",
    )
    engine: Literal["batched", "naive", "noop"] = Field(
        "batched",
        description="batched: continuous batching, one forward pass per step for every active "
        "row; naive: each request generates alone (the baseline, and a fallback); noop: no "
        "model, one word repeated (the load benchmark's ceiling; not for serving text).",
    )
    max_batch: int = Field(
        128, ge=1, description="Most rows (samples) the batched engine advances in one step."
    )
    quantize: Literal["off", "int8"] = Field(
        "off",
        description="int8: serve the model with int8 weights in its output layer and its "
        "LSTM (CPU only): faster steps at nearly the same bits per character, each row "
        "quantized by itself, so a random_seed gives the same words beside other requests as "
        "alone (README).",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="Threads torch uses for a model step; 0 keeps torch's default (one per "
        "core). 1 suits a machine shared with other busy processes.",
    )
    request_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="A generation still queued or running this long is dropped (504).",
    )
    session_ttl_seconds: float = Field(
        3600.0, gt=0, description="A session ends this long after its last use."
    )
    max_sessions: int = Field(
        1000, ge=1, description="Sessions kept at once; the least recently used goes first."
    )
    session_max_words: int = Field(2000, ge=1, description="Most words one session may hold.")
    session_store: Literal["memory", "redis"] = Field(
        "memory",
        description="memory: sessions live in this process; redis: in Redis at redis_url, "
        "shared by every replica.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="The Redis server of session_store=redis."
    )

    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (comma-separated or a "
        "JSON list).",
    )
    # Before api_keys: its validator adds the file's keys.
    api_keys_file: Path | None = Field(
        None,
        description="A file of API keys, one a line (blank lines and # comments ignored), "
        "added to api_keys.",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="When set, model endpoints need 'Authorization: Bearer KEY' or 'X-API-Key'.",
    )
    rate_limit: str | None = Field(
        None,
        description="Requests each API key (without one, each client address) may make, in "
        "the notation of the limits package: '60/minute', '10/second;100/minute'. Unset: no "
        "limit. /healthz, /readyz and /metrics are never limited.",
    )

    @field_validator("cors_origins", "api_keys", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("api_keys_file")
    @classmethod
    def _api_keys_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_key_file(value)  # a bad file is an error of this setting
        return value

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, value: list[SecretStr], info: ValidationInfo) -> list[SecretStr]:
        key_file = info.data.get("api_keys_file")  # absent when it failed its own check
        keys = [*value, *(read_key_file(key_file) if key_file else [])]
        for key in keys:
            text = key.get_secret_value()
            if not text or any(c.isspace() for c in text):
                raise ValueError("an API key must not be empty or hold spaces")
        # A key given twice (in the environment and the file, say) is checked once.
        return list({key.get_secret_value(): key for key in keys}.values())

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if any(item.amount < 1 for item in parse_many(value)):  # ValueError when unparsable
            raise ValueError("each limit must allow at least 1 request")
        return value

    @field_validator("model_dir")
    @classmethod
    def _one_model_source(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "models_dir" not in info.data:  # models_dir itself was refused
            return value
        given = info.data["models_dir"] is not None
        if value is None and not given:
            raise ValueError("set a run folder (or --models-dir for a folder of run folders)")
        if value is not None and given:
            raise ValueError("set a run folder or a models folder (--models-dir), not both")
        return value

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not value.startswith("/"):
            raise ValueError("must start with '/' (for example /textgen)")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return value.strip().lower()
