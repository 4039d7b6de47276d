import asyncio
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.auth import Authenticator, Principal, issue_token, parse_ttl
from proxy.config import Settings
from proxy.errors import Unauthorized

from .helpers import JWT_SECRET, token

SETTINGS = Settings(jwt_secret=JWT_SECRET)


def bearer(t: str) -> str:
    return f"Bearer {t}"


def verify(auth: Authenticator, header: str | None) -> Principal:
    return asyncio.run(auth.authenticate(header))


def test_valid_token_gives_user_and_tenant() -> None:
    identity = verify(Authenticator(SETTINGS), bearer(token("alice", tenant="acme"))).identity
    assert (identity.user, identity.tenant) == ("alice", "acme")


def test_issued_token_round_trips() -> None:
    t = issue_token(SETTINGS, "bob", "team", parse_ttl("2h"))
    identity = verify(Authenticator(SETTINGS), bearer(t)).identity
    assert (identity.user, identity.tenant) == ("bob", "team")
    assert jwt.decode(t, options={"verify_signature": False})["exp"] - time.time() > 7000


def _rsa_token() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, pem, algorithm="RS256")


def _none_token() -> str:
    return jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none")


BAD = {
    "missing header": (None, "missing_token"),
    "basic scheme": ("Basic YWxpY2U6eA==", "invalid_token"),
    "bearer without token": ("Bearer ", "invalid_token"),
    "not a jwt": (bearer("not-a-jwt"), "invalid_token"),
    "expired": (bearer(token("alice", ttl=-120)), "token_expired"),
    "forged signature": (bearer(token("alice", secret="someone-elses-secret-0123456789abcdef")), "invalid_token"),
    "alg none": (bearer(_none_token()), "invalid_token"),
    "rs256 when hs256 expected": (bearer(_rsa_token()), "invalid_token"),
    "no exp": (bearer(jwt.encode({"sub": "alice"}, JWT_SECRET, algorithm="HS256")), "invalid_token"),
    "no sub": (bearer(jwt.encode({"exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256")), "invalid_token"),
    "sub not a string": (bearer(jwt.encode({"sub": 42, "exp": int(time.time()) + 60}, JWT_SECRET)), "invalid_token"),
    # '*' is the default budget rows' subject: as a user its own row would be everyone's default
    "sub the default's name": (bearer(token("*")), "invalid_token"),
    "tenant the default's name": (bearer(token("alice", tenant="*")), "invalid_token"),
}


@pytest.mark.parametrize("header, code", BAD.values(), ids=BAD.keys())
def test_bad_tokens_are_401_with_a_code(header: str | None, code: str) -> None:
    with pytest.raises(Unauthorized) as info:
        verify(Authenticator(SETTINGS), header)
    assert info.value.status == 401
    assert info.value.code == code
    assert info.value.message


def test_issuer_and_audience_are_checked_when_configured() -> None:
    s = Settings(jwt_secret=JWT_SECRET, jwt_issuer="https://idp", jwt_audience="quota")
    auth = Authenticator(s)
    assert verify(auth, bearer(token("a", iss="https://idp", aud="quota"))).identity.user == "a"
    for claims in ({"iss": "https://evil", "aud": "quota"}, {"iss": "https://idp", "aud": "other"}, {}):
        with pytest.raises(Unauthorized):
            verify(auth, bearer(token("a", **claims)))


def test_cached_token_still_expires() -> None:
    t = token("alice", ttl=1)
    now = [jwt.decode(t, options={"verify_signature": False})["exp"] - 1.0]
    auth = Authenticator(Settings(jwt_secret=JWT_SECRET, jwt_leeway_seconds=0), clock=lambda: now[0])
    assert verify(auth, bearer(t)).identity.user == "alice"  # now cached
    now[0] += 1.2
    with pytest.raises(Unauthorized) as info:
        verify(auth, bearer(t))
    assert info.value.code == "token_expired"


@pytest.mark.parametrize(
    "settings",
    [
        Settings(jwt_secret="x", jwt_algorithms=("HS256", "RS256")),
        Settings(jwt_secret="x", jwt_algorithms=("none",)),
        Settings(),
    ],
)
def test_unsafe_or_incomplete_configuration_is_refused(settings: Settings) -> None:
    with pytest.raises(ValueError):
        Authenticator(settings)
