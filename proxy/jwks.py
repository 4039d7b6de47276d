"""An identity provider's signing keys (JWKS), cached; fetched again only for a key id not seen yet."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import jwt
import structlog

from .errors import Unauthorized

log = structlog.get_logger("proxy.jwks")


class JwksKeys:
    def __init__(
        self,
        url: str,
        *,
        min_refresh_seconds: float = 10.0,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._min_refresh = min_refresh_seconds
        self._client = client
        self._clock = clock  # monotonic, so setting the wall clock cannot stall or hurry refetches; tests pass a fake
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        found = self._lookup(kid)
        if found is not None:
            return found
        # An unknown kid means the provider rotated its keys, or a forged token: fetch again, but at most
        # once every `min_refresh_seconds`, so forged tokens cannot turn into a flood of fetches.
        async with self._lock:
            found = self._lookup(kid)
            if found is None and self._clock() - self._fetched_at >= self._min_refresh:
                await self.refresh()
                found = self._lookup(kid)
        if found is None:
            raise Unauthorized(f"Token signed with an unknown key (kid {kid!r}).", code="invalid_token")
        return found

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def refresh(self) -> None:
        self._fetched_at = self._clock()
        try:
            client = self._client or httpx.AsyncClient(timeout=5)
            try:
                response = await client.get(self._url)
                response.raise_for_status()
                keys = jwt.PyJWKSet.from_dict(response.json()).keys
            finally:
                if self._client is None:
                    await client.aclose()
        except (httpx.HTTPError, ValueError, jwt.PyJWKSetError) as exc:
            log.warning("jwks_fetch_failed", url=self._url, error=str(exc) or exc.__class__.__name__)
            return  # keep the keys we had
        self._keys = {k.key_id or f"#{i}": k for i, k in enumerate(keys)}
        log.info("jwks_loaded", url=self._url, kids=list(self._keys))
