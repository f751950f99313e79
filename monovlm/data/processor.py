"""Conversations -> token ids, labels and image tensors: the one place that decides what the model reads.

A LLaVA-format sample (`{"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}`) becomes:
- `input_ids` where each `<image>` marker is replaced by image_start, one placeholder id per visual token
  (`num_image_tokens`: CLS, grid and row separators), image_end;
- `labels` equal to the token where the loss applies (assistant replies and their end token, or the caption in the
  `plain` pre-training template) and IGNORE_INDEX elsewhere;
- the image tensors, in order of appearance.

`Processor.encode_chat` is the one chat builder: training samples, evaluation prompts and the server's and terminal
chat's prompts all go through it, so the same conversation is the same token ids on every path (the system turn
included). Text is encoded piece by piece between fixed template tokens.

Templates (`ProcessorConfig.template`):
- `plain`: the image(s), then the caption and eos (pre-training);
- `chatml`: monovlm's own `<|im_start|>role ... <|im_end|>` turns, built token by token;
- `hf`: the tokenizer's own Jinja chat template (e.g. Qwen2's ChatML with its default system prompt, Llama-3's
  `<|start_header_id|>` headers), rendered as transformers renders it. The conversation is rendered whole, and once
  more up to each assistant reply (with the generation prompt) and through it, which finds where each reply starts and
  ends in the text; the text is then encoded piece by piece between those points and the image markers. So a training
  sample's ids are exactly the inference prompt's ids followed by the reply's, and the loss covers each reply up to and
  including the template's end-of-turn token (the first special token the template writes after a reply: `<|im_end|>`,
  `<|eot_id|>`, `</s>`), which is also where generation stops;
- `auto`: `hf` when the tokenizer has a chat template, else `chatml`. On a tokenizer monovlm trained (its template is
  ChatML) both give the same ids.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jinja2 import TemplateError
from PIL import Image

from monovlm.config import ConfigError, ProcessorConfig, VisionConfig
from monovlm.data.images import (
    ImageLoadError,
    ImagePathError,
    image_path_under,
    image_to_tensor,
    load_image,
    num_image_tokens,
)
from monovlm.tokenizer import TokenizerError

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class Turn(NamedTuple):
    role: str  # "system", "user" or "assistant"
    text: str  # the message text, with IMAGE_MARKER where each of its images goes


class SampleError(ValueError):
    """A sample that cannot be turned into model inputs; datasets skip it and count the reason."""


@dataclass
class ProcessedSample:
    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor]  # (3, H, W) each, in order of appearance
    image_keys: list[str] = field(default_factory=list)  # the images' paths as written in the data (for teachers'
    # precomputed features); empty when images were passed in directly
    label_weights: list[float] | None = None  # per token, scaling its loss (a stage's yes_no = "weighted"); None: 1
    turn_ids: list[int] | None = None  # isolated turns (`Processor.isolated_turns`): 0 shared, k turn k; None: plain

    def __len__(self) -> int:
        return len(self.input_ids)


class Processor:
    def __init__(self, tokenizer, vision: VisionConfig, config: ProcessorConfig | None = None,
                 token_pools: Sequence[int] | None = None, pool_seed: int = 0):
        self.tokenizer = tokenizer
        self.vision = vision
        self.config = config or ProcessorConfig()
        # TokenFLEX training: each training image laid out at a pooling factor drawn from these (see `image_pool`)
        self.token_pools = list(token_pools) if token_pools else None
        self.pool_seed = pool_seed
        ids = tokenizer.special_ids
        for name in ("image", "image_start", "image_end"):
            if name not in ids:
                raise ConfigError(f"the tokenizer has no {name!r} special token; call add_image_special_tokens first")
        self.image_id, self.image_start_id, self.image_end_id = ids["image"], ids["image_start"], ids["image_end"]
        self.eos_id = tokenizer.eos_id
        self.template = resolve_template(self.config.template, tokenizer)  # "plain", "chatml" or "hf"
        self.end_of_turn: list[int] = []  # hf: the token(s) the chat template closes an assistant reply with
        if self.template == "chatml":
            for token in ("<|im_start|>", "<|im_end|>"):
                if tokenizer.token_to_id(token) is None:
                    raise ConfigError(f"template 'chatml' needs the special token {token} in the tokenizer")
            self.im_start = [tokenizer.token_to_id("<|im_start|>")]
            self.im_end = [tokenizer.token_to_id("<|im_end|>")]
        elif self.template == "hf":
            self.end_of_turn = self._probe_chat_template()
        elif self.eos_id is None:
            raise ConfigError("template 'plain' ends each caption with eos, but the tokenizer has no eos token")

    # ---------------------------------------------------------------------------------------------------------------
    # images

    def load(self, source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
        return load_image(source, max_source_pixels=self.vision.max_source_pixels)

    def image_pool(self, key: str) -> int:
        """The TokenFLEX pooling factor of the training image named `key` (its path in the data): drawn from
        `token_pools` by the key and the seed alone, so every worker, rank and resumed run lays it out alike."""
        if not self.token_pools:
            return self.vision.token_pool
        digest = hashlib.blake2b(f"{self.pool_seed}:{key}".encode(), digest_size=8).digest()  # not CRC: it is linear
        return self.token_pools[int.from_bytes(digest, "big") % len(self.token_pools)]

    def image_block(self, image: Image.Image) -> tuple[list[int], torch.Tensor]:
        """Token ids of one image (start, placeholders, end) and its pixel tensor (3, H, W). The placeholders are
        those of its TokenFLEX pooling (`image.info["token_pool"]` when `process` drew one, else the config's); the
        model reads the pooling back from their count."""
        count = num_image_tokens(image.height, image.width, self.vision, image.info.get("token_pool"))
        return [self.image_start_id] + [self.image_id] * count + [self.image_end_id], image_to_tensor(image, self.vision)

    def _encode_with_images(self, text: str, images: list[Image.Image | int],
                            next_image: int) -> tuple[list[int], list[torch.Tensor], int]:
        # an int in `images` stands for an image of that many visual tokens: its block's ids, no pixels (token_count)
        ids: list[int] = []
        tensors: list[torch.Tensor] = []
        pieces = text.split(IMAGE_MARKER)
        for position, piece in enumerate(pieces):
            if position > 0:
                image = images[next_image]
                if isinstance(image, int):
                    ids += [self.image_start_id] + [self.image_id] * image + [self.image_end_id]
                else:
                    block, tensor = self.image_block(image)
                    ids += block
                    tensors.append(tensor)
                next_image += 1
            if piece:
                ids += self.tokenizer.encode(piece)
        return ids, tensors, next_image

    # ---------------------------------------------------------------------------------------------------------------
    # training samples

    def process(self, sample: dict[str, Any], image_root: str | os.PathLike | None = None,
                images: Sequence[Image.Image] | None = None, keys: Sequence[str] | None = None,
                isolate_turns: bool = False) -> ProcessedSample:
        """One LLaVA-format sample -> ProcessedSample; its images read from their paths, or given as `images`
        (read elsewhere, e.g. from a shard, named by `keys`). With `isolate_turns`, a conversation of independent
        questions about one image is laid out as `isolated_turns` does (others as usual). Raises SampleError (or
        ImageLoadError) for unusable samples."""
        turns = _turns(sample)
        keys = list(keys or [])
        if images is None:
            paths = _image_paths(sample, image_root)
            images = [self.load(path) for path in paths]
            keys = _image_names(sample)
        if self.token_pools and len(keys) == len(images):
            for image, key in zip(images, keys):
                image.info["token_pool"] = self.image_pool(key)
        turns = _place_image_markers(turns, len(images))
        result = self.isolated_turns(turns, images) if isolate_turns else None
        if result is None:  # not asked, or a conversation the isolated layout does not fit
            result = self.encode_chat(turns, images)
        if len(result) > self.config.max_length:
            raise SampleError(f"sample has {len(result)} tokens, over max_length={self.config.max_length}")
        if all(label == IGNORE_INDEX for label in result.labels):
            raise SampleError("sample has no answer tokens to learn from")
        result.image_keys = keys
        return result

    def isolated_turns(self, turns: Sequence[Turn], images: Sequence[Image.Image]) -> ProcessedSample | None:
        """Independent questions about one image (a conversation `group_by_image` merged) as one training row whose
        turns do not see each other: the prompt head and the image once (turn id 0), then each question and its reply
        as its single sample has them after the image (turn id k). The decoder (`Decoder.turn_inputs`) lets turn k
        attend to the shared tokens and itself, at its single sample's positions, so each reply's loss is exactly its
        single sample's — no turn reads the answers of the others (in VQA data they often tell the next one: "What
        colour is the ring?" "red", then "Is there a red ring?") — and the image is still read once per row.

        None where the layout does not apply, for the caller to encode the conversation as it is: not one image, not
        (user, assistant) pairs after an optional system turn with the image marker in the first question, one pair
        only, the "plain" template, or a template whose tokens before the image differ between questions (an image
        placed after the text)."""
        turns = [Turn(*turn) for turn in turns]
        system = turns[:1] if turns and turns[0].role == "system" else []
        pairs = turns[len(system):]
        if (len(images) != 1 or self.template == "plain" or len(pairs) < 4 or len(pairs) % 2
                or any(turn.role != ("user", "assistant")[i % 2] for i, turn in enumerate(pairs))
                or IMAGE_MARKER not in pairs[0].text
                or sum(turn.text.count(IMAGE_MARKER) for turn in turns) != 1):
            return None
        first = self.encode_chat(system + pairs[:2], images)
        head_length = first.input_ids.index(self.image_start_id)
        shared = first.input_ids.index(self.image_end_id) + 1
        ids, labels, turn_ids = first.input_ids[:shared], first.labels[:shared], [0] * shared
        for number in range(0, len(pairs), 2):
            if number == 0:
                single, start = first, shared
            else:  # the question as its own record had it; a 1-token image stands in (only the text after it is kept)
                question = Turn("user", IMAGE_MARKER + "\n" + pairs[number].text)
                single = self.encode_chat(system + [question, pairs[number + 1]], [1])
                if single.input_ids[:head_length + 1] != first.input_ids[:head_length + 1]:
                    return None
                start = head_length + 3  # image start, the stand-in, image end
            ids += single.input_ids[start:]
            labels += single.labels[start:]
            turn_ids += [number // 2 + 1] * (len(single) - start)
        return ProcessedSample(ids, labels, first.images, turn_ids=turn_ids)

    def token_count(self, sample: dict[str, Any], image_tokens: Sequence[int]) -> int:
        """The length `process` gives `sample` when its images have these numbers of visual tokens
        (`num_image_tokens`), measured without reading an image: the same ids are built, each image's block of
        placeholders without its pixels. Raises SampleError for a sample `process` refuses for its form."""
        turns = _place_image_markers(_turns(sample), len(image_tokens))
        return len(self.encode_chat(turns, list(image_tokens)))

    # ---------------------------------------------------------------------------------------------------------------
    # the chat builder: training samples and inference prompts

    def encode_chat(self, turns: Sequence[Turn], images: Sequence[Image.Image | int] = (),
                    add_generation_prompt: bool = False) -> ProcessedSample:
        """A conversation -> token ids, labels (on the assistant's replies) and image tensors.

        Each IMAGE_MARKER in a turn's text takes the next image. With `add_generation_prompt` the ids end where the
        model starts its answer (inference); without, they are a training sample. chatml and hf: the config's system
        prompt opens the conversation unless it has its own system turn. plain: a training sample is the images, then
        the caption (the last assistant reply) and eos; a prompt is the one user message with its images. An int in
        `images` stands for an image of that many visual tokens: its block's ids are built, no pixels (token_count)."""
        turns = [Turn(*turn) for turn in turns]
        if self.vision.image_position == "after_text":
            turns = images_after_text(turns)
        images = list(images)
        markers = sum(turn.text.count(IMAGE_MARKER) for turn in turns)
        if markers != len(images):
            raise SampleError(f"the conversation has {markers} image marker(s) ({IMAGE_MARKER}) for {len(images)} "
                              "image(s)")
        if self.template == "plain":
            return self._plain_prompt(turns, images) if add_generation_prompt else self._plain(turns, images)
        if self.template == "hf":
            return self._hf(self._with_system_prompt(turns), images, add_generation_prompt)
        result = self._chatml(self._with_system_prompt(turns), images)
        if add_generation_prompt:  # open the assistant's turn: the model writes from here
            answer_header = self._header("assistant")
            result.input_ids += answer_header
            result.labels += [IGNORE_INDEX] * len(answer_header)
        return result

    def prompt(self, question: str, images: Sequence[Image.Image] = ()) -> tuple[list[int], list[torch.Tensor]]:
        """Token ids ending where the model should start answering one question, and the image tensors.

        Images without an `<image>` marker in the question go before it, as in training data."""
        images = list(images)
        result = self.encode_chat([question_turn(question, len(images))], images, add_generation_prompt=True)
        return result.input_ids, result.images

    def _with_system_prompt(self, turns: list[Turn]) -> list[Turn]:
        # the configured system prompt is the default; a conversation's own system turn replaces it
        if self.config.system_prompt and not any(turn.role == "system" for turn in turns):
            return [Turn("system", self.config.system_prompt), *turns]
        return turns

    def _header(self, role: str) -> list[int]:
        return self.im_start + self.tokenizer.encode(role + "\n")

    def _chatml(self, turns: list[Turn], images: list[Image.Image]) -> ProcessedSample:
        # each turn: <|im_start|>role\n body <|im_end|>\n; the loss covers an assistant's body and its <|im_end|>
        ids: list[int] = []
        labels: list[int] = []
        tensors: list[torch.Tensor] = []
        next_image = 0
        newline = self.tokenizer.encode("\n")
        for role, text in turns:
            header = self._header(role)
            body, body_images, next_image = self._encode_with_images(text, images, next_image)
            tensors += body_images
            ids += header + body + self.im_end + newline
            if role == "assistant":
                labels += [IGNORE_INDEX] * len(header) + body + self.im_end + [IGNORE_INDEX] * len(newline)
            else:
                labels += [IGNORE_INDEX] * (len(header) + len(body) + len(self.im_end) + len(newline))
        return ProcessedSample(ids, labels, tensors)

    # ---------------------------------------------------------------------------------------------------------------
    # the tokenizer's own chat template

    def _render(self, turns: Sequence[Turn], add_generation_prompt: bool) -> str:
        messages = [{"role": role, "content": text} for role, text in turns]
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except (TemplateError, TokenizerError) as error:  # e.g. the template's raise_exception on a role it refuses
            raise SampleError(f"the tokenizer's chat template cannot render this conversation: {error}") from error

    def _reply_spans(self, turns: Sequence[Turn], text: str) -> list[tuple[int, int]]:
        """(start, end) in `text` (the whole conversation, rendered) of each assistant reply with its closing.

        A reply starts where the conversation before it, rendered with the generation prompt, ends, and ends where
        the conversation through it ends. Both must be prefixes of `text`: a template that renders earlier turns
        differently as the conversation grows (e.g. dropping past reasoning) has no one token sequence per turn."""
        spans = []
        for index, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            before = self._render(turns[:index], add_generation_prompt=True)
            through = self._render(turns[: index + 1], add_generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise SampleError(f"the tokenizer's chat template renders the conversation up to assistant turn "
                                  f"{index} differently once it goes on (the rendering of a shorter conversation is "
                                  "not a prefix of the longer one), so its replies cannot be located; use template "
                                  "'chatml'")
            spans.append((len(before), len(through)))
        return spans

    def _hf(self, turns: list[Turn], images: list[Image.Image], add_generation_prompt: bool) -> ProcessedSample:
        text = self._render(turns, add_generation_prompt)
        spans = self._reply_spans(turns, text)
        if text.count(IMAGE_MARKER) != len(images):
            raise SampleError(f"the chat template's rendering has {text.count(IMAGE_MARKER)} image marker(s) "
                              f"({IMAGE_MARKER}) for {len(images)} image(s) (a template that drops or repeats a "
                              "message's text cannot place images)")
        # Cut the text at every reply's start and end: each piece is encoded on its own, so the ids up to a reply
        # are the same whether or not the reply follows (a tokenizer could otherwise merge across the boundary).
        cuts = sorted({0, len(text), *(point for span in spans for point in span)})
        ids: list[int] = []
        labels: list[int] = []
        tensors: list[torch.Tensor] = []
        next_image = 0
        starts = {start for start, _ in spans}
        for start, end in zip(cuts, cuts[1:]):
            piece_ids, piece_images, next_image = self._encode_with_images(text[start:end], images, next_image)
            tensors += piece_images
            ids += piece_ids
            labels += self._reply_labels(piece_ids) if start in starts else [IGNORE_INDEX] * len(piece_ids)
        return ProcessedSample(ids, labels, tensors)

    def _reply_labels(self, reply: list[int]) -> list[int]:
        # the loss covers the reply through its end-of-turn token, not what the template writes after it (a newline):
        # generation stops at that token, so nothing after it is ever predicted
        end = next((i for i, token in enumerate(reply) if token in self.end_of_turn), None)
        if end is None:
            raise SampleError("an assistant reply has no end-of-turn token "
                              f"({[self.tokenizer.id_to_token(t) for t in self.end_of_turn]}) after it")
        return reply[: end + 1] + [IGNORE_INDEX] * (len(reply) - end - 1)

    def _probe_chat_template(self) -> list[int]:
        """The end-of-turn token of the tokenizer's chat template, after checking on a two-exchange conversation
        that the template can serve as a training template. Raises ConfigError when it does not render, its replies
        cannot be located, or nothing special closes a reply (the model could then never learn where to stop)."""
        if self.tokenizer.chat_template is None:
            raise ConfigError("template 'hf' uses the tokenizer's chat template, but the tokenizer has none; use "
                              "'chatml' (or 'auto', which falls back to it)")
        # with the configured system prompt, so a template refusing a system turn fails here, not on every sample
        probe = self._with_system_prompt([Turn("user", "Hi"), Turn("assistant", "Hello"), Turn("user", "Bye"),
                                          Turn("assistant", "Bye")])
        try:
            self._reply_spans(probe, self._render(probe, add_generation_prompt=False))
            token = self.tokenizer.end_of_turn_token()
        except (SampleError, TokenizerError) as error:
            raise ConfigError(f"template 'hf': {error}") from error
        if token is None:
            raise ConfigError("template 'hf': the tokenizer's chat template writes no special token after an "
                              "assistant reply, so there is no token to end an answer on")
        return [self.tokenizer.token_to_id(token)]

    # ---------------------------------------------------------------------------------------------------------------
    # pre-training captions

    def _plain(self, turns: list[Turn], images: list[Image.Image]) -> ProcessedSample:
        # Pre-training: the image(s), then the caption (the last reply) and eos; only the caption carries loss.
        prompt_text = "".join(IMAGE_MARKER for _ in images)
        ids, tensors, _ = self._encode_with_images(prompt_text, images, 0)
        caption = [text for role, text in turns if role == "assistant"]
        if not caption:
            raise SampleError("plain template needs a caption (a gpt/assistant turn)")
        target = self.tokenizer.encode(caption[-1].replace(IMAGE_MARKER, "").strip()) + [self.eos_id]
        return ProcessedSample(ids + target, [IGNORE_INDEX] * len(ids) + target, tensors)

    def _plain_prompt(self, turns: list[Turn], images: list[Image.Image]) -> ProcessedSample:
        if len(turns) != 1 or turns[0].role != "user":
            raise SampleError("the 'plain' (pre-training) template reads a single user message with its images, not "
                              f"a {len(turns)}-turn conversation")
        ids, tensors, _ = self._encode_with_images(turns[0].text, images, 0)
        return ProcessedSample(ids, [IGNORE_INDEX] * len(ids), tensors)

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an answer: <|im_end|> for chatml, the template's end-of-turn token for hf; eos for all."""
        stops = list(self.im_end) if self.template == "chatml" else list(self.end_of_turn)
        if self.eos_id is not None and self.eos_id not in stops:
            stops.append(self.eos_id)
        return stops


def resolve_template(template: str, tokenizer) -> str:
    """The template a processor builds with: "auto" becomes "hf" when the tokenizer has a chat template, else
    "chatml"; the others are themselves."""
    if template == "auto":
        return "hf" if tokenizer.chat_template is not None else "chatml"
    return template


def question_turn(question: str, num_images: int) -> Turn:
    """The user turn asking `question` about `num_images` images: unless the question places them with <image>
    markers, they go before it, on a line of their own, as in training data."""
    if num_images and IMAGE_MARKER not in question:
        return Turn("user", IMAGE_MARKER * num_images + ("\n" + question if question else ""))
    return Turn("user", question)


def images_after_text(turns: Sequence[Turn]) -> list[Turn]:
    """Each user turn's image markers moved after its text, on a line of their own (`image_position =
    "after_text"`): "<image>\nIs there a star?" -> "Is there a star?\n<image>". Images between pieces of text
    all go to the end, in their order."""
    moved = []
    for turn in turns:
        count = turn.text.count(IMAGE_MARKER)
        if turn.role != "user" or count == 0:
            moved.append(turn)
            continue
        text = turn.text.replace(IMAGE_MARKER, "").strip()
        moved.append(Turn(turn.role, (text + "\n" if text else "") + IMAGE_MARKER * count))
    return moved


# -------------------------------------------------------------------------------------------------------------------
# sample parsing helpers


def _turns(sample: dict[str, Any]) -> list[Turn]:
    conversations = sample.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise SampleError("sample has no 'conversations' list")
    turns = []
    for number, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SampleError(f"conversation turn {number} is not an object with a string 'value'")
        if has_lone_surrogate(turn["value"]):
            raise SampleError(f"conversation turn {number} holds a lone surrogate (text no UTF-8 can encode)")
        speaker = turn.get("from", "")
        role = ROLE_NAMES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise SampleError(f"conversation turn {number} has unknown speaker {turn.get('from')!r}")
        turns.append(Turn(role, turn["value"]))
    return turns


def has_lone_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate (U+D800..U+DFFF): a str Python allows (from a "\\ud800" escape in JSON,
    or bytes decoded with errors="surrogateescape") but no UTF-8 can encode and no tokenizer takes."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def _image_paths(sample: dict[str, Any], image_root: str | os.PathLike | None) -> list[Path]:
    """The sample's image paths resolved under image_root; a path that escapes the root is refused."""
    entry = sample.get("image", sample.get("images"))
    if entry is None:
        return []
    names = [entry] if isinstance(entry, str) else entry
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise SampleError("'image' must be a path string or a list of path strings")
    paths = []
    for name in names:
        if image_root is None:
            paths.append(Path(name))
            continue
        try:
            paths.append(image_path_under(image_root, name))  # the rule the eval readers apply too
        except ImagePathError as error:
            raise SampleError(str(error)) from error
    return paths


def _image_names(sample: dict[str, Any]) -> list[str]:
    entry = sample.get("image", sample.get("images"))
    return [] if entry is None else [entry] if isinstance(entry, str) else list(entry)


def _place_image_markers(turns: list[Turn], num_images: int) -> list[Turn]:
    markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
    if markers == num_images:
        return turns
    if markers == 0 and num_images > 0:
        # LLaVA data normally carries the marker; when it doesn't, the images go before the first user message
        for index, (role, text) in enumerate(turns):
            if role == "user":
                turns = list(turns)
                turns[index] = Turn(role, IMAGE_MARKER * num_images + "\n" + text)
                return turns
    raise SampleError(f"sample has {markers} <image> markers but {num_images} image(s)")


__all__ = ["IGNORE_INDEX", "IMAGE_MARKER", "ImageLoadError", "ProcessedSample", "Processor", "SampleError", "Turn",
           "has_lone_surrogate", "images_after_text", "question_turn", "resolve_template"]
