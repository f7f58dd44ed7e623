"""API keys: the key a request presents, and whom it identifies.

A caller is known by the fingerprint of its key (`key_fingerprint`), never the key itself.
The API-key dependency (``app/deps.py``) and the rate limiter (``app/ratelimit.py``), which
runs before any route, read keys with these functions; this module imports no model code, so
that the middleware does not load the engine (and torch) to read a header.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence

from fastapi.security.utils import get_authorization_scheme_param
from pydantic import SecretStr


def key_fingerprint(key: str) -> str:
    """The caller's name wherever it is kept (session owners, rate-limit counts): a digest, so
    that no store or log holds a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries, read as `require_api_key` reads it: ``X-API-Key``, else an
    ``Authorization: Bearer`` token."""
    if key := headers.get("x-api-key"):
        return key
    scheme, token = get_authorization_scheme_param(headers.get("authorization"))
    return token if scheme.lower() == "bearer" and token else None


def key_owner(keys: Sequence[SecretStr], presented: str | None) -> str | None:
    """The fingerprint of ``presented`` when it is one of ``keys``; else None."""
    if presented is None:
        return None
    given = presented.encode()
    # Compare with every key, in constant time, so timing tells nothing about them.
    matches = [secrets.compare_digest(given, key.get_secret_value().encode()) for key in keys]
    return key_fingerprint(presented) if any(matches) else None
