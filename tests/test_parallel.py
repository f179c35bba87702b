"""Ulysses sequence parallelism on the CPU: N gloo processes, each with 1/N of the sequence, give the
single-process logits and gradients for every method tried."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

import longreach
from longreach.parallel import SequenceParallel, check_heads, sequence_parallel, shard

LENGTH = 128
SETUPS = [
    ("dense", {}),
    ("select_merge", {"block_size": 16, "top_k": 2}),
    ("dca", {"block_size": 16, "chunk_size": 48}),
    ("self_extend", {"block_size": 16, "group_size": 4, "window": 16}),
]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def loss_and_grads(model, ids, weights, positions=None):
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    loss = (logits * weights).sum()
    return logits.detach(), torch.autograd.grad(loss, list(model.parameters()))


def worker(rank: int, size: int, port: int, failures) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(1)
    try:
        model, sp = tiny_llama(), sequence_parallel(size)
        ids = torch.randint(0, 64, (2, LENGTH), generator=torch.Generator().manual_seed(1))
        weights = torch.randn(2, LENGTH, 64, generator=torch.Generator().manual_seed(2))
        positions = torch.arange(LENGTH).expand(2, -1)
        for name, options in SETUPS:
            longreach.extend(model, attention=name, **options)
            logits, grads = loss_and_grads(model, ids, weights)
            longreach.extend(model, attention=name, sequence_parallel=sp, **options)
            part, part_grads = loss_and_grads(model, shard(ids, sp), shard(weights, sp), shard(positions, sp))
            label = lambda m, name=name: f"{name}: {m}"  # noqa: E731
            torch.testing.assert_close(part, shard(logits, sp), atol=1e-5, rtol=1e-5, msg=label)
            for g, expected in zip(part_grads, grads, strict=True):
                dist.all_reduce(g)  # each rank's loss is its shard's share: the gradients add up
                torch.testing.assert_close(g, expected, atol=1e-4, rtol=1e-4, msg=label)
    except Exception as error:  # reported to the test, which runs in the parent
        failures.put(f"rank {rank}: {error}")
        raise
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("size", [2, 4])
def test_sequence_parallel_equals_one_process(size):
    failures = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(worker, args=(size, free_port(), failures), nprocs=size)
    except mp.ProcessRaisedException:
        pass
    assert failures.empty(), failures.get()  # the first failing rank's message


def test_sequence_parallel_errors():
    sp = SequenceParallel(size=4, rank=0)
    with pytest.raises(ValueError, match="kv heads"):
        check_heads(8, 2, sp)
    with pytest.raises(ValueError, match="multiple of 4"):
        shard(torch.zeros(1, 10), sp)
    with pytest.raises(ValueError, match="not initialised"):
        sequence_parallel(2)
    with pytest.raises(ValueError, match="shifts half of the heads"):
        longreach.extend(tiny_llama(), attention="s2", sequence_parallel=SequenceParallel(size=2, rank=0))
    with pytest.raises(ValueError, match="multiples of 16"):  # 8 heads, 4 kv heads
        longreach.extend(tiny_llama(), attention="dense", sequence_parallel=SequenceParallel(size=16, rank=0))
