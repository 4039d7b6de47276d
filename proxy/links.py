"""The statement links: signed, read-only, short-lived, naming a user; and the cookie a link or a sign-in
is traded for on `/me`. The relay puts one at the end of its notices and refusals."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from .auth import Identity
from .config import Settings
from .signing import BadSignature, Signer, pages_secret

MAX_TOKEN = 8192  # longer is no token this proxy made, nor an API token worth reading


class StatementLinks:
    """Signs and reads the statement links (and the cookie a link or a sign-in is traded for)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.signer = Signer(pages_secret(settings), "statement", clock)
        self.ttl = settings.statement_link_ttl_days * 86400
        self._clock = clock

    def token(self, identity: Identity, ttl: float) -> str:
        data: dict[str, Any] = {"u": identity.user}
        if identity.tenant:
            data["t"] = identity.tenant
        if identity.groups:
            data["g"] = list(identity.groups)
        return self.signer.sign(data, ttl)

    def read(self, token: str) -> tuple[Identity, int]:
        """The identity a token names and when it expires; BadSignature (or Expired) otherwise."""
        if len(token) > MAX_TOKEN:
            raise BadSignature("too long")
        data = self.signer.verify(token)
        user, tenant, groups = data.get("u"), data.get("t"), data.get("g", [])
        if not isinstance(user, str) or not isinstance(tenant, str | None) or not isinstance(groups, list):
            raise BadSignature("malformed")
        return Identity(user, tenant, groups=tuple(str(g) for g in groups)), int(data["exp"])

    def base(self, request: Request) -> str:
        """Where people reach the proxy: PUBLIC_URL, else the address this request came to."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        return str(request.base_url).rstrip("/")

    def url(self, identity: Identity, base: str) -> str | None:
        """The statement link for `identity`, or None when links are off (STATEMENT_LINK_TTL_DAYS=0)."""
        if self.ttl <= 0:
            return None
        return f"{base}/me?s={self.token(identity, self.ttl)}"

    def remaining(self, expires: int) -> int:
        return max(int(expires - self._clock()), 0)
