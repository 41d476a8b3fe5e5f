"""Ternary weights: absmean quantisation and the two 2-bit packings (Hugging Face's and ours).

A ternary projection is held as int8 codes in {-1, 0, +1} with shape [out, in] plus one fp32 scale:
W ~= codes * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TernaryWeight:
    codes: torch.Tensor  # int8 [out, in], values in {-1, 0, 1}
    scale: torch.Tensor  # fp32 0-d multiplier

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def ternarize_absmean(weight: torch.Tensor) -> TernaryWeight:
    """Quantise a latent (master) weight the way HF's WeightQuant does, in fp32.

    HF computes s = 1 / max(mean|W|, 1e-5), W_q = clamp(round(W*s), -1, 1) / s; we keep the codes
    and the multiplier 1/s computed with the same fp32 operations.
    """
    w = weight.float()
    inv_scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
    codes = (w * inv_scale).round_().clamp_(-1, 1).to(torch.int8)
    one = torch.ones((), dtype=torch.float32)
    return TernaryWeight(codes, one / inv_scale)


# Every byte's four 2-bit fields (lowest bits first) as four int8 codes, stored as one int32 word:
# unpacking is one table lookup per byte.
_FIELDS = (torch.arange(256, dtype=torch.int32)[:, None] >> torch.tensor([0, 2, 4, 6], dtype=torch.int32)) & 3
_BYTE_TO_CODES = (_FIELDS - 1).to(torch.int8).contiguous().view(torch.int32).reshape(256)


def _byte_fields(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [...] -> int8 codes [..., 4], field i of each byte at index i."""
    words = _BYTE_TO_CODES.index_select(0, packed.reshape(-1).to(torch.int32))
    return words.view(torch.int8).reshape(*packed.shape, 4)


def unpack_hf(packed: torch.Tensor) -> torch.Tensor:
    """HF packed layout: uint8 [out/4, in]; bits 2i..2i+1 of row r hold row i*out/4 + r, as code+1."""
    return _byte_fields(packed).permute(2, 0, 1).reshape(-1, *packed.shape[1:])


def pack_hf(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of unpack_hf (used to write packed checkpoints in tests and tools)."""
    rows = codes.shape[0]
    if rows % 4:
        raise ValueError(f"packed layout needs out_features divisible by 4, got {rows}")
    q = (codes + 1).to(torch.uint8).reshape(4, rows // 4, *codes.shape[1:])
    return q[0] | (q[1] << 2) | (q[2] << 4) | (q[3] << 6)


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Our layout: uint8 [out, in/4]; byte j of a row holds inputs 4j..4j+3, lowest bits first, as code+1."""
    out, inp = codes.shape
    if inp % 4:
        raise ValueError(f"2-bit packing needs in_features divisible by 4, got {inp}")
    q = (codes + 1).to(torch.uint8).reshape(out, inp // 4, 4)
    return q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)


def unpack_2bit(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_2bit: uint8 [out, in/4] -> int8 codes [out, in]."""
    return _byte_fields(packed).reshape(packed.shape[0], -1)


def holds_unused_code(packed: torch.Tensor) -> bool:
    """Whether any 2-bit field is 3 (no ternary value), checked on the packed bytes."""
    return bool((packed & (packed >> 1) & 0x55).any())
