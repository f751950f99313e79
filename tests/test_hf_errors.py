"""Strict loading: every problem with a checkpoint is an error that names the key and the file."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from monovlm.config import DecoderConfig
from monovlm.model.decoder import Decoder
from monovlm.model.hf import CheckpointError, load_hf_decoder, load_safetensors_strict, save_hf_decoder


@pytest.fixture
def checkpoint(tmp_path):
    save_hf_decoder(Decoder(DecoderConfig()), tmp_path)
    return tmp_path


def rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_round_trip_is_exact(checkpoint):
    model = Decoder(DecoderConfig())
    save_hf_decoder(model, checkpoint)
    loaded = load_hf_decoder(checkpoint)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_strict_loader_casts_bf16_weights_to_the_modules_float32(tmp_path):
    """A monovlm folder may store bf16 weights (the shipped model does); the module keeps its float32."""
    source = torch.nn.Linear(4, 3)
    save_file({name: t.to(torch.bfloat16) for name, t in source.state_dict().items()}, tmp_path / "model.safetensors")
    target = torch.nn.Linear(4, 3)
    load_safetensors_strict(target, tmp_path / "model.safetensors")
    for name, tensor in target.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, source.state_dict()[name].to(torch.bfloat16).float()), name


def test_strict_loader_names_an_integer_tensor_in_a_float_slot(tmp_path):
    save_file({"weight": torch.zeros(3, 4, dtype=torch.int32), "bias": torch.zeros(3)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'weight'.*model\.safetensors is torch\.int32, expected torch\.float32"):
        load_safetensors_strict(torch.nn.Linear(4, 3), tmp_path / "model.safetensors")


def test_missing_tensor_is_named(checkpoint):
    rewrite(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_decoder(checkpoint)


def test_unexpected_tensor_is_named_with_its_file(checkpoint):
    rewrite(checkpoint, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.extra\.weight.*model\.safetensors"):
        load_hf_decoder(checkpoint)


def test_shape_mismatch_is_named(checkpoint):
    rewrite(checkpoint, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*shape \(7,\)"):
        load_hf_decoder(checkpoint)


def test_wrong_path_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_decoder(tmp_path / "nope")


def test_folder_without_weights_says_so(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf_decoder(checkpoint)


def test_incomplete_config_names_the_field_and_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(ValueError, match=r"config\.json.*hidden_size"):
        load_hf_decoder(tmp_path)


def test_missing_shard_is_named(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_hf_decoder(checkpoint)


def test_unsupported_architecture_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "gpt2"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gpt2"):
        load_hf_decoder(checkpoint)


def test_special_tokens_survive_a_round_trip(tmp_path):
    model = Decoder(DecoderConfig(vocab_size=600, special_tokens={"image": 512}))
    save_hf_decoder(model, tmp_path)
    assert load_hf_decoder(tmp_path).config.special_tokens == {"image": 512}
