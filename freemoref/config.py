"""Free-MoRef options (docs/DESIGN.md section 3) and how their defaults resolve for one question.

`MoRefConfig` holds what a user sets (None = the paper's default); `resolve` turns it into concrete
numbers for a given frame count and model depth (`ResolvedMoRef`), which the engine consumes.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Annotated, Literal, Union, get_args, get_origin, get_type_hints

from annotated_types import Ge, Gt, Le

Granularity = Literal["chunk", "head", "token"]
GRANULARITIES = get_args(Granularity)
FusionScope = Literal["question", "video"]
FUSION_SCOPES = get_args(FusionScope)

# How a LlavaOnevision checkpoint lays a frame's visual tokens out (freemoref/layouts.py implements
# both; defined here so the job config reads the list without importing torch).
VideoLayout = Literal["onevision", "llava_vid"]

# Questions answered together: their sequences in the layers from the fusion layer on, summed,
# stay under this many tokens (freemoref/engine.py). Bounds GPU memory.
MAX_BATCH_TOKENS = 131072

# The bounds an option's annotation may carry, how each is checked and said.
_BOUNDS = {Ge: (lambda v, b: v >= b.ge, lambda b: f">= {b.ge}"), Gt: (lambda v, b: v > b.gt, lambda b: f"> {b.gt}"),
           Le: (lambda v, b: v <= b.le, lambda b: f"<= {b.le}")}


def _alternatives(hint) -> tuple:
    return get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)


def _fits(value, hint) -> bool:
    if hint is type(None):
        return value is None
    if get_origin(hint) is Literal:
        return value in get_args(hint)
    base, *bounds = get_args(hint) if get_origin(hint) is Annotated else (hint,)
    kinds = (int, float) if base is float else (base,)  # an int is a fine float
    if not isinstance(value, kinds) or (base is not bool and isinstance(value, bool)):
        return False
    return all(_BOUNDS[type(b)][0](value, b) for b in bounds)


def _describe(hint) -> str:
    if hint is type(None):
        return "None"
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    base, *bounds = get_args(hint) if get_origin(hint) is Annotated else (hint,)
    kind = {bool: "true or false", int: "an integer", float: "a number"}.get(base, base.__name__)
    return " and ".join([kind] + [_BOUNDS[type(b)][1](b) for b in bounds])


def check_option(name: str, value, hint) -> None:
    """Raise ValueError naming `name` unless `value` fits its annotation: a type, a Literal, an
    Annotated type with annotated_types bounds (Ge, Gt, Le), or a union of those (`X | None`)."""
    options = _alternatives(hint)
    if not any(_fits(value, option) for option in options):
        expected = " or ".join(_describe(option) for option in options)
        raise ValueError(f"{name} must be {expected}, got {value!r}")

# Paper's fusion layers (Free-MoRef, ablation on Qwen2-7B): N references -> layer L.
_PAPER_FUSION_LAYER = {2: 3, 4: 6, 8: 12}
DEEPEST_PAPER_FUSION_LAYER = 12


def default_fusion_layer(references: int, num_layers: int) -> int:
    """Layer L at which the N references are fused into one sequence.

    N = 2, 4, 8 use the paper's L = 3, 6, 12. Other N up to 8 follow the same line, L = 1.5 * N
    rounded half up (the paper's three points lie exactly on it): more references mean shorter,
    less informed rows, so they are kept apart for more layers before fusing. Beyond N = 8 the
    line is not followed but capped at the paper's deepest validated point, L = 12: extended, it
    would put N = 16 at L = 24 of 28, leaving 4 layers for the fused sequence, and the row phase's
    cost grows as N * L (16 rows through 24 layers cost about as much as native 512 frames, the
    very prefill MoRef is meant to undercut). Clamped to [1, num_layers - 1] so that at least one
    layer runs on the fused sequence. N = 1 means no MoRef: there is one sequence from layer 0,
    so L = 0.
    """
    if references < 1 or num_layers < 1:
        raise ValueError(f"references and num_layers must be >= 1, got {references}, {num_layers}")
    if references == 1:
        return 0
    layer = _PAPER_FUSION_LAYER.get(references, min(math.floor(1.5 * references + 0.5), DEEPEST_PAPER_FUSION_LAYER))
    return max(1, min(layer, num_layers - 1))


@dataclass(frozen=True)
class ResolvedMoRef:
    """Concrete MoRef settings for one prompt.

    references: N rows (1 = plain attention, no gating, no fusion).
    temporal_units: M, used by `partition_frames`.
    fusion_layer: L; layers < L gate the N rows, layers >= L run on the fused sequence
        (0 when N = 1; L = num_layers gates every layer and never fuses).
    keep_ratio: share of each row's visual tokens kept at fusion (1.0 when N = 1).
    granularity: gate granularity, "chunk" | "head" | "token".
    fusion_scope: whose attention picks the kept tokens, "question" (each question its own) or
        "video" (one fusion for all the questions answered together, a shared prefix).
    """

    references: int
    temporal_units: int
    fusion_layer: int
    keep_ratio: float
    granularity: str = "chunk"
    fusion_scope: str = "question"


@dataclass(frozen=True)
class MoRefConfig:
    """User-facing Free-MoRef options; None picks the paper's default at `resolve` time.

    temporal_units: M consecutive units the frames are split into (paper: 64).
    references: N; default ceil(F / M), at most one per frame.
    fusion_layer: L; default `default_fusion_layer(N, num_layers)`.
    keep_ratio: share of each reference's visual tokens kept at fusion; default 1 / N.
    granularity: "chunk" (one gate per reference and layer), "head" (per head), or "token"
        (per head and question token).
    fusion_scope: "question" (the paper's: each question keeps the visual tokens its own attention
        scores highest and runs its fused sequence alone) or "video" (one fusion for all the
        questions answered together: per reference, each token's score is its maximum over those
        questions, the same ceil(l_i * keep_ratio) tokens are kept, and [system | merged visual]
        runs once through the layers from L on as a prefix every question reads).

    The annotations are the one definition of each option's type and range: `__post_init__`
    checks them, and the job config (pipeline/config.py) validates its `answer.moref` keys
    against them, naming the key.
    """

    enabled: bool = True
    temporal_units: Annotated[int, Ge(1)] = 64
    references: Annotated[int, Ge(1)] | None = None
    fusion_layer: Annotated[int, Ge(1)] | None = None
    keep_ratio: Annotated[float, Gt(0), Le(1)] | None = None
    granularity: Granularity = "chunk"
    fusion_scope: FusionScope = "question"

    def __post_init__(self):
        for name, hint in get_type_hints(type(self), include_extras=True).items():
            check_option(name, getattr(self, name), hint)

    def resolve(self, num_frames: int, num_layers: int) -> ResolvedMoRef:
        """Concrete settings for `num_frames` frames on a decoder of `num_layers` layers."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not self.enabled:
            return ResolvedMoRef(1, self.temporal_units, 0, 1.0, self.granularity, self.fusion_scope)
        n = self.references if self.references is not None else math.ceil(num_frames / self.temporal_units)
        n = min(n, num_frames)  # a reference needs at least one frame
        if n == 1:
            return ResolvedMoRef(1, self.temporal_units, 0, 1.0, self.granularity, self.fusion_scope)
        if self.fusion_layer is not None and self.fusion_layer > num_layers:
            raise ValueError(f"fusion_layer {self.fusion_layer} exceeds the model's {num_layers} layers")
        layer = self.fusion_layer if self.fusion_layer is not None else default_fusion_layer(n, num_layers)
        keep = self.keep_ratio if self.keep_ratio is not None else 1.0 / n
        return ResolvedMoRef(n, self.temporal_units, layer, keep, self.granularity, self.fusion_scope)


@dataclass
class GenerationOptions:
    """Decoding options shared by the native and the MoRef paths. The one definition of these
    options: the job config's `answer` section takes its generation keys, types, ranges and
    defaults from these annotations (pipeline/config.py)."""

    max_new_tokens: Annotated[int, Ge(1), Le(8192)] = 128
    do_sample: bool = False
    temperature: Annotated[float, Gt(0)] = 1.0
    top_p: Annotated[float, Gt(0), Le(1)] = 1.0
    seed: int | None = 0  # used when sampling; None draws a fresh seed
    stop_strings: tuple[str, ...] = ()
