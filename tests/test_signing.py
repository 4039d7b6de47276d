from __future__ import annotations

import pytest

from proxy.config import Settings
from proxy.signing import BadSignature, Expired, Signer, pages_secret


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_round_trip_and_expiry() -> None:
    clock = Clock()
    signer = Signer(b"k" * 32, "statement", clock)
    token = signer.sign({"user": "ana"}, ttl_seconds=60)
    assert signer.verify(token)["user"] == "ana"
    clock.now += 61
    with pytest.raises(Expired):
        signer.verify(token)


def test_purposes_do_not_mix() -> None:
    token = Signer(b"k" * 32, "statement").sign({"user": "ana"}, 60)
    with pytest.raises(BadSignature):
        Signer(b"k" * 32, "admin-session").verify(token)


@pytest.mark.parametrize("token", ["", ".", "abc", "abc.def", "e30.x", "!!!.???"])
def test_forged_or_malformed(token: str) -> None:
    with pytest.raises(BadSignature):
        Signer(b"k" * 32, "statement").verify(token)


def test_tampered_payload_is_refused() -> None:
    signer = Signer(b"k" * 32, "statement")
    body, mac = signer.sign({"user": "ana"}, 60).split(".")
    other = signer.sign({"user": "bob"}, 60).split(".")[0]
    with pytest.raises(BadSignature):
        signer.verify(f"{other}.{mac}")


def test_secret_is_explicit_or_derived_or_random() -> None:
    assert pages_secret(Settings(pages_secret="s")) == b"s"
    derived = pages_secret(Settings(jwt_secret="j"))
    assert derived == pages_secret(Settings(jwt_secret="j")) and derived != b"j"
    assert pages_secret(Settings()) != pages_secret(Settings())
