"""Look supervision (a stage's `look`): the answer position's attention over the image pulled towards where the "qa"
teacher's lookup head looks. The head is saved with the teacher and loads to the same answers; each labelled turn of
an isolated-turn row is found with its question's words; the teacher's maps are its head's look at that question and
the row's image; the student's look is exactly the decoder's attention at that layer over the image's grid tokens;
the loss moves that attention; the recipe refuses look without what it reads."""

import pytest
import torch

from monovlm.config import ConfigError, EncoderConfig, ProcessorConfig
from monovlm.data.collate import collate
from monovlm.data.processor import Processor
from monovlm.model.vit import ViT, save_vit
from monovlm.train.look import (LookSupervision, TeacherLook, labelled_turns, look_loss, on_grid, question_text,
                                student_look)
from monovlm.train.recipe import load_recipe
from monovlm.train.vit_qa import LookupQAHead, QuestionVocabulary, load_qa_head, save_qa_head
from tiny_vlm import build_vlm, picture, small_tokenizer

PAIRS = [("what colour is it", "red"), ("how many shapes", "two"), ("is it green", "no")]


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


def merged(pairs=PAIRS) -> dict:
    turns = []
    for number, (question, answer) in enumerate(pairs):
        turns += [{"from": "human", "value": ("<image>\n" if number == 0 else "") + question},
                  {"from": "gpt", "value": answer}]
    return {"image": "a.png", "conversations": turns}


def isolated_batch(tokenizer, model):
    """Two isolated-turn rows (3 and 2 questions) about two 32×32 pictures: 4×4 grid tokens each."""
    processor = Processor(tokenizer, model.config.vision, ProcessorConfig(template="chatml"))
    rows = [processor.process(merged(), images=[picture(32, 32, 1)], isolate_turns=True),
            processor.process(merged(PAIRS[1:]), images=[picture(32, 32, 2)], isolate_turns=True)]
    return collate(rows, pad_id=0)


def test_each_labelled_turn_is_found_with_its_question(tokenizer):
    model, _ = build_vlm(tokenizer)
    batch = isolated_batch(tokenizer, model)
    turns = labelled_turns(batch.labels, batch.turn_ids)
    assert [(row, turn) for row, turn, _ in turns] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    answers = [answer for _, answer in PAIRS] + [answer for _, answer in PAIRS[1:]]
    questions = [question for question, _ in PAIRS] + [question for question, _ in PAIRS[1:]]
    for (row, turn, position), answer, question in zip(turns, answers, questions):
        own = batch.turn_ids[row] == turn
        replied = batch.input_ids[row][own & (batch.labels[row] != -100)].tolist()
        assert tokenizer.decode(replied, skip_special_tokens=True).strip() == answer
        before = batch.input_ids[row][own & (torch.arange(batch.input_ids.shape[1]) < position)].tolist()
        assert question_text(tokenizer, before) == question


def test_the_students_look_is_the_decoders_attention_over_the_grid(tokenizer):
    """GQA (4 heads on 2 key/value heads), two rows: student_look equals the layer's own attention probabilities at
    the answer positions, restricted to the image's grid tokens and renormalised, averaged over heads."""
    model, _ = build_vlm(tokenizer)
    batch = isolated_batch(tokenizer, model)
    supervision = LookSupervision(teacher=None, layer=1)
    with torch.no_grad(), supervision.capture(model) as captured:
        model.hidden_states(batch.input_ids, batch.images, batch.attention_mask, turn_ids=batch.turn_ids)
    layout = model.visual_layout(batch.input_ids, batch.images)
    turns = labelled_turns(batch.labels, batch.turn_ids)
    rows = torch.tensor([row for row, _, _ in turns])
    queries = torch.tensor([position - 1 for _, _, position in turns])
    grids = torch.stack([layout.patch_mask[row].nonzero()[:, 0] for row, _, _ in turns])  # row-major already
    assert grids.shape[1] == 16
    looked = student_look(model.decoder.layers[1].attn, captured.args, queries, rows, grids).exp()
    attention = model.decoder.layers[1].attn
    x, inputs = captured.args[0], captured.args[1]
    q, k, _ = attention.project_qkv(x, inputs.cos, inputs.sin, inputs.routing, inputs.hw)
    for index, (row, query) in enumerate(zip(rows.tolist(), queries.tolist())):
        allowed = torch.zeros(1, 1, 1, k.shape[2], dtype=torch.bool)
        allowed[..., grids[index]] = True
        expected = attention.probabilities(q[row:row + 1, :, query:query + 1], k[row:row + 1], allowed)[0, :, 0]
        expected = expected[:, grids[index]].mean(dim=0)  # (N,)
        assert torch.allclose(looked[index], expected, atol=1e-6)
        assert abs(looked[index].sum().item() - 1.0) < 1e-5


def test_the_look_loss_moves_the_attention_where_the_teacher_looks(tokenizer):
    model, _ = build_vlm(tokenizer)
    model.train()
    batch = isolated_batch(tokenizer, model)
    turns = labelled_turns(batch.labels, batch.turn_ids)
    layout = model.visual_layout(batch.input_ids, batch.images)
    grids = torch.stack([layout.patch_mask[row].nonzero()[:, 0] for row, _, _ in turns])
    rows = torch.tensor([row for row, _, _ in turns])
    queries = torch.tensor([position - 1 for _, _, position in turns])
    target = torch.full((len(turns), 16), 0.02 / 15)
    target[:, 5] = 0.98  # every answer should look at one grid token
    supervision = LookSupervision(teacher=None, layer=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        with supervision.capture(model) as captured:
            model.hidden_states(batch.input_ids, batch.images, batch.attention_mask, turn_ids=batch.turn_ids)
        loss = look_loss(student_look(model.decoder.layers[1].attn, captured.args, queries, rows, grids), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    assert look_loss(torch.log(target), target).item() == pytest.approx(0.0, abs=1e-6)


def test_a_saved_lookup_head_answers_and_looks_as_before(tmp_path):
    torch.manual_seed(0)
    vocabulary = QuestionVocabulary(["is there a red square", "what colour is the square"])
    head = LookupQAHead(feature_width=16, vocab=len(vocabulary), answers=3, width=32, heads=4).eval()
    save_qa_head(tmp_path, head, vocabulary)
    loaded, words = load_qa_head(tmp_path)
    patches = torch.randn(2, 9, 16)
    ids, lengths = vocabulary.encode(["is there a red square", "what colour is the square"])
    assert words.encode(["is there a red square"])[0].tolist() == ids[:1, :5].tolist()
    assert torch.equal(loaded(patches, ids, lengths), head(patches, ids, lengths))
    looks = loaded.look(patches, ids, lengths)
    assert looks.shape == (2, 9) and torch.allclose(looks.sum(-1), torch.ones(2))


def test_the_teachers_maps_are_its_heads_look_at_each_rows_question_and_image(tmp_path, tokenizer):
    """TeacherLook reads each labelled turn's question off the row's tokens and asks the saved lookup head about the
    row's own image: the same maps as the head given the question's text and the image directly."""
    torch.manual_seed(0)
    vit = ViT(EncoderConfig(width=32, depth=0, heads=4, stem="cnn"), 8)
    questions = [question for question, _ in PAIRS]
    vocabulary = QuestionVocabulary(questions)
    head = LookupQAHead(feature_width=32, vocab=len(vocabulary), answers=4, width=32, heads=4)
    save_vit(vit, tmp_path)
    save_qa_head(tmp_path, head, vocabulary)
    model, _ = build_vlm(tokenizer)
    batch = isolated_batch(tokenizer, model)
    turns = labelled_turns(batch.labels, batch.turn_ids)
    maps = TeacherLook(tmp_path, tokenizer).maps(batch, turns, [1, 0])  # row 0 reads image 1: the owner is used
    assert [tuple(m.shape) for m in maps] == [(4, 4)] * 5
    maps = torch.stack([m.flatten() for m in maps])
    with torch.no_grad():
        features = torch.stack(vit.eval().features(batch.images)).flatten(1, 2)  # (2, 16, 32)
        asked = questions + questions[1:]
        owner = torch.tensor([1, 1, 1, 0, 0])
        expected = head.eval().look(features[owner], *vocabulary.encode(asked))
    assert maps.shape == (5, 16) and torch.allclose(maps, expected, atol=1e-6)
    assert not torch.allclose(maps[1], maps[3])  # the same question about the other image looks elsewhere


def saved_teacher(folder, questions):
    torch.manual_seed(0)
    vit = ViT(EncoderConfig(width=32, depth=0, heads=4, stem="cnn"), 8)
    vocabulary = QuestionVocabulary(questions)
    save_vit(vit, folder)
    save_qa_head(folder, LookupQAHead(feature_width=32, vocab=len(vocabulary), answers=4, width=32, heads=4),
                 vocabulary)
    return folder


def test_images_of_different_sizes_in_one_batch_each_get_their_own_loss(tmp_path, tokenizer):
    """A 32×32 and a 32×48 picture (4×4 and 4×6 grid tokens) in one batch: the batch's look loss is the turns' mean
    of the loss each row gives alone."""
    model, _ = build_vlm(tokenizer)
    look = LookSupervision(TeacherLook(saved_teacher(tmp_path, [q for q, _ in PAIRS]), tokenizer), layer=1)
    processor = Processor(tokenizer, model.config.vision, ProcessorConfig(template="chatml"))
    rows = [processor.process(merged(), images=[picture(32, 32, 1)], isolate_turns=True),
            processor.process(merged(PAIRS[1:]), images=[picture(32, 48, 2)], isolate_turns=True)]

    def loss_of(batch):
        with torch.no_grad(), look.capture(model) as captured:
            model.hidden_states(batch.input_ids, batch.images, batch.attention_mask, turn_ids=batch.turn_ids)
        return look.loss(model, batch, captured.args).item()

    together = loss_of(collate(rows, pad_id=0))
    alone = [loss_of(collate([row], pad_id=0)) for row in rows]
    assert together == pytest.approx((3 * alone[0] + 2 * alone[1]) / 5, rel=1e-5)
    assert alone[0] > 0 and alone[1] > 0


def test_a_teacher_map_on_another_grid_is_resampled_to_the_students():
    coarse = torch.tensor([[0.7, 0.1], [0.1, 0.1]])
    fine = on_grid(coarse, 4, 4).view(4, 4)
    assert fine.sum().item() == pytest.approx(1.0)
    assert fine[:2, :2].sum() > 0.5 and fine[:2, :2].sum() > 3 * fine[2:, 2:].sum()
    assert torch.equal(on_grid(coarse, 2, 2), coarse.flatten())


def test_look_needs_isolated_turns_and_a_lookup_teacher():
    recipe = load_recipe("eve-vqa")  # it shows every answer where to look
    assert recipe.align.teacher_head == "lookup" and all(stage.look > 0 for stage in recipe.stages)
    with pytest.raises(ConfigError, match="teacher_head"):
        load_recipe("eve-vqa", ["align.teacher_head=film"])
    load_recipe("eve-vqa", ["align.teacher_head=film", "stages.open.look=0", "stages.instruct.look=0"])
    with pytest.raises(ConfigError, match="isolate_turns"):
        load_recipe("eve-vqa", ["stages.instruct.isolate_turns=false"])
    with pytest.raises(ConfigError, match="teacher_head"):
        load_recipe("eve-vqa", ["align.teacher_head=attention"])
    with pytest.raises(ConfigError, match="qa"):
        load_recipe("eve-vqa", ["align.teacher_objective=mae"])
    with pytest.raises(ConfigError, match="look"):
        load_recipe("eve-vqa", ["stages.open.look=-1"])
