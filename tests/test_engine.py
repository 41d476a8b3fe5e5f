"""The engine: chat format, streaming text, stop handling, continuous batching and cancellation."""

from __future__ import annotations

import pytest
import torch

from bitnet_tt.backends.base import Backend
from bitnet_tt.backends.torch.backend import load_torch_backend
from bitnet_tt.config import ModelConfig
from bitnet_tt.engine import Engine
from bitnet_tt.errors import CapacityError, RequestError
from bitnet_tt.sampling import SamplingParams
from bitnet_tt.tokenizer import ChatMessage, StreamDecoder, Tokenizer

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


def byte_token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte, through the byte-level alphabet (GPT-2's bytes-to-unicode map)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [tokenizer._tok.token_to_id(chars[b]) for b in text.encode("utf-8")]


class ScriptedBackend(Backend):
    """Emits a fixed token sequence per slot (keyed by the prompt's first token): tests the engine alone."""

    def __init__(self, config: ModelConfig, scripts: dict[int, list[int]], max_slots: int = 2, max_context: int = 64):
        super().__init__(config, max_slots, max_context)
        self.scripts, self.playing = scripts, {}

    def _logits(self, slot: int) -> torch.Tensor:
        script, step = self.playing[slot]
        logits = torch.zeros(self.config.vocab_size)
        logits[script[min(step, len(script) - 1)]] = 10.0
        self.playing[slot] = (script, step + 1)
        return logits

    def prefill(self, slot, token_ids):
        self._reserve(slot, len(token_ids))
        self._advance(slot, len(token_ids))
        self.playing[slot] = (self.scripts[token_ids[0]], 0)
        return self._logits(slot)

    def decode(self, slots, token_ids):
        for s in slots:
            self._reserve(s, 1)
            self._advance(s, 1)
        return torch.stack([self._logits(s) for s in slots])


# --- tokenizer, chat format, streaming ------------------------------------------------------------


def test_chat_prompt_is_byte_exact_with_one_bos(tokenizer):
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hey, are you conscious?"),
                ChatMessage("assistant", "Yes."), ChatMessage("user", "Prove it.")]
    text = tokenizer.render_chat(messages)
    assert text == ("<|begin_of_text|>System: Be brief.<|eot_id|>User: Hey, are you conscious?<|eot_id|>"
                    "Assistant: Yes.<|eot_id|>User: Prove it.<|eot_id|>Assistant: ")
    ids = tokenizer.encode_chat(messages)
    assert ids.count(tokenizer.bos_id) == 1 and ids[0] == tokenizer.bos_id
    assert ids.count(tokenizer.eot_id) == 4
    assert tokenizer.decode(ids) == text.replace("<|begin_of_text|>", "").replace("<|eot_id|>", "")


def test_stop_ids_come_from_config_and_tokenizer(tokenizer, tiny):
    config = ModelConfig.from_folder(tiny)
    assert set(config.eos_token_ids) <= tokenizer.stop_ids
    assert tokenizer.eot_id in tokenizer.stop_ids and len(tokenizer.stop_ids) == 2


def test_stream_decoder_never_splits_characters(tokenizer):
    text = "naïve 你好, 世界 🙂🚀!"
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.add(t) for t in byte_token_ids(tokenizer, text)] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) > 10  # it really streams


def test_engine_stream_equals_final_text_for_byte_tokens(tokenizer, tiny):
    script = byte_token_ids(tokenizer, "汉字 and emoji 🙂 done") + [tokenizer.eot_id]
    engine = Engine(ScriptedBackend(ModelConfig.from_folder(tiny), {7: script}), tokenizer)
    request = engine.submit([7, 8], SamplingParams(temperature=0.0, max_new_tokens=64))
    pieces = []
    while not request.finished:
        pieces += [o.text for o in engine.step() if o.request is request]
    assert "".join(pieces) == request.text == "汉字 and emoji 🙂 done"
    assert request.finish_reason == "stop" and request.output_ids[-1] == tokenizer.eot_id


@pytest.mark.parametrize("end", ["eos", "eot"])
def test_generation_stops_on_each_end_id(tokenizer, tiny, end):
    config = ModelConfig.from_folder(tiny)
    end_id = config.eos_token_ids[0] if end == "eos" else tokenizer.eot_id
    script = tokenizer.encode("Hi there", add_bos=False) + [end_id, 65, 66]
    engine = Engine(ScriptedBackend(config, {7: script}), tokenizer)
    [request] = engine.generate([[7]], SamplingParams(temperature=0.0, max_new_tokens=50))
    assert request.text == "Hi there" and request.finish_reason == "stop"


def test_stop_strings_cut_the_text_and_never_stream_past_it(tokenizer, tiny):
    script = tokenizer.encode("one two three four", add_bos=False)
    engine = Engine(ScriptedBackend(ModelConfig.from_folder(tiny), {7: script}), tokenizer)
    request = engine.submit([7], SamplingParams(temperature=0.0, max_new_tokens=50, stop=("three", "zzz")))
    streamed = "".join(o.text for o in iter_outputs(engine, request))
    assert request.text == streamed == "one two "
    assert request.finish_reason == "stop"


def iter_outputs(engine, request):
    while not request.finished:
        yield from (o for o in engine.step() if o.request is request)


def test_max_new_tokens_gives_length(tokenizer, tiny):
    engine = Engine(ScriptedBackend(ModelConfig.from_folder(tiny), {7: [70] * 10}), tokenizer)
    [request] = engine.generate([[7]], SamplingParams(temperature=0.0, max_new_tokens=4))
    assert len(request.output_ids) == 4 and request.finish_reason == "length"
    stats = request.result()["stats"]
    assert stats["time_to_first_token_s"] > 0 and stats["inter_token_latency_p50_s"] is not None


# --- continuous batching on the real PyTorch backend ----------------------------------------------


def test_staggered_requests_equal_each_alone(tiny, tokenizer):
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 290, (n,), generator=gen).tolist() for n in (5, 31, 2, 17, 60, 9, 44, 3)]
    lengths = [3, 12, 7, 1, 9, 12, 5, 10]
    params = [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True) for n in lengths]

    # float64: batching changes only the order of sums, which in fp32 could flip an activation tie on some CPUs.
    alone = Engine(load_torch_backend(tiny, max_slots=1, max_context=128, dtype="float64", progress=False), tokenizer)
    expected = [alone.generate([p], sp)[0].output_ids for p, sp in zip(prompts, params)]

    engine = Engine(load_torch_backend(tiny, max_slots=4, max_context=128, dtype="float64", progress=False), tokenizer)
    requests = []
    for wave in ([0, 1, 2], [3, 4], [5, 6, 7]):  # submitted at different times, with more requests than slots
        requests += [engine.submit(prompts[i], params[i]) for i in wave]
        for _ in range(3):
            engine.step()
    engine.run()
    assert [r.output_ids for r in requests] == expected
    assert all(len(r.output_ids) == n for r, n in zip(requests, lengths))


def test_cancel_frees_the_slot(tiny, tokenizer):
    backend = load_torch_backend(tiny, max_slots=1, max_context=128, progress=False)
    engine = Engine(backend, tokenizer)
    long = engine.submit([1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=100, ignore_eos=True))
    queued = engine.submit([4, 5], SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True))
    engine.step()
    engine.step()
    assert long.slot == 0 and not queued.slot
    engine.cancel(long.id)
    outputs = engine.step()
    assert long.finish_reason == "cancelled" and any(o.request is long and o.finished for o in outputs)
    assert queued.slot == 0 and backend.slot_length(0) == 2  # the queued request got the freed slot
    engine.run()
    assert queued.finish_reason == "length" and not engine.has_work()


def test_prompt_longer_than_context(tiny, tokenizer):
    backend = load_torch_backend(tiny, max_slots=1, max_context=16, progress=False)
    with pytest.raises(CapacityError, match="the prompt has 40 tokens but the context holds 16"):
        Engine(backend, tokenizer).submit(list(range(40)), GREEDY)
    request = Engine(backend, tokenizer, prompt_overflow="truncate").submit(list(range(40)), GREEDY)
    assert request.prompt_ids == list(range(25, 40))


def test_generation_ends_at_the_context_limit(tiny, tokenizer):
    backend = load_torch_backend(tiny, max_slots=1, max_context=16, progress=False)
    [request] = Engine(backend, tokenizer).generate([list(range(10))], SamplingParams(temperature=0.0, max_new_tokens=100, ignore_eos=True))
    assert request.finish_reason == "length" and len(request.prompt_ids) + len(request.output_ids) == 17


def test_bad_prompts_are_rejected(tiny, tokenizer):
    engine = Engine(load_torch_backend(tiny, max_slots=1, max_context=16, progress=False), tokenizer)
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(RequestError, match="token ids must be in"):
        engine.submit([1, 100000], GREEDY)


def test_a_failing_callback_does_not_stop_other_requests(tokenizer, tiny):
    engine = Engine(ScriptedBackend(ModelConfig.from_folder(tiny), {7: [70] * 5, 8: [71] * 5}), tokenizer)
    seen = []

    def broken(output):
        raise RuntimeError("consumer failed")

    params = SamplingParams(temperature=0.0, max_new_tokens=3)
    first = engine.submit([7], params, on_output=broken)
    second = engine.submit([8], params, on_output=seen.append)
    engine.run()
    assert first.finished and second.finished and second.output_ids == [71, 71, 71]
    assert [o.finished for o in seen] == [False, False, True]
