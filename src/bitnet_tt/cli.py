"""`bitnet-tt`: generate, chat, bench, convert, info, demo. Thin: it parses options and calls the library.

Every user error ends as one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import BitNetError

DEMO_PROMPTS = ["BitNet b1.58 is", "User: Hello! How are you today?"]


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except BitNetError as exc:
        print(f"bitnet-tt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bitnet-tt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


# ---------------------------------------------------------------------------------------------
# Options


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bitnet-tt", description="Run BitNet b1.58 models (PyTorch or Tenstorrent).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    model = OneLineParser(add_help=False)
    group = model.add_argument_group("model")
    group.add_argument("--model", help="model folder or Hugging Face hub id (default: the demo model)")
    group.add_argument("--backend", default="torch", help="torch (any machine) or ttnn (Tenstorrent card)")
    group.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    group.add_argument("--dtype", default="bfloat16", help="compute dtype: bfloat16 or float32")
    group.add_argument("--max-batch", type=int, default=8, help="concurrent users (KV-cache slots)")
    group.add_argument("--max-context", type=int, help="tokens per user (default: the model's maximum)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    tt = model.add_argument_group("Tenstorrent backend (--backend ttnn)")
    tt.add_argument("--tt-weight-dtype", help="ternary weights: bfloat4_b (default), bfloat8_b or bfloat16 (all exact)")
    tt.add_argument("--tt-lm-head-dtype", help="LM head: bfloat8_b (default), bfloat16 or bfloat4_b")
    tt.add_argument("--tt-activation-quant", action="store_true", help="HF's int8 activation quantisation on the device")
    tt.add_argument("--tt-one-weight-copy", action="store_true",
                    help="no DRAM-sharded decode copy of the weights: less device memory, slower decode")
    tt.add_argument("--tt-no-trace", action="store_true", help="run decode op by op instead of replaying a trace")

    sampling = OneLineParser(add_help=False)
    group = sampling.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--presence-penalty", type=float, default=0.0)
    group.add_argument("--frequency-penalty", type=float, default=0.0)
    group.add_argument("--seed", type=int, help="makes sampling reproducible")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--logprobs", type=int, default=None, metavar="N",
                       help="report log-probabilities of chosen tokens and N alternatives (with --json)")

    p = sub.add_parser("generate", parents=[model, sampling], help="complete prompts, streaming to the terminal")
    p.add_argument("prompt", nargs="?", help="prompt text")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat format")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", parents=[model, sampling], help="interactive multi-turn chat")
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(run=cmd_chat, temperature=0.7, top_p=0.9)

    p = sub.add_parser("bench", parents=[model], help="throughput and latency at several batch sizes")
    p.add_argument("--batch-sizes", default="1,4,16,32", help="comma-separated (default 1,4,16,32)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--synthetic", choices=["tiny", "2b4t"], default=None,
                   help="without --model: random weights at the demo's tiny shapes or the real 2B-4T shapes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--ttft-prompts", default="128,2048", help="prompt lengths for time to first token (default 128,2048)")
    p.add_argument("--temperature", type=float, default=0.0, help="sample instead of picking greedily (default 0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="with --temperature; up to 32 samples on a Tenstorrent device")
    p.set_defaults(run=cmd_bench, max_batch=None)

    p = sub.add_parser("verify", parents=[model], help="compare a backend's logits and greedy tokens with the PyTorch backend")
    p.add_argument("--greedy-tokens", type=int, default=128, help="greedy tokens to compare (default 128)")
    p.set_defaults(run=cmd_verify, max_batch=1)

    p = sub.add_parser("convert", help="write a model in the compact bitnet-tt format")
    p.add_argument("src", help="model folder or hub id")
    p.add_argument("dst", type=Path, help="new folder to create")
    p.add_argument("--force", action="store_true", help="replace DST if it is an earlier conversion")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("info", help="what a model folder holds")
    p.add_argument("model", help="model folder or hub id")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("serve", parents=[model], help="OpenAI-compatible HTTP server (chat, completions, metrics)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $BITNET_TT_API_KEY, else none)")
    p.add_argument("--model-name", help="the name clients pass as `model` (default: the --model value)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before new ones get 429")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("demo", parents=[model], help="generate with a small random model made on the spot (offline)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(run=cmd_demo)
    return parser


def sampling_params(args):
    from .sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=tuple(args.stop),
        logprobs=args.logprobs is not None, top_logprobs=args.logprobs or 0,
    )


def open_backend(args, synthetic: str = "tiny", backend: str | None = None, dtype: str | None = None):
    """Resolve the model (or make the synthetic one) and load it on a backend; returns (folder, backend)."""
    from .backends import create_backend
    from .backends.ttnn.config import TTOptions
    from .checkpoint import resolve_model

    folder = resolve_model(args.model) if args.model else synthetic_model(synthetic, progress=not args.quiet)
    if args.max_batch is not None and args.max_batch < 1:
        raise BitNetError(f"--max-batch must be at least 1, got {args.max_batch}")
    name, options = backend or args.backend, tt_options(args)
    if backend is None and name != "ttnn" and options != TTOptions():
        raise BitNetError("the --tt-* options apply to --backend ttnn only")
    loaded = create_backend(name, folder, args.max_batch or 1, args.max_context, dtype or args.dtype,
                            args.device, progress=not args.quiet, tt_options=options if name == "ttnn" else None)
    return folder, loaded


def tt_options(args):
    """The --tt-* options as TTOptions (validated here, before any device is opened)."""
    from .backends.ttnn.config import TTOptions

    chosen = {"weight_dtype": args.tt_weight_dtype, "lm_head_dtype": args.tt_lm_head_dtype}
    return TTOptions(**{k: v for k, v in chosen.items() if v is not None}, activation_quant=args.tt_activation_quant,
                     dram_sharded_decode=not args.tt_one_weight_copy, use_trace=not args.tt_no_trace)


def open_engine(args, synthetic: str = "tiny"):
    """Load the backend and tokenizer and return an Engine."""
    from .engine import Engine
    from .tokenizer import Tokenizer

    folder, backend = open_backend(args, synthetic)
    return Engine(backend, Tokenizer(folder, backend.config))


def synthetic_model(kind: str, progress: bool = True) -> Path:
    """A random-weight model kept in the user's cache; written atomically on first use."""
    from .synthetic import config_2b4t, hf_config, write_random_model

    cache = Path(os.environ.get("BITNET_TT_CACHE", Path.home() / ".cache" / "bitnet-tt"))
    folder = cache / f"synthetic-{kind}"
    if (folder / "model.safetensors").is_file():
        return folder
    if progress:
        print(f"bitnet-tt: writing a random-weight {kind} model to {folder} (once)", file=sys.stderr)
    config = config_2b4t() if kind == "2b4t" else hf_config(
        vocab_size=323, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
    )
    partial = cache / f".{folder.name}.partial-{os.getpid()}"
    write_random_model(partial, config, fmt="packed", seed=0)
    partial.rename(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Commands


def read_prompts(args) -> list[str]:
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise BitNetError(f"{args.prompts_file}: cannot read prompts ({exc.__class__.__name__})") from None
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = [args.prompt] if args.prompt else []
    if not prompts:
        raise BitNetError("give a PROMPT or --prompts-file with at least one non-empty line")
    return prompts


def cmd_generate(args) -> int:
    from .tokenizer import ChatMessage

    params = sampling_params(args)
    prompts = read_prompts(args)
    engine = open_engine(args)
    encode = (lambda p: engine.tokenizer.encode_chat([ChatMessage("user", p)])) if args.chat else engine.tokenizer.encode
    requests = [engine.submit(encode(p), params) for p in prompts]
    if args.json:
        engine.run()
        for request in requests:
            print(json.dumps(request.result(), ensure_ascii=False))
        return 0
    for request in requests:  # streamed one after another so the terminal output stays readable
        stream_to_terminal(engine, request)
        print()
        print_stats(request)
    return 0


def stream_to_terminal(engine, request) -> None:
    while not request.finished:
        for output in engine.step():
            if output.request is request and output.text:
                sys.stdout.write(output.text)
                sys.stdout.flush()


def print_stats(request) -> None:
    s = request.stats.summary(len(request.prompt_ids))
    rate = s["decode_tokens_per_s"]
    print(f"[{len(request.output_ids)} tokens, {request.finish_reason}; "
          f"first token {s['time_to_first_token_s'] or 0:.3f} s; "
          f"decode {rate or 0:.1f} tokens/s]", file=sys.stderr)


def cmd_chat(args) -> int:
    from .tokenizer import ChatMessage

    params = sampling_params(args)
    engine = open_engine(args)
    system = [ChatMessage("system", args.system)] if args.system else []
    history: list[ChatMessage] = []
    print("chat: type a message; /reset clears the history, /system TEXT sets the system message, /exit quits.",
          file=sys.stderr)
    for line in sys.stdin:
        line = line.rstrip("\n")
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            print("[history cleared]", file=sys.stderr)
            continue
        if line.startswith("/system"):
            text = line[len("/system"):].strip()
            system = [ChatMessage("system", text)] if text else []
            print("[system message set]" if text else "[system message removed]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append(ChatMessage("user", line))
        history = fit_history(engine, system, history, params.max_new_tokens)
        request = engine.submit(engine.tokenizer.encode_chat(system + history), params)
        sys.stdout.write("Assistant: ")
        stream_to_terminal(engine, request)
        print()
        history.append(ChatMessage("assistant", request.text))
    return 0


def fit_history(engine, system, history, reserve: int):
    """Drop the oldest turns until the conversation plus `reserve` new tokens fits the context."""
    budget = engine.backend.max_context - min(reserve, engine.backend.max_context // 2)
    while len(history) > 1 and len(engine.tokenizer.encode_chat(system + history)) > budget:
        history = history[1:]
    return history


def cmd_convert(args) -> int:
    from .checkpoint import convert_checkpoint, resolve_model

    started = time.perf_counter()
    dst = convert_checkpoint(resolve_model(args.src), args.dst, force=args.force, progress=not args.quiet)
    print(f"converted to {dst} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from .checkpoint import describe_folder, resolve_model

    print(json.dumps(describe_folder(resolve_model(args.model)), indent=2))
    return 0


def cmd_demo(args) -> int:
    from .sampling import SamplingParams

    engine = open_engine(args)
    if not args.model:
        print("demo: random weights, so the text is gibberish; pass --model for a real model.", file=sys.stderr)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95, seed=0)
    for prompt in DEMO_PROMPTS:
        request = engine.submit(prompt, params)
        sys.stdout.write(prompt)
        stream_to_terminal(engine, request)
        print()
        print_stats(request)
    return 0


def cmd_serve(args) -> int:
    try:
        from .server import serve
    except ImportError as exc:
        raise BitNetError(f"serve needs FastAPI and uvicorn ({exc}); install them from requirements.lock") from None
    api_key = args.api_key or os.environ.get("BITNET_TT_API_KEY") or None
    if not 0 <= args.port <= 65535:
        raise BitNetError(f"--port must be in 0-65535, got {args.port}")
    if args.max_queue < 1:
        raise BitNetError(f"--max-queue must be at least 1, got {args.max_queue}")
    engine = open_engine(args)
    serve(engine, args.model_name or args.model or "bitnet-tt-demo", host=args.host, port=args.port,
          api_key=api_key, max_queue=args.max_queue, quiet=args.quiet)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_engine_bench

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sizes = parse_sizes(args.batch_sizes, "--batch-sizes")
    ttft_lengths = parse_sizes(args.ttft_prompts, "--ttft-prompts")
    args.max_batch = max(sizes)
    engine = open_engine(args, synthetic=args.synthetic or "tiny")
    run_engine_bench(engine, sizes, args.prompt_tokens, args.new_tokens, ttft_lengths, args.temperature, args.top_k)
    return 0


def cmd_verify(args) -> int:
    from .verify import print_report, verify

    if args.greedy_tokens < 1:
        raise BitNetError(f"--greedy-tokens must be at least 1, got {args.greedy_tokens}")
    _, candidate = open_backend(args)
    _, reference = open_backend(args, backend="torch", dtype="float32")
    report = verify(candidate, reference, args.greedy_tokens)
    print_report(report)
    return 0 if report["passed"] else 1


def parse_sizes(text: str, option: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise BitNetError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise BitNetError(f"{option} must be positive, got {text!r}")
    return sizes


if __name__ == "__main__":
    sys.exit(main())
