"""A tokenizer without a chat template is rendered with the documented ChatML fallback, and the log says so
once per tokenizer, however many conversations it renders."""

from __future__ import annotations

import copy
import logging

from mllm.data.chat import CHATML_TEMPLATE, DEFAULT_SYSTEM_PROMPT, render_conversation

TURNS = [{"role": "user", "content": "<image>\nWhat colour is the circle?"},
         {"role": "assistant", "content": "The circle is red."}]


def test_no_chat_template_renders_chatml_and_logs_once(tok, caplog):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with caplog.at_level(logging.WARNING, logger="mllm.data.chat"):
        first = render_conversation(TURNS, bare)
        second = render_conversation(TURNS, bare)
    reports = [r for r in caplog.records if "has no chat template" in r.getMessage()]
    assert len(reports) == 1, [r.getMessage() for r in caplog.records]
    assert "ChatML" in reports[0].getMessage() and DEFAULT_SYSTEM_PROMPT in reports[0].getMessage()
    assert first == second
    chatml = tok(tok.apply_chat_template(TURNS, chat_template=CHATML_TEMPLATE, tokenize=False),
                 add_special_tokens=False).input_ids
    assert first["input_ids"] == chatml


def test_a_tokenizer_with_a_template_logs_nothing(tok, caplog):
    assert tok.chat_template
    with caplog.at_level(logging.WARNING, logger="mllm.data.chat"):
        render_conversation(TURNS, tok)
    assert not [r for r in caplog.records if "has no chat template" in r.getMessage()]
