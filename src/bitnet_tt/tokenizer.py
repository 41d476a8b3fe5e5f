"""Tokenizer from a model folder, its chat template (or the BitNet 2B-4T chat format), stop ids, and UTF-8-safe
streaming decode."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

from .config import ModelConfig, TokenIds, read_json_object, read_text, validate_schema
from .errors import ConfigError, RequestError

EOT_TOKEN = "<|eot_id|>"
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
# The special tokens transformers hands a chat template by name (its special_tokens_map).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def _token_content(value):
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    return value.get("content") if isinstance(value, dict) else value


SpecialToken = Annotated[str | None, BeforeValidator(_token_content)]


class NamedTemplate(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    name: str
    template: str


class TokenizerSettings(BaseModel):
    """The fields of tokenizer_config.json that bitnet-tt reads."""

    model_config = ConfigDict(strict=True, extra="allow")
    bos_token: SpecialToken = None
    eos_token: SpecialToken = None
    unk_token: SpecialToken = None
    sep_token: SpecialToken = None
    pad_token: SpecialToken = None
    cls_token: SpecialToken = None
    mask_token: SpecialToken = None
    chat_template: str | list[NamedTemplate] | None = None  # one, or named ones of which "default" chats

    def template_tokens(self) -> dict[str, str]:
        return {name: text for name in TEMPLATE_TOKENS if (text := getattr(self, name)) is not None}

    def default_chat_template(self) -> str | None:
        if isinstance(self.chat_template, list):
            return next((t.template for t in self.chat_template if t.name == "default"), None)
        return self.chat_template


class GenerationSettings(BaseModel):
    """The fields of generation_config.json that bitnet-tt reads."""

    model_config = ConfigDict(strict=True, extra="allow")
    eos_token_id: TokenIds = []


class Tokenizer:
    def __init__(self, folder: Path, config: ModelConfig):
        folder = Path(folder)
        self._tok = _load_tokenizer(folder / "tokenizer.json")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if self.vocab_size > config.vocab_size:
            raise ConfigError(f"{folder / 'tokenizer.json'}: {self.vocab_size} tokens, more than the model's "
                              f"vocabulary of {config.vocab_size}; the tokenizer belongs to another model")
        settings = _read_settings(folder / "tokenizer_config.json", TokenizerSettings)
        bos_text = settings.bos_token
        self.bos_id = self._tok.token_to_id(bos_text) if bos_text else config.bos_token_id
        self.bos_text = bos_text or (self._tok.id_to_token(self.bos_id) if self.bos_id is not None else None)
        self.eot_id = self._tok.token_to_id(EOT_TOKEN)
        self.stop_ids = self._stop_ids(folder, config)
        source = _chat_template_source(folder, settings)
        self.chat_template = ChatTemplate(source, settings.template_tokens()) if source is not None else None

    def _stop_ids(self, folder: Path, config: ModelConfig) -> frozenset[int]:
        """End ids from config.json and generation_config.json, plus <|eot_id|>, which ends a chat turn."""
        ids = set(config.eos_token_ids)
        ids.update(_read_settings(folder / "generation_config.json", GenerationSettings).eos_token_id)
        if self.eot_id is not None:
            ids.add(self.eot_id)
        return frozenset(ids)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it: a 400 KB prompt stopped every other
        # thread, the server's event loop included, for over a second); the ids are the same.
        ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (for libraries that build their own view of the vocabulary)."""
        return self._tok.to_str()

    def decode(self, ids: list[int]) -> str:
        known = [i for i in ids if 0 <= i < self.vocab_size]  # random-weight models can emit unmapped ids
        return self._tok.decode(known, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (b" is" for the symbol "Ġis"); a token may hold part of a character."""
        text = self._tok.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode("utf-8")
        symbol = self._tok.id_to_token(token_id)
        return symbol_bytes(symbol) if symbol is not None else text.encode("utf-8")

    def token_text(self, token_id: int) -> str:
        """The text of one token as OpenAI clients show it (" is", not "Ġis"); part of a character shows as U+FFFD."""
        if self._tok.id_to_token(token_id) is None:
            return f"<unknown token {token_id}>"
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The model folder's chat template; without one, the BitNet 2B-4T format."""
        if self.chat_template is not None:
            return self.chat_template.render(messages, add_generation_prompt)
        return self._render_2b4t(messages, add_generation_prompt)

    def _render_2b4t(self, messages: list[ChatMessage], add_generation_prompt: bool) -> str:
        """One BOS, then `Role: content<|eot_id|>` per message, then `Assistant: `."""
        parts = [self.bos_text or ""]
        for message in messages:
            if message.role not in ROLES:
                raise RequestError(f"unknown chat role {message.role!r} (use system, user or assistant)")
            parts.append(f"{ROLES[message.role]}: {message.content}{EOT_TOKEN}")
        if add_generation_prompt:
            parts.append("Assistant: ")
        return "".join(parts)

    def encode_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        # The rendered text holds the special tokens it needs, so none are added (as transformers does).
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False)


class ChatTemplate:
    """A model's Jinja chat template, rendered as transformers' apply_chat_template renders it: a sandboxed
    environment with the same options, filters and globals, and the special tokens in the context."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols, _generation_tag()])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_template_error, strftime_now=lambda f: datetime.now().strftime(f))
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"the model's chat template is not valid Jinja ({exc})") from None
        self.special_tokens = special_tokens

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=[asdict(m) for m in messages], tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except TemplateError as exc:  # raise_exception() in the template, or a template bug
            raise RequestError(f"the model's chat template refused the conversation: {exc}") from None


class StreamDecoder:
    """Turns token ids into text pieces with tokenizers' DecodeStream; a piece never ends inside a multi-byte
    UTF-8 character (DecodeStream holds such tokens back until the character is whole)."""

    def __init__(self, tokenizer: Tokenizer):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._held: list[int] = []  # ids DecodeStream has not shown yet: part of a character, or special

    def add(self, token_id: int) -> str:
        piece = self._stream.step(self.tokenizer._tok, token_id)
        if piece is None:
            self._held.append(token_id)
            return ""
        self._held.clear()
        return piece

    def flush(self) -> str:
        """Whatever is held, even an incomplete character (as U+FFFD), when generation ends."""
        text, self._held = self.tokenizer.decode(self._held), []
        return text


def symbol_bytes(symbol: str) -> bytes:
    """The bytes behind a vocabulary symbol: a byte-fallback token ("<0xE2>") or byte-level BPE characters."""
    if len(symbol) == 6 and symbol.startswith("<0x") and symbol.endswith(">"):
        return bytes([int(symbol[3:5], 16)])
    to_byte = _byte_level_decoding()
    if all(ch in to_byte for ch in symbol):
        return bytes(to_byte[ch] for ch in symbol)
    return symbol.encode("utf-8")


@functools.cache
def _byte_level_decoding() -> dict[str, int]:
    """Byte-level BPE shows each byte as one printable character: printable Latin-1 bytes as themselves,
    the other bytes as the characters from U+0100 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def _chat_template_source(folder: Path, settings: TokenizerSettings) -> str | None:
    """chat_template.jinja if the folder has one, else tokenizer_config.json's chat_template, as transformers
    reads them."""
    return read_text(folder / "chat_template.jinja") or settings.default_chat_template()


def _generation_tag():
    """transformers' {% generation %}...{% endgeneration %} (it marks the assistant's tokens for training masks):
    rendered as its body."""
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationTag


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer as HFTokenizer

    text = read_text(path)
    if text is None:
        raise ConfigError(f"{path}: not found; the model folder has no tokenizer")
    try:
        return HFTokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise ConfigError(f"{path}: not a valid tokenizer ({exc})") from None


def _read_settings(path: Path, schema: type[BaseModel]):
    """An optional settings file checked against its schema; defaults when the file is absent."""
    return validate_schema(schema, read_json_object(path) or {}, str(path))
