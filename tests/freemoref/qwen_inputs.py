"""What the two Qwen family tests share: the prompt, greedy options, random frames and the tiny
checkpoint loaded once per module."""

import numpy as np

from freemoref.config import GenerationOptions

QUESTION, SYSTEM = "What does the cat carry?", "Answer briefly."
GREEDY = GenerationOptions(max_new_tokens=8)


def frames(count=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, 40, 52, 3), dtype=np.uint8)


def load_tiny(build, tmp_path_factory, name: str):
    """The VideoLLM of a tiny checkpoint that `build(folder)` writes (freemoref.tiny)."""
    from freemoref.loading import load_video_llm

    return load_video_llm(build(tmp_path_factory.mktemp(name)))


def check_hf(llm, inputs, encoded, ours, visual) -> None:
    """The engine's last logits `ours` equal HF's forward on the processor's `inputs`, and greedy
    answering gives HF generate's tokens, with the prompt's token counts."""
    import torch

    theirs = llm.model(**inputs).logits[0, -1]
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    hf_ids = llm.model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    result = llm.answer(encoded, QUESTION, system_prompt=SYSTEM, generation=GREEDY)
    assert result.token_ids == hf_ids.tolist() and len(set(result.token_ids)) > 2
    assert result.prompt_tokens == inputs["input_ids"].shape[1]
    assert result.visual_tokens_native == result.visual_tokens_used == visual.tokens


def check_batched(llm, encoded, moref) -> None:
    """Questions answered together (one video prefill, MoRef) give each question's tokens alone."""
    questions = [QUESTION, "Who opens the door?", "Where?"]
    together = llm.answer_many(encoded, questions, system_prompt=SYSTEM, generation=GREEDY, moref=moref)
    for question, result in zip(questions, together):
        alone = llm.answer(encoded, question, system_prompt=SYSTEM, generation=GREEDY, moref=moref)
        assert result.token_ids == alone.token_ids and result.references == 2
        assert result.visual_tokens_used < result.visual_tokens_native
        assert result.total_flops < result.total_flops_native
