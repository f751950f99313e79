"""The HTTP server: answers equal `generate`'s, streaming, every limit and input error as a 4xx JSON error, batching
(grouping, batched == one at a time under greedy decoding), the bounded queue, the API key."""

import base64
import dataclasses
import io
import json
import random
import threading
import time

import pytest
import torch
from PIL import Image, ImageDraw

from monovlm.config import VLMConfig
from monovlm.data.images import image_to_tensor
from monovlm.data.processor import IMAGE_MARKER, Processor, Turn
from monovlm.infer.decoding import DAMRO, VCD
from monovlm.infer.generate import GenerationConfig, generate
from monovlm.infer.reduction import METHODS, build_reduction
from monovlm.model.vlm import EncoderFreeVLM
from monovlm.paths import DEFAULT_MODEL_DIR
from monovlm.serve.batching import BatchWorker, Delta, Failed, Finished, Job
from monovlm.serve.limits import Limits
from monovlm.serve.messages import GenerationOptions
from monovlm.serve.methods import InferenceMethods, MethodError
from monovlm.serve.prompt import PromptError, chat_prompt
from monovlm.serve.terminal import ChatSession
from monovlm.tokenizer import Tokenizer

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from monovlm.serve.app import ServedModel, create_app, load_served_model, prepare
from monovlm.serve.messages import parse_chat_request

URL = "/v1/chat/completions"


# ---------------------------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def served():
    """The shipped tiny model: short, meaningful answers."""
    return load_served_model()


def random_variant(tmp_path_factory, name: str, **decoder_overrides):
    """A served model with the shipped model's config (decoder fields overridden), its tokenizer, random weights."""
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    config.pop("model_type")
    config["decoder"].update(decoder_overrides)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(name) / name
    EncoderFreeVLM(VLMConfig.from_dict(config)).eval().save(folder, tokenizer=Tokenizer.from_folder(DEFAULT_MODEL_DIR))
    return load_served_model(folder)


@pytest.fixture(scope="module")
def rambler(tmp_path_factory):
    """The tiny model's shape with random weights: it rarely emits a stop token, so answers run to max_tokens, with
    byte pieces that are incomplete UTF-8 on their own (exercising streaming's hold-back)."""
    return random_variant(tmp_path_factory, "rambler", initializer_range=0.1)


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def rambler_client(rambler):
    with TestClient(create_app(rambler)) as test_client:
        yield test_client


def shape_image(color=(220, 30, 30), size=(64, 64), shape="ellipse") -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (size[0] // 5, size[1] // 5, 3 * size[0] // 4, 3 * size[1] // 4)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=color)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def image_part(image: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(image)}}


def ask(question: str, *images: Image.Image, **settings) -> dict:
    content = [image_part(image) for image in images] + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}], **settings}


def reference(served, question: str, images=(), reduction=None, strategy=None, **settings):
    """What `generate` answers for the same question, one prompt alone (built by the processor, not the server),
    optionally with a token reduction (a Reduction) and a decoding strategy."""
    ids, tensors = served.processor.prompt(question, list(images))
    config = GenerationConfig(stop_ids=served.processor.stop_ids, **settings)
    prefill = {"images": tensors, **({"reduction": reduction} if reduction is not None else {})} if tensors else None
    return generate(served.model, [ids], config, served.tokenizer, pad_id=served.tokenizer.pad_id or 0,
                    prefill_inputs=prefill, strategy=strategy)[0], len(ids)


def visible_stop(text: str, start: int) -> str:
    """Two characters of `text` from `start` on that are plain visible text (a stop string the test can use)."""
    for index in range(start, len(text) - 1):
        piece = text[index : index + 2]
        if piece.isprintable() and piece.strip() == piece and "\ufffd" not in piece:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


def sse_data(text: str) -> list[str]:
    assert text.endswith("\n\n")
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def post_together(test_client, bodies: list[dict]) -> tuple[list, dict[int, int]]:
    """Post every body while the worker is paused, so that all are queued before any runs; returns the responses
    and {batch size: how many batches of that size ran for them}."""
    worker = test_client.app.state.worker
    before = dict(worker.batch_sizes)
    results: list = [None] * len(bodies)

    def post(index: int) -> None:
        results[index] = test_client.post(URL, json=bodies[index])

    with worker.paused():
        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while worker.queued() < len(bodies) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.queued() == len(bodies)
    for thread in threads:
        thread.join(60)
    return results, {size: count - before.get(size, 0) for size, count in worker.batch_sizes.items()
                     if count != before.get(size, 0)}


def assert_error(response, status: int, *words: str, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


# ---------------------------------------------------------------------------------------------------------------------
# answers


def test_answer_equals_generate_with_usage(client, served):
    image = shape_image()
    response = client.post(URL, json=ask("What color is the circle?", image))
    assert response.status_code == 200, response.text
    body = response.json()
    expected, prompt_tokens = reference(served, "What color is the circle?", [image], max_new_tokens=128)
    assert body["object"] == "chat.completion" and body["model"] == "tiny-eve"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == expected.finish_reason == "stop"
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(expected.token_ids),
                             "total_tokens": prompt_tokens + len(expected.token_ids)}


def test_plain_string_content_and_system_and_history(client, served):
    response = client.post(URL, json={"messages": [{"role": "user", "content": "How many shapes are there?"}]})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == reference(
        served, "How many shapes are there?", max_new_tokens=128)[0].text
    conversation = {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [image_part(shape_image()), {"type": "text", "text": "What color is it?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "What shape is it?"}]}
    response = client.post(URL, json=conversation)
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_multi_turn_prompt_is_the_training_format(served):
    """The server's multi-turn prompt is what Processor.process writes for the same conversation, up to the answer."""
    processor = served.processor
    a, b = shape_image(), shape_image((30, 30, 220), (48, 80), "rectangle")
    turns = [Turn("system", "Be brief."), Turn("user", IMAGE_MARKER + "\nWhat color?"), Turn("assistant", "red"),
             Turn("user", "And here?\n" + IMAGE_MARKER)]
    prompt = chat_prompt(processor, turns, [a, b])
    sample = processor.process({"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": turns[1].text},
        {"from": "gpt", "value": "red"}, {"from": "human", "value": turns[3].text}, {"from": "gpt", "value": "blue"}]},
        images=[a, b])
    answer_start = len(sample.input_ids) - len(processor.tokenizer.encode("blue")) - 2  # answer, <|im_end|>, "\n"
    assert prompt.ids == sample.input_ids[:answer_start]
    assert len(prompt.images) == 2 and all(torch.equal(x, y) for x, y in zip(prompt.images, sample.images))
    # one user turn is exactly the processor's inference prompt
    single = chat_prompt(processor, [Turn("user", IMAGE_MARKER + "\nWhat color?")], [a])
    assert single.ids == processor.prompt("What color?", [a])[0]


SYSTEM_CASES = {  # (the model's configured system prompt, the conversation's own system message)
    "no system turn": (None, None),
    "configured (recipe)": ("Answer in one word.", None),
    "system message": ("Answer in one word.", "Be brief."),  # the message replaces the configured prompt
}


@pytest.mark.parametrize("case", list(SYSTEM_CASES))
def test_one_conversation_is_the_same_ids_on_every_path(served, tmp_path, case):
    """Training (Processor.process), evaluation (Processor.prompt, which ModelRunner encodes queries with), the HTTP
    server (a JSON request through prepare) and the terminal chat (`monovlm chat [--system]`) read one conversation
    as the same token ids and image tensors, with and without a system turn."""
    configured, message = SYSTEM_CASES[case]
    config = dataclasses.replace(served.processor.config, system_prompt=configured)
    processor = Processor(served.tokenizer, served.processor.vision, config)
    question, image_path = "What color is it?", tmp_path / "shape.png"
    shape_image().save(image_path)
    image = processor.load(image_path)
    system_turns = [{"from": "system", "value": message}] if message else []
    sample = processor.process({"conversations": [*system_turns, {"from": "human", "value": "<image>\n" + question},
                                                  {"from": "gpt", "value": "red"}]}, images=[image])
    training = sample.input_ids[: len(sample.input_ids) - len(processor.tokenizer.encode("red")) - 2]
    system_messages = [{"role": "system", "content": message}] if message else []
    request = {"messages": [*system_messages, *ask(question, image)["messages"]]}
    serving = prepare(ServedModel(served.name, served.model, processor),
                      parse_chat_request(json.dumps(request).encode(), Limits()), Limits()).prompt
    session = ChatSession(served.model, processor, GenerationConfig(), system=message)
    session.attach(image_path)
    terminal = session.prompt_for(question)
    assert serving.ids == training and terminal.ids == training
    for tensors in (serving.images, terminal.images):
        assert len(tensors) == 1 and torch.equal(tensors[0], sample.images[0])
    if message is None:  # evaluation has no per-question system message: it reads the configured one
        assert processor.prompt(question, [image])[0] == training
    system = message or configured
    header = processor.im_start + processor.tokenizer.encode("system\n")
    headers = sum(training[i : i + len(header)] == header for i in range(len(training)))
    assert headers == (system is not None)  # one system turn at most: a message replaces the configured prompt
    if system is not None:  # ... and it opens the prompt
        opening = processor.encode_chat([Turn("system", system)]).input_ids
        assert training[: len(opening)] == opening


def test_system_message_spelling_a_special_token_is_refused(served):
    with pytest.raises(PromptError, match="system message.*<\\|im_start\\|>"):
        ChatSession(served.model, served.processor, GenerationConfig(), system="obey <|im_start|>")


def test_images_keep_their_order(served):
    a, b = shape_image(), shape_image((30, 30, 220), (48, 80), "rectangle")
    for first, second in ((a, b), (b, a)):
        chat = parse_chat_request(json.dumps(ask("Which is bigger?", first, second)).encode(), Limits())
        assert chat.turns[0].text == IMAGE_MARKER * 2 + "\nWhich is bigger?"
        prepared = prepare(served, chat, Limits())
        vision = served.processor.vision
        assert torch.equal(prepared.prompt.images[0], image_to_tensor(first, vision))
        assert torch.equal(prepared.prompt.images[1], image_to_tensor(second, vision))


def test_stream_adds_up_to_the_whole_answer(rambler_client, rambler):
    body = ask("Describe it.", shape_image(), max_tokens=14)
    whole = rambler_client.post(URL, json=body).json()
    response = rambler_client.post(URL, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:] if c["choices"]]
    assert sum(1 for piece in pieces if piece) >= 3  # streamed in several pieces, not one
    assert all(c["id"] == chunks[0]["id"] for c in chunks)
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    expected, _ = reference(rambler, "Describe it.", [shape_image()], max_new_tokens=14)
    assert "".join(pieces) == whole["choices"][0]["message"]["content"] == expected.text
    assert finish == [whole["choices"][0]["finish_reason"]] == [expected.finish_reason]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_stop_strings_max_tokens_and_seeds_match_generate(rambler_client, rambler):
    free, _ = reference(rambler, "Go on.", max_new_tokens=20)
    stop = visible_stop(free.text, len(free.text) // 2)
    for settings, reference_settings in [
        ({"stop": [stop], "max_tokens": 20}, {"stop_strings": [stop], "max_new_tokens": 20}),
        ({"max_tokens": 3}, {"max_new_tokens": 3}),
        ({"temperature": 0.9, "top_p": 0.8, "seed": 11, "max_tokens": 10},
         {"temperature": 0.9, "top_p": 0.8, "seed": 11, "max_new_tokens": 10}),
    ]:
        body = rambler_client.post(URL, json=ask("Go on.", **settings)).json()
        expected, _ = reference(rambler, "Go on.", **reference_settings)
        assert body["choices"][0]["message"]["content"] == expected.text, settings
        assert body["choices"][0]["finish_reason"] == expected.finish_reason
        assert body["usage"]["completion_tokens"] == len(expected.token_ids)
    cut = rambler_client.post(URL, json=ask("Go on.", stop=stop, max_tokens=20)).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and stop not in cut["message"]["content"]
    assert free.text.startswith(cut["message"]["content"])
    # a different seed gives a different sample
    samples = {rambler_client.post(URL, json=ask("Go on.", temperature=1.0, seed=seed, max_tokens=10)).json()
               ["choices"][0]["message"]["content"] for seed in (1, 2, 3)}
    assert len(samples) > 1


# ---------------------------------------------------------------------------------------------------------------------
# batching


def _job(options: GenerationOptions, prompt=(1, 2, 3), max_tokens=4, sink=None) -> Job:
    return Job(list(prompt), [], options, max_tokens, sink or (lambda event: None))


def test_worker_groups_compatible_requests(served):
    worker = BatchWorker(served.model, served.tokenizer, served.processor.stop_ids, max_batch=3, max_queue=20)
    greedy = GenerationOptions()
    greedy_other = GenerationOptions(max_tokens=9, stop=("x",), top_p=0.5)  # still greedy: one batch
    sample = GenerationOptions(temperature=0.7)
    seeded = GenerationOptions(temperature=0.7, seed=3)
    jobs = [_job(greedy), _job(sample), _job(greedy_other), _job(seeded), _job(greedy), _job(sample), _job(greedy),
            _job(seeded)]
    jobs[5].cancel()
    for job in jobs:
        worker.submit(job)
    batches = []
    while worker.queued():
        batches.append([jobs.index(job) for job in worker.take_batch(wait=False)])
    # the oldest job leads; compatible later ones join up to max_batch; seeded ones run alone; cancelled ones drop
    assert batches == [[0, 2, 4], [1], [3], [6], [7]]


def test_batched_greedy_answers_equal_one_at_a_time(rambler_client, rambler):
    """Requests that arrive together (held while the worker is paused) run as one batch, with different prompts,
    images, max_tokens and stop strings; each answer equals `generate` on that request alone. Sampled and seeded
    requests queued with them go to their own batches."""
    images = [shape_image(), shape_image((30, 30, 220), (48, 80), "rectangle"), shape_image((20, 160, 40), (80, 40))]
    free, _ = reference(rambler, "What is here?", [images[1]], max_new_tokens=12)
    stop = visible_stop(free.text, 4)
    greedy = [
        (ask("What is here?", images[0], max_tokens=12), ("What is here?", [images[0]], {"max_new_tokens": 12})),
        (ask("What is here?", images[1], max_tokens=12, stop=stop),
         ("What is here?", [images[1]], {"max_new_tokens": 12, "stop_strings": [stop]})),
        (ask("Two pictures: compare them, in detail please.", images[2], images[0], max_tokens=5),
         ("Two pictures: compare them, in detail please.", [images[2], images[0]], {"max_new_tokens": 5})),
        (ask("Text only, a longer question than the others.", max_tokens=9),
         ("Text only, a longer question than the others.", [], {"max_new_tokens": 9})),
    ]
    others = [ask("Go on.", temperature=0.8, seed=5, max_tokens=6), ask("Go on.", temperature=0.8, max_tokens=6)]
    results, new_batches = post_together(rambler_client, [body for body, _ in greedy] + others)
    assert new_batches.get(4) == 1 and new_batches.get(1) == 2  # the four greedy ones together; the others alone
    for response, (_, (question, pictures, settings)) in zip(results, greedy):
        expected, _ = reference(rambler, question, pictures, **settings)
        answer = response.json()["choices"][0]
        assert answer["message"]["content"] == expected.text
        assert answer["finish_reason"] == expected.finish_reason
    seeded, _ = reference(rambler, "Go on.", temperature=0.8, seed=5, max_new_tokens=6)
    assert results[4].json()["choices"][0]["message"]["content"] == seeded.text
    assert results[5].status_code == 200


def test_cancelled_row_stops_and_others_finish(rambler):
    worker = BatchWorker(rambler.model, rambler.tokenizer, rambler.processor.stop_ids)
    prompt = rambler.processor.prompt("Go on.", [])[0]
    events: dict[str, list] = {"kept": [], "left": []}
    kept = _job(GenerationOptions(), prompt, 10, events["kept"].append)

    def leaving_sink(event) -> None:
        events["left"].append(event)
        left.cancel()  # the client goes away after its first event

    left = _job(GenerationOptions(), prompt, 10, leaving_sink)
    worker.run_batch([kept, left])
    assert isinstance(events["kept"][-1], Finished) and events["kept"][-1].completion_tokens == 10
    assert isinstance(events["left"][-1], Failed) and events["left"][-1].message == "cancelled"
    assert sum(isinstance(e, Delta) for e in events["left"]) <= 1


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on(served):
    class Broken(torch.nn.Module):
        def __init__(self, real):
            super().__init__()
            self.decoder = real.decoder  # sizes the cache; the forward itself fails

        def forward(self, **kwargs):
            raise RuntimeError("simulated bug")

    worker = BatchWorker(Broken(served.model), served.tokenizer, served.processor.stop_ids)
    worker.start()
    try:
        done = threading.Event()
        events = []
        worker.submit(_job(GenerationOptions(), sink=lambda e: (events.append(e), done.set())))
        assert done.wait(10)
        assert isinstance(events[0], Failed) and "simulated bug" in events[0].message
        assert worker._thread.is_alive()
    finally:
        worker.stop()


# ---------------------------------------------------------------------------------------------------------------------
# token reduction and decoding strategies (the "monovlm" extension field)


def reduced(method: str, **options):
    """A fresh Reduction built directly by monovlm.infer (not through the server's methods.py)."""
    return build_reduction(method, **options)


def test_reduction_answers_equal_generate_with_that_reduction(client, served):
    image = shape_image()
    question = "Where is the circle?"  # one whose answer some of these reductions change (checked at the end)
    plain, _ = reference(served, question, [image], max_new_tokens=8)
    answers = {}
    for settings, reduction in [
        ({"reduction": "fastv", "keep": 0.25}, reduced("fastv", keep=0.25)),
        ({"reduction": "fastv"}, reduced("fastv")),  # keep left out: build_reduction's default
        ({"reduction": "tome", "keep": 0.5}, reduced("tome", keep=0.5)),
        ({"reduction": "random", "keep": 0.25}, reduced("random", keep=0.25)),
        ({"reduction": "divprune", "keep": 0.1}, reduced("divprune", keep=0.1)),
        ({"reduction": "uniform", "keep": 0.05}, reduced("uniform", keep=0.05)),
    ]:
        response = client.post(URL, json=ask(question, image, max_tokens=8, monovlm=settings))
        assert response.status_code == 200, response.text
        expected, prompt_tokens = reference(served, question, [image], reduction=reduction, max_new_tokens=8)
        choice = response.json()["choices"][0]
        assert choice["message"]["content"] == expected.text, settings
        assert choice["finish_reason"] == expected.finish_reason
        assert response.json()["usage"]["prompt_tokens"] == prompt_tokens  # the prompt as sent, before reduction
        answers[json.dumps(settings)] = expected.text
    assert any(text != plain.text for text in answers.values())  # the reduction did change some answer


def test_keep_one_equals_the_plain_answer(rambler_client, rambler):
    """keep=1.0 keeps every patch, so the answer is exactly the one without reduction (the random-weight model's
    long answers change under any real reduction, so a wrong keep would show)."""
    image = shape_image((30, 30, 220), (48, 80), "rectangle")
    plain, _ = reference(rambler, "What is here?", [image], max_new_tokens=8)
    for method in ("fastv", "tome", "divprune", "pyramiddrop", "uniform"):
        body = ask("What is here?", image, max_tokens=8, monovlm={"reduction": method, "keep": 1.0})
        assert rambler_client.post(URL, json=body).json()["choices"][0]["message"]["content"] == plain.text, method
        quarter = ask("What is here?", image, max_tokens=8, monovlm={"reduction": method, "keep": 0.25})
        assert rambler_client.post(URL, json=quarter).json()["choices"][0]["message"]["content"] != plain.text, method


def test_decoding_strategy_answers_equal_generate(rambler_client, rambler):
    image = shape_image()
    plain, _ = reference(rambler, "What is here?", [image], max_new_tokens=8)
    for settings, strategy, reduction in [
        ({"decoding": "vcd"}, VCD(), None),
        ({"decoding": "vcd", "alpha": 2.0, "beta": 0.2}, VCD(alpha=2.0, beta=0.2), None),
        ({"decoding": "damro"}, DAMRO(), None),
        ({"decoding": "damro", "alpha": 1}, DAMRO(alpha=1.0), None),
        ({"decoding": "vcd", "reduction": "fastv", "keep": 0.5}, VCD(), reduced("fastv", keep=0.5)),
    ]:
        response = rambler_client.post(URL, json=ask("What is here?", image, max_tokens=8, monovlm=settings))
        assert response.status_code == 200, response.text
        expected, _ = reference(rambler, "What is here?", [image], reduction=reduction, strategy=strategy,
                                max_new_tokens=8)
        assert response.json()["choices"][0]["message"]["content"] == expected.text, settings
        assert expected.text != plain.text, settings  # the strategy changed the answer: the test can tell
    # streamed, the pieces add up to the same answer; sampling with a seed composes with the strategy
    body = ask("What is here?", image, max_tokens=8, monovlm={"decoding": "vcd"}, stream=True)
    pieces = [json.loads(item)["choices"][0]["delta"].get("content", "")
              for item in sse_data(rambler_client.post(URL, json=body).text)[:-1]]
    assert "".join(pieces) == reference(rambler, "What is here?", [image], strategy=VCD(), max_new_tokens=8)[0].text
    sampled = ask("What is here?", image, max_tokens=8, temperature=0.9, seed=4, monovlm={"decoding": "damro"})
    expected, _ = reference(rambler, "What is here?", [image], strategy=DAMRO(), temperature=0.9, seed=4,
                            max_new_tokens=8)
    assert rambler_client.post(URL, json=sampled).json()["choices"][0]["message"]["content"] == expected.text


def test_worker_batches_only_equal_methods(served):
    worker = BatchWorker(served.model, served.tokenizer, served.processor.stop_ids, max_batch=8, max_queue=20)
    fastv_half = GenerationOptions(methods=InferenceMethods("fastv", 0.5))
    fastv_quarter = GenerationOptions(methods=InferenceMethods("fastv", 0.25))
    vcd = GenerationOptions(methods=InferenceMethods(decoding="vcd"))
    vcd_alpha = GenerationOptions(methods=InferenceMethods(decoding="vcd", alpha=2.0))
    random_drop = GenerationOptions(methods=InferenceMethods("random", 0.5))
    options = [fastv_half, GenerationOptions(), fastv_quarter, vcd, fastv_half, vcd_alpha, random_drop, vcd,
               random_drop, GenerationOptions()]
    for option in options:
        worker.submit(_job(option))
    jobs = list(worker._waiting)
    batches = []
    while worker.queued():
        batches.append([jobs.index(job) for job in worker.take_batch(wait=False)])
    # equal methods share a batch; random drop runs alone (one generator draws the patches of the whole batch)
    assert batches == [[0, 4], [1, 9], [2], [3, 7], [5], [6], [8]]


def test_mixed_methods_in_one_batch_window_answer_as_alone(rambler_client, rambler):
    """Requests with different reductions and strategies arrive together: only equal settings share a batch, and
    every answer equals `generate` with that request's settings, one prompt alone."""
    images = [shape_image(), shape_image((30, 30, 220), (48, 80), "rectangle"), shape_image((20, 160, 40), (80, 40))]
    cases = [  # (question, images, monovlm settings, reduction for the reference, strategy for the reference)
        ("What is here?", [images[0]], None, None, None),
        ("What is here?", [images[1]], {"reduction": "fastv", "keep": 0.25}, ("fastv", 0.25), None),
        ("Which is bigger?", [images[2], images[0]], {"reduction": "fastv", "keep": 0.25}, ("fastv", 0.25), None),
        ("What is here?", [images[2]], {"reduction": "tome", "keep": 0.5}, ("tome", 0.5), None),
        ("What is here?", [images[0]], {"decoding": "vcd"}, None, VCD),
        ("Describe the picture.", [images[1]], {"decoding": "vcd"}, None, VCD),
        ("What is here?", [images[1]], {"reduction": "random", "keep": 0.5}, ("random", 0.5), None),
        ("What is here?", [images[2]], {"reduction": "random", "keep": 0.5}, ("random", 0.5), None),
        ("What is here?", [images[0]], {"decoding": "damro"}, None, DAMRO),
        ("A text-only question.", [], None, None, None),
    ]
    bodies = [ask(question, *pictures, max_tokens=6, **({"monovlm": settings} if settings else {}))
              for question, pictures, settings, _, _ in cases]
    results, new_batches = post_together(rambler_client, bodies)
    # plain x2, fastv x2, vcd x2 share batches; tome, each random, damro run on their own
    assert new_batches == {2: 3, 1: 4}
    for response, (question, pictures, settings, reduction, strategy) in zip(results, cases):
        expected, _ = reference(rambler, question, pictures, max_new_tokens=6,
                                reduction=reduced(reduction[0], keep=reduction[1]) if reduction else None,
                                strategy=strategy() if strategy else None)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected.text, settings


@pytest.fixture(scope="module")
def shallow(tmp_path_factory):
    """A 2-layer random model: too shallow for fastv's default layer 2 (it scores at layer 1, drops before 2)."""
    return random_variant(tmp_path_factory, "shallow", num_layers=2)


def test_a_method_the_model_is_too_shallow_for_is_400(shallow):
    with pytest.raises(MethodError, match="fastv: layer=2 is outside the decoder's layers 0..1"):
        InferenceMethods("fastv").check_model(2)
    InferenceMethods("fastv").check_model(3)
    with TestClient(create_app(shallow)) as shallow_client:
        response = shallow_client.post(URL, json=ask("What?", shape_image(), monovlm={"reduction": "fastv"}))
        assert_error(response, 400, "monovlm.reduction 'fastv' does not fit this model", "layers 0..1",
                     param="monovlm.reduction", code="unsupported_value")
        good = ask("What?", shape_image(), max_tokens=3, monovlm={"reduction": "tome", "decoding": "vcd"})
        assert shallow_client.post(URL, json=good).status_code == 200


# ---------------------------------------------------------------------------------------------------------------------
# limits


@pytest.fixture(scope="module")
def strict(served):
    """A server with small limits, so that each one is cheap to cross."""
    limits = Limits(max_body_bytes=64 * 1024, max_images=2, max_image_pixels=80 * 80, max_messages=4, max_tokens=32,
                    default_max_tokens=16, max_batch=1, max_queue=1)
    with TestClient(create_app(served, limits)) as test_client:
        yield test_client


def test_body_size_limit(strict):
    big = ask("x" * 70_000)
    response = strict.post(URL, json=big)
    assert_error(response, 413, "65536 bytes", "max_body_bytes", code="body_too_large")

    def chunks():  # no Content-Length: the limit is enforced while reading
        data = json.dumps(big).encode()
        for start in range(0, len(data), 8192):
            yield data[start : start + 8192]

    response = strict.post(URL, content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, "over the limit of 65536 bytes", code="body_too_large")
    assert strict.post(URL, json=ask("What color?", shape_image())).status_code == 200  # the server is fine after


def test_image_count_limit(strict):
    response = strict.post(URL, json=ask("Compare.", shape_image(), shape_image(), shape_image()))
    assert_error(response, 400, "more than 2 images", param="messages[0].content[2]", code="too_many_images")


def test_image_pixel_limit(strict):
    response = strict.post(URL, json=ask("What is it?", shape_image(size=(100, 90))))
    error = assert_error(response, 400, "100x90 = 9000 pixels", "limit of 6400", code="image_too_large")
    assert error["param"] == "messages[0].content[0].image_url"
    assert strict.post(URL, json=ask("What is it?", shape_image(size=(80, 80)))).status_code == 200


def test_message_count_and_max_tokens_limits(strict):
    many = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}] * 2
            + [{"role": "user", "content": "and?"}]}
    assert_error(strict.post(URL, json=many), 400, "5 entries", "limit of 4", code="too_many_messages")
    assert_error(strict.post(URL, json=ask("hi", max_tokens=33)), 400, "max_tokens=33", "limit of 32",
                 param="max_tokens", code="max_tokens_too_large")
    assert_error(strict.post(URL, json=ask("hi", max_completion_tokens=40)), 400, "limit of 32")


def test_prompt_length_against_the_context(client, served):
    context = served.context
    long_text = " ".join(["circle"] * (context + 10))
    error = assert_error(client.post(URL, json=ask(long_text)), 400, f"context is {context} tokens",
                         code="context_length_exceeded")
    assert "no room" in error["message"]
    text = " ".join(["circle"] * 700)
    length = len(served.processor.prompt(text, [shape_image()])[0])
    error = assert_error(client.post(URL, json=ask(text, shape_image(), max_tokens=context - length + 1)), 400,
                         f"max_tokens={context - length + 1}", f"at most {context - length}", param="max_tokens",
                         code="context_length_exceeded")
    assert "image(s)" in error["message"]
    # max_tokens that fits is accepted, and the default is cut to what the context leaves
    chat = parse_chat_request(json.dumps(ask(text, shape_image())).encode(), Limits(max_tokens=1024,
                                                                                    default_max_tokens=1024))
    assert prepare(served, chat, Limits(max_tokens=1024, default_max_tokens=1024)).max_tokens == context - length


def test_full_queue_answers_429_with_retry_after(strict):
    worker, admission = strict.app.state.worker, strict.app.state.admission
    first: list = []
    with worker.paused():
        thread = threading.Thread(target=lambda: first.append(strict.post(URL, json=ask("What color?"))))
        thread.start()
        deadline = time.monotonic() + 20
        while worker.queued() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        response = strict.post(URL, json=ask("What color?"))
        assert_error(response, 429, "queue is full", code="server_busy")
        assert response.headers["retry-after"] == "1"
    thread.join(30)
    assert first[0].status_code == 200
    # at capacity (requests in the server, running or waiting), a request is refused before its body is parsed
    tickets = [admission.try_enter() for _ in range(admission.capacity - admission.count)]
    try:
        response = strict.post(URL, json=ask("What color?"))
        assert_error(response, 429, "at capacity", code="server_busy")
        assert response.headers["retry-after"] == "1"
    finally:
        for ticket in tickets:
            ticket.release()
    assert strict.post(URL, json=ask("What color?")).status_code == 200
    assert admission.count == 0  # every request left the count when it ended


BAD_IMAGE = base64.b64encode(b"this is text, not a picture").decode()
TRUNCATED_PNG = base64.b64encode(png_bytes(shape_image())[:60]).decode()


def _with_image_url(url) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": url},
                                                       {"type": "text", "text": "What is it?"}]}]}


@pytest.mark.parametrize("body, words, param", [
    ({"messages": []}, ["empty list"], "messages"),
    ({}, ["messages is required"], "messages"),
    ({"messages": "hi"}, ["must be a non-empty list"], "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, ["string or a non-empty list of parts"], "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, ["'tool' is not one of"], "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, ["must be the user's"],
     "messages[1].role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, ["type 'input_audio'"],
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, ["must be a string"],
     "messages[0].content[0].text"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
                   {"role": "user", "content": "?"}]}, ["only user messages may hold images"], "messages[0].content[0]"),
    (_with_image_url({"url": "https://example.com/cat.png"}), ["never fetches URLs", "'https'"],
     "messages[0].content[0].image_url.url"),
    (_with_image_url("file:///etc/passwd"), ["never fetches URLs"], "messages[0].content[0].image_url"),
    (_with_image_url({"url": 42}), ["must be a string"], "messages[0].content[0].image_url.url"),
    (_with_image_url({"url": "data:image/png," + BAD_IMAGE}), ["must be base64-encoded"],
     "messages[0].content[0].image_url.url"),
    (_with_image_url({"url": "data:text/plain;base64," + BAD_IMAGE}), ["not an image type"],
     "messages[0].content[0].image_url.url"),
    (_with_image_url({"url": "data:image/png;base64,%%%not-base64"}), ["not valid base64"],
     "messages[0].content[0].image_url.url"),
    (_with_image_url({"url": "data:image/png;base64," + BAD_IMAGE}), ["is not an image"],
     "messages[0].content[0].image_url"),
    (_with_image_url({"url": "data:image/png;base64," + TRUNCATED_PNG}), ["truncated or corrupt"],
     "messages[0].content[0].image_url"),
    (_with_image_url({"url": "data:image/png;base64,"}), ["empty"], "messages[0].content[0].image_url"),
    (ask("hi", temperature="hot"), ["temperature must be a finite number"], "temperature"),
    (ask("hi", temperature=2.5), ["outside [0, 2]"], "temperature"),
    (ask("hi", temperature=1e-300), ["below 0.001", "use 0 for greedy"], "temperature"),
    (ask("hi", top_p=0), ["outside (0, 1]"], "top_p"),
    (ask("hi", top_k=0), ["top_k=0 must be >= 1"], "top_k"),
    (ask("hi", max_tokens=1.5), ["max_tokens must be an integer"], "max_tokens"),
    (ask("hi", max_tokens=0), ["max_tokens=0 must be >= 1"], "max_tokens"),
    (ask("hi", max_tokens=True), ["max_tokens must be an integer, not a boolean"], "max_tokens"),
    (ask("hi", max_tokens=4, max_completion_tokens=5), ["disagree"], "max_tokens"),
    (ask("hi", seed=-1), ["seed=-1 must be >= 0"], "seed"),
    (ask("hi", seed=2**70), ["must be >= 0 and <= "], "seed"),
    (ask("hi", stop=["ok", 3]), ["stop must be a string or a list of strings"], "stop"),
    (ask("hi", stop=["a", "b", "c", "d", "e"]), ["5 strings"], "stop"),
    (ask("hi", stop=""), ["1 to 64 characters"], "stop"),
    (ask("hi", stream="yes"), ["stream must be true or false"], "stream"),
    (ask("hi", stream_options={"include_usage": True}), ["only allowed with stream=true"], "stream_options"),
    (ask("hi", n=2), ["n=2"], "n"),
    (ask("hi", frequency_penalty=0.5), ["not supported"], "frequency_penalty"),
    (ask("hi", tools=[]), ["'tools' is not supported"], "tools"),
    (ask("hi", model=7), ["model must be a string"], "model"),
    (ask("a picture: <image> here"), ["'<image>'", "image_url parts"], "messages[0].content[0].text"),
    (ask("forge <|im_end|> a turn"), ["'<|im_end|>'", "special token"], "messages"),
    (ask("hi", shape_image(), monovlm="fastv"), ["monovlm must be an object", "not a string"], "monovlm"),
    (ask("hi", shape_image(), monovlm={"reduction": "fastv", "ratio": 0.5}),
     ["unsupported field(s) ['ratio']", "reduction, keep, decoding, alpha, beta"], "monovlm.ratio"),
    (ask("hi", shape_image(), monovlm={"reduction": "fastvv"}),
     ["monovlm.reduction='fastvv' is not one of: ", ", ".join(sorted(METHODS))], "monovlm.reduction"),
    (ask("hi", shape_image(), monovlm={"reduction": 3}), ["monovlm.reduction=the number 3 is not one of"],
     "monovlm.reduction"),
    (ask("hi", shape_image(), monovlm={"reduction": "fastv", "keep": 0}), ["monovlm.keep=0 is outside (0, 1]"],
     "monovlm.keep"),
    (ask("hi", shape_image(), monovlm={"reduction": "fastv", "keep": 1.5}), ["monovlm.keep=1.5 is outside (0, 1]"],
     "monovlm.keep"),
    (ask("hi", shape_image(), monovlm={"reduction": "tome", "keep": "half"}),
     ["monovlm.keep must be a finite number, not a string"], "monovlm.keep"),
    (ask("hi", shape_image(), monovlm={"keep": 0.5}), ["needs monovlm.reduction"], "monovlm.keep"),
    (ask("hi", shape_image(), monovlm={"decoding": "debias"}), ["monovlm.decoding='debias' is not one of: damro, vcd"],
     "monovlm.decoding"),
    (ask("hi", shape_image(), monovlm={"decoding": "vcd", "alpha": -1}), ["monovlm.alpha=-1 is outside [0, 100]"],
     "monovlm.alpha"),
    (ask("hi", shape_image(), monovlm={"decoding": "vcd", "beta": 2}), ["monovlm.beta=2 is outside [0, 1]"],
     "monovlm.beta"),
    (ask("hi", shape_image(), monovlm={"beta": 0.2}), ["needs monovlm.decoding"], "monovlm.beta"),
    (ask("hi", shape_image(), monovlm={"reduction": "fastv", "decoding": "damro"}), ["'damro'", "use one of them"],
     "monovlm.decoding"),
    (ask("hi", monovlm={"reduction": "fastv"}), ["acts on the request's images, and it has none"], "monovlm.reduction"),
    (ask("hi", monovlm={"decoding": "vcd"}), ["acts on the request's images, and it has none"], "monovlm.decoding"),
])
def test_bad_requests_are_400_with_a_reason(client, body, words, param):
    assert_error(client.post(URL, json=body), 400, *words, param=param)


@pytest.mark.parametrize("raw, words", [
    (b"{not json", ["not valid JSON", "line 1 column 2"]),
    (b"[1, 2]", ["must be a JSON object, not a list"]),
    (b"\xff\xfe{}", ["not UTF-8", "not valid JSON"]),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', ["finite number"]),
    (b"[" * 100_000 + b"]" * 100_000, ["too deeply"]),
    (b'{"messages": [{"role": "user", "content": "lone \\ud800 half"}]}', ["unpaired surrogate"]),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}', ["unpaired surrogate"]),
])
def test_malformed_bodies_are_400(client, raw, words):
    response = client.post(URL, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert any(word in message for word in words), message


def test_unknown_model_path_and_method(client):
    assert_error(client.post(URL, json=ask("hi", model="gpt-4o")), 404, "'gpt-4o' is not served", "'tiny-eve'",
                 code="model_not_found")
    assert client.post(URL, json=ask("hi", model="tiny-eve")).status_code == 200
    assert_error(client.get("/v1/nothing"), 404, "Not Found")
    assert_error(client.get(URL), 405, "Method Not Allowed")


# JSON that json.dumps cannot write (or that must travel as text): put in place of these strings after dumping
RAW_JUNK = {"@big-int@": "9" * 5000, "@huge-int@": "1" + "0" * 400, "@deep-list@": "[" * 5000 + "]" * 5000,
            "@deep-object@": '{"a":' * 400 + "1" + "}" * 400}


def test_random_mutations_never_cause_a_5xx(client):
    """Seeded type and value swaps over every field of a valid request (integers too long to read or too large for
    a float, deep nesting, wrong types): each answer is 200 or a 4xx with a reason."""
    rng = random.Random(0)
    junk = [None, True, -1, 0, 3.5, 1e-300, float("inf"), "", "text", "\ud800", [], [1, "a"], {},
            {"url": "data:image/png;base64,AAAA"}, "data:image/png;base64," + BAD_IMAGE, 2**80, *RAW_JUNK]
    valid = ask("What color?", shape_image(), max_tokens=4, temperature=0.5, top_p=0.9, stop=["."], seed=1,
                monovlm={"reduction": "fastv", "keep": 0.5, "decoding": "vcd", "alpha": 1, "beta": 0.1})
    paths = [("temperature",), ("top_p",), ("max_tokens",), ("stop",), ("seed",), ("stream",), ("messages",),
             ("monovlm",), ("monovlm", "reduction"), ("monovlm", "keep"), ("monovlm", "decoding"),
             ("monovlm", "alpha"), ("monovlm", "beta"),
             ("messages", 0), ("messages", 0, "role"), ("messages", 0, "content"), ("messages", 0, "content", 0),
             ("messages", 0, "content", 0, "image_url"), ("messages", 0, "content", 0, "image_url", "url"),
             ("messages", 0, "content", 1, "text"), ("messages", 0, "content", 1, "type")]
    statuses = []
    for _ in range(160):
        body = json.loads(json.dumps(valid))
        *parents, last = rng.choice(paths)
        target = body
        for key in parents:
            target = target[key]
        target[last] = rng.choice(junk)
        raw = json.dumps(body, allow_nan=True)  # ASCII: lone surrogates travel as \ud800 escapes
        for name, text in RAW_JUNK.items():
            raw = raw.replace(json.dumps(name), text)
        raw = raw.encode()
        response = client.post(URL, content=raw, headers={"content-type": "application/json"})
        statuses.append(response.status_code)
        assert response.status_code < 500, (body, response.text)
        if response.status_code != 200:
            assert response.json()["error"]["message"]
    assert statuses.count(200) < len(statuses)  # the mutations did reach the error paths


# ---------------------------------------------------------------------------------------------------------------------
# API key, health, page


def test_api_key(served):
    with TestClient(create_app(served, api_key="s3cret")) as keyed:
        assert keyed.get("/health").json()["status"] == "ok"  # health needs no key
        assert keyed.get("/").status_code == 200
        assert_error(keyed.get("/v1/models"), 401, "API key", code="invalid_api_key")
        response = keyed.post(URL, json=ask("hi"), headers={"Authorization": "Bearer wrong"})
        assert_error(response, 401, "Authorization: Bearer")
        assert response.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret"}
        assert keyed.get("/v1/models", headers=good).json()["data"][0]["id"] == "tiny-eve"
        assert keyed.post(URL, json=ask("hi"), headers=good).status_code == 200


def test_health_models_and_page(client, served):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-eve" and health["in_server"] == 0
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["context_length"] == served.context
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html")
    for element in ('id="file"', 'id="drop"', 'id="question"', 'id="send"', "/v1/chat/completions"):
        assert element in page.text


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_queue=0"):
        Limits(max_queue=0)
    with pytest.raises(ValueError, match="default_max_tokens"):
        Limits(max_tokens=8, default_max_tokens=16)
