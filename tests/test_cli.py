"""`bitnet-tt` run as a user runs it: a subprocess per command, on a small model in a temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


# An earlier test may have set the mock device's variable in this process (tools.tt_mock.harness); the CLI
# runs as a user's would, without it unless a test passes it.
MOCK_DEVICE_VARIABLE = "TT_METAL_MOCK_CLUSTER_DESC_PATH"


def run_cli(*args, stdin: str | None = None, env_extra: dict | None = None, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != MOCK_DEVICE_VARIABLE} | (env_extra or {})
    argv = [a if isinstance(a, bytes) else str(a) for a in args]  # bytes: arguments that are not UTF-8
    return subprocess.run([sys.executable, "-m", "bitnet_tt.cli", *argv], input=stdin, capture_output=True,
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
    mode = {name: (dst / name).stat().st_mode & 0o777 for name in ("bitnet-tt.safetensors", "config.json")}
    assert mode["bitnet-tt.safetensors"] == mode["config.json"], mode  # both as the umask says
    assert_one_line_error(run_cli("convert", model, dst, "--quiet"), "already exists")


def test_demo_runs_offline(tmp_path):
    result = run_cli("demo", "--max-new-tokens", "6", env_extra={"BITNET_TT_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "Return the number of" in result.stdout and "tokens/s" in result.stderr
    assert "trained for minutes on Python's documentation" in result.stderr  # the shipped model, with its limits


def test_ttnn_backend_without_a_card(model, tmp_path):
    assert_one_line_error(run_cli("generate", "--model", model, "--backend", "ttnn", "hi"), "the ttnn backend")
    mocked = run_cli("generate", "--model", model, "--backend", "ttnn", "hi",
                     env_extra={MOCK_DEVICE_VARIABLE: str(tmp_path / "x.yaml")})
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
    (["bench", "--model", "{model}", "--batch-sizes", "1", "--temperature", "0.5", "--top-k", "-2"], "argument --top-k: must be at least 0"),
    (["generate", "--model", "{broken}", "hi"], "not a readable safetensors file"),
    (["generate", "--model", "{model}", "--bogus", "hi"], "unrecognized arguments"),
    (["generate", "--model", "{model}", "--backend", "ttnn", "--tt-lm-head-dtype", "float16", "hi"],
     "LM head dtype 'float16' not supported"),
    (["generate", "--model", "{model}", "--tt-no-trace", "hi"], "the --tt-* options apply to --backend ttnn only"),
    # a --tt-* option at its default value is still a --tt-* option
    (["verify", "--model", "{model}", "--tt-weight-dtype", "bfloat4_b"], "the --tt-* options apply to --backend ttnn only"),
    (["chat", "--model", "{model}", "--tt-activation-quant"], "the --tt-* options apply to --backend ttnn only"),
    (["verify", "--model", "{model}", "--per-op"], "--per-op compares the ttnn backend op by op with its host stand-in"),
    (["generate", "--model", "{model}", "--device", "meta", "hi"], "device 'meta' holds no data"),
    (["generate", "--model", "{model}", "--device", "warp-drive", "hi"], "unknown torch device"),
    (["generate", "--model", "{model}", b"caf\xe9 \xff"], "the prompt is not valid UTF-8"),
    (["generate", "--model", "{model}", "--max-context", "0", "hi"], "argument --max-context: must be at least 1, got 0"),
    (["generate", "--model", "{model}", "--max-batch", "0", "hi"], "argument --max-batch: must be at least 1, got 0"),
    (["serve", "--model", "{model}", "--max-batch", "-4"], "argument --max-batch: must be at least 1, got -4"),
    (["generate", "--model", "{model}", "--max-new-tokens", "0", "hi"], "argument --max-new-tokens: must be at least 1"),
    (["generate", "--model", "{model}", "--logprobs", "-1", "hi"], "argument --logprobs: must be at least 0"),
    (["generate", "--model", "{model}", "--prompts-file", "{prompts}", "hi"], "give either a PROMPT or --prompts-file"),
    (["bench", "--model", "{model}", "--threads", "-1"], "argument --threads: must be at least 1, got -1"),
    (["bench", "--model", "{model}", "--prompt-tokens", "-3"], "argument --prompt-tokens: must be at least 1, got -3"),
    (["bench", "--model", "{model}", "--new-tokens", "0"], "argument --new-tokens: must be at least 1, got 0"),
    (["bench", "--model", "{model}", "--synthetic", "tiny"], "--synthetic makes a random model"),
    (["bench", "--model", "{model}", "--batch-sizes", "1,4", "--max-batch", "2"], "--batch-sizes goes up to 4 but --max-batch is 2"),
    (["verify", "--model", "{model}", "--greedy-tokens", "0"], "argument --greedy-tokens: must be at least 1"),
    (["serve", "--model", "{model}", "--port", "70000"], "argument --port: must be in 0-65535"),
    (["serve", "--model", "{model}", "--max-queue", "0"], "argument --max-queue: must be at least 1"),
])
def test_bad_input_gives_one_line_error(model, tmp_path, args, message):
    broken = shutil.copytree(model, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("from the file\n")
    values = {"missing": tmp_path / "missing", "model": model, "tmp": tmp_path, "broken": broken, "prompts": prompts}
    result = run_cli(*[a if isinstance(a, bytes) else a.format(**values) for a in args])
    assert_one_line_error(result, message)


# ---------------------------------------------------------------------------------------------
# Each command's own defaults, as its --help states them


def help_defaults(command: str) -> dict[str, str]:
    """'--option' -> the '(default: X)' text of `bitnet-tt COMMAND --help`, read from the printed help."""
    import contextlib
    import io
    import re

    from bitnet_tt.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([command, "--help"])
    entries = re.split(r"\n  (?=-)", out.getvalue())  # one entry per option, continuation lines included
    found = {}
    for entry in entries:
        default = re.search(r"\(default: ([^)]*)\)", " ".join(entry.split()))
        if default and entry.startswith("--"):
            found[entry.split()[0]] = default.group(1)
    return found


COMMANDS = ["generate", "chat", "serve", "bench", "verify", "demo", "convert", "info"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_states_each_effective_default(command):
    from bitnet_tt.cli import build_parser

    parser = build_parser()
    subparser = parser._subparsers._group_actions[0].choices[command]
    positional = [a for a in subparser._actions if not a.option_strings and a.nargs is None]
    args = vars(parser.parse_args([command, *["x"] * len(positional)]))
    stated = help_defaults(command)
    options = {a.option_strings[-1]: a.dest for a in subparser._actions if a.option_strings and a.dest != "help"}
    for option, dest in options.items():
        value = args[dest]
        if value is None or value is False or value == []:  # no value: help may only describe what happens
            assert " " in stated.get(option, " "), f"{command} {option}: help says {stated[option]}, uses {value!r}"
        else:
            assert stated.get(option) == str(value), f"{command} {option}: help says {stated.get(option)}, uses {value!r}"


def test_commands_keep_their_own_sampling_and_slot_defaults():
    from bitnet_tt.cli import build_parser

    parser = build_parser()
    generate = parser.parse_args(["generate", "x"])
    chat = parser.parse_args(["chat"])
    serve = parser.parse_args(["serve"])
    assert (generate.temperature, generate.top_p, generate.max_batch) == (0.0, 1.0, 8)  # greedy, 8 prompts at once
    assert (chat.temperature, chat.top_p) == (0.7, 0.9)
    assert serve.max_batch == 8
    assert parser.parse_args(["bench"]).max_batch is None  # bench: the largest batch size
    assert help_defaults("chat")["--temperature"] == "0.7" and help_defaults("generate")["--temperature"] == "0.0"


def test_version_and_python_m():
    from bitnet_tt import __version__

    assert run_cli("--version").stdout.strip() == f"bitnet-tt {__version__}"
    as_module = subprocess.run([sys.executable, "-m", "bitnet_tt", "--version"], capture_output=True, text=True, timeout=120)
    assert as_module.returncode == 0 and as_module.stdout.strip() == f"bitnet-tt {__version__}"


# ---------------------------------------------------------------------------------------------
# What the commands say


def test_the_demo_model_is_announced_once(tmp_path):
    env = {"BITNET_TT_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = run_cli("generate", "--max-new-tokens", "2", "--quiet", "Hi", env_extra=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("no --model given: using a random-weight tiny demo model") == 1
    with_model = run_cli("generate", "--model", tmp_path / "synthetic-tiny", "--max-new-tokens", "2", "--quiet", "Hi")
    assert with_model.returncode == 0 and "no --model given" not in with_model.stderr


def test_the_demo_model_survives_a_race_and_a_killed_writer(tmp_path, monkeypatch):
    """Another process publishes the demo model while this one writes it; a killed writer left a partial folder."""
    import bitnet_tt.synthetic as synthetic
    from bitnet_tt.cli import synthetic_model

    monkeypatch.setenv("BITNET_TT_CACHE", str(tmp_path))
    (tmp_path / ".synthetic-tiny.partial-0-999999999-1").mkdir()  # its owner is gone
    write = synthetic.write_random_model

    def another_process_finishes_first(folder, *args, **kwargs):
        write(tmp_path / "other", *args, **kwargs)
        (tmp_path / "other").rename(tmp_path / "synthetic-tiny")
        return write(folder, *args, **kwargs)

    monkeypatch.setattr(synthetic, "write_random_model", another_process_finishes_first)
    folder = synthetic_model("tiny", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic-tiny"]
    assert (folder / "model.safetensors").is_file()


def test_generate_json_logprobs_list_token_text_and_alternatives(model):
    result = run_cli("generate", "--model", model, "--json", "--logprobs", "3", "--max-new-tokens", "6", "--quiet",
                     "The quick brown fox")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert len(row["logprobs"]) == len(row["token_ids"])
    for entry in row["logprobs"]:
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] <= 0 and all(alt["logprob"] <= 0 for alt in entry["top_logprobs"])
        assert "Ġ" not in entry["token"]  # text, not byte-level symbols
    if row["finish_reason"] == "length" and "\ufffd" not in row["text"]:
        assert "".join(e["token"] for e in row["logprobs"]) == row["text"]


def test_token_text_is_what_the_token_prints(model):
    from bitnet_tt.config import ModelConfig
    from bitnet_tt.tokenizer import Tokenizer

    tokenizer = Tokenizer(model, ModelConfig.from_folder(model))
    text = " is the naïve café 😀 ok"
    ids = tokenizer.encode(text, add_bos=False)
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")
    [is_id] = tokenizer.encode(" is", add_bos=False)
    assert tokenizer.token_text(is_id) == " is" and list(tokenizer.token_bytes(is_id)) == [32, 105, 115]


def test_chat_skips_a_line_that_is_not_utf8(model):
    script = b"caf\xe9\nHello\n/exit\n"
    result = subprocess.run([sys.executable, "-m", "bitnet_tt.cli", "chat", "--model", str(model), "--max-new-tokens", "3",
                             "--quiet"], input=script, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr and b"that line is not valid UTF-8; ignored" in result.stderr
    assert result.stdout.count(b"Assistant: ") == 1


def test_chat_help_states_its_sampling():
    help_text = " ".join(run_cli("chat", "--help").stdout.split())
    assert "0 is greedy (default: 0.7)" in help_text and "(default: 0.9)" in help_text


def test_bench_says_when_a_ttft_prompt_is_cut(model):
    result = run_cli("bench", "--model", model, "--batch-sizes", "1", "--prompt-tokens", "4", "--new-tokens", "2",
                     "--ttft-prompts", "16,2048", "--max-context", "128", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "time to first token, 16-token prompt:" in result.stdout
    assert "time to first token, 127-token prompt (cut from 2048: the context holds 128)" in result.stdout


def test_verify_says_what_it_compared(model):
    result = run_cli("verify", "--model", model, "--greedy-tokens", "4", "--max-context", "64", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "comparing cpu, LM head bf16 (candidate) with torch float32 (reference)" in result.stdout
    assert "PASSED: cpu, LM head bf16 against torch float32" in result.stdout


def test_serve_refuses_a_busy_port_before_loading(tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        # The model does not exist: an error about the port proves the port was checked first.
        result = run_cli("serve", "--model", tmp_path / "not-loaded", "--port", port)
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}")


def test_serve_prints_what_it_serves(model, tmp_path):
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bitnet_tt.cli", "serve", "--model", str(model), "--port",
                                 str(port), "--max-batch", "3", "--max-context", "256", "--quiet"], stderr=out)
    try:
        deadline = time.monotonic() + 120
        while "OpenAI API at" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    banner = log.read_text()
    assert f"model {model} ({model}) on the cpu backend, 3 slots x 256 tokens of context" in banner
    assert f"OpenAI API at http://127.0.0.1:{port}/v1" in banner


def test_info_on_a_hub_id_reads_only_config_and_index(model, tmp_path):
    """A hub cache that holds only config.json and the index (no weights) is enough, offline."""
    snapshot = tmp_path / "hub" / "models--someone--bitnet-small" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    shutil.copyfile(model / "config.json", snapshot / "config.json")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    result = run_cli("info", "someone/bitnet-small", env_extra={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["config"]["num_layers"] == 3 and described["tensors"] == 2
    assert described["weight_files"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]



# ---------------------------------------------------------------------------------------------
# ./run picks a supported Python or names what to install


def fake_interpreters(folder, names):
    """Interpreters that fail `run`'s version check, as 3.11 and 3.13 do (ttnn has no wheel for them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("#!/bin/sh\nexit 1\n")
        (folder / name).chmod(0o755)


def run_script(tmp_path, *args):
    from pathlib import Path

    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "PYENV_ROOT": str(tmp_path / "pyenv"),
           "BITNET_TT_VENV": str(tmp_path / "venv")}
    script = Path(__file__).resolve().parent.parent / "run"
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=60)


def test_run_refuses_unsupported_pythons(tmp_path):
    fake_interpreters(tmp_path / "bin", ["python3.12", "python3.10", "python3"])
    result = run_script(tmp_path, "demo")
    assert_one_line_error(result, "run: needs Python 3.12 (or 3.10; ttnn has no 3.11 or 3.13 wheel)")
    assert not (tmp_path / "venv").exists()


def test_run_refuses_a_venv_with_an_unsupported_python(tmp_path):
    fake_interpreters(tmp_path / "venv" / "bin", ["python"])
    result = run_script(tmp_path, "test")
    assert_one_line_error(result, "holds an unsupported Python")
