"""CPU benchmark at the microsoft/bitnet-b1.58-2B-4T shapes (random weights): our backend against HF.

What is measured, and how:
- Models: a bf16 master checkpoint (seed 0) is written once to --work-dir, then converted to our
  format with `convert_checkpoint`; both are reused on later runs.
- Every scenario runs in a fresh subprocess (this file with --worker), so the peak RSS it reports
  (VmHWM: torch itself, the weights, KV cache and temporaries; 1 GB = 1e9 bytes) is its own.
  The weight files are read once beforehand, so all loads see a warm page cache.
- Load: wall time of `load_torch_backend` (bf16, 1 slot) from the master (ternarised at load) and
  from the converted folder; Python and torch import time is not included.
- Ours (bf16, loaded from the converted folder): a short warm-up prefill, then prefill of a
  --prompt-len prompt (tokens/s), then --decode-steps greedy decode steps at batch 1; in a second
  process 8 slots each get a different prompt, then --decode-steps steps decode all 8 together
  (tokens/s counts all 8). The first decode step is a warm-up; decode speed is 1 / the median step
  time (robust to other work on the machine); prefill is a single timed call after the warm-up.
- HF: `BitNetForCausalLM.from_pretrained(master, dtype=bfloat16)`; the config's quantization_mode is
  "online", so every forward ternarises the bf16 weights again, as HF does. Same warm-up, prompt and
  greedy decode with HF's own KV cache (past_key_values), batch 1, --hf-decode-steps timed steps
  (each HF step re-quantises 2.1 G weights: tens of seconds on 2 cores, hence the few steps).
  It runs with TORCHDYNAMO_DISABLE=1: HF wraps its quantisers in torch.compile; eager is the same math.
Figures are printed, never asserted; speeds depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9
RSS_GOAL_GB = 2.5
SPEEDUP_GOAL = 2.0
WARMUP_TOKENS = 8
BATCH = 8


# ---------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line.


def memory_gb() -> dict:
    """Peak RSS (VmHWM of this process's own address space) and current RSS split anon / file-backed.

    Workers call it at the end of their scenario, with the model still alive.

    Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a child would report the
    parent's peak (the driver's ~9 GB while writing the master checkpoint) instead of its own.
    File-backed RSS is mmapped checkpoint pages (and libraries): clean, but counted in RSS.
    """
    status = Path("/proc/self/status")
    if not status.exists():  # not Linux: ru_maxrss is in bytes on macOS
        return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GB}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    kb = lambda key: int(fields[key].split()[0]) * 1024 / GB
    return {"peak_rss_gb": kb("VmHWM"), "anon_gb": kb("RssAnon"), "file_gb": kb("RssFile")}


def prompt_ids(length: int, seed: int, vocab: int) -> list[int]:
    import torch

    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def load_ours(folder: Path, slots: int, context: int):
    from bitnet_tt.backends.torch.backend import load_torch_backend

    return timed(lambda: load_torch_backend(folder, max_slots=slots, max_context=context, dtype="bfloat16", progress=False))


def work_load(args) -> dict:
    _backend, seconds = load_ours(Path(args.model), 1, context_needed(args))
    return {"load_s": seconds, **memory_gb()}


def work_ours(args, batch: int) -> dict:
    backend, load_s = load_ours(Path(args.model), batch, context_needed(args))
    vocab = backend.config.vocab_size
    backend.prefill(0, prompt_ids(WARMUP_TOKENS, 99, vocab))  # warm-up, then forget it
    backend.free(0)
    prompts = [prompt_ids(args.prompt_len, seed, vocab) for seed in range(batch)]
    logits, prefill_s = timed(lambda: [backend.prefill(s, p) for s, p in enumerate(prompts)])
    slots = list(range(batch))
    next_ids = [int(row.argmax()) for row in logits]
    step = lambda ids: backend.decode(slots, ids).argmax(-1).tolist()
    step_s = median_step_seconds(step, step(next_ids), args.decode_steps)  # the first step is a warm-up
    return {"load_s": load_s, "prefill_tps": batch * args.prompt_len / prefill_s, "decode_tps": batch / step_s,
            **memory_gb()}


def work_hf(args) -> dict:
    import torch
    from transformers import BitNetForCausalLM

    model, load_s = timed(lambda: BitNetForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval())
    vocab = model.config.vocab_size
    with torch.inference_mode():
        model(torch.tensor([prompt_ids(WARMUP_TOKENS, 99, vocab)]), use_cache=True)  # warm-up
        ids = torch.tensor([prompt_ids(args.prompt_len, 0, vocab)])
        out, prefill_s = timed(lambda: model(ids, use_cache=True))
        step = lambda o: model(o.logits[:, -1:].argmax(-1), past_key_values=o.past_key_values, use_cache=True)
        step_s = median_step_seconds(step, step(out), args.hf_decode_steps)  # the first step is a warm-up
    return {"load_s": load_s, "prefill_tps": args.prompt_len / prefill_s, "decode_tps": 1 / step_s, **memory_gb()}


def median_step_seconds(step, state, steps: int) -> float:
    """Run `steps` greedy decode steps from `state`; the median step time resists other load on the machine."""
    times = []
    for _ in range(steps):
        state, seconds = timed(lambda: step(state))
        times.append(seconds)
    return statistics.median(times)


def context_needed(args) -> int:
    return args.prompt_len + max(args.decode_steps, args.hf_decode_steps) + 1


def run_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    jobs = {"load": work_load, "ours-b1": lambda a: work_ours(a, 1), f"ours-b{BATCH}": lambda a: work_ours(a, BATCH),
            "hf": work_hf}
    print(json.dumps(jobs[args.worker](args)), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver


def prepare_models(work_dir: Path) -> tuple[Path, Path]:
    """The bf16 master and its converted copy in work_dir, made on first use (atomically)."""
    from bitnet_tt.checkpoint import CONVERTED_FILE, convert_checkpoint
    from bitnet_tt.synthetic import config_2b4t, write_random_model

    master, converted = work_dir / "2b4t-master", work_dir / "2b4t-converted"
    if not (master / "model.safetensors").is_file():
        partial = work_dir / "2b4t-master.partial"
        shutil.rmtree(partial, ignore_errors=True)
        print(f"writing a random bf16 master checkpoint to {master} (~4.8 GB, once) ...", flush=True)
        write_random_model(partial, config_2b4t(), fmt="master", seed=0, tokenizer=False)
        partial.rename(master)
    if not (converted / CONVERTED_FILE).is_file():
        print(f"converting it to {converted} (once) ...", flush=True)
        convert_checkpoint(master, converted, force=converted.exists(), progress=False)
    return master, converted


def warm_page_cache(*folders: Path) -> None:
    buf = bytearray(64 << 20)
    for folder in folders:
        for path in folder.glob("*.safetensors"):
            with open(path, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def spawn(args, worker: str, model: Path, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--model", str(model), "--threads", str(args.threads),
           "--prompt-len", str(args.prompt_len), "--decode-steps", str(args.decode_steps),
           "--hf-decode-steps", str(args.hf_decode_steps)]
    print(f"  running {worker} on {model.name} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"worker {worker} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def fmt(value: float | None, width: int = 10) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.2f}"


def report(args, load: dict, ours1: dict, ours8: dict, hf: dict | None) -> None:
    import torch

    hf = hf or {}
    print(f"\nBitNet b1.58 2B-4T shapes, random weights | torch {torch.__version__} | {args.threads} threads | "
          f"{platform.processor() or platform.machine()} | prompt {args.prompt_len} tokens | "
          f"decode {args.decode_steps} steps (HF {args.hf_decode_steps}) after 1 warm-up step, median step time\n"
          f"load average (1 min) before/after: {args.loadavg_before:.2f} / {os.getloadavg()[0]:.2f}")
    print("\nLoad to a ready bf16 backend (fresh process, warm page cache):")
    master_s, conv_s = load["master"]["load_s"], load["converted"]["load_s"]
    print(f"  bf16 master (ternarised at load) {master_s:7.2f} s   peak RSS {load['master']['peak_rss_gb']:.2f} GB")
    print(f"  converted (bitnet-tt format)     {conv_s:7.2f} s   peak RSS {load['converted']['peak_rss_gb']:.2f} GB")
    print(f"  master / converted: {master_s / conv_s:.1f}x")
    hf_note = "" if hf else " (HF skipped)"
    print(f"\nThroughput, bf16{hf_note}. HF runs eager (TORCHDYNAMO_DISABLE=1), online quantisation:")
    rows = [
        ("prefill tok/s", ours1["prefill_tps"], hf.get("prefill_tps")),
        ("decode b1 tok/s", ours1["decode_tps"], hf.get("decode_tps")),
        (f"decode b{BATCH} tok/s (all slots)", ours8["decode_tps"], None),
        ("peak RSS GB, b1 process", ours1["peak_rss_gb"], hf.get("peak_rss_gb")),
        (f"peak RSS GB, b{BATCH} process", ours8["peak_rss_gb"], None),
        ("load s (HF: lazy, mmapped)", ours1["load_s"], hf.get("load_s")),
    ]
    print(f"  {'(tok/s: higher is better)':30} {'ours':>10} {'HF':>10} {'ours/HF':>9}")
    for name, ours, theirs in rows:
        print(f"  {name:30} {fmt(ours)} {fmt(theirs)} {ratio(ours, theirs):>9}")
    for name, r in (("b1", ours1), (f"b{BATCH}", ours8), ("HF", hf)):
        if "anon_gb" in r:
            print(f"  {name} process RSS at the end: {r['anon_gb']:.2f} GB anonymous + {r['file_gb']:.2f} GB file-backed (mmap)")
    peak = max(ours1["peak_rss_gb"], ours8["peak_rss_gb"])
    print(f"\nGoal peak RSS < {RSS_GOAL_GB} GB: {'met' if peak < RSS_GOAL_GB else 'NOT met'} "
          f"(b1 {ours1['peak_rss_gb']:.2f} GB, b{BATCH} {ours8['peak_rss_gb']:.2f} GB)")
    if hf:
        speedup = ours1["decode_tps"] / hf["decode_tps"]
        print(f"Headline decode b1 ours/HF: {speedup:.1f}x (goal >= {SPEEDUP_GOAL:.0f}x: "
              f"{'met' if speedup >= SPEEDUP_GOAL else 'NOT met'})")
    print(f"Load time master/converted: {master_s / conv_s:.1f}x")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=Path("bench-models"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=32, help="timed decode steps of our backend")
    p.add_argument("--hf-decode-steps", type=int, default=3, help="timed decode steps of HF (slow)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    args.loadavg_before = os.getloadavg()[0]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    master, converted = prepare_models(args.work_dir)
    warm_page_cache(master, converted)
    load = {"master": spawn(args, "load", master), "converted": spawn(args, "load", converted)}
    ours1 = spawn(args, "ours-b1", converted)
    ours8 = spawn(args, f"ours-b{BATCH}", converted)
    hf = None if args.skip_hf else spawn(args, "hf", master, env={"TORCHDYNAMO_DISABLE": "1"})
    report(args, load, ours1, ours8, hf)


if __name__ == "__main__":
    main()
