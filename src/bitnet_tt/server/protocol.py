"""The OpenAI wire format: strictly validated request bodies, error bodies, and response and chunk shapes.

Chat and text completions differ only in how the prompt is read, how the generated text is wrapped and how
logprobs are laid out; `ChatFormat` and `CompletionFormat` hold those differences and `Reply` does the rest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..engine import Request, RequestOutput
from ..grammar import ANY_OBJECT
from ..sampling import SamplingParams
from ..tokenizer import ChatMessage, Tokenizer

logger = logging.getLogger("bitnet_tt.server")

MAX_WARNED_FIELDS = 256  # distinct ignored field names logged, at most
MAX_CHOICES = 16  # n: each choice holds a KV-cache slot of its own
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
    # A union type fails once per alternative, so every error is listed: together they say what is accepted.
    problems = dict.fromkeys(f"'{_dotted(e['loc'])}': {e['msg']}" for e in errors)
    return APIError(400, "Invalid request: " + "; ".join(problems), param=_dotted(first["loc"][:1]) or None)


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


# ---------------------------------------------------------------------------------------------
# Requests


class _Body(BaseModel):
    """Strict types (no "0.5" for a number, no 1 for a bool) and no NaN; unknown fields are accepted and ignored,
    as vLLM does, because real clients send fields this server cannot use. Each ignored name is logged once."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    log_name: ClassVar[str] = "request"  # names the object in the log line

    @model_validator(mode="after")
    def _ignore_unknown_fields(self):
        for name, value in (self.model_extra or {}).items():
            if (reason := _unhonourable(name, value)) is not None:
                raise APIError(400, f"'{name}': {reason}", param=name)
            _warn_ignored(self.log_name, name)
        return self


# Fields that cannot simply be ignored when set: honouring them would change the answer in ways this server
# cannot. name -> (is the value one we cannot honour, why).
_UNHONOURABLE: dict[str, tuple[Callable[[object], bool], str]] = {
    "tool_choice": (lambda v: v not in ("none", "auto"), "this server cannot call tools"),
    "function_call": (lambda v: v not in ("none", "auto"), "this server cannot call functions"),
    "modalities": (lambda v: v != ["text"], "this model answers in text only"),
    "audio": (lambda v: True, "this model answers in text only"),
    "echo": (lambda v: v is not False, "echoing the prompt is not supported"),
    "suffix": (lambda v: v != "", "a suffix (insertion) is not supported"),
    "best_of": (lambda v: v != 1, "best_of is not supported; use n"),
}
_warned: set[tuple[str, str]] = set()


def _unhonourable(name: str, value) -> str | None:
    """Why a field set to `value` cannot be honoured; None when it can be ignored (null always can)."""
    check = _UNHONOURABLE.get(name)
    return check[1] if check and value is not None and check[0](value) else None


def _warn_ignored(kind: str, name: str) -> None:
    # Bounded: clients choose the names, and must not grow the set (or the log) without end.
    if (kind, name) not in _warned and len(_warned) < MAX_WARNED_FIELDS:
        _warned.add((kind, name))
        logger.warning("ignoring the %s field '%s': this server does not use it (logged once)", kind, name)


class TextPart(_Body):
    log_name = "content part"
    type: str
    text: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        if isinstance(data, dict) and data.get("type") != "text":
            raise APIError(400, f"content parts of type {data.get('type')!r} are not supported: this model reads "
                                "text only", param="messages")
        if isinstance(data, dict) and not isinstance(data.get("text"), str):
            raise APIError(400, "a text content part needs a 'text' string", param="messages")
        return data


class ChatMessageIn(_Body):
    log_name = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None  # null only for the assistant (its tool calls are ignored)
    name: str | None = None  # accepted for compatibility; the chat format has no place for it

    @model_validator(mode="after")
    def _content_unless_assistant(self):
        if self.content is None and self.role != "assistant":
            raise APIError(400, f"a {self.role} message needs content", param="messages")
        return self

    def message(self) -> ChatMessage:
        """As the chat template sees it: developer messages are system messages (as OpenAI defines them)."""
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(part.text for part in content)
        return ChatMessage("system" if self.role == "developer" else self.role, text)


class StreamOptions(_Body):
    log_name = "stream_options"
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    log_name = "json_schema"
    name: str | None = None
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None  # the output always matches the schema: constrained decoding is strict


class ResponseFormat(_Body):
    log_name = "response_format"
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs a 'json_schema'", param="response_format")
        return self

    def schema_text(self) -> str | None:
        """The JSON schema the output must match, as JSON text; None for plain text."""
        if self.type == "json_object":
            return ANY_OBJECT
        return json.dumps(self.json_schema.schema_) if self.type == "json_schema" else None


class _GenerationRequest(_Body):
    """Fields shared by chat and text completions. Ranges are checked by SamplingParams, in one place."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None  # how many and how long: SamplingParams checks
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Beyond OpenAI's set, named as vLLM names them (clients send them with extra_body).
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    cache_prompt: bool = True  # llama.cpp's name: false prefills the whole prompt and keeps nothing for later
    logit_bias: dict[str, float] | None = None  # token id (a JSON key, so a string) -> bias
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias and not all(key.isdigit() for key in bias):
            raise ValueError("keys must be token ids")
        return bias

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_request(self) -> tuple[bool, int]:
        """(report the chosen tokens' logprobs, how many alternatives per token)."""
        raise NotImplementedError

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def choice_params(self, max_new_tokens: int) -> list[SamplingParams]:
        """One SamplingParams per choice; a seeded request seeds its choices seed, seed + 1, ... so that they
        differ from each other and repeat from run to run."""
        params = self.sampling_params(max_new_tokens)
        if params.seed is None:
            return [params] * self.n
        return [dataclasses.replace(params, seed=(params.seed + i) % 2**63) for i in range(self.n)]

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        logprobs, top_logprobs = self.logprob_request()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=stop, logprobs=logprobs,
            top_logprobs=top_logprobs, ignore_eos=self.ignore_eos, cache_prompt=self.cache_prompt,
            logit_bias={int(token): bias for token, bias in (self.logit_bias or {}).items()},
            json_schema=self.response_format.schema_text() if self.response_format else None,
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


class TokenizeRequest(_Body):
    """/tokenize as vLLM takes it (prompt or messages) and as llama.cpp's server does (content)."""

    model: str | None = None
    prompt: str | None = None
    content: str | None = None  # llama.cpp's name for the prompt
    messages: list[ChatMessageIn] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # vLLM: the BOS token (default true)
    add_special: bool | None = None  # llama.cpp: the BOS token (default false)
    add_generation_prompt: bool = True
    return_token_strs: bool = False  # vLLM: each token's text as well
    with_pieces: bool = False  # llama.cpp: tokens as {id, piece} objects

    @model_validator(mode="after")
    def _one_input(self):
        if sum(x is not None for x in (self.prompt, self.content, self.messages)) != 1:
            raise APIError(400, "send exactly one of 'prompt', 'content' or 'messages'")
        return self

    def token_ids(self, tokenizer: Tokenizer) -> list[int]:
        if self.messages is not None:
            return tokenizer.encode_chat([m.message() for m in self.messages], self.add_generation_prompt)
        add_bos = self.add_special_tokens if self.add_special_tokens is not None else (
            self.add_special if self.add_special is not None else self.prompt is not None)
        return tokenizer.encode(self.prompt if self.prompt is not None else self.content, add_bos=add_bos)

    def response(self, ids: list[int], tokenizer: Tokenizer, max_model_len: int) -> dict:
        texts = [tokenizer.token_text(i) for i in ids] if self.return_token_strs or self.with_pieces else None
        tokens = [{"id": i, "piece": t} for i, t in zip(ids, texts)] if self.with_pieces else ids
        answer = {"count": len(ids), "max_model_len": max_model_len, "tokens": tokens}
        return {**answer, "token_strs": texts} if self.return_token_strs else answer


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]

    def response(self, tokenizer: Tokenizer) -> dict:
        if any(not 0 <= t < tokenizer.vocab_size for t in self.tokens):
            raise APIError(400, f"token ids must be in [0, {tokenizer.vocab_size})", param="tokens")
        text = tokenizer.decode(self.tokens)
        return {"prompt": text, "content": text}  # vLLM's and llama.cpp's names


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
        return tokenizer.encode_chat([m.message() for m in body.messages])

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
    """The OpenAI JSON of one HTTP request: the whole completion, or its stream chunks in order. Each of its
    engine requests is one choice (n > 1: several), reported under its index."""

    def __init__(self, api: ApiFormat, reply_id: str, requests: list[Request], model: str,
                 token_text: Callable[[int], str]):
        self.api, self.id, self.requests, self.model, self.token_text = api, reply_id, requests, model, token_text
        self.created = int(time.time())
        params = requests[0].params
        self.wants_logprobs = params.logprobs or params.top_logprobs > 0
        self._index = {request.id: i for i, request in enumerate(requests)}
        self._tokens_seen = [0] * len(requests)
        self._tokens_reported = [0] * len(requests)  # tokens whose logprobs were already sent in a chunk
        self._started = [False] * len(requests)  # a chunk was sent (the first one carries the chat role)

    def completion(self) -> dict:
        """The whole reply, once every choice has finished."""
        choices = [self._choice(i, r.text, r.finish_reason, r.choices, streaming=False)
                   for i, r in enumerate(self.requests)]
        return self._envelope(self.api.object, choices, usage=self.usage())

    def chunk(self, output: RequestOutput) -> dict | None:
        """The stream chunk for an engine output: its text, the logprobs of the tokens since the last chunk,
        the finish reason on the last one. None when there is nothing to send (text held back, no logprobs)."""
        i = self._index[output.request.id]
        self._tokens_seen[i] += len(output.token_ids)
        if not (output.text or output.finished or self.wants_logprobs):
            return None
        # request.choices only grows (in the engine thread) and already holds every token seen here.
        choices = output.request.choices[self._tokens_reported[i]:self._tokens_seen[i]]
        self._tokens_reported[i] = self._tokens_seen[i]
        first, self._started[i] = not self._started[i], True
        reason = output.request.finish_reason if output.finished else None
        return self._envelope(self.api.chunk_object, [self._choice(i, output.text, reason, choices, True, first)])

    def usage_chunk(self) -> dict:
        return self._envelope(self.api.chunk_object, [], usage=self.usage())

    def usage(self) -> dict:
        """The prompt counts once, however many choices share it."""
        prompt = len(self.requests[0].prompt_ids)
        completion = sum(len(r.output_ids) for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, index: int, text: str, finish_reason: str | None, choices, streaming: bool,
                first: bool = False) -> dict:
        logprobs = self.api.logprobs(self._logprob_entries(choices)) if self.wants_logprobs else None
        return {"index": index, **self.api.content(text, streaming, first), "logprobs": logprobs,
                "finish_reason": finish_reason}

    def _logprob_entries(self, choices) -> list[LogprobEntry]:
        text = self.token_text
        return [(text(c.token_id), c.logprob, [(text(t), lp) for t, lp in c.top]) for c in choices]

    def _envelope(self, object_name: str, choices: list[dict], usage: dict | None = None) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage, "system_fingerprint": None}
