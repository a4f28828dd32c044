"""The engine's decode caches: static buffers sized for the prompt plus max_new_tokens (as in
gpt-fast; the long ones rounded up to whole split-KV chunks, `attention.decode_slots`), written in
place, so a decoding step has fixed shapes and can replay as a CUDA graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """One layer's keys and values for B sequences of S slots, (B, Hkv, S, Dh) each."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def holding(cls, k, v, slots: int) -> KVCache:
        """A cache of `slots` slots whose first slots hold k, v."""
        # Zeros, not garbage: unfilled slots are masked, but 0 x NaN would still poison a sum.
        cache = cls(k.new_zeros(*k.shape[:2], slots, k.shape[3]), v.new_zeros(*v.shape[:2], slots, v.shape[3]))
        cache.k[:, :, : k.shape[2]], cache.v[:, :, : v.shape[2]] = k, v
        return cache

    def update(self, slot: torch.Tensor, k, v) -> None:
        """Store one token's k, v (B, Hkv, 1, Dh) at `slot` (a (1,) device tensor: no host sync)."""
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)


@dataclass
class SequenceCache:
    """B right-padded sequences in the layers they run through: each layer's K/V and which slots
    are real.

    Slots [0, prompt_slots) hold the prompts, right-padded; generated token t of every sequence
    goes to slot prompt_slots + t. Its position is next_position + t: right after the sequence's
    own last real token, whatever slot holds it, so a padded sequence decodes as it would alone.
    """

    layers: list[KVCache]
    real: torch.Tensor  # (B, at least prompt_slots + max_new_tokens) True at real slots
    prompt_slots: int
    next_position: torch.Tensor  # (B,) position of the first generated token

    def add_token(self, t: torch.Tensor) -> torch.Tensor:
        """Mark the slot of generated token t (a () device tensor) real; return it as (1,)."""
        slot = (self.prompt_slots + t).view(1)
        self.real.index_fill_(1, slot, True)
        return slot
