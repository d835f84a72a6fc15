"""Request bodies and error shapes shared by the cluster front end and the instances.

Errors are always `{"error": {"message": str, "type": str, "code": int}}` with the HTTP
status as `code`, the OpenAI shape, so one client handles both tiers.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator


def error_body(message: str, status: int, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "code": status}}


def error_response(message: str, status: int, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, status, kind), status_code=status)


def error_kind(status: int) -> str:
    """OpenAI's error `type` for an HTTP status (any other 4xx: the client's mistake)."""
    known = {401: "authentication_error", 403: "permission_error", 404: "not_found", 409: "conflict",
             429: "rate_limit_exceeded", 503: "server_error"}
    if status in known:
        return known[status]
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


class GenerateParameters(BaseModel):
    """LightLLM `/generate` parameters that CaraServe honours (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(16, ge=1)
    min_new_tokens: int = Field(1, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1
    ignore_eos: bool = False
    stop_sequences: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    presence_penalty: float = Field(0.0, ge=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0)
    repetition_penalty: float = Field(1.0, ge=1.0)
    skip_special_tokens: bool = True
    return_details: bool = False

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("top_k must be -1 (all tokens) or >= 1")
        return v


class GenerateRequest(BaseModel):
    """LightLLM `/generate` body plus `adapter` (None: base model) and `input_ids`."""

    model_config = ConfigDict(extra="forbid")
    inputs: Optional[str] = None
    input_ids: Optional[list[int]] = None
    adapter: Optional[str] = None
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    # Filled by the cluster front end for its own bookkeeping; ignored by instances.
    request_id: Optional[str] = None

    def prompt(self) -> Union[str, list[int]]:
        if (self.inputs is None) == (self.input_ids is None):
            raise ValueError("give exactly one of 'inputs' (text) or 'input_ids' (token ids)")
        if self.inputs is not None and not self.inputs:
            raise ValueError("'inputs' is empty")
        return self.inputs if self.inputs is not None else self.input_ids


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    wait_s: float = Field(0.0, ge=0.0, le=600.0, description="Wait up to this long for requests using it to end")


def validation_message(exc: Any) -> str:
    """One line per pydantic error: `field: message`."""
    parts = []
    for err in getattr(exc, "errors", lambda: [])():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or str(exc)
