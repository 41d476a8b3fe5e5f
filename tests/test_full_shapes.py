"""The PyTorch backend at the full microsoft/bitnet-b1.58-2B-4T shapes (random packed weights).

Checks that the real dimensions load, prefill and decode to finite logits, and that peak memory
stays under a measured bound. The model runs in a subprocess so that the peak RSS is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bitnet_tt.synthetic import config_2b4t, write_random_model

# Peak RSS (VmHWM) of the child below, measured on Linux x86-64 (glibc 2.36), torch 2.14 CPU, 2 threads:
# 3.40-4.10 GB. Steady state after loading is 3.24 GB = ~0.5 GB Python + torch + 2.08 GB int8 codes of the
# 210 projections (1 byte per ternary weight) + 0.66 GB bf16 embedding / tied LM head; the peak adds
# ~0.6 GB of loading temporaries (freed; glibc returns them at the end of loading) and decode activations.
# Tensors are read with plain file reads, so no page of the checkpoint stays mapped. The bound is the
# measurement plus ~12%: it catches a second copy of the codes (+2 GB) or dense bf16 weights. It is above
# the project's 2.5 GB goal, which int8 codes cannot meet (codes + embedding alone are 2.74 GB).
PEAK_RSS_BOUND_GB = 4.6

CHILD = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(2)
from bitnet_tt.backends.torch.backend import load_torch_backend

backend = load_torch_backend(Path(sys.argv[1]), max_slots=1, max_context=256, dtype="bfloat16", progress=False)
prompt = torch.randint(0, backend.config.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
logits = [backend.prefill(0, prompt)]
for _ in range(8):
    logits.append(backend.decode([0], [int(logits[-1].argmax())])[0])
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
print(json.dumps({
    "finite": all(bool(torch.isfinite(row).all()) for row in logits),
    "shapes": [list(row.shape) for row in logits],
    "peak_rss_gb": int(status["VmHWM"].split()[0]) * 1024 / 1e9,
}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc/self/status")
def test_full_2b4t_shapes_run_finite_within_memory_bound(tmp_path):
    config = config_2b4t()
    folder = write_random_model(tmp_path / "2b4t-packed", config, fmt="packed", seed=0, tokenizer=False)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"peak RSS of the model process: {result['peak_rss_gb']:.2f} GB (bound {PEAK_RSS_BOUND_GB} GB)")
    assert result["shapes"] == [[config["vocab_size"]]] * 9
    assert result["finite"], "NaN or inf in the logits"
    assert result["peak_rss_gb"] < PEAK_RSS_BOUND_GB, f"peak RSS {result['peak_rss_gb']:.2f} GB"
