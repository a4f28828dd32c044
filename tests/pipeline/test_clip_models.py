"""The CLIP loading path, exercised on a tiny open_clip CLIP written to disk (no network)."""

from __future__ import annotations

import json
import time

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from pipeline.stages.clip_models import (
    CONFIG_NAME,
    TINY_CLIP_CONFIG,
    WEIGHTS_NAME,
    build_tiny_clip,
    load_clip,
    needs_quick_gelu,
    tiny_clip_model,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip", seed=0)


def _probe_inputs(tokenizer):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 64, 64, generator=gen)
    tokens = tokenizer(["a man arm wrestling", "a cat on a sofa", ""])
    return images, tokens


def _embed(model, images, tokens):
    with torch.inference_mode():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def test_build_is_fast_and_deterministic(tmp_path):
    start = time.perf_counter()
    a = build_tiny_clip(tmp_path / "a", seed=0)
    assert time.perf_counter() - start < 3.0
    b = build_tiny_clip(tmp_path / "b", seed=0)
    c = build_tiny_clip(tmp_path / "c", seed=1)
    wa, wb, wc = (load_file(f"{d}/{WEIGHTS_NAME}") for d in (a, b, c))
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["visual.proj"], wc["visual.proj"])
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert config["model_cfg"] == TINY_CLIP_CONFIG
    assert config["preprocess_cfg"]["size"] == 64


def test_round_trip_gives_the_same_embeddings(tiny_dir):
    before = tiny_clip_model(seed=0)
    bundle = load_clip(tiny_dir, None, "cpu")
    images, tokens = _probe_inputs(bundle.tokenizer)
    img_before, txt_before = _embed(before, images, tokens)
    img_after, txt_after = _embed(bundle.model, images, tokens)
    torch.testing.assert_close(img_after, img_before, rtol=0, atol=1e-6)
    torch.testing.assert_close(txt_after, txt_before, rtol=0, atol=1e-6)
    # The weights matter: another seed embeds differently.
    img_other, _ = _embed(tiny_clip_model(seed=1), images, tokens)
    assert (img_other - img_before).abs().max() > 1e-2


def test_bundle_describes_the_model(tiny_dir):
    bundle = load_clip(tiny_dir, None, "cpu")
    assert bundle.name == "tiny-clip"  # the directory's name, never its full path
    assert "/" not in bundle.name
    assert bundle.embed_dim == TINY_CLIP_CONFIG["embed_dim"]
    assert bundle.image_size == (64, 64)
    assert bundle.device == torch.device("cpu")
    assert not bundle.model.training
    pp = bundle.preprocess_cfg
    assert tuple(pp["mean"]) == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert pp["interpolation"] == "bicubic"


def test_local_dir_prefix_and_plain_path_load_the_same(tiny_dir):
    a = load_clip(tiny_dir, None, "cpu")
    b = load_clip("local-dir:" + tiny_dir, "openai", "cpu")  # pretrained is ignored for a directory
    images, tokens = _probe_inputs(a.tokenizer)
    torch.testing.assert_close(_embed(a.model, images, tokens)[0], _embed(b.model, images, tokens)[0])
    assert b.name == "tiny-clip"


def test_tokenizer_is_opencips_offline_bpe_and_truncates(tiny_dir):
    tok = load_clip(tiny_dir, None, "cpu").tokenizer
    assert isinstance(tok, open_clip.tokenizer.SimpleTokenizer)
    ids = tok(["a photo of a cat"])
    assert ids.shape == (1, 77)
    assert ids[0, 0] == tok.sot_token_id
    assert tok.eot_token_id in ids[0].tolist()
    long_ids = tok([" ".join(["wrestling"] * 500)])
    assert long_ids.shape == (1, 77)
    assert long_ids[0, -1] == tok.eot_token_id


def test_builtin_name_with_a_weights_file(tiny_dir, tmp_path):
    # A registered architecture plus `pretrained` as a weights file: the other real loading path.
    (tmp_path / "moref-tiny-test.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(tmp_path / "moref-tiny-test.json")
    weights = f"{tiny_dir}/{WEIGHTS_NAME}"
    bundle = load_clip("moref-tiny-test", weights, "cpu")
    assert bundle.name == "moref-tiny-test/open_clip_model"
    reference = load_clip(tiny_dir, None, "cpu")
    images, tokens = _probe_inputs(bundle.tokenizer)
    torch.testing.assert_close(_embed(bundle.model, images, tokens)[1], _embed(reference.model, images, tokens)[1])


def test_openai_tags_force_quick_gelu():
    assert needs_quick_gelu("ViT-L-14-336", "openai")
    assert needs_quick_gelu("ViT-L-14-336-quickgelu", "openai")
    assert not needs_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert not needs_quick_gelu("ViT-L-14-336", None)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_clip(str(tmp_path), None, "cpu")


def test_embeddings_are_numerically_sane(tiny_dir):
    bundle = load_clip(tiny_dir, None, "cpu")
    images, tokens = _probe_inputs(bundle.tokenizer)
    img, txt = _embed(bundle.model, images, tokens)
    assert np.isfinite(img.numpy()).all() and np.isfinite(txt.numpy()).all()
    # Distinct inputs give distinct embeddings (a degenerate random model would collapse them).
    assert (img[0] - img[1]).abs().max() > 1e-3
    assert (txt[0] - txt[1]).abs().max() > 1e-3
