"""Op-by-op comparison of a ttnn backend (on a card, or on the host stand-in) with the host stand-in's
meaning of every op: the card bring-up check behind `bitnet-tt verify --backend ttnn --per-op`.

The candidate runs one prefill and one decode step through the call hook, and every ttnn call's
tensor inputs and outputs are read back. A twin backend on the stand-in (kernel_placement=False: what
each op means, wherever its shards lie) then makes the same calls; before each one its tensor inputs
are overwritten with the candidate's, so each op is judged on its own. The first op whose output
agrees less than the threshold is the first wrong op, named with its shapes and shard grids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bitnet_tt.backends.ttnn.trace import TTCallHook

from .stand_in import INT_DTYPES, HostTT

PER_OP_PCC = 0.999


@dataclass(eq=False)
class OpRecord:
    name: str
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    layouts: list[str]  # shape and shard grid of each output
    agreement: float | None = None


@dataclass
class PerOpReport:
    ops: list[OpRecord] = field(default_factory=list)
    threshold: float = PER_OP_PCC

    @property
    def first_wrong(self) -> OpRecord | None:
        return next((op for op in self.ops if op.agreement is not None and op.agreement < self.threshold), None)


def _is_tensor(value) -> bool:
    return hasattr(value, "memory_config") and hasattr(value, "shape")


def _tensors(values) -> list:
    """The tensors among values, lists included (concat's inputs), in order."""
    found = []
    for value in values:
        found += [item for item in (value if isinstance(value, (list, tuple)) else (value,)) if _is_tensor(item)]
    return found


def _inputs(call) -> list:
    return _tensors((*call.args, *call.kwargs.values()))


def _outputs(call, result) -> list:
    """What an op writes: its tensor results, or its first tensor argument for an in-place op (cache
    updates); nothing for calls that only build configs."""
    results = _tensors(result if isinstance(result, (list, tuple)) else (result,))
    return results or (_inputs(call)[:1] if result is None else [])


def _layout(tensor) -> str:
    """Shape and shard grid: ttnn's shard_spec.grid, or the stand-in's placement."""
    config = tensor.memory_config()
    grid = getattr(config, "placement", None) or getattr(getattr(config, "shard_spec", None), "grid", None)
    return f"{list(tensor.shape)} " + (f"shards on {grid}" if grid else "interleaved")


def agreement(got: torch.Tensor, want: torch.Tensor) -> float:
    """1.0 for equal tensors, else the Pearson correlation (0 where either holds NaN or is constant)."""
    got, want = got.double().flatten(), want.double().flatten()
    if got.shape != want.shape:
        return 0.0
    if torch.equal(got, want):
        return 1.0
    if got.isnan().any() or want.isnan().any() or got.std() == 0 or want.std() == 0:
        return 0.0
    return float(torch.corrcoef(torch.stack([got, want]))[0, 1])


def _hooked(backend, around, run):
    """Run `run()` with every ttnn call of the backend (prefill, decode pieces) passed through `around`."""
    real = backend.steps.tt
    backend.steps.tt = backend.model.tt = TTCallHook(real, around)
    try:
        run()
    finally:
        backend.steps.tt = backend.model.tt = real


def record(backend, run) -> list[OpRecord]:
    tt, records = backend.tt, []

    def around(name, call):
        if not _inputs(call):  # config builders
            return call()
        inputs = [tt.to_torch(t) for t in _inputs(call)]
        result = call()
        outputs = _outputs(call, result)
        records.append(OpRecord(name, inputs, [tt.to_torch(t) for t in outputs], [_layout(t) for t in outputs]))
        return result

    _hooked(backend, around, run)
    return records


def replay(twin, records: list[OpRecord], run) -> None:
    """The same calls on the twin, each fed the candidate's inputs; each record gets its agreement."""
    pending = iter(records)

    def around(name, call):
        if not _inputs(call):  # config builders, as in record()
            return call()
        op = next(pending, None)
        if op is None or op.name != name:
            raise RuntimeError(f"the twin's calls differ from the candidate's at {name} (expected {op and op.name})")
        for tensor, value in zip(_inputs(call), op.inputs):
            tensor._data = value.to(torch.int64 if tensor.dtype in INT_DTYPES else torch.float32).reshape(tensor.data.shape)
        result = call()
        op.agreement = min((agreement(t.data, want) for t, want in zip(_outputs(call, result), op.outputs)), default=1.0)
        return result

    _hooked(twin, around, run)


def stand_in_twin(candidate, weights):
    """The candidate's model (the same checkpoint, for the scales folded into scalar arguments) on the
    stand-in with the candidate's device facts, so that the plan (grids, chunks, call sequence) is the
    same; ops compute what they mean (kernel_placement=False), in fp32 (the inputs come from the candidate)."""
    from dataclasses import replace

    from bitnet_tt.backends.ttnn.backend import TTNNBackend

    facts = candidate.plan.device
    host = HostTT(exact=True, grid=(facts.grid_x, facts.grid_y), dram_banks=(facts.dram_banks, facts.dram_bank_bytes),
                  l1_bank=facts.l1_bank_bytes, kernel_placement=False)
    options = replace(candidate.plan.options, use_trace=False)
    return TTNNBackend(candidate.config, weights, host, host.device(), candidate.max_slots, candidate.max_context, options)


def compare_per_op(candidate, twin, prompt: list[int], threshold: float = PER_OP_PCC) -> PerOpReport:
    """One prefill of `prompt` into slot 0 and one decode step, op by op. Both backends must be fresh."""
    def step(backend):
        def run():
            backend.prefill(0, prompt)
            backend.decode([0], [prompt[-1]])
        return run

    records = record(candidate, step(candidate))
    replay(twin, records, step(twin))
    return PerOpReport(records, threshold)


def describe(report: PerOpReport) -> list[str]:
    wrong = report.first_wrong
    if wrong is None:
        return [f"all ops agree: {len(report.ops)} ttnn calls of one prefill and one decode step, each at PCC >= "
                f"{report.threshold} with the host stand-in fed the same inputs"]
    index = report.ops.index(wrong)
    return [f"first op below PCC {report.threshold}: #{index} {wrong.name} (PCC {wrong.agreement:.5f})",
            *(f"  output {layout}" for layout in wrong.layouts),
            *(f"  input {list(t.shape)}" for t in wrong.inputs)]

