import pytest
import torch
from transformers import LlavaOnevisionConfig

from freemoref.layouts import (
    assemble_visual_tokens,
    box_to_cells,
    crop_frame_tokens,
    frame_tokens,
    image_newline,
    pooled_grid,
    tokens_per_frame,
    visual_token_count,
)


def test_token_counts_on_the_real_model_shape():
    config = LlavaOnevisionConfig()  # SigLIP-so400m at 384 / patch 14: a 27 x 27 grid
    assert pooled_grid(config, "onevision") == 14 and pooled_grid(config, "llava_vid") == 13
    assert tokens_per_frame(config, "onevision") == 196
    assert tokens_per_frame(config, "llava_vid") == 182
    assert visual_token_count(config, "onevision", 64) == 64 * 196 + 1
    assert visual_token_count(config, "llava_vid", 64) == 64 * 182
    with pytest.raises(ValueError, match="unknown video layout"):
        tokens_per_frame(config, "grid")


def _pixels(llm, frames):
    return llm.processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]


def test_onevision_matches_hf_get_video_features(tiny_video_llm, random_frames):
    llm = tiny_video_llm
    pixels = _pixels(llm, random_frames)
    with torch.no_grad():
        expected = llm.model.model.get_video_features(pixels).pooler_output[0]
    tokens = frame_tokens(llm.model, pixels, "onevision")
    assert tokens.shape == (6, tokens_per_frame(llm.config, "onevision"), llm.config.text_config.hidden_size)
    assembled = assemble_visual_tokens(tokens, "onevision", image_newline(llm.model))
    torch.testing.assert_close(assembled, expected, rtol=0, atol=1e-6)
    # encoding in chunks of frames changes nothing
    torch.testing.assert_close(frame_tokens(llm.model, pixels[0], "onevision", frames_per_batch=4), tokens)


def test_llava_vid_pools_2x2_floor_and_closes_rows_with_newline(tiny_video_llm, random_frames):
    llm = tiny_video_llm
    pixels = _pixels(llm, random_frames)[0]
    with torch.no_grad():
        patches = llm.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        projected = llm.model.model.multi_modal_projector(patches)  # (F, g*g, D)
    g = llm.config.vision_config.image_size // llm.config.vision_config.patch_size
    p = g // 2
    newline = image_newline(llm.model)
    tokens = frame_tokens(llm.model, pixels, "llava_vid")
    assert g % 2 == 1 and tokens.shape[1] == p * (p + 1) == tokens_per_frame(llm.config, "llava_vid")
    grid = projected.view(len(pixels), g, g, -1)
    for f in (0, 5):
        for r in range(p):
            for c in range(p):  # the last (odd) patch row and column are dropped by the floor
                cell = grid[f, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(4, -1).mean(0)
                torch.testing.assert_close(tokens[f, r * (p + 1) + c], cell, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tokens[f, r * (p + 1) + p], newline.detach())
    assembled = assemble_visual_tokens(tokens, "llava_vid")
    assert assembled.shape[0] == 6 * p * (p + 1)  # no extra per-video newline
    torch.testing.assert_close(assembled[p * (p + 1):2 * p * (p + 1)], tokens[1])


def test_onevision_assembly_needs_the_newline():
    with pytest.raises(ValueError, match="image_newline"):
        assemble_visual_tokens(torch.zeros(2, 4, 3), "onevision")


def _indexed(frames, tokens):
    """Frame tokens whose value is their (frame, token) index, to see which ones a crop keeps."""
    idx = torch.arange(frames * tokens, dtype=torch.float32).view(frames, tokens, 1)
    return torch.cat([idx, -idx], dim=2)


def test_box_to_cells():
    assert box_to_cells((0, 0, 1, 1), 4) == (0, 0, 4, 4)
    assert box_to_cells((0.5, 0.25, 1.0, 0.75), 4) == (2, 1, 4, 3)  # exact edges take no neighbour
    assert box_to_cells((0.3, 0.3, 0.31, 0.31), 4) == (1, 1, 2, 2)  # a sliver still keeps one cell
    assert box_to_cells((0.1, 0.0, 0.6, 0.2), 4) == (0, 0, 3, 1)  # partial overlap keeps the cell
    with pytest.raises(ValueError):
        box_to_cells((0.5, 0, 0.4, 1), 4)


def test_crop_onevision_keeps_the_grid_cells_inside_the_box():
    tokens = _indexed(2, 16)  # 4 x 4 grid
    cropped = crop_frame_tokens(tokens, (0.5, 0.25, 1.0, 0.75), "onevision")
    assert cropped.shape == (2, 4, 2)
    assert cropped[0, :, 0].tolist() == [6, 7, 10, 11]  # rows 1-2, cols 2-3
    assert cropped[1, :, 0].tolist() == [22, 23, 26, 27]
    torch.testing.assert_close(crop_frame_tokens(tokens, (0, 0, 1, 1), "onevision"), tokens)


def test_crop_llava_vid_keeps_each_kept_row_newline():
    tokens = _indexed(1, 12)  # 3 x 3 grid, rows of 3 cells + newline: indices r*4 + c, newline r*4 + 3
    cropped = crop_frame_tokens(tokens, (0.0, 0.4, 0.5, 1.0), "llava_vid")
    assert cropped[0, :, 0].tolist() == [4, 5, 7, 8, 9, 11]  # rows 1-2, cols 0-1, each row's newline
    torch.testing.assert_close(crop_frame_tokens(tokens, (0, 0, 1, 1), "llava_vid"), tokens)
    with pytest.raises(ValueError, match="p\\*\\(p\\+1\\)"):
        crop_frame_tokens(_indexed(1, 16), (0, 0, 1, 1), "llava_vid")


def test_crop_of_real_tokens_selects_the_same_vectors(tiny_video_llm_llava_vid, random_frames):
    tokens = tiny_video_llm_llava_vid.encode_frames(random_frames)
    cropped = crop_frame_tokens(tokens, (0.0, 0.0, 0.33, 0.33), "llava_vid")  # 3x3 grid: cell (0,0) + newline
    torch.testing.assert_close(cropped, tokens[:, [0, 3]])
