"""A tiny decoder-only language model from a Hugging Face `transformers` LlamaConfig (random
initialisation: nothing is downloaded). `transformers` is imported inside the factory, so the
torch-only core imports without it (pip install 'autorank[llm]' brings it).

Byte-level by default (vocab 256: a text's UTF-8 bytes are its tokens), so no tokenizer is needed.
The model is a plain `LlamaForCausalLM`: plans name its modules (`model.layers.N.self_attn.q_proj`,
`...mlp.down_proj`, `lm_head`) and `apply_plan` swaps them like any other model's; its forward
returns a `CausalLMOutputWithPast` whose `.logits` (B, L, vocab) the cost model reads
(autorank.cost.loss).
"""

from __future__ import annotations

from torch import nn

__all__ = ["tiny_llama"]


def tiny_llama(vocab_size: int = 256, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
               num_kv_heads: int | None = None, intermediate_size: int = 256, max_seq_len: int = 512,
               rope_theta: float = 10000.0, tie_word_embeddings: bool = False,
               attn_implementation: str = "sdpa") -> nn.Module:
    """LlamaForCausalLM, random init: RMSNorm, rotary embeddings, SiLU-gated MLP, SDPA attention;
    no KV cache (training); the output head untied from the embedding unless asked (a tied head
    would train the embedding with it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads, max_position_embeddings=max_seq_len,
        rope_theta=rope_theta, tie_word_embeddings=tie_word_embeddings, use_cache=False,
        attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config)
