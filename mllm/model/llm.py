"""Base language models: a local Hugging Face directory, a hub id, or a named preset.

A family preset names a published checkpoint (PRESET_HUB_IDS: ``qwen2.5-0.5b`` is
``Qwen/Qwen2.5-0.5B-Instruct``) and loads it like any hub id. Its random-weight shape, for benchmarks,
dry runs, tests and the debug twins, must be asked for with ``model.llm_init: random``: it then uses the
project's small BPE (mllm.model.text_tokenizer), whose ids all fall inside the preset's vocabulary, and
the build's first log line says that the weights are random. The tiny presets (``debug``, ``demo``, ...)
have no checkpoint and exist only as random shapes, so they need ``llm_init: random`` too: random weights
are never a silent fallback. ``llm_init`` decides only what a preset name means; a directory or hub id is
always loaded with its weights (a trained run's ``llm/`` directory, an export).

A value that looks like a path (``./``, ``../``, ``/``, ``~``, an existing file or folder, or one whose
parent folder exists) is a local directory and never becomes a hub request. A hub id is read from the
local Hugging Face cache when it is there; otherwise the hub is asked only if ``HF_HUB_OFFLINE`` is off and
the hub answers a single request, so a machine without a network fails in a moment with what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_session, snapshot_download
from huggingface_hub.errors import HFValidationError
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

# the checkpoint each family preset stands for (the instruction-tuned one, which the chat recipes fine-tune)
PRESET_HUB_IDS: dict[str, str] = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}
LLM_INITS = ("pretrained", "random")

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


def load_llm(spec: str, *, init: str = "pretrained", dtype: torch.dtype = torch.float32,
             attn_implementation: str = "sdpa", seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``spec``: a preset name, a local HF directory, or a hub id; ``init``: what a preset name means (its
    checkpoint, or its random shape seeded by ``seed``). Returns (model, tokenizer) with the ``<image>``
    placeholder registered in the tokenizer (and the embedding resized if it did not fit)."""
    if random_shape(spec, init):
        log.warning("model.llm=%s: RANDOM weights (model.llm_init: random), the preset's shape only and the "
                    "project's small BPE; nothing pretrained", spec)
        cfg = preset_config(spec)
        cfg._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    else:
        model = from_pretrained(AutoModelForCausalLM, weights_source(spec), dtype=dtype,
                                attn_implementation=attn_implementation)
    tokenizer = load_text_tokenizer(spec, init=init)
    ensure_image_token(model, tokenizer)
    return model, tokenizer


def load_text_tokenizer(spec: str, *, init: str = "pretrained") -> PreTrainedTokenizerBase:
    """The text tokenizer of ``spec`` (as ``load_llm`` names it) with ``<image>`` registered, without the
    model's weights: for tools that only render data."""
    if random_shape(spec, init):
        tokenizer = build_tokenizer()
    else:
        tokenizer = from_pretrained(AutoTokenizer, weights_source(spec))
    register_image_token(tokenizer)
    return tokenizer


def random_shape(spec: str, init: str) -> bool:
    """Whether ``spec`` under ``model.llm_init=init`` is a preset's random shape (else real weights)."""
    if init not in LLM_INITS:
        raise ValueError(f"model.llm_init must be one of {LLM_INITS}, got {init!r}")
    return init == "random" and spec in LLM_PRESETS


def weights_source(spec: str) -> Path | str:
    """Where the weights of ``spec`` come from: a local directory (Path) or a hub id (str). A shape-only
    preset has none: the error says how to ask for its random weights, and why LoRA cannot use them."""
    if spec not in LLM_PRESETS:
        return llm_source(spec)
    if spec in PRESET_HUB_IDS:
        return PRESET_HUB_IDS[spec]
    raise ValueError(
        f"model.llm={spec!r} is a shape without pretrained weights (the presets with a checkpoint: "
        f"{', '.join(sorted(PRESET_HUB_IDS))}). Built, it would start from random weights, on which LoRA or a "
        f"frozen LLM learns nothing useful. Say `model.llm_init: random` in the recipe to build it anyway (tests, "
        f"benchmarks, dry runs), or name real weights: a preset with a checkpoint, a local HF directory, a hub id")


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` is meant as a local path: such a value must never become a hub request."""
    path = Path(spec).expanduser()
    return (spec.startswith(("./", "../", "/", "~")) or spec in (".", "..") or path.exists()
            or ("/" in spec and path.parent.is_dir()))


def llm_source(spec: str, what: str = "model.llm") -> Path | str:
    """A local model directory (Path) or a hub id (str) for a non-preset ``spec``; ValueError otherwise,
    naming the resolved directory when ``spec`` looks like a path."""
    if looks_like_path(spec):
        path = Path(spec).expanduser().resolve()
        if not path.exists():
            raise ValueError(f"{what} {spec!r}: directory not found: {path}")
        if not path.is_dir():
            raise ValueError(f"{what} {spec!r}: {path} is a file, not a model directory")
        return path
    if "/" not in spec:
        raise ValueError(f"{what} {spec!r} is neither a preset ({', '.join(sorted(LLM_PRESETS))}), a local "
                         f"directory ({Path(spec).resolve()} not found), nor a hub id (org/name)")
    return spec


def from_pretrained(loader, source: Path | str, what: str = "model.llm", **kwargs):
    """``loader.from_pretrained`` of a local directory, or of a hub id: from its snapshot in the local cache
    when there is one; the hub is asked only when the offline setting allows it and it answers one request,
    so that an unreachable hub fails at once instead of after the download retries."""
    if isinstance(source, Path):
        return loader.from_pretrained(str(source), **kwargs)
    cache_miss = None
    try:
        # a local snapshot, loaded as a directory: transformers' own local_files_only still sends a request
        # (its adapter look-up) that retries for about 50 s without a network
        snapshot = snapshot_download(source, local_files_only=True)
    except HFValidationError as err:
        raise ValueError(f"{what} {source!r} is neither a local directory ({Path(source).resolve()} not found) "
                         f"nor a valid hub id: {err}") from None
    except OSError as err:
        snapshot, cache_miss = None, err
    if snapshot is not None:
        try:
            loaded = loader.from_pretrained(snapshot, **kwargs)
        except OSError as err:  # partly cached (a tokenizer without its weights): the hub holds the rest
            cache_miss = err
        else:
            # what records the base (peft's adapter config, a saved config) names the hub id, not this cache
            loaded.name_or_path = source
            if hasattr(loaded, "config"):
                loaded.config.name_or_path = source
            return loaded
    how = (f"download it where the hub can be reached (`hf download {source} --local-dir DIR`) and set "
           f"{what}=DIR (`viq prepare-llm smollm2-135m-instruct DIR` makes a small real one offline); a preset's "
           "random-weight shape, for tests and benchmarks only, needs model.llm_init: random")
    missing = f"{what} {source!r} is not (fully) in the Hugging Face cache ({hf_constants.HF_HUB_CACHE})"
    if hf_constants.HF_HUB_OFFLINE:
        raise ValueError(f"{missing} and hub access is off (HF_HUB_OFFLINE): {how}") from cache_miss
    unreachable = hub_unreachable()
    if unreachable:
        raise ValueError(f"{missing} and the hub ({hf_constants.ENDPOINT}) cannot be reached ({unreachable}): "
                         f"{how}") from cache_miss
    return loader.from_pretrained(source, **kwargs)


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub endpoint does not answer one request (no retries), or None when it does."""
    try:
        get_session().head(hf_constants.ENDPOINT, timeout=timeout)
    except Exception as err:  # the HTTP client's connect, timeout and proxy errors are its own classes
        return f"{type(err).__name__}: {err}"
    return None


def register_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def ensure_image_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    image_id = register_image_token(tokenizer)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        log.info("resizing the LLM embeddings to %d for the added tokens", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    return image_id
