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
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from caraserve_router.contracts.protocol import GenerateParameters

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False  # a last chunk with `usage` (and empty choices), as OpenAI sends


class CompletionRequest(BaseModel):
    """Every field OpenAI defines is declared: honoured, or refused by `unsupported` with a 400;
    any other key is refused by validation (extra="forbid"), never silently ignored."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    presence_penalty: float = Field(0.0, ge=0.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=2.0)
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    logit_bias: Optional[dict[str, float]] = None
    suffix: Optional[str] = None
    user: Optional[str] = None  # an end-user id for the caller's records; nothing to honour here
    ignore_eos: bool = False  # extension (LightLLM, vLLM): generate exactly max_tokens
    min_tokens: int = Field(1, ge=1)  # extension
    top_k: int = -1  # extension (vLLM): -1 = all tokens
    repetition_penalty: float = Field(1.0, ge=1.0)  # extension (vLLM)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: Union[str, list[ContentPart]]

    def text(self) -> str:
        """The content as one string (an array of text parts is joined, as OpenAI does)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(CompletionRequest):
    prompt: None = None
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None
    echo: None = None
    best_of: None = None
    suffix: None = None


def unsupported(req: CompletionRequest) -> Optional[str]:
    """The first option we cannot honour, as a message for a 400."""
    chat = isinstance(req, ChatCompletionRequest)
    checks = [
        (req.n != 1, "n > 1 is not supported"),
        (req.best_of not in (None, 1), "best_of > 1 is not supported"),
        (bool(req.logprobs), "logprobs are not supported"),
        (bool(req.echo), "echo is not supported"),
        (bool(req.logit_bias), "logit_bias is not supported"),
        (bool(req.suffix), "suffix is not supported"),
        (req.stream_options is not None and not req.stream, "stream_options is only allowed with stream: true"),
    ]
    if chat:
        checks += [
            (req.top_logprobs is not None, "top_logprobs is not supported"),
            (bool(req.tools) or req.tool_choice not in (None, "none"), "tools (function calling) are not supported"),
            (bool(req.functions) or req.function_call not in (None, "none"), "functions are not supported"),
            (req.parallel_tool_calls is not None, "parallel_tool_calls is not supported (no tools)"),
            (req.response_format not in (None, {"type": "text"}),
             "response_format other than {\"type\": \"text\"} (JSON mode, schemas) is not supported"),
        ]
    for bad, message in checks:
        if bad:
            return message
    return None


def single_prompt(prompt) -> Union[str, list[int]]:
    """The one prompt of a completion request; a list of several prompts is refused (one
    request per prompt), so `choices` never silently holds fewer answers than prompts."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return prompt
    if not prompt:
        raise ValueError("prompt must not be empty")
    if len(prompt) > 1:
        raise ValueError(f"a list of {len(prompt)} prompts is not supported; send one request per prompt")
    return prompt[0]


def parameters(req: CompletionRequest, default_max_tokens: int) -> GenerateParameters:
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max_tokens
    greedy = req.temperature == 0.0
    return GenerateParameters(
        max_new_tokens=max_tokens,
        top_k=req.top_k,
        repetition_penalty=req.repetition_penalty,
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

    def usage_chunk(self, usage: Usage) -> dict:
        """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage.as_dict()}

    def final(self, text: str, finish_reason: str, usage: Usage) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            return {**self._base("chat.completion"), "choices": [choice], "usage": usage.as_dict()}
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._base("text_completion"), "choices": [choice], "usage": usage.as_dict()}
