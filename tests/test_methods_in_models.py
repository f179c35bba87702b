import pytest
import torch

import longreach
from longreach.models import tiny_model

SMALL = {"select_merge": dict(block_size=8, top_k=2), "s2": dict(group_size=16), "sf": dict(group_size=16),
         "dca": dict(chunk_size=24, local_window=4), "self_extend": dict(window=8, group_size=4),
         "sinks": dict(window=12), "softplus": {}, "dense": {}}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("name", list(SMALL))
def test_every_method_forward_and_generate(arch, name):
    model = tiny_model(arch, max_position=32)
    longreach.extend(model, attention=name, **SMALL[name])
    ids = torch.randint(1, model.config.vocab_size, (1, 70))
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert logits.shape == (1, 70, model.config.vocab_size) and torch.isfinite(logits).all()
    assert out.shape == (1, 90) and torch.equal(out[:, :70], ids)
    with pytest.raises(ValueError, match="option 'nonsense'"):
        longreach.extend(model, attention=name, nonsense=1)


@pytest.mark.parametrize("name", ["dca", "self_extend", "sinks", "s2"])
def test_cached_generation_matches_recomputation(name):
    """Each decode step with the (un-rotated) cache equals a full forward over the same tokens."""
    model = tiny_model("llama", max_position=32)
    longreach.extend(model, attention=name, **SMALL[name])
    ids = torch.randint(1, model.config.vocab_size, (1, 50))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        for step in range(8):
            prefix = out[:, : 50 + step]
            assert model(prefix).logits[0, -1].argmax() == out[0, 50 + step]
