"""Opening and closing a Tenstorrent device, and reading the facts the plan is derived from."""

from __future__ import annotations

import atexit
import os

from ...errors import BitNetError
from .config import TRACE_REGION_BYTES, DeviceFacts

L1_SMALL_BYTES = 32 * 1024  # used by ops that keep small buffers (conv-style, sampling)


def import_ttnn(debug: bool = False):
    """ttnn, quiet: it and tt-metal log every step otherwise, and errors reach the user as BitNetError.
    `debug` lets their warnings through (TTOptions.debug_log)."""
    if debug:
        os.environ["TT_LOGGER_LEVEL"] = "warning"
    os.environ.setdefault("TT_LOGGER_LEVEL", "off")
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    try:
        import ttnn
    except ImportError:
        raise BitNetError("the ttnn backend needs the 'tt' extra: pip install 'bitnet-tt[tt]' (Python 3.10 or 3.12)") from None
    return ttnn


def open_tt_device(tt, device_id: int = 0, allow_mock: bool = False):
    """Open one card with room for a trace; close it again at exit (also after Ctrl-C or an error).

    A mock device (TT_METAL_MOCK_CLUSTER_DESC_PATH) computes nothing, so only verification tools may open one.
    """
    if os.environ.get("TT_METAL_MOCK_CLUSTER_DESC_PATH") and not allow_mock:
        raise BitNetError("TT_METAL_MOCK_CLUSTER_DESC_PATH is set: that selects a mock device, which computes "
                          "nothing; unset it to run on a Tenstorrent card")
    try:
        found = tt.GetNumAvailableDevices()
    except RuntimeError:
        found = 0
    if found < 1:
        raise BitNetError("no Tenstorrent device found for the ttnn backend (is the card installed and its driver loaded?)")
    try:
        device = tt.open_device(device_id=device_id, l1_small_size=L1_SMALL_BYTES, trace_region_size=TRACE_REGION_BYTES)
    except RuntimeError as exc:
        raise BitNetError(f"cannot open Tenstorrent device {device_id}: {str(exc).splitlines()[0]}") from None
    atexit.register(close_tt_device, tt, device)
    return device


def close_tt_device(tt, device) -> None:
    if getattr(device, "_bitnet_closed", False):
        return
    tt.close_device(device)
    device._bitnet_closed = True


def device_facts(tt, device) -> DeviceFacts:
    grid = device.compute_with_storage_grid_size()
    dram = tt.get_memory_view(device, tt.BufferType.DRAM)
    l1 = tt.get_memory_view(device, tt.BufferType.L1)
    return DeviceFacts(arch=str(device.arch()).split(".")[-1].lower(), grid_x=grid.x, grid_y=grid.y,
                       dram_banks=dram.num_banks, dram_bank_bytes=dram.total_bytes_per_bank,
                       l1_bank_bytes=l1.total_bytes_per_bank)
