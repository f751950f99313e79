"""Generation API: batched left padding, samplers, stop ids and strings, streaming, seeds."""

import pytest
import torch

from monovlm.config import DecoderConfig
from monovlm.infer.generate import GenerationConfig, generate, stream_text
from monovlm.infer.sampling import filter_top_k, filter_top_p
from monovlm.model.decoder import Decoder


class LetterTokenizer:
    """Token i decodes to one letter; enough to exercise stop strings and streaming without a trained tokenizer."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=64, initializer_range=0.3)).eval()


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]


def test_batched_generation_equals_one_by_one(model):
    config = GenerationConfig(max_new_tokens=12)
    batched = generate(model, PROMPTS, config)
    for prompt, result in zip(PROMPTS, batched):
        assert generate(model, [prompt], config)[0].token_ids == result.token_ids
        assert result.finish_reason == "length" and len(result.token_ids) == 12


def test_stop_id_ends_only_that_row(model):
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12))
    stop_token = free[0].token_ids[3]
    stopped = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, stop_ids=[stop_token]))
    first = free[0].token_ids.index(stop_token)
    assert stopped[0].token_ids == free[0].token_ids[: first + 1]
    assert stopped[0].finish_reason == "stop"
    for free_row, stopped_row in zip(free[1:], stopped[1:]):
        if stop_token not in free_row.token_ids:
            assert stopped_row.token_ids == free_row.token_ids


def test_stop_string_spanning_tokens_cuts_the_text(model):
    tokenizer = LetterTokenizer()
    free = generate(model, PROMPTS[:1], GenerationConfig(max_new_tokens=12), tokenizer)[0]
    stop = free.text[4:6]  # two letters = two tokens
    result = generate(model, PROMPTS[:1], GenerationConfig(max_new_tokens=12, stop_strings=[stop]), tokenizer)[0]
    assert result.text == free.text[: free.text.index(stop)]
    assert result.finish_reason == "stop"
    assert len(result.token_ids) == free.text.index(stop) + 2


def test_streamed_text_concatenates_to_generated_text(model):
    tokenizer = LetterTokenizer()
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10), tokenizer)
    config = GenerationConfig(max_new_tokens=10, stop_strings=[free[1].text[3:5]])
    expected = [r.text for r in generate(model, PROMPTS, config, tokenizer)]
    streamed = ["", "", ""]
    steps = 0
    for deltas in stream_text(model, PROMPTS, tokenizer, config):
        steps += 1
        for row, delta in enumerate(deltas):
            streamed[row] += delta
    assert streamed == expected
    assert steps >= 5  # it streamed step by step, not all at the end


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    def sample(seed):
        config = GenerationConfig(max_new_tokens=16, temperature=1.5, seed=seed)
        return [r.token_ids for r in generate(model, PROMPTS, config)]

    global_state = torch.get_rng_state()
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert torch.equal(torch.get_rng_state(), global_state), "sampling must not consume the global RNG"


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = [r.token_ids for r in generate(model, PROMPTS, GenerationConfig(max_new_tokens=8))]
    top_k = [r.token_ids for r in generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=1, seed=0))]
    top_p = [r.token_ids for r in generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=0))]
    assert greedy == top_k == top_p


def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_top_k(logits, 2)).tolist() == [[True, True, False, False]]
    # 0.5 + 0.3 = 0.8 reaches p=0.8: the third token is dropped; p=0.81 needs it
    assert torch.isfinite(filter_top_p(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=1.5)


def test_stop_strings_without_tokenizer_are_refused(model):
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, PROMPTS, GenerationConfig(max_new_tokens=4, stop_strings=["x"]))
