"""One image-settings record from extraction to inference: a recipe that states no data.image inherits the
codes' settings, the saved model records them, and inference from pixels gives the image token counts that
training used."""

from __future__ import annotations

import dataclasses
import json

import pytest
from mllm_helpers import RECIPES, debug_overrides

from mllm.config import load_recipe
from mllm.data.codes import CodeStore
from mllm.data.layout import IMAGE_TOKEN, num_image_tokens
from mllm.tools.extract import extract
from mllm.tools.inference import load_mllm, preprocess_image, prompt_ids
from mllm.train.data_setup import resolve_image_settings
from mllm.train.trainer import run_training
from viq import ViQTokenizer
from viq.config import PreprocessConfig

RECIPE = RECIPES / "debug" / "sft_full.yaml"
# other than the debug recipes' own (area 4096) and other than PreprocessConfig's defaults
CODES_SETTINGS = {"area": 9216, "multiple": 32}


@pytest.fixture(scope="module")
def codes(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    tok = root / "tok"
    ViQTokenizer.from_preset("debug", seed=0).save_pretrained(tok)
    extract(str(tok), demo_data["train"], root / "codes", preprocess=CODES_SETTINGS, progress=False)
    return {"tokenizer": tok, "codes": root / "codes"}


def _recipe(demo_data, out, codes, *extra):
    return load_recipe(RECIPE, debug_overrides(demo_data, out, f"model.tokenizer={codes['tokenizer']}",
                                               f"data.codes={codes['codes']}", "train.max_steps=2",
                                               "model.dtype=float32", *extra))


def test_training_from_codes_inherits_their_settings_and_inference_repeats_them(demo_data, codes, tmp_path):
    out = tmp_path / "run"
    cfg = _recipe(demo_data, out, codes, "data.image=null")
    assert cfg.data.image is None
    trainer = run_training(cfg)
    codes_image = CodeStore(codes["codes"]).image
    assert codes_image == dataclasses.replace(PreprocessConfig(), **CODES_SETTINGS)
    assert trainer.recipe.data.image == codes_image

    model, text_tok, recipe = load_mllm(out, device="cpu")
    assert recipe.data.image == codes_image  # the saved model records what it was trained on
    image_id = text_tok.convert_tokens_to_ids(IMAGE_TOKEN)
    records = trainer.train_dataset.dataset.records
    assert len(records) == 48 and all(r.images for r in records)
    for rec in records:
        for ref, trained_grid in zip(rec.images, rec.grids, strict=True):
            _, grid = preprocess_image(ref.path, recipe.data.image, model.visual.patch_size, ref)
            ids = prompt_ids(text_tok, "What is shown?", [grid])
            assert tuple(grid) == tuple(trained_grid), ref.path
            assert ids.count(image_id) == num_image_tokens(*trained_grid), ref.path


def test_a_stated_setting_that_differs_from_the_codes_is_refused_naming_both(demo_data, codes, tmp_path):
    cfg = _recipe(demo_data, tmp_path / "refused", codes)  # the debug recipe states area 4096
    with pytest.raises(ValueError, match=r"extracted with image settings .*area=9216.*data\.image=.*area=4096"):
        run_training(cfg)


def test_resolution_rules(demo_data, codes, tmp_path):
    base = load_recipe(RECIPE, debug_overrides(demo_data, tmp_path / "r", "data.image=null"))
    assert resolve_image_settings(base).data.image == PreprocessConfig()  # pixels, nothing stated: the defaults
    stated = load_recipe(RECIPE, debug_overrides(demo_data, tmp_path / "r"))
    assert resolve_image_settings(stated) is stated
    from_codes = dataclasses.replace(base, data=dataclasses.replace(base.data, codes=str(codes["codes"])))
    manifest = json.loads((codes["codes"] / "manifest.json").read_text())
    assert dataclasses.asdict(resolve_image_settings(from_codes).data.image) == manifest["preprocess"]
    missing = dataclasses.replace(base, data=dataclasses.replace(base.data, codes=str(tmp_path / "no-codes")))
    with pytest.raises(ValueError, match="no-codes.*manifest.json"):
        resolve_image_settings(missing)
