"""What each stage asks Ray for, and whether the cluster's nodes can ever grant it.

`decode_request`, `guidance_request` and `answer_request` turn a stage's own config section into
its request (CPUs, GPUs, host memory, actor count), resolving `answer.concurrency: auto` and
`answer.memory_gib: auto`; pipeline/run/job_stages.py attaches each to its stage's spec, and the
runner passes exactly these to Ray Data. `check_placement` packs them onto node shapes before any work starts:
every actor of every pool must be placed at once (actors live for the whole run), first-fit
decreasing, fractional GPUs within one GPU each (as Ray places them); then one decode task and
one sink task must still fit beside the actors, or the pipeline would stall. A request that can
never be granted raises `UnschedulableError` naming the stage and the resource.

Node shapes come from `ray.node_shapes` in the job config (an autoscaling cluster: the kinds of
node it can add) or from the nodes of the running cluster (`ray.nodes()`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence

from pipeline.config import AnswerConfig, ConfigError, DecodeConfig, GuidanceConfig, NodeShape

GIB = 2**30
ANSWER_BASE_MEMORY_GIB = 2.0  # measured ~2.4 GiB per answer worker beyond weights in flight: torch, CUDA, Ray
HUB_MODEL_MEMORY_GIB = 20.0  # a hub id whose size is unknown before download (a 7B model in bf16 + base)
SINK_CPUS = 0.1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class UnschedulableError(ConfigError):
    """A stage asks for resources that no node (or no packing of the nodes) can give."""


@dataclasses.dataclass(frozen=True)
class StageRequest:
    """What one actor or task of a stage asks for, and how many actors (tasks: 1)."""

    stage: str
    cpus: float
    gpus: float
    memory_bytes: int
    count: int = 1
    is_actor: bool = True
    memory_basis: str = ""  # how the memory request was made, named in messages (an estimate names its model)

    def ray_args(self) -> dict:
        args = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory_bytes:
            args["memory"] = self.memory_bytes
        return args

    def describe(self) -> str:
        basis = f" ({self.memory_basis})" if self.memory_basis else ""
        return f"CPU {self.cpus:g}, GPU {self.gpus:g}, memory {self.memory_bytes / GIB:.1f} GiB{basis}"


@dataclasses.dataclass
class Node:
    """Free capacity of one node while packing: CPUs, host memory, and each GPU's free share."""

    name: str
    cpus: float
    memory_bytes: float
    gpus: list[float]

    @classmethod
    def of_shape(cls, shape: NodeShape, name: str) -> Node:
        return cls(name, shape.cpus, shape.memory_gib * GIB, [1.0] * shape.gpus)

    def short_of(self, req: StageRequest) -> list[str]:
        """The resources this node lacks for `req` (empty: it fits)."""
        short = []
        if req.cpus > self.cpus + 1e-9:
            short.append(f"CPU (needs {req.cpus:g}, has {self.cpus:g})")
        if req.memory_bytes > self.memory_bytes + 1:
            short.append(f"memory (needs {req.memory_bytes / GIB:.1f} GiB, has {self.memory_bytes / GIB:.1f} GiB)")
        if self._gpu_slots(req.gpus) is None:
            free = sum(self.gpus)
            short.append(f"GPU (needs {req.gpus:g}, has {free:g} free over {len(self.gpus)} GPUs)")
        return short

    def _gpu_slots(self, gpus: float) -> list[int] | None:
        if gpus <= 0:
            return []
        if gpus < 1:  # a fraction is served by one GPU
            slot = next((i for i, free in enumerate(self.gpus) if free >= gpus - 1e-9), None)
            return None if slot is None else [slot]
        whole = [i for i, free in enumerate(self.gpus) if free >= 1 - 1e-9]
        return whole[: int(gpus)] if len(whole) >= gpus else None

    def take(self, req: StageRequest) -> None:
        for slot in self._gpu_slots(req.gpus) or []:
            self.gpus[slot] -= min(req.gpus, 1.0)
        self.cpus -= req.cpus
        self.memory_bytes -= req.memory_bytes


def checkpoint_bytes(model: str) -> int | None:
    """Size of a local checkpoint's weight files; None for a hub id or a path without weights."""
    path = pathlib.Path(model).expanduser()
    if not path.is_dir():
        return None
    sizes = [p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    return sum(sizes) if sizes else None


def answer_memory_bytes(cfg: AnswerConfig) -> int:
    """`answer.memory_gib`, or for `auto`: the weights (loading passes them through host memory)
    plus ANSWER_BASE_MEMORY_GIB."""
    return answer_memory_estimate(cfg)[0]


def answer_memory_estimate(cfg: AnswerConfig) -> tuple[int, str]:
    """`answer_memory_bytes` and how it was made, naming the model an estimate was made for."""
    if cfg.memory_gib != "auto":
        return int(cfg.memory_gib * GIB), "answer.memory_gib"
    weights = checkpoint_bytes(cfg.model)
    if weights is None:
        return int(HUB_MODEL_MEMORY_GIB * GIB), (
            f"answer.memory_gib auto: {HUB_MODEL_MEMORY_GIB:g} GiB assumed for {cfg.model}, whose weights "
            "are not on this machine; set answer.memory_gib")
    return int(weights + ANSWER_BASE_MEMORY_GIB * GIB), (
        f"answer.memory_gib auto: {weights / GIB:.1f} GiB of weights of {cfg.model} "
        f"+ {ANSWER_BASE_MEMORY_GIB:g} GiB")


def answer_concurrency(cfg: AnswerConfig, answer_gpus: float, cluster_gpus: float, guidance_gpus: float) -> int:
    """`answer.concurrency`, or for `auto`: as many actors as the cluster's GPUs hold at
    `answer.num_gpus` each once the CLIP actors have their share (one per GPU at 1.0 and 0 for
    CLIP; one per GPU at 0.8 beside CLIP at 0.2), and 1 when the actors use no GPU."""
    if cfg.concurrency != "auto":
        return int(cfg.concurrency)
    if answer_gpus <= 0 or cluster_gpus <= 0:
        return 1
    return max(1, math.floor((cluster_gpus - guidance_gpus) / answer_gpus + 1e-9))


@dataclasses.dataclass(frozen=True)
class ClusterGPUs:
    """What the cluster offers GPU requests. usable False (a local Ray without GPUs): GPU requests
    drop to 0 unless the stage's device is 'cuda', so stages run on the CPU instead of waiting
    forever; on a cluster GPU nodes may still be scaling up. total: its GPUs now (sizes `auto`)."""

    usable: bool
    total: float

    def grant(self, requested: float, device: str) -> float:
        return requested if self.usable or device == "cuda" else 0.0


def decode_request(cfg: DecodeConfig, gpus: ClusterGPUs) -> StageRequest:
    """The decode tasks: a GPU share only for `decode.num_gpus` (the nvdec backend)."""
    return StageRequest("decode", cfg.num_cpus, gpus.grant(cfg.num_gpus, "auto"), 0, is_actor=False)


def guidance_request(cfg: GuidanceConfig, gpus: ClusterGPUs) -> StageRequest:
    """The CLIP actors of `guidance.placement: separate`."""
    return StageRequest("guidance", cfg.num_cpus, gpus.grant(cfg.num_gpus, cfg.device), int(cfg.memory_gib * GIB),
                        count=cfg.concurrency)


def answer_request(cfg: AnswerConfig, gpus: ClusterGPUs, beside: StageRequest | None = None,
                   clip_inside: GuidanceConfig | None = None) -> StageRequest:
    """The Video-LLM actors: `auto` concurrency fills the GPUs left `beside` the CLIP actors; with
    CLIP inside each actor (`clip_inside`), each actor also holds CLIP's host memory."""
    answer_gpus = gpus.grant(cfg.num_gpus, cfg.device)
    memory, memory_basis = answer_memory_estimate(cfg)
    if clip_inside:
        memory += int(clip_inside.memory_gib * GIB)
        memory_basis += f", + guidance.memory_gib {clip_inside.memory_gib:g} GiB"
    beside_gpus = beside.gpus * beside.count if beside else 0.0
    return StageRequest("answer", cfg.num_cpus, answer_gpus, memory,
                        count=answer_concurrency(cfg, answer_gpus, gpus.total, beside_gpus), memory_basis=memory_basis)


SINK_REQUEST = StageRequest("sink", SINK_CPUS, 0.0, 0, is_actor=False)


def _invalid_gpu_request(req: StageRequest) -> str | None:
    if req.gpus > 1 and req.gpus != int(req.gpus):
        return f"{req.stage}: num_gpus {req.gpus:g} above 1 must be a whole number (Ray cannot split it over GPUs)"
    return None


def check_placement(requests: Sequence[StageRequest], nodes: list[Node], where: str) -> None:
    """Raise UnschedulableError unless every actor can be placed at once and one task of each task
    stage still fits beside them. `nodes` are consumed; `where` names them in messages."""
    if not nodes:
        raise UnschedulableError(f"no nodes to place the job on ({where})")
    for req in requests:
        problem = _invalid_gpu_request(req)
        if problem:
            raise UnschedulableError(problem)
    # Alone, on an empty node: a request no node can ever hold.
    for req in requests:
        if req.count and all(node.short_of(req) for node in nodes):
            best = min(nodes, key=lambda n: len(n.short_of(req)))
            raise UnschedulableError(
                f"{req.stage}: each {'actor' if req.is_actor else 'task'} asks for {req.describe()}, and no node "
                f"of {where} has that much: short of {'; '.join(best.short_of(req))} on {best.name}")
    actors = sorted((r for r in requests if r.is_actor for _ in range(r.count)),
                    key=lambda r: (r.gpus, r.memory_bytes, r.cpus), reverse=True)
    placed: dict[str, int] = {}
    for req in actors:
        node = next((n for n in nodes if not n.short_of(req)), None)
        if node is None:
            others = ", ".join(f"{s} x{n}" for s, n in placed.items()) or "nothing else"
            short = sorted({s.split(" (")[0] for n in nodes for s in n.short_of(req)})
            raise UnschedulableError(
                f"{req.stage}: {req.count} actor{'s' if req.count > 1 else ''} of {req.describe()} cannot all be "
                f"placed on {where} beside the actors already placed ({others}): short of {', '.join(short)} "
                f"(placed {placed.get(req.stage, 0)} of {req.count})")
        node.take(req)
        placed[req.stage] = placed.get(req.stage, 0) + 1
    for req in (r for r in requests if not r.is_actor):
        if all(node.short_of(req) for node in nodes):
            short = sorted({s.split(" (")[0] for n in nodes for s in n.short_of(req)})
            raise UnschedulableError(
                f"{req.stage}: a task asks for {req.describe()}, but the actors leave no node of {where} with that "
                f"much free (short of {', '.join(short)}): the pipeline would stall")


def nodes_from_shapes(shapes: list[NodeShape], requests: Sequence[StageRequest]) -> list[Node]:
    """Nodes an autoscaling cluster can add: each shape up to its max_nodes (unbounded: enough for
    every actor and task)."""
    enough = sum(r.count for r in requests) + 1
    return [Node.of_shape(shape, f"node shape {i} ({shape.cpus:g} CPU, {shape.gpus} GPU, {shape.memory_gib:g} GiB)")
            for i, shape in enumerate(shapes) for _ in range(shape.max_nodes or enough)]


def nodes_from_ray(ray_nodes: list[dict]) -> list[Node]:
    """The live nodes' total resources (ray.nodes()): what the job could use with the cluster idle."""
    nodes = []
    for node in ray_nodes:
        if not node.get("Alive", True):
            continue
        res = node.get("Resources", {})
        gpus = res.get("GPU", 0.0)
        nodes.append(Node(f"node {node.get('NodeManagerAddress', '?')}", res.get("CPU", 0.0),
                          res.get("memory", 0.0), [1.0] * int(gpus)))
    return nodes
