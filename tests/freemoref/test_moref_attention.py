import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from freemoref.attention import MoRefContext, _flash_attend, attend, gate_weights, moref_attention
from freemoref.config import ResolvedMoRef
from freemoref.engine import moref_prefill_logits

N, H, HKV, D = 3, 4, 2, 8
P, LV, S = 2, 5, 3
LENGTHS = [5, 3, 4]
CFG = Qwen2Config(hidden_size=H * D, num_hidden_layers=2, num_attention_heads=H, num_key_value_heads=HKV,
                  intermediate_size=64, vocab_size=100)


def explicit_attention(q, k, v, key_real, scaling):
    """float64 loops' worth of clarity: per row, head, query, softmax over the real keys at or
    before the query's slot (queries are the last Tq slots); GQA head h reads KV head h // group."""
    n, h, tq, _ = q.shape
    tk, group = k.shape[2], h // k.shape[1]
    out = torch.zeros(n, tq, h, v.shape[-1], dtype=torch.float64)
    for i in range(n):
        for head in range(h):
            for t in range(tq):
                visible = key_real[i, : tk - tq + t + 1].nonzero().flatten()
                s = (k[i, head // group, visible].double() @ q[i, head, t].double()) * scaling
                out[i, t, head] = s.softmax(0) @ v[i, head // group, visible].double()
    return out


def layout(seed=0):
    """Rows [prefix P | visual LV (padded to LENGTHS) | question S]; queries for visual + question."""
    torch.manual_seed(seed)
    tk = P + LV + S
    q = torch.randn(N, H, LV + S, D)
    k, v = torch.randn(N, HKV, tk, D) * 1.5, torch.randn(N, HKV, tk, D)
    vis_mask = torch.arange(LV)[None] < torch.tensor(LENGTHS)[:, None]
    key_real = torch.ones(N, tk, dtype=torch.bool)
    key_real[:, P : P + LV] = vis_mask
    causal = torch.ones(LV + S, tk, dtype=torch.bool).tril(P)
    return q, k, v, vis_mask, key_real, causal[None, None] & key_real[:, None, None]


def ctx(vis_mask, granularity="chunk", **kw):
    return MoRefContext(vis_start=P, vis_mask=vis_mask, ques_start=P + LV, fusion_layer=1,
                        granularity=granularity, **kw)


@pytest.mark.parametrize("granularity", ["chunk", "head", "token"])
def test_question_outputs_are_the_gated_mix(granularity):
    q, k, v, vis_mask, key_real, mask = layout()
    out, _ = moref_attention(Qwen2Attention(CFG, 0), q, k, v, mask, 0.4, moref=ctx(vis_mask, granularity))
    own = explicit_attention(q, k, v, key_real, 0.4)
    w = gate_weights(q[:, :, LV:], k[:, :, P : P + LV], 0.4, granularity, vis_mask).double()
    # to (N, question token, head) for broadcasting against outputs (N, Tq, H, D)
    w = w[:, None, None] if granularity == "chunk" else w[:, None, :] if granularity == "head" else w.permute(0, 2, 1)
    mix = (w[..., None] * own[:, LV:]).sum(0)
    torch.testing.assert_close(out[:, :LV].double(), own[:, :LV], atol=1e-5, rtol=1e-5)  # visual: each row's own
    for i in range(N):
        torch.testing.assert_close(out[i, LV:].double(), mix, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mix, own[0, LV:], atol=1e-3)  # the gate did change something


@pytest.mark.parametrize("pick", [0, 2])
def test_gate_forced_to_one_reference_gives_its_own_outputs(pick):
    q, k, v, vis_mask, key_real, mask = layout(1)
    fixed = torch.nn.functional.one_hot(torch.tensor(pick), N).float()
    out, _ = moref_attention(Qwen2Attention(CFG, 0), q, k, v, mask, 0.4, moref=ctx(vis_mask, fixed_weights=fixed))
    own = explicit_attention(q, k, v, key_real, 0.4)
    for i in range(N):
        torch.testing.assert_close(out[i, LV:].double(), own[pick, LV:], atol=1e-5, rtol=1e-5)


def test_layers_from_fusion_layer_on_do_not_gate():
    q, k, v, vis_mask, key_real, mask = layout(2)
    out, _ = moref_attention(Qwen2Attention(CFG, 1), q, k, v, mask, 0.4, moref=ctx(vis_mask))
    torch.testing.assert_close(out.double(), explicit_attention(q, k, v, key_real, 0.4), atol=1e-5, rtol=1e-5)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
    """flash_attn_varlen_func's contract, in plain torch: packed sequences, GQA, causal aligned
    bottom-right."""
    out = []
    for b in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[b] : cu_q[b + 1]], k[cu_k[b] : cu_k[b + 1]], v[cu_k[b] : cu_k[b + 1]]
        group = qi.shape[1] // ki.shape[1]
        ki, vi = ki.repeat_interleave(group, 1), vi.repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", qi, ki) * softmax_scale
        s = s.masked_fill(~torch.ones(len(qi), len(ki), dtype=torch.bool).tril(len(ki) - len(qi)), float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vi))
    return torch.cat(out)


def test_backends_agree():
    q, k, v, vis_mask, key_real, mask = layout(3)
    own = explicit_attention(q, k, v, key_real, 0.4)
    real_q = key_real[:, P:]  # padded query slots hold no defined output in the packed path
    for out in (attend(q, k, v, mask, 0.4, "sdpa"), attend(q, k, v, mask, 0.4, "eager"),
                _flash_attend(q, k, v, key_real, 0.4, varlen=reference_varlen)):
        torch.testing.assert_close(out[real_q].double(), own[real_q], atol=1e-5, rtol=1e-5)
    one = attend(q[:, :, -1:], k, v, mask[:, :, -1:], 0.4, "sdpa")  # decode path: KV heads not copied
    torch.testing.assert_close(one.double(), own[:, -1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        attend(q, k, v, mask, 0.4, "xformers")


@pytest.mark.parametrize("granularity", ["chunk", "head", "token"])
def test_decoding_in_steps_equals_one_call(granularity):
    """Question (S tokens) then 2 generated tokens one at a time == all in one call, gate_block=S."""
    torch.manual_seed(4)
    tk = P + LV + S + 2
    q, k, v = torch.randn(N, H, LV + S + 2, D), torch.randn(N, HKV, tk, D) * 1.5, torch.randn(N, HKV, tk, D)
    vis_mask = torch.arange(LV)[None] < torch.tensor(LENGTHS)[:, None]
    key_real = torch.ones(N, tk, dtype=torch.bool)
    key_real[:, P : P + LV] = vis_mask
    mask = torch.ones(LV + S + 2, tk, dtype=torch.bool).tril(P)[None, None] & key_real[:, None, None]
    attn = Qwen2Attention(CFG, 0)
    full, _ = moref_attention(attn, q, k, v, mask, 0.4, moref=ctx(vis_mask, granularity, gate_block=S))
    c = ctx(vis_mask, granularity, gate_block=S)
    t0 = P + LV + S
    first, _ = moref_attention(attn, q[:, :, : LV + S], k[:, :, :t0], v[:, :, :t0], mask[..., : LV + S, :t0], 0.4,
                               moref=c)
    steps = [moref_attention(attn, q[:, :, LV + S + j : LV + S + j + 1], k[:, :, : t0 + j + 1], v[:, :, : t0 + j + 1],
                             mask[..., LV + S + j : LV + S + j + 1, : t0 + j + 1], 0.4, moref=c)[0] for j in range(2)]
    torch.testing.assert_close(torch.cat([first, *steps], 1), full, atol=1e-6, rtol=1e-5)


def tiny_qwen(seed=0, layers=4):
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=300, initializer_range=0.2)
    return Qwen2ForCausalLM(cfg).eval()


def test_registered_in_transformers():
    assert ALL_ATTENTION_FUNCTIONS["moref"] is moref_attention
    assert "moref" in ALL_MASK_ATTENTION_FUNCTIONS


@torch.no_grad()
def test_hf_forward_with_moref_attention_matches_engine_and_respects_padding():
    """The model's own forward, attention set to "moref" and the context passed as `moref=`, gives
    the engine's logits (L = num_layers: gate everywhere, no fusion) on padded rows."""
    model = tiny_qwen()
    emb = model.get_input_embeddings()
    x = emb(torch.randint(0, 300, (30,)))
    prefix, suffix, lengths = x[:3], x[24:], [7, 5, 6]
    refs = [x[3:10], x[10:15], x[15:21]]
    lv, n = max(lengths), len(refs)
    rows = torch.stack([torch.cat([prefix, r, torch.randn(lv - len(r), 64) * 5, suffix]) for r in refs])
    pad = torch.ones(n, rows.shape[1], dtype=torch.long)
    for i, length in enumerate(lengths):
        pad[i, 3 + length : 3 + lv] = 0
    vis_mask = pad[:, 3 : 3 + lv].bool()
    cfg = ResolvedMoRef(n, 64, 4, 1 / 3, "head")
    positions = [torch.arange(len(r)) for r in refs]
    expected = moref_prefill_logits(model, prefix, refs, positions, suffix, cfg)

    model.set_attn_implementation("moref")
    c = MoRefContext(vis_start=3, vis_mask=vis_mask, ques_start=3 + lv, fusion_layer=4, granularity="head")
    logits = model(inputs_embeds=rows, attention_mask=pad, moref=c).logits[:, -1]
    for i in range(n):
        torch.testing.assert_close(logits[i], expected, atol=1e-4, rtol=1e-4)
    for i, length in enumerate(lengths):
        rows[i, 3 + length : 3 + lv] += 3.0  # change what sits in padded slots: must not matter
    c = MoRefContext(vis_start=3, vis_mask=vis_mask, ques_start=3 + lv, fusion_layer=4, granularity="head")
    torch.testing.assert_close(model(inputs_embeds=rows, attention_mask=pad, moref=c).logits[:, -1], logits,
                               atol=1e-5, rtol=1e-5)

    # Without a context "moref" is plain causal attention, same as sdpa.
    plain = model(inputs_embeds=rows, attention_mask=pad).logits
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(plain, model(inputs_embeds=rows, attention_mask=pad).logits, atol=1e-5, rtol=1e-5)
