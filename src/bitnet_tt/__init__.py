"""bitnet-tt: BitNet b1.58 inference with a golden PyTorch backend and a Tenstorrent backend."""

__version__ = "0.1.0"
