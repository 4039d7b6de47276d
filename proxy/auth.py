"""Who is calling: verify the bearer JWT and turn its claims into an Identity."""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from .config import Settings
from .errors import Unauthorized

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    tenant: str | None = None


class Authenticator:
    """Verifies tokens against an explicit algorithm list; `alg: none` is never in it.

    Verified tokens are cached until they expire, so a chat's many requests pay the
    signature check once.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._algorithms = list(settings.jwt_algorithms)
        if "none" in (a.lower() for a in self._algorithms):
            raise ValueError("JWT_ALGORITHMS must not contain 'none'")
        hmac = [a for a in self._algorithms if a in HMAC_ALGORITHMS]
        asym = [a for a in self._algorithms if a not in HMAC_ALGORITHMS]
        # One key type per verifier: mixing a shared secret and a public key in one
        # list is what algorithm-confusion attacks exploit.
        if hmac and asym:
            raise ValueError("JWT_ALGORITHMS mixes HMAC and public-key algorithms")
        self._key: str = settings.jwt_secret if hmac else settings.jwt_public_key
        if not self._key:
            raise ValueError("JWT_SECRET (HS*) or JWT_PUBLIC_KEY (RS*/ES*/EdDSA) must be set")
        self._cache: dict[str, tuple[Identity, float]] = {}

    def authenticate(self, authorization: str | None) -> Identity:
        if not authorization:
            raise Unauthorized("Missing bearer token: send 'Authorization: Bearer <token>'.", code="missing_token")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Malformed Authorization header: expected 'Bearer <token>'.", code="invalid_token")
        cached = self._cache.get(token)
        if cached is not None:
            if cached[1] > time.time():
                return cached[0]
            del self._cache[token]
        identity, expires = self._verify(token)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (identity, expires)
        return identity

    def _verify(self, token: str) -> tuple[Identity, float]:
        s = self._settings
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                issuer=s.jwt_issuer or None,
                audience=s.jwt_audience or None,
                leeway=s.jwt_leeway_seconds,
                options={"require": ["exp"], "verify_aud": bool(s.jwt_audience)},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("Token expired: ask your administrator for a new one.", code="token_expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"Invalid token: {exc}.", code="invalid_token") from None
        user = claims.get(s.jwt_user_claim)
        if not isinstance(user, str) or not user:
            raise Unauthorized(f"Token has no '{s.jwt_user_claim}' claim naming the user.", code="invalid_token")
        tenant = claims.get(s.jwt_tenant_claim)
        identity = Identity(user=user, tenant=tenant if isinstance(tenant, str) and tenant else None)
        return identity, float(claims["exp"])


def parse_ttl(text: str) -> int:
    """'90s', '15m', '12h', '30d' or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def issue_token(settings: Settings, sub: str, tenant: str | None = None, ttl_seconds: int = 30 * 86400) -> str:
    """Mint an HS256 token with the configured secret (for `token issue` and the demo)."""
    if not settings.jwt_secret:
        raise ValueError("JWT_SECRET is not set")
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + ttl_seconds}
    claims[settings.jwt_user_claim] = sub
    if tenant:
        claims[settings.jwt_tenant_claim] = tenant
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    algorithm = next((a for a in settings.jwt_algorithms if a in HMAC_ALGORITHMS), "HS256")
    return jwt.encode(claims, settings.jwt_secret, algorithm=algorithm)
