"""Fixtures shared by the engine and training unit tests.

The demo base model itself comes from the session-scoped ``demo_model_dir`` fixture of
tests/conftest.py (built once per run with tmp_path_factory); these build on it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CHAT = REPO / "adaptery" / "samples" / "demo-chat.jsonl"


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="session")
def sample_chat() -> Path:
    return SAMPLE_CHAT
