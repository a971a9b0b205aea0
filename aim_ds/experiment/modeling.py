"""Model and tokenizer construction for the driver (launch/train.py).

Model (``--model``):
* nothing: the tiny Llama of ``configs/tiny_llama.json`` (2 layers x 128 hidden), randomly initialised;
* a config JSON file: a LlamaForCausalLM (or whatever ``model_type`` says) built from it, random init;
* a local Hugging Face model folder (config.json + weights): ``from_pretrained`` (no hub access).
``vocab_size``/``pad``/``eos`` of a config-built model come from the tokenizer.

Under ZeRO-3 the model is constructed while an ``HfDeepSpeedConfig`` is alive (the caller keeps the
returned handle for the model's lifetime): transformers then builds it inside ``deepspeed.zero.Init``
with its own weight initialisation (``_from_config`` / ``from_pretrained``), so every rank holds only
its partition from the start.  A bare ``with deepspeed.zero.Init(): Model(cfg)`` would skip transformers'
init (std-1.0 embeddings) and a plain construction would materialise the full model on every rank.

Tokenizer (``--tokenizer``): a local tokenizer folder, or the same folder as ``--model`` when it has one,
or ``aim_ds.data.get_tokenizer`` (a byte-level BPE trained locally on the task texts, cached under a
content-hash key).  Rank 0 builds the cache first, the others wait at a barrier and then load it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_CONFIG = REPO_ROOT / "configs" / "tiny_llama.json"
_EMBEDDED_TINY = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "attention_dropout": 0.0,
    "use_cache": False,
}
# The tiny Llama that tests and benchmarks build (each with its own sizes as overrides): the one definition of
# its shape. Every tensor is small and most dimensions are not multiples of 3, so ranks pad their partitions.
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def tiny_llama_shape(**overrides) -> dict[str, Any]:
    """TINY_LLAMA with some keys changed (a dict with "model_type", as AutoConfig.for_model takes it)."""
    return {**TINY_LLAMA, **overrides}


def tiny_llama_config(**overrides):
    """A transformers LlamaConfig of the tiny shape with some keys changed."""
    from transformers import LlamaConfig

    shape = tiny_llama_shape(**overrides)
    del shape["model_type"]
    return LlamaConfig(**shape)


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelError(ValueError):
    pass


def describe_model_arg(model: str | None) -> tuple[str, str | None]:
    """('config', path|None) or ('pretrained', dir). Raises ModelError for a path that is neither."""
    if model is None:
        return "config", str(DEFAULT_MODEL_CONFIG) if DEFAULT_MODEL_CONFIG.exists() else None
    p = Path(model)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"--model {model}: folder has no config.json (expected a Hugging Face model folder)")
        if any((p / w).exists() for w in _WEIGHT_FILES):
            return "pretrained", str(p)
        return "config", str(p / "config.json")
    if p.is_file():
        try:
            json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"--model {model}: not a readable JSON model config ({e})") from e
        return "config", str(p)
    raise ModelError(f"--model {model}: no such file or folder (give a model config JSON or a local HF model folder)")


def model_source_key(model: str | None) -> str:
    """A string that identifies where the model comes from (config text or folder listing), for the FWT
    reference cache key and the driver's task fingerprint. (A checkpoint's model identity, from the built
    engine's parameter shapes, is aim_ds.checkpoint.model_fingerprint.)"""
    kind, path = describe_model_arg(model)
    if kind == "config":
        text = Path(path).read_text() if path else json.dumps(_EMBEDDED_TINY, sort_keys=True)
        return "config:" + json.dumps(json.loads(text), sort_keys=True)
    st = []
    for f in sorted(os.listdir(path)):
        fp = os.path.join(path, f)
        if os.path.isfile(fp):
            s = os.stat(fp)
            st.append(f"{f}:{s.st_size}:{int(s.st_mtime)}")
    return "pretrained:" + os.path.abspath(path) + ":" + ",".join(st)


def _is_zero3(ds_config: dict) -> bool:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def build_model(model: str | None, tokenizer, ds_config: dict) -> tuple[Any, Any]:
    """Return (model, keepalive). Keep ``keepalive`` (an HfDeepSpeedConfig or None) referenced while the
    engine lives: transformers looks it up through a weak reference."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    kind, path = describe_model_arg(model)
    keepalive = HfDeepSpeedConfig(ds_config) if _is_zero3(ds_config) else None
    dtype = torch.float32
    if ds_config.get("bf16", {}).get("enabled"):
        dtype = torch.bfloat16
    if kind == "pretrained":
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        if tokenizer is not None and len(tokenizer) > m.config.vocab_size:
            raise ModelError(
                f"--model {path}: tokenizer has {len(tokenizer)} tokens but the model's vocab is "
                f"{m.config.vocab_size}; pass the model's own tokenizer (--tokenizer {path})"
            )
        return m, keepalive
    cfg_dict = dict(_EMBEDDED_TINY)
    if path:
        cfg_dict = json.loads(Path(path).read_text())
    cfg_dict = {k: v for k, v in cfg_dict.items() if k not in ("architectures", "transformers_version")}
    model_type = cfg_dict.pop("model_type", "llama")
    if tokenizer is not None:
        cfg_dict["vocab_size"] = len(tokenizer)
        cfg_dict["pad_token_id"] = tokenizer.pad_token_id
        cfg_dict["eos_token_id"] = tokenizer.eos_token_id
        cfg_dict["bos_token_id"] = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
    try:
        cfg = AutoConfig.for_model(model_type, **cfg_dict)
    except (ValueError, TypeError) as e:
        raise ModelError(f"--model {path}: bad model config ({e})") from e
    m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return m, keepalive


def cache_folder(explicit: str | None = None) -> str:
    """Where trained tokenizers and FWT references are kept: the given folder (--cache-dir), else $AIM_DS_CACHE,
    else ~/.cache/aim_ds."""
    return explicit or os.environ.get("AIM_DS_CACHE") or os.path.expanduser("~/.cache/aim_ds")


def load_tokenizer(tokenizer_dir: str | None, model: str | None, tasks, cache_dir: str, rank: int):
    """Load ``--tokenizer DIR`` (or the model folder's own tokenizer), else train/cached via aim_ds.data.

    Every rank must call this (it contains a barrier when the tokenizer is trained)."""
    from transformers import AutoTokenizer

    src = tokenizer_dir
    if (
        src is None
        and model is not None
        and Path(model).is_dir()
        and ((Path(model) / "tokenizer.json").exists() or (Path(model) / "tokenizer_config.json").exists())
    ):
        src = model
    if src is not None:
        if not Path(src).is_dir():
            raise ModelError(f"--tokenizer {src}: no such folder")
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    else:
        from aim_ds.data import get_tokenizer

        from ..ops.collectives import agree

        os.makedirs(cache_dir, exist_ok=True)
        err = None
        if rank == 0:
            try:
                tok = get_tokenizer(tasks, cache_dir)
            except Exception as e:  # reported on every rank, not a hang at the barrier
                err = f"building the tokenizer under {cache_dir} failed: {e!r}"
        agree(err, exc_type=SystemExit)  # doubles as the barrier: rank 0 has written the cache
        if rank != 0:
            tok = get_tokenizer(tasks, cache_dir)  # the cache hit rank 0 just wrote
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError("the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok
