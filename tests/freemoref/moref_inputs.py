"""A tiny Qwen2 with GQA and a random video prompt split as `partition_frames` splits it."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from freemoref.partition import partition_frames

TEXT = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=300, initializer_range=0.2)


def tiny_qwen(seed=0, layers=6):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**{**TEXT, "num_hidden_layers": layers})).eval()


def video_prompt(model, frames=8, tokens_per_frame=3, references=3, units=4, seed=1):
    """prefix (4, D), the references and their global positions, suffix (5, D), the whole video."""
    torch.manual_seed(seed)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        prefix, suffix = emb(torch.randint(0, 300, (4,))), emb(torch.randint(0, 300, (5,)))
        video = emb(torch.randint(0, 300, (frames * tokens_per_frame,)))
    parts = partition_frames(frames, units, references)
    pos = [torch.tensor([f * tokens_per_frame + j for f in p for j in range(tokens_per_frame)]) for p in parts]
    return prefix, [video[p] for p in pos], pos, suffix, video
