"""Async HTTP client of one instance (the cluster front end's only way to talk to it).

Every call has a timeout; a connection failure before the first streamed token raises
`InstanceUnavailable` (the request can go elsewhere), after it `InstanceFailed` (the request
ends with a clear error).
"""
from __future__ import annotations

from typing import AsyncIterator, Optional

import aiohttp

from caraserve_router.contracts import sse


class InstanceError(RuntimeError):
    """The instance answered with an HTTP error; `status` and `body` say what."""

    def __init__(self, status: int, body: dict):
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        super().__init__(message or f"instance answered HTTP {status}")
        self.status = status
        self.body = body


class InstanceUnavailable(RuntimeError):
    """Could not reach the instance (nothing was started there)."""


class InstanceFailed(RuntimeError):
    """The instance went away in the middle of a request."""


class InstanceClient:
    def __init__(self, url: str, session: aiohttp.ClientSession, request_timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.session = session
        self.request_timeout_s = request_timeout_s

    async def _json(self, method: str, path: str, body: Optional[dict] = None, timeout_s: float = 30.0):
        try:
            async with self.session.request(method, self.url + path, json=body,
                                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                data = await resp.json(content_type=None)
                if resp.status >= 400:
                    raise InstanceError(resp.status, data)
                return data
        except (aiohttp.ClientConnectionError, TimeoutError) as e:
            raise InstanceUnavailable(f"{self.url}{path}: {type(e).__name__}: {e}") from e

    async def health(self, timeout_s: float = 3.0) -> bool:
        try:
            await self._json("GET", "/health", timeout_s=timeout_s)
            return True
        except (InstanceUnavailable, InstanceError, aiohttp.ClientError, ValueError):
            return False

    async def stats(self) -> dict:
        return await self._json("GET", "/stats", timeout_s=10.0)

    async def models(self) -> dict:
        return await self._json("GET", "/v1/models")

    async def load_adapter(self, name: str, path: str) -> dict:
        return await self._json("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path},
                                timeout_s=120.0)

    async def unload_adapter(self, name: str, wait_s: float = 0.0) -> dict:
        return await self._json("POST", "/v1/unload_lora_adapter", {"lora_name": name, "wait_s": wait_s},
                                timeout_s=wait_s + 30.0)

    async def samples(self, clear: bool = False) -> list:
        return await self._json("GET", f"/step_samples?clear={int(clear)}")

    async def generate_stream(self, body: dict) -> AsyncIterator[dict]:
        """Yield the instance's stream events (dicts); raise as the class docs say.

        A consumer that stops early (its client left, shutdown, migration) closes the
        connection at once, which is how the instance learns to abort the request; aiohttp's
        `async with` would instead wait for the instance to finish the whole stream."""
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s, sock_connect=5.0)
        started = False
        resp = None
        finished = False
        try:
            resp = await self.session.post(self.url + "/generate_stream", json=body, timeout=timeout)
            if resp.status >= 400:
                raise InstanceError(resp.status, await resp.json(content_type=None))
            async for raw in resp.content:
                event = sse.parse_event(raw)
                if event is None:
                    continue
                started = True
                if event.get("finished") or "error" in event:
                    finished = True
                yield event
                if finished:
                    return
            raise aiohttp.ServerDisconnectedError("stream ended before the request finished")
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
            if started:
                raise InstanceFailed(f"instance {self.url} failed mid-request: {type(e).__name__}: {e}") from e
            raise InstanceUnavailable(f"instance {self.url} unreachable: {type(e).__name__}: {e}") from e
        finally:
            if resp is not None:
                if finished:
                    resp.release()  # read to the end: the connection can be reused
                else:
                    resp.close()    # abandoned: drop the connection now, never wait for the rest
