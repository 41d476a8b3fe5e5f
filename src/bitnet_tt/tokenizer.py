"""Tokenizer from a model folder, the BitNet 2B-4T chat format, stop ids, and UTF-8-safe streaming decode."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

from .config import ModelConfig, TokenIds, read_json_object, read_text, validate_schema
from .errors import ConfigError, RequestError

EOT_TOKEN = "<|eot_id|>"
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def _token_content(value):
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    return value.get("content") if isinstance(value, dict) else value


class TokenizerSettings(BaseModel):
    """The fields of tokenizer_config.json that bitnet-tt reads."""

    model_config = ConfigDict(strict=True, extra="allow")
    bos_token: Annotated[str | None, BeforeValidator(_token_content)] = None


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
        bos_text = _read_settings(folder / "tokenizer_config.json", TokenizerSettings).bos_token
        self.bos_id = self._tok.token_to_id(bos_text) if bos_text else config.bos_token_id
        self.bos_text = bos_text or (self._tok.id_to_token(self.bos_id) if self.bos_id is not None else None)
        self.eot_id = self._tok.token_to_id(EOT_TOKEN)
        self.stop_ids = self._stop_ids(folder, config)

    def _stop_ids(self, folder: Path, config: ModelConfig) -> frozenset[int]:
        """End ids from config.json and generation_config.json, plus <|eot_id|>, which ends a chat turn."""
        ids = set(config.eos_token_ids)
        ids.update(_read_settings(folder / "generation_config.json", GenerationSettings).eos_token_id)
        if self.eot_id is not None:
            ids.add(self.eot_id)
        return frozenset(ids)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

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
        """BitNet 2B-4T chat format: one BOS, then `Role: content<|eot_id|>` per message, then `Assistant: `."""
        parts = [self.bos_text or ""]
        for message in messages:
            if message.role not in ROLES:
                raise RequestError(f"unknown chat role {message.role!r} (use system, user or assistant)")
            parts.append(f"{ROLES[message.role]}: {message.content}{EOT_TOKEN}")
        if add_generation_prompt:
            parts.append("Assistant: ")
        return "".join(parts)

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        # The rendered text already holds the BOS token, so no special tokens are added (one BOS).
        return self.encode(self.render_chat(messages), add_bos=False)


class StreamDecoder:
    """Turns token ids into text pieces; a piece never ends inside a multi-byte UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window re-decoded for context (BPE merges depend on neighbours)
        self.read = 0  # ids before this have been emitted as text

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is left, even an incomplete character (as U+FFFD), when generation ends."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]


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
