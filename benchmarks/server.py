"""HTTP overhead of `bitnet-tt serve`: N concurrent streaming clients on loopback against the same engine in-process.

What is measured, and how:
- Requests: N text completions, each a random token-id prompt of --prompt-tokens, greedy, ignore_eos,
  --new-tokens each, logprobs=0 (so that every stream chunk carries exactly one token). All N start together.
- In-process: the engine built from the same options in this process; the N requests are submitted at once and
  `engine.run()` steps until all finish. A token's time is when the engine hands it to the request's callback.
- HTTP: `python -m bitnet_tt.cli serve` in a subprocess on 127.0.0.1; N asyncio clients (httpx) send the same
  requests and read the server-sent events. A token's time is when its chunk reaches the client.
- Time to first token (TTFT): from submission (in-process) or sending the request (HTTP) to the first token.
  Inter-token latency (ITL): gaps between consecutive tokens of one request, pooled over all requests.
  Aggregate tokens/s: every generated token over the wall time from the first submission to the last token.
- Each mode runs one untimed warm-up round, then --rounds timed rounds whose figures are pooled (tokens/s is
  all tokens over the summed round wall times). Greedy outputs of the two modes must be identical.
The clients, the server and its engine share this machine's cores: on a small machine the client side is part
of the overhead measured. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import torch

from bitnet_tt import LLM
from bitnet_tt.cli import synthetic_model
from bitnet_tt.engine.request import percentile
from bitnet_tt.sampling import SamplingParams

HOST = "127.0.0.1"
MODEL_NAME = "bench"


@dataclass
class Trace:
    """One request's output and the times (perf_counter seconds) it was sent and its tokens arrived."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    text: str = ""


@dataclass
class Summary:
    tokens_per_s: float
    ttft_ms: tuple[float, float]  # p50, p99
    itl_ms: tuple[float, float]


def summarize(rounds: list[list[Trace]]) -> Summary:
    wall = sum(max(t.token_times[-1] for t in traces) - min(t.sent for t in traces) for traces in rounds)
    every = [t for traces in rounds for t in traces]
    ttft = [1000 * (t.token_times[0] - t.sent) for t in every]
    itl = [1000 * (b - a) for t in every for a, b in zip(t.token_times, t.token_times[1:])]
    tokens = sum(len(t.token_times) for t in every)
    return Summary(tokens / wall, (percentile(ttft, 50), percentile(ttft, 99)),
                   (percentile(itl, 50), percentile(itl, 99)))


def make_prompts(args, vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (args.prompt_tokens,), generator=gen).tolist() for _ in range(args.clients)]


# ---------------------------------------------------------------------------------------------
# In-process


def run_in_process(engine, prompts: list[list[int]], new_tokens: int) -> list[Trace]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    traces = []
    for prompt in prompts:
        trace = Trace(time.perf_counter())

        def on_output(output, trace=trace):
            if output.token_ids:
                trace.token_times.append(time.perf_counter())
            trace.text += output.text

        engine.submit(prompt, params, on_output=on_output)
        traces.append(trace)
    engine.run()
    return traces


# ---------------------------------------------------------------------------------------------
# HTTP


async def one_http_request(client: httpx.AsyncClient, prompt: list[int], new_tokens: int) -> Trace:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "stream": True}
    trace = Trace(time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            choice = json.loads(line[len("data: "):])["choices"][0]
            trace.token_times += [now] * len(choice["logprobs"]["tokens"])
            trace.text += choice["text"]
    return trace


async def run_http(url: str, prompts: list[list[int]], new_tokens: int) -> list[Trace]:
    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        return await asyncio.gather(*(one_http_request(client, p, new_tokens) for p in prompts))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(args, model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "bitnet_tt.cli", "serve", "--model", model, "--model-name", MODEL_NAME,
           "--host", HOST, "--port", str(port), "--max-batch", str(args.max_batch), "--dtype", args.dtype,
           "--max-queue", str(args.clients), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same torch threads as in-process
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    sys.exit(f"the server did not start (exit code {server.poll()})")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


# ---------------------------------------------------------------------------------------------
# Driver


def report(args, engine, in_process: Summary, http: Summary, identical: bool) -> None:
    config = engine.backend.config
    print(f"model: {args.model or 'synthetic tiny'} ({config.num_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}), {args.dtype}; {args.clients} concurrent clients, max-batch {args.max_batch}; "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens each, greedy; {args.rounds} rounds; "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPU cores")
    print(f"\n{'':18} {'tokens/s':>10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'ITL p50 ms':>11} {'ITL p99 ms':>11}")
    for name, s in [("in-process", in_process), ("HTTP (loopback)", http)]:
        print(f"{name:18} {s.tokens_per_s:>10.1f} {s.ttft_ms[0]:>12.2f} {s.ttft_ms[1]:>12.2f} "
              f"{s.itl_ms[0]:>11.2f} {s.itl_ms[1]:>11.2f}")
    print(f"{'HTTP / in-process':18} {http.tokens_per_s / in_process.tokens_per_s:>9.2f}x "
          f"{http.ttft_ms[0] / in_process.ttft_ms[0]:>11.2f}x {http.ttft_ms[1] / in_process.ttft_ms[1]:>11.2f}x "
          f"{http.itl_ms[0] / in_process.itl_ms[0]:>10.2f}x {http.itl_ms[1] / in_process.itl_ms[1]:>10.2f}x")
    print(f"\ngreedy outputs identical in both modes: {'yes' if identical else 'NO'}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder or hub id (default: the synthetic tiny model)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-batch", type=int, help="engine slots (default: --clients)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", help="float32 keeps greedy outputs batch-independent")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per mode, after one warm-up round")
    p.add_argument("--threads", type=int, help="torch CPU threads, in-process and in the server (default: torch's)")
    args = p.parse_args(argv)
    args.max_batch = args.max_batch or args.clients
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or str(synthetic_model("tiny"))
    engine = LLM(model, max_batch=args.max_batch, dtype=args.dtype).engine
    prompts = make_prompts(args, engine.backend.config.vocab_size)
    in_process = [run_in_process(engine, prompts, args.new_tokens) for _ in range(1 + args.rounds)][1:]
    server, url = start_server(args, model)
    try:
        http = [asyncio.run(run_http(url, prompts, args.new_tokens)) for _ in range(1 + args.rounds)][1:]
    finally:
        stop_server(server)
    texts = {tuple(t.text for t in traces) for traces in in_process + http}
    report(args, engine, summarize(in_process), summarize(http), identical=len(texts) == 1)


if __name__ == "__main__":
    main()
