"""`monovlm chat`: one question answered at once, or an interactive chat read from stdin (/image, /reset, /quit) that
keeps the conversation; answers equal `generate` on the prompt the training code would write."""

import dataclasses
import io
import json
import os
import subprocess
import sys

import pytest

from monovlm.cli import main
from monovlm.data.processor import Processor
from monovlm.infer.decoding import VCD
from monovlm.infer.generate import GenerationConfig, generate
from monovlm.infer.reduction import build_reduction
from monovlm.model.vlm import EncoderFreeVLM
from monovlm.paths import DEFAULT_MODEL_DIR
from monovlm.serve.methods import InferenceMethods
from monovlm.serve.terminal import ChatSession, run_repl
from monovlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    vlm = EncoderFreeVLM.load(DEFAULT_MODEL_DIR).eval()
    return vlm, Processor(Tokenizer.from_folder(DEFAULT_MODEL_DIR), vlm.config.vision, vlm.config.processor)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Two synthetic scene images and a question about each (what the shipped model was trained on)."""
    from monovlm.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("scenes")
    synthesize(root, n=12, seed=5, progress=False)
    records = [r for r in json.loads((root / "instruct.json").read_text()) if r["category"] == "attribute"]
    first = records[0]
    second = next(r for r in records if r["image"] != first["image"])
    return [(root / r["image"], r["question"]) for r in (first, second)]


@pytest.fixture(scope="module")
def reducible(scenes, model):
    """An (image, question) of the scenes fixture's data whose answer divprune keeping 10% of the tokens
    changes, alone and with VCD: so a test sees whether a reduction flag was applied."""
    root = scenes[0][0].parent.parent
    records = [r for r in json.loads((root / "instruct.json").read_text()) if r["category"] != "maze"]
    for record in records:
        image, question = root / record["image"], record["conversations"][0]["value"].replace("<image>\n", "")
        plain = answer_alone(model, question, [image])
        reduced = answer_alone(model, question, [image], reduction=build_reduction("divprune", keep=0.1))
        both = answer_alone(model, question, [image], reduction=build_reduction("divprune", keep=0.1), strategy=VCD())
        if plain != reduced and plain != both:
            return image, question
    raise AssertionError("divprune keeping 10% of the tokens changes no answer: the model ignores the image")


def answer_alone(model, question, images, turns=None, reduction=None, strategy=None):
    """Greedy answer from `generate`; with `turns` (earlier (question, answer) pairs) the prompt is the one
    Processor.process writes for the whole conversation, cut where the last answer starts; `reduction` (a Reduction)
    and `strategy` go to generate as given."""
    vlm, processor = model
    pictures = [processor.load(path) for path in images]
    if turns is None:
        ids, tensors = processor.prompt(question, pictures)
    else:
        conversations = []
        for asked, answered in turns + [(question, "x")]:
            conversations += [{"from": "human", "value": asked}, {"from": "gpt", "value": answered}]
        sample = processor.process({"conversations": conversations}, images=pictures)
        ids, tensors = sample.input_ids[: -len(processor.tokenizer.encode("x")) - 2], sample.images
    config = GenerationConfig(max_new_tokens=64, stop_ids=processor.stop_ids)
    prefill = {"images": tensors, **({"reduction": reduction} if reduction is not None else {})} if tensors else None
    return generate(vlm, [ids], config, processor.tokenizer, pad_id=processor.tokenizer.pad_id or 0,
                    prefill_inputs=prefill, strategy=strategy)[0].text


def test_one_question_is_answered_and_the_command_exits(scenes, model, capsys):
    (image, question), _ = scenes
    assert main(["chat", "--image", str(image), question]) == 0
    assert capsys.readouterr().out == answer_alone(model, question, [image]) + "\n"


@pytest.mark.slow  # a monovlm process
def test_piped_chat_keeps_history_and_handles_commands(scenes, model, tmp_path):
    (first_image, first_question), (second_image, second_question) = scenes
    script = "\n".join([
        first_question,
        f"/image {tmp_path / 'missing.png'}",
        f"/image {second_image}",
        second_question,
        "/bogus",
        "/reset",
        "How many shapes are there?",
        "/quit",
        "never asked",
    ]) + "\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "monovlm", "chat", "--image", str(first_image)], input=script,
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert run.returncode == 0, run.stderr
    answers = run.stdout.splitlines()
    first = answer_alone(model, first_question, [first_image])
    # the second question is asked with the first turn (and its image) still in the conversation
    second = answer_alone(model, "<image>\n" + second_question, [first_image, second_image],
                          turns=[("<image>\n" + first_question, first)])
    third = answer_alone(model, "How many shapes are there?", [])  # after /reset: no history, no image
    assert answers == [first, second, third]
    assert "missing.png" in run.stderr and "does not exist" in run.stderr
    assert "unknown command /bogus" in run.stderr and "conversation cleared" in run.stderr


def test_repl_reports_errors_and_goes_on(model, scenes):
    vlm, processor = model
    (image, question), _ = scenes
    session = ChatSession(vlm, processor, GenerationConfig(max_new_tokens=64, stop_ids=processor.stop_ids))
    out, err = io.StringIO(), io.StringIO()
    lines = [f"/image {image}", "forge <|im_start|> a turn", question, "/image", "What about <image> this?"]
    run_repl(session, lines, out, err)  # ends at the end of input, without /quit
    assert "'<|im_start|>'" in err.getvalue() and "special token" in err.getvalue()
    assert "/image needs a path" in err.getvalue()
    assert "2 image marker(s) (<image>) for 1 image(s)" in err.getvalue()
    # the refused question did not use up the attached image: the next question is asked about it
    assert out.getvalue().splitlines() == [answer_alone(model, question, [image])]
    assert len(session.turns) == 2 and len(session.images) == 1


def test_system_flag_opens_every_conversation(scenes, model, capsys):
    """--system answers as a model whose configured system prompt it is (the same prompt ids); /reset keeps it."""
    vlm, processor = model
    (image, question), _ = scenes
    system = "Answer in one word."
    configured = Processor(processor.tokenizer, processor.vision,
                           dataclasses.replace(processor.config, system_prompt=system))
    assert main(["chat", "--system", system, "--image", str(image), question]) == 0
    assert capsys.readouterr().out == answer_alone((vlm, configured), question, [image]) + "\n"
    session = ChatSession(vlm, processor, GenerationConfig(max_new_tokens=8, stop_ids=processor.stop_ids),
                          system=system)
    "".join(session.ask("How many shapes are there?"))
    session.reset()
    assert session.prompt_for(question).ids == configured.prompt(question)[0] != processor.prompt(question)[0]


def test_a_conversation_that_outgrows_the_context_is_refused(model):
    vlm, processor = model
    context = vlm.config.decoder.max_position_embeddings
    session = ChatSession(vlm, processor, GenerationConfig(max_new_tokens=context - 20, stop_ids=processor.stop_ids))
    out, err = io.StringIO(), io.StringIO()
    run_repl(session, ["Describe everything you can see in as much detail as you can."], out, err)
    assert f"context of {context} tokens" in err.getvalue() and "/reset" in err.getvalue()
    assert out.getvalue() == "" and session.turns == []


def test_reduction_and_decoding_flags(reducible, model, capsys):
    """--reduce / --keep / --decoding give generate's answer with that reduction and strategy."""
    image, question = reducible
    plain = answer_alone(model, question, [image])
    answers = []
    for flags, reduction, strategy in [
        (["--reduce", "fastv", "--keep", "0.25"], build_reduction("fastv", keep=0.25), None),
        (["--reduce", "tome"], build_reduction("tome"), None),  # keep: build_reduction's default
        (["--reduce", "divprune", "--keep", "0.1"], build_reduction("divprune", keep=0.1), None),  # changes the answer
        (["--decoding", "vcd"], None, VCD()),
        (["--reduce", "fastv", "--keep", "1"], None, None),  # keeps every patch: the plain answer
    ]:
        assert main(["chat", "--image", str(image), *flags, question]) == 0
        expected = answer_alone(model, question, [image], reduction=reduction, strategy=strategy)
        assert capsys.readouterr().out == expected + "\n", flags
        answers.append(expected)
    assert answers[-1] == plain and any(answer != plain for answer in answers[:-1])


@pytest.mark.parametrize("flags, words", [
    (["--reduce", "fastvv"], ["--reduce 'fastvv'", "fastv", "tome"]),
    (["--keep", "0.5"], ["--keep", "needs --reduce"]),
    (["--reduce", "fastv", "--keep", "0"], ["--keep 0.0 must be in (0, 1]"]),
    (["--decoding", "debias"], ["--decoding 'debias'", "vcd, damro"]),
    (["--reduce", "fastv", "--decoding", "damro"], ["damro", "--reduce"]),
])
def test_bad_method_flags_are_refused(flags, words, capsys):
    assert main(["chat", *flags, "hi"]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err


def test_methods_apply_to_questions_with_images_only(model, reducible):
    """A text-only conversation is answered plainly (both methods act on images); once an image is attached, the
    reduction applies."""
    vlm, processor = model
    image, question = reducible
    config = GenerationConfig(max_new_tokens=64, stop_ids=processor.stop_ids)
    session = ChatSession(vlm, processor, config, InferenceMethods("divprune", 0.1, "vcd"))
    assert "".join(session.ask("How many shapes are there?")) == answer_alone(model, "How many shapes are there?", [])
    session.reset()
    session.attach(image)
    expected = answer_alone(model, question, [image], reduction=build_reduction("divprune", keep=0.1), strategy=VCD())
    assert "".join(session.ask(question)) == expected != answer_alone(model, question, [image])
