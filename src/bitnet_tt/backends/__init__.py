"""Backends behind one interface (base.Backend): "torch" (golden, any machine) and "ttnn" (Tenstorrent)."""

from __future__ import annotations

from pathlib import Path

from ..errors import BitNetError
from .base import Backend

BACKENDS = ("torch", "ttnn")


def create_backend(
    name: str, folder: Path, max_slots: int = 1, max_context: int | None = None, dtype: str = "bfloat16",
    device: str = "cpu", progress: bool = True, tt_options=None,
) -> Backend:
    """`tt_options` (backends.ttnn.config.TTOptions) tunes the ttnn backend; None takes its defaults."""
    if name == "torch":
        from .torch.backend import load_torch_backend

        return load_torch_backend(folder, max_slots, max_context, dtype, device, progress)
    if name == "ttnn":
        from .ttnn.backend import load_ttnn_backend

        return load_ttnn_backend(folder, max_slots, max_context, progress, tt_options)
    raise BitNetError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
