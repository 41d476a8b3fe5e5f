"""Both CPU backends at the full microsoft/bitnet-b1.58-2B-4T shapes (random packed weights).

Each loads, prefills and decodes to finite logits (the cpu backend then fills its slot's whole context), and its
peak memory stays under a bound. The model runs in a subprocess so that the peak RSS is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bitnet_tt.backends.cpu import kernels
from bitnet_tt.checkpoint import convert_checkpoint
from bitnet_tt.synthetic import config_2b4t, write_random_model

# torch (golden) backend, context 256: peak RSS (VmHWM) measured on Linux x86-64 (glibc 2.36), torch 2.14 CPU,
# 2 threads: 3.39 GB (Zen 5; 3.40-5.36 GB on other CPUs before loading gave glibc its freed temporaries back
# after each projection). Steady state after loading is 3.24 GB = ~0.5 GB Python + torch + 2.08 GB int8 codes
# of the 210 projections (1 byte per ternary weight) + 0.66 GB bf16 embedding / tied LM head; the peak adds
# one projection's loading temporaries and decode activations.
# The bound is the measurement plus ~12%: it catches a second copy of the codes (+2 GB) or dense bf16 weights.
# It is above the project's 2.5 GB goal, which int8 codes cannot meet (codes + embedding alone are 2.74 GB).
# cpu backend, a converted model, one slot filled to the full 4,096-token context: issue #13's situation.
# Expected: ~0.06 GB Python + numpy (no torch: the test fails if it is imported), 0.52 GB 2-bit codes, the LM
# head (0.66 GB bf16 pages of the mapped file, or 0.33 GB int8), the touched embedding rows and the fp32 KV
# cache (0.63 GB, all written). Measured here, 2 threads: 1.91 GB (bf16 head), 1.58 GB (int8). The bounds are
# issue #13's goals: torch (+0.5 GB), a second copy of the codes as int8 (+2.1 GB) or of the head breaks either.
CASES = {"torch": ("bf16", 4.6), "cpu-bf16": ("bf16", 2.0), "cpu-int8": ("int8", 1.7)}

CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np

engine, folder, lm_head = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if engine == "torch":
    import torch
    from bitnet_tt.backends.torch.backend import load_torch_backend
    torch.set_num_threads(2)
    backend = load_torch_backend(folder, max_slots=1, max_context=256, dtype="bfloat16", progress=False)
else:
    from bitnet_tt.backends.cpu.backend import CPUOptions, load_cpu_backend
    backend = load_cpu_backend(folder, 1, None, CPUOptions(threads=2, lm_head=lm_head), progress=False)
random = np.random.default_rng(0)
logits = [np.asarray(backend.prefill(0, random.integers(0, backend.config.vocab_size, 32).tolist()))]
for _ in range(8):
    logits.append(np.asarray(backend.decode([0], [int(logits[-1].argmax())])[0]))
if engine != "torch":  # every KV-cache page written
    rest = backend.max_context - backend.slot_length(0)
    logits.append(np.asarray(backend.prefill(0, random.integers(0, backend.config.vocab_size, rest).tolist())))
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
print(json.dumps({
    "context": backend.max_context,
    "filled": backend.slot_length(0),
    "finite": all(bool(np.isfinite(row).all()) for row in logits),
    "shapes": [list(row.shape) for row in logits],
    "peak_rss_gb": int(status["VmHWM"].split()[0]) * 1024 / 1e9,
    "torch_imported": "torch" in sys.modules,
}))
"""


@pytest.fixture(scope="module")
def model_2b4t(tmp_path_factory):
    if not kernels.available():
        kernels.build_in_place()
    return write_random_model(tmp_path_factory.mktemp("2b4t") / "packed", config_2b4t(), fmt="packed", seed=0,
                              tokenizer=False)


@pytest.fixture(scope="module")
def converted_2b4t(model_2b4t, tmp_path_factory):
    return convert_checkpoint(model_2b4t, tmp_path_factory.mktemp("2b4t") / "converted", progress=False)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc/self/status")
@pytest.mark.parametrize("engine", list(CASES))
def test_full_2b4t_shapes_run_finite_within_memory_bound(model_2b4t, converted_2b4t, engine):
    lm_head, bound = CASES[engine]
    folder = model_2b4t if engine == "torch" else converted_2b4t
    proc = subprocess.run([sys.executable, "-c", CHILD, engine.split("-")[0], str(folder), lm_head],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"peak RSS of the {engine} process: {result['peak_rss_gb']:.2f} GB (bound {bound} GB)")
    expected_context = 256 if engine == "torch" else config_2b4t()["max_position_embeddings"]
    assert result["context"] == expected_context
    assert result["shapes"] == [[config_2b4t()["vocab_size"]]] * (9 if engine == "torch" else 10)
    assert result["finite"], "NaN or inf in the logits"
    if engine != "torch":
        assert result["filled"] == expected_context and not result["torch_imported"]
    assert result["peak_rss_gb"] <= bound, f"peak RSS {result['peak_rss_gb']:.2f} GB"
