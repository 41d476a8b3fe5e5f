"""Backends behind one interface (base.Backend): "cpu" (fast native kernels), "torch" (golden, any machine)
and "ttnn" (Tenstorrent)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import BitNetError
from .base import Backend

BACKENDS = ("cpu", "torch", "ttnn")


def default_backend(device: str = "cpu", dtype: str | None = None) -> str:
    """"cpu" on the CPU when its kernels are built, else "torch" (said on stderr). A torch device or a dtype
    other than float32 (the cpu backend's arithmetic) asks for torch."""
    from .cpu import kernels

    if device != "cpu" or dtype not in (None, "float32"):
        return "torch"
    if kernels.available():
        return "cpu"
    print("bitnet-tt: the CPU kernels are not built (reinstall with a C compiler): using the slower torch backend",
          file=sys.stderr)
    return "torch"


def create_backend(
    name: str | None, folder: Path, max_slots: int = 1, max_context: int | None = None, dtype: str | None = None,
    device: str = "cpu", progress: bool = True, tt_options=None, cpu_options=None,
) -> Backend:
    """name None: default_backend(device). `tt_options` (backends.ttnn.config.TTOptions) and `cpu_options`
    (backends.cpu.backend.CPUOptions) tune those backends; None takes their defaults. dtype applies to torch
    (default bfloat16); the cpu backend computes in float32."""
    name = name or default_backend(device, dtype)
    if cpu_options is not None and name != "cpu":
        raise BitNetError("the CPU kernel options (threads for the kernels, LM head dtype) apply to --backend cpu only")
    if name == "cpu":
        from .cpu.backend import load_cpu_backend

        if dtype not in (None, "float32") or device != "cpu":
            raise BitNetError("--backend cpu computes in float32 on the CPU; --dtype and --device apply to --backend torch")
        return load_cpu_backend(folder, max_slots, max_context, cpu_options, progress)
    if name == "torch":
        from .torch.backend import load_torch_backend

        return load_torch_backend(folder, max_slots, max_context, dtype or "bfloat16", device, progress)
    if name == "ttnn":
        from .ttnn.backend import load_ttnn_backend

        return load_ttnn_backend(folder, max_slots, max_context, progress, tt_options)
    raise BitNetError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
