"""A tiny random-initialised Llama model, built locally in seconds, so the platform can be tried
(and tested) end to end without downloading anything.

The base model knows nothing; everything it answers after fine-tuning was learned by the LoRA
adapter, which makes the effect of a fine-tune easy to see.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adaptery.engine.loading import PLATFORM_DEFAULTS_FILE

DEMO_MODEL_ID = "adaptery-demo"

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Each turn is "<|role|>content<|end|>". The assistant content and its closing <|end|> sit inside
# {% generation %} so apply_chat_template(return_assistant_tokens_mask=True) marks exactly the
# tokens a fine-tune should learn, including the <|end|> that teaches the model to stop.
# Tools as Qwen2.5 and Hermes render them (so `engine.tool_parsers` reads the demo model's calls with the
# same parser as theirs): the schemas in the system turn inside <tools>, each call in the assistant turn
# as <tool_call>{"name": ..., "arguments": {...}}</tool_call>, each result in a user turn inside
# <tool_response>. Without tools the text is exactly what it was before tools existed.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}"
    "<|system|>{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    '# Tools\nCall a function with <tool_call>{"name": ..., "arguments": {...}}</tool_call>.\n<tools>'
    "{%- for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|end|>"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not (tools and loop.first) -%}<|system|>{{ message['content'] }}<|end|>{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}"
    "<|user|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "<tool_call>{\"name\": {{ call['function']['name'] | tojson }}, "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}</tool_call>"
    "{%- endfor -%}"
    "<|end|>{% endgeneration %}"
    "{%- elif message['role'] == 'tool' -%}"
    "<|user|><tool_response>{{ message['content'] }}</tool_response><|end|>"
    "{%- else -%}"
    "{{- raise_exception('unknown role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

# A random-init base learns through LoRA only at a high learning rate: rank 16 on every linear
# layer memorises the demo Q/A set in 20 epochs at 2e-3.
FINETUNE_DEFAULTS = {
    "n_epochs": 20,
    "learning_rate": 2e-3,
    "batch_size": 4,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "target_modules": "all-linear",
}
DISPLAY_NAME = "Adaptery demo (tiny random Llama)"
MAX_POSITIONS = 1024
INIT_RANGE = 0.08


def _training_texts() -> list[str]:
    samples = resources.files("adaptery.samples")
    texts = [samples.joinpath("demo-corpus.txt").read_text(encoding="utf-8")]
    for line in samples.joinpath("demo-chat.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts.extend(message["content"] for message in json.loads(line)["messages"])
    return texts


def _train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    # Byte-level BPE: any text can be encoded (no unknown token), and the learned merges make the
    # demo sentences short sequences of whole words.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        # A chat turn ends with <|end|>, so that is the token generation must stop at.
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _write_demo_model(
    out_dir: Path, *, hidden_size: int, num_layers: int, num_heads: int, vocab_size: int, seed: int
) -> None:
    tokenizer = _train_tokenizer(vocab_size)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = LlamaConfig(
        # The small demo corpus yields fewer merges than the budget allows; sizing the embedding to
        # the tokenizer means every id the model can emit decodes to text.
        vocab_size=_round_up(len(tokenizer), 64),
        hidden_size=hidden_size,
        intermediate_size=_round_up(hidden_size * 8 // 3, 64),  # Llama's ~2.7x MLP ratio
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=MAX_POSITIONS,
        # LoRA ("all-linear") does not adapt lm_head, so the random head bounds how confident the
        # fine-tuned model can get. At Llama's 0.02 the best logit margin over ~1.5k tokens is tiny
        # (loss floors near 3.9 and answers come out garbled); 0.08 lets the demo set be memorised.
        initializer_range=INIT_RANGE,
        tie_word_embeddings=False,
        bos_token_id=ids["<|bos|>"],
        eos_token_id=ids["<|end|>"],
        pad_token_id=ids["<|pad|>"],
    )
    # fork_rng: seed the initialisation without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|bos|>"],
        eos_token_id=[ids["<|end|>"], ids["<|eos|>"]],
        pad_token_id=ids["<|pad|>"],
    )
    # transformers 5 always writes safetensors (its save_pretrained has no pickle option left).
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    platform = {"display_name": DISPLAY_NAME, "finetune_defaults": FINETUNE_DEFAULTS}
    (out_dir / PLATFORM_DEFAULTS_FILE).write_text(json.dumps(platform, indent=2) + "\n", encoding="utf-8")


def _move_into_place(staging: Path, target: Path) -> None:
    # os.replace cannot overwrite a non-empty directory, so an existing build is first moved aside;
    # readers only ever see a complete directory (or, for an instant, none).
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_demo_model(
    out_dir: Path,
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    vocab_size: int = 2048,
    seed: int = 0,
) -> Path:
    """Build the demo model into `out_dir` (replacing it atomically); same args give the same bytes.

    `vocab_size` is the BPE budget; the embedding is sized to what the tokenizer actually learns
    (1536 tokens from the shipped corpus).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model is meant to be readable like any other
    try:
        _write_demo_model(
            staging,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            vocab_size=vocab_size,
            seed=seed,
        )
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def ensure_demo_model(models_dir: Path) -> Path:
    """Return ``models_dir/adaptery-demo``, building it first if it is not there."""
    target = Path(models_dir) / DEMO_MODEL_ID
    # Builds are atomic, so a present config means a complete model.
    if (target / "config.json").is_file():
        return target
    return build_demo_model(target)
