"""The cpu backend against the golden torch backend in fp32: greedy continuations, logits, batching, slots,
the int8 LM head, memory-mapped embedding, options and errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from bitnet_tt.backends import create_backend, default_backend
from bitnet_tt.backends.cpu import kernels
from bitnet_tt.backends.cpu.backend import CPUOptions
from bitnet_tt.backends.cpu.weights import hf_to_2bit
from bitnet_tt.checkpoint import convert_checkpoint
from bitnet_tt.errors import BitNetError, CapacityError
from bitnet_tt.ternary import pack_hf
from bitnet_tt.verify import pcc


@pytest.fixture(scope="module", autouse=True)
def built():
    if not kernels.available():
        kernels.build_in_place()


def backends(folder, slots=1, **cpu):
    fast = create_backend("cpu", folder, slots, progress=False, cpu_options=CPUOptions(**cpu) if cpu else None)
    golden = create_backend("torch", folder, slots, dtype="float32", progress=False)
    return fast, golden


def logits_of(cpu_logits: np.ndarray) -> torch.Tensor:
    """The cpu backend's logits (numpy: it never imports torch) as a tensor, to compare with the golden's."""
    assert isinstance(cpu_logits, np.ndarray) and cpu_logits.dtype == np.float32
    return torch.from_numpy(cpu_logits)


def greedy(backend, prompt, steps, slot=0):
    tokens = [int(backend.prefill(slot, prompt).argmax())]
    for _ in range(steps - 1):
        tokens.append(backend.decode_greedy([slot], [tokens[-1]])[0])
    return tokens


@pytest.fixture(scope="module")
def converted(model_factory, tmp_path_factory):
    return convert_checkpoint(model_factory("packed", seed=1), tmp_path_factory.mktemp("conv") / "m", progress=False)


@pytest.mark.parametrize("fmt", ["packed", "master", "converted", "untied"])
def test_greedy_64_tokens_equal_the_golden_model(fmt, model_factory, converted):
    folder = {"packed": lambda: model_factory("packed"), "master": lambda: model_factory("master"),
              "converted": lambda: converted,
              "untied": lambda: model_factory("packed", tie_word_embeddings=False)}[fmt]()
    fast, golden = backends(folder)
    prompt = list(range(3, 40))
    assert greedy(fast, prompt, 64) == greedy(golden, prompt, 64)


@pytest.mark.parametrize("path", ["scalar", None], ids=["scalar", "best"])
def test_logits_match_the_golden_model_to_float_rounding(model_factory, path):
    """Integer products are exact; what remains is fp32 summation order (norm, attention, LM head). Over a
    short run no activation lands on a rounding tie: the logits agree to float rounding. Over a long one a
    tie can flip an int8 code; the golden checks hold fp32 runs to 1 - PCC <= 1e-3 of the exact logits."""
    fast, golden = backends(model_factory("packed"), path=path)
    prompt = list(range(3, 40))
    a, b = logits_of(fast.prefill(0, prompt)), golden.prefill(0, prompt)
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max())
    a, b = logits_of(fast.decode([0], [5])), golden.decode([0], [5])
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max())
    long_prompt = list(range(7, 295, 3))  # RoPE far from position 0
    a, b = fast.prefill(0, long_prompt), golden.prefill(0, long_prompt)
    assert 1 - pcc(a, b) <= 1e-3 and int(a.argmax()) == int(b.argmax())


def test_paths_give_identical_logits(model_factory):
    folder = model_factory("packed")
    runs = [create_backend("cpu", folder, 1, progress=False, cpu_options=CPUOptions(path=p, threads=t))
            for p in kernels.paths() for t in (1, 2)]
    logits = [b.prefill(0, list(range(3, 50))) for b in runs]
    assert all(np.array_equal(x, logits[0]) for x in logits)


def layers_one_call_at_a_time(model, rows, spans):
    """The decoder layers as kernel calls from Python, one per step of a layer (the cpu model before its layers
    became one native call)."""
    cfg, work, path, threads = model.config, model.work, model.path, model.threads
    x, qkv, attention, gate_up = work.x[:rows], work.qkv[:rows], work.attention[:rows], work.gate_up[:rows]
    for index, layer in enumerate(model.weights.layers):
        p, norms, eps = layer.projections, layer.norms, cfg.rms_norm_eps
        work.hidden_acts.quantize(x, rows, norms["input_layernorm"], eps, path=path)
        kernels.matmul(p["qkv"].weight, work.hidden_acts, rows, qkv, p["qkv"].scale, False, path, threads)
        kernels.attention_step(qkv, rows, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, model.rope_cos, model.rope_sin,
                               spans, model.cache[index], cfg.head_dim**-0.5, work.attention, path, threads)
        work.attention_acts.quantize(attention, rows, norms["self_attn.attn_sub_norm"], eps, path=path)
        kernels.matmul(p["o_proj"].weight, work.attention_acts, rows, x, p["o_proj"].scale, True, path, threads)
        work.hidden_acts.quantize(x, rows, norms["post_attention_layernorm"], eps, path=path)
        kernels.matmul(p["gate_up"].weight, work.hidden_acts, rows, gate_up, p["gate_up"].scale, False, path, threads)
        work.mlp_acts.quantize(gate_up, rows, norms["mlp.ffn_sub_norm"], eps, gated=True, path=path)
        kernels.matmul(p["down"].weight, work.mlp_acts, rows, x, p["down"].scale, True, path, threads)


def prefill_and_decode(backend):
    """Logits of prefills (one of 50 tokens: the many-token GEMM and attention) and two 3-slot decode steps."""
    logits = [backend.prefill(slot, prompt) for slot, prompt in enumerate((list(range(3, 53)), [4, 5, 6], [9]))]
    return logits + [backend.decode([0, 1, 2], [7, 8, 9]), backend.decode([2, 0, 1], [1, 2, 3])]


@pytest.mark.parametrize("path", kernels.paths() if kernels.available() else ["scalar"])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_native_layers_equal_the_kernels_called_one_by_one(model_factory, monkeypatch, path, threads):
    folder, options = model_factory("packed"), CPUOptions(path=path, threads=threads)
    native = prefill_and_decode(create_backend("cpu", folder, 3, progress=False, cpu_options=options))
    reference = create_backend("cpu", folder, 3, progress=False, cpu_options=options)
    monkeypatch.setattr(kernels, "layers", lambda stack, rows, spans, *_: layers_one_call_at_a_time(reference.model, rows, spans))
    assert all(np.array_equal(a, b) for a, b in zip(native, prefill_and_decode(reference), strict=True))


def test_the_layers_time_each_component_and_check_their_rows(model_factory):
    backend = create_backend("cpu", model_factory("packed"), 2, progress=False)
    model, cfg = backend.model, backend.config
    model.timings = np.zeros((len(kernels.layer_components()), 3))
    backend.prefill(0, [3, 4, 5])
    timed = dict(zip(kernels.layer_components(), model.timings.tolist()))
    qkv = model.weights.layers[0].projections["qkv"].weight
    assert timed["norm + quantise"][1] == 4 * cfg.num_layers and timed["down"][1] == cfg.num_layers
    assert timed["qkv"][2] == qkv.data.nbytes * cfg.num_layers
    assert timed["RoPE + attention"][2] == 2 * cfg.kv_size * 4 * 3 * cfg.num_layers  # keys and values of 3 positions
    rows = len(model.work.x)
    with pytest.raises(ValueError, match=f"holds up to {rows} rows"):
        kernels.layers(model.layers, rows + 1, np.array([(0, 0, rows + 1)], np.int64), 0, 1)
    with pytest.raises(ValueError, match="outside the cache"):
        kernels.layers(model.layers, 1, np.array([(2, 0, 1)], np.int64), 0, 1)


def test_batched_decode_and_slots_equal_single_runs(model_factory):
    folder = model_factory("packed")
    fast, golden = backends(folder, slots=3)
    prompts = {0: [3, 4, 5, 6], 2: list(range(10, 40)), 1: [7]}
    for slot, prompt in prompts.items():
        fast.prefill(slot, prompt)
        golden.prefill(slot, prompt)
    tokens = {0: 11, 1: 12, 2: 13}
    for _ in range(5):
        slots = [2, 0, 1]
        a = logits_of(fast.decode(slots, [tokens[s] for s in slots]))
        b = golden.decode(slots, [tokens[s] for s in slots])
        assert all(1 - pcc(x, y) <= 1e-3 for x, y in zip(a, b)) and torch.equal(a.argmax(-1), b.argmax(-1))
        tokens = {s: int(t) for s, t in zip(slots, a.argmax(-1))}
    fast.free(1)
    assert fast.slot_length(1) == 0 and fast.slot_length(2) == len(prompts[2]) + 5
    single, _ = backends(folder)
    assert np.allclose(fast.prefill(1, [7, 8]), single.prefill(0, [7, 8]), rtol=0, atol=1e-5)


def test_copied_slot_and_kept_prefix_continue_like_a_fresh_prefill(model_factory):
    fast, _ = backends(model_factory("packed"), slots=3)
    prompt = list(range(3, 30))
    fast.prefill(0, prompt)
    fast.copy_slot(0, 1, 20)
    fast.prefill(2, prompt[:20])
    assert np.array_equal(fast.prefill(1, prompt[20:]), fast.prefill(2, prompt[20:]))
    fast.keep_prefix(1, 10)
    fast.free(2)
    fast.prefill(2, prompt[:10])
    assert np.array_equal(fast.decode([1], [7]), fast.decode([2], [7]))


def test_long_prompt_runs_in_chunks(model_factory):
    fast, golden = backends(model_factory("packed"))
    prompt = [int(t) for t in torch.randint(0, 297, (300,), generator=torch.Generator().manual_seed(0))]
    a, b = fast.prefill(0, prompt), golden.prefill(0, prompt)
    assert 1 - pcc(a, b) <= 1e-3 and int(a.argmax()) == int(b.argmax())


def test_int8_lm_head_is_close_to_bf16(model_factory):
    folder = model_factory("packed")
    bf16 = create_backend("cpu", folder, 1, progress=False)
    int8 = create_backend("cpu", folder, 1, progress=False, cpu_options=CPUOptions(lm_head="int8"))
    prompt = list(range(3, 60))
    a, b = bf16.prefill(0, prompt), int8.prefill(0, prompt)
    assert pcc(a, b) > 0.999 and not np.array_equal(a, b)
    assert int8.model.weights.head.dtype == np.int8


@pytest.mark.parametrize("rows, inputs", [(8, 256), (12, 130), (4, 7)])
def test_hugging_face_packed_bytes_repack_like_their_codes(rows, inputs):
    codes = torch.randint(-1, 2, (rows, inputs), generator=torch.Generator().manual_seed(inputs), dtype=torch.int8)
    codes[0, :3] = torch.tensor([-1, 0, 1])
    staged = np.empty((rows, -(-inputs // 4)), np.uint8)
    hf_to_2bit(pack_hf(codes).numpy(), staged)
    from_bytes = kernels.PackedTernary.from_2bit(staged, k=inputs)
    from_codes = kernels.PackedTernary.from_codes(codes.numpy())
    assert (from_bytes.n, from_bytes.k) == (rows, inputs) and np.array_equal(from_bytes.data, from_codes.data)


def test_embedding_is_mapped_from_the_file(model_factory):
    fast = create_backend("cpu", model_factory("packed"), 1, progress=False)
    embed = fast.model.weights.embed
    assert not embed.flags.owndata and not embed.flags.writeable


def test_capacity_and_options_are_one_line_errors(model_factory):
    folder = model_factory("packed")
    fast = create_backend("cpu", folder, 1, max_context=8, progress=False)
    with pytest.raises(CapacityError):
        fast.prefill(0, list(range(9)))
    with pytest.raises(CapacityError, match="token ids"):
        fast.prefill(0, [10_000])
    with pytest.raises(BitNetError, match="LM head dtype"):
        CPUOptions(lm_head="int4")
    with pytest.raises(BitNetError, match="computes in float32"):
        create_backend("cpu", folder, 1, dtype="bfloat16", progress=False)
    with pytest.raises(BitNetError, match="apply to --backend cpu only"):
        create_backend("torch", folder, 1, progress=False, cpu_options=CPUOptions())


def test_default_backend_is_cpu_unless_torch_settings_are_asked_for():
    assert default_backend() == "cpu" and default_backend("cpu", "float32") == "cpu"
    assert default_backend("cuda") == "torch" and default_backend("cpu", "bfloat16") == "torch"


def test_unbuilt_kernels_are_a_one_line_error_and_the_default_falls_back(model_factory, monkeypatch, capsys):
    monkeypatch.setattr(kernels, "_kernels", None)
    with pytest.raises(BitNetError, match="compiled kernels are not built"):
        create_backend("cpu", model_factory("packed"), 1, progress=False)
    assert default_backend() == "torch"
    assert "CPU kernels are not built" in capsys.readouterr().err


def test_greedy_decoding_picks_the_argmax_and_marks_a_slot_with_non_finite_logits(converted):
    fast = create_backend("cpu", converted, 2, progress=False)
    for slot in (0, 1):
        fast.prefill(slot, [1, 2, 3])
    logits = fast.decode([0, 1], [4, 5])
    rewind = lambda: [fast.keep_prefix(slot, 3) for slot in (0, 1)]
    rewind()
    assert fast.decode_greedy([0, 1], [4, 5]) == logits.argmax(-1).tolist()
    rewind()
    forward = fast.model.forward
    for bad in (np.nan, np.inf, -np.inf):
        def forward_with_a_bad_logit(tokens, segments, logits_of, bad=bad):
            out = forward(tokens, segments, logits_of)
            out[1, 7] = bad
            return out

        fast.model.forward = forward_with_a_bad_logit
        assert fast.decode_greedy([0, 1], [4, 5]) == [int(logits[0].argmax()), -1]
        rewind()


@pytest.mark.parametrize("theta, dim, length", [(500_000.0, 128, 4096), (10_000.0, 16, 300)])
def test_rope_tables_within_one_ulp_of_torchs(theta, dim, length):
    """The cpu backend's numpy RoPE tables: the golden model's fp32 frequencies, cos and sin within 1 ulp."""
    from types import SimpleNamespace

    from bitnet_tt.backends.cpu.model import rope_tables
    from bitnet_tt.backends.torch.model import rope_tables as torch_rope_tables

    config = SimpleNamespace(head_dim=dim, rope_theta=theta)
    for ours, golden in zip(rope_tables(config, length), torch_rope_tables(config, length, torch.float32, "cpu")):
        golden = golden.numpy()
        assert ours.dtype == np.float32 and ours.shape == (length, dim)
        assert np.all(np.abs(ours - golden) <= np.spacing(np.abs(golden)))


@pytest.mark.parametrize("fmt, lm_head, temperature", [("converted", "bf16", "0"), ("converted", "int8", "0.8"),
                                                       ("packed", "bf16", "0")])
def test_generation_never_imports_torch(model_factory, converted, fmt, lm_head, temperature):
    """`bitnet-tt generate --backend cpu` on a converted or Hugging Face packed model: loading, prefill, decode and
    sampling run without torch (~0.5 GB)."""
    folder = converted if fmt == "converted" else model_factory("packed")
    child = ("import sys\nfrom bitnet_tt.cli import main\n"
             f"code = main(['generate', '--model', sys.argv[1], '--backend', 'cpu', '--lm-head', '{lm_head}', "
             f"'--max-new-tokens', '4', '--temperature', '{temperature}', '--quiet', 'hi'])\n"
             "print('exit', code, 'torch imported', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", child, str(folder)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "exit 0 torch imported False"
