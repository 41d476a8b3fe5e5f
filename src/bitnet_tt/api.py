"""`LLM`: the Python API. Load a model once, then generate, stream or chat; the CLI runs on the same calls.

    from bitnet_tt import LLM
    with LLM("microsoft/bitnet-b1.58-2B-4T") as llm:
        print(llm.generate("The capital of France is", max_new_tokens=16))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path

from .errors import BitNetError, GenerationError
from .sampling import SamplingParams
from .tokenizer import ChatMessage

# Sampling defaults shared by the API and the CLI; every other field keeps SamplingParams' default.
GENERATE_SAMPLING = {"temperature": 0.0}  # greedy: the same prompt always gives the same completion
CHAT_SAMPLING = {"temperature": 0.7, "top_p": 0.9}
SAMPLING_DEFAULTS = {f.name: f.default for f in fields(SamplingParams)}


def sampling_params(defaults: Mapping, **overrides) -> SamplingParams:
    """SamplingParams from a command's defaults and the caller's overrides (unknown names are an error)."""
    unknown = set(overrides) - set(SAMPLING_DEFAULTS)
    if unknown:
        raise BitNetError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    if isinstance(overrides.get("stop"), str):
        overrides["stop"] = (overrides["stop"],)
    return SamplingParams(**{**defaults, **overrides})


class LLM:
    """A model loaded on a backend ("cpu", "torch" or "ttnn"), with the engine that generates from it.

    Options: backend (default: "cpu", the native kernels, unless a torch device or dtype is asked for),
    max_batch (KV-cache slots, i.e. prompts decoded together), max_context (tokens per prompt; default: the
    model's maximum), prefill_chunk (prompt tokens prefilled per step, between the decode steps of running
    users; default: the backend's, Backend.default_prefill_chunk), dtype and device (torch backend; dtype default bfloat16), progress (loading bars), tt_options
    (backends.ttnn.config.TTOptions), cpu_options (backends.cpu.backend.CPUOptions: threads, LM head dtype).
    Use it as a context manager, or call close(), to release the device.
    """

    def __init__(self, model: str | Path, backend: str | None = None, *, max_batch: int = 8,
                 max_context: int | None = None, prefill_chunk: int | None = None, dtype: str | None = None,
                 device: str = "cpu", progress: bool = False, tt_options=None, cpu_options=None):
        from .backends import create_backend
        from .tensorfiles import resolve_model
        from .engine import Engine
        from .tokenizer import Tokenizer

        check_capacity(max_batch, max_context, prefill_chunk)
        check_torch_device(device)
        self.folder = resolve_model(model)
        self.backend = create_backend(backend, self.folder, max_batch, max_context, dtype, device,
                                      progress=progress, tt_options=tt_options, cpu_options=cpu_options)
        try:
            self.engine = Engine(self.backend, Tokenizer(self.folder, self.backend.config), prefill_chunk=prefill_chunk)
        except BaseException:
            self.backend.close()
            raise
        self.closed = False

    # -- generating -------------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str], **sampling) -> str | list[str]:
        """Complete one prompt (returns its text) or a list of prompts, decoded together (returns a list)."""
        params = sampling_params(GENERATE_SAMPLING, **sampling)
        requests = [self.submit(p, params) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        for request in requests:
            self.finish(request)
        return requests[0].text if isinstance(prompts, str) else [r.text for r in requests]

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """The completion of one prompt, piece by piece as it is generated."""
        yield from self.pieces(self.submit(prompt, sampling_params(GENERATE_SAMPLING, **sampling)))

    def chat(self, messages: Sequence[Mapping | ChatMessage], **sampling) -> str:
        """The assistant's reply to a conversation given as [{"role": ..., "content": ...}, ...]."""
        request = self.submit_chat(messages, sampling_params(CHAT_SAMPLING, **sampling))
        return self.finish(request).text

    # -- the request level (the CLI's generate and chat use these) ----------------------------------

    def submit(self, prompt: str | Sequence[int], params: SamplingParams):
        """Queue a prompt (text or token ids); returns the engine's Request. Nothing runs until pieces/finish."""
        self._check_open()
        if isinstance(prompt, str):
            check_utf8(prompt, "the prompt")
        return self.engine.submit(prompt, params)

    def submit_chat(self, messages: Sequence[Mapping | ChatMessage], params: SamplingParams):
        self._check_open()
        return self.engine.submit_chat([as_message(m) for m in messages], params)

    def pieces(self, request) -> Iterator[str]:
        """Drive the engine (every queued request advances) and yield `request`'s new text until it ends;
        GenerationError if it failed."""
        while not request.finished:
            for output in self.engine.step():
                if output.request is request and output.text:
                    yield output.text
        if request.finish_reason == "error":
            raise GenerationError(request.error)

    def finish(self, request):
        for _ in self.pieces(request):
            pass
        return request

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the backend (the Tenstorrent device, the KV cache); the LLM cannot be used afterwards."""
        if not self.closed:
            self.closed = True
            self.backend.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise BitNetError("this LLM has been closed")


def as_message(message: Mapping | ChatMessage) -> ChatMessage:
    if isinstance(message, ChatMessage):
        return message
    try:
        role, content = message["role"], message["content"]
    except (KeyError, TypeError):
        raise BitNetError(f"a chat message needs 'role' and 'content', got {message!r}") from None
    return ChatMessage(role, content)


def check_utf8(text: str, what: str) -> None:
    """Text from argv or stdin carries undecodable bytes as lone surrogates (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BitNetError(f"{what} is not valid UTF-8") from None


def check_capacity(max_batch: int, max_context: int | None, prefill_chunk: int | None) -> None:
    for name, value in (("max_batch", max_batch), ("prefill_chunk", 1 if prefill_chunk is None else prefill_chunk)):
        if not isinstance(value, int) or value < 1:
            raise BitNetError(f"{name} must be at least 1, got {value!r}")
    if max_context is not None and (not isinstance(max_context, int) or max_context < 1):
        raise BitNetError(f"max_context must be at least 1 (or None for the model's maximum), got {max_context!r}")


def check_torch_device(device: str) -> None:
    """A device that computes: 'meta' (shapes only) and unknown names are refused before loading."""
    if device == "cpu":
        return  # the cpu backend's default: no need to import torch to know it
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise BitNetError(f"unknown torch device {device!r} (use cpu or cuda)") from None
    if kind == "meta":
        raise BitNetError("device 'meta' holds no data and cannot run a model (use cpu or cuda)")
