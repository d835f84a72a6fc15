"""OpenAI-compatible completions and chat completions, translated to CaraServe requests.

`model` names the adapter, or the base model (its directory name, or "base"). Sampling:
`temperature` 0 is greedy, otherwise sampled (with `top_p`, `seed`); `max_tokens`; `stop`
strings are matched on the generated *text* (not tokens) by `StopMatcher`, so a stop string
that spans tokens is found and cut exactly as OpenAI does.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from caraserve_router.contracts.protocol import GenerateParameters

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: Union[str, list[int]]
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    presence_penalty: float = Field(0.0, ge=0.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=2.0)
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    ignore_eos: bool = False  # extension (LightLLM, vLLM): generate exactly max_tokens
    min_tokens: int = Field(1, ge=1)  # extension


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatCompletionRequest(CompletionRequest):
    prompt: Optional[Union[str, list[int]]] = None
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None


def unsupported(req: CompletionRequest) -> Optional[str]:
    """The first option we cannot honour, as a message for a 400."""
    if req.n != 1:
        return "n > 1 is not supported"
    if req.best_of not in (None, 1):
        return "best_of > 1 is not supported"
    if req.logprobs:
        return "logprobs are not supported"
    if req.echo:
        return "echo is not supported"
    return None


def parameters(req: CompletionRequest, default_max_tokens: int) -> GenerateParameters:
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max_tokens
    greedy = req.temperature == 0.0
    return GenerateParameters(
        max_new_tokens=max_tokens,
        min_new_tokens=min(req.min_tokens, max_tokens),
        do_sample=not greedy,
        temperature=1.0 if greedy else req.temperature,
        top_p=req.top_p,
        ignore_eos=req.ignore_eos,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
    )


def stop_list(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise ValueError("stop must be at most 4 non-empty strings")
    return stops


class StopMatcher:
    """Cuts generated text at the first stop string, holding back text that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text safe to emit now (possibly empty); sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        self.buffer += text
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.buffer = self.buffer[:cut], ""
            return out
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out
        keep = min(self.hold, len(self.buffer))
        out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class ResponseShaper:
    """Builds OpenAI response objects (completion or chat) for one request."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str, finish_reason: Optional[str], first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._base("text_completion"), "choices": [choice]}

    def final(self, text: str, finish_reason: str, usage: Usage) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            return {**self._base("chat.completion"), "choices": [choice], "usage": usage.as_dict()}
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._base("text_completion"), "choices": [choice], "usage": usage.as_dict()}
