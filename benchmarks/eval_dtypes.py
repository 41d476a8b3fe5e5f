"""Perplexity and KL divergence of every dtype choice on the trained model (models/tiny-bitnet), against the
PyTorch backend in fp32: `bitnet-tt eval`'s figures for each row.

    python benchmarks/eval_dtypes.py [--tokens 1024] [--weight-dtypes bfloat4_b] [--model M]

Rows: the PyTorch backend in bf16, the CPU fast path (native kernels) with a bf16 and an int8 LM head, then the
ttnn backend on the host stand-in for ttnn (tools.tt_host:
bf16 activations as on the device, bfloat8_b/bfloat4_b rounding through ttnn's real host conversion) for
each LM-head dtype x activation quantisation on/off. The ternary weights are exact in every weight dtype,
so one weight dtype is enough unless --weight-dtypes asks for more. The card's kernels are not run: its
figures may differ where its accumulation differs from the stand-in's.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitnet_tt.backends.cpu.backend import LM_HEAD_DTYPES, CPUOptions, load_cpu_backend  # noqa: E402
from bitnet_tt.backends.torch.backend import load_torch_backend  # noqa: E402
from bitnet_tt.backends.ttnn.backend import TTNNBackend  # noqa: E402
from bitnet_tt.backends.ttnn.config import HEAD_DTYPES, TTOptions  # noqa: E402
from bitnet_tt.checkpoint import load_weights  # noqa: E402
from bitnet_tt.cli import TRAINED_MODEL, run_name  # noqa: E402
from bitnet_tt.config import ModelConfig  # noqa: E402
from bitnet_tt.eval import evaluate  # noqa: E402
from bitnet_tt.tokenizer import Tokenizer  # noqa: E402
from tools.tt_host.stand_in import HostTT, real_block_float  # noqa: E402
from tools.tt_mock.harness import host_ttnn  # noqa: E402

CONTEXT, STRIDE, SLOTS = 256, 128, 8


def ttnn_backend(folder: Path, options: TTOptions, block_float):
    host = HostTT(block_float=block_float)
    weights = load_weights(folder, progress=False)
    return TTNNBackend(weights.config, weights, host, host.device(), SLOTS, CONTEXT, options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=TRAINED_MODEL)
    parser.add_argument("--text", type=Path, help="default: heldout.txt in the model folder")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the text to evaluate")
    parser.add_argument("--weight-dtypes", default="bfloat4_b", help="comma-separated ternary weight dtypes")
    parser.add_argument("--greedy-tokens", type=int, default=64)
    args = parser.parse_args()

    text = (args.text or args.model / "heldout.txt").read_text(encoding="utf-8")
    tokens = Tokenizer(args.model, ModelConfig.from_folder(args.model)).encode(text)[: args.tokens]
    reference = load_torch_backend(args.model, max_slots=SLOTS, max_context=CONTEXT, dtype="float32", progress=False)
    block_float = real_block_float(host_ttnn())
    rows = [("torch bfloat16", lambda: load_torch_backend(args.model, max_slots=SLOTS, max_context=CONTEXT,
                                                           dtype="bfloat16", progress=False))]
    for head in LM_HEAD_DTYPES:  # the CPU fast path (native kernels) with each LM-head dtype
        rows.append((f"cpu, {head} head", lambda h=head: load_cpu_backend(args.model, SLOTS, CONTEXT, CPUOptions(lm_head=h),
                                                                           progress=False)))
    for weight, head, quant in itertools.product(args.weight_dtypes.split(","), HEAD_DTYPES, (False, True)):
        options = TTOptions(weight_dtype=weight, lm_head_dtype=head, activation_quant=quant)
        rows.append((run_name("ttnn", "", options), lambda o=options: ttnn_backend(args.model, o, block_float)))

    print(f"{args.model}: {len(tokens)} tokens of {args.text or 'heldout.txt'}, windows of {CONTEXT} every {STRIDE}; "
          f"reference: torch float32; greedy agreement over {args.greedy_tokens} tokens from 4 prompts")
    width = max(len(name) for name, _ in rows)
    print(f"{'run':<{width}} {'perplexity':>10} {'KL mean':>9} {'KL p99':>9} {'top-1':>7}  greedy agreement")
    reference_ppl = None
    for name, make in rows:
        report = evaluate(make(), tokens, CONTEXT, STRIDE, reference, greedy_tokens=args.greedy_tokens)
        ref = report["reference"]
        if reference_ppl is None:
            reference_ppl = ref["perplexity"]
            print(f"{'torch float32 (reference)':<{width}} {reference_ppl:>10.3f}")
        matched = " ".join(f"{m}/{ref['greedy']['steps']}" for m in ref["greedy"]["matched"])
        print(f"{name:<{width}} {report['perplexity']:>10.3f} {ref['kl_mean']:>9.2e} {ref['kl_p99']:>9.2e} "
              f"{ref['top1_agreement']:>7.2%}  {matched}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
