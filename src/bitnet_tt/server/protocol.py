"""The OpenAI wire format: strictly validated request bodies, error bodies, and response and chunk shapes.

Chat and text completions differ only in how the prompt is read, how the generated text is wrapped and how
logprobs are laid out; `ChatFormat` and `CompletionFormat` hold those differences and `Reply` does the rest.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..engine import Request, RequestOutput
from ..sampling import SamplingParams
from ..tokenizer import ChatMessage, Tokenizer

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


# ---------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered as OpenAI does: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    """Validate a JSON body against `model`; any problem is a 400 (FastAPI's default would be a 422)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid_request(exc.errors(include_url=False)) from None


def _invalid_request(errors: list[dict]) -> APIError:
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first['msg']})")
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "the request body must be a JSON object")
    if first["type"] == "extra_forbidden":
        name = _dotted(first["loc"])
        return APIError(400, f"Unrecognized request argument supplied: {name}", param=name)
    # A union type fails once per alternative, so every error is listed: together they say what is accepted.
    problems = dict.fromkeys(f"'{_dotted(e['loc'])}': {e['msg']}" for e in errors)
    return APIError(400, "Invalid request: " + "; ".join(problems), param=_dotted(first["loc"][:1]) or None)


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


# ---------------------------------------------------------------------------------------------
# Requests


class _Strict(BaseModel):
    # Strict: no "0.5" for a number or 1 for a bool; unknown fields are an error, as with OpenAI.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Strict):
    role: str
    content: str | list[TextPart]
    name: str | None = None  # accepted for compatibility; the chat format has no place for it

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    """Fields shared by chat and text completions. Ranges are checked by SamplingParams, in one place."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None  # how many and how long: SamplingParams checks
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Beyond OpenAI's set, named as vLLM names them (clients send them with extra_body).
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    cache_prompt: bool = True  # llama.cpp's name: false prefills the whole prompt and keeps nothing for later

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_request(self) -> tuple[bool, int]:
        """(report the chosen tokens' logprobs, how many alternatives per token)."""
        raise NotImplementedError

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        logprobs, top_logprobs = self.logprob_request()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=stop, logprobs=logprobs,
            top_logprobs=top_logprobs, ignore_eos=self.ignore_eos, cache_prompt=self.cache_prompt,
        )


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs or bool(self.top_logprobs), self.top_logprobs or 0


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int]
    max_tokens: int | None = Field(COMPLETION_DEFAULT_MAX_TOKENS, ge=1)
    logprobs: int | None = None  # alternatives per token; 0 reports only the chosen tokens

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


def completion_budget(prompt_tokens: int, requested: int | None, context: int) -> int:
    """max_new_tokens for a request: what it asked for, else the rest of the context; 400 if it cannot fit."""
    room = context - prompt_tokens
    if room < 1 or (requested is not None and requested > room):
        asked = f"{requested} completion tokens" if requested is not None else "at least 1 completion token"
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the request has "
                            f"{prompt_tokens} prompt tokens and asks for {asked}.",
                       param="max_tokens" if room >= 1 else None, code="context_length_exceeded")
    return requested if requested is not None else room


# ---------------------------------------------------------------------------------------------
# Responses

LogprobEntry = tuple[str, float, list[tuple[str, float]]]  # (token, logprob, [(alternative, logprob)])


class ChatFormat:
    request_model = ChatCompletionRequest
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    @staticmethod
    def prompt_ids(body: ChatCompletionRequest, tokenizer: Tokenizer) -> list[int]:
        return tokenizer.encode_chat([ChatMessage(m.role, m.text()) for m in body.messages])

    @staticmethod
    def content(text: str, streaming: bool, first: bool) -> dict:
        if not streaming:
            return {"message": {"role": "assistant", "content": text}}
        delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
        return {"delta": delta}

    @staticmethod
    def logprobs(entries: list[LogprobEntry]) -> dict:
        def item(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {"content": [{**item(token, logprob), "top_logprobs": [item(*alternative) for alternative in top]}
                            for token, logprob, top in entries]}


class CompletionFormat:
    request_model = CompletionRequest
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"

    @staticmethod
    def prompt_ids(body: CompletionRequest, tokenizer: Tokenizer) -> list[int]:
        return tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt

    @staticmethod
    def content(text: str, streaming: bool, first: bool) -> dict:
        return {"text": text}

    @staticmethod
    def logprobs(entries: list[LogprobEntry]) -> dict:
        return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [dict(top) for _, _, top in entries]}


ApiFormat = type[ChatFormat] | type[CompletionFormat]


def new_request_id(api: ApiFormat) -> str:
    return api.id_prefix + uuid.uuid4().hex


class Reply:
    """The OpenAI JSON of one request: the whole completion, or its stream chunks in order."""

    def __init__(self, api: ApiFormat, request: Request, model: str, token_text: Callable[[int], str]):
        self.api, self.request, self.model, self.token_text = api, request, model, token_text
        self.created = int(time.time())
        self.wants_logprobs = request.params.logprobs or request.params.top_logprobs > 0
        self._tokens_seen = 0
        self._tokens_reported = 0  # tokens whose logprobs were already sent in a chunk
        self._started = False  # a chunk was sent (the first one carries the chat role)

    def completion(self) -> dict:
        """The whole reply, once the request has finished."""
        choice = self._choice(self.request.text, self.request.finish_reason, self.request.choices, streaming=False)
        return self._envelope(self.api.object, [choice], usage=self.usage())

    def chunk(self, output: RequestOutput) -> dict | None:
        """The stream chunk for an engine output: its text, the logprobs of the tokens since the last chunk,
        the finish reason on the last one. None when there is nothing to send (text held back, no logprobs)."""
        self._tokens_seen += len(output.token_ids)
        if not (output.text or output.finished or self.wants_logprobs):
            return None
        # request.choices only grows (in the engine thread) and already holds every token seen here.
        choices = self.request.choices[self._tokens_reported:self._tokens_seen]
        self._tokens_reported = self._tokens_seen
        first, self._started = not self._started, True
        reason = self.request.finish_reason if output.finished else None
        return self._envelope(self.api.chunk_object, [self._choice(output.text, reason, choices, True, first)])

    def usage_chunk(self) -> dict:
        return self._envelope(self.api.chunk_object, [], usage=self.usage())

    def usage(self) -> dict:
        prompt, completion = len(self.request.prompt_ids), len(self.request.output_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, text: str, finish_reason: str | None, choices, streaming: bool, first: bool = False) -> dict:
        logprobs = self.api.logprobs(self._logprob_entries(choices)) if self.wants_logprobs else None
        return {"index": 0, **self.api.content(text, streaming, first), "logprobs": logprobs,
                "finish_reason": finish_reason}

    def _logprob_entries(self, choices) -> list[LogprobEntry]:
        text = self.token_text
        return [(text(c.token_id), c.logprob, [(text(t), lp) for t, lp in c.top]) for c in choices]

    def _envelope(self, object_name: str, choices: list[dict], usage: dict | None = None) -> dict:
        return {"id": self.request.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage, "system_fingerprint": None}
