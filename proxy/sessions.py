"""Admin sessions for the dashboard: signed in with an admin token or a one-time link, kept in a signed cookie.

The cookie is `base64(payload).hmac` (signing.py), HttpOnly, SameSite=Strict, Secure under an https
PUBLIC_URL, scoped to /admin, and expires with the session (ADMIN_SESSION_TTL_SECONDS, and never after
the token it was opened with). Every form that changes something carries a CSRF token signed for the
session's id; the sign-in form carries one tied to a nonce cookie. Links, sessions and CSRF tokens are
signed each for its own purpose, so none can pass for another (nor for a statement link).
A one-time link is remembered as used in Redis (SET NX until it expires): it opens one session only. A
session signed out is remembered as ended in Redis until it would have expired, so a copy of its cookie
is refused too.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from .auth import Authenticator, token_expiry
from .config import Settings
from .errors import Forbidden, ServiceUnavailable
from .signing import BadSignature, Signer, pages_secret

log = structlog.get_logger("proxy.sessions")

COOKIE = "quota_admin"
_ENDED = "quota:admin-session-ended:"
NONCE_COOKIE = "quota_admin_nonce"
NONCE_SECONDS = 3600  # the sign-in form works this long after it was shown
_MAX = 8192  # longer is no token or cookie this proxy made


class LinkUsed(BadSignature):
    """The one-time link opened a session already."""


@dataclass(frozen=True, slots=True)
class Session:
    admin: str  # who: the token's user, or the name `admin link --name` gave
    sid: str  # the session's random id, which its CSRF tokens name
    expires: int
    via: str  # token | link


class AdminSessions:
    def __init__(
        self,
        settings: Settings,
        auth: Authenticator,
        secret: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        secret = secret if secret is not None else pages_secret(settings)
        self.settings = settings
        self._auth = auth
        self._clock = clock
        self._session = Signer(secret, "admin-session", clock)
        self._csrf = Signer(secret, "admin-csrf", clock)
        self._sign_in = Signer(secret, "admin-sign-in", clock)
        self._link = Signer(secret, "admin-link", clock)
        self.secure = settings.public_url.startswith("https://")

    # Sessions --------------------------------------------------------------------------------------------------

    def open(self, admin: str, via: str, ttl: float) -> tuple[str, Session]:
        """A new session's cookie value, and the session."""
        ttl = max(min(ttl, self.settings.admin_session_ttl_seconds), 1)
        sid = secrets.token_urlsafe(16)
        value = self._session.sign({"a": admin, "sid": sid, "via": via}, ttl)
        return value, Session(admin, sid, int(self._clock() + ttl), via)

    def read(self, request: Request) -> Session | None:
        """The request's session; None when it has none, or one that is forged or past its time."""
        value = request.cookies.get(COOKIE)
        if not value or len(value) > _MAX:
            return None
        try:
            data = self._session.verify(value)
        except BadSignature:
            return None
        admin, sid, via = data.get("a"), data.get("sid"), data.get("via")
        if not isinstance(admin, str) or not isinstance(sid, str) or via not in ("token", "link"):
            return None
        return Session(admin, sid, int(data["exp"]), str(via))

    async def current(self, request: Request, client: redis.Redis) -> Session | None:
        """The request's session (`read`), unless it was signed out. With Redis unreachable a signed-out
        cookie is still taken until it expires: the dashboard is what admins need during an outage."""
        session = self.read(request)
        if session is None:
            return None
        try:
            ended = await client.exists(_ENDED + session.sid)
        except RedisError as exc:
            log.warning("admin_session_unchecked", error=str(exc) or exc.__class__.__name__)
            return session
        return None if ended else session

    async def end(self, session: Session, client: redis.Redis) -> None:
        """Sign the session out: refused from now on, wherever its cookie was copied to."""
        try:
            # For what the session has left by this process's clock (Redis's may differ), and a minute more.
            await client.set(_ENDED + session.sid, "1", ex=max(session.expires - int(self._clock()), 0) + 60)
        except RedisError as exc:  # the browser's cookie is cleared all the same
            log.warning("admin_session_not_ended", admin=session.admin, error=str(exc) or exc.__class__.__name__)

    async def sign_in_with_token(self, token: str) -> tuple[str, Session]:
        """A session for the holder of an admin token (Unauthorized for a bad token, Forbidden for another)."""
        principal = await self._auth.authenticate(f"Bearer {token}")
        if not principal.admin:
            raise Forbidden("This token is not an admin's: the dashboard needs a token with the admin claim.")
        expires = token_expiry(token)
        ttl = expires - self._clock() if expires is not None else 0.0
        return self.open(principal.identity.user, "token", ttl)

    def set_cookie(self, response: Response, value: str, session: Session) -> Response:
        response.set_cookie(
            COOKIE,
            value,
            max_age=max(session.expires - int(self._clock()), 1),
            path=self._path(),
            httponly=True,
            samesite="strict",
            secure=self.secure,
        )
        return response

    def clear_cookie(self, response: Response) -> Response:
        response.delete_cookie(COOKIE, path=self._path(), httponly=True, samesite="strict", secure=self.secure)
        return response

    def _path(self) -> str:
        base = urlsplit(self.settings.public_url).path.rstrip("/") if self.settings.public_url else ""
        return f"{base}/admin"

    # CSRF --------------------------------------------------------------------------------------------------

    def csrf_token(self, session: Session) -> str:
        return self._csrf.sign({"sid": session.sid}, max(session.expires - self._clock(), 1))

    def csrf_ok(self, session: Session, token: object) -> bool:
        if not isinstance(token, str) or not token or len(token) > _MAX:
            return False
        try:
            return self._csrf.verify(token).get("sid") == session.sid
        except BadSignature:
            return False

    def sign_in_nonce(self, request: Request) -> str:
        """The sign-in form's nonce: the cookie's if it has a good one, else a new one."""
        nonce = request.cookies.get(NONCE_COOKIE, "")
        return nonce if 16 <= len(nonce) <= 64 and nonce.isascii() else secrets.token_urlsafe(18)

    def sign_in_csrf(self, nonce: str) -> str:
        return self._sign_in.sign({"n": nonce}, NONCE_SECONDS)

    def sign_in_csrf_ok(self, request: Request, token: object) -> bool:
        nonce = request.cookies.get(NONCE_COOKIE)
        if not nonce or not isinstance(token, str) or len(token) > _MAX:
            return False
        try:
            return self._sign_in.verify(token).get("n") == nonce
        except BadSignature:
            return False

    def set_nonce(self, response: Response, nonce: str) -> Response:
        response.set_cookie(
            NONCE_COOKIE,
            nonce,
            max_age=NONCE_SECONDS,
            path=self._path(),
            httponly=True,
            samesite="strict",
            secure=self.secure,
        )
        return response

    # One-time links --------------------------------------------------------------------------------------------

    def link_token(self, name: str, ttl: float) -> str:
        return self._link.sign({"a": name, "jti": secrets.token_urlsafe(16)}, ttl)

    def read_link(self, token: str) -> dict[str, Any]:
        """The link's payload (BadSignature, Expired when it is not good); does not use it up."""
        if len(token) > _MAX:
            raise BadSignature("too long")
        data = self._link.verify(token)
        if not isinstance(data.get("a"), str) or not isinstance(data.get("jti"), str):
            raise BadSignature("malformed")
        return data

    async def redeem_link(self, token: str, client: redis.Redis) -> tuple[str, Session]:
        """Open a session with a one-time link, which is then used up (LinkUsed the second time)."""
        data = self.read_link(token)
        key = f"quota:admin-link:{data['jti']}"
        try:
            # Remembered until the link would have expired anyway, and a day more for clock skew.
            first = await client.set(key, str(int(self._clock())), nx=True, exat=int(data["exp"]) + 86400)
        except RedisError as exc:
            raise ServiceUnavailable(
                "One-time links cannot be checked right now (Redis is unreachable); sign in with an admin token."
            ) from exc
        if not first:
            raise LinkUsed("used already")
        return self.open(data["a"], "link", self.settings.admin_session_ttl_seconds)
