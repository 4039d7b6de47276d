"""Identity: JWKS, public-key algorithms, delegation for LibreChat's service mode, admin tokens, bad input."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import jwt
import pytest
import respx

from proxy.app import create_app
from proxy.auth import Authenticator, Identity, Principal, charged_identity
from proxy.config import Settings
from proxy.errors import BadRequest, Unauthorized
from proxy.jwks import JwksKeys

from .fake_upstream import FakeUpstream
from .helpers import JWT_SECRET, eventually, serve, token, uid
from .keys import JwksServer, KeyPair


def verify(auth: Authenticator, t: str) -> Principal:
    return asyncio.run(auth.authenticate(f"Bearer {t}"))


# --- JWKS ---------------------------------------------------------------------------------------


def test_jwks_keys_are_cached_and_refetched_only_for_a_new_kid() -> None:
    old, new = KeyPair("RS256", "k1"), KeyPair("RS256", "k2")
    idp = JwksServer(old)
    with serve(idp.app) as url:
        now = [0.0]
        jwks = JwksKeys(f"{url}/jwks", min_refresh_seconds=0.5, clock=lambda: now[0])
        auth = Authenticator(Settings(jwt_jwks_url=f"{url}/jwks"), jwks=jwks)
        for i in range(20):
            assert verify(auth, old.token(f"user-{i}")).identity.user == f"user-{i}"
        assert idp.hits == 1  # never fetched per request
        now[0] += 0.6
        idp.keys = [new]  # the provider rotates its keys
        assert verify(auth, new.token("alice")).identity.user == "alice"
        assert idp.hits == 2
        with pytest.raises(Unauthorized, match="unknown key"):
            verify(auth, old.token("mallory"))  # the retired key is gone
        with pytest.raises(Unauthorized, match="unknown key"):
            verify(auth, KeyPair("RS256", "forged").token("mallory"))
        assert idp.hits == 2  # unknown kids do not trigger more than one fetch per interval


def test_jwks_outage_keeps_the_keys_already_known() -> None:
    key = KeyPair("ES256", "k1")
    jwks = JwksKeys("https://idp.example/jwks", min_refresh_seconds=0)
    auth = Authenticator(Settings(jwt_jwks_url="https://idp.example/jwks"), jwks=jwks)
    with respx.mock(assert_all_called=True) as mock:
        route = mock.get("https://idp.example/jwks")
        route.return_value = httpx.Response(200, json={"keys": [key.jwk()]})
        assert verify(auth, key.token("alice")).identity.user == "alice"
        for failure in (httpx.Response(500), httpx.Response(200, text="<html>"), httpx.ConnectError("down")):
            route.side_effect = [failure]
            with pytest.raises(Unauthorized, match="unknown key"):
                verify(auth, KeyPair("ES256", "k9").token("bob"))
            assert verify(auth, key.token(f"carol-{time.monotonic()}")).identity.user.startswith("carol")


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_public_key_algorithms_with_a_pem(alg: str) -> None:
    key = KeyPair(alg, "k")
    auth = Authenticator(Settings(jwt_public_key=key.public_pem, jwt_algorithms=(alg,)))
    assert verify(auth, key.token("alice", tenant="acme")).identity == Identity("alice", "acme")


def test_algorithm_confusion_is_refused() -> None:
    key = KeyPair("RS256", "k")
    auth = Authenticator(Settings(jwt_public_key=key.public_pem, jwt_algorithms=("RS256",)))

    # The attacker signs HS256 with the public key as the shared secret (by hand: PyJWT refuses to).
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(b'{"sub":"admin","exp":%d}' % (time.time() + 60))
    forged = (
        signing_input + b"." + b64(hmac.new(key.public_pem.encode(), signing_input, hashlib.sha256).digest())
    ).decode()
    with pytest.raises(Unauthorized):
        verify(auth, forged)


def test_claims_are_configurable_for_existing_identity_providers() -> None:
    key = KeyPair("RS256", "k")
    settings = Settings(
        jwt_public_key=key.public_pem,
        jwt_user_claim="preferred_username",
        jwt_tenant_claim="org",
        jwt_issuer="https://keycloak/realms/acme",
        jwt_audience="librechat",
    )
    t = key.token("uuid-1", preferred_username="alice", org="acme", iss="https://keycloak/realms/acme", aud="librechat")
    assert verify(Authenticator(settings), t).identity == Identity("alice", "acme")


# --- Delegation ---------------------------------------------------------------------------------

SERVICE = Principal(Identity("librechat", "acme"), delegate=True)
PLAIN = Principal(Identity("alice"))


def test_ordinary_tokens_cannot_name_another_user() -> None:
    assert charged_identity(PLAIN, {"x-user-id": "bob"}, "carol") == Identity("alice")


def test_service_token_charges_the_user_it_names() -> None:
    named = charged_identity(SERVICE, {"x-user-id": "64f0c0ffee", "x-user-email": "bob@acme.example"}, "ignored")
    assert named == Identity("64f0c0ffee", "acme", via="librechat", email="bob@acme.example")
    assert charged_identity(SERVICE, {}, "64f0body").user == "64f0body"  # LibreChat always sends `user`


def test_an_unresolved_placeholder_never_becomes_a_user() -> None:
    headers = {"x-user-id": "{{LIBRECHAT_USER_ID}}", "x-user-email": "{{LIBRECHAT_USER_EMAIL}}"}
    assert charged_identity(SERVICE, headers, "64f0body") == Identity("64f0body", "acme", via="librechat")
    with pytest.raises(BadRequest, match="X-User-Id"):
        charged_identity(SERVICE, headers, "{{LIBRECHAT_USER_ID}}")
    assert charged_identity(SERVICE, headers, None, required=False) == SERVICE.identity  # GET /models still answers


@pytest.mark.parametrize("headers, body", [({"x-user-id": "*"}, "bob"), ({}, " * ")])
def test_a_service_cannot_name_the_default_budget_as_its_user(headers: dict[str, str], body: str) -> None:
    with pytest.raises(BadRequest, match="default budget") as info:
        charged_identity(SERVICE, headers, body)
    assert info.value.param == "X-User-Id"


# --- Over HTTP: admin API and a table of bad input ------------------------------------------------


@pytest.fixture(scope="module")
def proxy_url(base_settings: Settings, fake: FakeUpstream) -> Iterator[str]:
    settings = replace(base_settings, litellm_base_url=fake.url, max_body_bytes=32 * 1024, budget_refresh_seconds=0.2)
    with serve(create_app(settings)) as url:
        yield url


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


def test_admin_reads_any_users_usage_and_sets_budgets(proxy_url: str) -> None:
    user, admin = uid(), bearer(token(uid("admin"), quota_admin=True))
    with httpx.Client(base_url=proxy_url, timeout=10) as c:
        c.post("/v1/chat/completions", headers=bearer(token(user)), json={"model": "fake", "messages": []})
        eventually(
            lambda: c.get("/admin/usage", headers=admin, params={"user": user}).json()["totals"]["requests"] == 1
        )
        r = c.put(f"/admin/budgets/{user}", headers=admin, json={"tokens": 5000, "rpm": 10})
        assert r.status_code == 200 and r.json()["tokens"] == 5000
        eventually(lambda: c.get("/v1/quota", headers=bearer(token(user))).json()["budgets"][0]["limit"] == 5000)
        assert c.get("/v1/chat/completions", headers=bearer(token(user))).status_code == 405
        for status, kwargs in ((403, {"headers": bearer(token(user))}), (401, {})):
            assert c.get("/admin/usage", params={"user": user}, **kwargs).status_code == status
            assert c.put(f"/admin/budgets/{user}", json={"tokens": 10**9}, **kwargs).status_code == status
        assert c.put(f"/admin/budgets/{user}", headers=admin, json={"tokens": -1}).status_code == 400


NOW = int(time.time())
RSA = KeyPair("RS256", "k")
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
OK = token("table-user")


def _hs(claims: dict, secret: str = JWT_SECRET, alg: str = "HS256", headers: dict | None = None) -> str:
    return jwt.encode(claims, secret, algorithm=alg, headers=headers)


BAD = {
    # tokens -> 401
    "no authorization header": ({}, CHAT, 401),
    "bearer without a token": ({"Authorization": "Bearer"}, CHAT, 401),
    "basic auth": ({"Authorization": "Basic dXNlcjpwYXNz"}, CHAT, 401),
    "token without scheme": ({"Authorization": OK}, CHAT, 401),
    "garbage": (bearer("garbage"), CHAT, 401),
    "two segments": (bearer("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0"), CHAT, 401),
    "bad base64": (bearer("!!!.@@@.###"), CHAT, 401),
    "expired": (bearer(token("a", ttl=-3600)), CHAT, 401),
    "expired within leeway is fine, beyond is not": (bearer(token("a", ttl=-31)), CHAT, 401),
    "no exp": (bearer(_hs({"sub": "a"})), CHAT, 401),
    "exp not a number": (bearer(_hs({"sub": "a", "exp": "tomorrow"})), CHAT, 401),
    "not yet valid": (bearer(_hs({"sub": "a", "exp": NOW + 600, "nbf": NOW + 300})), CHAT, 401),
    "issued in the future": (bearer(_hs({"sub": "a", "exp": NOW + 600, "iat": NOW + 300})), CHAT, 401),
    "forged signature": (bearer(token("a", secret="not-the-secret-0123456789abcdefghij")), CHAT, 401),
    "tampered payload": (
        bearer(OK.split(".")[0] + "." + _hs({"sub": "admin", "exp": NOW + 60}).split(".")[1] + "." + OK.split(".")[2]),
        CHAT,
        401,
    ),
    "alg none": (bearer(jwt.encode({"sub": "a", "exp": NOW + 60}, None, algorithm="none")), CHAT, 401),
    "alg none, uppercase": (
        bearer(
            jwt.encode({"sub": "a", "exp": NOW + 60}, None, algorithm="none").replace(
                "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJhbGciOiJOT05FIiwidHlwIjoiSldUIn0"
            )
        ),
        CHAT,
        401,
    ),
    "HS512 when HS256 expected": (bearer(_hs({"sub": "a", "exp": NOW + 60}, alg="HS512")), CHAT, 401),
    "RS256 token": (bearer(RSA.token("a")), CHAT, 401),
    "no sub": (bearer(_hs({"exp": NOW + 60})), CHAT, 401),
    "empty sub": (bearer(_hs({"sub": "", "exp": NOW + 60})), CHAT, 401),
    "numeric sub": (bearer(_hs({"sub": 7, "exp": NOW + 60})), CHAT, 401),
    "oversized token": (bearer(_hs({"sub": "a", "exp": NOW + 60, "pad": "x" * 20_000})), CHAT, 401),
    # bodies -> 400 / 413 / 404 / 405
    "malformed json": (bearer(OK), b'{"model": "fake",', 400),
    "empty body": (bearer(OK), b"", 400),
    "json string": (bearer(OK), b'"hello"', 400),
    "json array": (bearer(OK), b"[]", 400),
    "model missing": (bearer(OK), {"messages": []}, 400),
    "model not a string": (bearer(OK), {"model": 42, "messages": []}, 400),
    "not utf-8": (bearer(OK), b"\xff\xfe{}", 400),
    "body over the limit": (
        bearer(OK),
        {"model": "fake", "messages": [{"role": "user", "content": "x" * 40_000}]},
        413,
    ),
    "delegate token naming nobody": (bearer(token("svc", quota_delegate=True)), {"model": "fake", "messages": []}, 400),
}


@pytest.mark.parametrize("headers, body, status", BAD.values(), ids=BAD.keys())
def test_bad_tokens_and_bodies(
    proxy_url: str, fake: FakeUpstream, base_settings: Settings, headers: dict, body: object, status: int
) -> None:
    assert len(BAD) >= 25
    sent = len(fake.requests)
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{proxy_url}/v1/chat/completions", headers=headers, timeout=10, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"] and "Traceback" not in r.text
    assert len(fake.requests) == sent  # nothing reached the upstream
    if status == 401:
        assert error["type"] == "authentication_error"


def test_a_librechat_b64_email_is_recorded_decoded() -> None:
    """LibreChat v0.8.8 sends non-ASCII names and emails as b64:<base64>."""
    service = Principal(Identity("svc", "acme"), delegate=True)
    email = "josé@acme.example"
    headers = {
        "x-user-id": "6650f1c2a1b2c3d4e5f60718",
        "x-user-email": "b64:" + base64.b64encode(email.encode()).decode(),
    }
    assert charged_identity(service, headers).email == email
    assert charged_identity(service, {**headers, "x-user-email": "b64:not base64!"}).email is None
