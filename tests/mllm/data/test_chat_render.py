import copy

import pytest

from mllm.data.chat import IGNORE_INDEX, ConversationError, render_conversation

LLAMA3_STYLE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def supervised(out):
    return [t for t, lab in zip(out["input_ids"], out["labels"], strict=True) if lab != IGNORE_INDEX]


def test_single_turn_chatml(tok):
    turns = [
        {"role": "user", "content": "<image>\nWhat colour is the circle?"},
        {"role": "assistant", "content": "The circle is red."},
    ]
    out = render_conversation(turns, tok)
    assert len(out["input_ids"]) == len(out["labels"])
    # exactly the answer and its end-of-turn token; no header token, no trailing "\n"
    assert supervised(out) == ids(tok, "The circle is red.<|im_end|>")
    # the segment-wise tokenisation agrees with tokenising the whole rendering here
    assert out["input_ids"] == ids(tok, tok.apply_chat_template(turns, tokenize=False))
    labels = out["labels"]
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    header = ids(tok, "<|im_start|>assistant\n")
    assert out["input_ids"][first - len(header) : first] == header
    assert all(lab == IGNORE_INDEX for lab in labels[:first])
    assert labels[-1] == IGNORE_INDEX and out["input_ids"][-1] == ids(tok, "\n")[0]
    # supervised labels equal their input ids (HF shifts inside the loss)
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(out["input_ids"], labels, strict=True))


def test_multi_turn_and_llava_keys(tok):
    llava = [
        {"from": "human", "value": "<image>\nCount them."},
        {"from": "gpt", "value": "3"},
        {"from": "human", "value": "And the colour?"},
        {"from": "gpt", "value": "blue"},
    ]
    out = render_conversation(llava, tok)
    assert supervised(out) == ids(tok, "3<|im_end|>") + ids(tok, "blue<|im_end|>")
    role_content = [
        {"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in llava
    ]
    assert render_conversation(role_content, tok) == out
    image_pos = out["input_ids"].index(tok.convert_tokens_to_ids("<image>"))
    assert out["labels"][image_pos] == IGNORE_INDEX


def test_system_turn(tok):
    turns = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Shape?"},
        {"role": "assistant", "content": "star"},
    ]
    out = render_conversation(turns, tok)
    text = tok.decode(out["input_ids"])
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
    assert "You are a helpful assistant." not in text
    assert supervised(out) == ids(tok, "star<|im_end|>")
    assert render_conversation(turns[1:], tok, system="Answer in one word.") == out
    with pytest.raises(ValueError, match="system"):
        render_conversation(turns, tok, system="again")


def test_image_token_in_answer_unsupervised(tok):
    out = render_conversation(
        [{"role": "user", "content": "Draw"}, {"role": "assistant", "content": "<image> ok"}], tok
    )
    assert supervised(out) == ids(tok, " ok<|im_end|>")


def test_llama3_style_template(tok):
    llama = copy.deepcopy(tok)
    llama.add_tokens(
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True
    )
    llama.chat_template = LLAMA3_STYLE
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "red square"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "green"},
    ]
    out = render_conversation(turns, llama)
    assert supervised(out) == ids(llama, "red square<|eot_id|>") + ids(llama, "green<|eot_id|>")
    assert out["input_ids"][0] == llama.convert_tokens_to_ids("<|begin_of_text|>")
    assert llama.decode(out["input_ids"]).count("<|start_header_id|>assistant<|end_header_id|>") == 2


def test_no_chat_template_falls_back_to_chatml(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    assert render_conversation(turns, bare) == render_conversation(turns, tok)


def test_not_prefix_stable_template_rejected(tok):
    unstable = copy.deepcopy(tok)
    # the turn count up front changes as turns are added
    unstable.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="prefix-stable"):
        render_conversation(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], unstable
        )


@pytest.mark.parametrize(
    ("turns", "reason", "match"),
    [
        ([], "empty conversation", "no turns"),
        ([{"role": "user", "content": "hi"}], "no assistant turn", "no assistant turn"),
        (
            [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}],
            "unknown role",
            "'robot'",
        ),
        (
            [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}],
            "malformed turn",
            "None",
        ),
    ],
)
def test_errors(tok, turns, reason, match):
    with pytest.raises(ConversationError, match=match) as info:
        render_conversation(turns, tok)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)
