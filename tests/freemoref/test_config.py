import pytest

from freemoref.config import MoRefConfig, ResolvedMoRef, default_fusion_layer


def test_paper_fusion_layers_and_rule_beyond():
    assert [default_fusion_layer(n, 28) for n in (2, 4, 8)] == [3, 6, 12]
    assert [default_fusion_layer(n, 28) for n in (1, 3, 5, 6, 16)] == [0, 5, 8, 9, 12]
    assert default_fusion_layer(32, 28) == 12  # beyond N = 8: the paper's deepest L
    assert default_fusion_layer(16, 10) == 9  # at least one fused layer
    assert default_fusion_layer(4, 6) == 5 and default_fusion_layer(2, 2) == 1


def test_resolve_defaults():
    assert MoRefConfig().resolve(256, 28) == ResolvedMoRef(4, 64, 6, 0.25, "chunk")
    assert MoRefConfig().resolve(130, 28) == ResolvedMoRef(3, 64, 5, 1 / 3, "chunk")
    assert MoRefConfig().resolve(64, 28) == ResolvedMoRef(1, 64, 0, 1.0, "chunk")  # fits: no MoRef
    assert MoRefConfig(enabled=False).resolve(512, 28) == ResolvedMoRef(1, 64, 0, 1.0, "chunk")


def test_resolve_explicit_options():
    cfg = MoRefConfig(temporal_units=16, references=2, fusion_layer=4, keep_ratio=0.75, granularity="token")
    assert cfg.resolve(100, 6) == ResolvedMoRef(2, 16, 4, 0.75, "token")
    assert MoRefConfig(references=8).resolve(3, 28).references == 3  # at most one reference per frame
    assert MoRefConfig(fusion_layer=6).resolve(200, 6).fusion_layer == 6  # gate everywhere, no fusion
    for frames in (200, 3, 64):  # the scope is carried whatever N resolves to
        assert MoRefConfig(fusion_scope="video").resolve(frames, 28).fusion_scope == "video"
    assert MoRefConfig().resolve(200, 28).fusion_scope == "question"


@pytest.mark.parametrize("kwargs,match", [
    ({"temporal_units": 0}, "temporal_units"),
    ({"references": 0}, "references"),
    ({"fusion_layer": 0}, "fusion_layer"),
    ({"keep_ratio": 0.0}, "keep_ratio"),
    ({"keep_ratio": 1.5}, "keep_ratio"),
    ({"granularity": "frame"}, "granularity"),
    ({"fusion_scope": "frame"}, "fusion_scope"),
])
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoRefConfig(**kwargs)


def test_resolve_rejects_impossible():
    with pytest.raises(ValueError, match="exceeds"):
        MoRefConfig(fusion_layer=30).resolve(256, 28)
    with pytest.raises(ValueError, match="num_frames"):
        MoRefConfig().resolve(0, 28)
