"""Grammar-constrained decoding: which tokens may come next so that the output matches a JSON schema.

llguidance (a small Rust library with no Python dependencies) compiles the schema against the tokenizer and
computes each step's token mask; the engine applies it on the host, so constrained requests work on every
backend. JSON is compact (fixed separators, no free whitespace): a small model cannot loop on blank lines.
"""

from __future__ import annotations

import json

import numpy as np

from .errors import RequestError
from .tokenizer import Tokenizer

ANY_OBJECT = json.dumps({"type": "object"})  # response_format {"type": "json_object"}
_COMPACT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class GrammarCompiler:
    """Builds constraints for one tokenizer and model vocabulary; the tokenizer is converted once (0.36 s for a
    32k vocabulary here; llguidance says about 1 s for large ones)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        import llguidance

        stop_ids = sorted(i for i in tokenizer.stop_ids if i < vocab_size)
        self._tokenizer = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=stop_ids)
        self.vocab_size = vocab_size

    def constraint(self, json_schema: str) -> TokenConstraint:
        """A fresh constraint for one request; a schema llguidance cannot compile is a RequestError."""
        import llguidance

        try:
            schema = json.loads(json_schema)
        except json.JSONDecodeError as exc:
            raise RequestError(f"the JSON schema is not valid JSON ({exc})") from None
        if not isinstance(schema, dict):
            raise RequestError("the JSON schema must be an object")
        grammar = llguidance.LLMatcher.grammar_from_json_schema({**schema, "x-guidance": _COMPACT})
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"the JSON schema is not supported: {matcher.get_error()}")
        return TokenConstraint(matcher, self.vocab_size)


class TokenConstraint:
    """One request's position in its grammar: the tokens allowed next, advanced by each accepted token."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher = matcher
        self._vocab_size = vocab_size

    def allowed(self) -> np.ndarray:
        """A bool mask [vocab]: True where the token keeps the output on the grammar (end ids once complete)."""
        # llguidance's bitmask: 32-bit little-endian words, token i at bit i % 8 of byte i // 8. (Its
        # llguidance.torch helpers would import torch.compile, seconds of start-up for what this line does.)
        mask = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(mask, bitorder="little")[: self._vocab_size].astype(bool)

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"token {token_id} was sampled outside the grammar: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The output matches the grammar and nothing may follow but an end id."""
        return self._matcher.is_stopped()
