"""Request and response bodies: TGI's ``/generate`` family and OpenAI's
``/v1/completions``, as pydantic models.

Requests are strict about types (``"max_new_tokens": "5"`` is a 422, not a
5), because a client that sends the wrong type has a bug it wants to hear
about. Unknown fields are ignored, so stock clients that send every field
they know keep working; known options that treespec does not implement are
refused when set to anything but their neutral value rather than silently
ignored.
"""

from __future__ import annotations

from typing import Literal
from dataclasses import fields
from typing import get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from treespec.draft.types import UNREPORTED, SamplingParams, SpecStats

MAX_STOP = 4
MAX_K = 64
MAX_SEED = 2**63 - 1
MAX_TOP_N = 5  # alternatives per token: TGI's default max_top_n_tokens, OpenAI's logprobs limit
MAX_N = 16  # completions per request (OpenAI's n)

# TGI finish reasons are ours as they are; OpenAI has only "length" and "stop".
OPENAI_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _check_stop(stop: list[str]) -> list[str]:
    if len(stop) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stop)}")
    for s in stop:
        if s == "":
            raise ValueError("stop sequences must not be empty")
    return stop


MAX_BIAS = 300  # tokens in one logit_bias, as OpenAI's limit


def _check_bias(v: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids (as JSON object keys, so strings) to values in [-100, 100]."""
    if v is None:
        return None
    if len(v) > MAX_BIAS:
        raise ValueError(f"logit_bias may name at most {MAX_BIAS} tokens, got {len(v)}")
    out = {}
    for k, b in v.items():
        if not k.strip().lstrip("-").isdigit():
            raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
        if not -100.0 <= b <= 100.0:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {b} for token {k}")
        out[int(k)] = float(b)
    return out


def _refuse(name: str, value, neutral) -> None:
    if value is not None and value != neutral:
        raise ValueError(f"{name}={value!r} is not supported by treespec (only {neutral!r})")


def _penalties(p, logit_bias: dict[int, float] | None = None) -> dict:
    """The request's penalties and logit bias that are set (None: the neutral default)."""
    out = {k: getattr(p, k) for k in ("repetition_penalty", "frequency_penalty", "presence_penalty")
           if getattr(p, k) is not None}
    if logit_bias:
        out["logit_bias"] = dict(logit_bias)
    return out


def _openai_params(req, max_new_tokens: int | None, default_max_new_tokens: int, copies: int, stop: list[str],
                   top_n: int, prompt_logprobs: bool = False) -> list[SamplingParams]:
    """One SamplingParams per choice, prompt-major (choice index = prompt * n + i),
    for ``copies`` prompts; choice i samples with seed + i when a seed is given, as vLLM does."""
    return [SamplingParams(
        max_new_tokens=default_max_new_tokens if max_new_tokens is None else max_new_tokens,
        temperature=req.sampling_temperature(), top_k=req.top_k or 0,
        top_p=1.0 if req.top_p is None else req.top_p, seed=None if req.seed is None else req.seed + i,
        stop=list(stop or []), k_max=req.k_max, top_n=top_n, prompt_logprobs=prompt_logprobs,
        **_penalties(req, req.logit_bias))
        for _ in range(copies) for i in range(req.n)]


class GenerateParameters(_Strict):
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    do_sample: bool = False
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] | None = None
    details: bool = False
    return_full_text: bool | None = None
    drafter: str | None = None
    k_max: int | None = Field(None, ge=1, le=MAX_K)
    repetition_penalty: float | None = Field(None, gt=0.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)  # not TGI's; as OpenAI's
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_N)
    decoder_input_details: bool = False
    # TGI options that stock clients send; accepted only at their neutral value.
    best_of: int | None = None
    typical_p: float | None = None
    watermark: bool | None = None
    truncate: int | None = None
    grammar: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return _check_stop(v) if v is not None else v

    @model_validator(mode="after")
    def _unsupported(self):
        _refuse("best_of", self.best_of, 1)
        _refuse("typical_p", self.typical_p, 1.0)
        _refuse("watermark", self.watermark, False)
        _refuse("truncate", self.truncate, None)
        _refuse("grammar", self.grammar, None)
        return self

    def sampling_temperature(self) -> float:
        """0 means greedy. As in TGI, setting temperature, top_k or top_p turns
        sampling on even without do_sample; temperature 0 always means greedy."""
        if self.temperature == 0.0:
            return 0.0
        sampling = self.do_sample or self.temperature is not None or bool(self.top_k) or (
            self.top_p is not None and self.top_p < 1.0)
        if not sampling:
            return 0.0
        return 1.0 if self.temperature is None else self.temperature


class GenerateRequest(_Strict):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False  # TGI accepts it on "/"; /generate and /generate_stream decide by route

    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        p = self.parameters
        return SamplingParams(
            max_new_tokens=p.max_new_tokens or default_max_new_tokens, temperature=p.sampling_temperature(),
            top_k=p.top_k or 0, top_p=1.0 if p.top_p is None else p.top_p, seed=p.seed, stop=list(p.stop or []),
            k_max=p.k_max, top_n=p.top_n_tokens or 0, prompt_logprobs=p.decoder_input_details, **_penalties(p))


class CompletionRequest(_Strict):
    """OpenAI's legacy completions request, plus treespec's top_k/drafter/k_max and vLLM's repetition_penalty."""

    model: str | None = None
    # One prompt (text or token ids) or a batch of them (a list of texts or of token-id lists).
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (with echo and logprobs)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_N)
    best_of: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)  # not OpenAI's; as vLLM's
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    drafter: str | None = None
    k_max: int | None = Field(None, ge=1, le=MAX_K)
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("the prompt list is empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt as text or as token ids."""
        v = self.prompt
        if isinstance(v, str) or all(isinstance(t, int) for t in v):
            return [v]
        return list(v)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        return _check_bias(v)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        return _check_stop([v] if isinstance(v, str) else v)

    @model_validator(mode="after")
    def _unsupported(self):
        if self.max_tokens == 0 and not (self.echo and self.logprobs is not None):
            raise ValueError("max_tokens=0 only scores the prompt: it needs echo=true and logprobs")
        _refuse("best_of", self.best_of, 1)
        if self.suffix:  # "" is what some clients send for "none"
            raise ValueError("suffix is not supported: inserting text needs a model trained for "
                             "fill-in-the-middle, which treespec's models are not")
        return self

    def sampling_temperature(self) -> float:
        # OpenAI's default temperature is 1 (sampling); 0 is greedy.
        return 1.0 if self.temperature is None else self.temperature

    def to_sampling_params(self, default_max_new_tokens: int) -> list[SamplingParams]:
        """One per choice: prompt-major, n per prompt."""
        return _openai_params(self, self.max_tokens, default_max_new_tokens, len(self.prompts()), self.stop or [],
                              self.logprobs or 0, prompt_logprobs=self.echo and self.logprobs is not None)


class ContentPart(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text: a string, or its text parts joined (as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"only text content is supported, got a {part.type!r} part")
        return "\n".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """OpenAI's chat completions request, plus treespec's top_k/drafter/k_max and vLLM's repetition_penalty."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_N)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    drafter: str | None = None
    k_max: int | None = Field(None, ge=1, le=MAX_K)
    # Known options treespec does not implement: refused unless neutral.
    tools: list | None = None
    functions: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        return _check_stop([v] if isinstance(v, str) else v)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        return _check_bias(v)

    @model_validator(mode="after")
    def _unsupported(self):
        if self.tools or self.functions:
            raise ValueError("tools and functions are not supported: the model does not call tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError(f"tool_choice={self.tool_choice!r} is not supported: the model does not call tools")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ValueError(f"response_format {self.response_format.get('type')!r} is not supported (only 'text')")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree: send one of them")
        for m in self.messages:
            m.text()  # non-text parts are a 422 here
        return self

    def sampling_temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, default_max_new_tokens: int, template_stop: list[str]) -> list[SamplingParams]:
        """One per choice; the chat template's own stop strings end every one."""
        top_n = (self.top_logprobs or 0) if self.logprobs else 0
        return _openai_params(self, self.max_new_tokens(), default_max_new_tokens, 1,
                              (self.stop or []) + template_stop, top_n)


class TokenizeRequest(_Strict):
    """vLLM's /tokenize (``prompt``, or chat ``messages`` through the template) or TGI's (``inputs``)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    inputs: str | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("prompt", "messages", "inputs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("send exactly one of prompt, messages (vLLM's shape) or inputs (TGI's)")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- responses


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


def _speculative_model() -> type[BaseModel]:
    """A response's speculative details: ``SpecStats.report()``, field for
    field, so a counter added to the stats shows up here by itself."""
    hints = get_type_hints(SpecStats)
    reported = {f.name: (hints[f.name], ...) for f in fields(SpecStats) if f.name not in UNREPORTED}
    return create_model("Speculative", **reported, acceptance_rate=(float, ...), mean_accepted_length=(float, ...))


Speculative = _speculative_model()


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None  # None for the first prompt token: nothing comes before it


class Details(BaseModel):
    finish_reason: str
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = []  # with decoder_input_details
    tokens: list[Token] | None = None
    top_tokens: list[list[Token]] = []  # with top_n_tokens: per token, the most likely ones there
    speculative: Speculative


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] = []
    generated_text: str | None = None
    details: Details | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists, one entry per token."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # None for the first prompt token (with echo)
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []  # where each token starts in the choice's text


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    speculative: Speculative | None = None  # treespec's: on the choice's last chunk or whole


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _OpenAIResponse(BaseModel):
    """What every OpenAI response and stream chunk starts with."""

    id: str
    created: int
    model: str


class CompletionResponse(_OpenAIResponse):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = []


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str
    speculative: Speculative | None = None


class ChatCompletionResponse(_OpenAIResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    speculative: Speculative | None = None


class ChatCompletionChunk(_OpenAIResponse):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "treespec"
    root: str | None = None
    max_model_len: int  # vLLM's field: the context length


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorResponse(BaseModel):
    error: str
    error_type: str


def validation_message(e: ValidationError) -> str:
    """One line per problem: ``parameters.top_p: Input should be less than or equal to 1``."""
    parts = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("function-after",))
        msg = err.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "Input validation error: " + "; ".join(parts)
