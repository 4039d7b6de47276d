"""The pages and the alerts against a hostile caller: a user with a valid token, a curious admin, someone who
got hold of a link. Each test is a finding that once failed (see the commit that fixed it).

A real proxy (the app served by uvicorn on a loopback port) against the test PostgreSQL and Redis; alerts
through the real notifier to a receiver on a loopback port.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import httpx
import pytest

from proxy.app import create_app
from proxy.config import Settings
from proxy.sessions import NONCE_COOKIE

from .helpers import serve, token, uid

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture(scope="module")
def settings(base_settings: Settings) -> Settings:
    return replace(base_settings, budget_refresh_seconds=3600, ledger_stream=f"test:hostile:{uid()}")


@pytest.fixture(scope="module")
def url(settings: Settings) -> Iterator[str]:
    with serve(create_app(settings)) as base:
        yield base


def admin_token(name: str = "") -> str:
    return token(name or uid("admin"), quota_admin=True)


@contextmanager
def signed_in(url: str) -> Iterator[httpx.Client]:
    """A client with a dashboard session opened through the sign-in form."""
    with httpx.Client(base_url=url, timeout=20) as client:
        found = _CSRF.search(client.get("/admin/sign-in").text)
        assert found is not None
        r = client.post("/admin/sign-in", data={"token": admin_token(), "csrf": found.group(1)})
        assert r.status_code == 303, r.text
        yield client


def csrf_of(client: httpx.Client, path: str) -> str:
    found = _CSRF.search(client.get(path).text)
    assert found is not None
    return found.group(1)


# --- Signed values that are not ASCII: a 500 for anyone, without a token ---------------------------------------


def test_a_signed_value_with_non_ascii_characters_is_refused_not_a_crash(url: str) -> None:
    """hmac.compare_digest raises TypeError on str with non-ASCII characters: a link, a cookie or a CSRF field
    holding one made every signed value's check a 500."""
    bad = "eyJ1IjoiYm9iIn0.é"
    latin = "eyJ1IjoiYm9iIn0.\xe9".encode("latin-1")  # a cookie as a browser may send it: raw bytes
    with httpx.Client(base_url=url, timeout=20) as c:
        assert c.get("/me", params={"s": bad}).status_code == 403
        assert c.get("/me", headers={"Cookie": b"quota_statement=" + latin}).status_code == 200  # the sign-in form
        assert c.get("/me/usage.csv", headers={"Cookie": b"quota_statement=" + latin}).status_code == 401
        assert c.get("/admin", headers={"Cookie": b"quota_admin=" + latin}).status_code == 401
        assert c.get("/admin/users.json", headers={"Cookie": b"quota_admin=" + latin}).status_code == 401
        assert c.get("/admin/link", params={"t": bad}).status_code == 403
        assert c.post("/admin/link", data={"t": bad}).status_code == 403
        r = c.post("/admin/sign-in", data={"csrf": bad, "token": "x"}, headers={"Cookie": f"{NONCE_COOKIE}={'n' * 24}"})
        assert r.status_code == 403
    with signed_in(url) as admin:
        r = admin.post("/admin/user/budget", data={"csrf": bad, "id": uid(), "tokens": "5", "period": "month"})
        assert r.status_code == 403 and "CSRF" in r.text
        assert admin.post("/admin/sign-out", data={"csrf": bad}).status_code == 403
        assert admin.get("/admin").status_code == 200  # still signed in
