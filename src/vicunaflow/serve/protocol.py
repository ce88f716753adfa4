"""Request bodies of the OpenAI v1 routes we serve (pydantic): the fields we honour are typed and
range-checked; OpenAI's, FastChat's and vLLM's fields we do not implement are refused (400 naming the field) when
their value would change the answer (UNSUPPORTED), accepted at their neutral value; others (user...) are ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def text_of_a_text_part(self) -> ContentPart:
        """A text part without its text (e.g. {"type": "text", "content": "..."}) was read as "" and answered as
        an empty message; OpenAI refuses it too."""
        if self.type == "text" and self.text is None:
            raise ValueError('a text part needs its text: {"type": "text", "text": "..."}')
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def content_unless_assistant(self) -> ChatMessage:
        """Only an assistant message may leave out its content (OpenAI's rule: one that called tools)."""
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs its content (a string or a list of parts), not null")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    """OpenAI's stream_options, typed: a string "false" must not read as true (other keys, e.g. vLLM's
    continuous_usage_stats, are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None  # true: a last chunk with no choices and the usage, as OpenAI's


# field -> (is its value neutral, what the answer would lack): the fields clients commonly send that this server
# does not implement. Ignoring them answered a request for JSON, tools, a penalty or a bias without it, unsaid; their
# neutral values (what clients such as LangChain send by default) are accepted.
UNSUPPORTED = {
    "presence_penalty": (lambda v: not v, "penalties are not implemented"),
    "frequency_penalty": (lambda v: not v, "penalties are not implemented"),
    "repetition_penalty": (lambda v: v in (None, 1), "penalties are not implemented"),
    "logit_bias": (lambda v: not v, "token biases are not implemented"),
    "response_format": (
        lambda v: not v or (isinstance(v, dict) and v.get("type") in (None, "text")),
        "only text replies are made, no JSON mode or schema",
    ),
    "tools": (lambda v: not v, "this model calls no tools"),
    "functions": (lambda v: not v, "this model calls no functions"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "this model calls no tools"),
    "function_call": (lambda v: v in (None, "none", "auto"), "this model calls no functions"),
    "stop_token_ids": (lambda v: not v, "give stop strings in `stop` instead"),
    "min_p": (lambda v: not v, "min-p sampling is not implemented; top_p and top_k are"),
    "use_beam_search": (lambda v: not v, "beam search is not implemented"),
    "best_of": (lambda v: v in (None, 1), "every choice is returned: use n"),
    "suffix": (lambda v: not v, "insertion, a suffix after the completion, is not implemented"),
}


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    # finite: NaN (json.dumps writes it) was refused as "should be less than or equal to 2", which misled
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)  # None: 0.7, Vicuna's usual
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extra parameter: keep generating past EOS until max_tokens (load benchmarks: every reply the same length)
    ignore_eos: bool = False
    # FastChat's and vLLM's: the k most likely tokens only; -1 (FastChat's default), 0 or None: all
    top_k: int | None = Field(None, ge=-1)
    # vLLM's, not implemented: refused unless 0 (app.py's `sampling`), since ignoring it would end a reply sooner
    # than asked, unsaid
    min_tokens: int | None = None
    # the same prompt, parameters and seed give the same reply, whatever else the server runs (n > 1: choice i
    # is seeded with seed + i, so the choices differ). 64 bits, as OpenAI's and vLLM's: the sampler keeps a seed's
    # low 64 bits, so a larger one would silently give another seed's reply (2**64 that of 0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    # UNSUPPORTED's fields: refused unless neutral (any type, so that the message says what is not supported)
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    stop_token_ids: Any = None
    min_p: Any = None
    use_beam_search: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def neutral_or_refused(cls, value, info):
        neutral, why = UNSUPPORTED[info.field_name]
        if not neutral(value):
            raise ValueError(f"{info.field_name} is not supported ({why}); leave it out")  # no value: user text
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None  # true: each reply token's log-probability (choices[].logprobs.content)
    top_logprobs: int | None = Field(None, ge=0, le=20)  # and this many alternatives (needs logprobs: true)


class CompletionRequest(SamplingFields):
    # text, texts (a batch), token ids, or lists of token ids (a batch; lm-evaluation-harness sends these):
    # ids are used as given (no BOS added), text gets BOS as every prompt of this server
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: no reply (with echo: the prompt's logprobs only)
    echo: bool = False  # the reply starts with the prompt (and, with logprobs, the prompt tokens' logprobs)
    logprobs: int | None = Field(None, ge=0, le=20)  # each token's logprob and this many alternatives
