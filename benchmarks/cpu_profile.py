"""Where the cpu backend's load and prefill time go (benchmarks/cpu.py --profile-prefill): one process loads the
converted 2B-4T model and prefills --profile-tokens tokens with timers around each component.

Load: wall time of each step of load_cpu_weights (the mapped tables' checks run in a background thread, so
their time overlaps the layers'). Prefill: wall time per projection kind with its int8 GOP/s (2 * rows * n * k
per second), RoPE + KV-cache write + attention, norm + quantisation, the LM head, and the rest (Python, the
embedding) as the difference to the step's total; the best of --profile-repeats prefills of the same prompt.
On a shared machine wall times stretch with the load; the process's CPU time stretches much less, and with
--threads 1 it is the wall time one free core would take.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

TIMES: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)


def timing(name: str, fn):
    """fn with its wall time added to TIMES[name] on each call."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - start
            COUNTS[name] += 1
    return timed


@contextmanager
def patched(owner, attribute: str, name: str):
    original = getattr(owner, attribute)
    setattr(owner, attribute, timing(name, original))
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def profile_load(folder: Path, threads: int, lm_head: str = "bf16"):
    from contextlib import ExitStack

    from bitnet_tt import tensorfiles
    from bitnet_tt.backends.cpu import kernels, weights

    hooks = [(weights, "open_model", "open model, side-file checksums"),
             (tensorfiles, "read_into", "file reads of read tensors"),
             (tensorfiles, "array_sha256", "checksums of read tensors"),
             (tensorfiles, "all_finite", "finite checks (read tensors, mapped tables' chunks)"),
             (tensorfiles.TensorFiles, "check_stored", "mapped tables: checksum + finite [background]"),
             (kernels.PackedTernary, "__init__", "repack 2-bit codes into the kernels' layout"),
             (weights, "int8_head", "int8 LM head conversion")]
    TIMES.clear(), COUNTS.clear()
    with ExitStack() as stack:
        for owner, attribute, name in hooks:
            stack.enter_context(patched(owner, attribute, name))
        start, cpu_start = time.perf_counter(), time.process_time()
        loaded = weights.load_cpu_weights(folder, lm_head, progress=False, threads=threads)
        total, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"\nload of {folder} ({lm_head} head, {threads} threads): {total:.2f} s; CPU time of all threads {cpu_s:.2f} s")
    for name, seconds in sorted(TIMES.items(), key=lambda item: -item[1]):
        print(f"  {name:52} {seconds:7.3f} s  {seconds / total:5.0%}  ({COUNTS[name]} calls)")
    return loaded


def profile_prefill(folder: Path, threads: int, tokens: int, repeats: int) -> None:
    import numpy as np

    from bitnet_tt.backends.cpu import kernels
    from bitnet_tt.backends.cpu.backend import CPUBackend, CPUOptions

    backend = CPUBackend(folder, 1, options=CPUOptions(threads=threads), progress=False)
    cpu = backend.model
    shapes = {key: (p.weight.n, p.weight.k) for key, p in cpu.weights.layers[0].projections.items()}
    ids = np.random.default_rng(0).integers(0, cpu.config.vocab_size, tokens).tolist()
    backend.prefill(0, ids[:8])  # warm-up: pool threads, first pages of the workspaces
    best = None
    for _ in range(repeats):
        backend.free(0)
        TIMES.clear()
        cpu.timings = np.zeros((len(kernels.layer_components()), 3))  # the layers' components, timed in C
        with patched(kernels, "head", "final norm + LM head"), patched(kernels, "norm", "final norm + LM head"):
            start, cpu_start = time.perf_counter(), time.process_time()
            backend.prefill(0, ids)
            total, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        TIMES.update(zip(kernels.layer_components(), cpu.timings[:, 0].tolist()))
        cpu.timings = None
        if best is None or total < best[0]:
            best = (total, cpu_s, dict(TIMES))
    total, cpu_s, times = best
    print(f"\nprefill of {tokens} tokens ({threads} threads, best of {repeats}): {total:.2f} s, {tokens / total:.1f} tok/s; "
          f"CPU time of all threads {cpu_s:.2f} s (with 1 thread, the wall time a free core would take)")
    for name, seconds in sorted(times.items(), key=lambda item: -item[1]):
        extra = ""
        if name in shapes:
            n, k = shapes[name]
            extra = f"  {2 * tokens * n * k * cpu.config.num_layers / seconds / 1e9:6.1f} GOP/s ({n}x{k})"
        print(f"  {name:32} {seconds:7.3f} s  {seconds / total:5.0%}{extra}")
    rest = total - sum(times.values())
    print(f"  {'Python, embedding':32} {rest:7.3f} s  {rest / total:5.0%}")


def gemm_microbenchmark(folder: Path, threads: int, tokens: int, passes: int = 5) -> None:
    """Best of `passes` of each projection kind's product at `tokens` tokens (layer 0's weights: the GEMM is
    compute-bound, they stay in cache): wall GOP/s with `threads` threads and CPU-time GOP/s of one thread,
    which a busy machine disturbs less."""
    import numpy as np

    from bitnet_tt.backends.cpu import kernels
    from bitnet_tt.backends.cpu.kernels import Activations
    from bitnet_tt.backends.cpu.weights import load_cpu_weights

    layer = load_cpu_weights(folder, progress=False, threads=threads).layers[0]
    print(f"\nprefill GEMM microbenchmark, {tokens} tokens, best of {passes} ({kernels.paths()[0]} path):")
    print(f"  {'projection':12}{'n x k':>12}{'wall GOP/s':>12}{'1-thread CPU GOP/s':>20}")
    for kind, p in layer.projections.items():
        n, k = p.weight.n, p.weight.k
        acts = Activations(tokens, k)
        acts.quantize(np.random.default_rng(0).standard_normal((tokens, k)).astype(np.float32), tokens)
        out = np.empty((tokens, n), np.float32)
        run = lambda t: kernels.matmul(p.weight, acts, tokens, out, p.scale, threads=t)
        run(threads)
        wall = min(clock(time.perf_counter, lambda: run(threads)) for _ in range(passes))
        cpu = min(clock(time.thread_time, lambda: run(1)) for _ in range(passes))
        ops = 2 * tokens * n * k
        print(f"  {kind:12}{f'{n}x{k}':>12}{ops / wall / 1e9:12.1f}{ops / cpu / 1e9:20.1f}")


def clock(now, fn) -> float:
    start = now()
    fn()
    return now() - start
