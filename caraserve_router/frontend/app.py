"""The front end's ASGI application: its routes, the guards in front of them, and one error
shape (OpenAI's `{"error": {"message", "type", "code"}}`) for every error of every route."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from caraserve_router.contracts.protocol import error_kind, validation_message
from caraserve_router.frontend import routes_admin, routes_instances, routes_lightllm, routes_openai
from caraserve_router.frontend.guards import Guard
from caraserve_router.frontend.relay import fail

log = logging.getLogger("caraserve.api")


def build_app(front):
    """The FastAPI app wrapped in the Guard (API key, body limit, surrogates)."""
    app = FastAPI(title="CaraServe", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return fail(front, validation_message(exc), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # 404 (no such route), 405 (wrong method) and the like, in the same shape as ours
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        response = fail(front, message, exc.status_code, error_kind(exc.status_code))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return fail(front, f"internal error: {type(exc).__name__}", 500, "server_error")

    for module in (routes_openai, routes_lightllm, routes_admin, routes_instances):
        app.include_router(module.router(front))
    return Guard(app, front.config.max_body_bytes, front.config.api_key)
