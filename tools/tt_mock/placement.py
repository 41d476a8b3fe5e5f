"""Placement audit on a MOCK device: which cores hold every operand and output of every op in one
decode step and one prefill, checked against what each op's kernel needs.

A mock device validates arguments and places buffers, but no check of tt-metal's asks whether, say,
RoPE's cos/sin rows sit on the cores of its q: a layout the kernel misreads passes the mock and gives
wrong numbers on a card (issue 14). The table INVARIANTS states, op by op, the placement each kernel
relies on (from its ttnn 0.81.1 kernel and program factory), and this tool checks it on the real
shard grids that ttnn computed.

    python -m tools.tt_mock.placement --board p150-11x10 --users 1,8,12,17,32 --layers 2

Prints one JSON object per user count: ops audited, violations (must be none), and the binary ops
whose operands lie on different cores (correct, but ttnn moves one of them first).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from dataclasses import replace

from tools.tt_host.stand_in import is_rectangle, rectangle, sdpa_decode_computed_heads

from .harness import mock_env

TILE = 32


def shard_cores(tensor) -> tuple[tuple[int, int], ...] | None:
    """The core of each shard, in shard order (ROW_MAJOR orientation), or None for an interleaved tensor."""
    config = tensor.memory_config()
    if not config.is_sharded() or config.shard_spec is None:
        return None
    cores = []
    for r in config.shard_spec.grid.ranges():
        cores += [(x, y) for y in range(r.start.y, r.end.y + 1) for x in range(r.start.x, r.end.x + 1)]
    return tuple(cores)


def from_origin(cores) -> bool:
    """A rectangle that starts at core (0, 0): the only input layout the bounding-box walks read right."""
    return cores is not None and cores[0] == (0, 0) and is_rectangle(cores)


# -- the invariants: op -> check(call, outputs) -> what is wrong, or None ------------------------------------


def qkv_heads_decode(call, outputs):
    qkv = call.args[0]
    cores = shard_cores(qkv)
    if cores is not None:
        box = (max(x for x, _ in cores) + 1) * (max(y for _, y in cores) + 1)
        if not from_origin(cores) or (qkv.padded_shape[-1] // TILE) % box:
            return f"input shards on {describe(cores)}: the reader walks the {box} cores from (0, 0) to their far corner"
    q_cores = shard_cores(outputs[0])
    if not from_origin(q_cores):
        return f"q on {describe(q_cores)}: user b must be on core b of a rectangle from (0, 0)"
    return None


def rope_decode(call, outputs):
    if not call.kwargs.get("is_decode_mode"):
        return None
    x, cos, sin = call.args[:3]
    if not shard_cores(x) == shard_cores(cos) == shard_cores(sin):
        return f"x on {describe(shard_cores(x))}, cos on {describe(shard_cores(cos))}: each core reads cos/sin from its own L1"
    return None


def sdpa_decode(call, outputs):
    q, k = call.args[0], call.args[1]
    users, kv_heads = q.shape[1], k.shape[1]
    grid = call.kwargs["program_config"].compute_with_storage_grid_size
    computed = sdpa_decode_computed_heads(users, kv_heads, grid.x * grid.y, 16)
    if computed != {(u, h) for u in range(users) for h in range(kv_heads)}:
        return f"a {grid.x}x{grid.y} grid does not split {users} users x {kv_heads} KV heads completely"
    cores = shard_cores(q)
    if cores is not None and any(cores[b] != (b % grid.x, b // grid.x) for b in range(users)):
        return f"Q on {describe(cores)}: user b's Q is read from output core b of the {grid.x}-wide SDPA grid"
    return None


def concat_heads_decode(call, outputs):
    cores = shard_cores(call.args[0])
    return None if cores and is_rectangle(cores) else f"input on {describe(cores)}: not a rectangle"


def sharded_norm(call, outputs):
    program = call.kwargs.get("program_config")
    cores = shard_cores(call.args[0])
    if program is None or cores is None:
        return None
    grid = program.compute_with_storage_grid_size
    if cores != rectangle(grid.x, grid.y):
        return f"input on {describe(cores)}, program on {grid.x}x{grid.y}: each core normalises the shard in its own L1"
    return None


def matmul_1d(call, outputs):
    """The 1D multicast matmul's program factory makes the first cores of its program grid, row by row,
    the senders of x's width shards, and the reader walks their bounding box: shard k must be there."""
    program = call.kwargs.get("program_config")
    cores = shard_cores(call.args[0])
    if type(program).__name__ != "MatmulMultiCoreReuseMultiCast1DProgramConfig" or cores is None:
        return None
    grid = program.compute_with_storage_grid_size
    if cores != tuple((i % grid.x, i // grid.x) for i in range(len(cores))):
        return f"x on {describe(cores)}: shard k is multicast from core k of the {grid.x}-wide program grid, row by row"
    return None


def cache_update(call, outputs):
    x = call.args[1]
    cores = shard_cores(x)
    if cores is None or len(cores) != x.shape[1]:
        return f"input on {describe(cores)}: one user per core expected"
    return None


def chunked_sdpa(call, outputs):
    sharded = [describe(shard_cores(t)) for t in call.args[:4] if shard_cores(t) is not None]
    return f"operands on {sharded}: its readers fetch Q chunks and K/V pages by id from interleaved buffers" if sharded else None


def fill_cache(call, outputs):
    cores = shard_cores(call.args[1])
    return f"input on {describe(cores)}: the writer reads interleaved tiles by id" if cores is not None else None


INVARIANTS = {
    "experimental.nlp_create_qkv_heads_decode": qkv_heads_decode,
    "experimental.rotary_embedding_hf": rope_decode,
    "transformer.scaled_dot_product_attention_decode": sdpa_decode,
    "experimental.nlp_concat_heads_decode": concat_heads_decode,
    "rms_norm": sharded_norm,
    "experimental.paged_update_cache": cache_update,
    "linear": matmul_1d,
    "transformer.chunked_scaled_dot_product_attention": chunked_sdpa,
    "fill_cache": fill_cache,
}
BINARY = ("add", "multiply", "mul")


def describe(cores) -> str:
    if cores is None:
        return "interleaved"
    return f"{len(cores)} cores {cores[0]}..{cores[-1]}" + ("" if is_rectangle(cores) else " (not a rectangle)")


class Audit:
    def __init__(self):
        self.ops, self.violations, self.reshards = 0, [], []

    def __call__(self, name, call):
        outputs = call()
        outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        self.ops += 1
        check = INVARIANTS.get(name)
        problem = check(call, outs) if check else None
        if problem:
            self.violations.append(f"{name}: {problem}")
        if name in BINARY and len(call.args) > 1 and hasattr(call.args[1], "memory_config"):
            a, b = (shard_cores(t) for t in call.args[:2])
            if a and b and a != b:
                self.reshards.append(f"{name}: {describe(a)} + {describe(b)}")
        return outputs


def audit(backend, slots, prompt_length: int) -> Audit:
    """Check one prefill, one more appended to it (starting inside a tile) and one decode step, op by op."""
    from bitnet_tt.backends.ttnn.trace import TTCallHook

    recorder = Audit()
    real = backend.steps.tt
    backend.steps.tt = TTCallHook(real, recorder)  # decode pieces make their calls through steps.tt
    backend.model.tt = backend.steps.tt  # prefill calls through model.tt
    try:
        backend.free(slots[0])
        backend.prefill(slots[0], list(range(1, prompt_length + 1)))
        backend.prefill(slots[0], [3] * 7)
        backend.decode(slots, [2] * len(slots))
    finally:
        backend.steps.tt = backend.model.tt = real
    return recorder


def run(board: str, users: int, layers: int, prompt_length: int) -> dict:
    import ttnn

    from bitnet_tt.backends.ttnn.backend import TTNNBackend
    from bitnet_tt.backends.ttnn.config import TTOptions
    from bitnet_tt.backends.ttnn.device import open_tt_device

    from .contract import model_config

    config = replace(model_config("2b4t", 0), num_layers=layers)
    device = run.device = getattr(run, "device", None) or open_tt_device(ttnn, allow_mock=True)
    backend = TTNNBackend(config, None, ttnn, device, users, 256, TTOptions(use_trace=False))
    slots = list(range(users))
    for slot in slots:
        backend.prefill(slot, [1])
    recorded = audit(backend, slots, prompt_length)
    grid = device.compute_with_storage_grid_size()
    report = {"board": board, "grid": f"{grid.x}x{grid.y}", "users": users, "layers": layers, "ops": recorded.ops,
              "violations": recorded.violations, "binary_ops_on_different_cores": len(recorded.reshards)}
    backend.close()
    del backend
    gc.collect()
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--board", default="p150", help="p150 (13x10), p150-12x10, p150-11x10 (harvested), n150")
    parser.add_argument("--users", default="1,8,12,17,32", help="user counts, each audited with its own backend")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (every layer runs the same ops)")
    parser.add_argument("--prompt", type=int, default=40, help="prefill length audited")
    args = parser.parse_args(argv)
    os.environ.update(mock_env(args.board))
    failed = False
    for users in (int(n) for n in args.users.split(",")):
        report = run(args.board, users, args.layers, args.prompt)
        failed |= bool(report["violations"])
        print(json.dumps(report), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
