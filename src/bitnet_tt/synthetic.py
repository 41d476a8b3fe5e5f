"""Random-weight BitNet models in the real Hugging Face file formats.

The hub is not always reachable, so the demo, the tests and the benchmarks make their own models:
a config.json, weights as bf16 master or packed 2-bit safetensors, and a byte-level BPE tokenizer
with the 2B-4T special tokens. The weights are random: the text they generate is gibberish.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .ternary import pack_hf

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{{ message['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)
_CORPUS = (
    "BitNet b1.58 is a large language model with ternary weights. Every weight is -1, 0 or +1. "
    "User: Hello! How are you today? Assistant: I am fine, thank you. System: You are a helpful assistant. "
    "The quick brown fox jumps over the lazy dog. Tenstorrent cards run it with TT-NN. "
    "Streaming text, chat and many users at once: an inference engine for everyone. 你好，世界。 🙂"
)


def hf_config(
    vocab_size: int = 300, hidden_size: int = 64, intermediate_size: int = 128, num_hidden_layers: int = 3,
    num_attention_heads: int = 4, num_key_value_heads: int = 1, max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True, quantization_mode: str = "online", linear_class: str = "autobitlinear",
    **extra,
) -> dict:
    """A config.json in the shape HF writes for BitNet; the defaults make a tiny 4:1 GQA model."""
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_act": "relu2",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": linear_class,
            "quantization_mode": quantization_mode,
        },
        **extra,
    }


def config_2b4t() -> dict:
    """The dimensions of microsoft/bitnet-b1.58-2B-4T (random weights are written for them)."""
    return hf_config(
        vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=30,
        num_attention_heads=20, num_key_value_heads=5, max_position_embeddings=4096,
        quantization_mode="offline", bos_token_id=128000, eos_token_id=[128001, 128009],
    )


def write_random_model(folder: Path, config: dict, fmt: str = "packed", seed: int = 0, tokenizer: bool = True) -> Path:
    """Write a complete model folder: config.json, weights in `fmt` ("master" or "packed"), tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    config["quantization_config"] = {**config["quantization_config"],
                                     "quantization_mode": "online" if fmt == "master" else "offline"}
    if tokenizer:
        vocab_size = write_tokenizer(folder, config["vocab_size"])
        config.update(bos_token_id=vocab_size - 3, eos_token_id=[vocab_size - 2, vocab_size - 1])
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    cfg = ModelConfig.from_hf_dict(config)
    gen = torch.Generator().manual_seed(seed)
    save_file(_random_tensors(cfg, fmt, gen), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _random_tensors(cfg: ModelConfig, fmt: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def normal(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=gen) * std + mean).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": normal(cfg.vocab_size, cfg.hidden_size),
               "model.norm.weight": normal(cfg.hidden_size, std=0.1, mean=1.0)}
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = normal(cfg.vocab_size, cfg.hidden_size, std=0.05)
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        for name, width in cfg.norm_shapes().items():
            tensors[prefix + name + ".weight"] = normal(width, std=0.1, mean=1.0)
        for name, (out, inp) in cfg.projection_shapes().items():
            std = inp**-0.5
            if fmt == "master":
                tensors[prefix + name + ".weight"] = normal(out, inp, std=std)
            else:
                codes = torch.randint(-1, 2, (out, inp), generator=gen, dtype=torch.int8)
                tensors[prefix + name + ".weight"] = pack_hf(codes)
                scale = std * (0.5 + torch.rand(1, generator=gen))
                tensors[prefix + name + ".weight_scale"] = scale.to(torch.bfloat16)
    return tensors


def write_tokenizer(folder: Path, max_vocab: int) -> int:
    """A byte-level BPE tokenizer trained on a small fixed corpus, with the special tokens last.

    Returns its vocabulary size (at most `max_vocab`); special ids are size-3, size-2, size-1.
    """
    size = min(max_vocab, 256 + 64 + len(SPECIAL_TOKENS))
    return train_tokenizer([_CORPUS] * 4, size, folder).get_vocab_size()


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path):
    """Byte-level BPE of at most `vocab_size` tokens (the 2B-4T special tokens last) trained on `texts`,
    written as tokenizer.json and tokenizer_config.json; returns the `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(folder / "tokenizer.json"))
    bos, eos, eot = SPECIAL_TOKENS
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": eos, "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2) + "\n")
    return tok
