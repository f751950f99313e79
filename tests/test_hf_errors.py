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


def test_tied_config_refuses_a_different_lm_head_and_accepts_a_copy(tmp_path):
    # transformers keeps a stored lm_head.weight; dropping a different one silently would change every logit
    model = Decoder(DecoderConfig(tie_word_embeddings=True))
    save_hf_decoder(model, tmp_path)
    embeddings = model.embed_tokens.weight.detach().clone()
    rewrite(tmp_path, lambda t: t.update({"lm_head.weight": embeddings.clone()}))  # a redundant copy: fine
    assert torch.equal(load_hf_decoder(tmp_path).embed_tokens.weight, embeddings)
    rewrite(tmp_path, lambda t: t.update({"lm_head.weight": embeddings + 1.0}))
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings=true, but .*model\.safetensors holds an "
                                              r"lm_head\.weight that differs from model\.embed_tokens\.weight"):
        load_hf_decoder(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"lm_head.weight": embeddings[:-1].clone()}))  # another shape: differs too
    with pytest.raises(CheckpointError, match="differs"):
        load_hf_decoder(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors_is_named(checkpoint, keep, tmp_path):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        load_hf_decoder(checkpoint)
    source = torch.nn.Linear(4, 3)
    save_file(source.state_dict(), tmp_path / "small.safetensors")
    (tmp_path / "small.safetensors").write_bytes((tmp_path / "small.safetensors").read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=r"small\.safetensors is not a readable safetensors file"):
        load_safetensors_strict(torch.nn.Linear(4, 3), tmp_path / "small.safetensors")


def test_index_naming_a_tensor_its_shard_lacks_is_named(tmp_path):
    save_hf_decoder(Decoder(DecoderConfig()), tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.layers.0.extra.weight"] = shard
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"index\.json says tensor 'model\.layers\.0\.extra\.weight' is in "
                                              rf"{shard}, but .*{shard} does not hold it"):
        load_hf_decoder(tmp_path)


def test_bin_shards_are_refused_by_name(tmp_path):
    save_hf_decoder(Decoder(DecoderConfig()), tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02not safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "pytorch_model.bin"}}))
    with pytest.raises(CheckpointError, match=r"lists shard pytorch_model\.bin, which is not a safetensors file"):
        load_hf_decoder(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"neither .* \(it has pytorch_model\.bin: monovlm reads safetensors"):
        load_hf_decoder(tmp_path)


@pytest.mark.parametrize("text, kind", [("[1, 2]", "array"), ('"llama"', "string"), ("null", "null"), ("7", "number")])
def test_config_or_index_that_is_not_an_object_is_named(checkpoint, text, kind):
    (checkpoint / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"config\.json must hold a JSON object, found a JSON {kind}"):
        load_hf_decoder(checkpoint)
    save_hf_decoder(Decoder(DecoderConfig()), checkpoint)
    (checkpoint / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"index\.json must hold a JSON object, found a JSON {kind}"):
        load_hf_decoder(checkpoint)
    (checkpoint / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
    with pytest.raises(CheckpointError, match=r"index\.json has no 'weight_map' object"):
        load_hf_decoder(checkpoint)
