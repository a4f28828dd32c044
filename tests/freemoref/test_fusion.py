import math

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from freemoref.attention import MoRefContext
from freemoref.config import ResolvedMoRef
from freemoref.engine import MoRefSession
from freemoref.fusion import keep_counts, merge, select_visual_tokens, visual_importance
from tests.freemoref.moref_inputs import tiny_qwen, video_prompt


def test_keep_counts():
    assert keep_counts([7, 5, 6], 1 / 3) == [3, 2, 2]
    assert keep_counts([9, 12, 1], 1 / 3) == [3, 4, 1]  # 9 * (1/3) in floats is just above 3
    assert keep_counts([10, 3], 0.5) == [5, 2]
    assert keep_counts([4, 1], 0.01) == [1, 1] and keep_counts([4], 1.0) == [4]


def test_select_keeps_top_tokens_per_reference_in_time_order():
    importance = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0],
                               [0.5, 0.2, 0.7, 9.0, 9.0],   # slots 3, 4 are padding: never kept
                               [0.3, 0.1, 0.2, 0.6, 0.4]])
    vis_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    # the partition's interleaving: reference i holds positions i, i + 3, i + 6, ...
    positions = torch.tensor([[0, 3, 6, 9, 12], [1, 4, 7, -1, -1], [2, 5, 8, 11, 14]])
    f = select_visual_tokens(importance, vis_mask, positions, 0.5)
    assert f.kept_per_reference == [3, 2, 3]
    assert f.positions.tolist() == [1, 2, 3, 6, 7, 9, 11, 14]
    assert f.rows.tolist() == [1, 2, 0, 0, 1, 0, 2, 2] and f.slots.tolist() == [0, 0, 1, 2, 2, 3, 3, 4]
    h_vis = torch.arange(15.0).view(3, 5, 1)
    seq = merge(torch.full((1, 2, 1), -1.0), h_vis, torch.full((1, 3, 1), -2.0), f)
    assert seq.flatten().tolist() == [-1, -1, 5, 10, 1, 2, 7, 3, 13, 14, -2, -2, -2]


def test_importance_is_mean_attention_over_question_and_heads():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8), torch.randn(2, 2, 5, 8)  # question queries shared by both rows
    vis_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    imp = visual_importance(q, k, 0.5, vis_mask)
    for i, length in enumerate([5, 3]):
        expected = torch.zeros(5, dtype=torch.float64)
        for head in range(4):
            for t in range(3):
                expected[:length] += (k[i, head // 2, :length].double() @ q[0, head, t].double() * 0.5).softmax(0)
        torch.testing.assert_close(imp[i].double(), expected / 12, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(imp.sum(1), torch.ones(2))




@pytest.mark.parametrize("keep,granularity", [(None, "chunk"), (0.5, "head"), (0.8, "token")])
def test_engine_fusion_counts_order_and_layer_L_scores(keep, granularity):
    model = tiny_qwen()
    prefix, refs, pos, suffix, _ = video_prompt(model, frames=10)  # references of 4, 3, 3 frames -> 12, 9, 9 tokens
    n, layer_l = len(refs), 2
    cfg = ResolvedMoRef(n, 4, layer_l, keep if keep is not None else 1 / n, granularity)
    session = MoRefSession(model, cfg)
    logits = session.prefill(prefix, refs, pos, suffix)
    lengths = [len(r) for r in refs]
    expected_counts = [math.ceil(x * cfg.keep_ratio - 1e-9) for x in lengths]
    f = session.fusion
    assert f.kept_per_reference == expected_counts
    assert [int((f.rows == i).sum()) for i in range(n)] == expected_counts
    assert session.visual_tokens_used == sum(expected_counts) and session.visual_tokens_native == sum(lengths)
    assert torch.all(f.positions[1:] > f.positions[:-1])  # original time order
    assert f.positions.tolist() == [int(pos[r][s]) for r, s in zip(f.rows.tolist(), f.slots.tolist())]
    assert logits.shape == (300,) and torch.isfinite(logits).all()

    # Independent scores: layer L's input from the model's own forward ("moref" attention below L),
    # then layer L's q/k projections and HF's rotary, softmax over each row's visual keys.
    p, lv = len(prefix), max(lengths)
    rows = torch.stack([torch.cat([prefix, r, r.new_zeros(lv - len(r), 64), suffix]) for r in refs])
    pad = torch.ones(n, rows.shape[1], dtype=torch.long)
    for i, length in enumerate(lengths):
        pad[i, p + length : p + lv] = 0
    vis_mask = pad[:, p : p + lv].bool()
    model.set_attn_implementation("moref")
    ctx = MoRefContext(vis_start=p, vis_mask=vis_mask, ques_start=p + lv, fusion_layer=layer_l, granularity=granularity)
    with torch.no_grad():
        hidden = model(inputs_embeds=rows, attention_mask=pad, moref=ctx, output_hidden_states=True).hidden_states
        layer = model.model.layers[layer_l]
        x = layer.input_layernorm(hidden[layer_l])
        cos, sin = model.model.rotary_emb(x, torch.arange(rows.shape[1])[None])
        q = layer.self_attn.q_proj(x).view(n, -1, 4, 16).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(n, -1, 2, 16).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    for i, length in enumerate(lengths):
        qi, ki = q[i, :, p + lv :].double(), k[i, :, p : p + length].double().repeat_interleave(2, 0)
        a = (qi @ ki.transpose(1, 2) * 16**-0.5).softmax(-1).mean((0, 1))
        top = set(a.topk(expected_counts[i]).indices.tolist())
        assert set(f.slots[f.rows == i].tolist()) == top
