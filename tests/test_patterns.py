"""CAB's four attention patterns: the baselines against an explicit statement of each pattern, methods on
the patterns they define, and the efficiency CLI's pattern mode."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from longreach.attention import METHODS
from longreach.cli import main
from longreach.evals.patterns import PATTERNS, baselines, for_method, key_length, parse_patterns, pattern_efficiency
from longreach.positions import default


def reference(q, k, v, causal: bool):
    """Softmax attention written out: query i of Lq sees key j of Lk when j <= i + Lk - Lq (causal)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        q_len, k_len = q.shape[2], k.shape[2]
        allowed = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def inputs(pattern: str, q_len: int = 96, ratio: int = 2, heads: int = 4, kv_heads: int = 2, dim: int = 32):
    k_len = key_length(pattern, q_len, ratio)
    return torch.randn(1, heads, q_len, dim), torch.randn(1, kv_heads, k_len, dim), torch.randn(1, kv_heads, k_len, dim)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_baselines_compute_the_pattern_as_written_out(pattern):
    q, k, v = inputs(pattern)
    expected = reference(q, k, v, causal=pattern.startswith("causal"))
    for name, attend in baselines(pattern).items():
        torch.testing.assert_close(attend(q, k, v), expected, atol=1e-5, rtol=1e-5, msg=name)


def test_cross_patterns_have_key_ratio_times_the_keys():
    assert [key_length(p, 100, 3) for p in PATTERNS] == [100, 100, 300, 300]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_select_merge_keeping_every_block_is_the_dense_pattern(pattern):
    """The degenerate case: with top_k past the block count, select_merge attends every allowed key, so it is
    the dense method (causal patterns, same rotary) or SDPA on the given q and k (non-causal ones)."""
    q, k, v = inputs(pattern, q_len=128)
    rope = default(q.shape[-1], 10000.0)
    every = for_method(pattern, "select_merge", {"block_size": 16, "top_k": 64}, rope)
    if pattern.startswith("causal"):
        expected = for_method(pattern, "dense", {}, rope)(q, k, v)
    else:
        expected = reference(q, k, v, causal=False)
    torch.testing.assert_close(every(q, k, v), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_select_merge_options_reach_every_pattern(pattern):
    """One selected block per query block (no local or sink blocks) is far from dense: the options took effect."""
    q, k, v = inputs(pattern, q_len=128)
    rope = default(q.shape[-1], 10000.0)
    sparse = for_method(pattern, "select_merge", {"block_size": 16, "top_k": 1, "local": 0, "sink": 0}, rope)
    dense = for_method(pattern, "select_merge", {"block_size": 16, "top_k": 64}, rope)
    assert (sparse(q, k, v) - dense(q, k, v)).abs().max() > 0.1


def test_methods_without_a_noncausal_form_have_no_noncausal_rows():
    rope = default(32, 10000.0)
    defined = {name: [p for p in PATTERNS if for_method(p, name, {}, rope) is not None] for name in METHODS}
    assert defined["select_merge"] == list(PATTERNS)
    for name in ("dca", "self_extend", "sinks", "s2", "sf", "softplus", "dense"):
        assert defined[name] == ["causal_self", "causal_cross"], name


def test_pattern_efficiency_records_every_implementation_and_mode():
    records = pattern_efficiency(baselines, [64], patterns=("causal_cross",), heads=4, kv_heads=2, head_dim=32,
                                 key_ratio=3, repeats=1)
    assert {(r["impl"], r["mode"]) for r in records} == {
        (impl, mode) for impl in ("sdpa", "flex") for mode in ("forward", "forward+backward")}
    assert all(r["length"] == 64 and r["k_len"] == 192 for r in records)
    sdpa = [r for r in records if r["impl"] == "sdpa"]
    assert all(r["seconds"] > 0 and r["tokens_per_second"] > 0 for r in sdpa)
    with pytest.raises(ValueError, match="key_ratio and repeats must be >= 1"):
        pattern_efficiency(baselines, [64], heads=4, kv_heads=2, head_dim=32, key_ratio=0)


def test_unknown_patterns_are_named():
    assert parse_patterns("all") == PATTERNS
    with pytest.raises(ValueError, match=r"--patterns: unknown \['sideways'\]; choose 'all' or some of causal_self"):
        parse_patterns("causal_self,sideways")


def test_cli_efficiency_reports_each_pattern_a_setup_defines(tmp_path):
    result = CliRunner().invoke(main, ["efficiency", "--patterns", "causal_self,noncausal_cross", "--compare",
                                       "baseline,dca", "--lengths", "64", "--repeats", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "efficiency.json").read_text())["records"]
    rows = {(r["setup"], r["impl"], r["pattern"]) for r in records}
    assert rows == {("baseline", "sdpa", "causal_self"), ("baseline", "flex", "causal_self"),
                    ("baseline", "sdpa", "noncausal_cross"), ("baseline", "flex", "noncausal_cross"),
                    ("dca", "dca", "causal_self")}
    assert "baseline/sdpa noncausal_cross" in result.output and "dca causal_self" in result.output
    if not torch.cuda.is_available():  # the table says why Flex's backward row is empty
        assert "FlexAttention does not support backward on CPU" in result.output
    assert all(r["k_len"] == (128 if r["pattern"] == "noncausal_cross" else 64) for r in records)


def test_cli_efficiency_rejects_an_unknown_pattern(tmp_path):
    result = CliRunner().invoke(main, ["efficiency", "--patterns", "diagonal", "--lengths", "64", "--out",
                                       str(tmp_path)])
    assert result.exit_code == 2 and "--patterns: unknown ['diagonal']" in result.output, result.output
