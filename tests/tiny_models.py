"""Tiny randomly initialised causal LMs of every supported architecture, built in-process (no downloads).

Sizes are chosen so that every site has a distinct width (GQA with 4 query heads over 2 kv heads, FFN 48) and an
index mix-up between sites shows up as an out-of-range error or a logit mismatch.
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
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
