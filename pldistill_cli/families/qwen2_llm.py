"""The LLM side of a family whose LLM body is a Qwen2Model (Qwen2-Audio's, and any family built on Qwen2):
its attention layers and their queries and keys as the attention scores read them."""

from __future__ import annotations

from torch import Tensor
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv


class Qwen2Decoder:
    """AudioLLM's attention_layers and queries_keys for a Qwen2Model LLM body (mixed into a family)."""

    def attention_layers(self, model) -> list:
        return [layer.self_attn for layer in self.llm(model).layers]

    def queries_keys(self, module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, float]:
        """q, k [B, H, S, d] after the rotary embedding, k repeated over the query groups (Qwen2Attention)."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        b, s, _ = hidden.shape
        q = module.q_proj(hidden).view(b, s, -1, module.head_dim).transpose(1, 2)
        k = module.k_proj(hidden).view(b, s, -1, module.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, repeat_kv(k, module.num_key_value_groups), module.scaling
