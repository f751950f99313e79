"""NEO's pre-buffer (`pre_buffer_layers`): fresh layers in front of a loaded LLM start as identities (the HF model's
logits, bitwise), cached decoding through the deeper decoder equals its full forward, a stage can train the
pre-buffer alone, and the merged model is a plain deeper decoder that saves and loads as an HF folder."""

import pytest
import torch

from monovlm.config import ConfigError, DecoderConfig
from monovlm.infer.generate import left_pad
from monovlm.model.decoder import Decoder
from monovlm.model.hf import load_hf_decoder, save_hf_decoder
from monovlm.model.kv_cache import KVCache
from monovlm.train.parts import part_of, set_trainable

transformers = pytest.importorskip("transformers")


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny Qwen2 folder written by transformers (attention biases: the fresh layers' init covers them too)."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "qwen2")
    return tmp_path / "qwen2"


def test_fresh_layers_leave_the_loaded_llm_unchanged(hf_folder):
    plain = load_hf_decoder(hf_folder).eval()
    buffered = load_hf_decoder(hf_folder).eval()
    buffered.add_pre_buffer(2)
    assert (buffered.config.num_layers, buffered.config.pre_buffer_layers) == (4, 2)
    assert [block.attn.layer_index for block in buffered.layers] == [0, 1, 2, 3]
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(buffered(ids), plain(ids))  # identity layers: not close, equal
        for block in buffered.layers[:2]:  # the rest of each fresh layer is initialised, not zero
            assert block.attn.qkv_proj.weight.abs().sum() > 0 and block.mlp.up_proj.weight.abs().sum() > 0


def test_cached_decoding_through_the_pre_buffer_equals_the_full_forward(hf_folder):
    model = load_hf_decoder(hf_folder).eval()
    model.add_pre_buffer(1)
    with torch.no_grad():  # move the fresh layer off the identity, so it takes part
        for name, param in model.layers[0].named_parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    prompts = [[5, 9, 2, 7, 1, 8, 3], [4, 4, 6], [11, 12, 13, 14, 15]]
    continuation = torch.randint(0, 128, (3, 4), generator=torch.Generator().manual_seed(3))
    input_ids, mask = left_pad(prompts)
    full_ids = torch.cat([input_ids, continuation], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask)
        cache = KVCache.for_model(model, batch_size=3, max_length=full_ids.shape[1])
        steps = [model(input_ids, attention_mask=mask, cache=cache)]
        for t in range(continuation.shape[1]):
            steps.append(model(continuation[:, t : t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    real = full_mask.bool()
    assert (cached[real] - full[real]).abs().max().item() <= 1e-5


def test_the_pre_buffer_is_a_part_and_trains_alone(hf_folder):
    model = load_hf_decoder(hf_folder)
    model.add_pre_buffer(1)
    names = [name for name, _ in model.named_parameters()]
    prefixed = {f"decoder.{name}" for name in names}  # as inside a VLM
    assert {name for name in prefixed if part_of(name, 1) == "pre_buffer"} == {
        name for name in prefixed if name.startswith("decoder.layers.0.")}
    counts = set_trainable(WrappedDecoder(model), ["pre_buffer"])
    assert set(counts) == {"pre_buffer"}
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trained == {name for name in names if name.startswith("layers.0.")}


class WrappedDecoder(torch.nn.Module):
    """The decoder under the name a VLM gives it (`decoder.`), so the parts see `decoder.layers.N`."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder


def test_the_merged_model_saves_as_a_deeper_hf_decoder(hf_folder, tmp_path):
    model = load_hf_decoder(hf_folder).eval()
    model.add_pre_buffer(1)
    save_hf_decoder(model, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    assert hf.config.num_hidden_layers == 3
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("count", [-1, 4])
def test_a_pre_buffer_must_leave_the_llm_a_layer(count):
    with pytest.raises(ConfigError, match="pre_buffer_layers"):
        DecoderConfig(num_layers=4, pre_buffer_layers=count)
