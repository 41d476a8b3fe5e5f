"""The ttnn backend's own call sequence, run on a host stand-in for ttnn that computes the numbers,
checked against the PyTorch backend (issue: no card here, and a mock device computes nothing)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from bitnet_tt.backends.torch.backend import TorchBackend
from bitnet_tt.backends.ttnn.backend import TTNNBackend
from bitnet_tt.backends.ttnn.config import TTOptions, TTPlan
from bitnet_tt.checkpoint import load_weights
from conftest import pcc
from tools.tt_host.stand_in import HostTT, real_block_float

pytestmark = pytest.mark.tt_host

CONFIGS = {
    "gqa4-head32": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1),
    "gqa2-head64": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=2),
}
# fp32-equivalent: exact stand-in, bf16-valued weights and head, and HF's activation quantisation
EXACT = TTOptions(weight_dtype="bfloat16", lm_head_dtype="bfloat16", activation_quant=True, use_trace=True)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def folder(request, model_factory):
    return model_factory("packed", **CONFIGS[request.param])


@pytest.fixture(scope="module")
def block_float(host_ttnn):
    """bfloat8_b / bfloat4_b rounding through ttnn's real host conversion (mock cluster descriptor, no device)."""
    return real_block_float(host_ttnn)


def backends(folder, options: TTOptions, users: int = 1, exact: bool = False, block_float=None, patch=None):
    host = HostTT(exact=exact, block_float=block_float)
    weights = load_weights(folder, progress=False)
    tt = TTNNBackend(weights.config, weights, host, host.device(), users, 512, options)
    if patch:
        patch(tt)
    reference = TorchBackend(load_weights(folder, progress=False), max_slots=users, max_context=512, dtype="float32")
    return tt, reference


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 290, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("activation_quant", [False, True])
@pytest.mark.parametrize("length", [1, 33, 300])
def test_prefill_logits_with_device_dtypes(folder, block_float, length, activation_quant):
    # the defaults: bfloat4_b weights, bfloat8_b LM head, bf16 activations
    tt, reference = backends(folder, TTOptions(use_trace=False, activation_quant=activation_quant), block_float=block_float)
    ids = prompt(length, length)
    assert pcc(tt.prefill(0, ids), reference.prefill(0, ids)) >= 0.999


def greedy(backend, slots, prompts, steps):
    """Greedy continuations per slot, and the logits of every step ([steps] of [len(slots), vocab])."""
    first = {s: backend.prefill(s, p) for s, p in zip(slots, prompts)}
    last = {s: int(logits.argmax()) for s, logits in first.items()}
    tokens = {s: [t] for s, t in last.items()}
    history = [torch.stack([first[s] for s in slots])]
    for _ in range(steps - 1):
        logits = backend.decode(slots, [last[s] for s in slots])
        history.append(logits)
        for row, s in enumerate(slots):
            last[s] = int(logits[row].argmax())
            tokens[s].append(last[s])
    return tokens, history


def agreement(tt, reference, slots, prompts, steps):
    """(identical greedy tokens?, the lowest per-row logits PCC over all steps)."""
    (got, got_logits), (want, want_logits) = (greedy(b, slots, prompts, steps) for b in (tt, reference))
    lowest = min(pcc(g, w) for a, b in zip(got_logits, want_logits) for g, w in zip(a, b))
    return got == want, lowest


@pytest.mark.parametrize("length", [1, 33, 300])
def test_greedy_tokens_identical_in_fp32_settings_with_trace(folder, length):
    tt, reference = backends(folder, EXACT, exact=True)
    same_tokens, lowest_pcc = agreement(tt, reference, [0], [prompt(length, 7)], 32)
    assert same_tokens and lowest_pcc >= 0.999
    assert tt.steps.captured == ["forward"]  # decode steps after the first were trace replays


def test_32_users_at_different_positions(folder):
    tt, reference = backends(folder, EXACT, users=32, exact=True)
    slots = list(range(32))
    prompts = [prompt(1 + 9 * s, s) for s in slots]  # lengths 1 .. 280
    same_tokens, lowest_pcc = agreement(tt, reference, slots, prompts, 32)
    assert same_tokens and lowest_pcc >= 0.999


@pytest.mark.parametrize("activation_quant", [False, True])  # sharded activations between the ops, or L1 rows
def test_batched_decode_logits_with_device_dtypes(folder, block_float, activation_quant):
    tt, reference = backends(folder, TTOptions(activation_quant=activation_quant), users=4, block_float=block_float)
    slots = [2, 0, 3]
    for s in slots:
        ids = prompt(5 + 20 * s, s)
        tt.prefill(s, ids)
        reference.prefill(s, ids)
    tokens = [11, 12, 13]
    for _ in range(3):
        got, want = tt.decode(slots, tokens), reference.decode(slots, tokens)
        assert min(pcc(g, w) for g, w in zip(got, want)) >= 0.999
        tokens = want.argmax(-1).tolist()


def ternary_matmuls_at_hifi2(tt):
    tt.model.ternary_kernel = tt.model.matmul_kernel


def lm_head_at_lofi(tt):
    tt.model.matmul_kernel = tt.model.ternary_kernel


@pytest.mark.parametrize("change, identical", [(ternary_matmuls_at_hifi2, True), (lm_head_at_lofi, False)])
def test_lofi_ternary_matmuls_give_hifi2_logits_bit_for_bit(folder, block_float, change, identical):
    """The stand-in multiplies at each matmul's math fidelity, on weights converted by ttnn itself: the
    backend's LoFi ternary matmuls give exactly the logits HiFi2 would (prefill and decode); LoFi on the
    LM head, whose bfloat8_b values have more mantissa bits, does not."""
    lofi, _ = backends(folder, TTOptions(use_trace=False), users=2, block_float=block_float)
    other, _ = backends(folder, TTOptions(use_trace=False), users=2, block_float=block_float, patch=change)
    ids = prompt(40, 3)
    logits = [(b.prefill(0, ids), b.decode([0], [5])) for b in (lofi, other)]
    same = all(torch.equal(a, b) for a, b in zip(*logits))
    assert same == identical


def test_lm_head_over_the_whole_matmul_grid(model_factory, block_float):
    """A vocabulary of 79 tiles (the last one partly filled): the head is one 1D matmul on 79 cores."""
    folder = model_factory("packed", **dict(CONFIGS["gqa4-head32"], vocab_size=2500))
    tt, reference = backends(folder, TTOptions(use_trace=False), users=2, block_float=block_float)
    assert tt.plan.lm_head_matmul().output_cores == 79
    ids = prompt(40, 9)
    assert pcc(tt.prefill(0, ids), reference.prefill(0, ids)) >= 0.999
    assert pcc(tt.decode([0], [5])[0], reference.decode([0], [5])[0]) >= 0.999


# --- the check has teeth: deliberately wrong backends fail it --------------------------------------------


def rope_backwards_in_decode(tt):
    """The prior art's bug: decode rotated by -theta while prefill rotated by +theta."""
    model = tt.model
    original = model._rope_rows

    def flipped(table, rows):
        rotation = original(table, rows)
        if table is model.w.rope_sin_rows:
            rotation._data = -rotation.data
        return rotation

    model._rope_rows = flipped


def cache_one_position_off(tt):
    original = tt._copy_inputs

    def shifted(host):
        if "positions" in host:  # cache writes and attention lengths, not the RoPE rows
            host["positions"]._data = host["positions"].data + 1
        original(host)

    tt._copy_inputs = shifted


@pytest.mark.parametrize("bug", [rope_backwards_in_decode, cache_one_position_off])
def test_broken_backend_fails_the_check(folder, bug):
    tt, reference = backends(folder, replace(EXACT, use_trace=False), users=2, exact=True, patch=bug)
    ids = prompt(40, 3)
    assert pcc(tt.prefill(0, ids), reference.prefill(0, ids)) >= 0.9999  # prefill is untouched
    # Random-weight models often repeat one token, so greedy tokens alone would miss it; the logits do not.
    _, lowest_pcc = agreement(tt, reference, [1], [prompt(33, 4)], 16)
    assert lowest_pcc < 0.999


# --- placement: the layouts of main b79e45c, which the placement-aware stand-in must reject ----------------


def layout_of_b79e45c(tt):
    """What the backend did before issue 14: the head split's generic height-sharded output (the first
    users' worth of cores of the whole 13-wide grid, row by row) and an 8x8 SDPA decode grid."""
    host, model = tt.tt, tt.model
    split = host.experimental.nlp_create_qkv_heads_decode
    host.experimental.nlp_create_qkv_heads_decode = lambda *args, **kwargs: split(
        *args, **{**kwargs, "memory_config": host.L1_HEIGHT_SHARDED_MEMORY_CONFIG})
    model.sdpa_decode_config = host.SDPAProgramConfig(compute_with_storage_grid_size=host.CoreCoord(8, 8),
                                                      q_chunk_size=0, k_chunk_size=0)


@pytest.mark.parametrize("bug", [None, layout_of_b79e45c])
def test_placement_of_b79e45c_fails_the_check_at_32_users(model_factory, bug):
    """On a 13-wide Blackhole grid, users 8-31 got another user's cos/sin rows and Q: numbers a card would
    compute wrongly although every mock-device check passed."""
    folder = model_factory("packed", **CONFIGS["gqa4-head32"])
    tt, reference = backends(folder, replace(EXACT, use_trace=False), users=32, exact=True, patch=bug)
    slots = list(range(32))
    for s in slots:
        ids = prompt(3 + s, s)
        tt.prefill(s, ids)
        reference.prefill(s, ids)
    got, want = tt.decode(slots, [7] * 32), reference.decode(slots, [7] * 32)
    agree = [pcc(g, w) >= 0.999 for g, w in zip(got, want)]  # NaN (memory no shard owns) never agrees
    assert all(agree) == (bug is None)
    if bug:
        assert all(agree[:8]) and not any(agree[8:])  # the first row of 8 users sits where both layouts agree
    assert not tt.tt.warnings


@pytest.mark.parametrize("program_grid", ["8 wide", "the whole 13-wide grid"])
def test_activations_sharded_over_two_rows_of_the_matmul_grid(model_factory, monkeypatch, program_grid):
    """Hidden 512 (16 tiles: the residual on 8x2 cores) and FFN 1536 (48 tiles: gate and up on 8x3): the 1D
    matmuls multicast x's shard k from core k of an 8-wide program grid, row by row. Put the matmuls that
    write rows (QKV, LM head) on the whole 13-wide grid and they read shards 8-12 from cores holding none."""
    if program_grid != "8 wide":
        planned = TTPlan.decode_matmul
        monkeypatch.setattr(TTPlan, "decode_matmul", lambda self, *a, **k: planned(self, *a, **k) if "output_on" in k
                            else replace(planned(self, *a), grid=(self.device.grid_x, self.device.grid_y)))
    folder = model_factory("packed", hidden_size=512, intermediate_size=1536, num_attention_heads=4,
                           num_key_value_heads=1, num_hidden_layers=2)
    options = TTOptions(weight_dtype="bfloat16", lm_head_dtype="bfloat16", use_trace=False)
    tt, reference = backends(folder, options, users=8, exact=True)
    assert tt.plan.activation_grid(512) == (8, 2) and tt.plan.activation_grid(1536) == (8, 3)
    slots = list(range(8))
    same_tokens, lowest_pcc = agreement(tt, reference, slots, [prompt(2 + 5 * s, s) for s in slots], 4)
    assert (same_tokens and lowest_pcc >= 0.999) == (program_grid == "8 wide")
    assert not tt.tt.warnings


def compiles_with_a_live_trace(tt):
    """Before issue 14: op-by-op runs (prefill, a picker's first run) did not release the traces."""
    tt.steps.op_by_op = lambda step: step()


@pytest.mark.parametrize("bug", [None, compiles_with_a_live_trace])
def test_a_prefill_that_compiles_new_programs_releases_the_traces(model_factory, bug):
    folder = model_factory("packed", **CONFIGS["gqa4-head32"])
    tt, reference = backends(folder, EXACT, users=2, exact=True, patch=bug)
    for backend in (tt, reference):
        backend.prefill(0, prompt(5, 1))
    for token in (3, 4, 5):  # a warm-up, a capture, a replay
        assert pcc(tt.decode([0], [token]), reference.decode([0], [token])) >= 0.999
    assert tt.steps.captured == ["forward"]
    for backend in (tt, reference):
        backend.prefill(1, prompt(100, 2))  # a new prefill length: new programs
    if bug:
        with pytest.raises(RuntimeError, match="new programs were compiled while it was live"):
            tt.decode([0, 1], [6, 7])
        return
    assert tt.steps.captured == []
    got, want = tt.decode([0, 1], [6, 7]), reference.decode([0, 1], [6, 7])
    assert min(pcc(g, w) for g, w in zip(got, want)) >= 0.999
    assert tt.steps.captured == ["forward"]


@pytest.mark.parametrize("bug", [None, layout_of_b79e45c])
def test_per_op_check_names_the_first_wrong_op(model_factory, bug):
    """`verify --per-op` on the stand-in as the device: every op agrees with the stand-in's meaning of it, fed
    the same inputs; with b79e45c's layout the first op that disagrees is decode's RoPE (cos/sin read on
    other users' cores)."""
    from tools.tt_host.per_op import compare_per_op, describe, stand_in_twin

    folder = model_factory("packed", **CONFIGS["gqa4-head32"])
    candidate, _ = backends(folder, replace(EXACT, use_trace=False), users=32, exact=True, patch=bug)
    report = compare_per_op(candidate, stand_in_twin(candidate, load_weights(folder, progress=False)), prompt(40, 5))
    lines = describe(report)
    assert len(report.ops) > 20 * candidate.config.num_layers
    if bug is None:
        assert report.first_wrong is None and lines[0].startswith("all ops agree"), lines
    else:
        assert report.first_wrong.name == "experimental.rotary_embedding_hf", lines
        assert "first op below PCC" in lines[0] and "shards on" in lines[1]


def test_verify_report_and_benchmark_facts(folder):
    from bitnet_tt.verify import verify

    tt, reference = backends(folder, EXACT, exact=True)
    tt.max_context = reference.max_context = 400  # keep the fixed prompts short for the test
    report = verify(tt, reference, greedy_tokens=24)
    assert report["passed"] and report["min_pcc"] >= 0.999 and report["top1_agreement"] == 1.0
    assert report["greedy_match"] == report["greedy_steps"] == 24
    facts = tt.describe()
    assert int(facts["ttnn calls per decode step"].split()[0]) > 10 * tt.config.num_layers
    assert facts["decode"] == "trace replay"
    assert "PREDICTED" in facts["predicted decode speed, BitNet 2B-4T"]


def test_engine_on_the_ttnn_backend_picks_greedy_tokens_on_device(folder):
    from bitnet_tt.engine import Engine
    from bitnet_tt.sampling import SamplingParams
    from bitnet_tt.tokenizer import Tokenizer

    tt, reference = backends(folder, EXACT, users=4, exact=True)
    picked = []
    original = tt.decode_greedy
    tt.decode_greedy = lambda slots, tokens: picked.append(len(slots)) or original(slots, tokens)
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    prompts = [prompt(n, n) for n in (3, 40, 17, 90, 5)]  # more requests than slots
    outputs = []
    for backend in (tt, reference):
        engine = Engine(backend, Tokenizer(folder, backend.config))
        outputs.append([r.output_ids for r in engine.generate(prompts, params)])
    assert outputs[0] == outputs[1]
    assert picked and max(picked) == 4  # batched decode steps took the on-device argmax path


# --- prefill into a slot that holds context (chunked prefill, prefix reuse) ---------------------------------


def prefill_in_chunks(backend, slot: int, ids: list[int], chunk: int) -> torch.Tensor:
    for start in range(0, len(ids), chunk):
        logits = backend.prefill(slot, ids[start : start + chunk])
    return logits


def greedy_after(backend, slot: int, first: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    tokens, history = [int(first.argmax())], [first]
    for _ in range(steps):
        history.append(backend.decode([slot], [tokens[-1]])[0])
        tokens.append(int(history[-1].argmax()))
    return tokens, history


@pytest.mark.parametrize("chunk", [1, 7, 32, 45])
def test_chunked_prefill_gives_the_whole_prompt_continuation(folder, chunk):
    """Chunks of one token, of sizes that split a tile, and of whole tiles: the same greedy tokens and logits
    (PCC) as one whole-prompt prefill, on the stand-in in fp32 settings; the window lengths stay few."""
    ids = prompt(75, 3)
    whole, _ = backends(folder, EXACT, exact=True)
    chunked, _ = backends(folder, EXACT, exact=True)
    want_tokens, want = greedy_after(whole, 0, whole.prefill(0, ids), 12)
    got_tokens, got = greedy_after(chunked, 0, prefill_in_chunks(chunked, 0, ids, chunk), 12)
    assert got_tokens == want_tokens
    assert min(pcc(g, w) for g, w in zip(got, want)) >= 0.9999
    assert chunked.steps.captured == ["forward"]  # decode still replays its trace after chunked prefills
    windows = {chunked.plan.prefill_window(held, min(chunk, 75 - held))[1] for held in range(0, 75, chunk)}
    assert windows <= {32, 64, 128}


def test_chunks_between_traced_decode_steps_compile_nothing_new(model_factory):
    """Chunks of 7 tokens into one slot between decode steps of another (the engine's interleaving): once the
    windows of 32 and 64 have run, chunks at new starts compile no program (the start is a run-time input), so
    the decode trace stays live, and every step agrees with the torch backend."""
    folder = model_factory("packed", **CONFIGS["gqa4-head32"])
    tt, reference = backends(folder, EXACT, users=2, exact=True)
    ids, last = prompt(70, 2), {}
    for backend in (tt, reference):
        last[backend] = int(backend.prefill(0, prompt(5, 1)).argmax())
    programs = {}
    for held in range(0, 70, 7):
        got, want = (backend.prefill(1, ids[held : held + 7]) for backend in (tt, reference))
        assert pcc(got, want) >= 0.9999
        got, want = (backend.decode([0], [last[backend]])[0] for backend in (tt, reference))
        assert pcc(got, want) >= 0.9999
        last = {tt: int(got.argmax()), reference: int(want.argmax())}
        programs[held] = tt.tt.device().num_program_cache_entries()
    assert programs[35] == programs[63]  # windows from 32 on, starting inside tiles 1 and 2: nothing new
    assert tt.steps.captured == ["forward"]


def test_chunked_prefill_with_device_dtypes(folder, block_float):
    """bfloat4_b weights, bfloat8_b head, bf16 activations: chunked logits agree with the fp32 torch backend."""
    tt, reference = backends(folder, TTOptions(use_trace=False), block_float=block_float)
    ids = prompt(70, 4)
    assert pcc(prefill_in_chunks(tt, 0, ids, 13), reference.prefill(0, ids)) >= 0.999


def test_prefix_reuse_gives_the_logits_of_a_fresh_run(folder, block_float):
    """A slot keeps a prompt's first positions (keep_prefix, as the prefix cache does) after decoding past it,
    then takes a new ending: its logits are a fresh prefill's of the whole new prompt, within the stand-in's
    PCC bound with the device dtypes (and to fp32 rounding in fp32 settings)."""
    history, ending = prompt(90, 5), prompt(20, 6)
    for options, exact, bound in ((TTOptions(use_trace=False), False, 0.999), (EXACT, True, 0.9999)):
        reused, reference = backends(folder, options, exact=exact, block_float=block_float)
        fresh, _ = backends(folder, options, exact=exact, block_float=block_float)
        greedy_after(reused, 0, reused.prefill(0, history), 5)  # decoding writes positions 90..94
        reused.keep_prefix(0, 83)  # keep a prefix that ends inside a tile
        got = reused.prefill(0, history[83:] + ending)
        want = fresh.prefill(0, history + ending)
        assert pcc(got, want) >= bound and pcc(got, reference.prefill(0, history + ending)) >= bound


def test_engine_reuses_cached_prefixes_on_the_ttnn_backend(folder):
    """The engine's chunked prefill and prefix cache run on ttnn: a second turn reuses the first's slot, and
    every reply equals the torch backend's (fp32 settings)."""
    from bitnet_tt.engine import Engine
    from bitnet_tt.sampling import SamplingParams
    from bitnet_tt.tokenizer import Tokenizer

    tt, reference = backends(folder, EXACT, users=2, exact=True)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    first = prompt(60, 8)
    replies, cached = [], []
    for backend in (tt, reference):
        engine = Engine(backend, Tokenizer(folder, backend.config), prefill_chunk=16, idle_prefill_chunk=16)
        [one] = engine.generate([first], params)
        [two] = engine.generate([first + one.output_ids + prompt(9, 9)], params)
        replies.append((one.output_ids, two.output_ids))
        cached.append(two.cached_tokens)
    assert replies[0] == replies[1]
    assert cached[0] == cached[1] >= 60


# --- sampling on the device -------------------------------------------------------------------------------

SAMPLING_CONFIG = dict(CONFIGS["gqa4-head32"], vocab_size=320)  # ttnn samples on the device when ids fill whole tiles


@pytest.fixture(scope="module")
def tiled_vocab_folder(model_factory):
    return model_factory("packed", **SAMPLING_CONFIG)


def sampled_run(tt, reference, draws_for, steps: int, users: int = 32):
    """Decode `steps` tokens per user with decode_sampled, feeding the reference the same tokens; return
    [(reference logits row, draw, drawn token)] for every user and step."""
    slots = list(range(users))
    last = []
    for s in slots:
        ids = prompt(1 + 7 * s, 100 + s)
        tt.prefill(s, ids)
        last.append(int(reference.prefill(s, ids).argmax()))
    seeds = torch.Generator().manual_seed(5)
    records = []
    for _ in range(steps):
        draws = [draws_for(s, int(torch.randint(0, 2**31 - 1, (1,), generator=seeds))) for s in slots]
        want = reference.decode(slots, last)
        last = tt.decode_sampled(slots, last, draws)
        records += list(zip(want, draws, last))
    return records


def rank_counts(records) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed and expected counts of each candidate rank (0 = most likely) under the reference's
    softmax(top-k logits / temperature), cut to top-p as sample_token cuts it."""
    from bitnet_tt.sampling import SamplingParams, filter_logits

    k = records[0][1].top_k
    observed, expected = torch.zeros(k), torch.zeros(k)
    for logits, draw, token in records:
        params = SamplingParams(temperature=draw.temperature, top_k=draw.top_k, top_p=draw.top_p)
        probs = torch.from_numpy(filter_logits(logits.double().numpy(), params)).softmax(-1)
        order = logits.argsort(descending=True)[:k]
        expected += probs[order]
        rank = (order == token).nonzero()
        assert len(rank) == 1, "drew a token outside the top-k"
        observed[int(rank)] += 1
    return observed, expected


def chi_square(observed, expected) -> float:
    return float(((observed - expected) ** 2 / expected.clamp_min(1e-9)).sum())


def temperature_not_inverted(tt):
    """A plausible bug: passing T where ttnn.sampling multiplies the logits by 1/T."""
    original = tt._draw_inputs
    tt._draw_inputs = lambda slots, draws: original(slots, [replace(d, temperature=1 / d.temperature) for d in draws])


@pytest.mark.parametrize("bug", [None, temperature_not_inverted])
def test_device_sampling_draws_from_the_reference_distribution(tiled_vocab_folder, bug):
    from bitnet_tt.sampling import DeviceDraw

    tt, reference = backends(tiled_vocab_folder, EXACT, users=32, exact=True, patch=bug)
    assert tt.device_top_k_limit == 32
    records = sampled_run(tt, reference, lambda slot, seed: DeviceDraw(4, 1.0, 15.0, seed), steps=30)
    observed, expected = rank_counts(records)
    # 960 draws over 4 ranks (a high temperature spreads a tiny random model's peaked logits);
    # the 99.9% point of chi-square with 3 degrees of freedom is 16.3
    assert (chi_square(observed, expected) < 16.3) == (bug is None), (observed.tolist(), expected.tolist())
    assert tt.steps.captured == ["forward", "sampled"]


def ids_relative_to_their_chunk(tt):
    """A plausible bug: a later vocabulary chunk's ids not moved by the chunk's first column."""
    original = tt.model._top_candidates

    def relative(logits, start, end):
        values, ids = original(logits, start, end)
        return values, tt.tt.add(ids, -start) if start else ids

    tt.model._top_candidates = relative


@pytest.mark.parametrize("bug", [None, ids_relative_to_their_chunk])
def test_device_sampling_ranks_the_vocabulary_in_chunks(model_factory, bug):
    """70,016 ids: topk ranks two chunks of 35,008 columns apart (16-bit ids, as tt_transformers splits
    the vocabulary), and sampling draws from their 64 merged candidates: each draw is one of the
    reference's two most likely ids (top_k 2; top_k 1 would take the argmax path)."""
    from bitnet_tt.sampling import DeviceDraw

    # an untied random head: the argmax is anywhere in the vocabulary, not near the prompt's ids
    folder = model_factory("packed", **dict(CONFIGS["gqa4-head32"], vocab_size=70016, tie_word_embeddings=False))
    tt, reference = backends(folder, EXACT, users=8, exact=True, patch=bug)
    assert tt.plan.topk_chunks() == [(0, 35008), (35008, 70016)]
    records = sampled_run(tt, reference, lambda slot, seed: DeviceDraw(2, 1.0, 1.0, seed), steps=3, users=8)
    assert all(token in logits.topk(2).indices for logits, _, token in records) == (bug is None)


def test_device_sampling_rows_follow_their_own_settings(tiled_vocab_folder):
    """Greedy rows (top_k 1) give the argmax, top_p cuts the candidates, and each row's seed alone
    decides its draws: the same seeds give the same tokens."""
    from bitnet_tt.sampling import DeviceDraw

    def draws_for(slot, seed):
        if slot % 3 == 0:
            return DeviceDraw(1, 1.0, 1.0, 0)
        return DeviceDraw(32, 0.5, 1.3, seed) if slot % 3 == 1 else DeviceDraw(8, 1.0, 1.0, seed)

    runs = []
    for _ in range(2):
        tt, reference = backends(tiled_vocab_folder, EXACT, users=12, exact=True)
        runs.append(sampled_run(tt, reference, draws_for, steps=6, users=12))
    assert [token for _, _, token in runs[0]] == [token for _, _, token in runs[1]]
    from bitnet_tt.sampling import SamplingParams, filter_logits

    for logits, draw, token in runs[0]:
        if draw.top_k == 1:
            assert token == int(logits.argmax())
        else:  # the drawn token survives the reference's top-k/top-p cut
            params = SamplingParams(temperature=draw.temperature, top_k=draw.top_k, top_p=draw.top_p)
            assert np.isfinite(filter_logits(logits.double().numpy(), params)[token])


def test_engine_samples_on_the_device_when_the_request_allows_it(tiled_vocab_folder):
    from bitnet_tt.engine import Engine
    from bitnet_tt.sampling import SamplingParams
    from bitnet_tt.tokenizer import Tokenizer

    tt, _ = backends(tiled_vocab_folder, EXACT, users=4, exact=True)
    calls = {"decode_sampled": 0, "decode": 0}
    for name in calls:
        original = getattr(tt, name)
        setattr(tt, name, lambda *args, _original=original, _name=name: calls.__setitem__(_name, calls[_name] + 1) or _original(*args))
    engine = Engine(tt, Tokenizer(tiled_vocab_folder, tt.config))
    prompts = [prompt(n, n) for n in (3, 40, 17)]

    def run(**params):
        return [r.output_ids for r in engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True, **params))]

    seeded = dict(temperature=0.8, top_k=20, seed=11)
    first = run(**seeded)
    assert calls == {"decode_sampled": 5, "decode": 0}
    assert run(**seeded) == first  # seeded requests repeat on the device sampler
    run(temperature=0.8, top_k=20, repetition_penalty=1.2)  # penalties need the logits on the host
    run(temperature=0.8)  # top_k off: the whole vocabulary, more than the device's 32 candidates
    assert calls == {"decode_sampled": 10, "decode": 10}


def test_traced_pieces_replay_in_any_order(tiled_vocab_folder):
    """Greedy, sampled and logits steps in a mixed order: each traced piece replays on the forward
    trace's logits and gives what the same backend gives op by op."""
    from bitnet_tt.sampling import DeviceDraw

    runs = []
    for use_trace in (True, False):
        tt, _ = backends(tiled_vocab_folder, replace(EXACT, use_trace=use_trace), users=3, exact=True)
        slots, tokens, seen = [0, 2], [5, 6], []
        for s, n in zip(slots, (4, 30)):
            tt.prefill(s, prompt(n, n))
        for step, mode in enumerate("gsslgsgl"):
            if mode == "g":
                tokens = tt.decode_greedy(slots, tokens)
            elif mode == "s":
                tokens = tt.decode_sampled(slots, tokens, [DeviceDraw(8, 0.9, 2.0, 100 * step + s) for s in slots])
            else:
                logits = tt.decode(slots, tokens)
                seen.append(logits)
                tokens = logits.argmax(-1).tolist()
            seen.append(tokens)
        runs.append((seen, tt.steps.captured))
    (traced, captured), (op_by_op, _) = runs
    assert sorted(captured) == ["forward", "greedy", "sampled"]
    for a, b in zip(traced, op_by_op):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_device_sampling_refuses_bad_requests_before_touching_the_device(tiled_vocab_folder):
    from bitnet_tt.errors import CapacityError
    from bitnet_tt.sampling import DeviceDraw

    tt, _ = backends(tiled_vocab_folder, EXACT, users=2, exact=True)
    tt.prefill(0, [1, 2, 3])
    with pytest.raises(ValueError, match="top_k in 1..32"):
        tt.decode_sampled([0], [4], [DeviceDraw(33, 1.0, 1.0, 0)])
    with pytest.raises(CapacityError, match="slot 5 does not exist"):
        tt.decode_sampled([5], [4], [DeviceDraw(3, 1.0, 1.0, 0)])
    assert tt.slot_length(0) == 3 and not tt.steps.calls  # nothing ran


def test_vocabulary_with_a_partial_tile_samples_on_the_host(folder):
    tt, _ = backends(folder, EXACT, exact=True)
    assert tt.device_top_k_limit == 0 and "host" in tt.describe()["sampling"]


def test_a_failing_step_is_not_counted_and_leaves_no_capture_open():
    import types

    from bitnet_tt.backends.ttnn.trace import TracedSteps

    host = HostTT(exact=True)
    x = host.from_torch(torch.ones(1, 1, 32, 32), device=host.device(), layout=host.TILE_LAYOUT)
    runs = iter([RuntimeError("first run"), None, RuntimeError("during capture"), None, None])
    model = types.SimpleNamespace(tt=host)  # a piece makes its ttnn calls through model.tt

    def step():
        failure = next(runs)
        if failure:
            raise failure
        return model.tt.add(x, 1.0)

    steps = TracedSteps(host, host.device(), model, use_trace=True)
    with pytest.raises(RuntimeError, match="first run"):
        steps.run("piece", step)
    assert "piece" not in steps.calls  # the next run is the counted warm-up again
    steps.run("piece", step)
    assert steps.calls == {"piece": 1}
    with pytest.raises(RuntimeError, match="during capture"):
        steps.run("piece", step)
    assert not host.is_trace_capture_active(host.device()) and steps.captured == []
    assert torch.equal(host.to_torch(steps.run("piece", step)), torch.full((1, 1, 32, 32), 2.0))
    assert steps.captured == ["piece"]
