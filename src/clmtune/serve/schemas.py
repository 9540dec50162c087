"""Request and response bodies in OpenAI's shapes (the subset clmtune serves), checked by pydantic.

Requests are strict: ``"max_tokens": "5"`` is a type error (400), not silently read as 5. An OpenAI option that
clmtune does not implement (``logprobs``, ``echo``, ``presence_penalty`` ...) is a 400 when it asks for something
(a value other than null/false/0), so no request silently gets less than it asked for; other unknown fields
(``user``, ``metadata`` ...) are ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "logit_bias", "presence_penalty",
               "frequency_penalty", "tools", "tool_choice", "functions", "function_call", "response_format")


def _lone_surrogate(value, where: str = "") -> str | None:
    """Where in a parsed JSON body a string holds a lone UTF-16 surrogate (``"\\ud800"``): valid JSON, but not
    text; the tokenizer and the UTF-8 response would fail on it (HTTP 500) instead of a 400 naming the field."""
    if isinstance(value, str):
        return where or "body" if any("\ud800" <= c <= "\udfff" for c in value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _lone_surrogate(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _text_is_text(cls, data):
        where = _lone_surrogate(data)
        if where:
            raise ValueError(f"{where} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text; send "
                             "each character whole (a surrogate pair or UTF-8)")
        return data

    @model_validator(mode="after")
    def _no_unsupported_options(self):
        for name in UNSUPPORTED:
            value = (self.model_extra or {}).get(name)
            if value not in (None, False, 0, [], {}):
                raise ValueError(f"{name}={value!r} is not supported by clmtune serve; leave it out")
        return self


class SamplingRequest(_Request):
    model: StrictStr
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None
    stream: bool = False

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(SamplingRequest):
    prompt: StrictStr | list[StrictStr] = Field(min_length=1)


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class ClassifyRequest(_Request):
    model: StrictStr | None = None
    input: StrictStr | list[Union[StrictStr, dict[StrictStr, StrictStr]]] = Field(min_length=1)


# ---- responses ----
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "clmtune"
    task: str
    """clmtune's addition: the run's task (``lm`` for a plain model)."""
    labels: list[str] | None = None
    """The label set when the run classifies (it then also answers ``/v1/classify``)."""
    chat: bool = False
    """clmtune's addition: the tokenizer has a chat template, so ``/v1/chat/completions`` answers (else 400
    ``no_chat_template``)."""


class Health(BaseModel):
    """``GET /health`` (no API key needed): what the playground page needs to know before its first request."""
    status: Literal["ok"] = "ok"
    model: str
    task: str
    labels: list[str] | None = None
    chat: bool
    """Whether chat is available (see ``ModelCard.chat``); the page disables its Chat tab when not."""
    auth: bool
    queue: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Classification(BaseModel):
    index: int
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Classification]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

