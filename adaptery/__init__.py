"""Adaptery: curate datasets, fine-tune LoRA adapters on shared open LLMs, serve them OpenAI-style."""

from adaptery._cpython import guard_ast_parse

guard_ast_parse()

__version__ = "0.1.0"
