"""longreach under the installed transformers (CI runs the newest and the oldest supported): the cache
argument's name, no silent fallback to the full cache, and no deprecation warning from our own calls."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers import DynamicCache
from transformers.utils import logging as hf_logging

import longreach
from longreach import hf
from longreach.evals import passkey
from longreach.hf import cache_kwargs, output_cache
from longreach.models import tiny_model
from longreach.reference_model import load_reference_model
from longreach.train import FinetuneConfig, finetune, prepare


def test_h2o_generate_keeps_at_most_its_budget_per_head():
    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (1, 150))
    longreach.extend(model, cache="h2o", budget=64)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    cache = output_cache(out)
    assert type(cache).__name__ == "PolicyCache" and cache.policy == "h2o"
    assert out.sequences.shape[1] == 162
    assert {layer.keys.shape[2] for layer in cache.layers} == {64}
    assert {layer.values.shape[2] for layer in cache.layers} == {64}


def test_a_policy_the_forward_ignores_raises():
    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (1, 20))
    longreach.extend(model, cache="h2o", budget=8)

    # What broke under transformers 5.24: the policy cache was handed over, but the model attended
    # through a cache of its own (there: the policy went in under the deprecated argument name).
    def own_cache(module, args, kwargs):
        kwargs[hf.CACHE_ARG] = DynamicCache(config=model.config)
        return args, kwargs

    model.model.register_forward_pre_hook(own_cache, with_kwargs=True)
    with pytest.raises(RuntimeError, match="'h2o' was handed to the model, but its attention received keys from"):
        model.generate(ids, max_new_tokens=3, do_sample=False)


def test_a_configured_policy_refuses_another_cache():
    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        filled = output_cache(model(ids, use_cache=True, **cache_kwargs(DynamicCache(config=model.config))))
    longreach.extend(model, cache="sinks", budget=8)
    with pytest.raises(ValueError, match="'sinks' is configured .* given a DynamicCache with 20 cached tokens"):
        model(ids[:, -1:], use_cache=True, **cache_kwargs(filled))
    foreign = longreach.cache.make_cache("h2o", model.config.num_hidden_layers, budget=8)
    with pytest.raises(ValueError, match="'sinks' is configured .* given a PolicyCache"):
        model(ids, use_cache=True, **cache_kwargs(foreign))


class _Deprecations(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "deprecat" in record.getMessage().lower():
            self.messages.append(record.getMessage())


def test_passkey_bounded_generate_and_training_raise_no_deprecation_warning():
    reference, tokenizer = load_reference_model()
    tiny = tiny_model("llama", max_position=64)
    logger = hf_logging.get_logger("transformers")
    handler = _Deprecations()
    logger.addHandler(handler)
    hf_logging.warning_once.cache_clear()  # transformers says each deprecation once per process
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            passkey(reference, tokenizer, [512], [0.5], trials=1)
            longreach.extend(tiny, cache="h2o", budget=16)
            with torch.no_grad():
                tiny.generate(torch.randint(1, 128, (1, 40)), max_new_tokens=4, do_sample=False)
            config = FinetuneConfig(length=64, steps=1, attention="select_merge", position="crd_ntk", warmup=0)
            finetune(prepare(tiny_model("llama", max_position=64), config), torch.randint(1, 128, (2, 65)), config,
                     progress=False)
    finally:
        logger.removeHandler(handler)
    deprecations = [str(w.message) for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning)) or "deprecat" in str(w.message)]
    assert deprecations == [] and handler.messages == []
