"""`[model.vision] image_position = "after_text"`: a user turn's images after its text, in training samples and
prompts alike, so that under causal attention the visual tokens see the question."""

import dataclasses

import pytest
import torch

from monovlm.config import ConfigError, VisionConfig
from monovlm.data.processor import IGNORE_INDEX, Processor
from monovlm.model.vlm import EncoderFreeVLM
from tiny_vlm import build_vlm, picture, small_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tokenizer = small_tokenizer()
    model, _ = build_vlm(tokenizer)
    return model, tokenizer


def processor_for(model, tokenizer, position: str) -> Processor:
    vision = dataclasses.replace(model.config.vision, image_position=position)
    return Processor(tokenizer, vision, model.config.processor)


def sample(question: str, answer: str = "green") -> dict:
    return {"image": "a.png", "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                 {"from": "gpt", "value": answer}]}


def image_span(ids: list[int], processor: Processor) -> tuple[int, int]:
    return ids.index(processor.image_start_id), ids.index(processor.image_end_id)


def test_the_image_follows_the_question_in_training_samples_and_prompts(tiny):
    model, tokenizer = tiny
    image = picture(32, 32, seed=0)
    question = "what colour is it"
    question_ids = tokenizer.encode(question)
    for position in ("marker", "after_text"):
        processor = processor_for(model, tokenizer, position)
        trained = processor.process(sample(question), images=[image])
        prompt_ids, prompt_images = processor.prompt(question, [image])
        start, end = image_span(trained.input_ids, processor)
        text_at = next(i for i in range(len(trained.input_ids))
                       if trained.input_ids[i:i + len(question_ids)] == question_ids)
        assert (text_at > end) if position == "marker" else (text_at + len(question_ids) < start)
        # the prompt is the training sample up to the answer: the model is asked as it was taught
        answer_at = trained.labels.index(next(label for label in trained.labels if label != IGNORE_INDEX))
        assert prompt_ids == trained.input_ids[:answer_at]
        assert torch.equal(prompt_images[0], trained.images[0])


def test_a_conversation_moves_only_the_images_of_its_user_turns(tiny):
    model, tokenizer = tiny
    processor = processor_for(model, tokenizer, "after_text")
    record = {"conversations": [{"from": "human", "value": "<image>\nwhat colour is it"},
                                {"from": "gpt", "value": "green"},
                                {"from": "human", "value": "how many shapes"}, {"from": "gpt", "value": "two"}]}
    moved = processor.process(record, images=[picture(32, 32, seed=1)])
    plain = processor_for(model, tokenizer, "marker").process(record, images=[picture(32, 32, seed=1)])
    assert sorted(moved.input_ids) == sorted(plain.input_ids)  # the same tokens, rearranged
    assert moved.labels == plain.labels  # the answers at the same places: the first user turn keeps its length
    first_answer = moved.labels.index(next(label for label in moved.labels if label != IGNORE_INDEX))
    assert moved.input_ids[first_answer:] == plain.input_ids[first_answer:]
    assert moved.input_ids[:first_answer] != plain.input_ids[:first_answer]


def visual_states(model, processor, question: str, image) -> torch.Tensor:
    ids, images = processor.prompt(question, [image])
    ids = torch.tensor([ids])
    with torch.no_grad():
        hidden = model.hidden_states(ids, images)  # (1, T, C)
    return hidden[0, ids[0] == processor.image_id]  # (visual tokens, C)


def test_visual_tokens_see_the_question_only_after_it(tiny):
    model, tokenizer = tiny
    image = picture(32, 32, seed=2)
    before = processor_for(model, tokenizer, "marker")
    after = processor_for(model, tokenizer, "after_text")
    torch.testing.assert_close(visual_states(model, before, "what colour is it", image),
                               visual_states(model, before, "how many shapes", image), rtol=0, atol=1e-5)
    difference = (visual_states(model, after, "what colour is it", image)
                  - visual_states(model, after, "how many shapes", image)).abs().amax(dim=-1)
    assert (difference > 1e-3).all()  # every visual token, not only those near the text


def test_the_setting_travels_with_the_model(tiny, tmp_path):
    model, tokenizer = tiny
    model.config.vision = dataclasses.replace(model.config.vision, image_position="after_text")
    try:
        model.save(tmp_path / "m", tokenizer)
    finally:
        model.config.vision = dataclasses.replace(model.config.vision, image_position="marker")
    loaded = EncoderFreeVLM.load(tmp_path / "m")
    assert loaded.config.vision.image_position == "after_text"


def test_an_unknown_position_is_refused():
    with pytest.raises(ConfigError, match="image_position='last'"):
        VisionConfig(embedder="eve", patch_size=4, merge=2, image_position="last")
