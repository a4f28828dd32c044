"""The contract every pipeline stage declares, and the check that a chain of stages fits together.

A stage is a class with one method, `__call__(rows) -> rows` (a batch of row dicts in, row dicts
out; the sink alone takes and returns Arrow tables, see `BatchFormat`), plus class-level columns:
`reads` (column -> why the stage needs it), `writes`, `optional_reads` and whether its output rows
keep the columns they came in with (`keeps_input_columns`). The job's stages are listed, with their
resources, as `StageSpec`s (pipeline/run/job_stages.py); `check_chain` verifies before any work that each
stage's inputs are written by the source or an earlier stage, and the runner builds the Ray Data
pipeline from the specs alone. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol, cast

from pipeline.config import ConfigError
from pipeline.run.resources import StageRequest

# rows: the stage is called with a list of row dicts and returns one (the runner converts Ray
# Data's batches). pyarrow: with the Arrow table Ray Data holds, for a stage that writes it as is.
BatchFormat = Literal["rows", "pyarrow"]


class StageContractError(ConfigError):
    """A stage reads a column that neither the source nor an earlier stage writes."""


class Stage(Protocol):
    """A pipeline stage as `StageSpec` holds it (its class): the columns it reads and writes,
    declared on the class, and `__call__` on a batch (rows, or an Arrow table: `BatchFormat`).
    Optional class attributes, read with defaults: `optional_reads` (column names, default none)
    and `keeps_input_columns` (default True). A stage class annotates its columns with exactly
    these types (`reads: ClassVar[Mapping[str, str]] = {...}`): mypy matches a protocol's class
    variables invariantly, so an unannotated `dict` or `tuple` would not satisfy it."""

    reads: ClassVar[Mapping[str, str]]
    writes: ClassVar[Sequence[str]]

    def __call__(self, batch: Any, /) -> Any: ...


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline, everything the runner needs to run it.

    construct: the stage class with its typed config objects bound (`functools.partial(DecodeStage,
    cfg.decode, cfg.input.storage)`): mypy checks the arguments against the constructor, and the
    spec binds them to its signature when built, so a wrong argument fails in the driver before Ray
    starts. Actor stages are constructed once per actor; task stages once per batch, so they must be
    cheap to build. request: CPUs, GPUs, host memory and (actors) how many, built from the stage's
    own config section (pipeline/run/resources.py) where the stage is listed. batch_size: rows
    per call (None: whatever block Ray Data has). concurrent_calls: calls one actor runs at once,
    each on its own thread (the stage then guards its own shared state). A task whose worker dies
    is retried and a dead actor restarted, both by Ray Data (pipeline/run/runner.py).
    """

    name: str
    construct: Callable[[], Stage]
    request: StageRequest
    batch_size: int | None = 1
    batch_format: BatchFormat = "rows"
    concurrent_calls: int = 1

    def __post_init__(self):
        construct = self.construct
        if not (isinstance(construct, functools.partial) and isinstance(construct.func, type)):
            raise TypeError(f"stage {self.name!r}: construct must be functools.partial of a stage class")
        try:
            inspect.signature(construct.func).bind(*construct.args, **construct.keywords)
        except TypeError as exc:
            raise TypeError(f"stage {self.name!r}: {construct.func.__name__}: {exc}") from None

    @property
    def stage(self) -> type[Stage]:
        assert isinstance(self.construct, functools.partial)  # checked in __post_init__
        return cast("type[Stage]", self.construct.func)

    @property
    def is_actor(self) -> bool:
        return self.request.is_actor

    @property
    def reads(self) -> Mapping[str, str]:
        return self.stage.reads

    @property
    def optional_reads(self) -> tuple[str, ...]:
        return tuple(getattr(self.stage, "optional_reads", ()))

    @property
    def writes(self) -> tuple[str, ...]:
        return tuple(self.stage.writes)

    @property
    def keeps_input_columns(self) -> bool:
        return bool(getattr(self.stage, "keeps_input_columns", True))


def check_chain(source_columns: tuple[str, ...], specs: list[StageSpec]) -> None:
    """Raise StageContractError naming the stage and the column when a stage reads a column that
    no earlier stage (or the source) writes, or when two stages share a name."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise StageContractError(f"stage names must be unique, got {names}")
    available = {column: "the source" for column in source_columns}
    for spec in specs:
        for column, why in spec.reads.items():
            if column not in available:
                raise StageContractError(
                    f"stage {spec.name!r} reads column {column!r} ({why}), which neither the source nor an "
                    f"earlier stage ({', '.join(names[: names.index(spec.name)]) or 'none'}) writes")
        if not spec.keeps_input_columns:
            available = {}
        available.update({column: spec.name for column in spec.writes})
