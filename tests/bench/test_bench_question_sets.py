"""The question-sets benchmark's bytes-per-step model (what a decoding step of a video's question set
must read at least, against which the measured step's GB/s and the bandwidth floor are reported),
and a short CPU run of the script (`--tiny`) that writes those columns."""

import json
import subprocess
import sys

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

from freemoref.config import MoRefConfig
from tests.paths import REPO

sys.path.insert(0, str(REPO / "bench"))
from bench_question_sets import peak_bandwidth_gbs, step_bytes  # noqa: E402 - the bench folder is not a package


@pytest.fixture(scope="module")
def lm():
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


def test_a_step_reads_the_weights_once_and_each_cache_it_attends_once(lm):
    kv = 2 * 2 * 16 * 4  # K and V, 2 KV heads of 16 dims, float32: bytes per token per layer
    embedding = 512 * 64 * 4  # the input table is read by row, never whole
    weights = sum(p.numel() * 4 for p in lm.parameters()) - embedding
    moref = MoRefConfig().resolve(128, 8)
    assert moref.references == 2 and 0 < moref.fusion_layer < 8
    refs, prefix, new = [300, 300], 20, 8

    def read(questions, scope, cfg=moref):
        return step_bytes(lm, cfg, prefix, refs, questions, new, scope)

    one = [30]
    # one question: both scopes read the same caches
    assert read(one, "question") == read(one, "video")
    # an empty set reads the weights, the reference rows below L and the fused prefix (video scope)
    assert read([], "video") == weights + kv * (moref.fusion_layer * (prefix + 600)
                                                + (8 - moref.fusion_layer) * (prefix + 300))
    # question scope: each more question reads its own fused copy; video scope: only its own tokens
    five = [30, 10, 20, 40, 50]
    fused = (8 - moref.fusion_layer) * (prefix + 300)
    own = 8 * (sum(five) - 30 + 4 * new // 2)
    assert read(five, "video") - read(one, "video") == kv * own
    assert read(five, "question") - read(one, "question") == kv * (own + 4 * fused)
    # native (one reference): the whole video prefix is shared by the set
    native = MoRefConfig(enabled=False).resolve(128, 8)
    assert read(five, "question", native) - read(one, "question", native) == kv * own


def test_known_cards_have_a_peak_bandwidth():
    assert peak_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak_bandwidth_gbs("NVIDIA H200") == 4800.0
    assert peak_bandwidth_gbs("cpu") is None


def test_the_tiny_run_reports_bytes_bandwidth_and_floor(tmp_path):
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_question_sets.py"), "--tiny", "--device", "cpu",
                    "--frames", "32", "--new-tokens", "3", "--budget-s", "1", "--peak-bandwidth-gbs", "50",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "bench_question_sets.json").read_text())
    assert report["peak_bandwidth_gbs"] == 50
    first = report["cases"][0]
    assert first["status"] == "ok" and first["decode_step_ms"] > 0 and first["step_bytes"] > 0
    assert first["achieved_gbs"] == pytest.approx(first["step_bytes"] / first["decode_step_ms"] / 1e6)
    assert first["floor_ms"] == pytest.approx(first["step_bytes"] / 50 / 1e6)
    assert "| step GB read | achieved GB/s | floor ms |" in (tmp_path / "bench_question_sets.md").read_text()
