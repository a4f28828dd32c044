"""The Qwen families (Qwen2.5-VL, Qwen3-VL) on CUDA, with tiny checkpoints built here: the engine
against HF's forward and generate in float32 (exact) and bfloat16 (within tolerance), CUDA against
CPU, and MoRef prefill on SDPA (the causal passes call it with no mask).

Skipped without CUDA (conftest.py). Imports only torch, transformers, tokenizers, numpy and freemoref."""

import numpy as np
import pytest
import torch
from transformers.video_utils import VideoMetadata

from freemoref.config import GenerationOptions, MoRefConfig, ResolvedMoRef
from freemoref.engine import moref_prefill_logits

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
QUESTION, SYSTEM = "What does the cat carry?", "Answer briefly."
GREEDY = GenerationOptions(max_new_tokens=8)
MOREF = MoRefConfig(temporal_units=4, references=2, fusion_layer=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from freemoref.tiny import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl

    root = tmp_path_factory.mktemp("qwen")
    return {"qwen2_5_vl": build_tiny_qwen2_5_vl(root / "qwen2_5_vl"),
            "qwen3_vl": build_tiny_qwen3_vl(root / "qwen3_vl")}


def load(checkpoints, family, dtype, device="cuda"):
    from freemoref.loading import load_video_llm

    return load_video_llm(checkpoints[family], device=device, dtype=dtype)


def video(count=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, 40, 52, 3), dtype=np.uint8)


def hf_inputs(llm, frames, fps):
    """HF's processor on the chat prompt (frames 0.. at `fps`), on the model's device. For Qwen3-VL the
    outer <|vision_start|>/<|vision_end|> that transformers 5.23 keeps around the per-frame groups is
    dropped, as the released processor does (tests/freemoref/test_qwen3_vl.py)."""
    metadata = VideoMetadata(total_num_frames=len(frames), fps=fps, frames_indices=list(range(len(frames))))
    options = dict(do_sample_frames=False, cap_pixels_per_frame=True)
    inputs = llm.processor(text=llm.chat_prompt(QUESTION, SYSTEM), videos=[frames], video_metadata=[metadata],
                           videos_kwargs=options, return_tensors="pt")
    if llm.family.name == "qwen3_vl":
        ids = inputs["input_ids"][0]
        outer = [int((ids == llm.config.vision_start_token_id).nonzero()[0]),
                 int((ids == llm.config.vision_end_token_id).nonzero()[-1])]
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[outer] = False
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            inputs[key] = inputs[key][:, keep]
    return inputs.to(llm.device)


def engine_logits(llm, encoded, resolved=None):
    parts = llm.prepare(encoded, QUESTION, system_prompt=SYSTEM)
    resolved = resolved or ResolvedMoRef(1, parts.frames, 0, 1.0)
    visual = llm.visual_prompt(parts, resolved)
    return moref_prefill_logits(llm.model, parts.prefix_embeds, visual.references, visual.order, parts.suffix_embeds,
                                resolved, rope=visual.rope, deepstack=visual.deepstack)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_engine_equals_hf_forward_and_generate_in_fp32(checkpoints, family):
    llm = load(checkpoints, family, "float32")
    assert llm.device.type == "cuda" and llm.family.name == family
    frames = video()
    inputs = hf_inputs(llm, frames, fps=4.0)
    encoded = llm.encode_frames(frames, np.arange(4) / 4.0)
    theirs = llm.model(**inputs).logits[0, -1]
    torch.testing.assert_close(engine_logits(llm, encoded), theirs, rtol=0, atol=1e-4)
    hf_ids = llm.model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    result = llm.answer(encoded, QUESTION, system_prompt=SYSTEM, generation=GREEDY)
    assert result.token_ids == hf_ids.tolist() and result.prompt_tokens == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_engine_close_to_hf_forward_and_generate_in_bf16(checkpoints, family):
    """bfloat16 (dtype "auto" on CUDA): the engine's logits within bf16 tolerance of HF's, and the
    greedy tokens agree while HF's choice is clear of the runner-up by more than that tolerance."""
    llm = load(checkpoints, family, "auto")
    assert llm.dtype == torch.bfloat16
    frames = video()
    inputs = hf_inputs(llm, frames, fps=4.0)
    encoded = llm.encode_frames(frames, np.arange(4) / 4.0)
    theirs = llm.model(**inputs).logits[0, -1].float()
    ours = engine_logits(llm, encoded)
    tolerance = 0.05 * float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) < tolerance
    out = llm.model.generate(**inputs, max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    hf_ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    result = llm.answer(encoded, QUESTION, system_prompt=SYSTEM, generation=GREEDY)
    for ours_id, hf_id, logits in zip(result.token_ids, hf_ids, out.logits):
        top2 = logits[0].float().topk(2).values
        if float(top2[0] - top2[1]) < 2 * tolerance:
            break  # a near tie: bf16 rounding may pick either, and the sequences may part from here
        assert ours_id == hf_id


@pytest.mark.parametrize("family", FAMILIES)
def test_moref_answers_on_cuda_equal_cpu_in_fp32(checkpoints, family):
    frames = video(8, seed=3)
    times = np.arange(8) / 4.0
    cpu, gpu = load(checkpoints, family, "float32", "cpu"), load(checkpoints, family, "float32")
    a_video, b_video = cpu.encode_frames(frames, times), gpu.encode_frames(frames, times)
    torch.testing.assert_close(b_video.features().cpu(), a_video.features(), rtol=1e-4, atol=1e-4)
    for moref in (MOREF, None):
        a = cpu.answer(a_video, QUESTION, system_prompt=SYSTEM, generation=GREEDY, moref=moref)
        b = gpu.answer(b_video, QUESTION, system_prompt=SYSTEM, generation=GREEDY, moref=moref)
        assert b.token_ids == a.token_ids and (b.references, b.visual_tokens_used) == (a.references,
                                                                                       a.visual_tokens_used)
    assert a.references == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_moref_prefill_runs_on_sdpa_in_bf16(checkpoints, family, monkeypatch):
    """MoRef in bf16: the causal passes (rows below L, the fused layers) call SDPA with no mask and
    is_causal, so the flash kernel can serve them; a batch of questions answers each as alone."""
    llm = load(checkpoints, family, "auto")
    assert llm.model.config.text_config._attn_implementation == "sdpa"
    encoded = llm.encode_frames(video(8, seed=5), np.arange(8) / 4.0)
    encoded.features()  # the vision tower runs before SDPA calls are counted
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append((q.device.type, q.dtype, kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    questions = [QUESTION, "Who opens the door?"]
    together = llm.answer_many(encoded, questions, system_prompt=SYSTEM, generation=GREEDY, moref=MOREF)
    layers = llm.config.text_config.num_hidden_layers
    causal = [c for c in calls if c[3]]
    assert len(causal) >= layers and all(c[2] for c in causal)
    assert {c[:2] for c in causal} == {("cuda", torch.bfloat16)}
    monkeypatch.undo()
    for question, result in zip(questions, together):
        alone = llm.answer(encoded, question, system_prompt=SYSTEM, generation=GREEDY, moref=MOREF)
        assert result.token_ids == alone.token_ids and result.references == 2
        assert result.visual_tokens_used < result.visual_tokens_native
