"""`bitnet-tt` run as a user runs it: a subprocess per command, on a small model in a temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


def run_cli(*args, stdin: str | None = None, env_extra: dict | None = None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bitnet_tt.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def assert_one_line_error(result, pattern: str):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert pattern in lines[0]


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory("packed")


def test_generate_streams_text_and_stats(model):
    result = run_cli("generate", "--model", model, "--max-new-tokens", "8", "--quiet", "Hello there")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr and "first token" in result.stderr


def test_generate_json_from_prompts_file(model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n\nBitNet is\n")
    result = run_cli("generate", "--model", model, "--prompts-file", prompts, "--json", "--max-new-tokens", "5",
                     "--temperature", "0.8", "--seed", "3", "--logprobs", "2", "--dtype", "float32", "--quiet")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"text", "prompt_token_ids", "token_ids", "finish_reason", "stats"} <= set(row)
        assert row["finish_reason"] in ("stop", "length") and 1 <= len(row["token_ids"]) <= 5
        assert len(row["logprobs"]) == len(row["token_ids"])
    again = run_cli("generate", "--model", model, "--prompts-file", prompts, "--json", "--max-new-tokens", "5",
                    "--temperature", "0.8", "--seed", "3", "--dtype", "float32", "--quiet")
    assert [json.loads(line)["token_ids"] for line in again.stdout.splitlines()] == [r["token_ids"] for r in rows]


def test_chat_session(model):
    script = "Hello!\n/system Answer briefly.\nAnd again?\n/reset\nNew topic\n/exit\n"
    result = run_cli("chat", "--model", model, "--max-new-tokens", "4", "--quiet", stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Assistant: ") == 3
    assert "[history cleared]" in result.stderr and "[system message set]" in result.stderr


def test_bench_prints_a_row_per_batch_size(model):
    result = run_cli("bench", "--model", model, "--batch-sizes", "1,3", "--prompt-tokens", "8", "--new-tokens", "4",
                     "--ttft-prompts", "16,64", "--temperature", "0.8", "--top-k", "5", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "sampled (temperature 0.8, top_k 5)" in result.stdout
    assert "time to first token, 64-token prompt" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "3"]


def test_verify_bf16_torch_against_fp32(model):
    result = run_cli("verify", "--model", model, "--greedy-tokens", "8", "--max-context", "256", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASSED" in result.stdout and "min PCC" in result.stdout


def test_convert_then_info(model, tmp_path):
    dst = tmp_path / "converted"
    result = run_cli("convert", model, dst, "--quiet")
    assert result.returncode == 0, result.stderr
    info = run_cli("info", dst)
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["format"] == "converted" and described["config"]["num_layers"] == 3
    assert_one_line_error(run_cli("convert", model, dst, "--quiet"), "already exists")


def test_demo_runs_offline(tmp_path):
    result = run_cli("demo", "--max-new-tokens", "6", env_extra={"BITNET_TT_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "BitNet b1.58 is" in result.stdout and "tokens/s" in result.stderr


def test_ttnn_backend_without_a_card(model, tmp_path):
    assert_one_line_error(run_cli("generate", "--model", model, "--backend", "ttnn", "hi"), "the ttnn backend")
    mocked = run_cli("generate", "--model", model, "--backend", "ttnn", "hi",
                     env_extra={"TT_METAL_MOCK_CLUSTER_DESC_PATH": str(tmp_path / "x.yaml")})
    if "needs the 'tt' extra" not in mocked.stderr:  # with ttnn installed, a mock is never taken for a card
        assert_one_line_error(mocked, "selects a mock device, which computes nothing")


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "{missing}", "hi"], "no such model folder"),
    (["chat", "--model", "{missing}"], "no such model folder"),
    (["bench", "--model", "{missing}"], "no such model folder"),
    (["info", "{missing}"], "no such model folder"),
    (["convert", "{missing}", "{tmp}/out"], "no such model folder"),
    (["generate", "--model", "{model}", "--temperature", "-1", "hi"], "temperature must be between 0 and 100"),
    (["generate", "--model", "{model}", "--max-new-tokens", "x", "hi"], "invalid int value"),
    (["generate", "--model", "{model}", "--max-context", "8", "a long prompt that will not fit in eight tokens at all"], "the context holds 8"),
    (["generate", "--model", "{model}", "--max-context", "99999", "hi"], "context between 1 and the model's 512"),
    (["generate", "--model", "{model}", "--backend", "cuda-magic", "hi"], "unknown backend"),
    (["generate", "--model", "{model}", "--dtype", "float16", "hi"], "unsupported dtype"),
    (["generate", "--model", "{model}"], "give a PROMPT or --prompts-file"),
    (["generate", "--model", "{model}", "--prompts-file", "{missing}"], "cannot read prompts"),
    (["bench", "--model", "{model}", "--batch-sizes", "1,x"], "--batch-sizes must be comma-separated integers"),
    (["bench", "--model", "{model}", "--batch-sizes", "1", "--temperature", "0.5", "--top-k", "-2"], "top_k must be 0 (off) or positive"),
    (["generate", "--model", "{broken}", "hi"], "not a readable safetensors file"),
    (["generate", "--model", "{model}", "--bogus", "hi"], "unrecognized arguments"),
    (["generate", "--model", "{model}", "--backend", "ttnn", "--tt-lm-head-dtype", "float16", "hi"],
     "LM head dtype 'float16' not supported"),
    (["generate", "--model", "{model}", "--tt-no-trace", "hi"], "the --tt-* options apply to --backend ttnn only"),
])
def test_bad_input_gives_one_line_error(model, tmp_path, args, message):
    broken = shutil.copytree(model, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    values = {"missing": tmp_path / "missing", "model": model, "tmp": tmp_path, "broken": broken}
    result = run_cli(*[a.format(**values) for a in args])
    assert_one_line_error(result, message)
