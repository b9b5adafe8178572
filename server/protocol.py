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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


def _refuse(name: str, value, neutral) -> None:
    if value is not None and value != neutral:
        raise ValueError(f"{name}={value!r} is not supported by treespec (only {neutral!r})")


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


class CompletionRequest(_Strict):
    """OpenAI's legacy completions request, plus treespec's top_k/drafter/k_max and vLLM's repetition_penalty."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]  # text or token ids; one prompt
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
    drafter: str | None = None
    k_max: int | None = Field(None, ge=1, le=MAX_K)
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and all(isinstance(t, int) for t in v):
            return v  # one prompt, as token ids
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError(f"exactly one prompt is supported, got a list of {len(v)}")
            return v[0]
        return v

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
        if self.n > 1 and self.stream:
            raise ValueError(f"n={self.n} is not supported with stream (stream one completion per request)")
        _refuse("best_of", self.best_of, 1)
        return self

    def sampling_temperature(self) -> float:
        # OpenAI's default temperature is 1 (sampling); 0 is greedy.
        return 1.0 if self.temperature is None else self.temperature


# ---------------------------------------------------------------- responses


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


class Speculative(BaseModel):
    drafter: str
    verify_steps: int
    draft_tokens: int
    accepted_tokens: int
    acceptance_rate: float
    mean_accepted_length: float
    accepted_per_position: list[int]
    drafted_per_position: list[int]
    model_handbacks: int
    skipped_proposals: int
    guess_tokens: int
    accepted_guesses: int


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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


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
