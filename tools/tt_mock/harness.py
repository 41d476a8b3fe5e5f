"""Mock Tenstorrent devices for tests: ttnn 0.81.1 with a mock cluster and a stand-in kernel compiler.

FOR VERIFICATION ONLY. A mock device validates every op's arguments, shapes, shards and memory use
with tt-metal's own checks and allocator, but computes nothing (outputs read back as zeros).

Isolation: the installed ttnn package is never modified. tt-metal finds its runtime files (and the
SFPI compiler at <root>/runtime/sfpi) under TT_METAL_RUNTIME_ROOT; we build a private root in a
cache folder that links to the installed package's files and adds the stand-in compiler, and point
only the test processes at it, together with a mock-only JIT cache (stub kernels must never reach a
real card's cache).

    env = mock_env("p150")            # or "n150"
    subprocess.run([...], env={**os.environ, **env})
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOARDS = {"p150": "blackhole_p150.yaml", "p150-12x10": "blackhole_p150_12x10.yaml",
          "p150-11x10": "blackhole_p150_11x10.yaml", "n150": "wormhole_n150.yaml", "n300": "wormhole_n300.yaml"}
MARK = "# bitnet-tt mock-only stand-in compiler"


class MockUnavailable(RuntimeError):
    """ttnn or the RISC-V binutils the stand-in needs are missing."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bitnet-tt" / "tt-mock"


def ttnn_package() -> Path:
    spec = importlib.util.find_spec("ttnn")
    if spec is None or not spec.submodule_search_locations:
        raise MockUnavailable("ttnn is not installed (pip install 'bitnet-tt[tt]')")
    return Path(spec.submodule_search_locations[0])


def find_binutils() -> Path:
    """riscv64-unknown-elf-{as,ld}: on PATH, or Debian's package unpacked into our cache (no system install)."""
    on_path = shutil.which("riscv64-unknown-elf-ld")
    if on_path:
        return Path(on_path).parent
    dest = cache_dir() / "binutils"
    tools = dest / "usr" / "bin"
    if not (tools / "riscv64-unknown-elf-ld").exists():
        dest.mkdir(parents=True, exist_ok=True)
        fetch = _apt_download("binutils-riscv64-unknown-elf", dest)
        debs = glob.glob(str(dest / "binutils-riscv64-unknown-elf_*.deb"))
        if not debs:
            raise MockUnavailable(f"cannot fetch binutils-riscv64-unknown-elf with apt-get download: {fetch.stderr.strip()[-300:]}")
        subprocess.run(["dpkg", "-x", debs[0], str(dest)], check=True)
    return tools


def _apt_download(package: str, dest: Path) -> subprocess.CompletedProcess:
    """`apt-get download` into dest; on a fresh machine the package lists are empty, so update once."""
    try:
        fetch = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
        if fetch.returncode != 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            fetch = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise MockUnavailable(f"apt-get is not available to fetch {package}: {exc}") from None
    return fetch


def runtime_root() -> Path:
    """A private TT_METAL_RUNTIME_ROOT: links to the installed ttnn files plus runtime/sfpi (the stand-in)."""
    package = ttnn_package()
    version = (package / "tt_metal" / "sfpi-version").read_text()
    release = _sfpi_release(version)
    root = cache_dir() / ("root-" + hashlib.sha256(f"{package}|{version}".encode()).hexdigest()[:12])
    compiler = root / "runtime" / "sfpi" / "compiler" / "bin" / "riscv-tt-elf-g++"
    if compiler.exists():
        return root
    partial = root.with_name(root.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "runtime").mkdir(parents=True)
    for entry in package.iterdir():
        if entry.name != "runtime":
            (partial / entry.name).symlink_to(entry)
    for entry in (package / "runtime").iterdir():
        (partial / "runtime" / entry.name).symlink_to(entry)
    wrapper = partial / "runtime" / "sfpi" / "compiler" / "bin" / "riscv-tt-elf-g++"
    wrapper.parent.mkdir(parents=True)
    (partial / "runtime" / "sfpi" / "include").mkdir()
    wrapper.write_text(
        f"#!/bin/sh\n{MARK}: emits stub ELFs; never use with a real card\n"
        f"FAKECC_BINUTILS='{find_binutils()}'; FAKECC_SFPI='{release}'; export FAKECC_BINUTILS FAKECC_SFPI\n"
        f"exec '{sys.executable}' '{HERE / 'fake_riscv_gxx.py'}' \"$@\"\n"
    )
    wrapper.chmod(0o755)
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root


def _sfpi_release(version_file: str) -> str:
    fields = dict(line.split("=", 1) for line in version_file.splitlines() if "=" in line)
    return f"{fields['sfpi_version'].strip(chr(39))}[{fields['sfpi_build'].strip(chr(39))}]"


def host_ttnn():
    """The real ttnn for host-side work only (dtype conversions, golden functions): conversions read
    tile sizes from the cluster, and a mock descriptor stands in for the card. No device is opened."""
    ttnn_package()  # raises MockUnavailable without the tt extra
    os.environ.setdefault("TT_METAL_MOCK_CLUSTER_DESC_PATH", str(HERE / BOARDS["p150"]))
    os.environ.setdefault("TT_LOGGER_LEVEL", "off")
    import ttnn

    return ttnn


def mock_env(board: str = "p150") -> dict[str, str]:
    """Environment variables that make ttnn open a mock `board` through the private runtime root."""
    if board not in BOARDS:
        raise ValueError(f"unknown mock board {board!r} (choose from {', '.join(BOARDS)})")
    return {
        "TT_METAL_RUNTIME_ROOT": str(runtime_root()),
        "TT_METAL_MOCK_CLUSTER_DESC_PATH": str(HERE / BOARDS[board]),
        "TT_METAL_CACHE": str(cache_dir() / "jit-cache"),
        "LOGURU_LEVEL": os.environ.get("LOGURU_LEVEL", "WARNING"),
        "TT_LOGGER_LEVEL": os.environ.get("TT_LOGGER_LEVEL", "error"),  # tt-metal logs to stdout otherwise
    }
