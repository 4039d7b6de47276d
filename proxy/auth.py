"""Who is calling: verify the bearer JWT, and find the user a request is charged to."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from .config import DEFAULT_SUBJECT, Settings
from .errors import BadRequest, Unauthorized
from .jwks import JwksKeys

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
MAX_TOKEN_BYTES = 16 * 1024
_CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Identity:
    """The user a request is charged to."""

    user: str
    tenant: str | None = None
    via: str | None = None  # the service token that sent it on the user's behalf
    email: str | None = None
    groups: tuple[str, ...] = ()  # from the identity provider: budget tiers (the most generous group row applies)


@dataclass(frozen=True, slots=True)
class Principal:
    """The holder of the token."""

    identity: Identity
    admin: bool = False
    delegate: bool = False  # may name the end user (X-User-Id, or the body's `user`)


# A token's time claims as PyJWT checks them; past this a number is no time at all (10**400 overflows a float).
_MAX_TIME = 2**53
_ID_MAX = 256


def _flag(claims: dict[str, Any], name: str) -> bool:
    """A boolean claim: only JSON true grants it; any other value but false or absence refuses the token."""
    value = claims.get(name, False)
    if not isinstance(value, bool):
        raise Unauthorized(f"Invalid token: claim '{name}' must be true or false.", code="invalid_token")
    return value


def _id_claim(claims: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = claims.get(name)
    if value is None or (value == "" and not required):
        if required:
            raise Unauthorized(f"Token has no '{name}' claim naming the user.", code="invalid_token")
        return None
    if not isinstance(value, str) or not value or len(value) > _ID_MAX or not value.isprintable():
        raise Unauthorized(
            f"Invalid token: claim '{name}' must be printable text of 1 to {_ID_MAX} characters.", code="invalid_token"
        )
    if value == DEFAULT_SUBJECT:
        raise Unauthorized(f"Invalid token: claim '{name}' is '*', the default budget's name.", code="invalid_token")
    return value


_GROUPS_MAX = 64


def _groups(value: Any) -> tuple[str, ...]:
    """A groups claim: a list of group names (absent or null: none). Sorted, so one set is one identity."""
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or len(value) > _GROUPS_MAX
        or not all(isinstance(g, str) and 0 < len(g) <= _ID_MAX and g.isprintable() for g in value)
    ):
        raise Unauthorized(
            f"Invalid token: the groups claim must be a list of at most {_GROUPS_MAX} group names.",
            code="invalid_token",
        )
    return tuple(sorted(set(value)))


def header_groups(value: str | None) -> tuple[str, ...]:
    """`X-User-Groups: eng, support` from a delegating service (LibreChat can fill it from its user's role)."""
    text = _header_text(value)
    if not text:
        return ()
    names = {g.strip() for g in text.split(",")} - {""}
    usable = {g for g in names if len(g) <= _ID_MAX and g.isprintable() and "{{" not in g}
    return tuple(sorted(usable))[:_GROUPS_MAX]


def _check_times(claims: dict[str, Any]) -> None:
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -_MAX_TIME < value < _MAX_TIME:
            raise Unauthorized(f"Invalid token: claim '{name}' must be a number of seconds.", code="invalid_token")


def default_algorithms(settings: Settings) -> tuple[str, ...]:
    if settings.jwt_algorithms:
        return settings.jwt_algorithms
    return ("HS256",) if settings.jwt_secret else ("RS256", "ES256", "EdDSA")


class Authenticator:
    """Verifies tokens against an explicit algorithm list; `alg: none` is never in it.

    Verified tokens are cached until they expire, so a chat's many requests pay the
    signature check once. `clock` is the time both the cache and the token's time claims are
    judged by (tests pass a fake one).
    """

    def __init__(
        self, settings: Settings, jwks: JwksKeys | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._algorithms = list(default_algorithms(settings))
        if "none" in (a.lower() for a in self._algorithms):
            raise ValueError("JWT_ALGORITHMS must not contain 'none'")
        hmac = [a for a in self._algorithms if a in HMAC_ALGORITHMS]
        # One key type per verifier: accepting both a shared secret and a public key is what
        # algorithm-confusion attacks exploit.
        if hmac and len(hmac) != len(self._algorithms):
            raise ValueError("JWT_ALGORITHMS mixes HMAC and public-key algorithms")
        self._key: str = settings.jwt_secret if hmac else settings.jwt_public_key
        self._jwks = jwks if jwks is not None or hmac or not settings.jwt_jwks_url else JwksKeys(settings.jwt_jwks_url)
        if not self._key and self._jwks is None:
            raise ValueError("set JWT_SECRET (HS*), or JWT_PUBLIC_KEY or JWT_JWKS_URL (RS*/ES*/EdDSA)")
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized("Missing bearer token: send 'Authorization: Bearer <token>'.", code="missing_token")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Malformed Authorization header: expected 'Bearer <token>'.", code="invalid_token")
        cached = self._cache.get(token)
        if cached is not None:
            if cached[1] > self._clock():
                return cached[0]
            del self._cache[token]
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthorized("Token is too large.", code="invalid_token")
        key = self._key or await self._jwks_key(token)
        principal, expires = self._verify(token, key)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (principal, expires)
        return principal

    async def _jwks_key(self, token: str) -> Any:
        assert self._jwks is not None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"Invalid token: {exc}.", code="invalid_token") from None
        if header.get("alg") not in self._algorithms:
            raise Unauthorized(f"Invalid token: algorithm {header.get('alg')!r} is not allowed.", code="invalid_token")
        kid = header.get("kid")
        return (await self._jwks.key(kid if isinstance(kid, str) else None)).key

    def _verify(self, token: str, key: Any) -> tuple[Principal, float]:
        s = self._settings
        try:
            _check_times(jwt.decode(token, key, algorithms=self._algorithms, options={"verify_signature": False}))
            claims = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                issuer=s.jwt_issuer or None,
                audience=s.jwt_audience or None,
                leeway=s.jwt_leeway_seconds,
                options={"require": ["exp"], "verify_aud": bool(s.jwt_audience)},
            )
            # PyJWT judged the times by the wall clock; expiry is judged by this clock too, the one the cache
            # of verified tokens runs on (tests move it forward instead of sleeping).
            if claims["exp"] <= self._clock() - s.jwt_leeway_seconds:
                raise jwt.ExpiredSignatureError("Signature has expired")
        except jwt.ExpiredSignatureError:
            raise Unauthorized("Token expired: ask your administrator for a new one.", code="token_expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"Invalid token: {exc}.", code="invalid_token") from None
        user = _id_claim(claims, s.jwt_user_claim, required=True)
        assert user is not None
        principal = Principal(
            Identity(
                user=user,
                tenant=_id_claim(claims, s.jwt_tenant_claim, required=False),
                groups=_groups(claims.get(s.jwt_groups_claim)),
            ),
            admin=_flag(claims, s.jwt_admin_claim),
            delegate=_flag(claims, s.jwt_delegate_claim),
        )
        return principal, float(claims["exp"])


def _header_text(value: str | None) -> str | None:
    """A header value as the UTF-8 its sender wrote (ASGI servers hand headers over as latin-1), so
    `X-User-Id: josé` names the same user as a body's `"user": "josé"`."""
    if value is None:
        return None
    try:
        if value.startswith("b64:"):  # LibreChat v0.8.8 sends non-ASCII names and emails base64-encoded
            return base64.b64decode(value[4:], validate=True).decode("utf-8")
        return value if value.isascii() else value.encode("latin-1").decode("utf-8")
    except (UnicodeError, binascii.Error):
        return None


def _named_user(value: Any) -> str | None:
    """A usable end-user id, or None. A `{{…}}` placeholder LibreChat left unresolved is never one."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or len(text) > 256 or "{{" in text or "}}" in text or not text.isprintable():
        return None
    return text


def charged_identity(
    principal: Principal, headers: Mapping[str, str], body_user: Any = None, *, required: bool = True
) -> Identity:
    """The user a request is charged to: the token's own, or for a delegating service token the
    end user it names (`X-User-Id`, else the body's `user`). Other tokens cannot name anyone."""
    if not principal.delegate:
        return principal.identity
    user = _named_user(_header_text(headers.get("x-user-id"))) or _named_user(body_user)
    if user == DEFAULT_SUBJECT:
        raise BadRequest("The end user named is '*', the default budget's name, not a user.", param="X-User-Id")
    if user is None:
        if not required:
            return principal.identity
        raise BadRequest(
            "This service token acts for end users: send the user in 'X-User-Id' (LibreChat: "
            "headers: {X-User-Id: '{{LIBRECHAT_USER_ID}}'}) or the body's 'user' field.",
            code="missing_user",
        )
    service = principal.identity
    return Identity(
        user=user,
        tenant=service.tenant,
        via=service.user,
        email=_named_user(_header_text(headers.get("x-user-email"))),
        groups=header_groups(headers.get("x-user-groups")),
    )


def token_expiry(token: str) -> float | None:
    """When a token that `Authenticator.authenticate` accepted expires: what a session opened with it must
    not outlive. (Read without checking the signature again; only for a token already verified.)"""
    expires = jwt.decode(token, options={"verify_signature": False}).get("exp")
    return float(expires) if isinstance(expires, (int, float)) and not isinstance(expires, bool) else None


def parse_ttl(text: str) -> int:
    """'90s', '15m', '12h', '30d' or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def issue_token(
    settings: Settings,
    sub: str,
    tenant: str | None = None,
    ttl_seconds: int = 30 * 86400,
    *,
    admin: bool = False,
    delegate: bool = False,
) -> str:
    """Mint an HMAC token with the configured secret (for `token issue` and the demo)."""
    if not settings.jwt_secret:
        raise ValueError(
            "JWT_SECRET is not set (token issue mints HMAC tokens; tokens of an identity provider come from it)"
        )
    if DEFAULT_SUBJECT in (sub, tenant):
        raise ValueError("'*' is the default budget's name, not a user's or a tenant's (the token would be refused)")
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + ttl_seconds}
    claims[settings.jwt_user_claim] = sub
    if tenant:
        claims[settings.jwt_tenant_claim] = tenant
    if admin:
        claims[settings.jwt_admin_claim] = True
    if delegate:
        claims[settings.jwt_delegate_claim] = True
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    algorithm = next((a for a in default_algorithms(settings) if a in HMAC_ALGORITHMS), "HS256")
    return jwt.encode(claims, settings.jwt_secret, algorithm=algorithm)
