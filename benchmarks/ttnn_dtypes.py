"""Accuracy of every ttnn backend dtype option against the PyTorch backend, on the host stand-in for ttnn.

    python benchmarks/ttnn_dtypes.py [--layers 4] [--hidden 512] [--vocab 4000]

For each weight dtype x LM-head dtype x activation quantisation (on/off), the ttnn backend's own call
sequence runs on tools.tt_host (bf16 activations as on the device; bfloat8_b/bfloat4_b rounding through
ttnn's real host conversion) and is compared with the PyTorch backend in fp32:
- prefill: last-token logits PCC and top-1 agreement over prompts of 1, 33 and 300 tokens;
- decode: 16 teacher-forced steps (both fed the reference's greedy tokens), per-step PCC and top-1.
The model has random weights, so only the differences between rows mean something; a trained model's
logits are less chaotic. This table is how the backend's default dtypes were chosen.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitnet_tt.backends.torch.backend import TorchBackend  # noqa: E402
from bitnet_tt.backends.ttnn.backend import TTNNBackend  # noqa: E402
from bitnet_tt.backends.ttnn.config import HEAD_DTYPES, WEIGHT_DTYPES, TTOptions  # noqa: E402
from bitnet_tt.checkpoint import load_weights  # noqa: E402
from bitnet_tt.synthetic import hf_config, write_random_model  # noqa: E402
from bitnet_tt.verify import pcc  # noqa: E402
from tools.tt_host.stand_in import HostTT, real_block_float  # noqa: E402
from tools.tt_mock.harness import host_ttnn  # noqa: E402

PROMPT_LENGTHS = (1, 33, 300)
DECODE_STEPS = 16


def reference_run(folder: Path, prompts: list[list[int]]):
    """The PyTorch backend's prefill logits and teacher-forced decode (tokens and logits) per prompt."""
    backend = TorchBackend(load_weights(folder, progress=False), max_slots=1, max_context=512, dtype="float32")
    runs = []
    for ids in prompts:
        backend.free(0)
        logits = [backend.prefill(0, ids)]
        tokens = [int(logits[0].argmax())]
        for _ in range(DECODE_STEPS):
            logits.append(backend.decode([0], [tokens[-1]])[0])
            tokens.append(int(logits[-1].argmax()))
        runs.append((tokens, logits))
    return runs


def compare(folder: Path, options: TTOptions, prompts, runs, block_float) -> dict:
    host = HostTT(block_float=block_float)
    weights = load_weights(folder, progress=False)
    backend = TTNNBackend(weights.config, weights, host, host.device(), 1, 512, options)
    prefill_pcc, prefill_top1, decode_pcc, decode_top1 = [], [], [], []
    for ids, (tokens, want) in zip(prompts, runs):
        backend.free(0)
        got = backend.prefill(0, ids)
        prefill_pcc.append(pcc(got, want[0]))
        prefill_top1.append(int(got.argmax()) == tokens[0])
        for step in range(DECODE_STEPS):
            got = backend.decode([0], [tokens[step]])[0]
            decode_pcc.append(pcc(got, want[step + 1]))
            decode_top1.append(int(got.argmax()) == tokens[step + 1])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"prefill_pcc_min": min(prefill_pcc), "prefill_top1": mean(prefill_top1),
            "decode_pcc_min": min(decode_pcc), "decode_pcc_mean": mean(decode_pcc), "decode_top1": mean(decode_top1),
            "ops": host.ops_run}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    config = hf_config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 27 // 10 // 32 * 32,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256))
    block_float = real_block_float(host_ttnn())
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_model(Path(tmp) / "model", config, fmt="packed", seed=1, tokenizer=False)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, args.vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
        runs = reference_run(folder, prompts)
        print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, random weights; "
              f"prompts {PROMPT_LENGTHS}, {DECODE_STEPS} teacher-forced decode steps each")
        print(f"{'weights':>10} {'lm head':>10} {'act quant':>9} | {'prefill PCC min':>15} {'top-1':>6} | "
              f"{'decode PCC min':>14} {'mean':>8} {'top-1':>6}")
        for weight_dtype, head_dtype, quant in itertools.product(WEIGHT_DTYPES, HEAD_DTYPES, (True, False)):
            options = TTOptions(weight_dtype=weight_dtype, lm_head_dtype=head_dtype, activation_quant=quant, use_trace=False)
            r = compare(folder, options, prompts, runs, block_float)
            print(f"{weight_dtype:>10} {head_dtype:>10} {'on' if quant else 'off':>9} | {r['prefill_pcc_min']:>15.5f} "
                  f"{r['prefill_top1']:>6.2f} | {r['decode_pcc_min']:>14.5f} {r['decode_pcc_mean']:>8.5f} {r['decode_top1']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
