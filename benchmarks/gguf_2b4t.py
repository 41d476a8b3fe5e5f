"""Write a random-weight GGUF at the microsoft/bitnet-b1.58-2B-4T shapes, for llama.cpp's side of benchmarks/cpu.py.

llama.cpp's `bitnet` architecture with the 2B-4T dimensions (30 layers, hidden 2560, FFN 6912, 20 query and
5 KV heads of 128, vocabulary 128,256, tied head): ternary weights stored as F16, norms as F32. Speed
depends on shapes and formats, not on the values, so random weights measure what the real model would.
Quantise it with llama.cpp's own tool, then pass both to the benchmark:

    python benchmarks/gguf_2b4t.py --out /tmp/2b4t-f16.gguf            # ~4.8 GB, needs `pip install gguf`
    llama-quantize /tmp/2b4t-f16.gguf /tmp/2b4t-tq2_0.gguf TQ2_0        # ~0.85 GB (Q6_K head)
    python benchmarks/cpu.py --llama-bench PATH/llama-bench --gguf /tmp/2b4t-tq2_0.gguf

The vocabulary is a placeholder (llama-bench feeds token ids and never decodes text): 256 byte tokens, the
three special tokens and numbered ones. Tensors are written one at a time, so memory stays near one layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB, CONTEXT = 2560, 6912, 30, 20, 5, 128, 128256, 4096
KV = KV_HEADS * HEAD_DIM
# name -> numpy shape (out, in) of each ternary projection of a layer; llama.cpp's tensor names.
PROJECTIONS = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV, HIDDEN), "attn_v": (KV, HIDDEN),
               "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
               "ffn_down": (HIDDEN, FFN)}
NORMS = {"attn_norm": HIDDEN, "attn_sub_norm": HIDDEN, "ffn_norm": HIDDEN, "ffn_sub_norm": FFN}


def tensor_plan(rng: np.random.Generator):
    """(name, shape, maker) for every tensor, in file order; maker() builds the array when it is written."""
    yield "token_embd.weight", (VOCAB, HIDDEN), lambda: (rng.standard_normal((VOCAB, HIDDEN), np.float32)
                                                         * 0.02).astype(np.float16)
    yield "output_norm.weight", (HIDDEN,), lambda: np.ones(HIDDEN, np.float32)
    for layer in range(LAYERS):
        for name, width in NORMS.items():
            yield f"blk.{layer}.{name}.weight", (width,), lambda width=width: np.ones(width, np.float32)
        for name, shape in PROJECTIONS.items():
            yield (f"blk.{layer}.{name}.weight", shape,
                   lambda shape=shape: rng.integers(-1, 2, shape, dtype=np.int8).astype(np.float16))


def placeholder_vocab() -> tuple[list[str], list[int]]:
    """Tokens and their llama.cpp types: <unk> <s> </s>, the 256 byte tokens SentencePiece vocabularies need."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, BYTE
    tokens += [f"t{i}" for i in range(VOCAB - len(tokens))]
    types += [1] * (VOCAB - len(types))  # NORMAL
    return tokens, types


def write(out: Path, seed: int) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(out), "bitnet")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, types = placeholder_vocab()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    plan = list(tensor_plan(np.random.default_rng(seed)))
    for name, shape, _ in plan:
        dtype = np.float32 if len(shape) == 1 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, make in plan:
        writer.write_tensor_data(make())
    writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the F16 GGUF file to write (about 4.8 GB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import gguf  # noqa: F401
    except ImportError:
        print("gguf_2b4t: needs the gguf package: pip install 'bitnet-tt[bench]' (or pip install gguf)",
              file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"gguf_2b4t: {args.out} exists; not overwriting it", file=sys.stderr)
        return 2
    if not args.out.parent.is_dir():
        print(f"gguf_2b4t: no folder {args.out.parent}", file=sys.stderr)
        return 2
    write(args.out, args.seed)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
