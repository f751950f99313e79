"""Tokenizer: byte-level BPE training, atomic special tokens, HF folder round trips, chat-template parity with
transformers, and growing a model's vocabulary for the image tokens. Everything is built here; nothing is downloaded."""

import json
import random

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer

from monovlm.config import DecoderConfig
from monovlm.model.decoder import Decoder
from monovlm.tokenizer import (
    ENDOFTEXT,
    IMAGE_SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    add_image_special_tokens,
    train_bpe_tokenizer,
)

WORDS = ["the", "red", "square", "is", "left", "of", "a", "blue", "circle", "how", "many", "shapes", "answer",
         "über", "naïve", "café", "日本語", "猫", "🙂", "42", "3.14", "(x)", "don't"]

UNICODE_SAMPLES = [
    "plain ascii text.",
    "  leading spaces and trailing  ",
    "tabs\tand\nnewlines\r\n\n",
    "Ünïcödé café naïve — “quotes” ‘single’ …",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "combining e\u0301 a\u0308 zero\u200bwidth \ufeffbom",
    "right-to-left: مرحبا بالعالم שלום",
    "math ∑∫√∞ ≠ ≤ and symbols <b>&amp;</b> {\"json\": [1, 2]}",
    "control \x00\x01\x7f bytes",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is <b>2 & 2</b>? Say \"four\"."},
    {"role": "assistant", "content": "Four. Ünïcödé 🙂"},
]


def corpus(count=400, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(count)]


@pytest.fixture(scope="module")
def trained():
    return train_bpe_tokenizer(corpus(), vocab_size=400)


# ---------------------------------------------------------------------- training, round trips, special tokens


def test_bpe_learns_merges_and_round_trips_unicode(trained):
    assert 300 < trained.vocab_size <= 400  # bytes (256) + specials + learned merges
    assert len(trained.encode("the red square")) < len("the red square")  # merges were learned and used
    for text in UNICODE_SAMPLES:
        assert trained.decode(trained.encode(text)) == text


def test_round_trip_random_code_points(trained):
    rng = random.Random(1)
    for _ in range(50):
        # every code point outside the surrogate block, which no str can encode to UTF-8
        chars = [chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])) for _ in range(20)]
        text = "".join(chars)
        assert trained.decode(trained.encode(text)) == text


def test_default_specials_roles_and_ids(trained):
    endoftext = trained.token_to_id(ENDOFTEXT)
    assert trained.bos_id == trained.eos_id == trained.pad_id == endoftext
    ids = trained.special_ids
    for name, token in IMAGE_SPECIAL_TOKENS.items():
        assert ids[name] == trained.token_to_id(token)
        assert trained.id_to_token(ids[name]) == token
    assert {"im_start", "im_end"} <= set(ids)
    assert len(set(ids.values())) == len(ids) - 2  # only bos/eos/pad share one id


def test_special_tokens_are_atomic(trained):
    image = trained.special_ids["image"]
    ids = trained.encode("a<|image|>b")
    assert ids.count(image) == 1
    assert trained.decode(ids) == "a<|image|>b"
    assert trained.decode(ids, skip_special_tokens=True) == "ab"
    # a near miss is ordinary text and must not produce the special id
    assert image not in trained.encode("<|image |>")


def test_encode_batch_matches_encode(trained):
    texts = ["the red square", "日本語 🙂", "<|im_start|>user\nhi<|im_end|>"]
    assert trained.encode_batch(texts) == [trained.encode(t) for t in texts]


def test_too_small_vocab_is_refused():
    with pytest.raises(TokenizerError, match="vocab_size=100"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_default_chat_template_renders_chatml_and_image_parts(trained):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A cat."}]
    text = trained.apply_chat_template(messages, add_generation_prompt=False)
    assert text == "<|im_start|>user\n<|image|>What is this?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
    prompt = trained.apply_chat_template(messages[:1])
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert trained.apply_chat_template(messages[:1], tokenize=True) == trained.encode(prompt)


def test_missing_chat_template_is_an_error():
    tokenizer = train_bpe_tokenizer(corpus(50), vocab_size=300, chat_template=None)
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template(CONVERSATION)


def test_end_of_turn_token_is_what_the_template_closes_a_reply_with(trained, tmp_path):
    assert trained.end_of_turn_token() == "<|im_end|>"  # monovlm's ChatML
    hf = build_hf_folder(tmp_path)  # Llama-2-like: " reply</s>"
    assert Tokenizer.from_folder(tmp_path).end_of_turn_token() == hf.eos_token == "</s>"
    # of two special tokens starting at the same place, the longer is what the tokenizer reads there
    backend = BackendTokenizer.from_str(trained.backend.to_str())  # a copy: the module's tokenizer stays as it is
    tokenizer = Tokenizer(backend, {"eos": ENDOFTEXT, "end": "<|end|>", "end_tool": "<|end|><|tool|>"},
                          {"default": "{% for m in messages %}{{ m['content'] }}<|end|><|tool|>\n{% endfor %}"})
    assert tokenizer.end_of_turn_token() == "<|end|><|tool|>"
    assert tokenizer.encode("Hello<|end|><|tool|>")[-1] == tokenizer.token_to_id("<|end|><|tool|>")
    # a template that closes replies with plain text has none; no template, or one that cannot render, is an error
    plain = Tokenizer(trained.backend, {}, {"default": "{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}"})
    assert plain.end_of_turn_token() is None
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(trained.backend).end_of_turn_token()
    refusing = Tokenizer(trained.backend, {}, {"default": "{{ raise_exception('roles must alternate') }}"})
    with pytest.raises(TokenizerError, match="cannot render a user/assistant exchange: roles must alternate"):
        refusing.end_of_turn_token()


# ---------------------------------------------------------------------- saving and loading


def test_save_then_from_folder_keeps_everything(trained, tmp_path):
    trained.save(tmp_path)
    loaded = Tokenizer.from_folder(tmp_path)
    for text in UNICODE_SAMPLES + ["x<|image_start|><|image|><|image_row|><|image_end|>y"]:
        assert loaded.encode(text) == trained.encode(text)
    assert loaded.special_ids == trained.special_ids
    assert loaded.vocab_size == trained.vocab_size
    assert loaded.apply_chat_template(CONVERSATION) == trained.apply_chat_template(CONVERSATION)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["monovlm_special_tokens"]["image"] == "<|image|>"


def test_saved_folder_loads_in_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    trained.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == trained.vocab_size
    for text in UNICODE_SAMPLES + ["a<|image|>b <|im_start|>user\n"]:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == trained.encode(text)
        assert hf.decode(ids) == trained.decode(ids)
    assert hf.eos_token_id == trained.eos_id and hf.pad_token_id == trained.pad_id
    for add_generation_prompt in (True, False):
        ours = trained.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
        theirs = hf.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert ours == theirs
    # multimodal content with a rich object inside (a tensor standing in for a decoded image), and a template using
    # HF's {% generation %} tag and loop controls, passed by string
    parts = [{"type": "image", "image": torch.zeros(2)}, {"type": "text", "text": "hi"}]
    messages = [{"role": "user", "content": parts}]
    assert trained.apply_chat_template(messages) == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                                           tokenize=False)
    assert torch.is_tensor(messages[0]["content"][0]["image"])  # the caller's messages are untouched
    template = ("{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}{% if m.role == 'assistant' %}"
                "{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
                "{{ strftime_now('%Y') | length }}")
    ours = trained.apply_chat_template(CONVERSATION + CONVERSATION, chat_template=template)
    assert ours == hf.apply_chat_template(CONVERSATION + CONVERSATION, chat_template=template, tokenize=False,
                                          add_generation_prompt=True)
    assert ours == "".join(m["content"] for m in CONVERSATION) + "4"


# A Llama-2-like template that exercises what HF's environment provides: bos/eos variables, raise_exception,
# a tojson that leaves <, > and & alone, and trim_blocks/lstrip_blocks whitespace control.
HF_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' %}
<<SYS>>{{ message['content'] }}<</SYS>>
    {% elif message['role'] == 'user' %}
[INST] {{ message['content'] | tojson }} [/INST]
    {% else %}
 {{ message['content'] | trim }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}"""


def build_hf_folder(path, chat_template_in_config=False):
    """A Llama-like HF tokenizer folder written by transformers itself: BPE with a bos-adding post-processor."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import processors

    backend = train_bpe_tokenizer(corpus(200), vocab_size=320, special_tokens={}, chat_template=None).backend
    backend.add_special_tokens(["<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    hf.chat_template = HF_TEMPLATE
    hf.save_pretrained(str(path))
    if chat_template_in_config:  # the older layout: the template inside tokenizer_config.json, as a named list
        (path / "chat_template.jinja").unlink()
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = [{"name": "default", "template": HF_TEMPLATE}, {"name": "tool_use", "template": "T"}]
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("chat_template_in_config", [False, True])
def test_hf_folder_chat_template_matches_transformers(tmp_path, chat_template_in_config):
    hf = build_hf_folder(tmp_path, chat_template_in_config)
    ours = Tokenizer.from_folder(tmp_path)
    assert ours.bos_id == hf.bos_token_id and ours.eos_id == hf.eos_token_id
    assert ours.pad_id == ours.eos_id  # no pad token in the folder: falls back to eos
    for add_generation_prompt in (True, False):
        theirs = hf.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=False)
        mine = ours.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
        assert mine == theirs
        assert '"What is <b>2 & 2</b>? Say \\"four\\"."' in mine  # tojson did not HTML-escape
        assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=True) == (
            hf.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=True,
                                   return_dict=False))
    # the post-processor from tokenizer.json decides what add_special_tokens adds, for both loaders
    assert ours.encode("the cat", add_special_tokens=True) == hf("the cat")["input_ids"]
    assert ours.encode("the cat", add_special_tokens=True)[0] == ours.bos_id
    with pytest.raises(Exception, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_hf_folder_survives_our_save(tmp_path):
    hf = build_hf_folder(tmp_path / "hf")
    ours = Tokenizer.from_folder(tmp_path / "hf")
    ids = add_image_special_tokens(ours)
    ours.save(tmp_path / "ours")
    reloaded_hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    text = "the <|image_start|><|image|><|image_end|> cat"
    assert reloaded_hf(text)["input_ids"] == ours.encode(text, add_special_tokens=True)
    assert ids["image"] in ours.encode(text)
    assert len(hf) + len(IMAGE_SPECIAL_TOKENS) == ours.vocab_size == len(reloaded_hf)
    assert Tokenizer.from_folder(tmp_path / "ours").special_ids == ours.special_ids


def test_legacy_config_fields(trained, tmp_path):
    """Older exports keep bos insertion in add_bos_token and some added tokens only in added_tokens_decoder."""
    trained.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    extra_id = trained.vocab_size
    config["add_bos_token"] = True  # tokenizer.json has no post-processor, so this flag is the only record
    config["added_tokens_decoder"][str(extra_id)] = {"content": "<|tool|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.token_to_id("<|tool|>") == extra_id
    assert loaded.encode("a<|tool|>b").count(extra_id) == 1
    assert loaded.encode("the cat", add_special_tokens=True) == [loaded.bos_id] + trained.encode("the cat")
    # saving writes the flag into tokenizer.json's post-processor, which transformers honours
    loaded.save(tmp_path / "resaved")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "resaved"))
    assert hf("the cat")["input_ids"] == loaded.encode("the cat", add_special_tokens=True)

    # an id the vocabulary cannot honour is an error, not a silent renumbering
    config["added_tokens_decoder"][str(extra_id)]["content"] = "<|other|>"
    config["added_tokens_decoder"][str(extra_id + 5)] = {"content": "<|gap|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="<\\|gap\\|>"):
        Tokenizer.from_folder(tmp_path)


# ---------------------------------------------------------------------- image tokens and the model


@pytest.fixture()
def text_only():
    """A tokenizer without image tokens, as an HF checkpoint arrives."""
    return train_bpe_tokenizer(corpus(200), vocab_size=300, special_tokens={"eos": ENDOFTEXT})


def tiny_decoder(vocab_size):
    return Decoder(DecoderConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_heads=2,
                                 num_kv_heads=1)).eval()


def test_add_image_tokens_grows_model_and_keeps_old_logits(text_only):
    old_vocab = text_only.vocab_size
    model = tiny_decoder(old_vocab)
    input_ids = torch.tensor([text_only.encode("the red square is left of")])
    with torch.no_grad():
        before = model(input_ids)
    ids = add_image_special_tokens(text_only, model)
    assert sorted(ids.values()) == list(range(old_vocab, old_vocab + len(IMAGE_SPECIAL_TOKENS)))
    assert model.config.vocab_size == text_only.vocab_size == old_vocab + len(IMAGE_SPECIAL_TOKENS)
    assert model.embed_tokens.weight.shape[0] == model.config.vocab_size
    assert model.config.special_tokens == ids
    with torch.no_grad():
        after = model(input_ids)
    assert after.shape[-1] == model.config.vocab_size
    torch.testing.assert_close(after[..., :old_vocab], before, rtol=0, atol=0)
    # the image token itself is embedded and encoded atomically
    assert text_only.encode("x<|image|>y").count(ids["image"]) == 1

    # idempotent: nothing grows, nothing moves
    weights = model.embed_tokens.weight.clone()
    assert add_image_special_tokens(text_only, model) == ids
    assert model.config.vocab_size == old_vocab + len(IMAGE_SPECIAL_TOKENS)
    assert text_only.vocab_size == model.config.vocab_size
    assert torch.equal(model.embed_tokens.weight, weights)


def test_add_image_tokens_uses_spare_rows(text_only):
    # HF checkpoints often round the embedding up (e.g. to a multiple of 64): the new ids already have rows
    model = tiny_decoder(text_only.vocab_size + 16)
    embed = model.embed_tokens.weight
    ids = add_image_special_tokens(text_only, model)
    assert model.config.vocab_size == text_only.vocab_size + 12
    assert model.embed_tokens.weight is embed  # not replaced
    assert model.config.special_tokens == ids and max(ids.values()) < model.config.vocab_size


def test_add_image_tokens_reuses_existing_ids(trained):
    before = dict(trained.special_ids)
    vocab_size = trained.vocab_size
    assert add_image_special_tokens(trained) == {name: before[name] for name in IMAGE_SPECIAL_TOKENS}
    assert trained.vocab_size == vocab_size


# ---------------------------------------------------------------------- errors name the path


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(TokenizerError, match="nowhere"):
        Tokenizer.from_folder(missing)


def test_folder_without_tokenizer_json_is_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is missing") as error:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_bad_json_is_named(trained, tmp_path):
    trained.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{\"truncated\": ")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json could not be parsed"):
        Tokenizer.from_folder(tmp_path)


# What an OpenAI client sends: optional keys present with the value None
OPENAI_STYLE = [
    {"role": "system", "content": "Be brief.", "name": None},
    {"role": "user", "content": "What is 2 + 2?", "name": None, "tool_calls": None},
    {"role": "assistant", "content": None, "refusal": None,
     "tool_calls": [{"id": "1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
    {"role": "tool", "content": "4", "tool_call_id": "1", "name": None},
]
NONE_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>"
    "{% if m.name is defined %}[name={{ m.name }}]{% endif %}"
    "{% if m.content is defined %}{{ m.content }}{% endif %}"
    "{% if m.tool_calls is defined %}{% for c in m.tool_calls %}{{ c.function.name }}(){% endfor %}{% endif %}"
    "{% endfor %}"
)


def test_none_valued_message_keys_render_as_transformers_renders_them(tmp_path):
    hf = build_hf_folder(tmp_path)
    ours = Tokenizer.from_folder(tmp_path)
    theirs = hf.apply_chat_template(OPENAI_STYLE, chat_template=NONE_TEMPLATE, tokenize=False,
                                    add_generation_prompt=False)
    assert ours.apply_chat_template(OPENAI_STYLE, chat_template=NONE_TEMPLATE, add_generation_prompt=False) == theirs
    assert "None" not in theirs and "<assistant>add()" in theirs
    assert OPENAI_STYLE[0]["name"] is None  # the caller's messages are left as they were
