"""A performance MODEL of one decode step on a Tenstorrent card: every figure it prints is PREDICTED.
Nothing here has run on a card.

    python -m tools.tt_mock.perf --board p150 --users 1 [--shapes 2b4t]

The 2B-4T step's op list is recorded on the MOCK device (op, shapes, dtypes, program config, math
fidelity), one decoder layer and two, and extended to every layer (each layer runs the same ops).
Each op is classified and costed as issue 14 proposes:

    t = t_host + users * t_user
        + sum over matmuls of max(W / (eta * BW), MACs * phases / (u * cores * 2048 * f))
        + (other ops) * c + (KV cache bytes SDPA reads) / (eta * BW)

W: weight bytes; BW: DRAM bandwidth; MACs on 32-row tiles (decode pads to 32 rows), times the math
fidelity's phases (LoFi 1 .. HiFi4 4); 2048 multiply-accumulates per core per cycle (an 8x16 by 16x16
tile product, tt-metal tech_reports/matrix_engine); f: the clock. A DRAM-sharded matmul computes on one
core per DRAM bank (its program factory sets per_core_N_compute = div_up(N, num_dram_banks)); a 1D matmul
on the cores that get output blocks (per_core_N tiles each), a 2D one on its grid. Every ttnn call that returns a tensor counts as one op (a reshape that is a view
is costed too: an upper bound). t_user is a per-user cost per step that matmuls do not have (the
batch-32 figures need it).

The constants are fitted (least max relative error) to published figures, FIT_TARGETS, whose op lists
are modelled from the models' dimensions in `llama_step` and `prior_art_step`: an approximation of the
ops tt_transformers and the prior art run, not a recording. The fit table shows how close it gets.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import math
import os
import random
import sys
from dataclasses import dataclass, replace

from tools.tt_host.stand_in import PHASES, fidelity_matmul  # noqa: F401 - the device emulation lives there

from .harness import mock_env

TILE = 32
MACS_PER_CYCLE = 2048
BYTES_PER_ELEMENT = {"BFLOAT16": 2.0, "FLOAT32": 4.0, "BFLOAT8_B": 1088 / 1024, "BFLOAT4_B": 576 / 1024,
                     "UINT32": 4.0, "INT32": 4.0, "UINT16": 2.0, "UINT8": 1.0, "TERNARY2": 0.25}
CATEGORIES = ("matmul (DRAM-sharded)", "matmul (1D/2D)", "norm", "attention", "sampling", "data movement")


@dataclass(frozen=True)
class Board:
    name: str
    arch: str  # the constants eta, u, c are fitted per architecture
    dram_gbps: float
    clock_ghz: float
    grid: tuple[int, int]
    dram_banks: int  # the DRAM-sharded matmul's compute cores


BOARDS = {  # grids: the compute grid ttnn reports (p150a is harvested to 11x10 on the cards we know of)
    "p150": Board("p150a", "blackhole", 512, 1.35, (11, 10), 8),
    "n150": Board("n150", "wormhole", 288, 1.0, (8, 8), 12),
}


@dataclass(frozen=True)
class Op:
    category: str
    name: str
    weight_bytes: float = 0.0  # matmuls: bytes streamed from DRAM; attention: KV cache bytes read
    macs: float = 0.0
    phases: int = 1
    cores: int = 1
    dtype: str = ""  # matmuls: the weight's


@dataclass(frozen=True)
class Constants:
    eta: dict  # arch -> DRAM bandwidth efficiency
    u: dict  # arch -> matmul compute efficiency
    c_us: dict  # arch -> cost of any other op, microseconds
    t_host_ms: float
    t_user_ms: float


def op_ms(op: Op, board: Board, k: Constants) -> float:
    dram_ms = op.weight_bytes / (k.eta[board.arch] * board.dram_gbps * 1e9) * 1e3
    if op.category.startswith("matmul"):
        compute_ms = op.macs * op.phases / (k.u[board.arch] * op.cores * MACS_PER_CYCLE * board.clock_ghz * 1e9) * 1e3
        return max(dram_ms, compute_ms)
    return k.c_us[board.arch] / 1e3 + dram_ms


def predict(ops: list[Op], board: Board, users: int, k: Constants) -> dict:
    """Predicted ms per category, the step, and tokens/s (per user and in all)."""
    by_category, counts = collections.Counter(), collections.Counter()
    for op, n in collections.Counter(ops).items():
        by_category[op.category] += n * op_ms(op, board, k)
        counts[op.category] += n
    by_category["host"] = k.t_host_ms + users * k.t_user_ms
    step = sum(by_category.values())
    return {"ms": dict(by_category), "ops": dict(counts), "step_ms": step, "tps_per_user": 1e3 / step,
            "tps": users * 1e3 / step}


# -- op lists modelled from dimensions (an approximation of what each stack runs per decode step) ------------


def matmul(name, k, n, dtype, fidelity, cores, *, rows=TILE, category="matmul (DRAM-sharded)"):
    return Op(category, name, k * n * BYTES_PER_ELEMENT[dtype], rows * k * n, PHASES[fidelity], cores, dtype)


def kv_read(layers_users_ctx, kv_heads, head_dim, dtype):
    return 2 * kv_heads * head_dim * layers_users_ctx * BYTES_PER_ELEMENT[dtype]


def llama_step(dims: dict, board: Board, users: int, context: int) -> list[Op]:
    """tt_transformers' decode step, "performance" precision (PERF.md: bfp4 MLP with LoFi, bfp8 attention
    weights with HiFi2): per layer 5 DRAM-sharded matmuls, 2 sharded RMSNorms, 7 attention ops (head split,
    RoPE on q and k, 2 cache updates, SDPA, head concat) and 9 others (residual adds, the gated multiply,
    sharded<->interleaved moves); per step the LM head, the final norm, the embedding and rotary lookups."""
    d, f, hd, heads, kv = dims["dim"], dims["ffn"], dims["head_dim"], dims["heads"], dims["kv_heads"]
    banks = board.dram_banks
    layer = [matmul("wqkv", d, (heads + 2 * kv) * hd, "BFLOAT8_B", "HiFi2", banks),
             matmul("wo", heads * hd, d, "BFLOAT8_B", "HiFi2", banks),
             matmul("ff1", d, f, "BFLOAT4_B", "LoFi", banks), matmul("ff3", d, f, "BFLOAT4_B", "LoFi", banks),
             matmul("ff2", f, d, "BFLOAT4_B", "LoFi", banks)]
    layer += [Op("norm", "rms_norm")] * 2 + [Op("attention", "heads/rope/cache")] * 6
    layer += [Op("attention", "sdpa_decode", kv_read(users * context, kv, hd, "BFLOAT8_B"))]
    layer += [Op("data movement", "eltwise/reshard")] * 9
    step = layer * dims["layers"] + [Op("norm", "rms_norm")]
    step += [matmul("lm_head", d, dims["vocab"], "BFLOAT8_B", "HiFi2", banks)]
    return step + [Op("data movement", "embedding/rotary/typecast")] * 4 + [Op("sampling", "argmax")]


def prior_art_step(board: Board) -> list[Op]:
    """deveworld/bitnet-tt's ≈10.4 ms step (prior-art.md): per layer 4 custom ternary matmuls with 2-bit
    weights on up to 110 cores at LoFi, 3 sharded norms, 7 attention ops, about 15 glue ops; then the final
    norm, a 4-chunk bfp8 LM head (HiFi2, on the grid) and a device argmax; one user padded to 32 rows."""
    d, f, cores = 2560, 6912, board.grid[0] * board.grid[1]
    one = "matmul (1D/2D)"
    layer = [matmul("qkv", d, 3840, "TERNARY2", "LoFi", cores, category=one),
             matmul("o", d, d, "TERNARY2", "LoFi", cores, category=one),
             matmul("gate_up", d, 2 * f, "TERNARY2", "LoFi", cores, category=one),
             matmul("down", f, d, "TERNARY2", "LoFi", cores, category=one)]
    layer += [Op("norm", "rms_norm")] * 3 + [Op("attention", "heads/rope/cache/sdpa")] * 7
    layer += [Op("data movement", "glue")] * 15
    step = layer * 30 + [Op("norm", "rms_norm")]
    step += [matmul("lm_head", d, 32064, "BFLOAT8_B", "HiFi2", cores, category=one)] * 4
    return step + [Op("data movement", "glue")] * 8 + [Op("sampling", "argmax")]


LLAMA = {  # Hugging Face configs of meta-llama/*
    "Llama-3.2-1B": dict(dim=2048, ffn=8192, head_dim=64, heads=32, kv_heads=8, layers=16, vocab=128256),
    "Llama-3.2-3B": dict(dim=3072, ffn=8192, head_dim=128, heads=24, kv_heads=8, layers=28, vocab=128256),
    "Llama-3.1-8B": dict(dim=4096, ffn=14336, head_dim=128, heads=32, kv_heads=8, layers=32, vocab=128256),
}
PERF_CONTEXT = 128 + 100  # PERF.md: 128-token prefill, 200 decode steps; the mean context of a step

# Published decode speeds, t/s/u. tenstorrent/tt-metal models/tt_transformers/PERF.md (read at commit
# 040a27c), "Performance" table (batch 1) and "Short-Context, Batch-32" table; the prior art's step from
# deveworld/bitnet-tt TODO.md (see /work/shared/notes/prior-art.md).
FIT_TARGETS = [
    ("Llama-3.2-1B", "n150", 1, 87.8), ("Llama-3.2-1B", "n150", 32, 54.7),
    ("Llama-3.2-3B", "n150", 1, 54.0), ("Llama-3.2-3B", "n150", 32, 36.5),
    ("Llama-3.1-8B", "n150", 1, 28.3), ("Llama-3.1-8B", "n150", 32, 22.3),
    ("Llama-3.1-8B", "p150", 1, 33.6), ("prior art 2B-4T", "p150", 1, 1e3 / 10.4),
]


@functools.lru_cache(maxsize=None)
def target_ops(model: str, board: Board, users: int) -> list[Op]:
    if model in LLAMA:
        return llama_step(LLAMA[model], board, users, PERF_CONTEXT)
    return prior_art_step(board)


def fit_error(k: Constants, targets=FIT_TARGETS) -> list[float]:
    """Relative error of the predicted t/s/u against each published figure."""
    errors = []
    for model, board_name, users, published in targets:
        board = BOARDS[board_name]
        errors.append(predict(target_ops(model, board, users), board, users, k)["tps_per_user"] / published - 1)
    return errors


def fit(seed: int = 0, rounds: int = 2000) -> Constants:
    """Constants with the least worst relative error over FIT_TARGETS: a seeded random search within
    physical bounds, then narrowing steps. eta, u and c per architecture; t_host and t_user shared."""
    bounds = {"eta_bh": (0.5, 0.95), "eta_wh": (0.5, 0.95), "u_bh": (0.3, 0.95), "u_wh": (0.3, 0.95),
              "c_bh": (3, 60), "c_wh": (3, 60), "host": (0.2, 3.0), "user": (0.0, 0.5)}
    rng = random.Random(seed)

    def constants(p):
        per_arch = {name: {"blackhole": p[f"{name}_bh"], "wormhole": p[f"{name}_wh"]} for name in ("eta", "u", "c")}
        return Constants(per_arch["eta"], per_arch["u"], per_arch["c"], p["host"], p["user"])

    def worst(p):
        return max(abs(e) for e in fit_error(constants(p)))

    best = {name: (lo + hi) / 2 for name, (lo, hi) in bounds.items()}
    best_error = worst(best)
    for round_ in range(rounds):
        scale = 1.0 if round_ < rounds // 4 else 0.2 * (1 - round_ / rounds) + 0.01
        trial = {name: min(hi, max(lo, best[name] + rng.gauss(0, scale * (hi - lo) / 2)))
                 for name, (lo, hi) in bounds.items()}
        error = worst(trial)
        if error < best_error:
            best, best_error = trial, error
    return constants({name: round(value, 3) for name, value in best.items()})


# -- the 2B-4T step as the mock device records it ---------------------------------------------------------


def fidelity_phases(call) -> int:
    config = call.kwargs.get("compute_kernel_config")
    fidelity = getattr(config, "math_fidelity", None)
    return PHASES[str(fidelity).split(".")[-1]] if fidelity is not None else PHASES["LoFi"]


def classify(name: str, call, board: Board, context: int, users: int) -> Op:
    """One recorded ttnn call as an Op; SDPA decode reads `context` positions of K and V for each user."""
    short = name.split(".")[-1]
    if short in ("linear", "matmul"):
        a, w = call.args[0], call.args[1]
        k, n = w.padded_shape[-2], w.padded_shape[-1]
        rows = math.prod(list(a.padded_shape)[:-1])
        program = call.kwargs.get("program_config")
        kind = type(program).__name__
        if "DRAMSharded" in kind:
            category, cores = "matmul (DRAM-sharded)", board.dram_banks
        else:  # the cores with output blocks: per_core_N tiles each (1D), or the whole grid
            grid = getattr(program, "compute_with_storage_grid_size", None)
            cores = grid.x * grid.y if grid else board.grid[0] * board.grid[1]
            per_core_n = getattr(program, "per_core_N", None)
            category, cores = "matmul (1D/2D)", min(cores, -(-n // (TILE * per_core_n))) if per_core_n else cores
        dtype = str(w.dtype).split(".")[-1]
        return Op(category, short, k * n * BYTES_PER_ELEMENT[dtype], rows * k * n, fidelity_phases(call), cores, dtype)
    if "norm" in short:
        return Op("norm", short)
    if short == "scaled_dot_product_attention_decode":
        k_cache = call.args[1]
        per_position = k_cache.shape[1] * k_cache.shape[3] * BYTES_PER_ELEMENT[str(k_cache.dtype).split(".")[-1]]
        return Op("attention", short, 2 * per_position * context * users)
    if any(part in short for part in ("qkv_heads", "concat_heads", "rotary", "update_cache", "scaled_dot")):
        return Op("attention", short)
    if any(part in short for part in ("topk", "argmax", "sampling", "softmax")):
        return Op("sampling", short)
    return Op("data movement", short)


def record_step(board: Board, users: int, layers: int, context: int) -> list[Op]:
    """The ttnn calls, as Ops, of one greedy decode step of 2B-4T (with `layers` decoder layers) on the mock, with
    a KV cache of `context` positions (each user holds one token: the mock computes nothing, so the ops
    do not depend on how full the cache is; SDPA's reads are costed for a full one)."""
    import ttnn

    from bitnet_tt.backends.ttnn.backend import TTNNBackend
    from bitnet_tt.backends.ttnn.config import TTOptions
    from bitnet_tt.backends.ttnn.device import open_tt_device
    from bitnet_tt.backends.ttnn.trace import TTCallHook

    from .contract import model_config

    config = replace(model_config("2b4t", 0), num_layers=layers)
    device = record_step.device = getattr(record_step, "device", None) or open_tt_device(ttnn, allow_mock=True)
    backend = TTNNBackend(config, None, ttnn, device, users, context, TTOptions(use_trace=False))
    slots = list(range(users))
    for slot in slots:
        backend.prefill(slot, [1])
    ops = []

    def record(name, call):  # classified at once: holding the calls would keep their L1 tensors alive
        op = classify(name, call, board, context, users)
        result = call()
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        if any(isinstance(output, ttnn.Tensor) for output in outputs):  # not a host helper (memory configs, core sets)
            ops.append(op)
        return result

    real = backend.steps.tt
    backend.steps.tt = backend.model.tt = TTCallHook(real, record)
    try:
        backend.decode_greedy(slots, [2] * users)
    finally:
        backend.steps.tt = backend.model.tt = real
    backend.close()
    del backend
    gc.collect()
    return ops


def bitnet_step(board: Board, users: int, context: int, layers: int = 30) -> list[Op]:
    """The recorded op list of one layer and of two, extended to `layers`: per-step ops + layers x per-layer ops."""
    one, two = (record_step(board, users, n, context) for n in (1, 2))
    per_layer = list((collections.Counter(two) - collections.Counter(one)).elements())
    fixed = list((collections.Counter(one) - collections.Counter(per_layer)).elements())
    return fixed + per_layer * layers


# -- levers: the same step with one change, as the model predicts it ------------------------------------


def is_ternary(op: Op) -> bool:
    return op.category.startswith("matmul") and op.dtype == "BFLOAT4_B"


def is_lm_head(op: Op) -> bool:
    return op.category.startswith("matmul") and op.dtype != "BFLOAT4_B"


def on_grid(op: Op, board: Board) -> Op:
    return replace(op, category="matmul (1D/2D)", cores=board.grid[0] * board.grid[1])


def without(ops: list[Op], category: str, count: int) -> list[Op]:
    dropped = 0
    kept = []
    for op in ops:
        if op.category == category and dropped < count:
            dropped += 1
        else:
            kept.append(op)
    return kept


def levers(ops: list[Op], board: Board) -> dict:
    """The step's op list after each lever issue 14 names (what the model says, not what a card does)."""
    return {
        "LoFi for the bfloat4_b ternary weights": [replace(op, phases=1) if is_ternary(op) else op for op in ops],
        "BitLinears as 1D matmuls on the whole grid": [on_grid(op, board) if is_ternary(op) else op for op in ops],
        "LM head as a 1D matmul on the whole grid": [on_grid(op, board) if is_lm_head(op) else op for op in ops],
        "150 fewer data-movement ops": without(ops, "data movement", 150),
        "all four": without([on_grid(replace(op, phases=1), board) if op.category.startswith("matmul") and
                             (is_ternary(op) or is_lm_head(op)) else op for op in ops], "data movement", 150),
    }


# -- the command ------------------------------------------------------------------------------------------


def fit_table(k: Constants) -> list[str]:
    lines = ["fit: published decode t/s/u vs PREDICTED", f"{'model':<18}{'board':<7}{'users':>6}{'published':>11}"
             f"{'predicted':>11}{'error %':>9}"]
    for (model, board, users, published), error in zip(FIT_TARGETS, fit_error(k)):
        predicted = published * (1 + error)
        lines.append(f"{model:<18}{board:<7}{users:>6}{published:>11.1f}{predicted:>11.1f}{100 * error:>+9.1f}")
    return lines


def report(ops: list[Op], board: Board, users: int, k: Constants) -> list[str]:
    result = predict(ops, board, users, k)
    lines = [f"2B-4T decode step on {board.name}, {users} user(s): PREDICTED by the model, not measured on a card",
             f"{'category':<24}{'ops':>6}{'ms (predicted)':>16}"]
    for category in CATEGORIES + ("host",):
        lines.append(f"{category:<24}{result['ops'].get(category, ''):>6}{result['ms'].get(category, 0.0):>16.2f}")
    lines.append(f"{'step':<24}{len(ops):>6}{result['step_ms']:>16.2f}")
    names = collections.Counter(op.name for op in ops if op.category == "data movement")
    lines.append("data movement by call: " + ", ".join(f"{name} {n}" for name, n in names.most_common()))
    lines.append(f"predicted: {result['tps_per_user']:.1f} t/s per user, {result['tps']:.0f} t/s in all")
    lines.append("levers, ranked (predicted step ms, t/s per user, gain):")
    changed = {name: predict(changed, board, users, k)["step_ms"] for name, changed in levers(ops, board).items()}
    for name, step in sorted(changed.items(), key=lambda kv: kv[1]):
        lines.append(f"  {name:<44}{step:>7.2f} ms{1e3 / step:>7.1f} t/s{100 * (result['step_ms'] / step - 1):>+7.0f}%")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--board", default="p150", choices=sorted(BOARDS))
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--shapes", default="2b4t", choices=["2b4t"])
    parser.add_argument("--context", type=int, default=256, help="tokens in each user's KV cache")
    args = parser.parse_args(argv)
    k = fit()
    print("\n".join(fit_table(k)))
    print(f"constants: {k}")
    os.environ.update(mock_env("p150-11x10" if args.board == "p150" else args.board))
    ops = bitnet_step(BOARDS[args.board], args.users, args.context)
    print("\n".join(report(ops, BOARDS[args.board], args.users, k)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
