"""Split-KV decoding attention (freemoref/attention.py: `probs_by_values`, `cache_attention`, and
`question_attention` over a shared row): each equals the plain masked softmax it replaces, written
out densely here, whether or not the key axis is cut into chunks."""

import pytest
import torch

import freemoref.attention as attention
from freemoref.attention import cache_attention, decode_slots, probs_by_values, question_attention


def dense_attention(q, k, v, real, scaling):
    """q (B, H, 1, D) over k, v (B, Hkv, T, D) at the slots `real` (B, T): softmax written out."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(2, 3) * scaling).masked_fill(~real[:, None, None, :], float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def test_cache_capacity_is_whole_chunks():
    assert decode_slots(1) == decode_slots(attention.DECODE_CHUNK) == attention.DECODE_CHUNK
    assert decode_slots(attention.DECODE_CHUNK + 1) == 2 * attention.DECODE_CHUNK


@pytest.mark.parametrize("slots", [4 * 256, 3 * 256 + 17, 256])
def test_split_probabilities_by_values_equal_one_matmul(slots):
    """Chunked (a whole number of chunks) or not, the product is the same."""
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(2, 3, 7, slots, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, slots, 16, generator=gen, dtype=torch.float64)
    got = probs_by_values(p, v)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 7, 16)
    torch.testing.assert_close(got, (p @ v).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [8, 256])
def test_cache_attention_equals_the_masked_softmax(monkeypatch, chunk):
    """B questions, GQA, holes in the real slots (right-padded prompts, unfilled answer slots)."""
    monkeypatch.setattr(attention, "DECODE_CHUNK", chunk)
    gen = torch.Generator().manual_seed(1)
    b, heads, hkv, d, slots = 3, 6, 2, 8, 64
    k, v = torch.randn(2, b, hkv, slots, d, generator=gen)
    q = torch.randn(b, heads, 1, d, generator=gen)
    real = torch.rand(b, slots, generator=gen) < 0.6
    real[:, 0] = True
    got = cache_attention(q, k, v, real, 0.35)
    assert got.shape == (b, 1, heads, d)
    torch.testing.assert_close(got, dense_attention(q, k, v, real, 0.35), atol=1e-5, rtol=1e-5)
    # unreal slots are never read: garbage there changes nothing
    k2, v2 = k.masked_fill(~real[:, None, :, None], 1e4), v.masked_fill(~real[:, None, :, None], 1e4)
    torch.testing.assert_close(cache_attention(q, k2, v2, real, 0.35), got)


@pytest.mark.parametrize("chunk", [8, 256])
def test_questions_over_a_shared_prefix_read_only_their_own_slots(monkeypatch, chunk):
    """A decoding step of B questions over one shared row (the video-scope prefix, padded to whole
    chunks) and each question's own slots equals each question's attention over [prefix | own]."""
    monkeypatch.setattr(attention, "DECODE_CHUNK", chunk)
    gen = torch.Generator().manual_seed(2)
    b, heads, hkv, d, prefix_len, own_slots = 3, 4, 2, 8, 21, 5
    capacity = decode_slots(prefix_len)
    pk, pv = torch.randn(2, 1, hkv, capacity, d, generator=gen)
    prefix_real = torch.arange(capacity)[None] < prefix_len
    ok, ov = torch.randn(2, b, hkv, own_slots, d, generator=gen)
    own_real = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    q = torch.randn(b, heads, 1, d, generator=gen)
    got = question_attention(q, pk, pv, prefix_real, ok, ov, own_real, torch.tensor([own_slots - 1]), 0.3)
    assert got.shape == (b, 1, heads, d)
    for i in range(b):
        k = torch.cat([pk[0, :, :prefix_len], ok[i]], 1)[None]
        v = torch.cat([pv[0, :, :prefix_len], ov[i]], 1)[None]
        real = torch.cat([torch.ones(prefix_len, dtype=torch.bool), own_real[i]])[None]
        torch.testing.assert_close(got[i : i + 1], dense_attention(q[i : i + 1], k, v, real, 0.3),
                                   atol=1e-5, rtol=1e-5)
    # another question's own cache is not read
    ov[1] += 10.0
    again = question_attention(q, pk, pv, prefix_real, ok, ov, own_real, torch.tensor([own_slots - 1]), 0.3)
    torch.testing.assert_close(again[[0, 2]], got[[0, 2]])
    assert (again[1] - got[1]).abs().max() > 0.1
