"""Both fusion scopes (`answer.moref.fusion_scope`) on CUDA with the real kernels (SDPA's flash /
memory-efficient kernels, bf16, the recorded CUDA graph of the decoding step): video scope agrees
with CPU in fp32, gives question scope's answer for one question, and decodes the same by graph
replay as eagerly. Skipped without CUDA (conftest.py)."""

import pytest
import torch

from freemoref.config import GenerationOptions, ResolvedMoRef
from freemoref.engine import MoRefEngine, generate_answers
from tests.gpu.test_cuda import CUDA, TEXT, tiny_qwen, video_prompt

CPU = torch.device("cpu")


def scoped(scope: str, granularity: str = "chunk", layer: int = 2) -> ResolvedMoRef:
    return ResolvedMoRef(3, 4, layer, 1 / 3, granularity, scope)


def questions(model, lengths=(6, 2, 9), seed=5):
    emb = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return [emb(torch.randint(0, TEXT["vocab_size"], (n,), generator=gen).to(model.device)) for n in lengths]


@pytest.mark.parametrize("granularity", ["chunk", "head", "token"])
@torch.no_grad()
def test_video_scope_cuda_equals_cpu_in_fp32(granularity):
    """Several questions, one shared prefix: the same kept tokens, logits and greedy tokens."""
    cfg = scoped("video", granularity)
    outs = []
    base = tiny_qwen()  # the prompt's embeddings are made once, on CUDA (video_prompt's indices are there)
    prefix_cuda, refs_cuda, pos_cuda, _, _ = video_prompt(base)
    qs_cuda = questions(base)
    for device in (CUDA, CPU):
        model = tiny_qwen().to(device)
        prefix, refs, pos = prefix_cuda.to(device), [r.to(device) for r in refs_cuda], [p.to(device) for p in pos_cuda]
        qs = [q.to(device) for q in qs_cuda]
        engine = MoRefEngine(model, cfg)
        batch = engine.start(engine.encode_video(prefix, refs, pos), qs)
        answers = generate_answers(MoRefEngine(model, cfg), prefix, refs, pos, qs, GenerationOptions(max_new_tokens=8))
        outs.append((batch.logits.cpu(), batch.fusions[0].positions.cpu(), [o.tokens for o in answers]))
    (lg, pg, tg), (lc, pc, tc) = outs
    assert torch.equal(pg, pc)
    assert (lg - lc).abs().max() < 1e-3
    assert tg == tc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_one_question_same_answer_in_both_scopes_on_cuda(dtype):
    model = tiny_qwen(dtype)
    prefix, refs, pos, suffix, _ = video_prompt(model)
    options = GenerationOptions(max_new_tokens=8)
    by_scope = {scope: generate_answers(MoRefEngine(model, scoped(scope)), prefix, refs, pos, [suffix], options)[0]
                for scope in ("question", "video")}
    assert by_scope["video"].tokens == by_scope["question"].tokens
    assert by_scope["video"].kept_per_reference == by_scope["question"].kept_per_reference


@pytest.mark.parametrize("scope", ["question", "video"])
@torch.no_grad()
def test_cuda_graph_decoding_equals_eager_in_both_scopes(scope):
    model = tiny_qwen(torch.float32)
    prefix, refs, pos, _, _ = video_prompt(model)
    qs = questions(model, (3, 7, 4))
    options = GenerationOptions(max_new_tokens=10)
    graph = generate_answers(MoRefEngine(model, scoped(scope)), prefix, refs, pos, qs, options)
    eager = generate_answers(MoRefEngine(model, scoped(scope), cuda_graphs=False), prefix, refs, pos, qs, options)
    assert [o.tokens for o in graph] == [o.tokens for o in eager]
    assert len({t for o in graph for t in o.tokens}) > 3


@pytest.mark.parametrize("scope", ["question", "video"])
@torch.no_grad()
def test_both_scopes_run_in_bf16_with_several_questions(scope):
    model = tiny_qwen(torch.bfloat16)
    prefix, refs, pos, _, video = video_prompt(model)
    qs = questions(model)
    options = GenerationOptions(max_new_tokens=8)
    outs = generate_answers(MoRefEngine(model, scoped(scope)), prefix, refs, pos, qs, options)
    assert all(len(o.tokens) == 8 and all(0 <= t < TEXT["vocab_size"] for t in o.tokens) for o in outs)
    assert all(o.visual_tokens_used < len(video) and sorted(o.kept_per_reference) == [2, 3, 3] for o in outs)
    if scope == "video":  # one fusion for the whole set
        assert len({o.visual_tokens_used for o in outs}) == 1
