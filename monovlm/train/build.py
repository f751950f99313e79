"""Building the model a recipe asks for: from scratch (with a BPE tokenizer trained on the recipe's own data) or
from a local HF LLM, with the image special tokens added and vision experts copied from the language weights."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from monovlm.config import DecoderConfig, EncoderConfig, ProcessorConfig, VisionConfig, VLMConfig
from monovlm.data.datasets import SkippedSample
from monovlm.data.shards import read_data_records
from monovlm.data.processor import resolve_template
from monovlm.model.decoder import Decoder
from monovlm.model.vlm import EncoderFreeVLM
from monovlm.tokenizer import CHAT_SPECIAL_TOKENS, Tokenizer, add_image_special_tokens, train_bpe_tokenizer
from monovlm.train.recipe import VISUAL_DECODER_KEYS, Recipe

# the baseline encoder's start: random, or pretrained by masked patch prediction on the recipe's images ("mae", any
# data) or on the synthetic scenes' dense labels ("labels")
ENCODER_INITS = ("random", "mae", "labels")


_CHAT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def recipe_texts(recipe: Recipe, data_root: Path, skipped: dict[str, list[SkippedSample]] | None = None,
                 chat_roles: bool = False):
    """Every conversation turn of every stage's data (image markers removed): the tokenizer's training corpus. With
    `chat_roles`, each turn is preceded by its chatml role line ("user\n", "assistant\n"), text the model reads
    in every turn: learnt as whole tokens, a role costs one token instead of one per letter (a 4-layer model on
    short QA turns read ~28% fewer tokens per conversation).

    Records are read as the datasets read them (`read_records`), so a record they skip is skipped here too rather
    than stopping the run; each file's skipped records are put in `skipped`, under the file's name."""
    for file in (file for stage in recipe.stages for file, _, _ in stage.data_files):  # once per stage that reads it
        records, unusable = read_data_records(data_root / file)  # a data file or a shard folder
        if skipped is not None:
            skipped[file] = unusable
        for record in records:
            turns = record.get("conversations")
            for turn in turns if isinstance(turns, list) else []:
                if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                    if chat_roles and turn.get("from") in _CHAT_ROLES:
                        yield _CHAT_ROLES[turn["from"]] + "\n"
                    yield turn["value"].replace("<image>", "")


def skipped_line(skipped: dict[str, list[SkippedSample]]) -> str | None:
    """One line counting the records the tokenizer's corpus skipped, per file and reason; None if none was."""
    parts = []
    for file, items in skipped.items():
        if items:
            reasons = Counter(item.reason for item in items)
            parts.append(f"{file}: {len(items)} ({', '.join(f'{count} × {r}' for r, count in reasons.most_common())})")
    if not parts:
        return None
    return ("tokenizer corpus: skipped unusable records (the datasets skip them too, naming each) in "
            + "; ".join(parts))


def build_tokenizer(recipe: Recipe, data_root: Path) -> Tokenizer:
    if recipe.model.tokenizer:
        return Tokenizer.from_folder(recipe.model.tokenizer)
    if recipe.model.init != "scratch":
        return Tokenizer.from_folder(recipe.model.init)
    skipped: dict[str, list[SkippedSample]] = {}
    chat = any(stage.template in ("chatml", "auto") for stage in recipe.stages)  # "auto" is chatml for a new BPE
    tokenizer = train_bpe_tokenizer(recipe_texts(recipe, data_root, skipped, chat_roles=chat),
                                    vocab_size=recipe.model.vocab_size)
    line = skipped_line(skipped)
    if line is not None and os.environ.get("RANK", "0") == "0":  # every rank builds it; one line is enough
        print(line)
    return tokenizer


def build_model(recipe: Recipe, data_root: Path, progress: bool = True) -> tuple[EncoderFreeVLM, Tokenizer]:
    tokenizer = build_tokenizer(recipe, data_root)
    if any(resolve_template(stage.template, tokenizer) == "chatml" for stage in recipe.stages):
        # chatml turns, atomic even for HF tokenizers without them; an HF LLM trained with its own chat template
        # ("hf"/"auto") keeps its vocabulary, growing only by the image tokens
        tokenizer.add_special_tokens(CHAT_SPECIAL_TOKENS)
    decoder_values = dict(recipe.model.decoder)
    visual = {key: decoder_values.pop(key) for key in VISUAL_DECODER_KEYS if key in decoder_values}
    if recipe.model.init == "scratch":
        decoder = Decoder(DecoderConfig(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                                        bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id,
                                        **decoder_values))
    else:
        from monovlm.model.hf import load_hf_decoder

        if decoder_values:
            raise ValueError(f"[model.decoder] may only set {', '.join(VISUAL_DECODER_KEYS)} when init is an HF model; "
                             f"got {decoder_values}")
        decoder = load_hf_decoder(recipe.model.init)
        decoder.add_pre_buffer(visual.pop("pre_buffer_layers", 0))  # NEO: fresh identity layers before the LLM's
    add_image_special_tokens(tokenizer, decoder)
    if tokenizer.vocab_size > decoder.config.vocab_size:
        decoder.resize_vocab(tokenizer.vocab_size)
    decoder_config = DecoderConfig.from_dict({**decoder.config.to_dict(), **visual})
    encoder = EncoderConfig(**recipe.model.encoder) if recipe.model.encoder is not None else None
    config = VLMConfig(decoder=decoder_config, vision=VisionConfig(**recipe.model.vision),
                       processor=ProcessorConfig(template=recipe.stages[-1].template), encoder=encoder)
    model = EncoderFreeVLM(config)
    missing, unexpected = model.decoder.load_state_dict(decoder.state_dict(), strict=False)
    assert not unexpected and all("vision" in name or ".attn.hw." in name for name in missing), (missing, unexpected)
    if decoder_config.has_experts:
        model.decoder.init_experts_from_text()
    if decoder_config.native_rope and recipe.model.init != "scratch":
        model.decoder.init_native_rope_from_text()  # the loaded LLM's text logits unchanged at the start
    if recipe.model.encoder_init not in ENCODER_INITS:
        raise ValueError(f"[model] encoder_init={recipe.model.encoder_init!r} is not one of {ENCODER_INITS}")
    if encoder is not None and recipe.model.encoder_init != "random":
        from monovlm.data.image_files import stage_sources
        from monovlm.train.vit_pretrain import pretrain_vit

        vit = pretrain_vit(data_root, encoder, config.vision, steps=recipe.model.encoder_steps,
                           objective=recipe.model.encoder_init,
                           sources=stage_sources(recipe.stages), seed=recipe.seed, progress=progress)
        model.embedder.encoder.load_state_dict(vit.state_dict())
    return model, tokenizer
