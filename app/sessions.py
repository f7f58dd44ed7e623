"""Sessions: a text's hidden state kept between requests, behind a small storage interface.

An RNN's whole context is its hidden state (a few kilobytes), so a session is that state, on
the CPU, plus the words it has seen (to show them and to lay out new text after them). Ids
come from `secrets` and cannot be guessed.

`SessionStore` is the interface the routes use; `MemorySessionStore` keeps sessions in this
process with a time-to-live from the last use and a maximum count, evicting the least recently
used. Updates are optimistic: `replace` succeeds only if the session has not changed since it
was read, so two requests racing on one session cannot silently lose a continuation.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from model_store.network import Hidden

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

    def continued(self, hidden: Hidden, words: Sequence[str]) -> Session:
        """This session after ``words`` more, ending in ``hidden``."""
        return replace(self, hidden=hidden, words=(*self.words, *words), version=self.version + 1)


class SessionStore(Protocol):
    """Where sessions live. Every method may wait (a shared store is a network call)."""

    async def create(self, hidden: Hidden, words: Sequence[str]) -> Session: ...

    async def get(self, session_id: str) -> Session | None:
        """The session, its expiry moved on; None when unknown or expired."""

    async def replace(self, session: Session) -> bool:
        """Store ``session`` if the stored one still has ``session.version - 1``; else False."""

    async def delete(self, session_id: str) -> bool: ...

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

    async def create(self, hidden: Hidden, words: Sequence[str]) -> Session:
        now = self._clock()
        self._expire(now)
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session = Session(new_session_id(), hidden, tuple(words), now, now + self.ttl_seconds)
        self._sessions[session.id] = session
        return session

    async def get(self, session_id: str) -> Session | None:
        now = self._clock()
        self._expire(now)
        session = self._sessions.get(session_id)
        if session is None:
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

    async def delete(self, session_id: str) -> bool:
        self._expire(self._clock())
        return self._sessions.pop(session_id, None) is not None

    async def close(self) -> None:
        self._sessions.clear()
