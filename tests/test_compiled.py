"""Static-shape decode steps (`monovlm.infer.compiled`): the same logits and tokens as the eager cached step."""

from __future__ import annotations

import pytest
import torch

from monovlm.config import DecoderConfig
from monovlm.infer.compiled import StaticDecoder, static_capacity, supports_static_decode
from monovlm.infer.generate import GenerationConfig, generate
from monovlm.model.decoder import Decoder
from monovlm.model.kv_cache import KVCache

pytestmark = pytest.mark.slow  # inductor compiles

PROMPTS = [[5, 9, 3, 17, 4, 22, 8], [11, 2, 30]]  # different lengths: the batch is left-padded


def tiny_decoder(**overrides) -> Decoder:
    torch.manual_seed(0)
    values = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  initializer_range=0.3)
    return Decoder(DecoderConfig(**{**values, **overrides})).eval()


@torch.inference_mode()
def _logits_per_step(model, static: bool, steps: int = 12) -> list[torch.Tensor]:
    from monovlm.infer.generate import left_pad

    input_ids, attention_mask = left_pad(PROMPTS)
    cache = KVCache.for_model(model, 2, static_capacity(input_ids.shape[1] + steps) if static else
                              input_ids.shape[1] + steps)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, last_only=True)[:, -1]
    step = StaticDecoder(model, cache, compile=False) if static else None
    seen = []
    for _ in range(steps):
        tokens = logits.argmax(-1)
        logits = step(tokens) if static else model(input_ids=tokens[:, None], cache=cache, last_only=True)[:, -1]
        seen.append(logits)
    return seen


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True, "attention_bias": True}, {"num_kv_heads": 4}])
def test_static_step_equals_the_eager_cached_step_with_left_padding(overrides):
    model = tiny_decoder(**overrides)
    for eager, static in zip(_logits_per_step(model, False), _logits_per_step(model, True)):
        torch.testing.assert_close(static, eager, atol=1e-5, rtol=0)


def test_static_decode_applies_only_to_plain_caches():
    assert static_capacity(1) == static_capacity(256) == 256 and static_capacity(257) == 512
    model = tiny_decoder()
    assert supports_static_decode(model, KVCache.for_model(model, 1, 8))
    windowed = tiny_decoder(architecture="mistral", sliding_window=4)
    assert not supports_static_decode(windowed, KVCache.for_model(windowed, 1, 8))


def test_compiled_generation_equals_eager_generation():
    model = tiny_decoder()
    eager = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10))
    compiled = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10, compile=True))
    assert [g.token_ids for g in compiled] == [g.token_ids for g in eager]
    again = generate(model, [[7, 7, 1]], GenerationConfig(max_new_tokens=5, compile=True))  # another length: reuse
    assert again[0].token_ids == generate(model, [[7, 7, 1]], GenerationConfig(max_new_tokens=5))[0].token_ids


def test_compiled_generation_follows_weights_changed_after_compiling():
    """The compiled step holds the weights as frozen constants; changing them in place must not leave it stale."""
    model = tiny_decoder()
    config = GenerationConfig(max_new_tokens=8, compile=True)
    before = generate(model, PROMPTS, config)
    assert [g.token_ids for g in before] == [g.token_ids for g in generate(model, PROMPTS, GenerationConfig(8))]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(-1.5)  # an in-place update, as an optimizer step makes
    eager = generate(model, PROMPTS, GenerationConfig(max_new_tokens=8))
    after = generate(model, PROMPTS, config)
    assert [g.token_ids for g in eager] != [g.token_ids for g in before]  # the change matters
    assert [g.token_ids for g in after] == [g.token_ids for g in eager]


def test_two_decoders_keep_their_own_compiled_steps():
    first, second = tiny_decoder(), tiny_decoder()
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    config = GenerationConfig(max_new_tokens=6, compile=True)
    for _ in range(2):  # the second round runs with guards skipped: each must still use its own weights
        for model in (first, second):
            expected = generate(model, PROMPTS, GenerationConfig(max_new_tokens=6))
            assert [g.token_ids for g in generate(model, PROMPTS, config)] == [g.token_ids for g in expected]
