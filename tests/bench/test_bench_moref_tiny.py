"""The MoRef benchmark's own CPU self-check (`--tiny`), so the GPU benchmark never rots unnoticed."""

import json
import subprocess
import sys

import pytest

from tests.paths import REPO


def test_bench_moref_tiny_runs_every_case(tmp_path):
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_moref.py"), "--tiny", "--device", "cpu",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "bench_moref.json").read_text())
    cases = {c["case"]: c for c in result["cases"]}
    assert {"native-64", "moref-128", "moref-256", "moref-512"} <= set(cases)
    assert all(c["status"] == "ok" for c in cases.values())
    assert (tmp_path / "bench_moref.md").read_text().startswith("Free-MoRef benchmark")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_bench_moref_tiny_runs_each_qwen_family(tmp_path, family):
    """The Qwen families' layouts (positions, timestamps, DeepStack) through both paths, kept short."""
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_moref.py"), "--tiny", "--device", "cpu",
                    "--family", family, "--native-frames", "16", "--moref-frames", "128", "--engine-native-frames", "",
                    "--new-tokens", "3", "--vision-batch", "2", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "bench_moref.json").read_text())
    cases = {c["case"]: c for c in result["cases"]}
    assert set(cases) == {"native-16", "moref-128"} and all(c["status"] == "ok" for c in cases.values())
    assert result["family"] == family and cases["moref-128"]["references"] == 2
    assert cases["moref-128"]["visual_tokens_used"] < cases["moref-128"]["visual_tokens"]
    assert result["vision"]["flops_per_frame"] > 0


def test_real_qwen_shapes_match_the_published_configs():
    """The real shapes build as transformers configs with the published sizes; Qwen3-VL's tower is
    transformers' own default (apart from its output width, the decoder's)."""
    sys.path.insert(0, str(REPO / "bench"))
    from model_shapes import model_config
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

    qwen3 = model_config("qwen3_vl", tiny=False)
    text, vision = qwen3.text_config, qwen3.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim) == (4096, 36, 32, 8, 128)
    assert text.rope_parameters["mrope_section"] == [24, 20, 20] and sum([24, 20, 20]) == text.head_dim // 2
    defaults = Qwen3VLVisionConfig().to_dict()
    for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "num_position_embeddings"):
        assert getattr(vision, key) == defaults[key]
    assert list(vision.deepstack_visual_indexes) == [8, 16, 24] and vision.out_hidden_size == text.hidden_size
    qwen25 = model_config("qwen2_5_vl", tiny=False)
    assert (qwen25.text_config.hidden_size, qwen25.text_config.num_hidden_layers,
            qwen25.text_config.num_attention_heads, qwen25.text_config.num_key_value_heads) == (3584, 28, 28, 4)
    assert (qwen25.vision_config.depth, qwen25.vision_config.window_size) == (32, 112)
    assert qwen25.vision_config.out_hidden_size == qwen25.text_config.hidden_size
