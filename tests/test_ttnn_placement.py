"""Placement audit on mock devices: every op of a decode step and a prefill gets its operands on the
cores its kernel reads them from (tools/tt_mock/placement.py), on unharvested and harvested Blackhole
grids and on Wormhole, at user counts that fill the head grid fully, partly, or not at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_tt
from tools.tt_mock.harness import mock_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.tt_mock

# main b79e45c's decode layout: the head split's generic output (the first cores of the whole grid, row by
# row) and an 8x8 SDPA decode grid, applied to a backend as it is built
LAYOUT_OF_B79E45C = """
import ttnn
from bitnet_tt.backends.ttnn import backend
split, build = ttnn.experimental.nlp_create_qkv_heads_decode, backend.TTNNBackend.__init__
ttnn.experimental.nlp_create_qkv_heads_decode = lambda *a, **k: split(*a, **{**k, "memory_config": ttnn.L1_HEIGHT_SHARDED_MEMORY_CONFIG})
def old_build(self, *a, **k):
    build(self, *a, **k)
    self.model.sdpa_decode_config = ttnn.SDPAProgramConfig(compute_with_storage_grid_size=ttnn.CoreCoord(8, 8), q_chunk_size=0, k_chunk_size=0)
backend.TTNNBackend.__init__ = old_build
"""


# the matmuls that write rows (QKV, LM head) on the device's whole 13-wide grid, their inputs left on 8-wide rectangles
MATMULS_ON_THE_WHOLE_GRID = """
from dataclasses import replace
from bitnet_tt.backends.ttnn import config
planned = config.TTPlan.decode_matmul
config.TTPlan.decode_matmul = lambda self, *a, **k: (planned(self, *a, **k) if "output_on" in k else
                                                     replace(planned(self, *a), grid=(self.device.grid_x, self.device.grid_y)))
"""


@pytest.fixture(scope="module")
def mock_ready():
    needs_tt(lambda: mock_env("p150"))


def placement_audit(board: str, users: str, before: str = "") -> list[dict]:
    code = ("import os, sys\nfrom tools.tt_mock.harness import mock_env\n"
            f"os.environ.update(mock_env({board!r}))\n{before}\n"
            "from tools.tt_mock.placement import main\n"
            f"sys.exit(main(['--board', {board!r}, '--users', {users!r}, '--layers', '1']))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "LOGURU_LEVEL": "ERROR"})
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert reports, result.stderr[-3000:]
    assert (result.returncode == 0) == all(not r["violations"] for r in reports)
    return reports


def test_harvested_blackhole_placement(mock_ready):
    reports = placement_audit("p150-11x10", "1,17")
    assert [r["grid"] for r in reports] == ["11x10", "11x10"]
    assert all(not r["violations"] and r["ops"] > 50 for r in reports), reports
    assert all(r["binary_ops_on_different_cores"] == 0 for r in reports), reports  # adds and the gated multiply


def test_matmuls_reading_x_off_their_program_grid_fail_the_audit(mock_ready):
    [report] = placement_audit("p150", "8", MATMULS_ON_THE_WHOLE_GRID)
    assert any(v.startswith("linear: x on 16 cores") for v in report["violations"]), report["violations"]


def test_placement_of_b79e45c_fails_the_audit(mock_ready):
    """The check has teeth: the layout that passed every mock check before issue 14 violates three invariants."""
    [report] = placement_audit("p150", "32", LAYOUT_OF_B79E45C)
    problems = "\n".join(report["violations"])
    for op in ("rotary_embedding_hf", "scaled_dot_product_attention_decode"):
        assert op in problems, problems
    assert "does not split 32 users x 5 KV heads" in problems


@pytest.mark.slow
@pytest.mark.parametrize("board", ["p150", "p150-12x10", "p150-11x10", "n150"])
def test_placement_on_every_board_and_user_count(mock_ready, board):
    reports = placement_audit(board, "1,8,12,17,32")
    assert all(not r["violations"] for r in reports), [r["violations"] for r in reports]
