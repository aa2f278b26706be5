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
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

from mllm.data.chat import CHATML_TEMPLATE, DEFAULT_SYSTEM_PROMPT, IM_END, IM_START, PAD_TOKEN, SPECIAL_TOKENS
from mllm.data.layout import IMAGE_TOKEN

logger = logging.getLogger(__name__)

# every question and answer phrase of the demo data set, one a line (mllm.demo.data.demo_corpus; a test
# keeps the two equal), so that the debug LLM's vocabulary covers the demo's words
DEBUG_CORPUS = Path(__file__).with_name("debug_corpus.txt")

# how often the demo phrases are repeated in the training text: enough for their words to win merges
_DEMO_REPEAT = 20


def _training_text() -> list[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    docs = [topics[key] for key in sorted(topics)]
    # the chat template's own words, so that a role header is two or three tokens
    glue = f"system\n{DEFAULT_SYSTEM_PROMPT}\nuser\nassistant\n"
    demo = "\n".join([glue, *DEBUG_CORPUS.read_text().splitlines()])
    return docs + [demo] * _DEMO_REPEAT


def build_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE and wrap it: eos `<|im_end|>`, pad `<|endoftext|>`, ChatML template.

    The special tokens take ids 0-3 (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<image>`);
    `len(tokenizer) == vocab_size`.
    """
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
