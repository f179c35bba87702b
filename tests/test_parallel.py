"""Ulysses sequence parallelism on the CPU: N gloo processes, each with 1/N of the sequence, give the
single-process logits and gradients, and the LoRA fine-tuning loss, gradients and step, for every
method tried."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

import longreach
from longreach.parallel import SequenceParallel, check_heads, sequence_parallel, shard
from longreach.train import FinetuneConfig, finetune, prepare
from longreach.train.loop import sequence_loss

LENGTH = 128
DECODED = ("dense", "select_merge", "dca")
SHARDED = ("dense", "select_merge")
SETUPS = [
    ("dense", {}),
    ("select_merge", {"block_size": 16, "top_k": 2}),
    ("dca", {"block_size": 16, "chunk_size": 48}),
    ("self_extend", {"block_size": 16, "group_size": 4, "window": 16}),
    ("s2", {"block_size": 16, "group_size": 32}),  # shifts the second half of all heads: each rank a slice
    ("sf", {"block_size": 16, "group_size": 32, "sink": 4}),
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


def worker(rank: int, size: int, port: int, folder: str, failures) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(1)
    try:
        model, sp = tiny_llama(), sequence_parallel(size)
        with pytest.raises(ValueError, match=f"size {2 * size} must equal the group's {size} ranks"):
            sequence_parallel(2 * size)  # more ranks than the processes started
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
            training_matches(name, options, sp, label)
            if name in SHARDED:
                sharded_training_matches(name, options, sp, label, f"{folder}/{name}")
            if name in DECODED:
                longreach.extend(model, attention=name, **options)
                prefill_and_decode_match(model, name, options, sp, ids, label)
        # Every rank's collectives done before teardown: gloo work still held at exit aborts the process.
        dist.barrier()
    except Exception as error:  # reported to the test, which runs in the parent
        failures.put(f"rank {rank}: {error}")
        raise
    finally:
        dist.destroy_process_group()
    # Every check passed. Skip the interpreter's teardown: in 1 of some 14 runs here a rank then died of SIGABRT
    # ("terminate called without an active exception", a C++ thread still joinable at exit), after its work.
    os._exit(0)


def prefill_and_decode_match(model, name, options, sp, ids, label) -> None:
    """A caching prefill over the ranks: each rank's logits and a cache of its kv heads over the whole
    prompt; then decoding, the same tokens on every rank, as one process decodes."""
    from longreach.cache.sharded import HeadShardCache, generate

    with torch.no_grad():
        single = out = model(input_ids=ids, use_cache=True)
        new = []
        for _ in range(3):
            new.append(out.logits[:, -1:].argmax(-1))
            out = model(input_ids=new[-1], past_key_values=single.past_key_values, use_cache=True)
        longreach.extend(model, attention=name, sequence_parallel=sp, **options)
        positions = torch.arange(LENGTH).expand(2, -1)
        part = model(input_ids=shard(ids, sp), position_ids=shard(positions, sp), use_cache=True)
    torch.testing.assert_close(part.logits, shard(single.logits, sp), atol=1e-5, rtol=1e-5, msg=label)
    assert isinstance(part.past_key_values, HeadShardCache)
    kv_heads = model.config.num_key_value_heads // sp.size
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert part.past_key_values.layers[0].keys.shape == (2, kv_heads, LENGTH, head_dim)
    assert torch.equal(generate(model, ids, sp, 3), torch.cat(new, 1)), label("greedy tokens")


def sharded_training_matches(name, options, sp, label, folder) -> None:
    """Weights and optimizer state split over the ranks (FSDP2): three steps, the last resumed from the
    gathered checkpoint of two, log the one-process losses (each step's loss depends on the updates before)."""
    rows = torch.randint(0, 64, (2, LENGTH + 1), generator=torch.Generator().manual_seed(4))

    def losses(sp, steps, out=None):
        config = FinetuneConfig(length=LENGTH, steps=steps, attention=name, attention_options=options, position=None,
                                checkpointing=False, loss_chunk=48, learning_rate=1e-2, warmup=0,
                                sequence_parallel=sp, shard_weights=sp is not None)
        return [h["loss"] for h in finetune(prepare(tiny_llama(), config), rows, config, out=out, progress=False)]

    expected = losses(None, 3)
    assert losses(sp, 2, folder) == pytest.approx(expected[:2], abs=1e-5), label("sharded steps")
    assert losses(sp, 3, folder) == pytest.approx(expected, abs=1e-5), label("resumed sharded step")


def lora_step(name, options, sp, rows):
    """The LoRA model's loss and trainable gradients for ``rows``, and one finetune step's loss."""
    config = FinetuneConfig(length=LENGTH, steps=1, attention=name, attention_options=options, position=None,
                            checkpointing=False, loss_chunk=48, sequence_parallel=sp)
    model = prepare(tiny_llama(), config)
    loss = sequence_loss(model.get_base_model(), rows, None, config.loss_chunk, sp=sp)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    history = finetune(model, rows, config, progress=False)
    return loss.detach(), grads, history[0]["loss"]


def training_matches(name, options, sp, label) -> None:
    rows = torch.randint(0, 64, (2, LENGTH + 1), generator=torch.Generator().manual_seed(3))
    loss, grads, step_loss = lora_step(name, options, None, rows)
    part, part_grads, part_step_loss = lora_step(name, options, sp, rows)
    dist.all_reduce(part)
    torch.testing.assert_close(part, loss, atol=1e-5, rtol=1e-5, msg=label)
    assert abs(part_step_loss - step_loss) < 1e-5, (name, part_step_loss, step_loss)
    assert any(g.abs().max() > 0 for g in grads.values())
    for key, g in part_grads.items():
        dist.all_reduce(g)
        torch.testing.assert_close(g, grads[key], atol=1e-4, rtol=1e-4, msg=label)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("size", [2, 4])
def test_sequence_parallel_equals_one_process(size, tmp_path):
    failures = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(worker, args=(size, free_port(), str(tmp_path), failures), nprocs=size)
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
    with pytest.raises(ValueError, match="multiples of 16"):  # 8 heads, 4 kv heads
        longreach.extend(tiny_llama(), attention="dense", sequence_parallel=SequenceParallel(size=16, rank=0))
    two = SequenceParallel(size=2, rank=0)
    with pytest.raises(ValueError, match="set carry=0 \\(got 2\\) with sequence_parallel"):
        longreach.extend(tiny_llama(), attention="select_merge", carry=2, sequence_parallel=two)


def test_sequence_parallel_finetune_needs_torchrun(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from longreach.cli import main

    monkeypatch.delenv("RANK", raising=False)
    data = tmp_path / "text.txt"
    data.write_text("words " * 100)
    result = CliRunner().invoke(main, ["finetune", "--data", str(data), "--length", "64", "--steps", "1",
                                       "--sequence-parallel", "2", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "torchrun --nproc-per-node 2" in result.output
