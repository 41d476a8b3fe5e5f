"""Where the cpu backend's peak memory (VmHWM) comes from, phase by phase, at the 2B-4T shapes.

One process per LM head dtype runs what benchmarks/cpu.py's batch-1 worker runs (load with one slot of the full
context, an 8-token warm-up, prompts of 128 and 2,048 tokens, a 128-token prefill, decode steps), then fills the
slot to the model's full context (issue #13's situation: every KV-cache page written) and prints,
after each phase: the peak resident set during that phase (the kernel's high-water mark is reset before it,
/proc/self/clear_refs), the resident set after it, split into anonymous memory and file pages (a mapped
checkpoint), and the modules that weigh most (torch?). 1 GB = 1e9 bytes.

    python benchmarks/memory.py --work-dir /work/bench-models [--heads bf16,int8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9


def memory() -> dict[str, float]:
    """Resident set (now, anonymous, file pages) and its high-water mark, in GB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = lambda key: int(status[key].split()[0]) * 1024 / GB
    return {"peak": kb("VmHWM"), "rss": kb("VmRSS"), "anon": kb("RssAnon"), "file": kb("RssFile")}


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


class Phases:
    def __init__(self):
        self.rows, self.overall = [], 0.0

    def run(self, name: str, fn):
        reset_peak()
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        m = memory()
        self.overall = max(self.overall, m["peak"])
        self.rows.append({"phase": name, "s": seconds, **m, "torch": "torch" in sys.modules})
        return result


def worker(folder: Path, head: str, threads: int, decode_steps: int) -> dict:
    import numpy as np

    phases = Phases()
    phases.rows.append({"phase": "python + numpy", "s": 0.0, **memory(), "torch": "torch" in sys.modules})

    def imports():
        from bitnet_tt.backends import create_backend
        from bitnet_tt.backends.cpu.backend import CPUOptions
        return create_backend, CPUOptions

    create_backend, CPUOptions = phases.run("import bitnet_tt.backends", imports)
    backend = phases.run("load", lambda: create_backend("cpu", folder, 1, progress=False,
                                                         cpu_options=CPUOptions(threads=threads, lm_head=head)))
    vocab = backend.config.vocab_size
    prompt = lambda length, seed: np.random.default_rng(seed).integers(0, vocab, length).tolist()
    phases.run("prefill 8 (warm-up)", lambda: backend.prefill(0, prompt(8, 99)))
    for length in (128, 2048, 128):
        backend.free(0)
        logits = phases.run(f"prefill {length}", lambda: backend.prefill(0, prompt(length, length)))
    first = int(np.asarray(logits).argmax())

    def decode():
        ids = [first]
        for _ in range(decode_steps):
            ids = backend.decode_greedy([0], ids)

    phases.run(f"decode {decode_steps}", decode)
    fill = backend.max_context - backend.slot_length(0)
    phases.run(f"fill the slot ({backend.max_context})", lambda: backend.prefill(0, prompt(fill, fill)))
    return {"head": head, "rows": phases.rows, "overall_peak": phases.overall,
            "heavy_modules": sorted(m for m in ("torch", "safetensors.torch", "tqdm", "pydantic") if m in sys.modules)}


def report(result: dict) -> None:
    print(f"\nLM head {result['head']}: overall peak {result['overall_peak']:.3f} GB "
          f"(modules loaded: {', '.join(result['heavy_modules']) or 'none of torch, tqdm, pydantic'})")
    print(f"  {'phase':26}{'seconds':>9}{'peak':>8}{'rss':>8}{'anon':>8}{'file':>8}  torch")
    for r in result["rows"]:
        print(f"  {r['phase']:26}{r['s']:9.2f}{r['peak']:8.3f}{r['rss']:8.3f}{r['anon']:8.3f}{r['file']:8.3f}"
              f"  {'yes' if r['torch'] else 'no'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=Path("bench-models"))
    p.add_argument("--heads", type=lambda s: [h for h in s.split(",") if h], default=["bf16", "int8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    folder = args.work_dir / "2b4t-packed-converted"
    if args.worker:
        print(json.dumps(worker(folder, args.worker, args.threads, args.decode_steps)), flush=True)
        return
    if not folder.is_dir():
        sys.exit(f"{folder} is missing: benchmarks/cpu.py --work-dir {args.work_dir} writes it")
    with open(next(folder.glob("*.safetensors")), "rb", buffering=0) as fh:  # warm the page cache
        while fh.read(64 << 20):
            pass
    for head in args.heads:
        proc = subprocess.run([sys.executable, __file__, "--worker", head, "--work-dir", str(args.work_dir),
                               "--threads", str(args.threads), "--decode-steps", str(args.decode_steps)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"worker {head} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        report(json.loads(proc.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
