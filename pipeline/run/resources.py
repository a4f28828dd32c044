"""What each stage asks Ray for, and whether the cluster's nodes can ever grant it.

`stage_requests` turns the job config into per-stage requests (CPUs, GPUs, host memory, actor
counts), resolving `answer.concurrency: auto` and `answer.memory_gib: auto`; the runner passes
exactly these to Ray Data. `check_placement` packs them onto node shapes before any work starts:
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

from pipeline.config import ConfigError, JobConfig, NodeShape

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


def answer_memory_bytes(cfg: JobConfig) -> int:
    """`answer.memory_gib`, or for `auto`: the weights (loading passes them through host memory)
    plus ANSWER_BASE_MEMORY_GIB."""
    return answer_memory_estimate(cfg)[0]


def answer_memory_estimate(cfg: JobConfig) -> tuple[int, str]:
    """`answer_memory_bytes` and how it was made, naming the model an estimate was made for."""
    if cfg.answer.memory_gib != "auto":
        return int(cfg.answer.memory_gib * GIB), "answer.memory_gib"
    weights = checkpoint_bytes(cfg.answer.model)
    if weights is None:
        return int(HUB_MODEL_MEMORY_GIB * GIB), (
            f"answer.memory_gib auto: {HUB_MODEL_MEMORY_GIB:g} GiB assumed for {cfg.answer.model}, whose weights "
            "are not on this machine; set answer.memory_gib")
    return int(weights + ANSWER_BASE_MEMORY_GIB * GIB), (
        f"answer.memory_gib auto: {weights / GIB:.1f} GiB of weights of {cfg.answer.model} "
        f"+ {ANSWER_BASE_MEMORY_GIB:g} GiB")


def answer_concurrency(cfg: JobConfig, answer_gpus: float, cluster_gpus: float, guidance_gpus: float) -> int:
    """`answer.concurrency`, or for `auto`: as many actors as the cluster's GPUs hold at
    `answer.num_gpus` each once the CLIP actors have their share (one per GPU at 1.0 and 0 for
    CLIP; one per GPU at 0.8 beside CLIP at 0.2), and 1 when the actors use no GPU."""
    if cfg.answer.concurrency != "auto":
        return int(cfg.answer.concurrency)
    if answer_gpus <= 0 or cluster_gpus <= 0:
        return 1
    return max(1, math.floor((cluster_gpus - guidance_gpus) / answer_gpus + 1e-9))


def stage_requests(cfg: JobConfig, *, gpus_usable: bool, cluster_gpus: float) -> dict[str, StageRequest]:
    """The requests of every stage, as the runner hands them to Ray. With `gpus_usable` False (a
    local Ray without GPUs) GPU requests drop to 0 unless the stage's device is 'cuda'."""

    def gpus(requested: float, device: str) -> float:
        return requested if gpus_usable or device == "cuda" else 0.0

    answer_gpus = gpus(cfg.answer.num_gpus, cfg.answer.device)
    answer_memory, memory_basis = answer_memory_estimate(cfg)
    if cfg.guidance.placement == "answer_actor":
        # CLIP lives in each answer actor: no CLIP actors; each answer actor holds CLIP's host memory too.
        guidance = StageRequest("guidance", 0.0, 0.0, 0, count=0)
        answer_memory += int(cfg.guidance.memory_gib * GIB)
        memory_basis += f", + guidance.memory_gib {cfg.guidance.memory_gib:g} GiB"
    else:
        guidance = StageRequest("guidance", cfg.guidance.num_cpus, gpus(cfg.guidance.num_gpus, cfg.guidance.device),
                                int(cfg.guidance.memory_gib * GIB), count=cfg.guidance.concurrency)
    concurrency = answer_concurrency(cfg, answer_gpus, cluster_gpus, guidance.gpus * guidance.count)
    return {
        "decode": StageRequest("decode", cfg.decode.num_cpus, 0.0, 0, is_actor=False),
        "guidance": guidance,
        "answer": StageRequest("answer", cfg.answer.num_cpus, answer_gpus, answer_memory, count=concurrency,
                               memory_basis=memory_basis),
        "sink": StageRequest("sink", SINK_CPUS, 0.0, 0, is_actor=False),
    }


def _invalid_gpu_request(req: StageRequest) -> str | None:
    if req.gpus > 1 and req.gpus != int(req.gpus):
        return f"{req.stage}: num_gpus {req.gpus:g} above 1 must be a whole number (Ray cannot split it over GPUs)"
    return None


def check_placement(requests: dict[str, StageRequest], nodes: list[Node], where: str) -> None:
    """Raise UnschedulableError unless every actor can be placed at once and one task of each task
    stage still fits beside them. `nodes` are consumed; `where` names them in messages."""
    if not nodes:
        raise UnschedulableError(f"no nodes to place the job on ({where})")
    for req in requests.values():
        problem = _invalid_gpu_request(req)
        if problem:
            raise UnschedulableError(problem)
    # Alone, on an empty node: a request no node can ever hold.
    for req in requests.values():
        if req.count and all(node.short_of(req) for node in nodes):
            best = min(nodes, key=lambda n: len(n.short_of(req)))
            raise UnschedulableError(
                f"{req.stage}: each {'actor' if req.is_actor else 'task'} asks for {req.describe()}, and no node "
                f"of {where} has that much: short of {'; '.join(best.short_of(req))} on {best.name}")
    actors = sorted((r for r in requests.values() if r.is_actor for _ in range(r.count)),
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
    for req in (r for r in requests.values() if not r.is_actor):
        if all(node.short_of(req) for node in nodes):
            short = sorted({s.split(" (")[0] for n in nodes for s in n.short_of(req)})
            raise UnschedulableError(
                f"{req.stage}: a task asks for {req.describe()}, but the actors leave no node of {where} with that "
                f"much free (short of {', '.join(short)}): the pipeline would stall")


def nodes_from_shapes(shapes: list[NodeShape], requests: dict[str, StageRequest]) -> list[Node]:
    """Nodes an autoscaling cluster can add: each shape up to its max_nodes (unbounded: enough for
    every actor and task)."""
    enough = sum(r.count for r in requests.values()) + 1
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
