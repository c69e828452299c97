"""A small but faithful OpenID Connect provider for tests (never for production).

A real HTTP server (uvicorn in a thread, on 127.0.0.1) with discovery, ``/authorize`` (which
approves the configured test user at once), ``/token`` (checks the client's id and secret, the
code, its redirect URI and the PKCE S256 verifier; codes are single use) and ``/jwks``. The ID
token is RS256 with ``iss``, ``aud``, ``sub``, ``nonce``, ``exp`` and ``iat``.

Set :attr:`OidcProvider.misbehave` to make it lie, one way per test:

    "issuer"            the ID token's ``iss`` is another provider
    "audience"          the ID token is for another client
    "expired"           the ID token expired an hour ago
    "signature"         signed with a key that is not in the JWKS (same ``kid``)
    "nonce"             the ID token carries another nonce
    "alg-none"          an unsigned token (``alg: none``)
    "hs256"             HS256 keyed with the public key (the algorithm-confusion attack)
    "discovery-issuer"  the discovery document names another issuer
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import urllib.parse
from typing import Self

import uvicorn
from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from synth.net import free_port, wait_port

MISBEHAVIOURS = ("issuer", "audience", "expired", "signature", "nonce", "alg-none", "hs256", "discovery-issuer")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class OidcProvider:
    """The provider; use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(self, client_id: str = "corelab-portal", client_secret: str = "provider-secret-42",
                 subject: str = "sub-123"):
        self.client_id, self.client_secret, self.subject = client_id, client_secret, subject
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.key = RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig", "alg": "RS256"})
        self.misbehave: str = ""
        self.codes: dict[str, dict] = {}
        self.authorize_requests: list[dict] = []  # what the client sent to /authorize
        self.token_requests: list[dict] = []  # what /token saw and decided
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Self:
        app = Starlette(routes=[
            Route("/.well-known/openid-configuration", self._discovery),
            Route("/authorize", self._authorize),
            Route("/token", self._token, methods=["POST"]),
            Route("/jwks", self._jwks),
        ])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="oidc-provider", daemon=True)
        self._thread.start()
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- endpoints ---------------------------------------------------------------------------------
    async def _discovery(self, request: Request):
        return JSONResponse({
            "issuer": "http://evil.example" if self.misbehave == "discovery-issuer" else self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "profile", "email"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256"],
            "grant_types_supported": ["authorization_code"],
        })

    async def _jwks(self, request: Request):
        return JSONResponse({"keys": [self.key.as_dict(private=False)]})

    async def _authorize(self, request: Request):
        q = dict(request.query_params)
        self.authorize_requests.append(q)
        redirect_uri = q.get("redirect_uri", "")
        if q.get("client_id") != self.client_id or not redirect_uri.startswith(("http://", "https://")):
            # Never redirect to an unchecked URI: answer here, as a real provider does.
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        if (q.get("response_type") != "code" or "openid" not in q.get("scope", "").split()
                or q.get("code_challenge_method") != "S256" or not q.get("code_challenge")):
            return self._back(redirect_uri, error="invalid_request", state=q.get("state", ""))
        code = secrets.token_urlsafe(24)
        self.codes[code] = {"client_id": self.client_id, "redirect_uri": redirect_uri, "nonce": q.get("nonce"),
                            "challenge": q["code_challenge"], "sub": self.subject, "at": time.time()}
        return self._back(redirect_uri, code=code, state=q.get("state", ""))

    @staticmethod
    def _back(redirect_uri: str, **params) -> RedirectResponse:
        sep = "&" if "?" in redirect_uri else "?"
        return RedirectResponse(redirect_uri + sep + urllib.parse.urlencode(params), status_code=302)

    def _client_of(self, request: Request, form) -> tuple[str, str, str]:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            raw = base64.b64decode(auth[6:]).decode()
            cid, _, secret = raw.partition(":")
            return urllib.parse.unquote_plus(cid), urllib.parse.unquote_plus(secret), "client_secret_basic"
        return form.get("client_id", ""), form.get("client_secret", ""), "client_secret_post"

    async def _token(self, request: Request):
        form = await request.form()
        cid, secret, method = self._client_of(request, form)
        seen = {"method": method, "client_id": cid, "ok": False}
        self.token_requests.append(seen)

        def refuse(error: str, status: int = 400):
            seen["error"] = error
            return JSONResponse({"error": error}, status_code=status)

        if cid != self.client_id or not hmac.compare_digest(secret, self.client_secret):
            return refuse("invalid_client", 401)
        if form.get("grant_type") != "authorization_code":
            return refuse("unsupported_grant_type")
        grant = self.codes.pop(form.get("code", ""), None)  # single use, even when refused below
        if grant is None or time.time() - grant["at"] > 60 or grant["client_id"] != cid:
            return refuse("invalid_grant")
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return refuse("invalid_grant")
        verifier = form.get("code_verifier", "")
        if not verifier or _b64(hashlib.sha256(verifier.encode()).digest()) != grant["challenge"]:
            return refuse("invalid_grant")
        seen["ok"] = True
        return JSONResponse({"access_token": secrets.token_urlsafe(24), "token_type": "Bearer", "expires_in": 300,
                             "id_token": self._id_token(grant)}, headers={"Cache-Control": "no-store"})

    def _id_token(self, grant: dict) -> str:
        now, bad = int(time.time()), self.misbehave
        claims = {"iss": "http://evil.example" if bad == "issuer" else self.issuer,
                  "aud": "someone-else" if bad == "audience" else self.client_id,
                  "sub": grant["sub"], "nonce": "a-nonce-from-elsewhere" if bad == "nonce" else grant["nonce"],
                  "iat": now - 7200 if bad == "expired" else now,
                  "exp": now - 3600 if bad == "expired" else now + 300,
                  "auth_time": now, "email": f"{grant['sub']}@hospital.example"}
        header = {"alg": "RS256", "kid": "k1", "typ": "JWT"}
        if bad == "signature":
            other = RSAKey.generate_key(2048, parameters={"kid": "k1"})
            return jwt.encode(header, claims, other, algorithms=["RS256"])
        if bad in ("alg-none", "hs256"):
            head = {"alg": "none" if bad == "alg-none" else "HS256", "kid": "k1", "typ": "JWT"}
            signing_input = f"{_b64(json.dumps(head).encode())}.{_b64(json.dumps(claims).encode())}"
            public_pem = self.key.as_pem(private=False)
            mac = b"" if bad == "alg-none" else hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
            return f"{signing_input}.{_b64(mac)}"
        return jwt.encode(header, claims, self.key, algorithms=["RS256"])
