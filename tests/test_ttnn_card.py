"""The ttnn backend on a Tenstorrent card, through the CLI as a user runs it (issue #4, verification 4):
`verify` against the PyTorch backend, `bench`, and sampling on the device. Skipped without a card, that
is on every machine this project's CI has; the mock device and the host stand-in check the rest.
These tests have not run yet: no card has been available."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.tt_card
ROOT = Path(__file__).resolve().parents[1]  # verify --per-op imports the stand-in from tools/

# A small model the ttnn backend takes whole: tile-sized dimensions, 4:1 GQA, a vocabulary of whole
# tiles (so sampling runs on the device).
CARD_MODEL = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=1, max_position_embeddings=1024)


def card_env() -> dict:
    """The environment with no mock cluster descriptor (other tests in this process may have set one)."""
    return {k: v for k, v in os.environ.items() if k != "TT_METAL_MOCK_CLUSTER_DESC_PATH"}


@pytest.fixture(scope="module")
def card():
    probe = subprocess.run([sys.executable, "-c", "import ttnn, sys; sys.exit(0 if ttnn.GetNumAvailableDevices() > 0 else 1)"],
                           env=card_env(), capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip("needs a Tenstorrent card")


def cli(*args: str):
    return subprocess.run([sys.executable, "-m", "bitnet_tt.cli", *map(str, args)], capture_output=True, text=True,
                          env=card_env(), timeout=1800)


@pytest.mark.parametrize("users", [1, 32])
def test_every_op_agrees_with_the_host_stand_in(card, model_factory, users):
    """The bring-up check: run first on a new card; on failure it names the first wrong op."""
    folder = model_factory("packed", **CARD_MODEL)
    result = subprocess.run([sys.executable, "-m", "bitnet_tt.cli", "verify", "--per-op", "--backend", "ttnn", "--model",
                             str(folder), "--max-batch", str(users), "--max-context", "256", "--quiet"],
                            capture_output=True, text=True, env=card_env(), timeout=1800, cwd=ROOT)
    assert result.returncode == 0 and "all ops agree" in result.stdout, result.stdout + result.stderr


def test_verify_against_the_pytorch_backend(card, model_factory):
    folder = model_factory("packed", **CARD_MODEL)
    result = cli("verify", "--backend", "ttnn", "--model", folder, "--greedy-tokens", "128", "--max-context", "1024", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr  # verify exits 1 below its PCC target


def test_seeded_sampling_on_the_device_repeats(card, model_factory):
    folder = model_factory("packed", **CARD_MODEL)
    args = ("generate", "--backend", "ttnn", "--model", folder, "--temperature", "0.8", "--top-k", "20", "--seed", "7",
            "--max-new-tokens", "24", "--max-batch", "2", "--max-context", "256", "--json", "--quiet", "Hello there")
    runs = [cli(*args) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (json.loads(run.stdout.strip().splitlines()[-1]) for run in runs)
    assert first["token_ids"] == second["token_ids"] and len(first["token_ids"]) > 0


def test_bench_prints_speed_and_device_facts(card, model_factory):
    folder = model_factory("packed", **CARD_MODEL)
    result = cli("bench", "--backend", "ttnn", "--model", folder, "--batch-sizes", "1,8,32", "--prompt-tokens", "32",
                 "--new-tokens", "16", "--ttft-prompts", "128", "--max-context", "512", "--quiet")
    assert result.returncode == 0, result.stderr
    for fact in ("time to first token", "bytes read per decode step", "ttnn calls per decode step", "device DRAM in use"):
        assert fact in result.stdout
