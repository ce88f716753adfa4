"""Request bodies of the OpenAI v1 routes we serve (pydantic): the fields we honour are typed and
range-checked; other OpenAI fields (user, seed, penalties...) are accepted and ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: 0.7, Vicuna's usual
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream_options: dict | None = None
    logprobs: bool | None = None  # refused when true (app.py): typed so a request asking for them is not ignored
    top_logprobs: int | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
