"""Train the small BitNet b1.58 that `bitnet-tt demo` speaks with (models/tiny-bitnet).

    python -m tools.train_tiny --out models/tiny-bitnet            # corpus, tokenizer, training, both checkpoints
    python -m tools.train_tiny --out DIR --steps 20                # a quick smoke run

Corpus: the documentation that ships inside CPython itself (the language reference topics of
`pydoc_data.topics` and the docstrings of the standard library's modules), read from the running
interpreter's own installation, so the text is the same wherever that Python version is installed.
It is under the PSF licence, which allows derived works; the licence text goes beside the model.

Training is quantisation-aware as in the BitNet b1.58 papers: every projection keeps an fp32 latent
weight, and the forward pass uses its absmean ternarisation and per-token int8 absmax activations,
with straight-through gradients. The architecture is 2B-4T's (relu², attention and FFN sub-norms,
4:1 GQA, half-split RoPE, tied LM head) at small dimensions. Everything is seeded: the same Python
version and torch give the same corpus and the same training sequence.

Not part of the runtime: nothing in src/ imports this file.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import math
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from bitnet_tt.config import ModelConfig
from bitnet_tt.synthetic import SPECIAL_TOKENS, hf_config, train_tokenizer
from bitnet_tt.ternary import pack_hf, ternarize_absmean

SKIPPED_PACKAGES = {"test", "idlelib", "lib2to3", "turtledemo", "site-packages", "encodings", "ensurepip",
                    "__phello__", "pydoc_data"}
HELD_OUT_EVERY = 20  # every 20th document goes to the held-out text, never to training
MIN_DOC_CHARS = 80
ARCH = dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256)


# ---------------------------------------------------------------------------------------------
# Corpus


def stdlib_documents() -> list[str]:
    """The reference-manual topics, then every stdlib docstring of MIN_DOC_CHARS or more, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[key].strip() for key in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_PACKAGES & set(path.relative_to(root).parts[:-1]) or path.stem in SKIPPED_PACKAGES:
            continue
        docs.extend(module_docstrings(path))
    seen, unique = set(), []
    for doc in docs:
        if len(doc) >= MIN_DOC_CHARS and doc not in seen:
            seen.add(doc)
            unique.append(doc)
    return unique


def module_docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [inspect.cleandoc(doc) for node in ast.walk(tree) if isinstance(node, kinds)
            if (doc := ast.get_docstring(node, clean=False))]


def split_corpus(docs: list[str]) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents)."""
    held = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held


def token_stream(tok, docs: list[str]) -> torch.Tensor:
    """BOS doc EOS BOS doc EOS ...: documents start as prompts do (the engine adds BOS)."""
    bos, eos = (tok.token_to_id(t) for t in SPECIAL_TOKENS[:2])
    ids = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids += [bos, *enc.ids, eos]
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# The model: 2B-4T's block with quantisation-aware BitLinear projections


def ste(x: torch.Tensor, quantised: torch.Tensor) -> torch.Tensor:
    """The quantised value forward, the identity's gradient backward (straight-through estimator)."""
    return x + (quantised - x).detach()


class BitLinear(nn.Linear):
    """Forward: per-token int8 absmax activations times absmean-ternary weights (HF's ActQuant/WeightQuant)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s_x = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        x_q = ste(x, (x * s_x).round().clamp(-128, 127) / s_x)
        s_w = 1.0 / self.weight.abs().mean().clamp(min=1e-5)
        w_q = ste(self.weight, (self.weight * s_w).round().clamp(-1, 1) / s_w)
        return F.linear(x_q, w_q)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
        self.cfg = cfg
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = nn.ModuleDict(dict(
            q_proj=BitLinear(h, h, bias=False), k_proj=BitLinear(h, kv, bias=False),
            v_proj=BitLinear(h, kv, bias=False), o_proj=BitLinear(h, h, bias=False),
            attn_sub_norm=RMSNorm(h, cfg.rms_norm_eps)))
        self.mlp = nn.ModuleDict(dict(
            gate_proj=BitLinear(h, cfg.intermediate_size, bias=False),
            up_proj=BitLinear(h, cfg.intermediate_size, bias=False),
            down_proj=BitLinear(cfg.intermediate_size, h, bias=False),
            ffn_sub_norm=RMSNorm(cfg.intermediate_size, cfg.rms_norm_eps)))

    def forward(self, x, cos, sin):
        x = x + self.attention(self.input_layernorm(x), cos, sin)
        return x + self.feed_forward(self.post_attention_layernorm(x))

    def attention(self, x, cos, sin):
        a, (b, t, _), d = self.self_attn, x.shape, self.cfg.head_dim
        q = a.q_proj(x).view(b, t, -1, d).transpose(1, 2)
        k = a.k_proj(x).view(b, t, -1, d).transpose(1, 2)
        v = a.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return a.o_proj(a.attn_sub_norm(out.transpose(1, 2).reshape(b, t, -1)))

    def feed_forward(self, x):
        m = self.mlp
        return m.down_proj(m.ffn_sub_norm(F.relu(m.gate_proj(x)).square() * m.up_proj(x)))


class TinyBitNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        inv_freq = cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", torch.cat([freqs, freqs], -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat([freqs, freqs], -1).sin(), persistent=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        cos, sin = self.cos[: ids.shape[1]], self.sin[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return F.linear(self.norm(x), self.embed_tokens.weight)  # tied head, not quantised (as 2B-4T)


def init_weights(model: TinyBitNet, gen: torch.Generator) -> None:
    for name, p in sorted(model.named_parameters()):
        if p.dim() == 2:
            std = 0.02 if "embed" in name else p.shape[1] ** -0.5
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


# ---------------------------------------------------------------------------------------------
# Training


def train(model: TinyBitNet, stream: torch.Tensor, steps: int, batch: int, lr: float, seed: int, log,
          checkpoint=None, every: int = 0) -> list[float]:
    """AdamW with warm-up and cosine decay on random windows of the stream; returns the loss per step.
    `checkpoint()` is called every `every` steps (a long run can be inspected while it goes on)."""
    context = model.cfg.max_position_embeddings
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    losses, start = [], time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(stream) - context - 1, (batch,), generator=gen)
        window = torch.stack([stream[s : s + context + 1] for s in starts.tolist()])
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps}  loss {loss.item():.3f}  {time.time() - start:.0f} s")
        if every and (step + 1) % every == 0 and step + 1 < steps:
            checkpoint()
    return losses


# ---------------------------------------------------------------------------------------------
# Export as Hugging Face BitNet checkpoints


def hf_tensors(model: TinyBitNet, fmt: str) -> dict[str, torch.Tensor]:
    """fmt "master": latent weights in bf16 (HF ternarises them at load); "packed": 2-bit codes + scale,
    ternarised from the same bf16 values so that both files hold the same ternary model."""
    out = {}
    for name, p in model.state_dict().items():
        key = "model." + name
        w = p.detach().to(torch.bfloat16)
        is_projection = w.dim() == 2 and "embed" not in name
        if fmt == "packed" and is_projection:
            ternary = ternarize_absmean(w)
            out[key] = pack_hf(ternary.codes)
            out[key + "_scale"] = ternary.scale.reshape(1).to(torch.bfloat16)
        else:
            out[key] = w.contiguous()
    return out


def write_checkpoint(model: TinyBitNet, folder: Path, fmt: str, tokenizer_dir: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mode = "online" if fmt == "master" else "offline"
    config = {**config, "quantization_config": {**config["quantization_config"], "quantization_mode": mode}}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(hf_tensors(model, fmt), str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir != folder:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_dir / name, folder / name)


def model_config(tok) -> dict:
    bos, eos, eot = (tok.token_to_id(t) for t in SPECIAL_TOKENS)
    return hf_config(**ARCH, quantization_mode="offline", bos_token_id=bos, eos_token_id=[eos, eot])


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the packed model (master goes in OUT/master)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (results depend on it; on busy shared cores 2 threads ran 17x slower than 1)")
    parser.add_argument("--save-every", type=int, default=0, help="also write the packed model every N steps")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, flush=True)

    docs = stdlib_documents()
    train_docs, held_docs = split_corpus(docs)
    heldout_text = "\n\n".join(held_docs) + "\n"
    (out / "heldout.txt").write_text(heldout_text)
    log(f"corpus: {len(docs)} documents, {sum(map(len, train_docs)) / 1e6:.2f} M characters for training, "
        f"{len(heldout_text) / 1e3:.0f} K held out; Python {sys.version.split()[0]}")

    tok = train_tokenizer(train_docs, ARCH["vocab_size"], out)
    if tok.get_vocab_size() != ARCH["vocab_size"]:
        raise SystemExit(f"the tokenizer has {tok.get_vocab_size()} tokens, not {ARCH['vocab_size']}")
    config = model_config(tok)
    stream = token_stream(tok, train_docs)
    log(f"training stream: {len(stream)} tokens")

    cfg = ModelConfig.from_hf_dict(config)
    model = TinyBitNet(cfg)
    init_weights(model, torch.Generator().manual_seed(args.seed))
    started = time.time()
    losses = train(model, stream, args.steps, args.batch, args.lr, args.seed, log,
                   lambda: write_checkpoint(model, out, "packed", out, config), args.save_every)
    minutes = (time.time() - started) / 60

    write_checkpoint(model, out, "packed", out, config)
    write_checkpoint(model, out / "master", "master", out, config)
    licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if licence.exists():
        shutil.copyfile(licence, out / "LICENSE-corpus-PSF.txt")
    record = {
        "corpus": "CPython's pydoc_data topics and standard-library docstrings (PSF licence)",
        "python": sys.version.split()[0], "torch": torch.__version__, "threads": args.threads,
        "train_characters": sum(map(len, train_docs)), "train_tokens": len(stream),
        "train_text_sha256": sha256("\n\n".join(train_docs)), "heldout_sha256": sha256(heldout_text),
        "steps": args.steps, "batch": args.batch, "context": cfg.max_position_embeddings, "lr": args.lr,
        "seed": args.seed, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "train_minutes": round(minutes, 1),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"done in {minutes:.1f} min; final loss {record['final_loss']:.3f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
