"""Loading base models: a local directory or a Hugging Face hub id, safetensors only.

Base models come from people we do not control, so loading never executes code from the model
repository (``trust_remote_code=False``) and never unpickles weights (``*.bin``/``*.pt`` can run
arbitrary code when loaded); only ``*.safetensors`` weights are accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

PLATFORM_DEFAULTS_FILE = "adaptery.json"

# What a snapshot needs to load a model: configs, safetensors weights and the tokenizer files
# (tokenizer.json, vocab.json, merges.txt, tokenizer.model, chat_template.jinja, ...). Pickle-based
# weights are deliberately absent, so they are never even downloaded.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


class ModelNotAvailable(ValueError):
    """The model cannot be found or cannot be loaded safely."""


def _looks_like_path(ref: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else that was meant as a directory should fail
    # as a missing directory rather than as a confusing hub lookup.
    return ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or "\\" in ref


def resolve_model_path(ref: str, *, offline: bool = True, cache_dir: Path | None = None) -> Path:
    """Return the local directory holding model `ref` (a directory, or a hub id fetched/cached)."""
    candidate = Path(ref).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    if _looks_like_path(ref):
        raise ModelNotAvailable(f"model directory {ref} does not exist")
    try:
        snapshot = snapshot_download(
            ref,
            local_files_only=offline,
            allow_patterns=HUB_ALLOW_PATTERNS,
            cache_dir=cache_dir,
        )
    # Hub errors are OSError subclasses (not cached, HTTP, no network); invalid ids are ValueError.
    except (OSError, ValueError) as exc:
        if offline:
            reason = "it is not in the local Hugging Face cache and downloads are disabled (offline mode)"
        else:
            reason = f"it could not be fetched from the Hugging Face hub ({exc})"
        raise ModelNotAvailable(f"model {ref!r} is not available: {reason}") from exc
    return Path(snapshot)


def _require_safetensors(model_dir: Path) -> None:
    if not any(model_dir.glob("*.safetensors")):
        raise ModelNotAvailable(
            f"{model_dir} has no *.safetensors weights; other weight formats (pytorch_model.bin, *.pt) "
            "are refused because loading them can execute code"
        )


def load_causal_lm(
    ref: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    offline: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a directory or hub id, in eval mode on `device`."""
    model_dir = resolve_model_path(ref, offline=offline)
    _require_safetensors(model_dir)
    # local_files_only: the directory is complete by now, so nothing may reach the network.
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
    )
    model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(ref: str, *, offline: bool = True) -> tuple[PreTrainedTokenizerBase, int]:
    """A model's tokenizer and context length, without loading its weights (for counting tokens)."""
    model_dir = resolve_model_path(ref, offline=offline)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    return tokenizer, int(getattr(config, "max_position_embeddings", 0) or tokenizer.model_max_length)


def read_platform_defaults(path: Path) -> dict[str, Any]:
    """Read the optional ``adaptery.json`` of a model directory (``{}`` when there is none)."""
    defaults_file = Path(path) / PLATFORM_DEFAULTS_FILE
    if not defaults_file.is_file():
        return {}
    try:
        data = json.loads(defaults_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{defaults_file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{defaults_file} must hold a JSON object")
    return data
