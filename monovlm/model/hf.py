"""HF checkpoints in and out: config.json <-> DecoderConfig, and an explicit, strict weight map.

Reads a local folder holding `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`) for Llama, Mistral, Qwen2, Qwen3 and SmolLM2 (a Llama). Every checkpoint tensor must
map to exactly one monovlm parameter with the same shape, and every parameter must be filled: anything else is a
`CheckpointError` naming the key and the file. Writes the same layout back, so `transformers` loads what we save.
No network access: paths only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from monovlm.config import SUPPORTED_ARCHITECTURES, ConfigError, DecoderConfig
from monovlm.model.decoder import Decoder
from monovlm.model.rope import RotaryTable

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_CLASS_NAMES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the path, file and key involved."""


# ---------------------------------------------------------------------------------------------------------------
# config.json <-> DecoderConfig


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file; CheckpointError naming the file when it is missing, unreadable, not
    JSON, or JSON but not an object (a config or an index is always an object)."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is not UTF-8 text (a JSON file is): {error}") from error
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error.strerror or error}") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found a JSON {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either the transformers-4 (`rope_theta` + `rope_scaling`) or the
    transformers-5 (`rope_parameters`) spelling."""
    params = dict(hf.get("rope_parameters") or {})
    legacy_scaling = hf.get("rope_scaling")
    if legacy_scaling:
        params.update(legacy_scaling)
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return float(theta), None
    if rope_type in ("llama3", "yarn") and "original_max_position_embeddings" not in params:
        params["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    return float(theta), {"rope_type": rope_type, **params}


def config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
    """Translate an HF config.json dict. Unsupported features are refused by name rather than silently ignored."""
    arch = hf.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"model_type={arch!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported (only silu / SwiGLU)")
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported")
    if arch in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ConfigError(f"{arch} with use_sliding_window=true (per-layer sliding windows) is not supported")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in hf]
    if missing:
        raise ConfigError(f"config is missing required field(s) {missing}")
    theta, scaling = _rope_settings(hf)
    num_heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    extra = hf.get("monovlm", {})
    return DecoderConfig(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        attention_bias=True if arch == "qwen2" else attention_bias,
        o_proj_bias=attention_bias if arch in ("llama", "qwen3") else False,
        qk_norm=arch == "qwen3",
        sliding_window=hf.get("sliding_window") if arch == "mistral" else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=hf.get("initializer_range", 0.02),
        special_tokens=dict(extra.get("special_tokens", {})),
    )


def config_to_hf(config: DecoderConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    arch = config.architecture
    if config.has_experts:
        raise ConfigError("a decoder with modality experts has no HF equivalent; save the whole VLM instead")
    if arch == "qwen2" and (not config.attention_bias or config.o_proj_bias):
        raise ConfigError("a qwen2 checkpoint always has q/k/v bias and no o_proj bias; this config differs")
    if arch in ("llama", "qwen3") and config.attention_bias != config.o_proj_bias:
        raise ConfigError(f"{arch} uses one attention_bias flag for q/k/v and o_proj; this config sets them apart")
    if arch == "mistral" and (config.attention_bias or config.o_proj_bias):
        raise ConfigError("mistral has no attention biases")
    if config.qk_norm != (arch == "qwen3"):
        raise ConfigError(f"qk_norm={config.qk_norm} cannot be saved as {arch} (only qwen3 has q/k norms)")
    hf: dict[str, Any] = {
        "architectures": [HF_CLASS_NAMES[arch]],
        "model_type": arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "monovlm": {"special_tokens": config.special_tokens},
    }
    if arch in ("llama", "qwen3"):
        hf["attention_bias"] = config.attention_bias
    if arch == "llama":
        hf["mlp_bias"] = False
    if arch == "mistral":
        hf["sliding_window"] = config.sliding_window
    if arch in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    return hf


# ---------------------------------------------------------------------------------------------------------------
# weight map


# A mapped HF tensor is either a whole monovlm parameter (rows=None) or a block of rows of one (HF's separate
# q_proj / k_proj / v_proj are stacked into monovlm's fused qkv_proj).
Target = tuple[str, "slice | None"]


def weight_map(config: DecoderConfig) -> dict[str, Target]:
    """HF tensor name -> (monovlm parameter name, row slice or None), for every tensor a checkpoint of this config
    holds."""
    names: dict[str, Target] = {"model.embed_tokens.weight": ("embed_tokens.weight", None),
                                "model.norm.weight": ("norm.weight", None)}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", None)
    q_rows = config.num_heads * config.resolved_head_dim
    kv_rows = config.num_kv_heads * config.resolved_head_dim
    blocks = {"q_proj": slice(0, q_rows), "k_proj": slice(q_rows, q_rows + kv_rows),
              "v_proj": slice(q_rows + kv_rows, q_rows + 2 * kv_rows)}
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        names[hf + "input_layernorm.weight"] = (ours + "attn_norm.weight", None)
        names[hf + "post_attention_layernorm.weight"] = (ours + "mlp_norm.weight", None)
        for proj, rows in blocks.items():
            names[f"{hf}self_attn.{proj}.weight"] = (f"{ours}attn.qkv_proj.weight", rows)
            if config.attention_bias:
                names[f"{hf}self_attn.{proj}.bias"] = (f"{ours}attn.qkv_proj.bias", rows)
        names[f"{hf}self_attn.o_proj.weight"] = (f"{ours}attn.o_proj.weight", None)
        if config.o_proj_bias:
            names[f"{hf}self_attn.o_proj.bias"] = (f"{ours}attn.o_proj.bias", None)
        if config.qk_norm:
            names[f"{hf}self_attn.q_norm.weight"] = (f"{ours}attn.q_norm.weight", None)
            names[f"{hf}self_attn.k_norm.weight"] = (f"{ours}attn.k_norm.weight", None)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{hf}mlp.{proj}.weight"] = (f"{ours}mlp.{proj}.weight", None)
    return names


def _is_ignorable(hf_name: str, config: DecoderConfig) -> bool:
    # Old checkpoints stored RoPE's inverse frequencies (recomputed from the config).
    return hf_name.endswith("rotary_emb.inv_freq")


def _check_tied_head(head: torch.Tensor, file: Path, embeddings: torch.Tensor, folder: Path) -> None:
    """Some tied models still carry a copy of the output head, which the tie makes redundant: fine when it is a copy.
    A head that differs is a real second matrix; transformers keeps it, so dropping it would change every logit."""
    same = tuple(head.shape) == tuple(embeddings.shape) and torch.equal(head.to(embeddings.dtype), embeddings)
    if not same:
        raise CheckpointError(
            f"{folder / 'config.json'} sets tie_word_embeddings=true, but {file} holds an lm_head.weight that "
            "differs from model.embed_tokens.weight: the model was trained with a separate output head. Set "
            "tie_word_embeddings to false in config.json to load that head, or remove lm_head.weight from the file "
            "to tie the head to the embeddings")


# ---------------------------------------------------------------------------------------------------------------
# loading


@contextmanager
def open_safetensors(file: Path, device: str = "cpu") -> Iterator[Any]:
    """`safe_open`, with a damaged file (truncated download, an interrupted copy, a pickle named .safetensors) or an
    unreadable one turned into a CheckpointError naming it, instead of the library's message naming nothing."""
    try:
        handle = safe_open(str(file), framework="pt", device=device)
    except OSError as error:
        raise CheckpointError(f"{file} cannot be read: {error.strerror or error}") from error
    except Exception as error:  # safetensors raises its own SafetensorError (not an OSError) for a bad file
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {error}") from error
    with handle as f:
        yield f


def _get_tensor(f: Any, name: str, file: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as error:  # an I/O error or a damaged data section, surfacing only when the tensor is read
        raise CheckpointError(f"tensor {name!r} in {file} cannot be read: {error}") from error


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index_path, single_path = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_path.exists():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path} has no 'weight_map' object (tensor name -> shard file name)")
        for name, file in weight_map.items():
            if not isinstance(file, str) or not file or Path(file).name != file:
                raise CheckpointError(f"{index_path} maps {name!r} to {file!r}, which is not a file name in {folder}")
            if not file.endswith(".safetensors"):
                raise CheckpointError(
                    f"{index_path} lists shard {file}, which is not a safetensors file: monovlm reads safetensors "
                    "only (pickled .bin weights can run code when loaded); convert the checkpoint, e.g. with "
                    "transformers' save_pretrained(..., safe_serialization=True)")
        files = {name: folder / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise CheckpointError(f"{index_path} lists shard {file.name}, which does not exist in {folder}")
        return files
    if single_path.is_file():
        with open_safetensors(single_path) as f:
            return {name: single_path for name in f.keys()}
    bins = sorted(p.name for p in folder.glob("*.bin"))
    hint = f" (it has {', '.join(bins)}: monovlm reads safetensors only; convert with transformers' " \
           "save_pretrained(..., safe_serialization=True))" if bins else ""
    raise CheckpointError(f"{folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def _check_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist (monovlm loads local paths only)")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path {folder} is not a folder")
    return folder


def load_safetensors_strict(module: torch.nn.Module, weights: Path, device: str = "cpu") -> None:
    """Fill `module` from a safetensors file whose names are the module's own: every tensor present with its shape,
    nothing extra; errors name the file and the tensor. Floating-point tensors are cast to the module's dtype (a
    bf16 file fills a float32 model: the shipped model is stored in bf16 to halve its size)."""
    if not weights.is_file():
        raise CheckpointError(f"{weights.parent} has no {weights.name}")
    expected = module.state_dict()
    state = {}
    with open_safetensors(weights, device) as f:
        for name in f.keys():
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {name!r} in {weights}")
            tensor = _get_tensor(f, name, weights)
            if tensor.shape != expected[name].shape:
                raise CheckpointError(f"tensor {name!r} in {weights} has shape {tuple(tensor.shape)}, expected "
                                      f"{tuple(expected[name].shape)}")
            if tensor.dtype != expected[name].dtype:
                if not (tensor.is_floating_point() and expected[name].is_floating_point()):
                    raise CheckpointError(f"tensor {name!r} in {weights} is {tensor.dtype}, expected "
                                          f"{expected[name].dtype}")
                tensor = tensor.to(expected[name].dtype)
            state[name] = tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{weights} is missing tensor(s): {missing[:10]}")
    module.load_state_dict(state, strict=True)


def load_config(path: str | os.PathLike) -> DecoderConfig:
    config_path = _check_folder(path) / "config.json"
    try:
        return config_from_hf(read_json(config_path))
    except ConfigError as error:
        raise ConfigError(f"{config_path}: {error}") from error


def load_hf_decoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Decoder:
    """Build a Decoder from an HF folder, strictly: every tensor mapped, every parameter filled, every shape equal."""
    folder = _check_folder(path)
    config = load_config(folder)
    with torch.device("meta"):
        model = Decoder(config)
    expected = dict(model.named_parameters())
    names = weight_map(config)
    files = checkpoint_files(folder)
    state: dict[str, torch.Tensor] = {}
    loaded: set[str] = set()
    tied_head: tuple[torch.Tensor, Path] | None = None
    by_file: dict[Path, list[str]] = {}
    for hf_name, file in files.items():
        by_file.setdefault(file, []).append(hf_name)
    for file, hf_names in by_file.items():
        with open_safetensors(file, device) as f:
            present = set(f.keys())
            for hf_name in hf_names:
                if hf_name not in present:  # only an index can name a tensor its shard does not hold
                    raise CheckpointError(f"{folder / INDEX_FILE} says tensor {hf_name!r} is in {file.name}, but "
                                          f"{file} does not hold it")
                if hf_name not in names:
                    if config.tie_word_embeddings and hf_name == "lm_head.weight":
                        tied_head = (_get_tensor(f, hf_name, file), file)  # checked against the embeddings below
                        continue
                    if _is_ignorable(hf_name, config):
                        continue
                    raise CheckpointError(f"unexpected tensor {hf_name!r} in {file} (no monovlm parameter maps to it)")
                tensor = _get_tensor(f, hf_name, file)
                ours, rows = names[hf_name]
                target_shape = tuple(expected[ours].shape)
                if rows is not None:
                    target_shape = (rows.stop - rows.start, *target_shape[1:])
                if tuple(tensor.shape) != target_shape:
                    raise CheckpointError(
                        f"tensor {hf_name!r} in {file} has shape {tuple(tensor.shape)}, but the config "
                        f"({folder / 'config.json'}) implies {target_shape}"
                    )
                if rows is None:
                    state[ours] = tensor.to(dtype)
                else:  # one block of a fused parameter
                    if ours not in state:
                        state[ours] = torch.empty(expected[ours].shape, dtype=dtype, device=device)
                    state[ours][rows] = tensor.to(dtype)
                loaded.add(hf_name)
    missing = [hf for hf in names if hf not in loaded]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is missing tensor(s): {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
    if tied_head is not None:
        _check_tied_head(*tied_head, state["embed_tokens.weight"], folder)
    # own the memory: tensors still mapped from the file would pin it on disk (and may sit unaligned)
    state = {name: tensor.clone() if tensor.data_ptr() else tensor for name, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=True)  # the meta tensors are replaced by the loaded ones
    model.rotary = RotaryTable(config).to(device)  # buffers were on meta too; recompute them (fp32)
    return model


# ---------------------------------------------------------------------------------------------------------------
# saving


def save_hf_decoder(model: Decoder, path: str | os.PathLike, max_shard_bytes: int | None = None) -> Path:
    """Write config.json + model.safetensors (or shards + index when larger than max_shard_bytes)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    params = dict(model.named_parameters())
    tensors = {hf: (params[ours] if rows is None else params[ours][rows]).detach().contiguous().cpu()
               for hf, (ours, rows) in weight_map(config).items()}
    dtype = model.embed_tokens.weight.dtype
    (folder / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
    metadata = {"format": "pt"}
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # a previous save's shards must not mix with this one's
    if max_shard_bytes is None or sum(t.numel() * t.element_size() for t in tensors.values()) <= max_shard_bytes:
        save_file(tensors, str(folder / SINGLE_FILE), metadata=metadata)
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    index: dict[str, Any] = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": {}}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata=metadata)
        index["weight_map"].update({name: file_name for name in shard})
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return folder
