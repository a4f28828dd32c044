"""Guidance: CLIP frame/text/patch embeddings (pipeline/stages/clip_encoder.py), prompt selection on real
embeddings, the stage and the frames table. Selection and RoI math alone: test_frame_selection.py.

A real tiny open_clip CLIP (built on disk, loaded by the production loader) and real decoded frames.
"""

from __future__ import annotations

import av
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.config import GuidanceConfig
from pipeline.schema import STATUS_ERROR, STATUS_OK, Col, frames_schema
from pipeline.stages.clip_encoder import FrameEncoder, _frame_batches, clip_dtype
from pipeline.stages.clip_models import build_tiny_clip, load_clip
from pipeline.stages.frame_selection import frame_scores, prompt_positions, select_frames, uniform_positions
from pipeline.stages.guidance import GuidanceStage
from pipeline.stages.output_rows import frames_table
from tests.paths import DEMO_VIDEOS

VIDEO = str(DEMO_VIDEOS / "kinetics_armwrestling.mp4")
NUM_FRAMES = 8
SIZE = 96  # decoded square side; the tiny CLIP takes 64, so the resize path is exercised
D = 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip", seed=0)


@pytest.fixture(scope="module")
def bundle(tiny_dir):
    return load_clip(tiny_dir, None, "cpu")


@pytest.fixture(scope="module")
def encoder(bundle):
    return FrameEncoder(bundle, batch_size=8)


@pytest.fixture(scope="module")
def frames():
    """NUM_FRAMES real frames, centre-cropped square and resized like decode does."""
    out = []
    with av.open(VIDEO) as container:
        for frame in container.decode(video=0):
            img = frame.to_image()
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            out.append(np.asarray(img.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.BICUBIC)))
            if len(out) == NUM_FRAMES * 4:
                break
    return np.stack(out[::4])  # every 4th frame: visibly different content


def _cfg(tiny_dir, **kw):
    base = dict(model=tiny_dir, pretrained=None, device="cpu", frames_per_question=4, batch_size=3, num_gpus=0)
    base.update(kw)
    return GuidanceConfig(**base)


def _row(frames, questions, status=STATUS_OK):
    t = len(frames)
    return {
        Col.VIDEO_ID: "armwrestling",
        Col.STATUS: status,
        Col.ERROR_REASON: None,
        Col.ERROR_DETAIL: None,
        Col.FRAMES: frames,
        Col.FRAME_TIMES_S: np.arange(t, dtype=np.float64) * 0.5 + 0.25,
        Col.FRAME_INDICES: np.arange(t, dtype=np.int64) * 15 + 7,
        Col.QUESTION_IDS: np.array([f"q{i}" for i in range(len(questions))], dtype=object),
        Col.QUESTIONS: np.array(questions, dtype=object),  # as Ray hands list columns over
    }


# ---------------------------------------------------------------- encoding


def test_frame_embeddings_shape_and_norm(encoder, frames):
    emb = encoder.encode_frames(frames)
    assert emb.shape == (NUM_FRAMES, D) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.abs(emb[0] - emb[-1]).max() > 1e-3  # different frames, different embeddings
    assert encoder.encode_frames(frames[:0]).shape == (0, D)


def test_batch_size_does_not_change_results(bundle, frames):
    one, eight = FrameEncoder(bundle, batch_size=1), FrameEncoder(bundle, batch_size=8)
    np.testing.assert_allclose(one.encode_frames(frames), eight.encode_frames(frames), atol=1e-5)
    np.testing.assert_allclose(one.encode_patches(frames), eight.encode_patches(frames), atol=1e-5)
    questions = ["who wins?", "what is on the table?", "how many people are there?"]
    np.testing.assert_allclose(one.encode_text(questions), eight.encode_text(questions), atol=1e-5)


def test_tensor_preprocess_matches_open_clip(bundle, encoder, frames):
    ours = encoder.preprocess(frames)
    reference = torch.stack([bundle.preprocess(Image.fromarray(f)) for f in frames])
    assert ours.shape == reference.shape == (NUM_FRAMES, 3, 64, 64)
    # Same resize kernel and uint8 rounding as PIL: at most a couple of uint8 levels apart, rarely.
    level = 1.0 / 255.0 / min(bundle.preprocess_cfg["std"])
    diff = (ours - reference).abs()
    assert diff.max() <= 2 * level + 1e-6
    assert (diff > 1e-4).float().mean() < 0.01
    cos = torch.nn.functional.cosine_similarity(
        bundle.model.encode_image(ours), bundle.model.encode_image(reference), dim=-1
    )
    assert cos.min() > 0.9999


def test_preprocess_at_native_size_is_exact(bundle, encoder, frames):
    native = np.stack([np.asarray(Image.fromarray(f).resize((64, 64))) for f in frames[:2]])
    reference = torch.stack([bundle.preprocess(Image.fromarray(f)) for f in native])
    torch.testing.assert_close(encoder.preprocess(native), reference, rtol=0, atol=1e-6)


def test_non_square_frames_use_open_clip_preprocess(bundle, encoder, frames):
    wide = np.ascontiguousarray(np.concatenate([frames[:2], frames[2:4, :, :40]], axis=2))  # 96 x 136
    reference = torch.stack([bundle.preprocess(Image.fromarray(f)) for f in wide])
    torch.testing.assert_close(encoder.preprocess(wide), reference, rtol=0, atol=0)


def test_frames_must_be_uint8_rgb(encoder, frames):
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode_frames(frames.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        encoder.encode_frames(frames[..., :2])


def test_patch_embeddings_are_projected_tokens(bundle, encoder, frames):
    patches = encoder.encode_patches(frames[:3])
    gh, gw = encoder.grid_size
    assert (gh, gw) == (8, 8)
    assert patches.shape == (3, gh * gw, D) and patches.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(patches, axis=-1), 1.0, atol=1e-5)
    # Reference: open_clip's own token output (after ln_post, before proj) times visual.proj.
    visual = bundle.model.visual
    visual.output_tokens = True
    try:
        with torch.inference_mode():
            pooled, tokens = visual(encoder.preprocess(frames[:3]))
            expected = torch.nn.functional.normalize(tokens @ visual.proj, dim=-1).numpy()
            expected_cls = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    finally:
        visual.output_tokens = False
    np.testing.assert_allclose(patches, expected, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_frames(frames[:3]), expected_cls, atol=1e-5)


def test_encode_video_patch_scores(encoder, frames):
    text = encoder.encode_text(["two men arm wrestling", "a red car"])
    encoding = encoder.encode_video(frames, text)
    np.testing.assert_allclose(encoding.embeddings, encoder.encode_frames(frames), atol=1e-5)
    expected = np.einsum("tpd,qd->qtp", encoder.encode_patches(frames), text).reshape(2, NUM_FRAMES, 8, 8)
    np.testing.assert_allclose(encoding.patch_scores, expected, atol=1e-5)
    assert encoder.encode_video(frames).patch_scores is None


def test_text_embeddings_and_long_questions(encoder):
    emb = encoder.encode_text(["Who wins the match?", ""])
    assert emb.shape == (2, D) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    words = [f"word{i % 50}" for i in range(2000)]
    long = encoder.encode_text([" ".join(words)])
    assert long.shape == (1, D) and np.isfinite(long).all()
    # Truncated to the context: anything past the first ~77 tokens has no effect.
    np.testing.assert_allclose(long, encoder.encode_text([" ".join(words[:120])]), atol=1e-6)
    assert encoder.encode_text([]).shape == (0, D)
    assert encoder.encode_text(np.array(["a", "b"], dtype=object)).shape == (2, D)


# ---------------------------------------------------------------- selection


def test_prompt_selection_picks_the_frame_most_like_the_query(encoder, frames):
    emb = encoder.encode_frames(frames)
    # A frame's own embedding is the query that matches it best (cosine 1).
    for target in (0, 5, NUM_FRAMES - 1):
        scores = frame_scores(emb, emb[[target]])
        assert select_frames("prompt", 1, NUM_FRAMES, 1, scores=scores).tolist() == [[target]]
    text = encoder.encode_text(["two men arm wrestling at a table", "a crowd cheering"])
    scores = frame_scores(emb, text)
    np.testing.assert_allclose(scores, text @ emb.T, atol=1e-6)
    chosen = select_frames("prompt", 3, NUM_FRAMES, 2, scores=scores)
    for q in range(2):
        assert chosen[q].tolist() == sorted(np.argsort(-scores[q])[:3].tolist())


# ---------------------------------------------------------------- the stage


def test_stage_declares_columns(tiny_dir):
    cfg = _cfg(tiny_dir, num_cpus=0.5, num_gpus=0.25)
    stage = GuidanceStage(cfg)
    assert stage.device == torch.device("cpu")  # auto or cpu: no GPU here
    assert Col.FRAMES in stage.reads and Col.QUESTIONS in stage.reads
    assert {Col.FRAME_EMBEDDINGS, Col.SELECTED_POSITIONS, Col.CLIP_MODEL, Col.GUIDANCE_S} <= set(stage.writes)
    assert Col.ROI_BOXES not in stage.writes
    assert Col.ROI_BOXES in GuidanceStage(cfg.model_copy(update={"roi_ratio": 0.8})).writes
    assert GuidanceStage(_cfg(tiny_dir, device="auto")).device == torch.device("cpu")


def test_stage_embeds_once_and_selects_uniformly(tiny_dir, encoder, frames):
    stage = GuidanceStage(_cfg(tiny_dir))
    questions = ["who wins?", "what are they wearing?"]
    out = stage([_row(frames, questions)])[0]
    assert out[Col.STATUS] == STATUS_OK and out[Col.ERROR_REASON] is None and out[Col.ERROR_DETAIL] is None
    emb = out[Col.FRAME_EMBEDDINGS]
    assert emb.shape == (NUM_FRAMES, D) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, encoder.encode_frames(frames), atol=1e-5)
    pos = out[Col.SELECTED_POSITIONS]
    assert pos.dtype == np.int64 and pos.shape == (2, 4)
    assert pos.tolist() == [uniform_positions(NUM_FRAMES, 4).tolist()] * 2
    assert out[Col.CLIP_MODEL] == "tiny-clip"
    assert out[Col.GUIDANCE_S] > 0.0
    assert Col.ROI_BOXES not in out
    assert out[Col.FRAMES] is not None and out[Col.VIDEO_ID] == "armwrestling"  # the row travels on
    # Plain lists (not numpy object arrays) work the same.
    plain = stage([{**_row(frames, questions), Col.QUESTIONS: list(questions)}])[0]
    np.testing.assert_array_equal(plain[Col.SELECTED_POSITIONS], pos)


def test_stage_prompt_selection_and_roi(tiny_dir, encoder, frames):
    # The config only admits 'uniform' today; model_construct stands in for the extended schema.
    cfg = GuidanceConfig.model_construct(**{**_cfg(tiny_dir).model_dump(), "selection": "prompt"})
    stage = GuidanceStage(cfg.model_copy(update={"roi_ratio": 0.8}))
    questions = ["two men arm wrestling", "a referee", "a scoreboard"]
    out = stage([_row(frames, questions)])[0]
    assert out[Col.STATUS] == STATUS_OK
    scores = frame_scores(encoder.encode_frames(frames), encoder.encode_text(questions))
    expected = np.stack([prompt_positions(s, 4) for s in scores])
    np.testing.assert_array_equal(out[Col.SELECTED_POSITIONS], expected)
    boxes = out[Col.ROI_BOXES]
    assert boxes.shape == (3, 4) and boxes.dtype == np.float32
    assert (boxes >= 0).all() and (boxes <= 1).all()
    np.testing.assert_allclose((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0.8, atol=1e-5)


def test_error_rows_pass_through_with_uniform_columns(tiny_dir, frames):
    stage = GuidanceStage(_cfg(tiny_dir).model_copy(update={"roi_ratio": 0.8}))
    ok = stage([_row(frames, ["q one", "q two"])])[0]
    row = _row(frames[:0], ["q one", "q two"], status=STATUS_ERROR)
    row.update({Col.ERROR_REASON: "decode_failed", Col.ERROR_DETAIL: "corrupt"})
    row[Col.FRAMES] = None
    err = stage([row])[0]
    assert err[Col.STATUS] == STATUS_ERROR
    assert (err[Col.ERROR_REASON], err[Col.ERROR_DETAIL]) == ("decode_failed", "corrupt")
    assert err[Col.FRAME_EMBEDDINGS].shape == (0, D) and err[Col.FRAME_EMBEDDINGS].dtype == np.float32
    assert err[Col.SELECTED_POSITIONS].shape == (2, 0) and err[Col.SELECTED_POSITIONS].dtype == np.int64
    assert err[Col.ROI_BOXES].shape[0] == 2
    for col in (Col.FRAME_EMBEDDINGS, Col.SELECTED_POSITIONS, Col.ROI_BOXES):
        assert err[col].dtype == ok[col].dtype and err[col].ndim == ok[col].ndim
    assert isinstance(err[Col.GUIDANCE_S], float) and isinstance(err[Col.CLIP_MODEL], str)
    assert set(ok) == set(err)


def test_failure_inside_guidance_becomes_an_error_row(tiny_dir, frames):
    stage = GuidanceStage(_cfg(tiny_dir))
    out = stage([_row(frames.astype(np.float32), ["who wins?"])])[0]  # not uint8: the encoder refuses
    assert out[Col.STATUS] == STATUS_ERROR
    assert out[Col.ERROR_REASON] == "guidance_failed" and out[Col.ERROR_DETAIL].startswith("ValueError")
    assert out[Col.FRAME_EMBEDDINGS].shape == (0, D)
    assert out[Col.SELECTED_POSITIONS].shape == (1, 0)
    # The next video is unaffected.
    assert stage([_row(frames, ["who wins?"])])[0][Col.STATUS] == STATUS_OK


def test_no_questions_still_embeds_frames(tiny_dir, frames):
    out = GuidanceStage(_cfg(tiny_dir))([_row(frames, [])])[0]
    assert out[Col.STATUS] == STATUS_OK
    assert out[Col.FRAME_EMBEDDINGS].shape == (NUM_FRAMES, D)
    assert out[Col.SELECTED_POSITIONS].shape == (0, 4)


def test_config_rejects_bad_guidance_options(tiny_dir):
    with pytest.raises(ValueError, match="roi_ratio"):
        GuidanceConfig(model=tiny_dir, pretrained=None, roi_ratio=0.0)
    with pytest.raises(ValueError, match="prompt_fraction"):
        GuidanceConfig(model=tiny_dir, pretrained=None, prompt_fraction=2.0)


# ---------------------------------------------------------------- frames table


def test_frames_table_schema_and_values(tiny_dir, frames):
    out = GuidanceStage(_cfg(tiny_dir))([_row(frames, ["who wins?"])])[0]
    table = frames_table(out)
    assert table.schema.equals(frames_schema(D))
    assert table.num_rows == NUM_FRAMES
    assert table.column("video_id").to_pylist() == ["armwrestling"] * NUM_FRAMES
    assert table.column("frame_index").to_pylist() == out[Col.FRAME_INDICES].tolist()
    assert table.column("time_s").to_pylist() == out[Col.FRAME_TIMES_S].tolist()
    assert table.column("clip_model").to_pylist() == ["tiny-clip"] * NUM_FRAMES
    emb = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(NUM_FRAMES, D)
    np.testing.assert_array_equal(emb, out[Col.FRAME_EMBEDDINGS])
    # Round trip through Parquet's logical type.
    assert pa.table(table.to_pydict(), schema=frames_schema(D)).equals(table)


def test_frames_table_for_error_rows_and_bad_rows(tiny_dir, frames):
    stage = GuidanceStage(_cfg(tiny_dir))
    err = stage([{**_row(frames[:0], ["q"], status=STATUS_ERROR), Col.FRAMES: None}])[0]
    empty = frames_table(err)
    assert empty.num_rows == 0 and empty.schema.equals(frames_schema(D))
    ok = stage([_row(frames, ["q"])])[0]
    with pytest.raises(ValueError, match="frame indices"):
        frames_table({**ok, Col.FRAME_INDICES: ok[Col.FRAME_INDICES][:-1]})


def test_video_scope_picks_one_selection_and_roi_for_all_questions(tiny_dir, encoder, frames):
    cfg = _cfg(tiny_dir).model_copy(update={"selection": "prompt", "selection_scope": "video", "roi_ratio": 0.8})
    questions = ["two men arm wrestling", "a referee", "a scoreboard"]
    out = GuidanceStage(cfg)([_row(frames, questions)])[0]
    scores = frame_scores(encoder.encode_frames(frames), encoder.encode_text(questions))
    expected = prompt_positions(scores.mean(0), 4)
    np.testing.assert_array_equal(out[Col.SELECTED_POSITIONS], np.stack([expected] * 3))
    per_question = GuidanceStage(cfg.model_copy(update={"selection_scope": "question"}))([_row(frames, questions)])[0]
    assert len({tuple(p) for p in per_question[Col.SELECTED_POSITIONS].tolist()}) > 1  # the scope matters here
    boxes = out[Col.ROI_BOXES]
    assert boxes.shape == (3, 4) and (boxes == boxes[0]).all()


# ---------------------------------------------------------------- several videos per call


def test_frame_batches_span_videos_and_keep_sizes_apart():
    small, other = np.zeros((5, 4, 4, 3), np.uint8), np.zeros((2, 6, 6, 3), np.uint8)
    batches = list(_frame_batches([small, small[:0], small[:4], other], batch_size=4))
    assert batches == [[(0, 0, 4)], [(0, 4, 5), (2, 0, 3)], [(2, 3, 4)], [(3, 0, 2)]]


def test_videos_guided_together_match_one_at_a_time(tiny_dir, frames):
    cfg = GuidanceConfig.model_construct(**{**_cfg(tiny_dir).model_dump(), "selection": "prompt", "roi_ratio": 0.8})
    stage = GuidanceStage(cfg)  # batch_size 3: tower batches straddle the videos
    failed = _row(frames[:0], ["q"], status=STATUS_ERROR)
    rows = [_row(frames, ["two men arm wrestling", "a referee"]), _row(frames[2:7], ["a scoreboard"]),
            _row(frames.astype(np.float32), ["who wins?"]),  # not uint8: fails, alone
            {**failed, Col.ERROR_REASON: "decode_failed", Col.ERROR_DETAIL: "corrupt", Col.FRAMES: None},
            _row(frames[:3], [])]
    together = stage.guide_rows(rows)
    alone = [stage([row])[0] for row in rows]
    assert [o[Col.STATUS] for o in together] == [STATUS_OK, STATUS_OK, STATUS_ERROR, STATUS_ERROR, STATUS_OK]
    assert together[2][Col.ERROR_REASON] == "guidance_failed" and together[2][Col.ERROR_DETAIL].startswith("ValueError")
    assert (together[3][Col.ERROR_REASON], together[3][Col.ERROR_DETAIL]) == ("decode_failed", "corrupt")
    for t, a in zip(together, alone):
        assert set(t) == set(a) and t[Col.STATUS] == a[Col.STATUS]
        np.testing.assert_allclose(t[Col.FRAME_EMBEDDINGS], a[Col.FRAME_EMBEDDINGS], atol=1e-5)
        np.testing.assert_array_equal(t[Col.SELECTED_POSITIONS], a[Col.SELECTED_POSITIONS])
        np.testing.assert_allclose(t[Col.ROI_BOXES], a[Col.ROI_BOXES], atol=1e-5)
    ok_time = [o[Col.GUIDANCE_S] for o in together if o[Col.STATUS] == STATUS_OK]
    assert all(s > 0 for s in ok_time)


def test_clip_dtype_half_on_gpu_float32_on_cpu(tiny_dir, frames, encoder):
    assert clip_dtype("auto", torch.device("cpu")) == torch.float32
    assert clip_dtype("auto", torch.device("cuda")) == torch.float16
    assert clip_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    stage = GuidanceStage(_cfg(tiny_dir, dtype="bfloat16"))
    assert next(stage.bundle.model.parameters()).dtype == torch.bfloat16
    out = stage([_row(frames, ["who wins?"])])[0]
    assert out[Col.FRAME_EMBEDDINGS].dtype == np.float32
    # bf16 keeps 8 bits of mantissa: close to float32, not equal
    np.testing.assert_allclose(out[Col.FRAME_EMBEDDINGS], encoder.encode_frames(frames), atol=5e-2)
