"""Sessions: a text's hidden state kept between requests, behind a small storage interface.

An RNN's whole context is its hidden state (a few kilobytes), so a session is that state, on
the CPU, plus the words it has seen (to show them, to lay out new text after them, and for the
repetition controls and a model's text cache). Ids come from `secrets` and cannot be guessed.

`SessionStore` is the interface the routes use; `MemorySessionStore` keeps sessions in this
process with a time-to-live from the last use and a maximum count, evicting the least recently
used; `RedisSessionStore` keeps them in Redis, shared by several replicas behind a proxy.
Updates are optimistic: `replace` succeeds only if the session has not changed since it was
read, so two requests racing on one session cannot silently lose a continuation.

A session belongs to the API key that created it: it records the key's fingerprint as its
``owner`` (None without keys), and `get` and `delete` see it only for that same owner, so to
any other key it is as unknown as a session that never existed.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import safetensors.torch

from app.errors import ApiError, StartupError
from model_store.network import Hidden, hidden_from_tensors, hidden_to_tensors

if TYPE_CHECKING:
    from redis.asyncio import Redis

Clock = Callable[[], float]


def new_session_id() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Session:
    id: str
    hidden: Hidden  # on the CPU: (layers, 1, H), or (h, c) for an LSTM
    words: tuple[str, ...]
    created: float  # seconds since the epoch
    expires: float  # seconds since the epoch; moved on by each use
    version: int = 0
    owner: str | None = None  # the fingerprint of the creator's API key

    def continued(self, hidden: Hidden, words: Sequence[str]) -> Session:
        """This session after ``words`` more, ending in ``hidden``."""
        return replace(self, hidden=hidden, words=(*self.words, *words), version=self.version + 1)


class SessionStore(Protocol):
    """Where sessions live. Every method may wait (a shared store is a network call)."""

    async def create(
        self, hidden: Hidden, words: Sequence[str], owner: str | None = None
    ) -> Session: ...

    async def get(self, session_id: str, owner: str | None = None) -> Session | None:
        """The session, its expiry moved on; None when unknown, expired or someone else's."""

    async def replace(self, session: Session) -> bool:
        """Store ``session`` if the stored one still has ``session.version - 1``; else False."""

    async def delete(self, session_id: str, owner: str | None = None) -> bool:
        """End the session if it is ``owner``'s; False when unknown, expired or someone else's."""

    async def close(self) -> None: ...


class MemorySessionStore:
    """Sessions in this process: TTL from the last use, at most ``max_sessions`` (LRU)."""

    def __init__(self, ttl_seconds: float, max_sessions: int, clock: Clock = time.time) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._sessions)

    def _expire(self, now: float) -> None:
        # With one TTL, the least recently used session is also the first to expire.
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.expires > now:
                break
            del self._sessions[oldest.id]

    async def create(
        self, hidden: Hidden, words: Sequence[str], owner: str | None = None
    ) -> Session:
        now = self._clock()
        self._expire(now)
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session = Session(
            new_session_id(), hidden, tuple(words), now, now + self.ttl_seconds, owner=owner
        )
        self._sessions[session.id] = session
        return session

    async def get(self, session_id: str, owner: str | None = None) -> Session | None:
        now = self._clock()
        self._expire(now)
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            return None
        session = replace(session, expires=now + self.ttl_seconds)
        self._sessions[session_id] = session
        self._sessions.move_to_end(session_id)
        return session

    async def replace(self, session: Session) -> bool:
        now = self._clock()
        self._expire(now)
        stored = self._sessions.get(session.id)
        if stored is None or stored.version != session.version - 1:
            return False
        self._sessions[session.id] = replace(session, expires=now + self.ttl_seconds)
        self._sessions.move_to_end(session.id)
        return True

    async def delete(self, session_id: str, owner: str | None = None) -> bool:
        self._expire(self._clock())
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            return False
        del self._sessions[session_id]
        return True

    async def close(self) -> None:
        self._sessions.clear()


class ForeignSessionError(ApiError):
    """A shared session written by a replica that serves another model (409)."""

    def __init__(self, session_id: str, model: str) -> None:
        super().__init__(
            409,
            f"session {session_id!r} belongs to model {model!r}, not the one this server runs; "
            "continue it on a replica that serves that model, or create a new session",
            [("session_id", "created with another model")],
        )


# Store ``fields`` only if the session still has version ARGV[1]; then reset its TTL.
_REPLACE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'words', ARGV[3], 'hidden', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

# Delete the session only if its owner is ARGV[1] ('' for a session without one).
_DELETE_SCRIPT = """
if (redis.call('HGET', KEYS[1], 'owner') or '') ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


class RedisSessionStore:
    """Sessions in Redis, shared by every replica: one hash per session with its expiry.

    A session's hidden state is stored as safetensors bytes (never pickled) with the id of the
    model that made it; a replica serving another model refuses it with a 409. Redis bounds the
    count (``maxmemory`` with a ``volatile-lru`` policy evicts the least recently used); the TTL
    is renewed by every use.

    Format 2 adds the ``owner`` field. A session without an owner is still written as format
    1, which replicas of the previous release read as before; an owned one is format 2, which
    they refuse (409) rather than show to any key.
    """

    FORMAT = "1"
    OWNED_FORMAT = "2"

    def __init__(
        self,
        client: Redis,
        ttl_seconds: float,
        model_id: str,
        prefix: str = "wordrnn:",
        clock: Clock = time.time,
    ) -> None:
        self._redis = client
        self.ttl_seconds = ttl_seconds
        self.model_id = model_id
        self._prefix = prefix
        self._clock = clock
        self._replace = client.register_script(_REPLACE_SCRIPT)
        self._delete = client.register_script(_DELETE_SCRIPT)

    @classmethod
    def from_url(cls, url: str, ttl_seconds: float, model_id: str) -> RedisSessionStore:
        try:
            from redis.asyncio import Redis
        except ImportError:
            raise StartupError(
                "session_store=redis needs the redis package: pip install 'wordrnn[redis]'"
            ) from None
        return cls(Redis.from_url(url, socket_timeout=5), ttl_seconds, model_id)

    async def ping(self) -> None:
        """Raise StartupError unless the server answers (called at start-up)."""
        from redis.exceptions import RedisError

        try:
            await self._redis.ping()
        except RedisError as exc:
            raise StartupError(f"session store: cannot reach Redis ({exc})") from None

    def _key(self, session_id: str) -> str:
        return f"{self._prefix}session:{session_id}"

    @property
    def _ttl(self) -> int:
        return max(1, math.ceil(self.ttl_seconds))

    async def create(
        self, hidden: Hidden, words: Sequence[str], owner: str | None = None
    ) -> Session:
        now = self._clock()
        session = Session(
            new_session_id(), hidden, tuple(words), now, now + self.ttl_seconds, owner=owner
        )
        fields = {
            "format": self.FORMAT,
            "model": self.model_id,
            "created": repr(now),
            "version": "0",
            "words": json.dumps(session.words),
            "hidden": _hidden_bytes(hidden),
        }
        if owner is not None:
            fields.update(format=self.OWNED_FORMAT, owner=owner)
        async with _unavailable_on_error(), self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(session.id), mapping=fields)
            pipe.expire(self._key(session.id), self._ttl)
            await pipe.execute()
        return session

    async def get(self, session_id: str, owner: str | None = None) -> Session | None:
        key = self._key(session_id)
        async with _unavailable_on_error():
            stored = await self._redis.hgetall(key)
        if not stored:
            return None
        fields = {k.decode(): v for k, v in stored.items()}
        stored_owner = fields["owner"].decode() if "owner" in fields else None
        if stored_owner != owner:  # before the model check: tell another key nothing
            return None
        model = fields.get("model", b"").decode()
        known = (self.FORMAT, self.OWNED_FORMAT)
        if fields.get("format", b"").decode() not in known or model != self.model_id:
            raise ForeignSessionError(session_id, model)
        async with _unavailable_on_error():  # a use by its owner moves its expiry on
            await self._redis.expire(key, self._ttl)
        return Session(
            id=session_id,
            hidden=_hidden_from_bytes(fields["hidden"]),
            words=tuple(json.loads(fields["words"])),
            created=float(fields["created"]),
            expires=self._clock() + self.ttl_seconds,
            version=int(fields["version"]),
            owner=stored_owner,
        )

    async def replace(self, session: Session) -> bool:
        async with _unavailable_on_error():
            done = await self._replace(
                keys=[self._key(session.id)],
                args=[
                    str(session.version - 1),
                    str(session.version),
                    json.dumps(session.words),
                    _hidden_bytes(session.hidden),
                    self._ttl,
                ],
            )
        return bool(done)

    async def delete(self, session_id: str, owner: str | None = None) -> bool:
        async with _unavailable_on_error():
            done = await self._delete(keys=[self._key(session_id)], args=[owner or ""])
        return bool(done)

    async def close(self) -> None:
        await self._redis.aclose()


@contextlib.asynccontextmanager
async def _unavailable_on_error() -> AsyncIterator[None]:
    """A Redis outage is a 503 the client may retry, never a 500."""
    from redis.exceptions import RedisError

    try:
        yield
    except RedisError as exc:
        raise ApiError(
            503,
            f"the session store is unavailable ({type(exc).__name__}); retry shortly",
            headers={"Retry-After": "1"},
        ) from exc


def _hidden_bytes(hidden: Hidden) -> bytes:
    return safetensors.torch.save(hidden_to_tensors(hidden))


def _hidden_from_bytes(data: bytes) -> Hidden:
    return hidden_from_tensors(safetensors.torch.load(data))
