"""Pretrained weights in and out: find them, turn a GGUF file into an HF folder, load, export.

Everything inside trainkit speaks the HF folder format (config.json + safetensors + tokenizer files),
because our parameter names are transformers' Llama/Qwen2 names. A ``.gguf`` file (what llama.cpp
ships) is dequantised to float32 and converted once into a cached HF folder. Mixture-of-experts
checkpoints (Mixtral, Qwen2-MoE) keep one tensor per expert and projection; ours are stacked per
layer (``trainkit.moe``), so loading and export map between the two.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from functools import partial
from operator import attrgetter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from trainkit.config import ConfigError, ModelConfig, RopeScaling
from trainkit.model import head_dim
from trainkit.moe import expert_size

PYPI_PREFIX = "pypi:"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# What a model download needs; skips the .bin/.onnx/.gguf copies many hub repos also carry.
HUB_MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    *TOKENIZER_FILES,
]
SHAPE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "vocab_size",
    "head_dim",
    "tie_embeddings",
    "qkv_bias",
    "num_experts",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)
# Fields a config may leave None, compared by the value they resolve to.
RESOLVED_FIELDS = {"head_dim": head_dim, "moe_intermediate_size": expert_size}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
# Checkpoint names of each expert's (gate, up, down) projection; Mixtral also names its MoE block
# "block_sparse_moe" where ours is "mlp".
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj")}
PROJECTION = {name: i for names in EXPERT_NAMES.values() for i, name in enumerate(names)}
EXPERT_KEY = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def resolve_source(source: str, field: str = "model.source", allow_patterns: list[str] | None = None) -> str:
    """A local path for ``source``: ``pypi:<module>/<path>``, a local path, or a hub repo id."""
    if source.startswith(PYPI_PREFIX):
        module, _, relative = source[len(PYPI_PREFIX) :].partition("/")
        # find_spec on a top-level name locates the package without importing (running) it.
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"{field}={source!r}: Python package {module!r} is not installed: "
                f"pip install --no-deps {module.replace('_', '-')}"
            )
        path = Path(spec.submodule_search_locations[0]) / relative
        if not path.exists():
            raise ConfigError(f"{field}={source!r}: package {module!r} has no {relative!r}; check the file name")
        return str(path)
    path = os.path.expanduser(source)
    if os.path.exists(path):
        return path
    if source.startswith(("/", ".", "~")) or source.endswith((".gguf", ".safetensors")):
        raise ConfigError(f"{field}={source!r} does not exist: point {field} at an HF folder or .gguf file")
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(source, allow_patterns=allow_patterns)
    except Exception as err:  # offline, unknown repo, gated, ...: all mean the same thing to the user
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"{field}={source!r} is not a local path and the hub download failed ({reason}): "
            f"point {field} at a local HF folder or .gguf file"
        ) from None


def prepare_hf_folder(source: str, cache_dir: str, field: str = "model.source") -> Path:
    """An HF-format folder for ``source``; a ``.gguf`` file is converted once into ``cache_dir``."""
    path = Path(resolve_source(source, field, allow_patterns=HUB_MODEL_FILES))
    if path.is_file() and path.suffix == ".gguf":
        return _cached_gguf_conversion(path, Path(cache_dir) / "converted")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{field}={source!r} has no config.json: point {field} at an HF folder or .gguf file")
    return path


def _cached_gguf_conversion(gguf_path: Path, converted_dir: Path) -> Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    out = converted_dir / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if out.is_dir():
        return out
    converted_dir.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed in one step: an interrupted conversion never looks finished.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=converted_dir))
    try:
        convert_gguf(gguf_path, tmp)
        os.replace(tmp, out)
    except OSError:
        if not out.is_dir():  # not a lost race with another process converting the same file
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# llama.cpp tensor names -> HF names, outside and inside the blocks ("blk.N.").
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _hf_name(gguf_name: str, gguf_path: Path) -> str:
    base, suffix = gguf_name.rsplit(".", 1)  # suffix: weight | bias
    block = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    hf = GGUF_BLOCK_NAMES.get(block[2]) if block else GGUF_GLOBAL_NAMES.get(base)
    if hf is None:
        raise ConfigError(f"{gguf_path}: tensor {gguf_name!r} has no Llama/Qwen2 equivalent, so it cannot load")
    return f"model.layers.{block[1]}.{hf}.{suffix}" if block else f"{hf}.{suffix}"


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's q/k row order (interleaved rotary pairs) back to HF's halves."""
    return w.reshape(n_head, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write ``gguf_path`` as an HF folder with float32 weights and the tokenizer it embeds."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)

    def meta(key, default=None):
        entry = reader.get_field(key)
        return default if entry is None else entry.contents()

    arch = meta("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ConfigError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (only llama and qwen2)")
    names = {t.name for t in reader.tensors}
    num_heads = meta(f"{arch}.attention.head_count")
    hidden_size = meta(f"{arch}.embedding_length")
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    cfg = ModelConfig(
        name=gguf_path.stem,
        hidden_size=hidden_size,
        num_layers=meta(f"{arch}.block_count"),
        num_heads=num_heads,
        num_kv_heads=meta(f"{arch}.attention.head_count_kv", num_heads),
        intermediate_size=meta(f"{arch}.feed_forward_length"),
        vocab_size=int(embedding.shape[-1]),  # the weights decide; padded vocabs differ from the token list
        head_dim=meta(f"{arch}.attention.key_length", hidden_size // num_heads),
        tie_embeddings="output.weight" not in names,
        rope_theta=meta(f"{arch}.rope.freq_base", 10000.0),
        max_position_embeddings=meta(f"{arch}.context_length", 2048),
        rms_norm_eps=meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        qkv_bias="blk.0.attn_q.bias" in names,
    )
    # llama.cpp permutes q and k for its "llama" rope kernel only; qwen2 keeps HF's order.
    rope_heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads} if arch == "llama" else {}
    state_dict = {}
    for tensor in reader.tensors:
        shape = tuple(reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
        weight = torch.tensor(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape))
        kind = tensor.name.split(".")[-2]
        if kind in rope_heads:
            weight = _unpermute_rope(weight, rope_heads[kind])
        state_dict[_hf_name(tensor.name, gguf_path)] = weight
    token_ids = {f"{kind}_token_id": meta(f"tokenizer.ggml.{kind}_token_id") for kind in ("bos", "eos")}
    save_hf_state_dict(state_dict, cfg, out_dir, dtype=torch.float32, extra_config=token_ids)
    _gguf_tokenizer(gguf_path).save_pretrained(out_dir)


def _gguf_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def model_config_from_hf(folder, name: str | None = None) -> ModelConfig:
    """The ``ModelConfig`` that an HF Llama, Qwen2, Mixtral or Qwen2-MoE ``config.json`` describes."""
    path = Path(folder) / "config.json"
    hf = json.loads(path.read_text())
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(
            f"{path}: only Llama, Qwen2, Mixtral and Qwen2-MoE models without o_proj/mlp biases are supported"
        )
    moe = {}
    if model_type == "mixtral":  # intermediate_size is the size of each expert
        moe = {"num_experts": hf["num_local_experts"]}
    elif model_type == "qwen2_moe":
        if not hf.get("norm_topk_prob") or hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            raise ConfigError(
                f"{path}: only Qwen2-MoE models with norm_topk_prob=true and experts in every layer are supported"
            )
        moe = {
            "num_experts": hf["num_experts"],
            "moe_intermediate_size": hf["moe_intermediate_size"],
            "shared_expert_intermediate_size": hf["shared_expert_intermediate_size"],
        }
    if moe:
        moe |= {
            "num_experts_per_tok": hf["num_experts_per_tok"],
            "router_aux_loss_coef": hf.get("router_aux_loss_coef", 0.001),
        }
    # transformers 5 writes rope_parameters (with rope_theta inside); older versions rope_scaling + rope_theta.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ConfigError(f"{path}: rope_type {rope_type!r} is not supported (only default and llama3)")
    return ModelConfig(
        name=name or Path(folder).name,
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        head_dim=hf.get("head_dim"),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=(
            RopeScaling(
                factor=rope["factor"],
                low_freq_factor=rope["low_freq_factor"],
                high_freq_factor=rope["high_freq_factor"],
                original_max_position_embeddings=rope["original_max_position_embeddings"],
            )
            if rope_type == "llama3"
            else None
        ),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=model_type in ("qwen2", "qwen2_moe") and hf.get("qkv_bias", True),
        **moe,
    )


def check_model_matches(cfg: ModelConfig, folder) -> None:
    """Refuse weights whose shapes differ from ``cfg``, naming the first field that differs."""
    theirs = model_config_from_hf(folder)
    for field in SHAPE_FIELDS:
        value = RESOLVED_FIELDS.get(field) or attrgetter(field)
        ours_value, their_value = value(cfg), value(theirs)
        if ours_value != their_value:
            raise ConfigError(
                f"model.{field}={ours_value} but {Path(folder) / 'config.json'} has {their_value}: pick the model "
                f"preset that matches the weights or override model.{field}={their_value}"
            )


def safetensors_files(folder: Path) -> list[Path]:
    # The same preference as transformers: a single file wins over an index.
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    raise ConfigError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}: point model.source at an HF folder")


def _our_name(key: str) -> tuple[str, tuple[int, int] | None]:
    """Our name for checkpoint ``key``; for one expert's projection also its (expert, projection)."""
    key = key.replace(".block_sparse_moe.", ".mlp.")
    match = EXPERT_KEY.fullmatch(key)
    if match is None or match[3] not in PROJECTION:
        return key, None
    projection = PROJECTION[match[3]]
    return f"{match[1]}.{'down_proj' if projection == 2 else 'gate_up_proj'}", (int(match[2]), projection)


def _expert_slice(stack: torch.Tensor, expert: int, projection: int) -> torch.Tensor:
    """One expert's gate (0), up (1) or down (2) projection: a view into ``gate_up_proj`` or ``down_proj``."""
    return stack[expert] if projection == 2 else stack[expert].chunk(2)[projection]


def copy_into(target: torch.Tensor, tensor: torch.Tensor) -> None:
    tensor = tensor.to(target.dtype)
    if isinstance(target, DTensor):  # sharded by parallelize: keep this rank's slice
        tensor = distribute_tensor(tensor, target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(tensor)


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, folder, writers: dict[int, tuple[tuple, Callable]] | None = None) -> None:
    """Copy HF safetensors into the materialised ``model`` in place, one tensor at a time.

    Per-expert tensors fill their layer's expert stack on the CPU, copied in once complete: a stack
    may be sharded (expert parallel, FSDP) along dims that cut across experts or projections.
    ``writers`` maps ``id(parameter)`` to the shape its checkpoint tensor has and the function that
    stores it, for parameters kept in another form (QLoRA's packed 4-bit weights).
    """
    folder = Path(folder)
    writers = writers or {}
    targets = model.state_dict(keep_vars=True)
    loaded, unexpected = set(), []
    stacks, filled = {}, Counter()  # expert stacks being assembled, and the elements written into each
    for file in safetensors_files(folder):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):  # old checkpoints saved this derived buffer
                    continue
                name, part = _our_name(key)
                if name not in targets:
                    unexpected.append(key)
                    continue
                tensor, target = f.get_tensor(key), targets[name]
                shape, write = writers.get(id(target), (target.shape, partial(copy_into, target)))
                if part is not None:
                    stack = stacks.setdefault(name, torch.empty(target.shape, dtype=target.dtype))
                    shape = _expert_slice(stack, *part).shape
                if tensor.shape != shape:
                    raise ConfigError(
                        f"{file}: {key} has shape {list(tensor.shape)}, the model wants {list(shape)}: "
                        "pick the model preset that matches the weights"
                    )
                if part is None:
                    write(tensor)
                else:
                    _expert_slice(stack, *part).copy_(tensor)
                    filled[name] += tensor.numel()
                    if filled[name] < stack.numel():
                        continue
                    copy_into(target, stacks.pop(name))
                loaded.add(id(target))  # by tensor, so a tied lm_head counts as loaded with the embedding
    missing = [key for key, target in targets.items() if id(target) not in loaded]
    if missing or unexpected:
        raise ConfigError(
            f"{folder} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]} "
            f"({len(missing)} and {len(unexpected)} keys): pick the model preset that matches the weights"
        )


def hf_model_type(cfg: ModelConfig) -> str:
    """Llama, or Qwen2 when q/k/v carry a bias; with experts Mixtral, or Qwen2-MoE when there is a bias
    or a shared expert (Mixtral has neither)."""
    if cfg.num_experts == 0:
        return "qwen2" if cfg.qkv_bias else "llama"
    return "qwen2_moe" if cfg.qkv_bias or cfg.shared_expert_intermediate_size else "mixtral"


def _moe_config(cfg: ModelConfig, model_type: str) -> dict:
    """config.json fields of the experts, as ``model_type`` names them."""
    if cfg.num_experts == 0:
        return {}
    routing = {"num_experts_per_tok": cfg.num_experts_per_tok, "router_aux_loss_coef": cfg.router_aux_loss_coef}
    if model_type == "mixtral":  # its intermediate_size is each expert's
        return routing | {"num_local_experts": cfg.num_experts, "intermediate_size": expert_size(cfg)}
    return routing | {
        "num_experts": cfg.num_experts,
        "moe_intermediate_size": expert_size(cfg),
        "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "qkv_bias": cfg.qkv_bias,
    }


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for ``cfg``, of the model type ``hf_model_type`` picks."""
    model_type = hf_model_type(cfg)
    s = cfg.rope_scaling
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": head_dim(cfg),
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None
        if s is None
        else {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        },
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype_name,  # transformers < 5 reads torch_dtype, 5 reads dtype
        "dtype": dtype_name,
    } | _moe_config(cfg, model_type)


def _per_expert(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``state_dict`` with each expert stack split into HF's per-expert tensors (views, no copies)."""
    model_type = hf_model_type(cfg)
    if model_type not in EXPERT_NAMES:
        return state_dict
    names = EXPERT_NAMES[model_type]
    out = {}
    for key, tensor in state_dict.items():
        prefix, _, stack = key.rpartition(".")
        if not prefix.endswith(".mlp.experts"):
            out[key] = tensor
            continue
        for expert in range(len(tensor)):
            for projection in (0, 1) if stack == "gate_up_proj" else (2,):
                out[f"{prefix}.{expert}.{names[projection]}.weight"] = _expert_slice(tensor, expert, projection)
    if model_type == "mixtral":
        out = {key.replace(".mlp.", ".block_sparse_moe."): tensor for key, tensor in out.items()}
    return out


def save_hf_state_dict(
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir,
    tokenizer_folder=None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 2**30,
    extra_config: dict | None = None,
) -> Path:
    """Write a full state dict as an HF folder; shards are cast one at a time to bound memory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model*.safetensors*"):  # a previous export's shards must not mix with these
        stale.unlink()
    if cfg.tie_embeddings:  # HF stores a tied head once, as the embedding
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    state_dict = _per_expert(state_dict, cfg)
    shards, size = [[]], 0
    item_size = torch.empty((), dtype=dtype).element_size()
    for key, tensor in state_dict.items():
        nbytes = tensor.numel() * item_size
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = SINGLE_FILE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        shard = {k: state_dict[k].detach().to("cpu", dtype).contiguous() for k in keys}
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    if len(shards) > 1:
        total = sum(t.numel() for t in state_dict.values()) * item_size
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    config = hf_config(cfg, dtype) | _special_token_ids(tokenizer_folder) | (extra_config or {})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_folder is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_folder) / name).is_file():
                shutil.copy2(Path(tokenizer_folder) / name, out / name)
    return out


def _special_token_ids(folder) -> dict:
    """bos/eos ids from the config.json next to the tokenizer: HF generate stops on eos_token_id."""
    if folder is None or not (Path(folder) / "config.json").is_file():
        return {}
    hf = json.loads((Path(folder) / "config.json").read_text())
    return {key: hf[key] for key in ("bos_token_id", "eos_token_id") if key in hf}


def export_hf(
    model: torch.nn.Module,
    out_dir,
    tokenizer_folder=None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``model`` as a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""
    return save_hf_state_dict(
        model.state_dict(), model.cfg, out_dir, tokenizer_folder, dtype=dtype, max_shard_bytes=max_shard_bytes
    )


def load_tokenizer(folder_or_source: str, field: str = "model.tokenizer"):
    """The tokenizer of an HF folder, a .gguf file or a hub repo, padding with eos when it has no pad."""
    from transformers import AutoTokenizer

    path = Path(resolve_source(str(folder_or_source), field, allow_patterns=["config.json", *TOKENIZER_FILES]))
    tokenizer = _gguf_tokenizer(path) if path.suffix == ".gguf" else AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
