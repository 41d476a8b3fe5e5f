"""Run the ttnn backend's whole prefill and decode on a MOCK device and report what tt-metal saw.

Every op passes tt-metal's own argument, shape and shard validation, and the real allocator places
weights, KV cache and activations (so an out-of-memory shows up here); nothing is computed.

    python -m tools.tt_mock.contract --board p150 --shapes 2b4t --users 32 --context 4096 --prompts 1,33,1000,4096 --append 1,40

Prints one JSON object: device ops per decode step (greedy, and sampled where the vocabulary allows it)
by name, peak L1 per core for each kind of call, DRAM in use.
The mock environment is set up by this script before ttnn is imported.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

from .harness import mock_env

SHAPES = ("tiny", "2b4t")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--board", default="p150", choices=["p150", "p150-12x10", "p150-11x10", "n150"])
    parser.add_argument("--shapes", default="tiny", choices=SHAPES)
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--prompts", default="1,33", help="prompt lengths, each prefilled into its own slot")
    parser.add_argument("--append", default="", help="chunk lengths prefilled one after the other into the first "
                        "prompt's slot, after its prompt (chunked prefill over a held context)")
    parser.add_argument("--act-quant", action="store_true", help="quantise activations on the device (off by default)")
    parser.add_argument("--vocab", type=int, default=320, help="vocabulary of the tiny shapes (2b4t has its own)")
    args = parser.parse_args(argv)
    os.environ.update(mock_env(args.board))
    print(json.dumps(run(args)))
    return 0


def model_config(shapes: str, vocab: int):
    from bitnet_tt.config import ModelConfig
    from bitnet_tt.synthetic import config_2b4t, hf_config

    raw = config_2b4t() if shapes == "2b4t" else hf_config(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=4096)
    return ModelConfig.from_hf_dict(raw)


def run(args) -> dict:
    import ttnn

    from bitnet_tt.backends.ttnn.backend import TTNNBackend
    from bitnet_tt.backends.ttnn.config import TTOptions
    from bitnet_tt.backends.ttnn.device import close_tt_device, open_tt_device
    from bitnet_tt.sampling import DeviceDraw

    config = model_config(args.shapes, args.vocab)
    device = open_tt_device(ttnn, allow_mock=True)
    started = time.perf_counter()
    options = TTOptions(use_trace=False, activation_quant=args.act_quant)  # trace capture crashes on mock devices
    backend = TTNNBackend(config, None, ttnn, device, args.users, args.context, options)
    report = {"board": args.board, "shapes": args.shapes, "users": args.users, "context": args.context}
    prompts = [int(n) for n in args.prompts.split(",")]
    for index, length in enumerate(prompts):
        slot = index % args.users
        backend.free(slot)
        logits = backend.prefill(slot, list(range(1, length + 1)))
        assert tuple(logits.shape) == (config.vocab_size,)
    for length in (int(n) for n in args.append.split(",") if n):
        report.update(prefill_report(ttnn, lambda: backend.prefill(0, list(range(1, length + 1))), length))
    slots = list(range(args.users))
    for slot in slots:  # every slot needs room for two more tokens
        if not 0 < backend.slot_length(slot) < args.context - 1:
            backend.free(slot)
            backend.prefill(slot, [1])
    logits = backend.decode(slots, [2] * len(slots))
    assert tuple(logits.shape) == (len(slots), config.vocab_size)
    report.update(decode_report(ttnn, lambda: backend.decode_greedy(slots, [3] * len(slots)), "decode"))
    report["device_sampling_top_k"] = backend.device_top_k_limit
    if backend.device_top_k_limit:
        draws = [DeviceDraw(top_k=1 + slot % 32, top_p=0.9, temperature=0.7, seed=slot) for slot in slots]
        report.update(decode_report(ttnn, lambda: backend.decode_sampled(slots, [4] * len(slots), draws), "sampled_decode"))
    report["decode_l1_per_op"] = per_op_l1(ttnn, backend, slots)
    dram = ttnn.get_memory_view(device, ttnn.BufferType.DRAM)
    report["dram_allocated_bytes"] = dram.total_bytes_allocated_per_bank * dram.num_banks
    report["dram_total_bytes"] = dram.total_bytes_per_bank * dram.num_banks
    report["plan_weight_bytes"] = backend.plan.weight_bytes()
    report["topk_chunks"] = len(backend.plan.topk_chunks())
    report["plan_kv_cache_bytes"] = backend.plan.kv_cache_bytes()
    report["seconds"] = round(time.perf_counter() - started, 2)
    close_tt_device(ttnn, device)
    return report


def decode_report(ttnn, step, key: str) -> dict:
    """Device operations launched by one decode step, by name."""
    ttnn.graph.begin_graph_capture(ttnn.graph.RunMode.NORMAL)
    tokens = step()
    graph = ttnn.graph.end_graph_capture()
    assert all(isinstance(t, int) for t in tokens)
    device_ops = [node["params"]["name"] for node in graph
                  if node.get("node_type") == "function_start" and "DeviceOperation" in node.get("params", {}).get("name", "")]
    return {
        f"{key}_device_ops": len(device_ops),
        f"{key}_ops_by_name": dict(collections.Counter(name.split("::")[-1] for name in device_ops).most_common()),
    }


def prefill_report(ttnn, prefill, length: int) -> dict:
    """Device operations of one prefill appended to a held context, by name."""
    ttnn.graph.begin_graph_capture(ttnn.graph.RunMode.NORMAL)
    prefill()
    graph = ttnn.graph.end_graph_capture()
    names = [node["params"]["name"].split("::")[-1] for node in graph
             if node.get("node_type") == "function_start" and "Operation" in node.get("params", {}).get("name", "")]
    return {f"append_{length}_ops_by_name": dict(collections.Counter(names).most_common())}


def per_op_l1(ttnn, backend, slots) -> dict:
    """Run one more decode step with every ttnn call captured on its own: the largest per-core L1 +
    circular-buffer use each kind of call reached, against the L1 bank size."""
    from bitnet_tt.backends.ttnn.trace import TTCallHook
    from bitnet_tt.sampling import DeviceDraw

    records: dict[str, int] = {}

    def capture(name, call):
        ttnn.graph.begin_graph_capture(ttnn.graph.RunMode.NORMAL)
        try:
            return call()
        finally:
            usage = ttnn.graph.extract_resource_usage_per_core(ttnn.graph.end_graph_capture())
            records[name] = max(records.get(name, 0), usage.peak_total)

    backend.tt = backend.model.tt = TTCallHook(ttnn, capture)
    try:
        backend.decode_greedy(slots, [5] * len(slots))
        if backend.device_top_k_limit:
            backend.decode_sampled(slots, [6] * len(slots), [DeviceDraw(8, 1.0, 1.0, slot) for slot in slots])
    finally:
        backend.tt = backend.model.tt = ttnn
    l1_bank = ttnn.get_memory_view(backend.device, ttnn.BufferType.L1).total_bytes_per_bank
    return {"l1_bank_bytes": l1_bank, "peak_bytes_per_core": dict(sorted(records.items(), key=lambda kv: -kv[1]))}


if __name__ == "__main__":
    sys.exit(main())
