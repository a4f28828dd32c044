"""Free-MoRef on CUDA, with the tiny models: CUDA agrees with CPU and with HF, bf16 runs, SDPA's
fast kernels are the ones used, and converted checkpoints load on the GPU.

Skipped without CUDA (conftest.py). Imports only torch, transformers, tokenizers, numpy and
freemoref: the GPU machines lack ray, av, decord, open_clip and pydantic."""

import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Qwen2Config, Qwen2ForCausalLM

from freemoref.attention import DECODE_CHUNK
from freemoref.config import GenerationOptions, MoRefConfig, ResolvedMoRef
from freemoref.engine import MoRefSession, moref_generate, moref_prefill_logits
from freemoref.partition import partition_frames

CUDA = torch.device("cuda")
TEXT = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=300, initializer_range=0.2)
MOREF = MoRefConfig(temporal_units=4, references=2, fusion_layer=2)


def tiny_qwen(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**TEXT)).eval()
    model.set_attn_implementation("sdpa")
    return model.to(CUDA, dtype)


def video_prompt(model, frames=8, tokens_per_frame=3, references=3, units=4, seed=1):
    """prefix (4, D), N references and their global positions, suffix (5, D), the whole video."""
    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings()
    ids = torch.randint(0, TEXT["vocab_size"], (9 + frames * tokens_per_frame,), generator=gen).to(CUDA)
    with torch.no_grad():
        x = emb(ids)
    prefix, suffix, video = x[:4], x[4:9], x[9:]
    parts = partition_frames(frames, units, references)
    pos = [torch.tensor([f * tokens_per_frame + j for f in p for j in range(tokens_per_frame)], device=CUDA)
           for p in parts]
    return prefix, [video[p] for p in pos], pos, suffix, video


def test_freemoref_imports_nothing_the_gpu_machines_lack():
    code = (
        "import sys, freemoref\n"
        "import freemoref.engine, freemoref.attention, freemoref.fusion, freemoref.config, freemoref.partition\n"
        "import freemoref.video_llm, freemoref.loading, freemoref.tiny, freemoref.convert, freemoref.flops\n"
        "import freemoref.layouts\n"
        "bad = ('ray', 'av', 'decord', 'open_clip', 'pydantic', 's3fs', 'pipeline')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


@torch.no_grad()
def test_engine_one_reference_equals_hf_in_fp32():
    model = tiny_qwen()
    prefix, _, _, suffix, video = video_prompt(model)
    cfg = ResolvedMoRef(1, 64, 0, 1.0)
    full = torch.cat([prefix, video, suffix])[None]
    expected = model(inputs_embeds=full).logits[0, -1].float()
    logits = moref_prefill_logits(model, prefix, [video], [torch.arange(len(video), device=CUDA)], suffix, cfg)
    assert logits.device.type == "cuda"
    assert (logits - expected).abs().max() < 1e-3

    out = moref_generate(model, prefix, [video], [torch.arange(len(video), device=CUDA)], suffix, cfg,
                         GenerationOptions(max_new_tokens=8))
    hf = model.generate(inputs_embeds=full, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.tokens == hf[0, -8:].tolist()
    assert len(set(out.tokens)) > 2


@torch.no_grad()
def test_engine_one_reference_bf16_close_to_hf_bf16():
    model = tiny_qwen(torch.bfloat16)
    prefix, _, _, suffix, video = video_prompt(model)
    full = torch.cat([prefix, video, suffix])[None]
    expected = model(inputs_embeds=full).logits[0, -1].float()
    logits = moref_prefill_logits(model, prefix, [video], [torch.arange(len(video), device=CUDA)], suffix,
                                  ResolvedMoRef(1, 64, 0, 1.0))
    assert torch.isfinite(logits).all()
    cosine = torch.nn.functional.cosine_similarity(logits, expected, dim=0)
    assert cosine > 0.995, float(cosine)
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("granularity", ["chunk", "head", "token"])
@torch.no_grad()
def test_moref_matches_cpu_in_fp32(granularity):
    """Same weights and inputs: CUDA and CPU prefill logits agree and greedy decoding agrees."""
    cfg = ResolvedMoRef(3, 4, 2, 1 / 3, granularity)
    gpu = tiny_qwen()
    cpu = tiny_qwen().cpu()
    prefix, refs, pos, suffix, _ = video_prompt(gpu)  # 3 references of 9, 9, 6 tokens: padded rows
    outs = []
    for model, dev in ((gpu, CUDA), (cpu, torch.device("cpu"))):
        session = MoRefSession(model, cfg)
        logits = session.prefill(prefix.to(dev), [r.to(dev) for r in refs], [p.to(dev) for p in pos],
                                 suffix.to(dev), max_new_tokens=8)
        outs.append((logits.cpu(), session.fusion.positions.cpu()))
        tokens = moref_generate(model, prefix.to(dev), [r.to(dev) for r in refs], [p.to(dev) for p in pos],
                                suffix.to(dev), cfg, GenerationOptions(max_new_tokens=8)).tokens
        outs[-1] += (tokens,)
    (lg, pg, tg), (lc, pc, tc) = outs
    assert (lg - lc).abs().max() < 1e-3
    assert torch.equal(pg, pc)  # the same visual tokens survive fusion
    assert tg == tc


@pytest.mark.parametrize("granularity", ["chunk", "head", "token"])
@torch.no_grad()
def test_moref_generation_runs_in_bf16(granularity):
    model = tiny_qwen(torch.bfloat16)
    prefix, refs, pos, suffix, video = video_prompt(model)
    cfg = ResolvedMoRef(3, 4, 2, 1 / 3, granularity)
    out = moref_generate(model, prefix, refs, pos, suffix, cfg, GenerationOptions(max_new_tokens=8), eos_token_ids=())
    assert len(out.tokens) == 8 and out.finish_reason == "length"
    assert all(0 <= t < TEXT["vocab_size"] for t in out.tokens)
    assert out.visual_tokens_native == len(video) and out.visual_tokens_used < len(video)
    assert sorted(out.kept_per_reference) == [2, 3, 3]
    session = MoRefSession(model, cfg)
    assert torch.isfinite(session.prefill(prefix, refs, pos, suffix)).all()


# --- VideoLLM on CUDA (tiny LlavaOnevision checkpoints) -------------------------------------------


@pytest.mark.parametrize("layout_dir", ["tiny_llava_vid_dir", "tiny_onevision_dir"])
def test_video_llm_moref_answer_cuda_equals_cpu(request, layout_dir, frames):
    from freemoref.loading import load_video_llm
    from freemoref.video_llm import GenerationOptions

    path = request.getfixturevalue(layout_dir)
    cpu = load_video_llm(path, device="cpu", dtype="float32")
    gpu = load_video_llm(path, device="cuda", dtype="float32")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    tokens = cpu.encode_frames(frames)
    torch.testing.assert_close(gpu.encode_frames(frames).cpu(), tokens, rtol=1e-4, atol=1e-4)

    gen = GenerationOptions(max_new_tokens=8)
    for moref in (MOREF, None):
        a = cpu.answer(tokens, "What happens?", system_prompt="Be brief.", generation=gen, moref=moref)
        b = gpu.answer(tokens, "What happens?", system_prompt="Be brief.", generation=gen, moref=moref)
        assert b.token_ids == a.token_ids
        assert (b.references, b.visual_tokens_used, b.total_flops) == (a.references, a.visual_tokens_used,
                                                                       a.total_flops)
    assert b.references == 1 and a.references == 1  # the last pair ran native
    moref_result = gpu.answer(tokens, "What happens?", system_prompt=None, generation=gen, moref=MOREF)
    assert moref_result.references == 2 and moref_result.visual_tokens_used < moref_result.visual_tokens_native


def test_video_llm_moref_answer_runs_in_bf16(tiny_llava_vid_dir, frames):
    from freemoref.loading import load_video_llm
    from freemoref.video_llm import GenerationOptions

    llm = load_video_llm(tiny_llava_vid_dir, device="cuda")  # dtype "auto": bfloat16 on CUDA
    assert llm.dtype == torch.bfloat16
    tokens = llm.encode_frames(frames)
    assert tokens.device.type == "cuda" and tokens.dtype == torch.bfloat16
    result = llm.answer(tokens, "Who?", system_prompt=None, generation=GenerationOptions(max_new_tokens=8),
                        moref=MOREF)
    assert 1 <= result.output_tokens <= 8 and len(result.token_ids) == result.output_tokens
    assert result.references == 2 and result.prefill_s > 0


def test_converted_checkpoint_loads_and_answers_on_cuda(tmp_path, tiny_llava_vid_dir, frames):
    from freemoref.convert import convert_llava_next_checkpoint
    from freemoref.loading import load_video_llm
    from freemoref.tiny import write_tiny_llava_next_checkpoint
    from freemoref.video_llm import GenerationOptions

    source = write_tiny_llava_next_checkpoint(tmp_path / "next", seed=0)
    converted = convert_llava_next_checkpoint(source, tmp_path / "converted")
    llm = load_video_llm(converted, device="cuda", dtype="float32")
    assert llm.layout == "llava_vid"
    assert all(p.device.type == "cuda" for p in llm.model.parameters())
    reference = load_video_llm(tiny_llava_vid_dir, device="cuda", dtype="float32")  # same seed, HF layout
    tokens = llm.encode_frames(frames)
    torch.testing.assert_close(tokens, reference.encode_frames(frames), rtol=1e-5, atol=1e-5)
    gen = GenerationOptions(max_new_tokens=8)
    for moref in (None, MOREF):
        ours = llm.answer(tokens, "Why?", system_prompt=None, generation=gen, moref=moref)
        theirs = reference.answer(tokens, "Why?", system_prompt=None, generation=gen, moref=moref)
        assert ours.token_ids == theirs.token_ids and ours.text == theirs.text


# --- Which SDPA kernels run (last: a failure here means a slow or memory-hungry fallback) ---------


def test_sdpa_is_the_backend_and_is_called(tiny_llava_vid_dir, monkeypatch):
    """The causal passes (rows below L, fused layers) call SDPA with no mask and is_causal, so the
    flash kernel can serve them; decoding the fused layers runs split-KV (`cache_attention`), not
    SDPA, whose only masked kernel gives a long cache one thread block per head."""
    import freemoref.decoding as decoding
    from freemoref.loading import load_video_llm

    llm = load_video_llm(tiny_llava_vid_dir, device="cuda")
    assert llm.model.config._attn_implementation == "sdpa"
    model = tiny_qwen(torch.bfloat16)
    prefix, refs, pos, suffix, _ = video_prompt(model)
    cfg = ResolvedMoRef(3, 4, 2, 1 / 3)
    assert MoRefSession(model, cfg).engine.backend == "sdpa"
    calls, split = [], []
    sdpa, cache_attention = torch.nn.functional.scaled_dot_product_attention, decoding.cache_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append((q.device.type, q.dtype, q.shape[2], kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return sdpa(q, k, v, *args, **kwargs)

    def counting_split(q, k, *args):
        split.append((q.device.type, q.dtype, q.shape[2], k.shape[2]))
        return cache_attention(q, k, *args)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    monkeypatch.setattr(decoding, "cache_attention", counting_split)
    moref_generate(model, prefix, refs, pos, suffix, cfg, GenerationOptions(max_new_tokens=4), eos_token_ids=())
    layers, below = TEXT["num_hidden_layers"], 2
    assert len(calls) == layers and all(c[3] and c[4] for c in calls)  # rows below L + fused: causal, no mask
    # the fused layers' steps (eager once, then recorded as a graph): one query, whole chunks
    assert len(split) >= layers - below and all(c[2] == 1 and c[3] % DECODE_CHUNK == 0 for c in split)
    assert {c[:2] for c in calls + split} == {("cuda", torch.bfloat16)}


@torch.no_grad()
def test_split_kv_decoding_in_bf16_agrees_with_float64():
    """A decoding step of 5 questions over 12k-slot caches (the real fused length at 128 frames),
    bf16 on the GPU's split-KV path, agrees with the float64 softmax of the same bf16 inputs to
    within bf16 rounding of its output. Peaked scores, so a wrong chunk would show."""
    from freemoref.attention import cache_attention

    gen = torch.Generator(device=CUDA).manual_seed(0)
    b, heads, hkv, d, slots = 5, 28, 4, 128, 48 * DECODE_CHUNK
    q = 3 * torch.randn(b, heads, 1, d, device=CUDA, generator=gen).bfloat16()
    k, v = (torch.randn(b, hkv, slots, d, device=CUDA, generator=gen).bfloat16() for _ in range(2))
    real = torch.rand(b, slots, device=CUDA, generator=gen) < 0.97
    got = cache_attention(q, k, v, real, d**-0.5)
    rep = heads // hkv
    s = (q.double() @ k.double().repeat_interleave(rep, 1).transpose(2, 3)) * d**-0.5
    s = s.masked_fill(~real[:, None, None, :], float("-inf"))
    expected = (s.softmax(-1) @ v.double().repeat_interleave(rep, 1)).transpose(1, 2)
    assert got.dtype == torch.bfloat16 and expected.abs().max() > 0.3
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=2e-2)


@torch.no_grad()
def test_causal_row_pass_runs_on_the_flash_kernel_alone():
    """The row pass (GQA, no mask, bf16) runs on the flash kernel alone (torch 2.11's
    memory-efficient kernel takes no GQA: bench/RESULTS.md) and agrees with float32 math."""
    backend = SDPBackend.FLASH_ATTENTION
    from freemoref.attention import causal_attention

    gen = torch.Generator(device=CUDA).manual_seed(0)
    q = torch.randn(3, 4, 200, 64, device=CUDA, generator=gen)
    k, v = (torch.randn(3, 2, 200, 64, device=CUDA, generator=gen) for _ in range(2))
    expected = causal_attention(q, k, v, 0.125)
    with sdpa_kernel(backend):
        got = causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.125)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


@torch.no_grad()
@pytest.mark.parametrize("fusion_layer", [2, 6])
def test_question_sets_in_bf16_equal_questions_alone(fusion_layer):
    """A video's questions answered together (different lengths, padded, shared rows) give the
    answers of each question alone, in bf16 on the GPU."""
    from freemoref.engine import MoRefEngine, generate_answers

    model = tiny_qwen(torch.bfloat16)
    prefix, refs, pos, _, _ = video_prompt(model)
    emb = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(5)
    questions = [emb(torch.randint(0, TEXT["vocab_size"], (n,), generator=gen).to(CUDA)) for n in (6, 2, 9)]
    cfg = ResolvedMoRef(3, 4, fusion_layer, 1 / 3)
    options = GenerationOptions(max_new_tokens=6)
    together = generate_answers(MoRefEngine(model, cfg), prefix, refs, pos, questions, options)
    alone = [generate_answers(MoRefEngine(model, cfg), prefix, refs, pos, [q], options)[0] for q in questions]
    assert [o.tokens for o in together] == [o.tokens for o in alone]
    engine = MoRefEngine(model, cfg)
    video = engine.encode_video(prefix, refs, pos)
    batch = engine.start(video, questions)
    for i, q in enumerate(questions):
        single = engine.start(video, [q]).logits[0]
        assert (batch.logits[i] - single).abs().max() <= 0.02 * single.abs().max()


@torch.no_grad()
@pytest.mark.parametrize("granularity", ["chunk", "token"])
def test_cuda_graph_decoding_equals_eager_decoding(granularity):
    """Decoding by replaying the recorded step gives the tokens of the eager step loop."""
    from freemoref.engine import MoRefEngine, generate_answers

    model = tiny_qwen(torch.float32)
    prefix, refs, pos, _, _ = video_prompt(model)
    emb = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(9)
    questions = [emb(torch.randint(0, TEXT["vocab_size"], (n,), generator=gen).to(CUDA)) for n in (3, 7)]
    cfg = ResolvedMoRef(3, 4, 2, 1 / 3, granularity)
    options = GenerationOptions(max_new_tokens=10)
    graph = generate_answers(MoRefEngine(model, cfg), prefix, refs, pos, questions, options)
    eager = generate_answers(MoRefEngine(model, cfg, cuda_graphs=False), prefix, refs, pos, questions, options)
    assert [o.tokens for o in graph] == [o.tokens for o in eager]
    assert len({t for o in graph for t in o.tokens}) > 3
