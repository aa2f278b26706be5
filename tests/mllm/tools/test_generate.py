"""Inference on a tiny MLLM (mllm.tools.inference) and the eval / generate entry points.

The model: the debug recipe (debug LLM preset, ViQ debug tokenizer, discrete visual input) with its
LLM re-drawn at a large weight scale, so that greedy decoding emits varied tokens with clear argmax
margins (a freshly initialised model repeats one token, which would hide a wrong cache position).
It is saved with the trainer's own save function, so load_mllm reads the real checkpoint layout.
"""

from __future__ import annotations

import pytest
import torch
from mllm_helpers import RECIPES, debug_overrides
from PIL import Image

from mllm.config import load_recipe
from mllm.model.build import build_mllm
from mllm.tools.evaluate import eval_main, evaluate_mllm
from mllm.tools.inference import (
    Request,
    answer_generation_config,
    generate,
    generate_batch,
    generate_ids,
    generate_main,
    load_mllm,
    load_vis_tokenizer,
    preprocess_image,
    prompt_embeddings,
    stop_token_ids,
)
from mllm.train.checkpoint import export_checkpoint, save_checkpoint
from viq.tokenizer import ViQTokenizer

N_NEW = 6


def _spread_llm_weights(llm: torch.nn.Module, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in llm.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mllm") / "sft_full"
    cfg = load_recipe(RECIPES / "debug" / "sft_full.yaml",
                      debug_overrides(demo_data, out, "model.dtype=float32"))
    built = build_mllm(cfg, cuda=False)
    _spread_llm_weights(built.model.llm)
    save_checkpoint(built.model, built.tokenizer, cfg, out)
    model, text_tok, recipe = load_mllm(out, device="cpu")
    vis_tok = load_vis_tokenizer(out, recipe, device="cpu")
    return {"dir": out, "built": built, "model": model, "text_tok": text_tok, "vis_tok": vis_tok,
            "image": recipe.data.image}


def _pixels(model, image, settings):
    return preprocess_image(image, settings, model.visual.patch_size)


def _image(w=80, h=50, colour=(200, 30, 30)):
    img = Image.new("RGB", (w, h), (245, 245, 245))
    img.paste(Image.new("RGB", (w // 2, h // 2), colour), (w // 4, h // 4))
    return img


def _tokens(model, text_tok, requests, vis_tok, n=N_NEW, **options):
    embeds = prompt_embeddings(model, text_tok, requests, vis_tok)
    config = answer_generation_config(model.llm, text_tok, max_new_tokens=n, **options)
    return generate_ids(model.llm, text_tok, embeds, config)


def _requests(model, vis_tok, settings):
    x1, _ = _pixels(model, _image(), settings)
    x2, _ = _pixels(model, _image(120, 60, (30, 70, 230)), settings)
    return [Request("What colour is the square?", pixels=x1),
            Request("What shape is shown?", codes=vis_tok.encode([x2])[0]),
            Request("Say something without an image.")]


def test_load_mllm_restores_the_saved_weights(trained):
    m, built = trained["model"], trained["built"]
    saved = built.model.state_dict()
    for name, value in m.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert not m.training and not any(p.requires_grad for p in m.parameters())


def test_generate_from_pixels_equals_generate_from_codes(trained):
    m, tt, vt = trained["model"], trained["text_tok"], trained["vis_tok"]
    img = _image()
    from_pixels = generate(m, tt, "What colour is the square?", image=img, vis_tokenizer=vt, max_new_tokens=N_NEW,
                           settings=trained["image"])
    codes = vt.encode([_pixels(m, img, trained["image"])[0]])[0]
    from_codes = generate(m, tt, "What colour is the square?", codes=codes, max_new_tokens=N_NEW)
    assert from_pixels == from_codes
    assert isinstance(from_pixels, str)


def test_kv_cache_decoding_equals_full_forward_argmax(trained):
    m, tt, vt = trained["model"], trained["text_tok"], trained["vis_tok"]
    requests = _requests(m, vt, trained["image"])
    stop = stop_token_ids(tt, m.llm)
    got = _tokens(m, tt, requests, vt)
    for embeds, tokens in zip(prompt_embeddings(m, tt, requests, vt), got, strict=True):
        seq, want = embeds[None], []
        with torch.no_grad():
            for _ in range(N_NEW):  # no cache: the whole sequence every step
                token = int(m.llm(inputs_embeds=seq, use_cache=False).logits[0, -1].argmax())
                if token in stop:
                    break
                want.append(token)
                seq = torch.cat([seq, m.llm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
        assert tokens == want
    assert len({tuple(t) for t in got}) > 1 and any(len(set(t)) > 1 for t in got)  # not degenerate


def test_batched_generation_equals_one_by_one(trained):
    m, tt, vt = trained["model"], trained["text_tok"], trained["vis_tok"]
    requests = _requests(m, vt, trained["image"])
    assert len({len(e) for e in prompt_embeddings(m, tt, requests, vt)}) == 3  # left padding is exercised
    batched = _tokens(m, tt, requests, vt)
    assert batched == [_tokens(m, tt, [r], vt)[0] for r in requests]


def test_export_directory_generates_the_same(trained, tmp_path):
    exported = export_checkpoint(trained["dir"], tmp_path / "export")
    model, text_tok, recipe = load_mllm(exported, device="cpu")
    vis_tok = load_vis_tokenizer(exported, recipe, device="cpu")
    m, tt, vt = trained["model"], trained["text_tok"], trained["vis_tok"]
    settings = trained["image"]
    assert _tokens(model, text_tok, _requests(model, vis_tok, settings), vis_tok) == \
        _tokens(m, tt, _requests(m, vt, settings), vt)


def test_generate_rejects_bad_requests(trained):
    m, tt, vt = trained["model"], trained["text_tok"], trained["vis_tok"]
    with pytest.raises(ValueError, match="either image or codes"):
        generate(m, tt, "q", image=_image(), codes=vt.encode([_image()])[0])
    with pytest.raises(ValueError, match="needs settings="):
        generate(m, tt, "q", image=_image(), vis_tokenizer=vt)
    with pytest.raises(ValueError, match="needs vis_tokenizer"):
        generate(m, tt, "q", image=_image(), settings=trained["image"])
    with pytest.raises(ValueError, match="placeholders"):
        generate(m, tt, "<image> and <image>", image=_image(), vis_tokenizer=vt, settings=trained["image"])


def test_lora_continuous_checkpoint_merges_and_generates_the_same(demo_data, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    cfg = load_recipe(RECIPES / "debug" / "sft_lora_continuous.yaml",
                      debug_overrides(demo_data, out, "model.dtype=float32"))
    built = build_mllm(cfg, cuda=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # only the adapters are saved: the base is rebuilt from its seeded preset
        for name, p in built.model.llm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    save_checkpoint(built.model, built.tokenizer, cfg, out)
    model, text_tok, recipe = load_mllm(out, device="cpu")
    assert not hasattr(model.llm, "peft_config")  # merged for inference
    x, _ = _pixels(model, _image(), recipe.data.image)
    requests = [Request("What colour?", pixels=x), Request("no image here")]
    assert _tokens(model, text_tok, requests, None) == _tokens(built.model.eval(), built.tokenizer, requests, None)
    with pytest.raises(ValueError, match="cannot take codes"):
        generate(model, text_tok, "q", codes=ViQTokenizer.from_preset("debug").encode([_image()])[0])


def test_load_mllm_rejects_wrong_directories(trained, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_mllm(tmp_path / "nope")
    with pytest.raises(ValueError, match="mllm_config.yaml is missing"):
        load_mllm(tmp_path)
    trained["vis_tok"].save_pretrained(tmp_path / "viq")
    with pytest.raises(ValueError, match="ViQ tokenizer directory"):
        load_mllm(tmp_path / "viq")


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_generate_cli(trained, tmp_path, capsys):
    image = tmp_path / "img.png"
    _image().save(image)
    assert generate_main([str(trained["dir"]), "--image", str(image), "What colour?",
                          "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("case", ["missing image", "not an image", "wrong dir", "tokenizer dir"])
def test_generate_cli_bad_input_one_line(trained, tmp_path, capsys, case):
    model_dir, image = str(trained["dir"]), tmp_path / "img.png"
    if case == "not an image":
        image.write_text("not a png")
    elif case != "missing image":
        _image().save(image)
    if case == "wrong dir":
        model_dir = str(tmp_path)
    if case == "tokenizer dir":
        trained["vis_tok"].save_pretrained(tmp_path / "viq")
        model_dir = str(tmp_path / "viq")
    assert generate_main([model_dir, "--image", str(image), "What?"]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("viq generate: error:")
    assert {"missing image": "does not exist", "not an image": "cannot read image",
            "wrong dir": "mllm_config.yaml is missing", "tokenizer dir": "ViQ tokenizer"}[case] in line


def test_evaluate_mllm_writes_results(trained, demo_data, tmp_path):
    m, tt, vt = trained["model"], trained["text_tok"], trained["vis_tok"]
    res = evaluate_mllm(m, tt, demo_data["test"], image_settings=trained["image"], vis_tokenizer=vt, batch_size=4,
                        max_new_tokens=4,
                        out_dir=tmp_path)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert res["n"] == len(lines) == 6 and (tmp_path / "results.json").is_file()
    assert set(res["per_type"]) <= {"colour", "shape", "count", "position", "word", "caption"}
    assert res["n_vqa"] + res["n_caption"] == 6


def test_evaluate_mllm_skips_unusable_images(trained, demo_data, tmp_path):
    import json

    records = json.loads(demo_data["test"].read_text())[:2]
    records[0]["image"] = str(demo_data["test"].parent / records[0]["image"])
    records[1]["image"] = str(tmp_path / "missing.png")
    data = tmp_path / "two.json"
    data.write_text(json.dumps(records))
    m, tt, vt = trained["model"], trained["text_tok"], trained["vis_tok"]
    res = evaluate_mllm(m, tt, data, image_settings=trained["image"], vis_tokenizer=vt, max_new_tokens=2)
    assert res["n"] == 1 and res["skipped"] == {"unusable image": 1}


def test_eval_cli_model_and_bad_dir(trained, demo_data, tmp_path, capsys):
    data_dir = str(demo_data["test"].parent)
    assert eval_main([str(trained["dir"]), "--data", data_dir, "--limit", "2", "--max-new-tokens", "2",
                      "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "predictions.jsonl").is_file()
    capsys.readouterr()
    assert eval_main([str(tmp_path), "--data", data_dir]) == 1
    assert "mllm_config.yaml is missing" in _one_error_line(capsys)


def test_prompt_matches_the_training_rendering(trained, demo_data):
    """The inference prompt is exactly the training sample up to its first supervised token."""
    from mllm.data.chat import IGNORE_INDEX
    from mllm.data.dataset import SupervisedDataset
    from mllm.data.readers import read_samples
    from mllm.tools.inference import prompt_ids

    recipe = load_recipe(trained["dir"] / "mllm_config.yaml")
    d = recipe.data
    samples = list(read_samples(demo_data["test"]))
    ds = SupervisedDataset(samples, trained["text_tok"], patch_size=trained["model"].visual.patch_size, image=d.image,
                           max_seq_len=d.max_seq_len, strict=True)
    for i, sample in enumerate(samples):
        item = ds.load(i)
        first_label = int((item["labels"] != IGNORE_INDEX).nonzero()[0])
        x, grid = _pixels(trained["model"], sample.images[0].path, d.image)
        assert tuple(item["image_grids"][0].tolist()) == grid
        assert torch.equal(item["pixel_values"][0], x)
        ids = prompt_ids(trained["text_tok"], sample.turns[0]["content"], [grid])
        assert ids == item["input_ids"][:first_label].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recipe", ["sft_full", "sft_lora_continuous"])
def test_generate_on_cuda_in_bf16(demo_data, tmp_path, recipe):
    """The recipe's "auto" dtype gives a bf16 model on CUDA: inputs are cast, devices line up."""
    out = tmp_path / recipe
    cfg = load_recipe(RECIPES / "debug" / f"{recipe}.yaml", debug_overrides(demo_data, out))
    built = build_mllm(cfg, cuda=False)
    save_checkpoint(built.model, built.tokenizer, cfg, out)
    model, text_tok, recipe_cfg = load_mllm(out, device="cuda")
    assert model.llm.dtype == torch.bfloat16
    vis_tok = load_vis_tokenizer(out, recipe_cfg, device="cuda") if recipe_cfg.model.visual == "discrete" else None
    answers = [generate(model, text_tok, "What colour?", image=_image(), vis_tokenizer=vis_tok, max_new_tokens=4,
                        settings=recipe_cfg.data.image)]
    x, _ = _pixels(model, _image(), recipe_cfg.data.image)
    answers += generate_batch(model, text_tok, [Request("What colour?", pixels=x), Request("no image")],
                              vis_tokenizer=vis_tok, max_new_tokens=4)
    assert all(isinstance(a, str) for a in answers)



# what the hand-written greedy loop with a KV cache (mllm.tools.inference before it called transformers'
# generate()) answered to _requests on this fixture's model, 12 new tokens, batched and one by one alike
OLD_LOOP_TOKENS = [[2126, 1803, 695, 781, 908, 1465, 1251, 895, 1593, 311, 1703, 562],
                   [2085, 1610, 1683, 1457, 137, 1595, 2065, 1132, 1601, 1489, 218, 2046],
                   [781, 1641, 2033, 662, 2019, 1979, 555, 621, 1126, 231, 141, 1879]]


def test_generate_gives_the_old_loops_greedy_tokens(trained):
    m, tt, vt = trained["model"], trained["text_tok"], trained["vis_tok"]
    requests = _requests(m, vt, trained["image"])
    assert _tokens(m, tt, requests, vt, n=12) == OLD_LOOP_TOKENS
    assert [_tokens(m, tt, [r], vt, n=12)[0] for r in requests] == OLD_LOOP_TOKENS


def test_sampling_with_top_k_one_is_greedy_and_seeded_sampling_repeats(trained):
    m, tt, vt = trained["model"], trained["text_tok"], trained["vis_tok"]
    requests = _requests(m, vt, trained["image"])
    assert _tokens(m, tt, requests, vt, n=12, do_sample=True, top_k=1) == OLD_LOOP_TOKENS
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(_tokens(m, tt, requests, vt, n=12, do_sample=True, temperature=5.0, top_k=0))
    assert runs[0] == runs[1] and runs[0] != OLD_LOOP_TOKENS


def test_beam_search_batched_equals_one_by_one(trained):
    m, tt, vt = trained["model"], trained["text_tok"], trained["vis_tok"]
    requests = _requests(m, vt, trained["image"])
    beams = _tokens(m, tt, requests, vt, n=8, num_beams=3)
    assert beams == [_tokens(m, tt, [r], vt, n=8, num_beams=3)[0] for r in requests]
    assert all(len(row) == 8 for row in beams)


def test_stop_strings_end_the_answer_at_the_string(trained):
    m, tt, vt = trained["model"], trained["text_tok"], trained["vis_tok"]
    request = _requests(m, vt, trained["image"])[:1]
    greedy = OLD_LOOP_TOKENS[0]
    stop = tt.decode(greedy[4])
    assert stop.strip() and stop not in tt.decode(greedy[:4])  # the 5th token first brings it
    got = _tokens(m, tt, request, vt, n=12, stop_strings=[stop])[0]
    assert got == greedy[:5]
    assert generate_batch(m, tt, request, vis_tokenizer=vt, stop_strings=[stop]) == [tt.decode(got).strip()]


def test_streamer_sees_the_answer_tokens(trained):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    m, tt, vt = trained["model"], trained["text_tok"], trained["vis_tok"]
    streamer = Collect()
    answer = generate(m, tt, "What colour is the square?", image=_image(), vis_tokenizer=vt,
                      settings=trained["image"], streamer=streamer, max_new_tokens=12)
    # the first put is the (empty) prompt of an inputs_embeds call, then one token per step
    streamed = [t for put in streamer.puts[1:] for t in (put if isinstance(put, list) else [put])]
    assert streamer.ended and streamed == OLD_LOOP_TOKENS[0]
    assert answer == tt.decode(OLD_LOOP_TOKENS[0], skip_special_tokens=True).strip()


def test_generation_config_and_bad_options(trained):
    from transformers import GenerationConfig

    m, tt, vt = trained["model"], trained["text_tok"], trained["vis_tok"]
    requests = _requests(m, vt, trained["image"])
    embeds = prompt_embeddings(m, tt, requests, vt)
    config = answer_generation_config(m.llm, tt, GenerationConfig(max_new_tokens=3))
    assert config.eos_token_id == sorted(stop_token_ids(tt, m.llm))
    assert generate_ids(m.llm, tt, embeds, config) == [row[:3] for row in OLD_LOOP_TOKENS]
    with pytest.raises(ValueError, match=r"unknown generation options \['temprature'\]"):
        answer_generation_config(m.llm, tt, temprature=0.5)
    with pytest.raises(ValueError, match="max_new_tokens` must be greater than 0, but is 0"):
        answer_generation_config(m.llm, tt, max_new_tokens=0)
    with pytest.raises(ValueError, match="num_return_sequences must be 1, got 2"):
        answer_generation_config(m.llm, tt, num_beams=2, num_return_sequences=2)


def test_generate_cli_generation_options(trained, tmp_path, capsys):
    image = tmp_path / "img.png"
    _image().save(image)
    base = [str(trained["dir"]), "--image", str(image), "What colour is the square?", "--max-new-tokens", "12"]
    assert generate_main(base) == 0
    greedy = capsys.readouterr().out.strip()
    assert generate_main([*base, "--do-sample", "--top-p", "0.9", "--temperature", "0.5", "--seed", "1"]) == 0
    assert generate_main([*base, "--num-beams", "2", "--stop", "x"]) == 0
    capsys.readouterr()
    assert generate_main([*base, "--do-sample", "--seed", "1", "--top-p", "0.9", "--temperature", "1e-4"]) == 0
    assert capsys.readouterr().out.strip() == greedy  # a near-zero temperature samples the argmax
    with pytest.raises(SystemExit):
        generate_main([*base, "--max-new-tokens", "0"])
    assert "must be positive, got 0" in capsys.readouterr().err
