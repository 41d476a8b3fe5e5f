"""CPU benchmark at the microsoft/bitnet-b1.58-2B-4T shapes (random weights): the cpu backend (bf16 and int8
LM head) and the golden torch backend side by side, each as a share of the machine's bandwidth ceiling.

How it measures:
- Model: a random packed checkpoint at the 2B-4T shapes is written once to --work-dir and converted to our
  format (`bitnet-tt convert`); every engine loads the converted folder (page cache warmed first).
- Read bandwidth: a multi-threaded read of 1 GB by the cpu kernels' own probe (best of 5), --threads threads,
  before and after the engines; the ceiling uses the higher reading.
- Bytes per token: what one decode step must read: the ternary weights as the engine holds them (2-bit codes
  for cpu, int8 codes for torch), the LM head (bf16 or int8), and the KV cache at the mean decode position.
  Ceiling = bandwidth / bytes per token.
- Each engine and batch size runs in a fresh process (its peak RSS, VmHWM, is its own; 1 GB = 1e9 bytes) with
  one slot of the model's full 4,096-token context (8 slots for batch 8); batch 1's peak RSS is taken with that
  slot's whole KV cache written (occupy_whole_slot), as when a user's context is full. Load: backend construction time.
  Prefill 128 = time to first token of a 128-token prompt (the first prefill after an 8-token warm-up);
  decode: 1 / the median step time over --decode-steps steps after a warm-up step. The golden torch engine times
  only --golden-ttft prompts (128): on an AVX2-only CPU its int8 GEMM prefills about a token per second.
- The int8 head's cost: logits of both heads on the same hidden states (the decode steps of the int8 run):
  PCC, top-1 agreement and KL(bf16 || int8) in nats. The weights are random, so perplexity means nothing.
- --profile-prefill: instead, where the cpu backend's load (with each --engines cpu LM head) and prefill time go, per component
  (benchmarks/cpu_profile.py), with a best-of-N microbenchmark of the prefill GEMM.
- --llama-bench PATH --gguf FILE: llama.cpp's own figures (pp128, tg32) from its llama-bench, same threads
  (benchmarks/gguf_2b4t.py writes a GGUF of the same shapes; its docstring says how to quantise it to TQ2_0).
- --engines: run only some of the engines (the side-by-side ratios need the engines they compare).
- --profile: instead, where a cpu engine's decode step goes, per component (each projection kind, RoPE +
  attention, norm + quantisation: timed in C inside the layers' one native call; LM head, Python outside the
  native calls) at batch 1 and 8, with GB/s against the probe; then a best-of-N microbenchmark of each kernel over all layers' weights, less sensitive to a
  busy machine: wall clock with --threads threads, and CPU time of one thread (against a one-thread probe).
The machine may be shared: absolute figures are noisy, so everything is also printed as a ratio measured in
the same run. Figures are printed, never asserted (tests/test_full_shapes.py asserts the memory bound).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

GB = 1e9
ENGINES = ("cpu-bf16", "cpu-int8", "torch-bf16")
GOALS = {"decode_share": 0.75, "batch8_over_batch1": 4.0, "prefill_tps": 80.0, "ttft128_s": 2.0,
         "rss_bf16_gb": 2.0, "rss_int8_gb": 1.7, "load_s": 3.0}


# ---------------------------------------------------------------------------------------------
# Workers: one engine and batch size per process; each prints one JSON line.


def peak_rss_gb() -> float:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmHWM"].split()[0]) * 1024 / GB


def prompt(length: int, seed: int, vocab: int) -> list[int]:
    import numpy as np  # not torch: the cpu engines run without it, and their peak RSS would count it

    return np.random.default_rng(seed).integers(0, vocab, length).tolist()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def open_engine(engine: str, folder: Path, slots: int, threads: int):
    from bitnet_tt.backends import create_backend
    from bitnet_tt.backends.cpu.backend import CPUOptions

    if engine == "torch-bf16":
        import torch

        torch.set_num_threads(threads)
        return create_backend("torch", folder, slots, dtype="bfloat16", progress=False)
    return create_backend("cpu", folder, slots, progress=False,
                          cpu_options=CPUOptions(threads=threads, lm_head=engine.removeprefix("cpu-")))


def decode_rate(backend, slots: list[int], first: list[int], steps: int) -> float:
    """Tokens per second over all slots: 1 / the median step time after one warm-up step."""
    ids = backend.decode_greedy(slots, first)
    times = []
    for _ in range(steps):
        ids, seconds = timed(lambda: backend.decode_greedy(slots, ids))
        times.append(seconds)
    return len(slots) / statistics.median(times)


def work_batch1(args) -> dict:
    backend, load_s = timed(lambda: open_engine(args.engine, Path(args.model), 1, args.threads))
    vocab = backend.config.vocab_size
    backend.prefill(0, prompt(8, 99, vocab))
    result = {"load_s": load_s, "ttft_s": {}}
    for length in args.ttft:
        backend.free(0)
        logits, result["ttft_s"][str(length)] = timed(lambda: backend.prefill(0, prompt(length, length, vocab)))
    backend.free(0)
    logits, seconds = timed(lambda: backend.prefill(0, prompt(128, 0, vocab)))
    result["prefill_tps"] = 128 / seconds
    result["decode_tps"] = decode_rate(backend, [0], [int(logits.argmax())], args.decode_steps)
    occupy_whole_slot(backend, 0)
    result["peak_rss_gb"] = peak_rss_gb()  # before the int8 head's check, which reads the whole bf16 table
    if args.engine == "cpu-int8":
        result["int8_head"] = int8_head_cost(backend, args.decode_steps)
    return {**result, "weight_bytes": weight_bytes(backend)}


def occupy_whole_slot(backend, slot: int) -> None:
    """Write the slot's KV-cache positions past its context, so that the peak RSS is that of a full 4,096-token
    slot (the goal's situation) without prefilling one: the cpu backend's cache pages stay unmapped until
    written (the torch backend's are written when allocated)."""
    from bitnet_tt.backends.cpu.backend import CPUBackend

    if isinstance(backend, CPUBackend):  # its cache: [layer, slot, k/v, kv head, position, dim]
        backend.model.cache[:, slot, :, :, backend.slot_length(slot):] = 0


def work_batch8(args) -> dict:
    backend = open_engine(args.engine, Path(args.model), 8, args.threads)
    vocab = backend.config.vocab_size
    first = [int(backend.prefill(s, prompt(32, s, vocab)).argmax()) for s in range(8)]
    return {"decode_tps": decode_rate(backend, list(range(8)), first, args.decode_steps), "peak_rss_gb": peak_rss_gb()}


def weight_bytes(backend) -> int:
    """Bytes of weights one decode step reads: ternary codes and the LM head."""
    if hasattr(backend.model, "weights"):  # cpu backend
        w = backend.model.weights
        return w.code_bytes() + w.head.nbytes
    return sum(b.numel() * b.element_size() for name, b in backend.model.named_buffers()
               if name.endswith(".codes") or name == "lm_head")


def int8_head_cost(backend, steps: int) -> dict:
    import numpy as np
    import torch

    from bitnet_tt.backends.cpu import kernels

    w, hidden = backend.model.weights, []
    assert w.config.tie_word_embeddings, "the bf16 reference head is the (tied) embedding"
    ids = [3]
    for _ in range(steps):
        ids = backend.decode_greedy([0], ids)
        hidden.append(backend.model.work.final[0].copy())
    x = np.stack(hidden)
    exact = kernels.head(w.embed, x, len(x), np.empty((len(x), w.config.vocab_size), np.float32))
    fast = kernels.head(w.head, x, len(x), np.empty_like(exact), w.head_scales)
    a, b = torch.from_numpy(exact).double(), torch.from_numpy(fast).double()
    pcc = min(torch.corrcoef(torch.stack([r, s]))[0, 1].item() for r, s in zip(a, b))
    kl = (a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean().item()
    return {"min_pcc": pcc, "top1_agreement": (a.argmax(-1) == b.argmax(-1)).double().mean().item(), "kl_nats": kl}


# ---------------------------------------------------------------------------------------------
# Profile: where a decode step of the cpu backend goes


class TimedKernels:
    """Stands in for the compiled module: times every call and adds it to its component's totals."""

    def __init__(self, native, component):
        self.native, self.component = native, component
        # component -> calls, seconds, bytes, CPU seconds of the calling thread
        self.totals: dict[str, list] = defaultdict(lambda: [0, 0.0, 0, 0.0])

    def __getattr__(self, name):
        fn = getattr(self.native, name)

        def timed_call(*args):
            start, start_cpu = time.perf_counter(), time.thread_time()
            result = fn(*args)
            seconds, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
            component, nbytes = self.component(name, args)
            total = self.totals[component]
            total[0], total[1], total[2], total[3] = total[0] + 1, total[1] + seconds, total[2] + nbytes, total[3] + cpu
            return result

        return timed_call


LAYERS = "layers: rest of the call"
NATIVE_NAMES = {"layers": LAYERS, "embed": "embedding", "norm": "final norm"}


def component_of(name: str, args: tuple) -> tuple[str, int]:
    """A native call's component and the bytes it reads (the layers' call is split by its own timers)."""
    if name == "head":
        return "LM head", memoryview(args[0]).nbytes
    return NATIVE_NAMES.get(name, name), 0


def work_profile(args) -> dict:
    import numpy as np

    from bitnet_tt.backends.cpu import kernels

    batches = [1, 8]
    backend = open_engine(args.engine, Path(args.model), max(batches), args.threads)
    vocab = backend.config.vocab_size
    first = [int(backend.prefill(s, prompt(32, s, vocab)).argmax()) for s in range(max(batches))]
    native, components = kernels.require(), kernels.layer_components()
    result = {"steps": {}, "micro": microbenchmark(backend, args)}
    for batch in batches:
        slots = list(range(batch))
        ids = backend.decode_greedy(slots, first[:batch])  # warm-up
        layers = backend.model.timings = np.zeros((len(components), 3))
        timed = kernels._kernels = TimedKernels(native, component_of)
        start, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(args.decode_steps):
            ids = backend.decode_greedy(slots, ids)
        result["steps"][batch] = {"step_s": (time.perf_counter() - start) / args.decode_steps,
                                  "step_cpu_s": (time.thread_time() - start_cpu) / args.decode_steps,
                                  "native_calls": sum(t[0] for t in timed.totals.values()),
                                  "totals": with_layer_components(dict(timed.totals), components, layers)}
        kernels._kernels, backend.model.timings = native, None
    return result


def with_layer_components(totals: dict, components: tuple[str, ...], layers) -> dict:
    """The native calls' totals with the layers' one call split into its components (timed in C); what the
    components leave of that call (the layers' own loop and timers) stays under its name."""
    whole = totals.pop(LAYERS)
    for name, (seconds, calls, nbytes) in zip(components, layers.tolist()):
        totals[name] = [calls, seconds, nbytes, 0.0]
    totals[LAYERS] = [whole[0], whole[1] - float(layers[:, 0].sum()), 0, whole[3]]
    return totals


def microbenchmark(backend, args, passes: int = 7) -> list[dict]:
    """Best of `passes` runs of each kernel over every layer's weights (so that they come from memory)."""
    import numpy as np

    from bitnet_tt.backends.cpu import kernels
    from bitnet_tt.backends.cpu.kernels import Activations

    model, rows = backend.model, []
    weights, path = model.weights, model.path
    for kind in ("qkv", "o_proj", "gate_up", "down"):
        projections = [layer.projections[kind] for layer in weights.layers]
        nbytes = sum(p.weight.data.nbytes for p in projections)
        for batch in (1, 8):
            acts = Activations(batch, projections[0].weight.k)
            acts.quantize(np.random.default_rng(0).standard_normal((batch, acts.k)).astype(np.float32), batch)
            out = np.empty((batch, projections[0].weight.n), np.float32)
            run = lambda threads: [kernels.matmul(p.weight, acts, batch, out, p.scale, False, path, threads)
                                   for p in projections]
            rows.append({"kernel": kind, "batch": batch, "bytes": nbytes, **best_times(run, args.threads, passes)})
    head, scales = weights.head, weights.head_scales
    for batch in (1, 8):
        x = np.random.default_rng(0).standard_normal((batch, head.shape[1])).astype(np.float32)
        out = np.empty((batch, head.shape[0]), np.float32)
        run = lambda threads: kernels.head(head, x, batch, out, scales, path, threads)
        rows.append({"kernel": f"LM head {head.dtype}", "batch": batch, "bytes": head.nbytes,
                     **best_times(run, args.threads, passes)})
    return rows


def best_times(run, threads: int, passes: int) -> dict:
    """Best wall time with `threads` threads and best CPU time of one thread (the calling one)."""
    run(threads)
    wall = min(timed(lambda: run(threads))[1] for _ in range(passes))
    cpu = []
    for _ in range(passes):
        start = time.thread_time()
        run(1)
        cpu.append(time.thread_time() - start)
    return {"wall_s": wall, "cpu1_s": min(cpu)}


def read_bandwidth_one_thread_cpu() -> float:
    """The probe on one thread, timed by its CPU time (less sensitive to other processes than wall time)."""
    import numpy as np

    from bitnet_tt.backends.cpu import kernels

    data = np.ones(int(GB) // 8, dtype=np.uint64)
    kernels.require().read_sum(data, 1)
    best = float("inf")
    for _ in range(5):
        start = time.thread_time()
        kernels.require().read_sum(data, 1)
        best = min(best, time.thread_time() - start)
    return data.nbytes / best


def report_profile(args, bandwidth: float, bandwidth_one: float, engine: str, result: dict) -> None:
    print(f"\n{engine}: {cpu_name()} | {args.threads} threads | load average {os.getloadavg()[0]:.1f} | "
          f"probe {bandwidth / GB:.1f} GB/s ({args.threads} threads), {bandwidth_one / GB:.1f} GB/s (1 thread, CPU time)")
    for batch, step in result["steps"].items():
        totals, step_s = step["totals"], step["step_s"]
        steps = args.decode_steps
        native_s = sum(t[1] for t in totals.values()) / steps
        calls = step["native_calls"] / steps
        print(f"\n  batch {batch}: {step_s * 1e3:.1f} ms/step, {int(batch) / step_s:.1f} tok/s, "
              f"{calls:.0f} native calls/step")
        print(f"  {'component':26}{'calls/step':>11}{'ms/step':>10}{'share':>8}{'GB/s':>8}{'of probe':>10}")
        for name, (count, seconds, nbytes, _) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
            rate = nbytes / seconds if nbytes else 0
            cells = f"{rate / GB:8.1f}{rate / bandwidth:10.0%}" if nbytes else f"{'':18}"
            print(f"  {name:26}{count / steps:11.0f}{seconds / steps * 1e3:10.2f}{seconds / steps / step_s:8.0%}{cells}")
        outside = step_s - native_s
        outside_cpu = step["step_cpu_s"] - sum(t[3] for t in totals.values()) / steps
        print(f"  {'python (outside natives)':26}{'':11}{outside * 1e3:10.2f}{outside / step_s:8.0%}"
              f"   (CPU time of the calling thread: {outside_cpu * 1e3:.2f} ms/step)")
    print(f"\n  kernel microbenchmark, best of 7 passes over all {args.layers} layers' weights:")
    print(f"  {'kernel':16}{'batch':>6}{'MB':>8}{'wall GB/s':>11}{'of probe':>10}{'1-thread CPU GB/s':>19}{'of probe':>10}")
    for row in result["micro"]:
        wall, cpu1 = row["bytes"] / row["wall_s"], row["bytes"] / row["cpu1_s"]
        print(f"  {row['kernel']:16}{row['batch']:6}{row['bytes'] / 1e6:8.0f}{wall / GB:11.1f}{wall / bandwidth:10.0%}"
              f"{cpu1 / GB:19.1f}{cpu1 / bandwidth_one:10.0%}")


def profile(args, model: Path) -> None:
    from bitnet_tt.config import ModelConfig
    from bitnet_tt.synthetic import config_2b4t

    args.layers = ModelConfig.from_hf_dict(config_2b4t()).num_layers
    print("measuring read bandwidth ...", flush=True)
    bandwidth, bandwidth_one = read_bandwidth(args.threads), read_bandwidth_one_thread_cpu()
    engines = [e for e in args.engines if e.startswith("cpu-")]
    if not engines:
        sys.exit("--profile profiles the cpu engines: name at least one in --engines")
    for engine in engines:
        result = spawn(args, "profile", engine, model)
        result["steps"] = {int(batch): step for batch, step in result["steps"].items()}
        report_profile(args, bandwidth, bandwidth_one, engine, result)


# ---------------------------------------------------------------------------------------------
# Driver


def prepare_model(work_dir: Path) -> Path:
    from bitnet_tt.checkpoint import CONVERTED_FILE, convert_checkpoint
    from bitnet_tt.synthetic import config_2b4t, write_random_model

    packed, converted = work_dir / "2b4t-packed", work_dir / "2b4t-packed-converted"
    if not (converted / CONVERTED_FILE).is_file():
        if not (packed / "model.safetensors").is_file():
            print(f"writing a random packed 2B-4T checkpoint to {packed} (~1.2 GB, once) ...", flush=True)
            write_random_model(packed, config_2b4t(), fmt="packed", seed=0, tokenizer=False)
        print(f"converting it to {converted} (once) ...", flush=True)
        convert_checkpoint(packed, converted, force=converted.exists(), progress=False)
    with open(converted / CONVERTED_FILE, "rb", buffering=0) as fh:  # warm the page cache
        while fh.read(64 << 20):
            pass
    return converted


def read_bandwidth(threads: int) -> float:
    import numpy as np

    from bitnet_tt.backends.cpu import kernels

    data = np.ones(int(GB) // 8, dtype=np.uint64)
    best = min(timed(lambda: kernels.require().read_sum(data, threads))[1] for _ in range(5))
    return data.nbytes / best


def spawn(args, worker: str, engine: str, model: Path) -> dict:
    ttft = args.ttft if engine.startswith("cpu") else args.golden_ttft
    cmd = [sys.executable, __file__, "--worker", worker, "--engine", engine, "--model", str(model),
           "--threads", str(args.threads), "--decode-steps", str(args.decode_steps), "--ttft", ",".join(map(str, ttft))]
    print(f"  {engine} {worker} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker {engine} {worker} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llama_bench(args) -> dict:
    """llama.cpp's prompt processing (128 tokens) and generation (32 tokens) rates from its llama-bench."""
    proc = subprocess.run([args.llama_bench, "-m", str(args.gguf), "-p", "128", "-n", "32", "-t", str(args.threads),
                           "-o", "json"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"llama-bench failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    rows = json.loads(proc.stdout)
    rate = lambda key: next(r["avg_ts"] for r in rows if r[key] > 0 and r["n_gen" if key == "n_prompt" else "n_prompt"] == 0)
    return {"prefill_tps": rate("n_prompt"), "decode_tps": rate("n_gen")}


def kv_bytes_per_token(position: int) -> int:
    from bitnet_tt.config import ModelConfig
    from bitnet_tt.synthetic import config_2b4t

    cfg = ModelConfig.from_hf_dict(config_2b4t())
    return 2 * cfg.num_layers * cfg.kv_size * 4 * position  # fp32 keys and values (bf16 in torch bf16: same order)


def report(args, bandwidth: float, results: dict, llama: dict | None) -> None:
    position = 128 + args.decode_steps // 2
    print(f"\n2B-4T shapes, random weights | {cpu_name()} | {args.threads} threads | load average "
          f"{args.loadavg_before:.1f} -> {os.getloadavg()[0]:.1f} (a shared machine makes absolute figures noisy)")
    print(f"read bandwidth (measured here, before / after the engines): "
          f"{' / '.join(f'{b / GB:.1f}' for b in args.bandwidths)} GB/s; the ceiling uses {bandwidth / GB:.1f}\n")
    header = f"{'':34}" + "".join(f"{e:>16}" for e in results) + (f"{'llama.cpp':>16}" if llama else "")
    print(header)
    lengths = sorted({int(n) for one, _ in results.values() for n in one["ttft_s"]})
    rows: dict[str, list[str]] = {}
    for engine in results:
        one, eight = results[engine]
        per_token = one["weight_bytes"] + kv_bytes_per_token(position)
        ceiling = bandwidth / per_token
        cells = {
            "bytes per decode token (GB)": f"{per_token / GB:.3f}",
            "ceiling (tok/s)": f"{ceiling:.1f}",
            "decode batch 1 (tok/s)": f"{one['decode_tps']:.2f}",
            "  share of ceiling": f"{one['decode_tps'] / ceiling:.0%}",
            "decode batch 8 (tok/s, all)": f"{eight['decode_tps']:.2f}",
            "  batch 8 / batch 1": f"{eight['decode_tps'] / one['decode_tps']:.2f}x",
            "prefill 128 (tok/s)": f"{one['prefill_tps']:.1f}",
            **{f"TTFT {n} (s)": f"{one['ttft_s'][str(n)]:.2f}" if str(n) in one["ttft_s"] else "-" for n in lengths},
            "peak RSS batch 1 (GB)": f"{one['peak_rss_gb']:.2f}",
            "load converted model (s)": f"{one['load_s']:.2f}",
        }
        for name, cell in cells.items():
            rows.setdefault(name, []).append(cell)
    for name, cells in rows.items():
        extra = ""
        if llama and name.startswith(("decode batch 1", "prefill 128")):
            extra = f"{llama['decode_tps' if name.startswith('decode') else 'prefill_tps']:>16.2f}"
        print(f"{name:34}" + "".join(f"{c:>16}" for c in cells) + extra)
    if {"cpu-bf16", "torch-bf16"} <= results.keys():
        fast, golden = results["cpu-bf16"][0], results["torch-bf16"][0]
        print(f"\ncpu bf16 over torch bf16 (golden): decode {fast['decode_tps'] / golden['decode_tps']:.1f}x, "
              f"prefill {fast['prefill_tps'] / golden['prefill_tps']:.1f}x"
              + (f"; over llama.cpp: decode {fast['decode_tps'] / llama['decode_tps']:.2f}x" if llama else ""))
    if "cpu-int8" in results:
        cost = results["cpu-int8"][0]["int8_head"]
        print(f"int8 LM head vs bf16 on {args.decode_steps} positions: min PCC {cost['min_pcc']:.6f}, top-1 "
              f"agreement {cost['top1_agreement']:.0%}, KL {cost['kl_nats']:.2e} nats")
    print_goals(args, bandwidth, results, position)


def print_goals(args, bandwidth: float, results: dict, position: int) -> None:
    print("\ngoals (issue #13):")
    cpu_engines = [e for e in ("cpu-bf16", "cpu-int8") if e in results]
    for engine in cpu_engines:
        one, eight = results[engine]
        share = one["decode_tps"] / (bandwidth / (one["weight_bytes"] + kv_bytes_per_token(position)))
        verdict(f"{engine} decode batch 1 >= 75% of ceiling", share >= GOALS["decode_share"], f"{share:.0%}")
        scale = eight["decode_tps"] / one["decode_tps"]
        verdict(f"{engine} batch 8 >= 4x batch 1", scale >= GOALS["batch8_over_batch1"], f"{scale:.2f}x")
    if "cpu-bf16" not in results:
        return
    one = results["cpu-bf16"][0]
    verdict("prefill 128 >= 80 tok/s", one["prefill_tps"] >= GOALS["prefill_tps"], f"{one['prefill_tps']:.1f}")
    if "128" in one["ttft_s"]:
        verdict("TTFT 128 < 2 s", one["ttft_s"]["128"] < GOALS["ttft128_s"], f"{one['ttft_s']['128']:.2f} s")
    for engine, goal in (("cpu-bf16", "rss_bf16_gb"), ("cpu-int8", "rss_int8_gb")):
        if engine not in results:
            continue
        one = results[engine][0]
        verdict(f"{engine} peak RSS <= {GOALS[goal]} GB", one["peak_rss_gb"] <= GOALS[goal], f"{one['peak_rss_gb']:.2f} GB")
        verdict(f"{engine} converted-model load <= 3 s", one["load_s"] <= GOALS["load_s"], f"{one['load_s']:.2f} s")


def verdict(goal: str, met: bool, figure: str) -> None:
    print(f"  {'met   ' if met else 'MISSED'} {goal}: {figure}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=Path("bench-models"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per engine")
    p.add_argument("--ttft", type=lambda s: [int(n) for n in s.split(",") if n], default=[128, 2048],
                   help="prompt lengths for time to first token")
    p.add_argument("--golden-ttft", type=lambda s: [int(n) for n in s.split(",") if n], default=[128],
                   help="the golden (torch) engine's prompt lengths: on an AVX2-only CPU it prefills ~1 token/s")
    p.add_argument("--llama-bench", help="path to llama.cpp's llama-bench (with --gguf: a TQ2_0 GGUF of the same shapes)")
    p.add_argument("--gguf", type=Path)
    p.add_argument("--engines", type=lambda s: [e for e in s.split(",") if e], default=list(ENGINES),
                   help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--profile", action="store_true", help="per-component profile of the cpu engines' decode step")
    p.add_argument("--profile-prefill", action="store_true",
                   help="instead: where the cpu backend's load and prefill time goes (benchmarks/cpu_profile.py)")
    p.add_argument("--profile-tokens", type=int, default=128, help="prompt length of --profile-prefill")
    p.add_argument("--profile-repeats", type=int, default=3, help="prefills of --profile-prefill (the best is shown)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        workers = {"batch1": work_batch1, "batch8": work_batch8, "profile": work_profile}
        print(json.dumps(workers[args.worker](args)), flush=True)
        return
    if bool(args.llama_bench) != bool(args.gguf):
        sys.exit("--llama-bench and --gguf go together")
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown or not args.engines:
        sys.exit(f"--engines: choose from {', '.join(ENGINES)} (got {','.join(unknown) or 'none'})")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args.work_dir)
    if args.profile:
        return profile(args, model)
    if args.profile_prefill:
        import cpu_profile

        print(f"{cpu_name()} | {args.threads} threads | load average {os.getloadavg()[0]:.1f}")
        for engine in [e for e in args.engines if e.startswith("cpu-")]:  # the load of each LM head
            cpu_profile.profile_load(model, args.threads, engine.removeprefix("cpu-"))
        cpu_profile.profile_prefill(model, args.threads, args.profile_tokens, args.profile_repeats)
        cpu_profile.gemm_microbenchmark(model, args.threads, args.profile_tokens)
        return
    args.loadavg_before = os.getloadavg()[0]
    # The probe before and after the engines: this VM's read bandwidth has moved between 34 and 54 GB/s over a
    # morning, and the higher reading gives the stricter ceiling.
    before = read_bandwidth(args.threads)
    results = {e: (spawn(args, "batch1", e, model), spawn(args, "batch8", e, model)) for e in args.engines}
    args.bandwidths = (before, read_bandwidth(args.threads))
    report(args, max(args.bandwidths), results, llama_bench(args) if args.llama_bench else None)


if __name__ == "__main__":
    main()
