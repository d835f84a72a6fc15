"""What keeps an instance closed to everyone but its front end: a per-cluster key, and the
directories adapters may be loaded from.

The front end generates the key (or takes `CARASERVE_INSTANCE_KEY` from its environment) and
hands it to every instance through the environment, never the command line (which any user of
the host can read in `ps`). An instance then answers every route but `/health` and `/metrics`
(read-only; probes and scrapers carry no key, as with vLLM) only with `Authorization: Bearer KEY`.
An instance started without a key serves loopback only.

Pure Python, no FastAPI: imported by the instance (`lightllm_patches`) and the front end.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets

INSTANCE_KEY_ENV = "CARASERVE_INSTANCE_KEY"
OPEN_PATHS = ("/health", "/metrics")


def new_key() -> str:
    return secrets.token_urlsafe(32)


def auth_headers(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def confined_path(path: str, roots: list[str]) -> str:
    """`path` resolved (symlinks too) if it lies under one of `roots`; else ValueError with a
    message that says nothing about the path itself: not whether it exists, nor the cwd."""
    if not os.path.isabs(path):
        raise ValueError("lora_path must be an absolute path")
    if not roots:
        raise ValueError("loading adapters at run time is disabled: no adapter root is configured "
                         "(--adapter-roots, or --adapters)")
    real = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(root)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return real
    raise ValueError("lora_path is not under an allowed adapter root (--adapter-roots)")


class InstanceAuth:
    """ASGI middleware: 401 on every route but OPEN_PATHS without the right bearer key."""

    def __init__(self, app, key: str):
        if not key:
            raise ValueError("InstanceAuth needs a non-empty key")
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        got = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if hmac.compare_digest(got, self.expected):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {"message": "missing or wrong instance key (the front end's "
                                     f"{INSTANCE_KEY_ENV})", "type": "authentication_error", "code": 401}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
