"""Decode steps run once op by op, then captured as traces and replayed on persistent device inputs.

A decode step is several named pieces (the forward pass to logits, then a token picker: argmax or
sampling), each traced on its own so that every request mix replays the same forward trace. A piece's
first run compiles its programs and makes the first-call host writes that a capture would reject; its
ttnn calls are counted then. Traces are released explicitly (`release`), before the device closes.

No buffer may be allocated while a trace is live: a program compiled then (a prefill of a new length,
a picker's first run) may keep device buffers where the trace writes, and the next replay would
overwrite them. So every op-by-op run (`op_by_op`: prefills, first runs) that grows the program cache
releases every trace right after it; the next step captures them again around the buffers now in use.
"""

from __future__ import annotations

from collections.abc import Callable

from ...errors import CapacityError
from .config import TRACE_REGION_BYTES


class TracedSteps:
    def __init__(self, tt, device, model, use_trace: bool):
        self.tt, self.device, self.model, self.use_trace = tt, device, model, use_trace
        self.calls: dict[str, int] = {}  # ttnn calls made by each piece, counted on its first run
        self._traces: dict[str, tuple[object, object]] = {}  # name -> (trace id, its output tensors)

    def run(self, name: str, step: Callable[[], object]):
        """Run `step` (ttnn calls through self.model) and return its device outputs. A captured step
        returns the outputs it was captured with, which every replay overwrites."""
        if name not in self.calls:
            return self.op_by_op(lambda: self._counted(name, step))
        if not self.use_trace:
            return step()
        if name not in self._traces:
            self._traces[name] = self._capture(step)
        trace_id, outputs = self._traces[name]
        self.tt.execute_trace(self.device, trace_id, cq_id=0, blocking=False)
        return outputs

    def op_by_op(self, step: Callable[[], object]):
        """Run `step` without a trace; if it compiled new programs, release every trace (see above)."""
        before = self.device.num_program_cache_entries()
        try:
            return step()
        finally:
            if self._traces and self.device.num_program_cache_entries() != before:
                self.release()

    def _capture(self, step: Callable[[], object]) -> tuple[object, object]:
        trace_id = self.tt.begin_trace_capture(self.device, cq_id=0)
        try:
            outputs = step()
        finally:  # a failed step must not leave the device capturing
            try:
                self.tt.end_trace_capture(self.device, trace_id, cq_id=0)
            except RuntimeError as exc:  # tt-metal: "... but only N B is allocated for trace region"
                if "trace region" not in str(exc):
                    raise
                raise CapacityError(f"the decode trace does not fit the {TRACE_REGION_BYTES // 2**20} MB trace region "
                                    f"opened with the device; run with --tt-no-trace") from None
        return trace_id, outputs

    def _counted(self, name: str, step: Callable[[], object]):
        """The first run: op by op, its ttnn calls counted; only a run that succeeds counts as the warm-up."""
        calls = []
        self.model.tt = TTCallHook(self.tt, lambda call_name, call: calls.append(call_name) or call())
        try:
            outputs = step()
        finally:
            self.model.tt = self.tt
        self.calls[name] = len(calls)
        return outputs

    @property
    def captured(self) -> list[str]:
        return list(self._traces)

    def release(self) -> None:
        for trace_id, _ in self._traces.values():
            self.tt.release_trace(self.device, trace_id)
        self._traces.clear()


class TTCall:
    """One ttnn call held for a hook: `call()` makes it; its arguments stay readable (placement audits,
    per-op comparisons)."""

    def __init__(self, function, args, kwargs):
        self.function, self.args, self.kwargs = function, args, kwargs

    def __call__(self):
        return self.function(*self.args, **self.kwargs)


class TTCallHook:
    """Stands in for the ttnn module and passes every call through `around(name, call)` (a TTCall): for
    counting or inspecting the calls of one step without touching the model's code."""

    SUBMODULES = ("experimental", "transformer")

    def __init__(self, module, around, prefix: str = ""):
        self._module, self._around, self._prefix = module, around, prefix

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if name in self.SUBMODULES:
            return TTCallHook(attr, self._around, f"{self._prefix}{name}.")
        if not callable(attr) or isinstance(attr, type) or name.startswith("graph"):
            return attr
        return lambda *args, **kwargs: self._around(f"{self._prefix}{name}", TTCall(attr, args, kwargs))
