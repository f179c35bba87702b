"""Evaluations scored on fake models whose answers are known, input checks, the CLI and the shipped model."""

from __future__ import annotations

import json
import math
import random
import re
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from longreach.cli import main, parse_lengths, parse_options, resolve_dtype
from longreach.evals import prompts, report, setups
from longreach.evals.efficiency import efficiency
from longreach.evals.needle import needle
from longreach.evals.passkey import passkey
from longreach.evals.perplexity import perplexity
from longreach.hf import CACHE_ARG, CACHE_FIELD
from longreach.loss import token_losses
from longreach.models import tiny_model
from longreach.pretrained import load_pretrained
from longreach.reference_model import TRAIN_LENGTH, heldout_texts, load_reference_model, training_record

KEY = re.compile(r"(?:pass key is|magic number of \w+ is) (\d+)")


@pytest.fixture(scope="module")
def reference():
    return load_reference_model()


class Oracle(nn.Module):
    """Answers retrieval prompts by reading the key from the prompt text: right, wrong, or right only
    when the prompt is shorter than ``below`` tokens."""

    def __init__(self, tokenizer, mode: str, below: int = 0):
        super().__init__()
        self.tokenizer, self.mode, self.below = tokenizer, mode, below
        self.config = SimpleNamespace(vocab_size=len(tokenizer))
        self.dummy = nn.Parameter(torch.zeros(1))

    def _answer(self, ids: list[int]) -> list[int]:
        key = KEY.search(self.tokenizer.decode(ids)).group(1)
        right = self.mode == "right" or (self.mode == "below" and len(ids) < self.below)
        said = key if right else str((int(key) + 1) % 10 ** len(key)).zfill(len(key))
        return prompts.encode(self.tokenizer, f" {said}.")

    def forward(self, input_ids, use_cache=True, logits_to_keep=0, **kwargs):
        queues = kwargs.get(CACHE_ARG) or [self._answer(row) for row in input_ids.tolist()]
        logits = torch.zeros(len(queues), 1, self.config.vocab_size)
        for i, queue in enumerate(queues):
            logits[i, 0, queue.pop(0) if queue else 0] = 1.0
        return SimpleNamespace(logits=logits, **{CACHE_FIELD: queues})


@pytest.mark.parametrize("evaluate", ["passkey", "needle"])
@pytest.mark.parametrize(("mode", "expected"), [("right", [1, 1, 1]), ("wrong", [0, 0, 0]), ("below", [1, 1, 0])])
def test_retrieval_accuracy_matches_known_answers(reference, evaluate, mode, expected):
    _, tokenizer = reference
    oracle = Oracle(tokenizer, mode, below=600)
    run = passkey if evaluate == "passkey" else lambda *a, **k: needle(*a, texts=heldout_texts()[:2], **k)
    records = run(oracle, tokenizer, [200, 512, 1024], [0.0, 0.5, 1.0], trials=4, batch_size=3)
    by_length = {n: [r["accuracy"] for r in records if r["length"] == n] for n in (200, 512, 1024)}
    assert [set(v) for v in by_length.values()] == [{e} for e in expected]
    assert all(r["trials"] == 4 and r["correct"] == 4 * r["accuracy"] for r in records)


def test_prompts_have_the_requested_length_and_the_key_at_depth(reference):
    _, tokenizer = reference
    import random

    for depth in (0.0, 0.3, 1.0):
        prompt = prompts.passkey(tokenizer, 777, depth, random.Random(1))
        assert len(prompt.ids) == 777
        text = tokenizer.decode(prompt.ids)
        assert prompt.key in text and prompt.answer == prompts.encode(tokenizer, f" {prompt.key}")
        at = text.index("The pass key is") / len(text)
        assert abs(at - depth) < 0.1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lengths": [40]}, "below the prompt's size"),
    ({"depths": [1.5]}, r"depth must be in \[0, 1\]"),
    ({"depths": [-0.1]}, r"depth must be in \[0, 1\]"),
    ({"trials": 0}, "trials must be >= 1"),
    ({"lengths": [0]}, "lengths must be positive"),
])
def test_retrieval_rejects_bad_input(reference, kwargs, message):
    _, tokenizer = reference
    args = {"lengths": [256], "depths": [0.5], "trials": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        passkey(Oracle(tokenizer, "right"), tokenizer, args.pop("lengths"), args.pop("depths"), **args)


def test_tokenizer_of_another_model_is_rejected(reference):
    _, tokenizer = reference
    with pytest.raises(ValueError, match="does not belong to this model"):
        passkey(tiny_model("llama", vocab_size=64), tokenizer, [256], [0.5], trials=1)


def test_missing_model_path_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")


class CountingTokenizer:
    """Text '0 1 2 ...' -> those ids."""

    bos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [int(x) for x in text.split()]


class NextTokenModel(nn.Module):
    """On a counting sequence, puts logit ``a`` on the true next token (x + 1) mod V; on inputs of
    ``wrong_from`` tokens or more, on (x + 2) mod V instead."""

    def __init__(self, vocab: int, a: float, wrong_from: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab)
        self.a, self.wrong_from = a, wrong_from
        self.head = nn.Identity()
        self.dummy = nn.Parameter(torch.zeros(1))

    def get_output_embeddings(self):
        return self.head

    def get_decoder(self):
        def decoder(input_ids):
            step = 1 if input_ids.shape[1] < self.wrong_from else 2
            hidden = nn.functional.one_hot((input_ids + step) % self.config.vocab_size, self.config.vocab_size)
            return SimpleNamespace(last_hidden_state=hidden.float() * self.a)
        return decoder


def test_perplexity_matches_known_predictions():
    vocab, a = 50, 3.0
    text = " ".join(str(i % vocab) for i in range(3000))
    records = perplexity(NextTokenModel(vocab, a, wrong_from=200), CountingTokenizer(), [64, 128, 256],
                         texts=[text], window=32, samples=3)
    right = math.log(1 + (vocab - 1) * math.exp(-a))
    wrong = math.log(math.exp(a) + vocab - 1)
    assert [r["loss"] for r in records] == pytest.approx([right, right, wrong], rel=1e-5)
    assert records[0]["perplexity"] == pytest.approx(math.exp(right))
    assert records[2]["samples"] == 3 and len(records[2]["position_loss"]) == 64


def test_perplexity_one_length_at_a_time_scores_the_targets_of_all_lengths_at_once():
    rng, ids = random.Random(0), []  # counting runs of random lengths: the model misses each run's first token
    while len(ids) < 3000:
        start = rng.randrange(50)
        ids += [(start + j) % 50 for j in range(rng.randrange(1, 40))]
    text = " ".join(map(str, ids))
    model, tokenizer = NextTokenModel(50, 3.0, wrong_from=10**9), CountingTokenizer()
    together = perplexity(model, tokenizer, [64, 128, 256], texts=[text], window=32, samples=3)
    alone = [perplexity(model, tokenizer, [n], texts=[text], window=32, samples=3, segment_length=256)[0]
             for n in (64, 128, 256)]
    assert [r["loss"] for r in alone] == [r["loss"] for r in together]
    assert perplexity(model, tokenizer, [64], texts=[text], window=32, samples=3)[0]["loss"] != together[0]["loss"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"window": 64}, "window must be in"), ({"lengths": [5000]}, "fewer than one segment of 5001"),
    ({"segment_length": 100}, "segment_length must be at least the longest length 128, got 100"),
])
def test_perplexity_rejects_bad_input(kwargs, message):
    args = {"lengths": [64, 128], "window": 16} | kwargs
    with pytest.raises(ValueError, match=message):
        perplexity(NextTokenModel(50, 1.0, 10**9), CountingTokenizer(), args.pop("lengths"),
                   texts=[" ".join(str(i % 50) for i in range(1000))], **args)


def test_chunked_loss_equals_full_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    head = nn.Linear(16, 11)
    targets = torch.randint(0, 11, (2, 37))
    full = nn.functional.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), reduction="none").view(2, 37)
    chunked = token_losses(hidden, head, targets, chunk=8)
    torch.testing.assert_close(chunked, full)
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    (g_chunked,) = torch.autograd.grad(token_losses(hidden, head, targets, chunk=8).sum(), hidden)
    torch.testing.assert_close(g_chunked, g_full)


def test_efficiency_measures_time_and_memory():
    records = efficiency(tiny_model("llama"), [64, 128], repeats=2)
    assert [(r["length"], r["mode"]) for r in records] == [
        (64, "forward"), (64, "forward+backward"), (128, "forward"), (128, "forward+backward")]
    assert all(r["seconds"] > 0 and r["peak_mib"] is not None for r in records)
    with pytest.raises(ValueError, match="lengths must be positive"):
        efficiency(tiny_model("llama"), [0])


def test_efficiency_plot_leaves_out_memory_that_reads_zero_or_below(tmp_path):
    records = [{"setup": "baseline", "mode": "forward", "length": n, "seconds": 0.1 * n, "tokens_per_second": 10.0,
                "peak_mib": peak} for n, peak in ((64, 0.0), (128, 0.0))]
    report.plot("efficiency", records, tmp_path / "efficiency.png")
    assert (tmp_path / "efficiency.png").stat().st_size > 0


def test_setups_parse_and_factor():
    assert setups.parse("baseline") == {}
    assert setups.parse("dca+yarn") == {"attention": "dca", "position": "yarn"}
    with pytest.raises(ValueError, match="'nope' is not an attention method"):
        setups.parse("nope")
    model = tiny_model("llama", max_position=256)
    assert setups.factor_for(model, [256, 1000]) == 4.0


def test_parse_options_reads_numbers_booleans_and_none():
    assert parse_options(("top_k=16", "scale=0.5", "per_head=False", "score_distance=none", "score=max")) == {
        "top_k": 16, "scale": 0.5, "per_head": False, "score_distance": None, "score": "max"}


def test_cli_passkey_comparison_writes_table_json_and_plot(tmp_path):
    result = CliRunner().invoke(main, ["passkey", "--compare", "baseline,yarn", "--lengths", "256,1k",
                                       "--depths", "0.5", "--trials", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert re.search(r"baseline\s+1\.00\s+0\.00", result.output)
    data = json.loads((tmp_path / "passkey.json").read_text())
    assert {r["setup"] for r in data["records"]} == {"baseline", "yarn"}
    assert (data["device"], data["dtype"]) == ("cpu", "float32")
    assert (tmp_path / "passkey.png").stat().st_size > 0


@pytest.mark.parametrize(("dtype", "device", "expected"), [
    (None, "cpu", "float32"), (None, "cuda", "bfloat16"), (None, "cuda:1", "bfloat16"),
    ("float32", "cuda", "float32"), ("float16", "cpu", "float16")])
def test_dtype_defaults_to_bfloat16_on_cuda_and_float32_elsewhere(dtype, device, expected):
    assert resolve_dtype(dtype, device) == expected


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "/no/such/model"], "does not exist"),
    (["--depths", "1.5"], "depth must be in [0, 1]"),
    (["--lengths", "20"], "below the prompt's size"),
    (["--lengths", "2x"], "is not a length"),
    (["--compare", "baseline,warp"], "'warp' is not an attention method"),
])
def test_cli_rejects_bad_input(tmp_path, args, message):
    result = CliRunner().invoke(main, ["passkey", "--trials", "1", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_parse_lengths():
    assert parse_lengths("512,1k,2K,1m") == [512, 1024, 2048, 1 << 20]


def test_reference_model_retrieves_inside_its_window_and_fails_beyond_twice_it(reference):
    model, tokenizer = reference
    assert 10e6 < sum(p.numel() for p in model.parameters()) < 30e6
    assert model.config.max_position_embeddings == TRAIN_LENGTH
    inside = passkey(model, tokenizer, [TRAIN_LENGTH], [0.0, 0.5, 1.0], trials=4, batch_size=4)
    beyond = passkey(model, tokenizer, [4 * TRAIN_LENGTH], [0.5], trials=4, batch_size=4)
    assert all(r["accuracy"] == 1.0 for r in inside) and beyond[0]["accuracy"] == 0.0
    record = training_record()
    assert record["heldout_perplexity"] > 1 and record["loss_curve"][-1]["loss"] < record["loss_curve"][0]["loss"]


def test_haystacks_join_documents_without_repeating_one():
    from longreach.evals.retrieval import haystack_ids

    documents = [list(range(start, start + size)) for start, size in ((0, 300), (1000, 50), (2000, 700), (5000, 9))]
    total = sum(map(len, documents)) + 4  # one separator token after each document
    for seed in range(20):
        ids = haystack_ids(documents, total - seed, random.Random(seed), separator=[-1])
        assert len(ids) == total - seed
        words = [token for token in ids if token != -1]
        assert len(words) == len(set(words))  # longer than any document, yet no token twice
    assert haystack_ids(documents, 500, random.Random(3), [-1]) == haystack_ids(documents, 500, random.Random(3), [-1])
    assert haystack_ids(documents, 500, random.Random(3), [-1]) != haystack_ids(documents, 500, random.Random(4), [-1])
    with pytest.raises(ValueError, match=f"hold {total} tokens, fewer than the {total + 1} asked for"):
        haystack_ids(documents, total + 1, random.Random(0), [-1])


def test_perplexity_segments_span_documents_when_none_is_long_enough():
    from longreach.evals.perplexity import segments

    texts = [" ".join(str(i) for i in range(start, start + 40)) for start in (0, 100, 200, 300)]
    data = segments(CountingTokenizer(), texts, 100, samples=3)
    assert data.shape == (1, 100)  # 4 documents of 40 tokens, joined with separators, hold one segment of 100
    assert data[0, :40].tolist() == list(range(40)) and 100 in data[0].tolist()


@pytest.mark.parametrize("attention", ["dense", "select_merge"])
def test_chunked_prefill_equals_one_pass(attention):
    import longreach
    from longreach.decode import forward_prompt
    from longreach.evals.retrieval import greedy

    torch.manual_seed(0)
    model = tiny_model(max_position=512)
    longreach.extend(model, attention=attention, **({"block_size": 16, "top_k": 2} if attention != "dense" else {}))
    ids = torch.randint(0, 128, (2, 150))
    whole = forward_prompt(model, ids).logits[:, -1]
    for chunk in (16, 48, 64):
        torch.testing.assert_close(forward_prompt(model, ids, chunk).logits[:, -1], whole, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(model, ids, 4, chunk=32), greedy(model, ids, 4))


def test_prompt_memory_is_estimated_before_allocating():
    from transformers import LlamaConfig

    from longreach.evals.fit import GIB, prompt_bytes, shortfall

    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64)
    cache, activations = prompt_bytes(smollm2, 4 * 2**20, 1, 65536, 2)
    assert cache == 30 * 2 * 3 * 64 * 4 * 2**20 * 2  # 90 GiB of bf16 keys and values
    assert activations < 2 * GIB
    assert shortfall(smollm2, 4 * 2**20, 1, 65536, 2, free=120 * GIB) is None
    reason = shortfall(smollm2, 8 * 2**20, 1, 65536, 2, free=120 * GIB)
    assert reason is not None and "length 8388608" in reason and "KV cache 180.0 GiB" in reason
    assert "prefill chunk" in shortfall(smollm2, 2**20, 1, None, 2, free=20 * GIB)
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        passkey(tiny_model(), SimpleNamespace(), [64], [0.5], trials=1, prefill_chunk=0)


def test_linear_cost_names_the_setups_with_bounded_keys_per_query():
    assert setups.linear_cost("select_merge") and setups.linear_cost("sinks+yarn")
    assert not any(setups.linear_cost(s) for s in ("baseline", "dca", "self_extend", "yarn", "dca+ntk"))
    with pytest.raises(ValueError, match="not an attention method"):
        setups.linear_cost("select_merg")


def test_table_columns_line_up_for_long_setup_names_and_missing_cells():
    records = [{"setup": "tuned select_merge_crd (select_merge+ntk)", "length": 8192, "accuracy": 1.0},
               {"setup": "tuned select_merge_crd (select_merge+ntk)", "length": 1048576, "accuracy": 0.8},
               {"setup": "baseline", "length": 8192, "accuracy": 0.6}]
    lines = report.table("passkey", records).splitlines()[1:]
    assert len({len(line) for line in lines}) == 1, lines
    assert lines[2].split() == ["baseline", "0.60", "-"]
