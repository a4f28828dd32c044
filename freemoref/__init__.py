"""Free-MoRef inference on HF transformers.

Public names are imported on first use (PEP 562), so `import freemoref` stays cheap and does not
pull in torch or transformers.
"""

from importlib import import_module

_LAZY = {
    "VideoLLM": "freemoref.video_llm",
    "GenerationOptions": "freemoref.config",
    "AnswerResult": "freemoref.video_llm",
    "load_video_llm": "freemoref.loading",
    "frame_tokens": "freemoref.layouts",
    "assemble_visual_tokens": "freemoref.layouts",
    "tokens_per_frame": "freemoref.layouts",
    "crop_frame_tokens": "freemoref.layouts",
    "attn_flops_ratio": "freemoref.flops",
    "answer_flops": "freemoref.flops",
    "convert_llava_next_checkpoint": "freemoref.convert",
    "MoRefConfig": "freemoref.config",
    "ResolvedMoRef": "freemoref.config",
    "default_fusion_layer": "freemoref.config",
    "partition_frames": "freemoref.partition",
    "PROMPT_TEMPLATES": "freemoref.prompts",
    "prompt_pieces": "freemoref.prompts",
    "encode_prompt": "freemoref.prompts",
    "multiple_choice_question": "freemoref.prompts",
    "gate_weights": "freemoref.attention",
    "moref_attention": "freemoref.attention",
    "MoRefContext": "freemoref.attention",
    "MoRefSession": "freemoref.engine",
    "MoRefOutput": "freemoref.engine",
    "moref_generate": "freemoref.engine",
    "moref_prefill_logits": "freemoref.engine",
    "build_tiny_tokenizer": "freemoref.tiny",
    "build_tiny_llava_onevision": "freemoref.tiny",
    "write_tiny_llava_next_checkpoint": "freemoref.tiny",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'freemoref' has no attribute {name!r}")
