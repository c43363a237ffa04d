"""The native PyTorch path for the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM, ...).

Weights come from the Hugging Face model (safetensors, loaded by `loading.load_causal_lm`) and are
re-laid out for serving: q/k/v fused into one matrix, gate/up into another, so a layer runs four
big matmuls. One forward call runs one engine step over a flat, adapter-sorted token batch mixing
decodes and prefill chunks of many sequences; keys and values live in a paged cache
(`kvcache.PagedKVCache`). LoRA products are added per adapter segment by `lora.LoraBatch`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel

from adaptery.engine import lora_kernel
from adaptery.engine.kvcache import PagedKVCache

NATIVE_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3"}
# PEFT module names of the seven projections and where each lands in the fused layout.
SITES = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_SITE = {module: (site, index) for site, modules in SITES.items() for index, module in enumerate(modules)}


class NotNative(ValueError):
    """The model must run through the transformers path (the message says why)."""


def native_support(config: PretrainedConfig) -> str | None:
    """None when the native path can serve `config`, else the reason it cannot."""
    model_type = getattr(config, "model_type", "")
    if model_type not in NATIVE_ARCHITECTURES:
        return f"architecture {model_type!r} is not in the native Llama family"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not SiLU"
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and window < int(getattr(config, "max_position_embeddings", 0) or 0):
        return "sliding-window attention is served by the transformers path"
    if getattr(config, "mlp_bias", False):
        return "MLP biases are not supported natively"
    return None


@dataclass
class Layer:
    norm1: torch.Tensor
    norm2: torch.Tensor
    wqkv: torch.Tensor  # (q + 2 kv, d)
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    wgu: torch.Tensor  # (2 inter, d)
    wdown: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3 per-head RMSNorm of q and k
    k_norm: torch.Tensor | None


@dataclass
class StepBatch:
    """One step: tokens of many sequences, flattened and sorted by adapter slot (base first)."""

    tokens: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    write_slots: torch.Tensor  # (N,) flat KV-cache positions the new keys/values go to
    decode_rows: torch.Tensor  # (B,) rows of single-token sequences, batched attention
    decode_blocks: torch.Tensor  # (B, T / block size) each decode's block table (padded with block 0)
    decode_mask: torch.Tensor  # (B, T) True where padded: past the sequence's last position
    decode_lengths: torch.Tensor  # (B,) int64 each decode's context length, its new token included
    prefill: list[tuple[int, int, torch.Tensor]]  # (first row, count, flat cache positions of the whole context)
    logit_rows: torch.Tensor  # rows whose next-token logits are needed


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _bf16_dot_products() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX512_BF16 or AMX), as oneDNN's packed bf16 GEMMs need
    to beat F.linear."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` reordered once into oneDNN's blocked layout, as vLLM's CPU path runs its GEMMs: fp32 projections at
    32 rows ran 2x faster than through `F.linear` (MKL sgemm) here (30-65 against 60-135 ms for one layer's three
    largest, alternating, machine loaded). bf16 too where the CPU has bf16 dot products: on a 2-core Xeon with AMX,
    1.3-1.6x F.linear's bf16 GEMMs (gate/up, 5632 x 1024: 494 against 374 GFLOP/s at 32 rows, 1709 against 1080 at
    256; the same products, bit for bit); elsewhere bf16 GEMMs stay with `F.linear`, which picks its own kernels."""
    if not torch.backends.mkldnn.is_available():
        return weight
    if weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and _bf16_dot_products()):
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    return weight


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


QUANTIZATIONS = {"int8": "torchao int8 weights, int8 dynamic activations (Int8DynamicActivationInt8WeightConfig)"}


def check_quantization(method: str) -> None:
    """Fail at start-up, not at the first request, when `method` cannot run here."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; supported: {', '.join(QUANTIZATIONS)}")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("int8 quantization needs torchao: pip install 'adaptery[int8]'") from exc


def quantize_weights(model: NativeLlama, method: str) -> None:
    """Quantize the base model's projection weights in place through torchao (embeddings, norms and the LM
    head stay in the compute dtype; adapters are unaffected and still add their products in full precision).

    `F.linear` dispatches on torchao's tensor subclass, so the forward pass is unchanged.
    """
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; supported: {', '.join(QUANTIZATIONS)}")
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as exc:
        raise RuntimeError("int8 quantization needs torchao: pip install 'adaptery[int8]'") from exc

    def int8(weight: torch.Tensor) -> torch.Tensor:
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        quantize_(linear, Int8DynamicActivationInt8WeightConfig())
        return linear.weight

    for layer in model.layers:
        layer.wqkv, layer.wo, layer.wgu, layer.wdown = (int8(w) for w in (layer.wqkv, layer.wo, layer.wgu, layer.wdown))


class NativeLlama:
    """Inference-only Llama-family model with fused projections, for the batching engine."""

    def __init__(
        self, hf_model: PreTrainedModel, dtype: torch.dtype, max_positions: int, quantize: str | None = None
    ) -> None:
        config = hf_model.config
        reason = native_support(config)
        if reason:
            raise NotNative(reason)
        self.config = config
        self.dtype = dtype
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        self.inter = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.vocab = config.vocab_size
        self.scale = self.head_dim**-0.5
        # fused output widths per LoRA site, in PEFT module order
        self.site_out = {
            "qkv": (self.q_size, self.kv_size, self.kv_size),
            "o": (self.hidden,),
            "gate_up": (self.inter, self.inter),
            "down": (self.hidden,),
        }
        self.site_in = {"qkv": self.hidden, "o": self.q_size, "gate_up": self.hidden, "down": self.inter}

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype).contiguous()

        inner = hf_model.model
        self.embed = cast(inner.embed_tokens.weight)
        self.final_norm = cast(inner.norm.weight)
        self.lm_head = cast(hf_model.lm_head.weight)
        self.layers: list[Layer] = []
        for block in inner.layers:
            attn, mlp = block.self_attn, block.mlp
            biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
            bqkv = torch.cat([b for b in biases]) if all(b is not None for b in biases) else None
            self.layers.append(
                Layer(
                    norm1=cast(block.input_layernorm.weight),
                    norm2=cast(block.post_attention_layernorm.weight),
                    wqkv=cast(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
                    bqkv=None if bqkv is None else cast(bqkv),
                    wo=cast(attn.o_proj.weight),
                    wgu=cast(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    wdown=cast(mlp.down_proj.weight),
                    q_norm=cast(attn.q_norm.weight) if hasattr(attn, "q_norm") else None,
                    k_norm=cast(attn.k_norm.weight) if hasattr(attn, "k_norm") else None,
                )
            )
        # set by the engine when the C library (lora_kernel.load) is here: decode attention reads the paged cache in
        # place (`lora_kernel.paged_decode`) instead of gathering each sequence's blocks, and the residual adds,
        # RMSNorms, rotary embeddings and SiLU x up run fused (`lora_kernel.add_rms_norm`, `rotary`, `silu_mul`)
        self.kernel: ctypes.CDLL | None = None
        self.quantize = quantize
        if quantize is not None:
            quantize_weights(self, quantize)
        else:
            for layer in self.layers:
                layer.wqkv, layer.wo, layer.wgu, layer.wdown = (
                    _pack(w, 32) for w in (layer.wqkv, layer.wo, layer.wgu, layer.wdown)
                )
            self.lm_head = _pack(self.lm_head, 32)
        # RoPE tables from the model's own rotary module: every rope_type transformers knows (llama3,
        # yarn, linear, ...) comes out right without re-implementing it.
        with torch.no_grad():
            positions = torch.arange(max_positions).unsqueeze(0)
            probe = torch.zeros(1, 1, self.head_dim, dtype=torch.float32)
            cos, sin = inner.rotary_emb(probe, positions)
        self.cos = cos[0].to(dtype)
        self.sin = sin[0].to(dtype)

    def step_paths(self) -> dict[str, str]:
        """How this model's step runs here, for GET /api/admin/engine."""
        weights = self.layers[0].wqkv if self.layers else self.lm_head
        return {
            "gemm": "oneDNN, weights packed" if weights.is_mkldnn else "torchao int8" if self.quantize else "F.linear",
            "elementwise": "C, fused (residual + RMSNorm, rotary, SiLU x up)"
            if self.kernel is not None
            else "PyTorch operators",
        }

    def base_weight(self, site: str, index: int, layer: int) -> torch.Tensor:
        """The base weight (out, in) of one projection in one layer, fp32 (DoRA needs it for its norms)."""
        block = self.layers[layer]
        fused = {"qkv": block.wqkv, "o": block.wo, "gate_up": block.wgu, "down": block.wdown}[site]
        if fused.is_mkldnn:  # packed for oneDNN (`_pack`)
            fused = fused.to_dense()
        elif hasattr(fused, "dequantize"):  # int8 base weights: DoRA's norms use what the model computes with
            fused = fused.dequantize()
        start = sum(self.site_out[site][:index])
        return fused[start : start + self.site_out[site][index]].float()

    def forward(self, batch: StepBatch, cache: PagedKVCache, lora: object | None) -> torch.Tensor:
        """Run one step; returns fp32 logits for `batch.logit_rows`."""
        kernel = self.kernel
        x = self.embed[batch.tokens]  # a new tensor: the C path adds the residuals into it in place
        cos, sin = self.cos[batch.positions], self.sin[batch.positions]  # (n, hd)
        if kernel is None:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        n = x.shape[0]
        residual = None  # the last sublayer's output, not yet added to x
        for index, layer in enumerate(self.layers):
            x, h = self._add_norm(x, residual, layer.norm1)
            qkv = _linear(h, layer.wqkv)
            if lora is not None:
                lora.apply(index, "qkv", h, qkv)
            if layer.bqkv is not None:
                qkv += layer.bqkv
            v = qkv[:, self.q_size + self.kv_size :].view(n, self.kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q = _rms(qkv[:, : self.q_size].view(n, self.heads, self.head_dim), layer.q_norm, self.eps)
                k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n, self.kv_heads, self.head_dim)
                qk = torch.cat((q, _rms(k, layer.k_norm, self.eps)), dim=1)
            else:
                qk = qkv[:, : self.q_size + self.kv_size].view(n, self.heads + self.kv_heads, self.head_dim)
            # q and k rotated together: one set of elementwise ops (one C call, in place), each element's arithmetic
            # as before
            if kernel is not None:
                lora_kernel.rotary(kernel, qk, cos, sin)
            else:
                qk = _rotate(qk, cos, sin)
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            cache.write(index, batch.write_slots, k, v)
            attn = self._attention(index, q, batch, cache)
            out = _linear(attn, layer.wo)
            if lora is not None:
                lora.apply(index, "o", attn, out)
            x, h = self._add_norm(x, out, layer.norm2)
            gu = _linear(h, layer.wgu)
            if lora is not None:
                lora.apply(index, "gate_up", h, gu)
            if kernel is not None:
                act = lora_kernel.silu_mul(kernel, gu)
            else:
                act = F.silu(gu[:, : self.inter])
                act.mul_(gu[:, self.inter :])
            residual = _linear(act, layer.wdown)
            if lora is not None:
                lora.apply(index, "down", act, residual)
        rows = batch.logit_rows
        _, last = self._add_norm(x[rows], None if residual is None else residual[rows], self.final_norm)
        return _linear(last, self.lm_head).float()

    def _add_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, RMSNorm of that): with the C library one pass, x updated in place; else PyTorch's ops."""
        if self.kernel is not None:
            return x, lora_kernel.add_rms_norm(self.kernel, x, residual, weight, self.eps)
        if residual is not None:
            x = x + residual
        return x, _rms(x, weight, self.eps)

    def _attention(self, index: int, q: torch.Tensor, batch: StepBatch, cache: PagedKVCache) -> torch.Tensor:
        n = q.shape[0]
        group = self.heads // self.kv_heads
        if batch.decode_rows.numel() == n:  # decodes only (the steady state): no rows to pick out and put back
            return self._decode_attention(index, q, batch, cache).view(n, self.q_size)
        out = torch.empty(n, self.heads, self.head_dim, dtype=q.dtype)
        if batch.decode_rows.numel():
            out[batch.decode_rows] = self._decode_attention(index, q[batch.decode_rows], batch, cache)
        for first, count, context in batch.prefill:
            keys, values = cache.gather(index, context)
            total = context.shape[0]
            query = q[first : first + count].transpose(0, 1).unsqueeze(0)  # (1, h, c, hd)
            keys = keys.transpose(0, 1).unsqueeze(0)
            values = values.transpose(0, 1).unsqueeze(0)
            # query i sits at position total - count + i and sees every key up to it
            allowed = torch.ones(count, total, dtype=torch.bool).tril(diagonal=total - count)
            attended = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=allowed, scale=self.scale, enable_gqa=group > 1
            )
            out[first : first + count] = attended[0].transpose(0, 1)
        return out.view(n, self.q_size)

    def _decode_attention(self, index: int, q: torch.Tensor, batch: StepBatch, cache: PagedKVCache) -> torch.Tensor:
        """With the C library: one query per sequence, its keys and values read in place from its blocks. Without
        it: one query per sequence over its gathered context (whole blocks, padded to the longest, masked). In bf16,
        matmul -> masked softmax -> matmul beats SDPA here (2.0 against 10.3 ms a layer at 32 sequences x 192
        positions); in fp32 SDPA wins (2.7 against 9.7 ms)."""
        if self.kernel is not None:
            return lora_kernel.paged_decode(
                self.kernel, q, cache.keys[index], cache.values[index], batch.decode_blocks,
                batch.decode_lengths, cache.block_size, self.scale,
            )  # fmt: skip
        b, t = batch.decode_mask.shape
        group = self.heads // self.kv_heads
        keys, values = cache.gather_blocks(index, batch.decode_blocks.reshape(-1))
        keys = keys.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (b, kvh, t, hd)
        values = values.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (b, kvh, t, hd)
        if q.dtype == torch.float32:
            attended = F.scaled_dot_product_attention(
                q.view(b, self.heads, 1, self.head_dim), keys, values, attn_mask=~batch.decode_mask.view(b, 1, 1, t),
                scale=self.scale, enable_gqa=group > 1,
            )  # fmt: skip
            return attended.view(b, self.heads, self.head_dim)
        query = q.view(b, self.kv_heads, group, self.head_dim)
        scores = torch.matmul(query, keys.transpose(2, 3)).float() * self.scale  # (b, kvh, group, t)
        scores.masked_fill_(batch.decode_mask.view(b, 1, 1, t), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, values).reshape(b, self.heads, self.head_dim)
