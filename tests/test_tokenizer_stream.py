"""Streaming detokenisation (tokenizers' DecodeStream under StreamDecoder) gives the text a full decode gives."""

from __future__ import annotations

import pytest
import torch

from bitnet_tt.tokenizer import StreamDecoder, Tokenizer


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.add(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("seed", range(20))
def test_random_ids_stream_to_the_full_decode(tokenizer, seed):
    """Random ids, as a random model emits them: broken UTF-8, special and unmapped ids included."""
    ids = torch.randint(0, 300, (60,), generator=torch.Generator().manual_seed(seed)).tolist()
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_an_unfinished_character_is_held_then_flushed(tokenizer):
    ids = tokenizer.encode("ok 🙂", add_bos=False)
    decoder = StreamDecoder(tokenizer)
    shown = "".join(decoder.add(i) for i in ids[:-1])  # the emoji's last byte is missing
    assert shown == "ok " and decoder.flush() == "\ufffd" and decoder.flush() == ""


def test_special_and_unmapped_ids_show_no_text(tokenizer):
    pieces = stream(tokenizer, [tokenizer.bos_id, *tokenizer.encode("Hi", add_bos=False), tokenizer.eot_id, 10**6])
    assert "".join(pieces) == "Hi"
