"""Base language models: a local Hugging Face directory, a hub id, or a named shape preset.

Presets carry the published shapes of each family (random weights, no download) so that recipes,
benchmarks and dry runs use the real arithmetic; their tokenizer is the project's small BPE
(mllm.model.text_tokenizer), whose ids all fall inside the preset's vocabulary.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mllm.data.layout import IMAGE_TOKEN
from mllm.model.text_tokenizer import build_tokenizer

log = logging.getLogger(__name__)


_QWEN2 = dict(model_type="qwen2", vocab_size=151936, rope_theta=1e6, max_position_embeddings=32768,
              rms_norm_eps=1e-6, hidden_act="silu")
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, rope_theta=1e6, max_position_embeddings=40960,
              rms_norm_eps=1e-6, hidden_act="silu", head_dim=128)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, rope_theta=5e5, max_position_embeddings=131072,
               rms_norm_eps=1e-5, hidden_act="silu")
_SMOL = dict(model_type="llama", vocab_size=49152, rope_theta=1e5, max_position_embeddings=8192,
             rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True)


def _shape(base: dict, hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool, **kw) -> dict:
    return {**base, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "tie_word_embeddings": tie, **kw}


LLM_PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": _shape(_QWEN2, 896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": _shape(_QWEN2, 1536, 8960, 28, 12, 2, True),
    "qwen2.5-3b": _shape(_QWEN2, 2048, 11008, 36, 16, 2, True),
    "qwen2.5-7b": _shape(_QWEN2, 3584, 18944, 28, 28, 4, False, vocab_size=152064),
    "qwen3-0.6b": _shape(_QWEN3, 1024, 3072, 28, 16, 8, True),
    "qwen3-1.7b": _shape(_QWEN3, 2048, 6144, 28, 16, 8, True),
    "qwen3-4b": _shape(_QWEN3, 2560, 9728, 36, 32, 8, True),
    "qwen3-8b": _shape(_QWEN3, 4096, 12288, 36, 32, 8, False),
    "llama-3.2-1b": _shape(_LLAMA3, 2048, 8192, 16, 32, 8, True, head_dim=64),
    "llama-3.2-3b": _shape(_LLAMA3, 3072, 8192, 28, 24, 8, True, head_dim=128),
    "llama-3.1-8b": _shape(_LLAMA3, 4096, 14336, 32, 32, 8, False),
    "smollm2-135m": _shape(_SMOL, 576, 1536, 30, 9, 3, True),
    "smollm2-360m": _shape(_SMOL, 960, 2560, 32, 15, 5, True),
    "smollm2-1.7b": _shape(_SMOL, 2048, 8192, 24, 32, 32, True, rope_theta=1.3e5),
    "debug": _shape(_QWEN2, 64, 128, 2, 4, 2, True, vocab_size=2304, max_position_embeddings=4096),
    # the demo's LLM: large enough to learn the synthetic VQA on two CPU cores in minutes (2 layers for
    # 900 steps beat 4 layers for the 560 steps that take as long: 61.7 % against 58.7 % in the demo)
    "demo": _shape(_QWEN2, 256, 768, 2, 4, 2, True, vocab_size=2304, max_position_embeddings=4096),
    "debug-qwen3": _shape(_QWEN3, 64, 128, 2, 4, 2, True, vocab_size=2304, head_dim=16,
                          max_position_embeddings=4096),
    "debug-llama": _shape(_LLAMA3, 64, 128, 2, 4, 2, False, vocab_size=2304, max_position_embeddings=4096),
}

# LoRA targets per model_type: every projection of attention and MLP (as the ViQ authors' DoRA setup)
LORA_TARGETS = {
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def preset_config(name: str):
    if name not in LLM_PRESETS:
        raise ValueError(f"unknown LLM preset {name!r}; choose one of {sorted(LLM_PRESETS)}")
    spec = dict(LLM_PRESETS[name])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def load_llm(spec: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
             seed: int = 0, device: str | torch.device = "meta_ok") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``spec``: a preset name, a local HF directory, or a hub id. Returns (model, tokenizer) with the
    ``<image>`` placeholder registered in the tokenizer (and the embedding resized if it did not fit)."""
    if spec in LLM_PRESETS:
        cfg = preset_config(spec)
        cfg._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = build_tokenizer()
    else:
        if not Path(spec).is_dir() and "/" not in spec:
            raise ValueError(f"model.llm {spec!r} is neither a preset ({', '.join(sorted(LLM_PRESETS))}), "
                             "a local directory, nor a hub id")
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    ensure_image_token(model, tokenizer)
    return model, tokenizer


def ensure_image_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        log.info("resizing the LLM embeddings to %d for the added tokens", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
