"""litgpt-style parity: tiny random HF models built here (no downloads) must give the same logits and the same greedy
continuations in monovlm, in both directions (HF folder -> monovlm, monovlm -> HF folder -> transformers)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from monovlm.infer.generate import GenerationConfig, generate, left_pad  # noqa: E402
from monovlm.model.decoder import Decoder  # noqa: E402
from monovlm.model.hf import config_from_hf, load_hf_decoder, save_hf_decoder  # noqa: E402

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)


def llama_config():
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    return transformers.LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling=rope)


def llama_bias_config():
    return transformers.LlamaConfig(**COMMON, attention_bias=True)


def smollm2_config():  # SmolLM2 is a Llama with tied embeddings and a large rope_theta
    return transformers.LlamaConfig(**COMMON, rope_theta=100000.0, tie_word_embeddings=True)


def mistral_config():  # a window shorter than the test sequences, so the sliding-window mask is exercised
    return transformers.MistralConfig(**COMMON, sliding_window=24, head_dim=16)


def qwen2_config():
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    return transformers.Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=1000000.0, rope_scaling=rope)


def qwen3_config():  # head_dim 32 != hidden/heads: Qwen3 sets it explicitly
    return transformers.Qwen3Config(**COMMON, head_dim=32, rope_theta=1000000.0)


ARCHITECTURES = {
    "llama": llama_config,
    "llama-attention-bias": llama_bias_config,
    "smollm2": smollm2_config,
    "mistral": mistral_config,
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
}


@torch.no_grad()
def randomize(model: torch.nn.Module) -> None:
    """Replace the tiny default init (std 0.02 makes every logit ~0) with weights that give confident, distinct
    predictions, so a wrong weight or rotation shows up as a large logit difference."""
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "norm" in name:
            param.copy_(1.0 + 0.2 * noise)
        else:
            param.copy_(noise * (1.0 / param.shape[-1] ** 0.5 if param.dim() > 1 else 0.1))
        if "embed" in name:
            param.mul_(1.0)


def make_hf(name):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[name](), attn_implementation="sdpa")
    randomize(hf)
    return hf.float().eval()


def hf_greedy(hf, input_ids, attention_mask, new_tokens=32):
    out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                      do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, input_ids.shape[1]:]


def compare(hf, ours):
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf_logits = hf(ids).logits
        our_logits = ours(ids)
    assert hf_logits.abs().max() > 1.0, "logits too small for a meaningful comparison"
    assert (hf_logits - our_logits).abs().max().item() <= 1e-4

    # left-padded batch: HF takes explicit positions that skip the padding, as its generate does
    prompts = [ids[0, :30].tolist(), ids[1, :17].tolist()]
    padded, mask = left_pad(prompts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hf_logits = hf(padded, attention_mask=mask, position_ids=positions).logits
        our_logits = ours(padded, attention_mask=mask)
    real = mask.bool()
    assert (hf_logits[real] - our_logits[real]).abs().max().item() <= 1e-4

    # identical greedy continuations for 32 tokens, batched with left padding
    expected = hf_greedy(hf, padded, mask)
    got = generate(ours, prompts, GenerationConfig(max_new_tokens=32))
    for row, result in enumerate(got):
        assert result.token_ids == expected[row].tolist()
    assert len(set(got[0].token_ids) | set(got[1].token_ids)) > 4, "degenerate continuation would make the comparison weak"


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_hf_to_monovlm(name, tmp_path):
    hf = make_hf(name)
    hf.save_pretrained(tmp_path)
    ours = load_hf_decoder(tmp_path).eval()
    compare(hf, ours)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_monovlm_to_hf(name, tmp_path):
    hf_dict = ARCHITECTURES[name]().to_dict()
    ours = Decoder(config_from_hf(hf_dict))
    randomize(ours)
    ours.eval()
    save_hf_decoder(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").float().eval()
    compare(hf, ours)


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf("qwen2")
    ours = load_hf_decoder(_saved(hf, tmp_path / "single"))
    save_hf_decoder(ours, tmp_path / "sharded", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = load_hf_decoder(tmp_path / "sharded")
    hf_reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    compare(hf_reloaded, reloaded)


def _saved(hf, path):
    hf.save_pretrained(path)
    return path
