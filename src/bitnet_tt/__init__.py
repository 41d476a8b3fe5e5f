"""bitnet-tt: BitNet b1.58 inference with a golden PyTorch backend and a Tenstorrent backend.

    from bitnet_tt import LLM
"""

__version__ = "0.1.0"

__all__ = ["LLM", "__version__"]


def __getattr__(name: str):
    # LLM is imported on first use, so that `import bitnet_tt` (and `bitnet-tt --version`) stays light.
    if name == "LLM":
        from .api import LLM

        return LLM
    raise AttributeError(f"module 'bitnet_tt' has no attribute {name!r}")
