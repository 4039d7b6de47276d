"""Signed, expiring tokens for what the pages hand out: statement links, admin sessions, CSRF tokens.

A token is `base64url(json payload).base64url(hmac-sha256)`. Each use signs with its own key derived
from the one secret (`purpose`), so a statement link can never pass as an admin session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson

from .config import Settings


class BadSignature(Exception):
    """The token was not made by this proxy (or for this purpose), or is malformed."""


class Expired(BadSignature):
    """The token is genuine but its time is up."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def pages_secret(settings: Settings) -> bytes:
    """`PAGES_SECRET`; else derived from `JWT_SECRET` (stable across restarts and workers); else random.

    A random secret lives as long as the process: links and sessions it signed die with it.
    """
    if settings.pages_secret:
        return settings.pages_secret.encode()
    if settings.jwt_secret:
        return hmac.new(settings.jwt_secret.encode(), b"quota-sidecar pages", hashlib.sha256).digest()
    return secrets.token_bytes(32)


class Signer:
    def __init__(self, secret: bytes, purpose: str, clock: Callable[[], float] = time.time) -> None:
        self._key = hmac.new(secret, purpose.encode(), hashlib.sha256).digest()
        self._clock = clock

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())

    def sign(self, data: dict[str, Any], ttl_seconds: float) -> str:
        body = _b64(orjson.dumps({**data, "exp": int(self._clock() + ttl_seconds)}))
        return f"{body}.{self._mac(body)}"

    def verify(self, token: str) -> dict[str, Any]:
        body, _, mac = token.partition(".")
        # compare_digest raises TypeError on str with non-ASCII characters; as bytes, they are just wrong.
        if not body or not hmac.compare_digest(mac.encode(), self._mac(body).encode()):
            raise BadSignature("not signed by this proxy")
        try:
            data = orjson.loads(_unb64(body))
        except ValueError as exc:  # binascii.Error and orjson's errors are ValueErrors
            raise BadSignature("malformed") from exc
        if not isinstance(data, dict) or not isinstance(data.get("exp"), int):
            raise BadSignature("malformed")
        if data["exp"] <= self._clock():
            raise Expired("expired")
        return data
