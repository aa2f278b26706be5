import pytest
from transformers import AutoTokenizer

from mllm.data.chat import CHATML_TEMPLATE
from mllm.demo.data import demo_corpus
from mllm.model.text_tokenizer import build_tokenizer


def test_special_tokens_and_size(tok):
    assert len(tok) == 2048
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]) == [
        0,
        1,
        2,
        3,
    ]
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    # special tokens are single ids even inside text
    assert tok("<image>\nhi<|im_end|>", add_special_tokens=False).input_ids[0] == 3
    assert tok("<image>\nhi<|im_end|>", add_special_tokens=False).input_ids[-1] == 2


def test_deterministic(tok):
    again = build_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    text = "def f(x): return x ** 2  # What colour is the star?"
    assert again(text).input_ids == tok(text).input_ids


def test_demo_phrases_are_compact(tok):
    for line in ("What colour is the circle?", "How many shapes are there?", "purple", "triangle"):
        n = len(tok(line, add_special_tokens=False).input_ids)
        assert n <= len(line.split()) + 1, (line, n)
    assert all(tok.decode(tok(s).input_ids) == s for s in demo_corpus())


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    custom = [{"role": "system", "content": "Be brief."}, *msgs]
    assert tok.apply_chat_template(custom, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user"
    )


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\n<image>\nWhat word is written in the image?<|im_end|>\n"
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.chat_template == CHATML_TEMPLATE
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert set(loaded.all_special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"}


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(vocab_size=100)
