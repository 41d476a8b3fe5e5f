"""The decode performance model (tools/tt_mock/perf.py): its constants reproduce the published figures
they are fitted to, its costs follow the issue's formula, and the 2B-4T prediction from the mock's op
list is printed, labelled predicted, with its op counts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_tt
from tools.tt_mock import perf
from tools.tt_mock.harness import mock_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def constants():
    return perf.fit()


def test_fit_reproduces_every_published_figure_within_15_percent(constants):
    errors = perf.fit_error(constants)
    assert len(errors) == len(perf.FIT_TARGETS) == 8
    assert max(abs(e) for e in errors) <= 0.15, perf.fit_table(constants)


def test_fit_table_shows_published_and_predicted(constants):
    table = perf.fit_table(constants)
    assert "PREDICTED" in table[0]
    rows = table[2:]
    assert len(rows) == len(perf.FIT_TARGETS)
    for row, (model, board, users, published) in zip(rows, perf.FIT_TARGETS):
        fields = row.split()
        assert row.startswith(model) and board in fields and f"{published:.1f}" in fields
        assert abs(float(fields[-1].rstrip("%"))) <= 15


def test_dram_sharded_matmul_computes_on_one_core_per_bank(constants):
    """A compute-bound matmul takes cores_1 / cores_2 times as long on cores_2 cores; a DRAM-bound one is
    set by its weight bytes alone."""
    board = perf.BOARDS["p150"]
    wide = perf.matmul("ff", 2560, 6912, "BFLOAT4_B", "HiFi2", board.dram_banks)
    on_grid = perf.matmul("ff", 2560, 6912, "BFLOAT4_B", "HiFi2", 110, category="matmul (1D/2D)")
    assert perf.op_ms(wide, board, constants) > perf.op_ms(on_grid, board, constants)
    compute = [perf.op_ms(perf.matmul("x", 2560, 6912, "BFLOAT4_B", f, board.dram_banks), board, constants)
               for f in ("HiFi2", "HiFi4")]
    assert compute[1] == pytest.approx(2 * compute[0])  # compute-bound on 8 cores: time follows the phases
    dram = perf.op_ms(perf.matmul("x", 2560, 6912, "BFLOAT16", "LoFi", 110), board, constants)
    assert dram == pytest.approx(2560 * 6912 * 2 / (constants.eta["blackhole"] * 512e9) * 1e3)


def test_prediction_adds_its_categories(constants):
    board = perf.BOARDS["n150"]
    ops = perf.llama_step(perf.LLAMA["Llama-3.2-1B"], board, 32, 256)
    result = perf.predict(ops, board, 32, constants)
    assert result["step_ms"] == pytest.approx(sum(result["ms"].values()))
    assert sum(result["ops"].values()) == len(ops)
    assert result["ops"]["matmul (DRAM-sharded)"] == 16 * 5 + 1
    assert result["tps"] == pytest.approx(32 * result["tps_per_user"])


@pytest.mark.tt_mock
def test_2b4t_prediction_printed_with_op_counts():
    needs_tt(lambda: mock_env("p150-11x10"))
    result = subprocess.run([sys.executable, "-m", "tools.tt_mock.perf", "--board", "p150", "--users", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=1800, env={**os.environ, "LOGURU_LEVEL": "ERROR"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "fit: published decode t/s/u vs PREDICTED" in out
    assert "PREDICTED by the model, not measured on a card" in out
    report = out[out.index("PREDICTED by the model"):].splitlines()
    rows = {line[:24].strip(): (int(line[24:30].strip() or 0), float(line[30:])) for line in report[2:10]}
    categories = perf.CATEGORIES
    assert list(rows) == [*categories, "host", "step"]
    step_ops, step_ms = rows["step"]
    # every layer runs the same calls: 5 BitLinears (1D matmuls) 30 times, and the LM head
    assert rows["matmul (1D/2D)"][0] == 5 * 30 + 1 and rows["matmul (DRAM-sharded)"][0] == 0
    assert sum(rows[c][0] for c in categories) == step_ops
    assert sum(rows[c][1] for c in categories) + rows["host"][1] == pytest.approx(step_ms, abs=0.05)
    tps = float(re.search(r"predicted: ([\d.]+) t/s per user", out)[1])
    assert tps == pytest.approx(1e3 / step_ms, rel=0.01)
    # what `bench --backend ttnn` prints as the prediction is what the model says today
    from bitnet_tt.backends.ttnn.backend import PREDICTED_2B4T

    assert ("p150a", 1, tps, step_ops) in PREDICTED_2B4T
    levers = out[out.index("levers, ranked"):].splitlines()[1:]
    assert len(levers) == 5
    steps = [float(re.search(r"([\d.]+) ms", line)[1]) for line in levers]
    assert steps == sorted(steps) and all(s <= step_ms for s in steps)
    assert any("all four" in line for line in levers if float(re.search(r"([\d.]+) ms", line)[1]) == steps[0])


@pytest.mark.parametrize("fidelity", ["HiFi2", "HiFi4"])
def test_lofi_is_exact_for_ternary_weights(host_ttnn, fidelity):
    """LoFi drops SrcA's (the weights') mantissa bits below the top four: ternary codes in bfloat4_b, as
    ttnn converts them, have none, so LoFi gives HiFi2's result bit for bit. HiFi3/4 add the activations'
    low bits, so only HiFi2 is matched; a weight with more mantissa bits shows the check has teeth."""
    import torch

    torch.manual_seed(0)
    codes = torch.randint(-1, 2, (256, 96)).float()
    codes[:, :16] = 0  # whole zero blocks share an exponent too
    ternary = host_ttnn.to_torch(host_ttnn.from_torch(codes, dtype=host_ttnn.bfloat4_b, layout=host_ttnn.TILE_LAYOUT))
    assert torch.equal(ternary.float(), codes)
    x = torch.randn(32, 256).bfloat16()
    lofi = perf.fidelity_matmul(x, ternary, "LoFi")
    assert torch.equal(lofi, perf.fidelity_matmul(x, ternary, "HiFi2"))
    assert not torch.equal(lofi, perf.fidelity_matmul(x, ternary, "HiFi4"))  # the activations' lowest bit
    dense = torch.randn(256, 96).bfloat16()
    assert not torch.equal(perf.fidelity_matmul(x, dense, "LoFi"), perf.fidelity_matmul(x, dense, fidelity))
