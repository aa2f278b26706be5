"""A small, deterministic byte-level BPE tokenizer with a ChatML chat template.

It is the tokenizer of the `debug` LLM preset and of the tests: nothing can be downloaded here, so
it is trained on the spot (well under a second) from text that ships with Python
(`pydoc_data.topics`, ~465k characters) plus the demo data set's phrases, repeated so that every
demo question and answer, and the chat template's role headers, become a handful of tokens. The
input is fixed and the BPE trainer breaks ties deterministically, so two builds give identical
vocabularies and merges.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen-style ChatML. The default system turn is emitted even for an empty message list so that
# rendering is prefix-stable (mllm.data.chat relies on that) whatever turn comes first.
CHATML_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# how often the demo phrases are repeated in the training text: enough for their words to win merges
_DEMO_REPEAT = 20


def _training_text() -> list[str]:
    import pydoc_data.topics

    from mllm.data.demo import demo_corpus

    topics = pydoc_data.topics.topics
    docs = [topics[key] for key in sorted(topics)]
    # the chat template's own words, so that a role header is two or three tokens
    glue = f"system\n{DEFAULT_SYSTEM_PROMPT}\nuser\nassistant\n"
    demo = "\n".join([glue, *demo_corpus()])
    return docs + [demo] * _DEMO_REPEAT


def build_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE and wrap it: eos `<|im_end|>`, pad `<|endoftext|>`, ChatML template.

    The special tokens take ids 0-3 (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<image>`);
    `len(tokenizer) == vocab_size`.
    """
    # imported here so that the constants above (used by mllm.data.chat) cost no transformers import
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_size = len(SPECIAL_TOKENS) + 256
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(
            f"vocab_size must be an integer >= {min_size} (specials + 256 bytes), got {vocab_size!r}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IMAGE_TOKEN],
        model_max_length=1 << 20,
    )
    wrapped.chat_template = CHATML_TEMPLATE
    logger.debug("built a byte-level BPE tokenizer with %d tokens", len(wrapped))
    return wrapped
