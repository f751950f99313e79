"""From a pretrained HF LLM to a served VLM, end to end, on folders this module writes with `transformers` itself: a
Qwen2-family and a Llama-3-family LLM (each with its own Jinja chat template and special tokens in
tokenizer_config.json), a CLIP and a SigLIP vision teacher, and a user-layout LLaVA data folder (plain PNGs, captions,
QA; no scenes.json).

What is checked: the processor's `hf` template builds training samples and prompts from the LLM's own chat template
(prompt ids equal transformers' `apply_chat_template`, a sample's ids are the prompt's ids plus the reply's, labels
only on replies and their end-of-turn token); the image tokens grow the vocabulary without moving the LLM's text
logits; a recipe with `model.init = <folder>` and an `hf:` teacher trains; `monovlm eval --tasks llava` reports the
model and the blind baseline; the server and the terminal chat answer from the template's prompt and stop on its
end-of-turn token; the trained model's folder reloads to the same logits.
"""

import json
import random

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from monovlm.config import ConfigError, ProcessorConfig, VisionConfig  # noqa: E402
from monovlm.data.processor import IGNORE_INDEX, Processor, SampleError, Turn  # noqa: E402
from monovlm.model.vlm import EncoderFreeVLM  # noqa: E402
from monovlm.tokenizer import Tokenizer, add_image_special_tokens, train_bpe_tokenizer  # noqa: E402
from monovlm.train.build import build_model  # noqa: E402
from monovlm.train.recipe import load_recipe  # noqa: E402
from monovlm.train.trainer import TrainOptions, train  # noqa: E402

# Qwen2-Instruct's template (a default system prompt when the conversation has none, ChatML turns)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3-Instruct's template (bos written by the template, headers, trimmed content, <|eot_id|> closing each turn)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
WORDS = ["what", "colour", "is", "the", "square", "background", "a", "on", "picture", "of", "yes", "no", "image",
         "you", "are", "helpful", "assistant", "system", "user", "hi", "hello", "bye", *COLOURS]


def corpus(count=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10))) + rng.choice([".", "?", "\n", ""])
            for _ in range(count)]


@torch.no_grad()
def randomize(model):
    """Weights that give confident logits (the default std 0.02 makes every logit ~0 and a parity check weak)."""
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "norm" in name:
            param.copy_(1.0 + 0.1 * noise)
        else:
            param.copy_(noise * (1.0 / param.shape[-1] ** 0.5 if param.dim() > 1 else 0.1))


def write_llm(folder, family):
    """A tiny HF LLM folder as transformers writes it, its chat template inside tokenizer_config.json."""
    from tokenizers import processors

    if family == "qwen2":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        roles = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
        template = QWEN2_TEMPLATE
    else:
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        roles = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
        template = LLAMA3_TEMPLATE
    backend = train_bpe_tokenizer(corpus(), vocab_size=330, special_tokens={}, chat_template=None).backend
    backend.add_special_tokens(specials)
    if family == "llama":  # Llama 3's tokenizer.json prepends bos to plain encodes; templates write their own
        bos = "<|begin_of_text|>"
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    tokenizer.save_pretrained(str(folder))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template  # where Qwen2 and Llama 3 checkpoints keep it
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
                    pad_token_id=None)
    if family == "qwen2":  # Qwen pads its embedding beyond the tokenizer: the image tokens take spare rows
        config = transformers.Qwen2Config(vocab_size=len(tokenizer) + 8, tie_word_embeddings=True, **settings)
    else:  # an untied head, exactly as many rows as tokens: the image tokens grow both
        config = transformers.LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, rope_theta=500000.0,
                                          **settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    randomize(model)
    model.save_pretrained(str(folder))
    return model.float().eval()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def llm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = write_llm(folder, request.param)
    return request.param, folder, model, transformers.AutoTokenizer.from_pretrained(str(folder))


def write_teacher(folder, kind):
    settings = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                    patch_size=8)
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**settings))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**settings))
    model.save_pretrained(str(folder))
    return folder


def write_data(root, count=12):
    """A user's LLaVA-layout folder: PNGs, a captions file, a QA file (multi-turn) and an eval file."""
    (root / "images").mkdir(parents=True)
    names = list(COLOURS)
    captions, qa, questions = [], [], []
    for index in range(count):
        square, background = names[index % 4], names[(index // 4 + index % 4 + 1) % 4]
        image = Image.new("RGB", (32, 32), COLOURS[background])
        image.paste(COLOURS[square], (8, 8, 24, 24))
        path = f"images/{index:03d}.png"
        image.save(root / path)
        captions.append({"id": f"c{index}", "image": path, "conversations": [
            {"from": "human", "value": "<image>\n"},
            {"from": "gpt", "value": f"a {square} square on {background}"}]})
        qa.append({"id": f"q{index}", "image": path, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": square},
            {"from": "human", "value": "What colour is the background?"}, {"from": "gpt", "value": background}]})
        questions.append({"id": f"e{index}", "image": path, "question": "What colour is the square?",
                          "answer": square})
    for name, records in (("captions.json", captions), ("qa.json", qa), ("questions.json", questions)):
        (root / name).write_text(json.dumps(records, indent=1))
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("user_data"))


def vision():
    return VisionConfig(embedder="eve", patch_size=4, merge=2, embedder_width=32, embedder_heads=2,
                        min_pixels=32 * 32, max_pixels=32 * 32)


def processor_for(folder, template="hf", system_prompt=None):
    tokenizer = Tokenizer.from_folder(folder)
    add_image_special_tokens(tokenizer)
    return Processor(tokenizer, vision(), ProcessorConfig(template=template, system_prompt=system_prompt))


def picture(colour="red"):
    return Image.new("RGB", (32, 32), COLOURS[colour])


CONVERSATION = [Turn("user", "What colour is the square?"), Turn("assistant", "red"),
                Turn("user", "And the background?"), Turn("assistant", "blue on green")]


# ---------------------------------------------------------------------------------------------------------------------
# the processor's `hf` template


def test_prompts_are_the_templates_own_ids(llm):
    family, folder, _, hf_tokenizer = llm
    processor = processor_for(folder)
    for end in (1, 3):  # one question; a question after an exchange
        messages = [{"role": role, "content": text} for role, text in CONVERSATION[:end]]
        ours = processor.encode_chat(CONVERSATION[:end], add_generation_prompt=True).input_ids
        theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
        assert ours == theirs
    tokens = hf_tokenizer.convert_ids_to_tokens(ours)
    if family == "qwen2":
        # the template's default system turn, three turns, the answer's header
        assert tokens.count("<|im_start|>") == 5 and "<|begin_of_text|>" not in tokens
        assert processor.stop_ids == [hf_tokenizer.convert_tokens_to_ids("<|im_end|>")]  # eos is <|im_end|> too
    else:
        assert tokens.count("<|begin_of_text|>") == 1  # the template's bos only: no second one from tokenizer.json
        assert tokens.count("<|start_header_id|>") == 4
        assert processor.stop_ids == [hf_tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]


def test_a_sample_is_its_prompt_plus_the_reply_with_labels_only_on_replies(llm):
    family, folder, _, hf_tokenizer = llm
    processor = processor_for(folder)
    image = picture()
    turns = [Turn("user", "<image>\n" + CONVERSATION[0].text), *CONVERSATION[1:]]
    sample = processor.encode_chat(turns, [image])
    end_of_turn = "<|im_end|>" if family == "qwen2" else "<|eot_id|>"
    labelled = [token for token in sample.labels if token != IGNORE_INDEX]
    replies = [processor.tokenizer.encode(text) + [processor.tokenizer.token_to_id(end_of_turn)]
               for text in ("red", "blue on green")]
    assert labelled == replies[0] + replies[1]
    for reply_index, turn_index in enumerate((1, 3)):
        prompt = processor.encode_chat(turns[:turn_index], [image], add_generation_prompt=True)
        reply = replies[reply_index]
        assert sample.input_ids[: len(prompt.input_ids) + len(reply)] == prompt.input_ids + reply
        assert sample.labels[len(prompt.input_ids): len(prompt.input_ids) + len(reply)] == reply
        earlier = [label for label in sample.labels[: len(prompt.input_ids)] if label != IGNORE_INDEX]
        assert earlier == sum(replies[:reply_index], [])  # only the earlier replies carry loss before this one
    # the image is one block of placeholders where the marker was, inside the template's user turn
    block = processor.image_block(image)[0]
    at = sample.input_ids.index(processor.image_start_id)
    assert sample.input_ids[at: at + len(block)] == block and len(sample.images) == 1
    # around it, the template's text exactly (the text on each side of an image is encoded on its own)
    text_ids = sample.input_ids[:at] + sample.input_ids[at + len(block):]
    messages = [{"role": role, "content": text} for role, text in turns]
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    assert processor.tokenizer.decode(text_ids) == rendered.replace("<image>", "")


def test_system_prompt_replaces_the_templates_default(llm):
    family, folder, _, hf_tokenizer = llm
    processor = processor_for(folder, system_prompt="Answer in one word.")
    ours = processor.encode_chat(CONVERSATION[:1], add_generation_prompt=True).input_ids
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": CONVERSATION[0].text}]
    assert ours == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)


def test_auto_on_a_monovlm_tokenizer_equals_chatml():
    """A tokenizer monovlm trains carries a ChatML template: 'auto' (-> 'hf') must give chatml's ids and labels."""
    tokenizer = train_bpe_tokenizer(corpus(), vocab_size=330)
    settings = dict(system_prompt="Be brief.")
    chatml = Processor(tokenizer, vision(), ProcessorConfig(template="chatml", **settings))
    auto = Processor(tokenizer, vision(), ProcessorConfig(template="auto", **settings))
    assert auto.template == "hf" and auto.stop_ids == chatml.stop_ids
    turns = [Turn("user", "<image>\n" + CONVERSATION[0].text), *CONVERSATION[1:]]
    for end, prompt in ((4, False), (3, True)):
        a = auto.encode_chat(turns[:end], [picture()], add_generation_prompt=prompt)
        b = chatml.encode_chat(turns[:end], [picture()], add_generation_prompt=prompt)
        assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
        assert torch.equal(a.images[0], b.images[0])


def test_templates_that_cannot_train_are_refused_by_name(llm):
    _, folder, _, _ = llm
    tokenizer = Tokenizer.from_folder(folder)
    add_image_special_tokens(tokenizer)

    def with_template(template):
        return Tokenizer(tokenizer.backend, tokenizer.special_tokens, {"default": template} if template else {})

    with pytest.raises(ConfigError, match="has none"):
        Processor(with_template(None), vision(), ProcessorConfig(template="hf"))
    # a template that closes replies with plain text gives no token to stop on
    plain_end = with_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ConfigError, match="no special token after an assistant reply"):
        Processor(plain_end, vision(), ProcessorConfig(template="hf"))
    # one that renders past replies differently as the conversation grows (as reasoning templates drop thoughts)
    forgetful = with_template("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]"
                              "{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}")
    with pytest.raises(ConfigError, match="not a prefix"):
        Processor(forgetful, vision(), ProcessorConfig(template="hf"))
    # one that refuses a role (as Gemma's refuses "system"): that conversation is a sample error, named
    no_system = with_template("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                              "role') }}{% endif %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    processor = Processor(no_system, vision(), ProcessorConfig(template="hf"))
    with pytest.raises(SampleError, match="cannot render this conversation: no system role"):
        processor.encode_chat([Turn("system", "Be brief."), *CONVERSATION[:2]])
    with pytest.raises(ConfigError, match="no system role"):  # a configured system prompt fails at once
        Processor(no_system, vision(), ProcessorConfig(template="hf", system_prompt="Be brief."))


def test_auto_falls_back_to_chatml_without_a_chat_template(llm):
    family, folder, _, _ = llm
    tokenizer = Tokenizer.from_folder(folder)
    add_image_special_tokens(tokenizer)
    bare = Tokenizer(tokenizer.backend, tokenizer.special_tokens)  # a base model's tokenizer: no chat template
    if family == "llama":  # ChatML then needs its tokens, which a Llama tokenizer lacks: the error names them
        with pytest.raises(ConfigError, match="<\\|im_start\\|>"):
            Processor(bare, vision(), ProcessorConfig(template="auto"))
    else:
        assert Processor(bare, vision(), ProcessorConfig(template="auto")).template == "chatml"


# ---------------------------------------------------------------------------------------------------------------------
# the recipe: model.init = the HF folder, an hf: teacher, the user's data


def write_recipe(path, llm_folder, teacher_folder, instruct_steps=2, template="hf"):
    """A tiny recipe modelled on eve.toml: pre-aligning (embedder only, captions) then instruction tuning (QA)."""
    path.write_text(f"""
name = "eve-hf-tiny"
seed = 0

[model]
init = "{llm_folder}"

[model.vision]
embedder = "eve"
patch_size = 4
merge = 2
embedder_width = 32
embedder_heads = 2
min_pixels = 1024
max_pixels = 1024

[align]
teacher = "hf:{teacher_folder}"
loss = "cosine"
heads = 2

[[stages]]
name = "prealign"
data = "captions.json"
template = "plain"
train = ["embedder"]
align = true
lr = 2e-3
steps = 2
batch_size = 4
warmup_steps = 1

[[stages]]
name = "instruct"
data = "qa.json"
template = "{template}"
train = ["embedder", "decoder"]
align = true
lr = 3e-3
steps = {instruct_steps}
batch_size = 4
warmup_steps = 2
""")
    return load_recipe(path)


def test_image_tokens_leave_the_llms_text_logits_unchanged(llm, data_root, tmp_path):
    family, folder, hf_model, hf_tokenizer = llm
    recipe = write_recipe(tmp_path / "recipe.toml", folder, write_teacher(tmp_path / "clip", "clip"))
    model, tokenizer = build_model(recipe, data_root)
    hf_vocab = hf_model.config.vocab_size
    # only the four image tokens are new: no ChatML tokens for an LLM that brings its own template
    assert tokenizer.vocab_size == len(hf_tokenizer) + 4
    if family == "qwen2":  # they took spare rows of the padded embedding: nothing grew
        assert model.config.decoder.vocab_size == hf_vocab
    else:
        assert model.config.decoder.vocab_size == hf_vocab + 4
    assert all(token_id < model.config.decoder.vocab_size for token_id in model.config.decoder.special_tokens.values())
    messages = [{"role": "user", "content": "What colour is the square?"}, {"role": "assistant", "content": "red"}]
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    ids = torch.tensor([ids + torch.randint(0, len(hf_tokenizer), (20,)).tolist()])
    with torch.no_grad():
        theirs = hf_model(ids).logits
        ours = model.eval()(ids)
    assert theirs.abs().max() > 1.0, "logits too small for a meaningful comparison"
    torch.testing.assert_close(ours[..., :hf_vocab], theirs, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def trained(llm, data_root, tmp_path_factory):
    """The recipe trained on the user's data: Qwen2 with a CLIP teacher and template "auto" (the shipped recipes'),
    Llama 3 with a SigLIP teacher and template "hf"."""
    family, folder, _, _ = llm
    root = tmp_path_factory.mktemp(f"run_{family}")
    teacher = write_teacher(root / "teacher", "clip" if family == "qwen2" else "siglip")
    # enough instruction steps that the model ends its answers with the template's end-of-turn token
    recipe = write_recipe(root / "recipe.toml", folder, teacher, instruct_steps=24,
                          template="auto" if family == "qwen2" else "hf")
    options = TrainOptions(recipe=recipe, data_root=data_root, run_dir=root / "run", progress=False,
                           measure_peak=False, dtype="float32", eval_data=None)
    return train(options)


def end_of_turn(family):
    return "<|im_end|>" if family == "qwen2" else "<|eot_id|>"


@pytest.mark.slow
def test_trained_model_keeps_the_llms_template_and_evaluates(llm, trained, data_root, tmp_path):
    family, folder, _, hf_tokenizer = llm
    assert trained.losses[-1] < 0.5 * trained.losses[2]  # it learned (the instruct stage starts at step 3)
    final = trained.final_dir
    config = json.loads((final / "config.json").read_text())
    assert config["processor"]["template"] == ("auto" if family == "qwen2" else "hf")
    saved = Tokenizer.from_folder(final)
    assert saved.chat_template == hf_tokenizer.chat_template
    if family == "llama":  # no ChatML tokens were added to a vocabulary that has its own turn tokens
        assert saved.token_to_id("<|im_start|>") is None
    assert saved.special_ids == trained.tokenizer.special_ids
    # the folder HF tools read: transformers renders the same prompt from the saved tokenizer
    reloaded = transformers.AutoTokenizer.from_pretrained(str(final))
    messages = [{"role": "user", "content": "What colour is the square?"}]
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == (
        hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    from monovlm.cli import main

    out = tmp_path / "report"
    # the llava task reads {data}/questions.json (written by write_data)
    assert main(["eval", str(final), "--tasks", "llava", "--data", str(data_root), "--out", str(out),
                 "--no-progress"]) == 0
    (run,) = json.loads((out / "report.json").read_text())
    (model_result,), (blind_result,) = run["results"], run["blind"]
    assert (model_result["task"], model_result["blind"], blind_result["blind"]) == ("llava", False, True)
    assert model_result["counts"]["overall"] == blind_result["counts"]["overall"] == 12
    for result in (model_result, blind_result):
        assert 0.0 <= result["scores"]["overall"]["accuracy"] <= 1.0
    # every answer is one colour word: generation ended on the template's end-of-turn token, not at max_new_tokens
    assert all(prediction["output"] in COLOURS for prediction in model_result["predictions"])
    assert "blind accuracy" in (out / "report.md").read_text()


@pytest.mark.slow
def test_served_and_terminal_answers_use_the_llms_template(llm, trained, data_root):
    import base64

    from fastapi.testclient import TestClient

    from monovlm.infer.generate import GenerationConfig, generate
    from monovlm.serve.app import create_app, load_served_model
    from monovlm.serve.terminal import ChatSession

    family, _, _, hf_tokenizer = llm
    served = load_served_model(trained.final_dir)
    processor = served.processor
    stop = processor.tokenizer.token_to_id(end_of_turn(family))
    assert processor.template == "hf" and processor.stop_ids[0] == stop

    # a text-only question: the server's prompt is exactly transformers' rendering of the LLM's template
    question = "What colour is the square?"
    text_prompt = hf_tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                   add_generation_prompt=True, tokenize=True, return_dict=False)
    image_path = data_root / "images" / "000.png"
    uri = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
    with TestClient(create_app(served)) as client:
        reply = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": question}], "max_tokens": 6}).json()
        assert reply["usage"]["prompt_tokens"] == len(text_prompt)
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": question}]}], "max_tokens": 8}
        reply = client.post("/v1/chat/completions", json=body).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"  # it ended its answer the way the template ends a turn
    answer = choice["message"]["content"]
    assert answer and not any(token in answer for token in ("<|im_end|>", "<|eot_id|>", "<|image|>"))

    # the terminal chat builds the same prompt, and the same answer ends on the template's end-of-turn token
    session = ChatSession(served.model, processor, GenerationConfig(max_new_tokens=8, stop_ids=processor.stop_ids))
    session.attach(image_path)
    prompt = session.prompt_for(question)
    assert reply["usage"]["prompt_tokens"] == len(prompt.ids)
    header = "<|im_start|>assistant\n" if family == "qwen2" else "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert processor.tokenizer.decode(prompt.ids).endswith(header)
    generated = generate(served.model, [prompt.ids], GenerationConfig(max_new_tokens=8, stop_ids=processor.stop_ids),
                         prefill_inputs={"images": prompt.images})[0]
    assert generated.token_ids[-1] == stop
    assert "".join(session.ask(question)) == answer
    # the next question reads the history through the template: the answer closed by its end-of-turn token
    follow_up = session.prompt_for("What colour is the background?")
    assert follow_up.ids[: len(prompt.ids)] == prompt.ids
    assert follow_up.ids[len(prompt.ids): len(prompt.ids) + len(generated.token_ids)] == generated.token_ids


@pytest.mark.slow
def test_the_trained_folder_reloads_to_the_same_logits(trained, data_root):
    from monovlm.data.images import image_to_tensor, load_image

    reloaded = EncoderFreeVLM.load(trained.final_dir).eval()
    model = trained.model.eval()
    vision_config = model.config.vision
    image = image_to_tensor(load_image(data_root / "images" / "001.png"), vision_config)
    processor = Processor(trained.tokenizer, vision_config, model.config.processor)
    ids, images = processor.prompt("What colour is the square?", [load_image(data_root / "images" / "001.png")])
    assert torch.equal(images[0], image)
    with torch.no_grad():
        expected = model(torch.tensor([ids]), images)
        got = reloaded(torch.tensor([ids]), images)
    assert torch.equal(got, expected)
    assert reloaded.config.to_dict() == model.config.to_dict()


def test_a_base_llm_without_a_chat_template_gets_chatml_under_auto(llm, data_root, tmp_path):
    """A base checkpoint has no chat template: "auto" falls back to ChatML, whose two tokens are then added (and the
    text logits still stay the LLM's)."""
    import shutil

    family, folder, hf_model, hf_tokenizer = llm
    base = tmp_path / "base"
    shutil.copytree(folder, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path / "recipe.toml", base, write_teacher(tmp_path / "clip", "clip"), template="auto")
    model, tokenizer = build_model(recipe, data_root)
    processor = Processor(tokenizer, model.config.vision, model.config.processor)
    assert processor.template == "chatml" and processor.stop_ids[0] == tokenizer.token_to_id("<|im_end|>")
    added = 0 if family == "qwen2" else 2  # Qwen's vocabulary has the ChatML tokens already
    assert tokenizer.vocab_size == len(hf_tokenizer) + 4 + added
    ids = torch.randint(0, len(hf_tokenizer), (1, 24))
    with torch.no_grad():
        theirs = hf_model(ids).logits
        ours = model.eval()(ids)
    torch.testing.assert_close(ours[..., : hf_model.config.vocab_size], theirs, rtol=1e-4, atol=1e-4)
