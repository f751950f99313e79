"""Text tokenization: a thin typed wrapper over a `tokenizers.Tokenizer`, plus the image special tokens.

Two sources of tokenizers:
- `Tokenizer.from_folder(path)` reads a local Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json,
  optionally special_tokens_map.json and chat_template.jinja) without importing `transformers`;
- `train_bpe_tokenizer(texts, vocab_size)` trains a byte-level BPE for models trained from scratch.

`Tokenizer.save(path)` writes a folder that both `Tokenizer.from_folder` and `transformers.AutoTokenizer` load, so a
monovlm checkpoint's tokenizer stays usable by the HF ecosystem.

Chat templates are rendered exactly as transformers renders them (same sandboxed jinja environment, filters and
globals), because a template rendered slightly differently at training and at serving time silently costs accuracy.

Image special tokens (`IMAGE_SPECIAL_TOKENS`) are added by `add_image_special_tokens`, which also grows a model's
embedding when the tokenizer outgrows it and records name -> id in `DecoderConfig.special_tokens`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

if TYPE_CHECKING:  # the model is only needed for typing; importing it here would pull torch into tokenizer-only use
    from monovlm.model.decoder import Decoder

# Names are the keys recorded in `DecoderConfig.special_tokens`; values are the token strings.
IMAGE_SPECIAL_TOKENS: dict[str, str] = {
    "image": "<|image|>",  # one placeholder per visual token; the processor expands it
    "image_start": "<|image_start|>",
    "image_end": "<|image_end|>",
    "image_row_sep": "<|image_row|>",  # ends each row of patches, so the model sees the 2-D layout (Fuyu)
}

# Role tokens HF tokenizers know by name. Each is read from `<role>_token` in the config and handed to chat templates
# as the variable `<role>_token`, as transformers does.
ROLE_TOKENS = ("bos", "eos", "unk", "pad", "sep", "cls", "mask")

ENDOFTEXT = "<|endoftext|>"
CHAT_SPECIAL_TOKENS: dict[str, str] = {"im_start": "<|im_start|>", "im_end": "<|im_end|>"}

# ChatML, as Qwen and SmolLM2 use it. Content may be a string or a list of parts ({"type": "image"} or
# {"type": "text", "text": ...}); an image part renders as one <|image|> that the processor later expands.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|image|>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "chat_templates"


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be read, or a request the tokenizer cannot serve; the message names the cause."""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what HF keeps beside it: named special tokens and chat templates.

    `special_tokens` maps a name to a token string: the HF roles ("bos", "eos", "pad", ...) and monovlm's own names
    ("image", "im_start", ...). Every token in it is in the vocabulary as an atomic special token.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: Mapping[str, str] | None = None,
        chat_templates: Mapping[str, str] | None = None,
    ):
        self.backend = backend
        self.special_tokens: dict[str, str] = {}
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self.add_special_tokens(special_tokens or {})

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        """Load a local HF tokenizer folder. Raises TokenizerError naming the path when it cannot be read."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {folder} does not exist or is not a directory")
        tokenizer_file = folder / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file} is missing (a tokenizer folder needs a fast-tokenizer file)")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{tokenizer_file} could not be parsed: {error}") from error
        config = _read_json(folder / CONFIG_FILE)
        _add_missing_decoder_tokens(backend, config.get("added_tokens_decoder") or {}, folder / CONFIG_FILE)
        special_tokens = _special_tokens_from_config(config, folder)
        _apply_bos_eos_flags(backend, config, special_tokens)
        return cls(backend, special_tokens, _chat_templates_from_folder(config, folder))

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, readable by `from_folder` and `AutoTokenizer`."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / TOKENIZER_FILE))
        config = self._hf_config()
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # A chat_template.jinja beside the config takes priority over it in both loaders; an old one left in the
        # folder would silently replace the template we just saved, so keep it in step (or remove it).
        stale = folder / CHAT_TEMPLATE_FILE
        if stale.exists():
            if self.chat_template is not None:
                stale.write_text(self.chat_template, encoding="utf-8")
            else:
                stale.unlink()

    def _hf_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            # transformers 5 maps this to its tokenizers backend; transformers 4 knows it by this name too
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,  # decoding must give back the exact text
            "add_bos_token": False,  # bos/eos insertion lives in tokenizer.json's post-processor
            "add_eos_token": False,
        }
        for role in ROLE_TOKENS:
            if role in self.special_tokens:
                config[f"{role}_token"] = self.special_tokens[role]
        config["added_tokens_decoder"] = {
            str(token_id): {
                "content": token.content,
                "lstrip": token.lstrip,
                "normalized": token.normalized,
                "rstrip": token.rstrip,
                "single_word": token.single_word,
                "special": token.special,
            }
            for token_id, token in sorted(self.backend.get_added_tokens_decoder().items())
        }
        if self.chat_templates:
            if set(self.chat_templates) == {"default"}:
                config["chat_template"] = self.chat_templates["default"]
            else:
                config["chat_template"] = [{"name": n, "template": t} for n, t in self.chat_templates.items()]
        config["monovlm_special_tokens"] = {
            name: token for name, token in self.special_tokens.items() if name not in ROLE_TOKENS
        }
        return config

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the embedding rows a model needs for this tokenizer."""
        # get_vocab_size counts tokens, which falls short of max id + 1 if the ids have holes; rows must cover ids
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return max(self.backend.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_ids(self) -> dict[str, int]:
        """name -> id for every named special token (roles such as "eos" and monovlm names such as "image")."""
        return {name: self._required_id(token) for name, token in self.special_tokens.items()}

    @property
    def bos_id(self) -> int | None:
        return self._role_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._role_id("eos")

    @property
    def pad_id(self) -> int | None:
        # Many decoder-only checkpoints ship without a pad token; padding is masked anyway, so eos is a safe filler
        pad = self._role_id("pad")
        return pad if pad is not None else self.eos_id

    def _role_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self._required_id(token)

    def _required_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:  # add_special_tokens guarantees presence; this guards against a mutated backend
            raise TokenizerError(f"special token {token!r} is not in the vocabulary")
        return token_id

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def add_special_tokens(self, tokens: Mapping[str, str]) -> dict[str, int]:
        """Add name -> token string as atomic special tokens (reusing ids of tokens already present); name -> id."""
        for name, token in tokens.items():
            self.special_tokens[name] = token
            # Re-adding an existing token is a no-op in `tokenizers`; a token already in the base vocabulary keeps
            # its id but becomes atomic, so text can never spell it by a different split.
            if not _is_added_special(self.backend, token):
                self.backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        return {name: self._required_id(token) for name, token in tokens.items()}

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text. add_special_tokens=True applies the tokenizer's post-processor (e.g. a leading bos)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # int() accepts numpy/torch scalars too, so a row of a tensor can be passed directly
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None when the tokenizer has none."""
        return self.chat_templates.get("default")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render messages with the chat template, as transformers' `apply_chat_template` does.

        chat_template may name one of this tokenizer's templates or be a template string; None uses the default.
        Extra kwargs become template variables (e.g. tools=..., enable_thinking=False). tokenize=True returns ids,
        encoded without a post-processor bos because templates write their own.
        """
        template = self._resolve_chat_template(chat_template)
        variables = {f"{role}_token": self.special_tokens[role] for role in ROLE_TOKENS if role in self.special_tokens}
        variables.update(kwargs)  # caller's values win, as in transformers
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        text = _compile_chat_template(template).render(
            messages=_template_data([_without_none(message) for message in messages]),
            add_generation_prompt=add_generation_prompt,
            **_template_data(variables),
        )
        return self.encode(text) if tokenize else text

    def end_of_turn_token(self, chat_template: str | None = None) -> str | None:
        """The special token the chat template closes an assistant reply with (e.g. "<|im_end|>", "<|eot_id|>",
        "</s>"): the first special token it writes after the reply. None when it writes none there.

        Generation must stop on it: it need not be eos (Llama 3's base eos is <|end_of_text|>, its turns end with
        <|eot_id|>). Raises TokenizerError when there is no template or it cannot render a user/assistant exchange."""
        exchange = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            text = self.apply_chat_template(exchange, add_generation_prompt=False, chat_template=chat_template)
        except jinja2.TemplateError as error:
            raise TokenizerError(f"the chat template cannot render a user/assistant exchange: {error}") from error
        if "Hello" not in text:
            raise TokenizerError("the chat template does not write an assistant reply's text")
        closing = text[text.rindex("Hello") + len("Hello"):]
        special = {token.content for token in self.backend.get_added_tokens_decoder().values() if token.special}
        found = sorted((closing.find(token), -len(token), token) for token in special if token in closing)
        return found[0][2] if found else None  # the earliest; of two starting there, the longer one

    def _resolve_chat_template(self, chat_template: str | None) -> str:
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if self.chat_template is not None:
            return self.chat_template
        if self.chat_templates:
            raise TokenizerError(
                f"this tokenizer has no default chat template; pass chat_template= one of {sorted(self.chat_templates)}"
            )
        raise TokenizerError("this tokenizer has no chat template; pass chat_template= a jinja template string")


# ---------------------------------------------------------------------- reading HF folders


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from an optional file: {} when missing, TokenizerError when unreadable or not an object."""
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object, found {type(value).__name__}")
    return value


def _token_content(value: Any) -> str | None:
    """A special token as written in HF configs: a string, an AddedToken dict with "content", or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens_from_config(config: dict[str, Any], folder: Path) -> dict[str, str]:
    values = dict(config)
    # transformers 5 reads the legacy special_tokens_map.json only when the config lacks added_tokens_decoder, and
    # then lets it override the config; doing the same keeps the two loaders in agreement.
    if "added_tokens_decoder" not in config:
        values.update(_read_json(folder / SPECIAL_TOKENS_MAP_FILE))
    special_tokens = {}
    for role in ROLE_TOKENS:
        token = _token_content(values.get(f"{role}_token"))
        if token is not None:
            special_tokens[role] = token
    for name, token in (config.get("monovlm_special_tokens") or {}).items():
        if _token_content(token) is not None:
            special_tokens[name] = _token_content(token)
    return special_tokens


def _add_missing_decoder_tokens(backend: BackendTokenizer, decoder: dict[str, Any], config_path: Path) -> None:
    """Add tokens that tokenizer_config.json's added_tokens_decoder lists but tokenizer.json lacks (as HF does)."""
    for token_id, entry in sorted(decoder.items(), key=lambda item: int(item[0])):
        content = _token_content(entry)
        if content is None or backend.token_to_id(content) is not None:
            continue
        special = bool(entry.get("special", False)) if isinstance(entry, dict) else False
        backend.add_tokens([AddedToken(content, special=special, normalized=not special)])
        if backend.token_to_id(content) != int(token_id):
            # The config promised an id the vocabulary cannot give; a model trained on the promise would misread it
            raise TokenizerError(
                f"{config_path}: added token {content!r} is listed with id {token_id} but would get id "
                f"{backend.token_to_id(content)} in {TOKENIZER_FILE}"
            )


def _apply_bos_eos_flags(backend: BackendTokenizer, config: dict[str, Any], special_tokens: dict[str, str]) -> None:
    """Honour add_bos_token / add_eos_token only when tokenizer.json has no post-processor.

    transformers 5 ignores these flags whenever tokenizer.json exists and trusts its post-processor, which is where
    real checkpoints (Llama, Mistral) put their bos. When tokenizer.json is silent the flag is the only record of
    the intent, so we write it into the post-processor; `save` then carries it into tokenizer.json for every loader.
    """
    add_bos = bool(config.get("add_bos_token")) and "bos" in special_tokens
    add_eos = bool(config.get("add_eos_token")) and "eos" in special_tokens
    if backend.post_processor is not None or not (add_bos or add_eos):
        return
    bos, eos = special_tokens.get("bos"), special_tokens.get("eos")
    if (add_bos and backend.token_to_id(bos) is None) or (add_eos and backend.token_to_id(eos) is None):
        return  # the roles are added later by Tokenizer.__init__; a flag for a token that is not there yet is moot
    single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
    used = [token for token, flag in ((bos, add_bos), (eos, add_eos)) if flag]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(token, backend.token_to_id(token)) for token in dict.fromkeys(used)]
    )


def _chat_templates_from_folder(config: dict[str, Any], folder: Path) -> dict[str, str]:
    """name -> template. chat_template.jinja (and chat_templates/*.jinja) take priority over the config, as in HF."""
    templates: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):  # the older multi-template layout: [{"name": ..., "template": ...}, ...]
        for entry in raw:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise TokenizerError(f"{folder / CONFIG_FILE}: chat_template entries need a 'name' and a 'template'")
            templates[entry["name"]] = entry["template"]
    elif raw is not None:
        raise TokenizerError(
            f"{folder / CONFIG_FILE}: chat_template must be a string or a list, not {type(raw).__name__}"
        )
    jinja_files = [folder / CHAT_TEMPLATE_FILE] + sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja"))
    file_templates = {}
    for path in jinja_files:
        if path.is_file():
            name = "default" if path.name == CHAT_TEMPLATE_FILE else path.stem
            try:
                file_templates[name] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise TokenizerError(f"{path} could not be read: {error}") from error
    # transformers replaces the config's templates wholesale when any template file exists
    return file_templates or templates


def _is_added_special(backend: BackendTokenizer, token: str) -> bool:
    token_id = backend.token_to_id(token)
    if token_id is None:
        return False
    added = backend.get_added_tokens_decoder().get(token_id)
    return added is not None and added.content == token and added.special


# ---------------------------------------------------------------------- chat template rendering


class _GenerationTag(jinja2.ext.Extension):
    """Parses HF's `{% generation %}...{% endgeneration %}` (marks assistant text for masks) and renders its body.

    Without it, templates that use the tag (e.g. some SmolLM/Qwen ones) would fail to compile.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the `generation` token itself
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _template_data(value: Any) -> Any:
    """A plain-JSON copy of what a template may see.

    Templates are untrusted code: rich objects (images, tensors) carry methods the sandbox cannot vet, so each
    becomes an inert "<TypeName>" string (templates only test whether media keys exist). The copy also means a
    template can never mutate the caller's messages, and large images are never deep-copied. Same as transformers.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (str/int enums, numpy floats) are cut back to the base type, losing their extra methods
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_template_data(key): _template_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_template_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_template_data(item) for item in value)
    return f"<{type(value).__name__}>"


def _without_none(message: Any) -> Any:
    """A message without its None-valued keys, as transformers hands it to templates: OpenAI clients send
    `content=None`, `tool_calls=None`, `name=None`, and a template that tests `is defined` (or prints the value)
    would otherwise render them."""
    if isinstance(message, Mapping):
        return {key: value for key, value in message.items() if value is not None}
    return message


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's built-in tojson escapes <, >, & for HTML, which would change the text the model sees
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def _compile_chat_template(template: str) -> jinja2.Template:
    # Templates come from downloaded checkpoints, i.e. untrusted code: the sandbox forbids unsafe attribute access
    # and mutation of inputs. trim_blocks/lstrip_blocks are what every HF template is written against.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise TokenizerError(f"chat template does not compile: {error} (line {error.lineno})") from error


# ---------------------------------------------------------------------- training


def default_special_tokens() -> dict[str, str]:
    """The specials of a from-scratch tokenizer: one <|endoftext|> for bos/eos/pad, chat markers, image tokens."""
    return {"bos": ENDOFTEXT, "eos": ENDOFTEXT, "pad": ENDOFTEXT, **CHAT_SPECIAL_TOKENS, **IMAGE_SPECIAL_TOKENS}


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Mapping[str, str] | None = None,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) on texts; special_tokens maps name -> token (default_special_tokens()).

    Byte-level means every string is encodable and decodes back exactly: the 256 byte symbols are all in the
    vocabulary from the start, and no normalizer rewrites the text.
    """
    special_tokens = dict(default_special_tokens() if special_tokens is None else special_tokens)
    unique_specials = list(dict.fromkeys(special_tokens.values()))  # bos/eos/pad may share one token
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(alphabet) + len(unique_specials)
    if vocab_size < smallest:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: the byte alphabet ({len(alphabet)}) and the special tokens "
            f"({len(unique_specials)}) need {smallest} ids before any merge"
        )
    backend = BackendTokenizer(models.BPE())
    # use_regex splits words/numbers/punctuation GPT-2 style so merges never cross those boundaries
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in unique_specials],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    templates = {"default": chat_template} if chat_template is not None else {}
    return Tokenizer(backend, special_tokens, templates)


# ---------------------------------------------------------------------- image tokens and the model


def add_image_special_tokens(tokenizer: Tokenizer, model: "Decoder | None" = None) -> dict[str, int]:
    """Make the IMAGE_SPECIAL_TOKENS atomic special tokens of tokenizer; with a model, give every id a row.

    The model grows (mean-initialised rows, see `Decoder.resize_vocab`) only when an id falls outside its
    embedding: HF checkpoints often pad the embedding beyond the tokenizer, and those spare rows are used as is.
    It grows to the tokenizer's full size, so no id the tokenizer can produce is left without a row.
    name -> id is recorded in model.config.special_tokens. Calling it again changes nothing.
    """
    ids = tokenizer.add_special_tokens(IMAGE_SPECIAL_TOKENS)
    if model is None:
        return ids
    if max(ids.values()) >= model.config.vocab_size:
        model.resize_vocab(max(tokenizer.vocab_size, max(ids.values()) + 1))
    model.config.special_tokens.update(ids)
    model.config.validate()  # every recorded id must now be a row of the embedding
    return ids
