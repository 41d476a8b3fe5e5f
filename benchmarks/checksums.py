"""What checking a converted model costs at load, at the microsoft/bitnet-b1.58-2B-4T shapes (random weights).

A packed checkpoint with the 2B-4T dimensions is written once to --work-dir and converted with
`convert_checkpoint` (both reused on later runs). Then, in one process, with the page cache warm:
- load_weights on the converted folder as users get it: the sha256 of every tensor and copied file
  checked, every value checked, the codes unpacked;
- the same load with the checksum comparison switched off (this benchmark patches it out; users cannot);
- the two parts of the checking on their own: sha256 over every stored tensor, and the finite check
  (aminmax) over every floating tensor.
Loads alternate, --repeats times each; medians are printed. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from bitnet_tt import checkpoint, tensorfiles  # noqa: E402
from bitnet_tt.synthetic import config_2b4t, write_random_model  # noqa: E402


def prepare(work: Path) -> Path:
    packed, converted = work / "packed-2b4t", work / "converted-2b4t"
    if not (packed / "model.safetensors").is_file():
        print(f"writing a random packed 2B-4T model to {packed} (once)", file=sys.stderr)
        write_random_model(packed, config_2b4t(), fmt="packed", seed=0)
    if not (converted / checkpoint.CONVERTED_FILE).is_file():
        print(f"converting it to {converted} (once)", file=sys.stderr)
        checkpoint.convert_checkpoint(packed, converted, progress=False)
    return converted


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def load_unverified(folder: Path):
    original = tensorfiles.verify_recorded_files
    tensorfiles.verify_recorded_files = lambda files: None
    try:
        return checkpoint.load_weights(folder, progress=False)
    finally:
        tensorfiles.verify_recorded_files = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bitnet-tt-checksums"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = prepare(args.work_dir)
    size = (folder / checkpoint.CONVERTED_FILE).stat().st_size
    hashlib.sha256((folder / checkpoint.CONVERTED_FILE).read_bytes())  # warm the page cache

    checked, unchecked = [], []
    for _ in range(args.repeats):
        checked.append(timed(lambda: checkpoint.load_weights(folder, progress=False)))
        unchecked.append(timed(lambda: load_unverified(folder)))
    files = tensorfiles.TensorFiles(folder)
    arrays = {name: files.get(name) for name in sorted(files.file_of)}
    hashing = timed(lambda: [tensorfiles.array_sha256(a) for a in arrays.values()])
    finite = timed(lambda: [tensorfiles.all_finite(a) for name, a in arrays.items()
                            if files.stored_dtype(name) in tensorfiles.FLOATING])

    load, bare = statistics.median(checked), statistics.median(unchecked)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); converted 2B-4T file: {size / 1e9:.2f} GB")
    print(f"load_weights, checksums verified:   {load:6.2f} s (median of {args.repeats})")
    print(f"load_weights, checksums not compared: {bare:6.2f} s")
    print(f"verification adds {load - bare:+.2f} s ({(load - bare) / bare:+.0%})")
    print(f"sha256 of every tensor alone: {hashing:.2f} s ({size / hashing / 1e9:.2f} GB/s)")
    print(f"finite check of every floating tensor alone: {finite:.2f} s")


if __name__ == "__main__":
    main()
