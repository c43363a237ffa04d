"""Adaptery: curate datasets, fine-tune LoRA adapters on shared open LLMs, serve them OpenAI-style."""

__version__ = "0.1.0"
