"""`bitnet-tt`: generate, chat, serve, bench, verify, eval, convert, info, demo. Thin: it parses options and calls
the library (the Python API in api.py for everything that generates).

Every user error ends as one line on stderr and a non-zero exit code, never a traceback. Each subcommand has
its own parser with its own defaults, and its --help shows the values it really uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from . import __version__
from .api import CHAT_SAMPLING, GENERATE_SAMPLING, LLM, SAMPLING_DEFAULTS, check_utf8
from .engine.scheduler import IDLE_PREFILL_CHUNK
from .errors import BitNetError

DEMO_PROMPTS = ["BitNet b1.58 is", "User: Hello! How are you today?"]
# The small model trained on Python's documentation (tools/train_tiny.py), shipped in a clone of the repository
TRAINED_MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-bitnet"
TRAINED_PROMPTS = ["Return the number of", "This module provides", "The default value of"]
DEFAULT_SLOTS = 8  # concurrent users for generate (one prompt file) and serve

class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=DefaultsInHelp, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class DefaultsInHelp(argparse.HelpFormatter):
    """Appends '(default: X)' to every option that has a value by default, from the parser's own default."""

    def _get_help_string(self, action):
        text = action.help or ""
        no_value = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if no_value or not action.option_strings or "(default" in text:
            return text
        return f"{text} (default: %(default)s)"


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
    except Terminated as exc:
        print(f"bitnet-tt: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except BrokenPipeError:
        return 0


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the program is, so that cleanup (finally blocks) runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def terminate_cleanly():
    def stop(signum, frame):
        raise Terminated(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------------------------------------
# Options: one parser per command, built from the option groups below (an option is one line in one group)


def positive_int(text: str) -> int:
    return bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    return bounded_int(text, 0)


def bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def port_number(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be in 0-65535, got {value}")
    return value


def add_model_options(parser: argparse.ArgumentParser, slots: int | None = None,
                      default_model: str = "the random-weight demo model") -> None:
    """--model and how to load it; `slots`: the --max-batch default (None: the command has no --max-batch)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", help=f"model folder or Hugging Face hub id (default: {default_model})")
    group.add_argument("--backend", help="cpu (native kernels; the default on the CPU), torch (the golden model, "
                                         "any machine; the default with --device cuda or a --dtype other than "
                                         "float32) or ttnn (Tenstorrent card)")
    group.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    group.add_argument("--dtype", help="torch compute dtype: bfloat16 (default), float32, or float64 (the verification "
                                       "reference: slow); the cpu backend computes in float32")
    group.add_argument("--threads", type=positive_int,
                       help="CPU threads (default: the physical cores for --backend cpu, torch's choice for torch)")
    group.add_argument("--lm-head", choices=["bf16", "int8"],
                       help="--backend cpu: the LM head in bf16 as stored (default) or int8 per row (faster, approximate)")
    if slots is not None:
        group.add_argument("--max-batch", type=positive_int, default=slots, help="concurrent users (KV-cache slots)")
    group.add_argument("--max-context", type=positive_int, help="tokens per user (default: the model's maximum)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    tt = parser.add_argument_group("Tenstorrent backend (--backend ttnn only)")
    tt.add_argument("--tt-weight-dtype", help="ternary weights: bfloat4_b (default), bfloat8_b or bfloat16 (all exact)")
    tt.add_argument("--tt-lm-head-dtype", help="LM head: bfloat8_b (default), bfloat16 or bfloat4_b")
    tt.add_argument("--tt-activation-quant", action="store_true", help="HF's int8 activation quantisation on the device")
    tt.add_argument("--tt-no-trace", action="store_true", help="run decode op by op instead of replaying a trace")
    tt.add_argument("--tt-debug", action="store_true", help="show ttnn's warnings (e.g. an op placing its output elsewhere than asked)")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill-chunk", type=positive_int,
                        help="prompt tokens prefilled per step at most while users decode (the cpu backend takes "
                             "fewer, as measured step times allow), between their decode steps; a step in which "
                             f"nobody decodes takes up to {IDLE_PREFILL_CHUNK} (default: the backend's, chosen by "
                             "measurement: see README, Serving many users)")


def add_sampling_options(parser: argparse.ArgumentParser, command_defaults: dict) -> None:
    """The sampling options, with defaults from SamplingParams overridden by the command's own (api.py)."""
    default = {**SAMPLING_DEFAULTS, **command_defaults}
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=positive_int, default=default["max_new_tokens"], help="tokens to generate at most")
    group.add_argument("--temperature", type=float, default=default["temperature"], help="0 is greedy")
    group.add_argument("--top-k", type=non_negative_int, default=default["top_k"], help="0 is off")
    group.add_argument("--top-p", type=float, default=default["top_p"], help="nucleus sampling; 1 is off")
    group.add_argument("--min-p", type=float, default=default["min_p"], help="drop tokens below this share of the top one; 0 is off")
    group.add_argument("--repetition-penalty", type=float, default=default["repetition_penalty"], help="HF style; 1 is off")
    group.add_argument("--presence-penalty", type=float, default=default["presence_penalty"], help="OpenAI style; 0 is off")
    group.add_argument("--frequency-penalty", type=float, default=default["frequency_penalty"], help="OpenAI style; 0 is off")
    group.add_argument("--seed", type=non_negative_int, help="makes sampling reproducible")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--logprobs", type=non_negative_int, metavar="N",
                       help="report log-probabilities of chosen tokens and N alternatives (with --json)")


def command(sub, name: str, run, help: str, model: bool = True, slots: int | None = None,
            sampling: dict | None = None, default_model: str | None = None) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(run=run)  # `run` is the one default every command sets; no option shares it
    if model:
        add_model_options(parser, slots, *([default_model] if default_model else []))
    if sampling is not None:
        add_sampling_options(parser, sampling)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bitnet-tt", description="Run BitNet b1.58 models (PyTorch or Tenstorrent).")
    parser.add_argument("--version", action="version", version=f"bitnet-tt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = command(sub, "generate", cmd_generate, "complete prompts, streaming to the terminal",
                slots=DEFAULT_SLOTS, sampling=GENERATE_SAMPLING)
    p.add_argument("prompt", nargs="?", help="prompt text")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line (instead of PROMPT)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat format")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming")
    add_engine_options(p)

    p = command(sub, "chat", cmd_chat, "interactive multi-turn chat", sampling=CHAT_SAMPLING)
    p.add_argument("--system", help="system message")
    add_engine_options(p)

    p = command(sub, "serve", cmd_serve, "OpenAI-compatible HTTP server (chat, completions, metrics)",
                slots=DEFAULT_SLOTS)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every path but /health "
                                     "(default: $BITNET_TT_API_KEY, else none; an empty key is refused)")
    p.add_argument("--model-name", help="the name clients pass as `model` (default: the --model value)")
    p.add_argument("--max-queue", type=positive_int, default=64, help="requests waiting for a slot before new ones get 429")
    p.add_argument("--max-connections", type=positive_int, default=256, help="open connections before new requests get 503")
    p.add_argument("--read-timeout", type=positive_float, default=20.0,
                   help="seconds a client has to send a request's headers, and again its body")
    p.add_argument("--public-metrics", action="store_true", help="answer /metrics without the API key (for a scraper)")
    add_engine_options(p)

    p = command(sub, "bench", cmd_bench, "throughput and latency at several batch sizes")
    p.add_argument("--max-batch", type=positive_int, help="KV-cache slots (default: the largest of --batch-sizes)")
    p.add_argument("--batch-sizes", default="1,4,16,32", help="comma-separated")
    p.add_argument("--prompt-tokens", type=positive_int, default=32, help="prompt length per user")
    p.add_argument("--new-tokens", type=positive_int, default=16, help="tokens decoded per user")
    p.add_argument("--synthetic", choices=["tiny", "2b4t"],
                   help="instead of --model: random weights at the demo's tiny shapes (the default) or the real 2B-4T shapes")
    p.add_argument("--ttft-prompts", default="128,2048", help="prompt lengths for time to first token")
    p.add_argument("--temperature", type=float, default=0.0, help="sample instead of picking greedily (0: greedy)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="with --temperature; up to 32 samples on a Tenstorrent device")
    add_engine_options(p)

    p = command(sub, "verify", cmd_verify, "compare a backend's logits and greedy tokens with the PyTorch backend in fp32",
                slots=1)  # --max-batch sets the ttnn decode layout that --per-op checks
    p.add_argument("--greedy-tokens", type=positive_int, default=128, help="greedy tokens to compare")
    p.add_argument("--per-op", action="store_true",
                   help="ttnn only: one prefill and one decode step op by op against the host stand-in fed the same "
                        "inputs; names the first op that disagrees (needs the repository's tools/ folder)")

    p = command(sub, "eval", cmd_eval, "perplexity of a text; with a reference: KL divergence, top-1 and greedy agreement",
                slots=DEFAULT_SLOTS, default_model="the shipped models/tiny-bitnet")
    p.add_argument("--text", type=Path, help="UTF-8 text file (default: heldout.txt in the model folder, as the shipped model has)")
    p.add_argument("--reference-backend", help="compare with this backend on the same windows (torch or ttnn)")
    p.add_argument("--reference-dtype", help="the reference's torch dtype (default float32; implies --reference-backend torch)")
    p.add_argument("--context", type=positive_int, help="window length in tokens (default: --max-context or the model's)")
    p.add_argument("--stride", type=positive_int, help="tokens between window starts (default: half the context)")
    p.add_argument("--max-tokens", type=positive_int, help="evaluate only the first N tokens of the text")
    p.add_argument("--greedy-prompts", type=positive_int, default=4, help="prompts from the text for greedy agreement")
    p.add_argument("--greedy-tokens", type=positive_int, default=64, help="greedy tokens compared per prompt")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")

    p = command(sub, "convert", cmd_convert, "write a model in the compact bitnet-tt format", model=False)
    p.add_argument("src", help="model folder or hub id")
    p.add_argument("dst", type=Path, help="new folder to create")
    p.add_argument("--force", action="store_true", help="replace DST if it is an earlier conversion")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command(sub, "info", cmd_info, "what a model folder (or hub id: config and index only) holds", model=False)
    p.add_argument("model", help="model folder or hub id")

    p = command(sub, "demo", cmd_demo, "generate with the small shipped model trained on Python's documentation (offline)",
                default_model="the shipped models/tiny-bitnet, else a random-weight model")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="tokens per demo prompt")
    add_engine_options(p)
    return parser


def sampling_params(args):
    from .sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=tuple(args.stop),
        logprobs=args.logprobs is not None, top_logprobs=args.logprobs or 0,
    )


def model_folder(args, synthetic: str = "tiny", announce: bool = True) -> Path | str:
    """--model as given, or the random-weight demo model (said once on stderr)."""
    if args.model:
        return args.model
    if announce:
        print(f"bitnet-tt: no --model given: using a random-weight {synthetic} demo model (its text is gibberish)",
              file=sys.stderr)
    return synthetic_model(synthetic, progress=not args.quiet)


def open_llm(args, folder: Path | str, **overrides) -> LLM:
    """Load the model as the options say; `overrides` replace LLM arguments (verify's reference)."""
    from .backends import default_backend

    check_tt_options(args)
    args.backend = args.backend or default_backend(args.device, args.dtype)
    backend = overrides.pop("backend", args.backend)
    if args.lm_head and args.backend != "cpu":
        raise BitNetError("--lm-head applies to --backend cpu only")
    if args.threads and backend != "cpu":
        import torch

        torch.set_num_threads(args.threads)
    options = {"max_batch": getattr(args, "max_batch", 1), "max_context": args.max_context, "dtype": args.dtype,
               "device": args.device, "progress": not args.quiet,
               "prefill_chunk": getattr(args, "prefill_chunk", None),
               "tt_options": tt_options(args) if backend == "ttnn" else None,
               "cpu_options": cpu_options(args) if backend == "cpu" else None}
    return LLM(folder, backend, **{**options, **overrides})


def cpu_options(args):
    from .backends.cpu.backend import CPUOptions

    return CPUOptions(threads=args.threads, lm_head=args.lm_head or "bf16")


def check_tt_options(args) -> None:
    chosen = [name for name, value in vars(args).items() if name.startswith("tt_") and value not in (None, False)]
    if chosen and args.backend != "ttnn":
        raise BitNetError("the --tt-* options apply to --backend ttnn only")


def tt_options(args):
    """The --tt-* options as TTOptions (validated here, before any device is opened)."""
    from .backends.ttnn.config import TTOptions

    chosen = {"weight_dtype": args.tt_weight_dtype, "lm_head_dtype": args.tt_lm_head_dtype}
    return TTOptions(**{k: v for k, v in chosen.items() if v is not None}, activation_quant=args.tt_activation_quant,
                     use_trace=not args.tt_no_trace, debug_log=args.tt_debug)


def synthetic_model(kind: str, progress: bool = True) -> Path:
    """A random-weight model kept in the user's cache; written atomically on first use."""
    from .folders import partial_folder, publish, remove_stale_partials
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
    remove_stale_partials(folder)
    partial = partial_folder(folder)
    try:
        write_random_model(partial, config, fmt="packed", seed=0)
        publish(partial, folder)
    except FileExistsError:
        pass  # another process wrote it first: the same model, from the same seed
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------
# Commands


def read_prompts(args) -> list[str]:
    if args.prompts_file is not None and args.prompt:
        raise BitNetError("give either a PROMPT or --prompts-file, not both")
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
    for prompt in prompts:
        check_utf8(prompt, "the prompt")
    return prompts


def cmd_generate(args) -> int:
    params = sampling_params(args)
    prompts = read_prompts(args)
    with open_llm(args, model_folder(args)) as llm:
        if args.chat:
            requests = [llm.submit_chat([{"role": "user", "content": p}], params) for p in prompts]
        else:
            requests = [llm.submit(p, params) for p in prompts]
        if args.json:
            for request in requests:
                print(json.dumps(json_result(llm, llm.finish(request)), ensure_ascii=False))
            return 0
        for request in requests:  # streamed one after another so the terminal output stays readable
            stream_to_terminal(llm, request)
            print_stats(request)
    return 0


def json_result(llm: LLM, request) -> dict:
    """The request's result, with each token's log-probability and alternatives as text (with --logprobs)."""
    result = request.result()
    if request.params.logprobs:
        text = llm.engine.tokenizer.token_text
        result["logprobs"] = [{"token": text(c.token_id), "logprob": c.logprob,
                               "top_logprobs": [{"token": text(t), "logprob": lp} for t, lp in c.top]}
                              for c in request.choices]
    return result


def stream_to_terminal(llm: LLM, request) -> None:
    for piece in llm.pieces(request):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()


def print_stats(request) -> None:
    s = request.stats.summary(len(request.prompt_ids))
    rate = s["decode_tokens_per_s"]
    print(f"[{len(request.output_ids)} tokens, {request.finish_reason}; "
          f"first token {s['time_to_first_token_s'] or 0:.3f} s; "
          f"decode {rate or 0:.1f} tokens/s]", file=sys.stderr)


def cmd_chat(args) -> int:
    from .tokenizer import ChatMessage

    params = sampling_params(args)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - importing it gives input() line editing and history

    sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte costs its line, not the session
    system = [ChatMessage("system", args.system)] if args.system else []
    history: list[ChatMessage] = []
    with open_llm(args, model_folder(args)) as llm:
        print("chat: type a message; /reset clears the history, /system TEXT sets the system message, /exit quits.",
              file=sys.stderr)
        while (line := read_line("You: " if interactive else "")) is not None:
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                history = []
                print("[history cleared]", file=sys.stderr)
            elif line.startswith("/system"):
                text = line[len("/system"):].strip()
                system = [ChatMessage("system", text)] if text else []
                print("[system message set]" if text else "[system message removed]", file=sys.stderr)
            elif line.strip():
                history.append(ChatMessage("user", line))
                history = fit_history(llm.engine, system, history, params.max_new_tokens)
                request = llm.submit_chat(system + history, params)
                sys.stdout.write("Assistant: ")
                stream_to_terminal(llm, request)
                history.append(ChatMessage("assistant", request.text))
    return 0


def read_line(prompt: str) -> str | None:
    """One line from the user (None at end of input); lines that are not UTF-8 are reported and skipped."""
    while True:
        try:
            line = input(prompt)
        except EOFError:
            return None
        try:
            check_utf8(line, "that line")
            return line
        except BitNetError as exc:
            print(f"[{exc}; ignored]", file=sys.stderr)


def fit_history(engine, system, history, reserve: int):
    """Drop the oldest turns until the conversation plus `reserve` new tokens fits the context."""
    budget = engine.backend.max_context - min(reserve, engine.backend.max_context // 2)
    while len(history) > 1 and len(engine.tokenizer.encode_chat(system + history)) > budget:
        history = history[1:]
    return history


def cmd_convert(args) -> int:
    from .checkpoint import convert_checkpoint
    from .tensorfiles import resolve_model

    started = time.perf_counter()
    src = resolve_model(args.src)
    if not args.quiet:
        print(f"bitnet-tt: converting {src}: reading the weights, then packing and writing {args.dst} "
              "(the writing has no progress bar)", file=sys.stderr)
    with terminate_cleanly():  # a killed conversion removes its partial folder
        dst = convert_checkpoint(src, args.dst, force=args.force, progress=not args.quiet)
    print(f"converted to {dst} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from .checkpoint import describe_folder
    from .tensorfiles import resolve_model

    if Path(args.model).expanduser().exists() or not is_hub_id(args.model):
        described = describe_folder(resolve_model(args.model))
    else:
        described = describe_hub_model(args.model)
    print(json.dumps(described, indent=2))
    return 0


def is_hub_id(text: str) -> bool:
    from .tensorfiles import HUB_ID

    return bool(HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def describe_hub_model(repo_id: str) -> dict:
    """What a hub model holds, from its config.json and safetensors index only (no weights are downloaded)."""
    from .tensorfiles import INDEX_FILE, SINGLE_FILE, SafetensorsIndex
    from .config import ModelConfig, read_config_json, read_json_object, validate_schema
    from .errors import CheckpointError

    config_path = hub_file(repo_id, "config.json")
    raw = read_config_json(config_path.parent)
    config = ModelConfig.from_hf_dict(raw, str(config_path))
    try:
        index_path = hub_file(repo_id, INDEX_FILE)
    except BitNetError:  # no index: one weights file
        weight_files, tensors = [SINGLE_FILE], None
    else:
        raw_index = read_json_object(index_path, CheckpointError) or {}
        weight_map = validate_schema(SafetensorsIndex, raw_index, str(index_path), CheckpointError).weight_map
        weight_files, tensors = sorted(set(weight_map.values())), len(weight_map)
    return {"hub_id": repo_id, "config": config.to_dict(), "quantization_config": raw.get("quantization_config"),
            "weight_files": weight_files, "tensors": tensors}


def hub_file(repo_id: str, name: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, name))
    except Exception as exc:  # missing file, network, auth and cache errors all mean "not available"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BitNetError(f"{repo_id}: cannot fetch {name} from the Hugging Face hub: {reason}") from None


def cmd_demo(args) -> int:
    from .sampling import SamplingParams

    trained = not args.model and (TRAINED_MODEL / "model.safetensors").is_file()
    with open_llm(args, TRAINED_MODEL if trained else model_folder(args, announce=False)) as llm:
        if trained:
            print("demo: a 1.2 M-parameter BitNet trained for minutes on Python's documentation: expect fluent-looking "
                  "but often wrong sentences; pass --model for a real model.", file=sys.stderr)
        elif not args.model:
            print("demo: random weights, so the text is gibberish; pass --model for a real model.", file=sys.stderr)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95, seed=0)
        for prompt in TRAINED_PROMPTS if trained else DEMO_PROMPTS:
            request = llm.submit(prompt, params)
            sys.stdout.write(prompt)
            stream_to_terminal(llm, request)
            print_stats(request)
    return 0


def cmd_serve(args) -> int:
    try:
        from .server import Limits, check_api_key, serve
    except ImportError as exc:
        raise BitNetError(f"serve needs the 'server' extra: pip install -e '.[server]' ({exc})") from None
    api_key = args.api_key if args.api_key is not None else os.environ.get("BITNET_TT_API_KEY")
    check_api_key(api_key)
    check_port_free(args.host, args.port)
    with open_llm(args, model_folder(args)) as llm:
        name = args.model_name or args.model or "bitnet-tt-demo"
        backend = llm.backend
        print(f"bitnet-tt serve: model {name} ({llm.folder}) on the {args.backend} backend, "
              f"{backend.max_slots} slots x {backend.max_context} tokens of context; "
              f"OpenAI API at http://{url_host(args.host)}:{args.port}/v1", file=sys.stderr)
        limits = Limits(max_queue=args.max_queue, read_timeout=args.read_timeout, max_connections=args.max_connections)
        serve(llm.engine, name, host=args.host, port=args.port, api_key=api_key, limits=limits,
              public_metrics=args.public_metrics, quiet=args.quiet)
    return 0


def check_port_free(host: str, port: int) -> None:
    """Fail in a second, before a model load of minutes, when the address cannot be listened on."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise BitNetError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def cmd_bench(args) -> int:
    from .bench import run_engine_bench

    if args.synthetic and args.model:
        raise BitNetError("--synthetic makes a random model; it cannot be combined with --model")
    sizes = parse_sizes(args.batch_sizes, "--batch-sizes")
    ttft_lengths = parse_sizes(args.ttft_prompts, "--ttft-prompts")
    args.max_batch = args.max_batch or max(sizes)
    if max(sizes) > args.max_batch:
        raise BitNetError(f"--batch-sizes goes up to {max(sizes)} but --max-batch is {args.max_batch}")
    with open_llm(args, model_folder(args, args.synthetic or "tiny")) as llm:
        run_engine_bench(llm.engine, sizes, args.prompt_tokens, args.new_tokens, ttft_lengths, args.temperature,
                         args.top_k)
    return 0


def cmd_verify(args) -> int:
    from .verify import print_report, verify

    folder = model_folder(args)
    if args.per_op:
        return verify_ttnn_per_op(args, folder)
    with open_llm(args, folder) as candidate, open_llm(args, folder, backend="torch", dtype="float32",
                                                         tt_options=None) as reference:
        report = verify(candidate.backend, reference.backend, args.greedy_tokens)
    options = tt_options(args) if args.backend == "ttnn" else None
    print_report(report, run_name(args.backend, args.dtype, options, args.lm_head), "torch float32")
    return 0 if report["passed"] else 1


def verify_ttnn_per_op(args, folder) -> int:
    from .verify import per_op_report

    if args.backend != "ttnn":
        raise BitNetError("--per-op compares the ttnn backend op by op with its host stand-in: add --backend ttnn")
    with open_llm(args, folder) as candidate:  # a fresh backend: its first decode step runs op by op
        lines, agree = per_op_report(candidate.backend, folder)
    print("\n".join(lines))
    return 0 if agree else 1


def cmd_eval(args) -> int:
    from .eval import evaluate, print_table

    folder = Path(args.model) if args.model else TRAINED_MODEL
    if not args.model and not TRAINED_MODEL.is_dir():
        raise BitNetError("no --model given, and the shipped models/tiny-bitnet comes only with a clone of the repository")
    text = read_text(args.text or folder / "heldout.txt")
    compare = args.reference_backend or args.reference_dtype
    reference_backend, reference_dtype = args.reference_backend or "torch", args.reference_dtype or "float32"
    with open_llm(args, args.model or folder) as candidate:
        tokens = candidate.engine.tokenizer.encode(text)[: args.max_tokens]
        context = args.context or candidate.backend.max_context
        stride = args.stride or max(context // 2, 1)
        if compare:
            with open_llm(args, args.model or folder, backend=reference_backend, dtype=reference_dtype,
                          tt_options=None) as reference:
                report = evaluate(candidate.backend, tokens, context, stride, reference.backend,
                                  args.greedy_prompts, args.greedy_tokens)
        else:
            report = evaluate(candidate.backend, tokens, context, stride)
    names = (run_name(args.backend, args.dtype, tt_options(args) if args.backend == "ttnn" else None, args.lm_head),
             run_name(reference_backend, reference_dtype) if compare else None)
    if args.json:
        print(json.dumps({"model": str(folder), "candidate": names[0], "reference": names[1], **report}))
    else:
        print_table(report, names[0], names[1], str(args.text or folder / "heldout.txt"))
    return 0


def run_name(backend: str, dtype: str | None, options=None, lm_head: str | None = None) -> str:
    """How a run is named in eval's and verify's reports: the torch dtype, the cpu LM head, or the ttnn
    weight and LM-head dtypes."""
    if backend == "cpu":
        return f"cpu, LM head {lm_head or 'bf16'}"
    if backend != "ttnn":
        return f"torch {dtype or 'bfloat16'}"
    from .backends.ttnn.config import TTOptions

    options = options or TTOptions()
    quant = ", int8 activations" if options.activation_quant else ""
    return f"ttnn {options.weight_dtype} weights, {options.lm_head_dtype} head{quant}"


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BitNetError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise BitNetError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise BitNetError(f"{path}: cannot read ({exc.strerror})") from None
    if not text.strip():
        raise BitNetError(f"{path}: the text is empty")
    return text


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
