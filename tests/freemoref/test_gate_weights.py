import math

import pytest
import torch

from freemoref.attention import gate_weights


def explicit_gate(q, k, scaling, granularity, lengths):
    """Gate weights by loops in float64: per reference, head, question token, a softmax over the
    reference's real visual keys (GQA: head h reads KV head h // (H / Hkv)), its max, then max over
    whatever the granularity pools, then normalised over references."""
    n, h, tq, _ = q.shape
    group = h // k.shape[1]
    m = torch.zeros(n, h, tq, dtype=torch.float64)
    for i in range(n):
        for head in range(h):
            keys = k[i, head // group, : lengths[i]].double()
            for t in range(tq):
                logits = [float(q[i, head, t].double() @ keys[j]) * scaling for j in range(lengths[i])]
                top = max(logits)
                m[i, head, t] = 1.0 / sum(math.exp(x - top) for x in logits)
    score = {"chunk": m.amax((1, 2)), "head": m.amax(2), "token": m}[granularity]
    return score / score.sum(0)


@pytest.mark.parametrize("granularity", ["chunk", "head", "token"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_matches_explicit(granularity, heads, kv_heads):
    torch.manual_seed(0)
    n, tq, tv, d = 3, 5, 7, 8
    lengths = [7, 5, 6]  # references 1 and 2 padded
    q = torch.randn(n, heads, tq, d) * 2
    k = torch.randn(n, kv_heads, tv, d) * 2
    mask = torch.arange(tv)[None] < torch.tensor(lengths)[:, None]
    w = gate_weights(q, k, d**-0.5, granularity, mask)
    expected = explicit_gate(q, k, d**-0.5, granularity, lengths)
    shape = {"chunk": (n,), "head": (n, heads), "token": (n, heads, tq)}[granularity]
    assert w.shape == shape
    torch.testing.assert_close(w.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.sum(0), torch.ones(shape[1:]))


def test_padding_is_ignored():
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 6, 8)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    w = gate_weights(q, k, 0.3, "head", mask)
    k2 = k.clone()
    k2[1, :, 4:] = 100.0  # padded keys of reference 1: would dominate if they were read
    torch.testing.assert_close(gate_weights(q, k2, 0.3, "head", mask), w)
    assert not torch.allclose(gate_weights(q, k2, 0.3, "head", None), w)


def test_peaked_reference_gets_the_larger_weight():
    torch.manual_seed(2)
    q = torch.randn(2, 2, 1, 8).expand(2, 2, 1, 8).clone()
    k = torch.randn(2, 2, 10, 8) * 0.01
    k[0, :, 3] = q[0, :, 0] * 10  # reference 0 attends sharply to one key; reference 1 ~ uniform
    w = gate_weights(q, k, 1.0)
    assert w[0] > 0.85 and w[1] < 0.15


def test_bad_granularity():
    with pytest.raises(ValueError, match="granularity"):
        gate_weights(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 3, 4), 1.0, "frame")
