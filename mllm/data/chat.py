"""Render a conversation with the tokenizer's chat template and supervise only the assistant's words.

The assistant spans are found without knowing the template: for each assistant turn i we render
`turns[:i]` with the generation prompt (everything the model is given) and `turns[:i+1]` (the same
plus the answer). Each rendering must be a prefix of the next; the difference is the assistant
segment. A template that rewrites earlier turns once later ones exist (Qwen3's thinking template
drops old reasoning, for example) is not prefix-stable and is rejected with ValueError rather than
labelled wrongly.

Each segment is tokenised on its own, which is how inference sees it too: the prompt ends at the
generation header and the answer's tokens start fresh after it.

Labels: the assistant's content and its end-of-turn token (`<|im_end|>`, `<|eot_id|>`: the last
special token of the segment) are supervised. Template glue after that token (ChatML's "\\n") is
not: generation stops at the end-of-turn token, so the model never has to produce what follows,
and everything after it up to the next answer is fixed template text. Role headers, system and user
turns and image placeholders are -100.

A tokenizer without a chat template is rendered with ChatML (`CHATML_TEMPLATE` below, the
Qwen layout with its default system prompt), the format most instruction-tuned bases expect; the log
says so once per tokenizer.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

from mllm.data.layout import IMAGE_TOKEN

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen-style ChatML. The default system turn is emitted even for an empty message list so that
# rendering is prefix-stable (render_conversation relies on that) whatever turn comes first.
CHATML_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
IGNORE_INDEX = -100
log = logging.getLogger(__name__)
# the tokenizers already reported as rendered with the fallback: every conversation renders several times
_fallback_reported: weakref.WeakSet = weakref.WeakSet()
ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}


class ConversationError(ValueError):
    """A conversation that cannot be rendered; `reason` is a short category for skip counters."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def normalize_turns(turns: Sequence[dict]) -> list[dict]:
    """[{role, content}] or LLaVA [{from, value}] -> [{"role": user|assistant|system, "content": str}]."""
    if not turns:
        raise ConversationError("empty conversation", "the conversation has no turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ConversationError("malformed turn", f"turn {i} is a {type(turn).__name__}, not a dict")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES:
            raise ConversationError(
                "unknown role", f"turn {i} has unknown role {role!r}; expected one of {sorted(ROLE_ALIASES)}"
            )
        if not isinstance(content, str):
            raise ConversationError("malformed turn", f"turn {i} content must be a string, got {content!r}")
        _check_encodable(content, f"turn {i}")
        out.append({"role": ROLE_ALIASES[role], "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise ConversationError("no assistant turn", "the conversation has no assistant turn to learn from")
    return out


def _check_encodable(text: str, what: str) -> None:
    # a lone surrogate (the JSON escape "\ud800" is legal) cannot become UTF-8, and the tokenizer fails on it
    # with a TypeError that names neither the sample nor the cause
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConversationError("unencodable text", f"{what} is not encodable text: {err}") from err


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else CHATML_TEMPLATE
    if template is not None and tokenizer not in _fallback_reported:
        _fallback_reported.add(tokenizer)
        log.warning("tokenizer %r has no chat template: conversations are rendered with ChatML "
                    "(mllm.data.chat.CHATML_TEMPLATE, system prompt %r)",
                    getattr(tokenizer, "name_or_path", type(tokenizer).__name__), DEFAULT_SYSTEM_PROMPT)
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja raises many types; the caller needs one
        raise ConversationError("template error", f"the chat template failed: {err}") from err
    if not isinstance(text, str):
        raise ConversationError(
            "template error", f"the chat template returned {type(text).__name__}, not str"
        )
    return text


def _extend(prev: str, text: str, what: str) -> str:
    if not text.startswith(prev):
        raise ConversationError(
            "template not prefix-stable",
            f"the chat template is not prefix-stable: rendering {what} changes earlier text "
            f"({prev[-60:]!r} is not a prefix of {text[: len(prev)][-60:]!r})",
        )
    return text[len(prev) :]


def split_segments(turns: Sequence[dict], tokenizer, *, system: str | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, is_assistant) segments."""
    msgs = normalize_turns(turns)
    if system is not None:
        if msgs[0]["role"] == "system":
            raise ConversationError("two system prompts", "system= was given but the conversation has one")
        _check_encodable(system, "the system prompt")
        msgs = [{"role": "system", "content": system}, *msgs]
    segments: list[tuple[str, bool]] = []
    prev = ""
    for i, msg in enumerate(msgs):
        if msg["role"] == "assistant":
            prompt = _render(tokenizer, msgs[:i], generation_prompt=True)
            segments.append((_extend(prev, prompt, f"the prompt before turn {i}"), False))
            prev = prompt
        full = _render(tokenizer, msgs[: i + 1], generation_prompt=False)
        segments.append((_extend(prev, full, f"turn {i}"), msg["role"] == "assistant"))
        prev = full
    return [(text, sup) for text, sup in segments if text]


def _end_of_turn(ids: list[int], tokenizer, special_ids: set[int]) -> int:
    """Index just past an assistant segment's end-of-turn token: its last special token, provided
    only whitespace follows it (template glue); len(ids) when there is no such token."""
    for j in range(len(ids) - 1, -1, -1):
        if ids[j] in special_ids:
            return j + 1 if not tokenizer.decode(ids[j + 1 :]).strip() else len(ids)
    return len(ids)


def render_conversation(
    turns: Sequence[dict], tokenizer, *, system: str | None = None, image_token: str = IMAGE_TOKEN
) -> dict[str, list[int]]:
    """Token ids and labels (-100 except on assistant content and its end-of-turn token).

    Raises ConversationError (a ValueError) for an empty conversation, no assistant turn, an unknown
    role, text that cannot be encoded (a lone surrogate), or a template that is not prefix-stable.
    """
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    # tokens added with add_tokens(special_tokens=True) (Llama-3's <|eot_id|>) are not in all_special_ids
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special_ids = (set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}) - {image_id}
    input_ids: list[int] = []
    labels: list[int] = []
    for text, supervised in split_segments(turns, tokenizer, system=system):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        if not supervised:
            labels += [IGNORE_INDEX] * len(ids)
            continue
        cut = _end_of_turn(ids, tokenizer, special_ids)
        labels += ids[:cut] + [IGNORE_INDEX] * (len(ids) - cut)
    # an image placeholder is replaced by image features, never predicted, even inside an answer
    labels = [IGNORE_INDEX if t == image_id else lab for t, lab in zip(input_ids, labels, strict=True)]
    return {"input_ids": input_ids, "labels": labels}
