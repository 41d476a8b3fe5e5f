"""The ttnn backend's whole prefill and decode on mock Blackhole P150 and Wormhole N150 devices.

Every op passes tt-metal's own argument, shape and shard checks and the real allocator places all
tensors; a mock computes nothing, so numbers are checked elsewhere (host stand-in, then a card).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_tt
from tools.tt_mock.harness import mock_env, ttnn_package

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.tt_mock


@pytest.fixture(scope="module")
def mock_ready():
    """The mock needs ttnn (the tt extra) and RISC-V binutils (fetched on first use)."""
    needs_tt(lambda: mock_env("p150"))


def contract(*args: str, expect_ok: bool = True) -> dict | str:
    result = subprocess.run([sys.executable, "-m", "tools.tt_mock.contract", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=900, env={**os.environ, "LOGURU_LEVEL": "ERROR", "TT_LOGGER_LEVEL": "warning"})
    if not expect_ok:
        assert result.returncode != 0
        return result.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    # an op that places its output elsewhere than the backend asked: the backend's picture of the layout is wrong
    assert "Mismatch between computed MemoryConfig" not in result.stdout + result.stderr
    return json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))


DECODE_OPS = {"SdpaDecodeDeviceOperation", "PagedUpdateCacheDeviceOperation", "RotaryEmbeddingHfDeviceOperation",
              "NLPCreateQKVHeadsDecodeDeviceOperation", "NLPConcatHeadsDecodeDeviceOperation", "MatmulDeviceOperation",
              "LayerNormDeviceOperation", "EmbeddingsDeviceOperation", "ArgMaxDeviceOperation"}


SAMPLING_OPS = {"ManualSeedDeviceOperation", "SamplingDeviceOperation"}  # plus topk (a composite past 65536 columns)


def check_report(report: dict, layers: int, device_sampling: bool = True) -> None:
    assert DECODE_OPS <= set(report["decode_ops_by_name"])
    assert (report["device_sampling_top_k"] == 32) == device_sampling
    if device_sampling:  # the same forward pass, then top-32 of each vocabulary chunk and a seeded draw beside the argmax
        assert SAMPLING_OPS <= set(report["sampled_decode_ops_by_name"])
        assert any(name.lower().startswith("topk") for name in report["sampled_decode_ops_by_name"])
        assert 0 < report["sampled_decode_device_ops"] - report["decode_device_ops"] <= 8 * report["topk_chunks"]
    by_name = report["decode_ops_by_name"]
    # Five projections per layer (gate and up apart) plus the LM head; four norms per layer plus the final one.
    assert by_name["MatmulDeviceOperation"] == 5 * layers + 1
    assert by_name["LayerNormDeviceOperation"] == 4 * layers + 1
    assert by_name["SdpaDecodeDeviceOperation"] == layers and by_name["PagedUpdateCacheDeviceOperation"] == 2 * layers
    l1 = report["decode_l1_per_op"]
    assert 0 < max(l1["peak_bytes_per_core"].values()) <= l1["l1_bank_bytes"]
    # The allocator really holds the weights and the KV cache.
    assert report["dram_allocated_bytes"] >= report["plan_weight_bytes"] + report["plan_kv_cache_bytes"]
    print(json.dumps({k: report[k] for k in ("board", "shapes", "users", "context", "decode_device_ops")}),
          "peak L1 per op:", l1["peak_bytes_per_core"])


@pytest.mark.parametrize("board", ["p150", "n150"])
@pytest.mark.parametrize("users", [1, 32])
def test_tiny_model_on_mock(mock_ready, board, users):
    report = contract("--board", board, "--shapes", "tiny", "--users", str(users), "--context", "1024", "--prompts", "1,33,1000")
    check_report(report, layers=3)


@pytest.mark.parametrize("board", ["p150", "n150"])
def test_chunks_appended_to_a_held_context_on_mock(mock_ready, board):
    """Prefill into a slot that holds context, at starts inside a tile and on one: every layer writes its K/V
    at the window's tile (fill_cache) and attends over the cache (chunked SDPA), all ops passing tt-metal's checks."""
    report = contract("--board", board, "--shapes", "tiny", "--users", "4", "--context", "1024", "--prompts", "33",
                      "--append", "1,7,40")
    check_report(report, layers=3)
    for length in (1, 7, 40):
        ops = report[f"append_{length}_ops_by_name"]
        assert ops["SDPAOperation"] == 3 and ops["UpdateKVCacheOperation"] == 6, ops


def test_vocabulary_with_a_partial_tile_samples_on_the_host(mock_ready):
    report = contract("--board", "p150", "--shapes", "tiny", "--vocab", "300", "--users", "4", "--prompts", "1,33")
    check_report(report, layers=3, device_sampling=False)


def test_activation_quant_costs_ops(mock_ready):
    with_quant = contract("--board", "p150", "--shapes", "tiny", "--users", "4", "--prompts", "1,33", "--act-quant")
    check_report(with_quant, layers=3)
    without = contract("--board", "p150", "--shapes", "tiny", "--users", "4", "--prompts", "1,33")
    # 2 typecasts, abs, max, maximum, reciprocal, 2 multiplies, round and divide around each of the 4 projections
    assert with_quant["decode_device_ops"] - without["decode_device_ops"] >= 4 * 3 * 8


@pytest.mark.slow
def test_2b4t_32_users_full_context_on_p150(mock_ready):
    report = contract("--board", "p150", "--shapes", "2b4t", "--users", "32", "--context", "4096", "--prompts", "1,33,1000,4096")
    check_report(report, layers=30)


@pytest.mark.slow
def test_2b4t_one_user_full_context_on_n150(mock_ready):
    report = contract("--board", "n150", "--shapes", "2b4t", "--users", "1", "--context", "4096", "--prompts", "1,33,1000,4096")
    check_report(report, layers=30)


@pytest.mark.slow
def test_2b4t_32_users_on_n150(mock_ready):
    report = contract("--board", "n150", "--shapes", "2b4t", "--users", "32", "--context", "1024", "--prompts", "1,33,1000")
    check_report(report, layers=30)


def test_2b4t_memory_budget_refuses_what_cannot_fit_on_n150(mock_ready):
    error = contract("--board", "n150", "--shapes", "2b4t", "--users", "32", "--context", "4096", "--prompts", "1",
                     expect_ok=False)
    assert "32 users x 4096 tokens do not fit on this wormhole_b0 device" in error


def test_installed_ttnn_is_never_modified(mock_ready):
    assert not (ttnn_package() / "runtime" / "sfpi").exists()
