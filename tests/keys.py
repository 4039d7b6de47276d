"""Key pairs and a local JWKS server for identity tests (an identity provider in miniature)."""

from __future__ import annotations

import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class KeyPair:
    def __init__(self, kind: str, kid: str) -> None:
        self.kid = kid
        if kind == "RS256":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif kind == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
        self.alg = kind

    @property
    def public_pem(self) -> str:
        return (
            self.private.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        data: dict[str, Any] = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**data, "kid": self.kid, "use": "sig", "alg": self.alg}

    def token(self, sub: str, ttl: int = 300, **claims: Any) -> str:
        return jwt.encode(
            {"sub": sub, "exp": int(time.time()) + ttl, **claims},
            self.private,
            algorithm=self.alg,
            headers={"kid": self.kid},
        )


class JwksServer:
    """Serves the current key set at /jwks and counts how often it was fetched."""

    def __init__(self, *keys: KeyPair) -> None:
        self.keys = list(keys)
        self.hits = 0
        self.app = Starlette(routes=[Route("/jwks", self.jwks)])

    async def jwks(self, request: Request) -> JSONResponse:
        self.hits += 1
        return JSONResponse({"keys": [k.jwk() for k in self.keys]})
