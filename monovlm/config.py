"""Model settings as plain dataclasses, saved into every checkpoint.

`DecoderConfig` describes a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM2). It is the single source of
truth for building the model; `monovlm.model.hf` converts it to and from HF `config.json` files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The model families whose HF checkpoints we read and write. SmolLM2 ships as model_type "llama".
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
IMAGE_ATTENTION = ("causal", "bidirectional")  # DecoderConfig.image_attention

# RoPE variants we implement exactly as HF does. "default" means plain RoPE with rope_theta.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ConfigError(ValueError):
    """An inconsistent or unsupported configuration; the message names the field and the reason."""


def strict_from_dict(cls, values: dict[str, Any]):
    """Build a config dataclass from a dict, refusing unknown keys by name (a typo must not fall back to a default)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {unknown}")
    return cls(**values)


@dataclass
class DecoderConfig:
    architecture: str = "llama"
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None -> hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF-style scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, ...}; None = plain RoPE
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama/Qwen3 when attention_bias=true)
    o_proj_bias: bool = False  # bias on the attention output projection (Llama/Qwen3 when attention_bias=true)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # Mistral: each query sees at most this many most recent keys
    # "causal" (EVE, Fuyu, SOLO, Mono-InternVL) or "bidirectional": the visual tokens of one image also see the later
    # tokens of that image (NEO), as a vision encoder's patches do; text stays causal, so generation is unchanged.
    image_attention: str = "causal"
    # V2PE: each visual token advances the RoPE position by this step (< 1: an image spends less of the context's
    # positions, so long image sequences stay within the positions the LLM was trained on); text tokens advance by 1.
    visual_position_step: float = 1.0
    # NEO's native RoPE: besides the 1-D rotary position t (which every image advances by one, all its visual tokens
    # sharing it), extra q/k projections whose two halves are rotated by each visual token's grid row h and column w
    # (rope_theta_hw); scores are q·k over [t | h | w]. A loaded LLM's k projection for h/w starts at zero, so its
    # text logits are unchanged (`Decoder.init_native_rope_from_text`).
    native_rope: bool = False
    rope_theta_hw: float = 10000.0
    # NEO's pre-buffer: the first N of num_layers are fresh layers in front of the LLM, trained alone first (part
    # `pre_buffer`); `Decoder.add_pre_buffer` prepends them to a loaded LLM as identities (zero output projections)
    pre_buffer_layers: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # Modality experts (EVEv2 "divide and conquer", Mono-InternVL/BREEN image experts): each layer holds a vision copy
    # of the chosen parts, and visual tokens take the vision copy. All False = one shared decoder (EVE, Fuyu, SOLO).
    expert_norms: bool = False  # the two pre-norms of each block
    expert_attention: bool = False  # q/k/v/o projections (and q/k norms where present); attention itself is shared
    expert_mlp: bool = False
    # Special tokens added by monovlm (name -> id), e.g. {"image": 32000, "image_start": 32001}. Recorded so a saved
    # model knows which rows of its embedding were grown and what they mean.
    special_tokens: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def has_experts(self) -> bool:
        return self.expert_norms or self.expert_attention or self.expert_mlp

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture={self.architecture!r} is not supported; choose one of {SUPPORTED_ARCHITECTURES}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.image_attention not in IMAGE_ATTENTION:
            raise ConfigError(f"image_attention={self.image_attention!r} is not one of {IMAGE_ATTENTION}")
        if self.native_rope and (self.expert_attention or self.resolved_head_dim % 4 != 0
                                 or self.visual_position_step != 1):
            raise ConfigError(f"native_rope needs a head_dim divisible by 4 (its h and w halves are rotated; got "
                              f"{self.resolved_head_dim}), no expert_attention (the experts have no h/w projections) "
                              "and visual_position_step = 1 (an image's tokens share one position)")
        if not 0 <= self.pre_buffer_layers < self.num_layers:
            raise ConfigError(f"pre_buffer_layers={self.pre_buffer_layers} must be at least 0 and below "
                              f"num_layers={self.num_layers} (the LLM keeps at least one layer)")
        if not 0 < self.visual_position_step <= 1:
            raise ConfigError(f"visual_position_step={self.visual_position_step} must be in (0, 1] (V2PE's delta)")
        if self.num_heads % self.num_kv_heads != 0:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (grouped-query "
                "attention shares each key/value head among a whole number of query heads)"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads != 0:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim explicitly"
            )
        if self.resolved_head_dim % 2 != 0:
            raise ConfigError(f"head_dim={self.resolved_head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(
                    f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
                )
        for name, token_id in self.special_tokens.items():
            if not 0 <= token_id < self.vocab_size:
                raise ConfigError(f"special token {name!r} has id {token_id}, outside vocab_size={self.vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DecoderConfig":
        return strict_from_dict(cls, values)


EMBEDDER_KINDS = ("linear", "eve", "conv")
IMAGE_POSITIONS = ("marker", "after_text")
VISION_STEMS = ("patch", "conv", "patch+conv", "cnn", "patch+cnn")


@dataclass
class VisionConfig:
    """How pixels become visual tokens: the resize policy and the embedder (no vision encoder).

    Each visual token covers `pixels_per_token` × `pixels_per_token` pixels: `patch_size` for the linear embedder
    (Fuyu 30, SOLO 32), `patch_size * merge` for `eve` (conv stem then 2×2 local attention) and `conv` (conv, GELU,
    2×2 strided conv, as EVEv2/NEO). The embedder may add a learned CLS token before the grid and a learned
    row-separator token after each row; every one of these occupies one placeholder position in `input_ids`.
    """

    embedder: str = "conv"
    patch_size: int = 16
    merge: int = 2  # 1 for linear; the 2×2 merge of eve/conv
    embedder_width: int = 256  # channels of the eve/conv stem
    embedder_heads: int = 4  # heads of eve's local/global attention
    # side of a residual conv over the token grid after the embedder (0: none): each token then sees its neighbours'
    # pixels (3: 3×3 tokens), so an object wider than one token can be recognised in the token at its centre
    embedder_context: int = 0
    # how many such residual convs (GELU before each): the later ones see further and add depth, so a token can
    # hold what a shape is, not only the pixels around it
    embedder_context_layers: int = 1
    patch_bias: bool = True  # bias of the linear embedder (Fuyu: yes, SOLO: no)
    # the eve/conv embedders' first step: "patch" (one strided conv per patch, EVE's) or "conv" (stride-2 3×3 convs
    # with GELU down to the patch, "Early convolutions help transformers see better"): a few local layers that can
    # tell a star from a hexagon inside the token, where one linear map of the pixels cannot; or "patch+conv": the
    # sum of both, so a patch's colour stays one linear read of its pixels beside what the convs make of its shape;
    # or "cnn": a small BatchNorm CNN (model/vit.py cnn_stem), whose features see whole small shapes; or "patch+cnn":
    # the CNN and the patch stem, added (with `[align] init_stem` the CNN starts as the teacher's, the patch stem at 0)
    stem: str = "patch"
    stem_depth: int = 1  # 3×3 convs per halving of the conv stem (its first one strided)
    # where a user turn's images sit among its tokens, in training and at inference alike: "marker" (where the
    # data's <image> markers put them; LLaVA data puts them before the question) or "after_text" (after the turn's
    # text): under causal attention the visual tokens then see what is asked, and each can match its pixels against
    # the question in place (what FiLM gives a CNN), not only be searched by the answer
    image_position: str = "marker"
    use_cls: bool = True
    use_row_separator: bool = True
    # BREEN's learnable queries: after each image's grid, one s×s set of learned tokens per entry (e.g. [1, 2, 4]:
    # 1 + 4 + 16 = 21 queries), each set aligned in training to the teacher's features pooled to s×s (`[align] target
    # = "queries"`); they are visual tokens (the vision experts read them), never dropped by token reduction
    query_grids: list[int] = field(default_factory=list)
    # TokenFLEX: each image's token grid average-pooled by this factor per side (a rows × cols grid gives
    # ceil(rows/p) × ceil(cols/p) tokens: about p² times fewer); a model trained with a stage's token_pools serves
    # each of them
    token_pool: int = 1
    min_pixels: int = 32 * 32
    max_pixels: int = 256 * 256  # area budget after resizing (native aspect ratio, no padding)
    max_source_pixels: int = 64_000_000  # refuse larger images before decoding them (decompression bombs)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        self.validate()

    @property
    def pixels_per_token(self) -> int:
        return self.patch_size * self.merge

    @property
    def num_queries(self) -> int:
        """Learnable query tokens after each image's grid (BREEN): the sum of the query grids' areas."""
        return sum(side * side for side in self.query_grids)

    def validate(self) -> None:
        if self.embedder not in EMBEDDER_KINDS:
            raise ConfigError(f"embedder={self.embedder!r} is not one of {EMBEDDER_KINDS}")
        if self.embedder == "linear" and self.merge != 1:
            raise ConfigError("the linear embedder has no merge step; set merge=1")
        if self.embedder in ("eve", "conv") and self.merge < 1:
            raise ConfigError(f"merge={self.merge} must be >= 1")
        if self.patch_size <= 0:
            raise ConfigError(f"patch_size={self.patch_size} must be positive")
        if self.embedder_context < 0 or (self.embedder_context and self.embedder_context % 2 == 0):
            raise ConfigError(f"embedder_context={self.embedder_context} must be 0 (none) or an odd conv side")
        if not isinstance(self.query_grids, list) or not all(
                type(side) is int and side >= 1 for side in self.query_grids):
            raise ConfigError(f"query_grids={self.query_grids!r} must be a list of positive grid sides, e.g. [1, 2, 4]")
        if type(self.token_pool) is not int or self.token_pool < 1:
            raise ConfigError(f"token_pool={self.token_pool!r} must be an integer >= 1")
        if self.stem not in VISION_STEMS:
            raise ConfigError(f"vision stem={self.stem!r} is not one of {VISION_STEMS}")
        if self.stem != "patch" and self.embedder == "linear":
            raise ConfigError("the linear embedder has no stem (Fuyu/SOLO: one Linear per raw patch); "
                              f"use embedder = 'eve' or 'conv' for stem = {self.stem!r}")
        if self.stem != "patch" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ConfigError(f"stem={self.stem!r} halves the image log2(patch_size) times: "
                              f"patch_size={self.patch_size} must be a power of two >= 2")
        if type(self.stem_depth) is not int or self.stem_depth < 1:
            raise ConfigError(f"stem_depth={self.stem_depth!r} must be an integer >= 1")
        if self.image_position not in IMAGE_POSITIONS:
            raise ConfigError(f"image_position={self.image_position!r} is not one of {IMAGE_POSITIONS}")
        if self.embedder_context_layers < 1:
            raise ConfigError(f"embedder_context_layers={self.embedder_context_layers} must be >= 1")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}")
        if self.max_pixels < self.pixels_per_token**2:
            raise ConfigError(
                f"max_pixels={self.max_pixels} is smaller than one token's area ({self.pixels_per_token}² pixels)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VisionConfig":
        return strict_from_dict(cls, values)


TEMPLATES = ("plain", "chatml", "hf", "auto")


@dataclass
class ProcessorConfig:
    """How conversations become token ids; saved with every model so training and inference agree."""

    # "plain": image then caption (pre-training); "chatml": monovlm's <|im_start|>role ... turns; "hf": the tokenizer's
    # own chat template (an HF LLM's, with its special tokens); "auto": "hf" if the tokenizer has a template, else chatml
    template: str = "chatml"
    # chatml and hf: the system turn that opens every conversation without one of its own, in training, evaluation and
    # serving alike (a request's system message, or `monovlm chat --system`, replaces it)
    system_prompt: str | None = None
    max_length: int = 2048  # longer samples are skipped and counted, never truncated through an image

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ConfigError(f"template={self.template!r} is not one of {TEMPLATES}")
        if self.max_length <= 0:
            raise ConfigError(f"max_length={self.max_length} must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ProcessorConfig":
        return strict_from_dict(cls, values)


@dataclass
class EncoderConfig:
    """The vision encoder of the encoder-based (LLaVA-style) baseline: a small ViT over the same patches.

    It reads patches of `VisionConfig.patch_size`, runs `depth` bidirectional transformer layers inside each image,
    then a `merge`×`merge` pixel-shuffle + MLP projector maps to the decoder width — so the baseline produces exactly
    as many visual tokens as the encoder-free `conv` embedder with the same VisionConfig, and the two models differ
    only in having a vision encoder.
    """

    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    # the patch stem: "patch" (one strided conv per patch, ViT's) or "conv" (stride-2 3×3 convs with GELU down to the
    # patch size, then a 1×1 conv: "Early convolutions help transformers see better", Xiao et al. 2021; a small ViT
    # learns shapes from few images far sooner) or "cnn" (a small CNN with BatchNorm and max-pooling, features that see
    # whole shapes: see model/vit.py cnn_stem). "conv" and "cnn" need a power-of-two patch size
    stem: str = "patch"
    # "conv": 3×3 convs per halving (the first strided); each more one widens what a patch's feature sees
    stem_depth: int = 1

    def __post_init__(self) -> None:
        if self.stem not in ("patch", "conv", "cnn"):
            raise ConfigError(f"encoder stem={self.stem!r} is not 'patch', 'conv' or 'cnn'")
        if type(self.stem_depth) is not int or self.stem_depth < 1:
            raise ConfigError(f"encoder stem_depth={self.stem_depth!r} must be an integer >= 1")
        if self.width % self.heads:
            raise ConfigError(f"encoder width={self.width} must be divisible by heads={self.heads}")
        if self.depth < (0 if self.stem == "cnn" else 1):  # a CNN's features stand alone; a patch's need layers
            raise ConfigError(f"encoder depth={self.depth} must be >= 1 (0, no transformer layers, with stem 'cnn')")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VLMConfig:
    """A VLM: the decoder, the pixel embedder (or, for the baseline, a vision encoder), the processor settings.

    `encoder=None` is the encoder-free model; an EncoderConfig makes the encoder-based baseline."""

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    encoder: EncoderConfig | None = None

    def __post_init__(self) -> None:
        if "image" not in self.decoder.special_tokens:
            raise ConfigError("decoder.special_tokens has no 'image' placeholder id; add the image special tokens "
                              "to the tokenizer and model first (monovlm.tokenizer.add_image_special_tokens)")

    @property
    def image_token_id(self) -> int:
        return self.decoder.special_tokens["image"]

    def to_dict(self) -> dict[str, Any]:
        return {"decoder": self.decoder.to_dict(), "vision": self.vision.to_dict(), "processor": self.processor.to_dict(),
                "encoder": self.encoder.to_dict() if self.encoder is not None else None}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VLMConfig":
        unknown = sorted(set(values) - {"decoder", "vision", "processor", "encoder"})
        if unknown:
            raise ConfigError(f"unknown VLMConfig field(s): {unknown}")
        encoder = values.get("encoder")
        return cls(
            decoder=DecoderConfig.from_dict(values["decoder"]),
            vision=VisionConfig.from_dict(values.get("vision", {})),
            processor=ProcessorConfig.from_dict(values.get("processor", {})),
            encoder=EncoderConfig(**encoder) if encoder is not None else None,
        )
