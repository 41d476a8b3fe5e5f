"""Serving many users on a CPU backend (cpu or torch): chunked prefill and the prefix cache, as ratios side by side.

What is measured, and how (greedy, ignore_eos, random token-id prompts; the engine in-process):
- Model: random weights at the 2B-4T layer shapes (hidden 2560, MLP 6912, 20 query and 5 KV heads) with
  --layers of its 30 layers and the vocabulary cut in the same proportion, so that a decode step and a
  prefill chunk keep about the real model's cost ratio while a run takes minutes on a small CPU. Written
  once to the bitnet-tt cache ($BITNET_TT_CACHE or ~/.cache/bitnet-tt), or --model.
- sweep: 8 users decode; pairs of steps alternate a step that also prefills a C-token prompt and a
  decode-only step. Printed per C: median(mixed step) / median(decode-only step), the bound a chunk of C
  puts on inter-token latency, the prompt tokens/s of those steps, and the prompt tokens/s of a 512-token
  prompt prefilled in chunks of C with nobody decoding. It picks the default --prefill-chunk.
- interference: 8 users decode; a 2,048-token prompt arrives. Inter-token latency (ITL) p99 of the 8
  streams from its arrival until its first token, over their p99 without it: the same users from the same
  start for as many steps, so that their contexts grow alike (goal <= 2x). Chunked prefill (--prefill-chunk;
  on a backend that paces prefill, paced chunks of at most that, engine/pacing.py, and fixed ones) and
  whole-prompt prefill; and the arriving prompt's own time to first token (median).
- prefix: a chat's second turn over a 1,500-token history (the first turn's prompt and reply, then a new
  30-token message): time to first token without the prefix cache (cache_prompt false) over with it
  (goal >= 5x).
- throughput: 8 users, each sending 3 requests one after the other (128-token prompts, 64 tokens each; user
  i's first request is cut to (i + 1) / 8 of that, so that the users fall out of step), so that prompts
  arrive while the others decode: every generated token over the wall time, chunked (as in interference)
  over whole-prompt prefill (goal: 1x within noise).
Sections other than sweep run --rounds times, alternating the settings; ratios use pooled figures.
The machine may be shared: read ratios, not absolute times. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bitnet_tt.backends import create_backend
from bitnet_tt.config import ModelConfig
from bitnet_tt.engine import Engine
from bitnet_tt.engine.request import percentile
from bitnet_tt.engine.scheduler import IDLE_PREFILL_CHUNK
from bitnet_tt.sampling import SamplingParams
from bitnet_tt.synthetic import config_2b4t, write_random_model
from bitnet_tt.tokenizer import Tokenizer

USERS = 8
ARRIVING_PROMPT = 2048
HISTORY = 1500
NEW_MESSAGE = 30
THROUGHPUT_PROMPT, THROUGHPUT_TOKENS, THROUGHPUT_REQUESTS = 128, 64, 3  # per request; requests per user
SWEEP_ALONE = 512  # prompt tokens prefilled with nobody decoding, in chunks
WARM_STEPS = 16  # decode steps of the users before the interference window
FULL_LAYERS, FULL_VOCAB = 30, 128256


def greedy(max_new_tokens: int, cache_prompt: bool = True) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True, cache_prompt=cache_prompt)


class Bench:
    def __init__(self, backend, tokenizer: Tokenizer):
        self.backend, self.tokenizer = backend, tokenizer
        self.gen = torch.Generator().manual_seed(0)

    def engine(self, chunk: int, paced: bool = True, idle_chunk: int = IDLE_PREFILL_CHUNK) -> Engine:
        """A fresh engine on the shared backend (its slot pool starts empty: nothing cached); paced: chunks sized
        by measured step times (if the backend paces prefill), else fixed; idle_chunk: a step's prompt tokens
        when nobody decodes (at least chunk)."""
        return Engine(self.backend, self.tokenizer, prefill_chunk=chunk, idle_prefill_chunk=idle_chunk,
                      **({} if paced else {"mixed_step_limit": None}))

    def prompt(self, length: int) -> list[int]:
        return torch.randint(0, self.backend.config.vocab_size - 3, (length,), generator=self.gen).tolist()

    def start_users(self, engine: Engine, max_new_tokens: int = 100_000) -> list:
        users = [engine.submit(self.prompt(16), greedy(max_new_tokens)) for _ in range(USERS)]
        while not all(u.output_ids for u in users):
            engine.step()
        engine.step()
        return users

    @staticmethod
    def stop(engine: Engine, requests) -> None:
        for request in requests:
            engine.cancel(request.id)
        engine.run()

    # -- sections ----------------------------------------------------------------------------------

    def sweep(self, chunks: list[int], pairs: int) -> list[tuple[int, float, float, float]]:
        rows = []
        for chunk in chunks:
            engine = self.engine(chunk, paced=False, idle_chunk=chunk)
            alone = timed(lambda: engine.generate([self.prompt(SWEEP_ALONE)], greedy(1, cache_prompt=False)))
            users = self.start_users(engine)
            mixed, plain = [], []
            for _ in range(pairs):
                engine.submit(self.prompt(chunk), greedy(1, cache_prompt=False))  # done at its prefill
                mixed.append(timed(engine.step))
                plain.append(timed(engine.step))
            self.stop(engine, users)
            extra = statistics.median(mixed) - statistics.median(plain)
            rows.append((chunk, statistics.median(mixed) / statistics.median(plain), chunk / extra if extra > 0 else 0,
                         SWEEP_ALONE / alone))
        return rows

    def interference(self, chunk: int, paced: bool) -> tuple[list[float], list[float], float]:
        """ITL gaps (s) of the running users without and while a long prompt arrives, and its TTFT (s). Without:
        the same users from the same start for as many steps, so that their own contexts grow alike (a prefill
        in small chunks takes hundreds of steps, and their decode attention grows with every one)."""
        engine = self.engine(chunk, paced)
        users = self.start_users(engine)
        for _ in range(WARM_STEPS):  # the pacer measures decode steps
            engine.step()
        marks = [len(u.stats.token_times) for u in users]
        arriving = engine.submit(self.prompt(ARRIVING_PROMPT), greedy(1, cache_prompt=False))
        steps = 0
        while not arriving.output_ids:
            engine.step()
            steps += 1
        engine.step()  # the users' first token after the prefill ends closes their last gap
        during = gaps_since(users, marks)
        self.stop(engine, users)
        engine = self.engine(chunk, paced)
        users = self.start_users(engine)
        for _ in range(WARM_STEPS):
            engine.step()
        marks = [len(u.stats.token_times) for u in users]
        for _ in range(steps + 1):
            engine.step()
        without = gaps_since(users, marks)
        self.stop(engine, users)
        return without, during, arriving.stats.first_token - arriving.stats.submitted

    def second_turn_ttft(self, engine: Engine, cache_prompt: bool) -> float:
        history = self.prompt(HISTORY - 16)
        [first] = engine.generate([history], greedy(16))
        second = engine.submit(history + first.output_ids + self.prompt(NEW_MESSAGE), greedy(1, cache_prompt))
        engine.run()
        return second.stats.first_token - second.stats.submitted

    def throughput(self, chunk: int, paced: bool) -> float:
        """Every generated token over the wall time: 8 users, each sending its next request when one ends.
        User i's first request is cut to (i + 1) / 8 of the tokens, so that the users fall out of step and
        prompts arrive while the others decode, whatever the prefill (in step, whole-prompt prefill would
        batch all 8 prompts into one step every round)."""
        engine = self.engine(chunk, paced)
        started = time.perf_counter()
        current = [engine.submit(self.prompt(THROUGHPUT_PROMPT), greedy(THROUGHPUT_TOKENS * (i + 1) // USERS))
                   for i in range(USERS)]
        done, sent = [], USERS
        while engine.has_work():
            engine.step()
            for i, request in enumerate(current):
                if request.finished and sent < USERS * THROUGHPUT_REQUESTS:
                    done.append(request)
                    current[i] = engine.submit(self.prompt(THROUGHPUT_PROMPT), greedy(THROUGHPUT_TOKENS))
                    sent += 1
        return sum(len(r.output_ids) for r in done + current) / (time.perf_counter() - started)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def gaps_since(users, marks: list[int]) -> list[float]:
    """Each user's gaps between tokens from its token number `mark` - 1 (the last one before the window) on."""
    return [b - a for u, m in zip(users, marks) for a, b in zip(u.stats.token_times[m - 1:], u.stats.token_times[m:])]


def bench_model(layers: int) -> Path:
    cache = Path(os.environ.get("BITNET_TT_CACHE", Path.home() / ".cache" / "bitnet-tt"))
    folder = cache / f"synthetic-2b4t-{layers}-layers"
    if not (folder / "model.safetensors").is_file():
        vocab = round(FULL_VOCAB * layers / FULL_LAYERS / 256) * 256
        print(f"writing a random {layers}-layer model at the 2B-4T shapes (vocab {vocab}) to {folder} (once)")
        partial = cache / f".{folder.name}.partial-{os.getpid()}"
        write_random_model(partial, {**config_2b4t(), "num_hidden_layers": layers, "vocab_size": vocab}, seed=0)
        partial.rename(folder)
    return folder


def print_header(args, config: ModelConfig) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"model: {config.num_layers} layers, hidden {config.hidden_size}, MLP {config.intermediate_size}, "
          f"vocab {config.vocab_size}, {args.backend} backend{' ' + args.dtype if args.backend == 'torch' else ''}; CPU {cpu}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="model folder (default: the random model described above)")
    p.add_argument("--layers", type=int, default=2, help="layers of the random model")
    p.add_argument("--backend", default="cpu", choices=["cpu", "torch"])
    p.add_argument("--dtype", default="bfloat16", help="the torch backend's dtype (the cpu backend computes in float32)")
    p.add_argument("--prefill-chunk", type=int, help="the chunk compared with whole prompts (default: the backend's)")
    p.add_argument("--sweep", default="16,32,64,128,256", help="chunk sizes for the sweep (empty: skip it)")
    p.add_argument("--pairs", type=int, default=5, help="mixed/decode-only step pairs per chunk size in the sweep")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sections", default="sweep,interference,prefix,throughput")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.model or bench_model(args.layers)
    context = HISTORY + NEW_MESSAGE + 64 + max(ARRIVING_PROMPT, 2 * USERS)
    backend = create_backend(args.backend, folder, max_slots=USERS + 1, max_context=context,
                             dtype=args.dtype if args.backend == "torch" else None, progress=False)
    bench = Bench(backend, Tokenizer(folder, backend.config))
    sections = set(args.sections.split(","))
    whole = context  # a chunk no prompt exceeds: whole-prompt prefill
    print_header(args, backend.config)

    if "sweep" in sections and args.sweep:
        print(f"\nsweep: {USERS} users decoding, one step with a C-token prefill vs one without ({args.pairs} pairs)")
        print(f"{'C':>6} {'step ratio':>11} {'prefill tok/s':>14} {'alone tok/s':>12}")
        for chunk, ratio, rate, alone in bench.sweep([int(c) for c in args.sweep.split(",")], args.pairs):
            print(f"{chunk:>6} {ratio:>10.2f}x {rate:>14.1f} {alone:>12.1f}")

    chunk = args.prefill_chunk or backend.default_prefill_chunk
    paced = backend.paces_prefill
    settings = [(chunk, paced, f"{'paced' if paced else 'chunks'} <= {chunk}")]
    settings += [(chunk, False, f"chunks of {chunk}")] * paced + [(whole, False, "whole prompt")]
    if "interference" in sections:
        runs = {label: [] for _, _, label in settings}
        for _ in range(args.rounds):
            for c, pace, label in settings:
                runs[label].append(bench.interference(c, pace))
        print(f"\ninterference: ITL of {USERS} streams while a {ARRIVING_PROMPT}-token prompt arrives ({args.rounds} rounds)")
        print(f"{'prefill':>16} {'p99 without ms':>14} {'p99 during ms':>14} {'ratio':>7}  (goal <= 2x)"
              f" {'its TTFT s':>11}")
        for label, figures in runs.items():
            without = percentile([g for b, _, _ in figures for g in b], 99)
            during = percentile([g for _, d, _ in figures for g in d], 99)
            ttft = statistics.median(t for _, _, t in figures)
            print(f"{label:>16} {1000 * without:>14.1f} {1000 * during:>14.1f} {during / without:>6.2f}x"
                  f"               {ttft:>11.1f}")

    if "prefix" in sections:
        engine = bench.engine(chunk)
        ttft = {False: [], True: []}
        for _ in range(args.rounds):
            for cache in (False, True):
                ttft[cache].append(bench.second_turn_ttft(engine, cache))
        off, on = statistics.median(ttft[False]), statistics.median(ttft[True])
        print(f"\nprefix: second chat turn over a {HISTORY}-token history, time to first token (median of {args.rounds})")
        print(f"without the prefix cache {1000 * off:.1f} ms, with it {1000 * on:.1f} ms: {off / on:.1f}x faster (goal >= 5x)")

    if "throughput" in sections:
        figures = {label: [] for _, _, label in settings}
        for _ in range(args.rounds):
            for c, pace, label in settings:
                figures[label].append(bench.throughput(c, pace))
        whole_prompts = statistics.median(figures["whole prompt"])
        print(f"\nthroughput: {USERS} users, {THROUGHPUT_REQUESTS} requests each, one after the other "
              f"({THROUGHPUT_PROMPT}-token prompts, {THROUGHPUT_TOKENS} tokens; median of {args.rounds})")
        for label, rates in figures.items():
            rate = statistics.median(rates)
            print(f"{label:>16} {rate:.1f} tokens/s: {rate / whole_prompts:.2f}x whole prompts' (goal: 1x within noise)")


if __name__ == "__main__":
    main()
