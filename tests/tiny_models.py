"""Tiny randomly initialised causal LMs of every supported architecture, built in-process (no downloads).

Sizes are chosen so that every site has a distinct width (GQA with 4 query heads over 2 kv heads, FFN 48) and an
index mix-up between sites shows up as an out-of-range error or a logit mismatch.
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PhiConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    SmolLM3Config,
    StableLmConfig,
)

VOCAB = 264  # 256 byte tokens + specials of tiny_tokenizer()
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(**_COMMON),
    "mistral": MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": Qwen2Config(**_COMMON),
    "qwen3": Qwen3Config(**_COMMON, head_dim=8),
    "gemma": GemmaConfig(**_COMMON, head_dim=8),
    "gemma2": Gemma2Config(**_COMMON, head_dim=8),
    "gemma3_text": Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=16),
    "phi3": Phi3Config(**_COMMON),
    "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, n_inner=48,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt_neox": GPTNeoXConfig(**{k: v for k, v in _COMMON.items() if k != "num_key_value_heads"}),
    # Families added as data files only (bakeedit/models/architectures/*.json), no Python.
    "olmo2": Olmo2Config(**_COMMON),
    "granite": GraniteConfig(**_COMMON, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3,
                             logits_scaling=2.0),
    "stablelm": StableLmConfig(**_COMMON, use_qkv_bias=True, partial_rotary_factor=0.5),
    "cohere": CohereConfig(**_COMMON, use_qk_norm=True, logit_scale=0.5),
    "phi": PhiConfig(**_COMMON, partial_rotary_factor=0.5),
    "smollm3": SmolLM3Config(**_COMMON, no_rope_layer_interval=2),
    # Mixture of experts: 4 routed experts (2 per token) of width 24 and a shared expert of width 40 per block.
    "qwen2_moe": Qwen2MoeConfig(**_COMMON, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
                                num_experts_per_tok=2, norm_topk_prob=False),
}
ARCHS = tuple(CONFIGS)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random model of ``arch`` in eval mode; biases (Qwen2 q/k/v, GPT-2, NeoX) are made non-zero."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[arch]))  # .to(dtype) would change the shared config
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)  # zero-initialised biases would hide a fold that forgets them
            elif name.endswith("norm.weight") or "layernorm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    if dtype == torch.float64 and hasattr(model, "set_experts_implementation") and "num_experts" in model.config:
        model.set_experts_implementation("eager")  # torch's grouped_mm (the default) has no float64 kernel
    return model.to(dtype).eval()


def probe_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_tokenizer():
    """A byte-level tokenizer with no merges: any text encodes, ids fit ``VOCAB``; has a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return tok


def save_tiny_checkpoint(arch: str, folder, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Write a tiny model of ``arch`` plus the tiny tokenizer to ``folder`` (a local "Hub" checkpoint)."""
    model = tiny_model(arch, seed=seed, dtype=dtype)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def every_site_neurons(layout) -> list:
    """Three neurons per site on every layer, routed experts included: masked (0), enhanced (2.5, not exact in
    bf16 products) and a non-round lambda (1.37)."""
    from bakeedit.neurons import Neuron

    neurons = []
    for layer in range(layout.n_layers):
        for site in (*layout.sites, *layout.expert_sites()):
            size = layout.site_size(site)
            for index, lam in ((0, 0.0), (size // 2, 2.5), (size - 1, 1.37)):
                neurons.append(Neuron(layer=layer, site=site, index=index, **{"lambda": lam}))
    return neurons
