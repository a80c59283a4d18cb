"""The loader: GPT-2's tokenizer and config offline, local folders, the embedded fallback, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import constants as hub_constants
from transformers import GPT2Config

from gpt2gen.models import embedded, loading
from gpt2gen.models.gpt2_reference import GPT2_SIZES, gpt2_config, gpt2_tokenizer, parameter_breakdown
from gpt2gen.models.loading import ModelLoadError, load_model

# The published https://huggingface.co/gpt2/blob/main/config.json values that define the model.
PUBLISHED_GPT2_CONFIG = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-05,
    "initializer_range": 0.02,
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "scale_attn_weights": True,
    "tie_word_embeddings": True,
    "model_type": "gpt2",
}


@pytest.fixture
def offline(monkeypatch):
    """The Hub switched off, as HF_HUB_OFFLINE=1 does, whatever this machine's network."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(loading.MODEL_ENV_VAR, raising=False)


def test_gpt2_tokenizer_is_the_real_one():
    tokenizer = gpt2_tokenizer()
    assert len(tokenizer) == 50257
    ids = tokenizer("Hello world, the fox is").input_ids
    assert ids == [15496, 995, 11, 262, 21831, 318]
    assert tokenizer.convert_ids_to_tokens(ids) == ["Hello", "Ġworld", ",", "Ġthe", "Ġfox", "Ġis"]
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 50256
    assert tokenizer.pad_token_id == 50256 and tokenizer.padding_side == "left"
    assert tokenizer.decode(ids) == "Hello world, the fox is"


def test_gpt2_config_matches_published_values(offline):
    config, source = gpt2_config()
    assert "offline" in source or "cache" in source
    for field, value in PUBLISHED_GPT2_CONFIG.items():
        assert getattr(config, field) == value, field


def test_parameter_counts_of_the_four_gpt2_sizes():
    small = parameter_breakdown(GPT2Config())
    assert small["total"] == 124_439_808
    assert small["token embeddings"] == 50257 * 768
    assert small["position embeddings"] == 1024 * 768
    assert small["layer norms"] == (2 * 12 + 1) * 2 * 768
    totals = {name: parameter_breakdown(GPT2Config(**sizes))["total"] for name, sizes in GPT2_SIZES.items()}
    assert totals == {
        "gpt2": 124_439_808,
        "gpt2-medium": 354_823_168,
        "gpt2-large": 774_030_080,
        "gpt2-xl": 1_557_611_200,
    }


def test_loads_a_local_folder_ready_for_generation(tiny_model_dir, tiny_model):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert loaded.is_gpt2 and not loaded.is_embedded
    assert loaded.label == str(tiny_model_dir)
    assert not loaded.model.training
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id == 50256
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.model.dtype == torch.float32
    assert loaded.context_length == 128
    for name, param in tiny_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], param), name


def test_environment_variable_chooses_the_model(monkeypatch, tiny_model_dir):
    monkeypatch.setenv(loading.MODEL_ENV_VAR, str(tiny_model_dir))
    assert load_model().name == str(tiny_model_dir)


def test_bfloat16_on_request(tiny_model_dir):
    assert load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16").model.dtype == torch.bfloat16


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no such folder or file\. Check the path"):
        load_model(str(tmp_path / "nowhere"))


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"has no config\.json, so it is not a saved model"):
        load_model(str(tmp_path))


def test_folder_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPT2Config().to_dict()))
    with pytest.raises(ModelLoadError, match=r"has a config\.json but no weights \(\*\.safetensors\)"):
        load_model(str(tmp_path))


def test_unknown_model_offline_is_a_clear_error_not_a_fallback(offline):
    with pytest.raises(ModelLoadError, match=r"'no-such-model-xyz': it is not in the local Hugging Face cache and the Hub cannot be reached"):
        load_model("no-such-model-xyz")


def test_named_model_from_environment_does_not_fall_back(offline, monkeypatch):
    monkeypatch.setenv(loading.MODEL_ENV_VAR, "no-such-model-xyz")
    with pytest.raises(ModelLoadError, match="Hub cannot be reached"):
        load_model()


def test_bad_device_and_dtype_are_clear_errors():
    with pytest.raises(ValueError, match="dtype 'float8' is not supported"):
        loading.resolve_dtype("float8")
    with pytest.raises(ValueError, match="is not a device name"):
        loading.resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            loading.resolve_device("cuda")
        assert loading.resolve_device("auto").type in {"cpu", "mps"}


def test_default_falls_back_to_the_embedded_model_with_a_notice(offline, monkeypatch, capsys):
    # A default that is certainly not in any local cache, so the fallback happens on every machine.
    monkeypatch.setattr(loading, "DEFAULT_MODEL", "gpt2gen-tests/never-cached")
    loaded = load_model()
    assert loaded.is_embedded and not loaded.is_gpt2
    assert loaded.label == "SmolLM2-135M-Instruct (embedded offline model, not GPT-2)"
    # The first use on a machine also shows the one-off conversion's progress on stderr.
    notice = [line for line in capsys.readouterr().err.splitlines() if "was loaded" in line]
    assert len(notice) == 1
    assert "the embedded offline model SmolLM2-135M-Instruct (not GPT-2) was loaded" in notice[0]
    assert "to use GPT-2, connect once to the internet" in notice[0]


def test_embedded_model_generates_real_text():
    """The embedded model is a real pre-trained model: it knows the capital of France."""
    from gpt2gen.decoding.generation import generate
    from gpt2gen.decoding.sampling import SamplingParams

    loaded = load_model(embedded.EMBEDDED_ALIAS, device="cpu")
    assert loaded.model.num_parameters() == 134_515_008
    result = generate(loaded.model, loaded.tokenizer, "The capital of France is", SamplingParams.greedy(), 3)
    assert result.texts[0].startswith(" Paris")


def test_embedded_cache_is_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    source = tmp_path / embedded.GGUF_FILE
    source.write_bytes(b"first")
    before = embedded.converted_folder(source)
    source.write_bytes(b"second version")
    assert embedded.converted_folder(source) != before
