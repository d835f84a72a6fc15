"""The front end's FastAPI application: its routes and one error shape for all of them."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError

from caraserve_router.contracts.protocol import validation_message
from caraserve_router.frontend import routes_admin, routes_lightllm, routes_openai
from caraserve_router.frontend.relay import fail


def build_app(front) -> FastAPI:
    app = FastAPI(title="CaraServe")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return fail(front, validation_message(exc), 400)

    for module in (routes_openai, routes_lightllm, routes_admin):
        app.include_router(module.router(front))
    return app
