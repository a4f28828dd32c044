"""The deployment files in infra/: KubeRay manifests, job configs, image recipe, cluster launcher.

Every manifest under infra/kuberay is validated against the openAPIV3Schema of the KubeRay v1.7.0
CRD serving its apiVersion/kind (KubeRay's files, gzipped, in tests/infra/kuberay-crds).
The API server prunes or, under strict field validation, rejects unknown fields, while a CRD schema
read as JSON Schema allows them; objects with declared properties are therefore closed here, so a
misspelt field fails like it would on `kubectl apply`. CEL rules (x-kubernetes-validations) and
int32/int-or-string formats are not checked.

Beyond the schema: the embedded job configs load with pipeline.config's loader as the driver loads
them; the entrypoints parse with the CLI's own parser and run those configs; the GPU group asks for
what it tells Ray it has; each job fits the cluster; the head serves the metrics port it declares;
credentials only come from Secrets; one image and one Ray/torch version everywhere, Ray with the
extras pyproject.toml pins; the cluster-launcher YAML validates against Ray's own schema.
Each check is also run against a broken copy, so it is shown to fail when it should.
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.util
import json
import math
import pathlib
import re
import shlex
import tomllib
from collections.abc import Sequence
from typing import Any

import pytest
import yaml

from jobs.cli import build_parser
from pipeline.config import ConfigError, OutputConfig, load_job_config, parse_job_config
from tests.paths import REPO

jsonschema = pytest.importorskip("jsonschema")

INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher.yaml"
DOCKERFILE = INFRA / "Dockerfile"
CRD_DIR = REPO / "tests" / "infra" / "kuberay-crds"
GPU = "nvidia.com/gpu"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML


# ---------------------------------------------------------------------------------------------
# loading


def _docs(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


@functools.cache
def manifests() -> dict[str, dict]:
    """'file.yaml' (or 'file.yaml#i' for multi-document files) -> object."""
    out = {}
    for path in sorted(KUBERAY.glob("*.y*ml")):
        docs = _docs(path)
        for i, doc in enumerate(docs):
            out[path.name if len(docs) == 1 else f"{path.name}#{i}"] = doc
    return out


def of_kind(kind: str) -> dict:
    found = [d for d in manifests().values() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} under infra/kuberay, found {len(found)}"
    return copy.deepcopy(found[0])


def cluster_specs() -> dict[str, dict]:
    """Every RayCluster spec in the manifests, by where it sits."""
    return {
        "RayCluster.spec": of_kind("RayCluster")["spec"],
        "RayJob.spec.rayClusterSpec": of_kind("RayJob")["spec"]["rayClusterSpec"],
        "RayCronJob.spec.jobTemplate.rayClusterSpec":
            of_kind("RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"],
    }


def job_configs() -> dict[str, dict]:
    cm = of_kind("ConfigMap")
    return {key: yaml.safe_load(text) for key, text in cm["data"].items()}


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        name, _, version = dep.partition("==")
        pins[re.sub(r"\[.*\]", "", name).strip().lower()] = version.strip()
    return pins


# ---------------------------------------------------------------------------------------------
# schema validation


def _closed(schema):
    """A copy in which every object schema with declared properties admits no others."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


# Kubernetes core kinds used here: only the parts these manifests use, closed the same way.
_META = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"}, "namespace": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
}}  # fmt: skip
CORE_SCHEMAS = {
    ("v1", "ConfigMap"): {"type": "object", "required": ["apiVersion", "kind", "metadata"], "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": _META,
        "data": {"type": "object", "additionalProperties": {"type": "string"}},
    }},
    ("v1", "PersistentVolumeClaim"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": _META,
            "spec": {"type": "object", "required": ["accessModes", "resources"], "properties": {
                "accessModes": {"type": "array", "minItems": 1, "items": {
                    "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
                "storageClassName": {"type": "string"},
                "resources": {"type": "object", "properties": {"requests": {
                    "type": "object", "required": ["storage"],
                    "additionalProperties": {"type": "string",
                                             "pattern": r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$"}}}},
            }},
        }},
}  # fmt: skip


@functools.cache
def crd_validators() -> dict[tuple[str, str], Any]:  # values: jsonschema.Draft7Validator
    """(apiVersion, kind) -> validator for every served version of every CRD in CRD_DIR."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml.gz")):
        crd = yaml.load(gzip.decompress(path.read_bytes()).decode(), Loader=_Loader)
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = _closed(version["schema"]["openAPIV3Schema"])
                out[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return out


@pytest.fixture(scope="module")
def crds():
    validators = crd_validators()
    assert validators, f"no CRDs read from {CRD_DIR}"
    return validators


def schema_errors(doc: dict, crds: dict) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CORE_SCHEMAS:
        validator = jsonschema.Draft7Validator(_closed(CORE_SCHEMAS[key]))
    elif key in crds:
        validator = crds[key]
    else:
        return [f"no schema for apiVersion {key[0]!r} kind {key[1]!r}"]
    errors = [f"{e.json_path}: {e.message[:300]}" for e in validator.iter_errors(doc)]
    name = str((doc.get("metadata") or {}).get("name", ""))
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"$.metadata.name: {name!r} is not a DNS-1035 label (KubeRay requires one)")
    if len(name) > NAME_LIMITS.get(key[1] or "", 63):
        errors.append(f"$.metadata.name: {name!r} is longer than {NAME_LIMITS.get(key[1] or '', 63)}")
    return errors


# KubeRay's limits: a RayCluster name <= 53; a RayJob's cluster is named after it plus 6 characters;
# a RayCronJob names each RayJob after itself plus a time suffix (kept well inside the RayJob's limit).
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 30}


def test_manifests_exist():
    kinds = sorted(d["kind"] for d in manifests().values())
    assert kinds == ["ConfigMap", "PersistentVolumeClaim", "RayCluster", "RayCronJob", "RayJob"]


@pytest.mark.parametrize("name", sorted(manifests()))
def test_manifest_matches_its_schema(name, crds):
    doc = manifests()[name]
    if doc["kind"].startswith("Ray"):
        assert doc["apiVersion"] == "ray.io/v1", "use the stable ray.io/v1 API (v1alpha1 is deprecated)"
    assert schema_errors(doc, crds) == []


def _parts(path: str | Sequence) -> list:
    """'a.0.b' or ['a', 0, 'b'] (a list where a key has dots of its own, like nvidia.com/gpu)."""
    return list(path) if not isinstance(path, str) else [int(p) if p.isdigit() else p for p in path.split(".")]


def _get(doc, path: str | list):
    for part in _parts(path):
        doc = doc[part]
    return doc


_DELETE = object()


def _set(doc: dict, path: str | list, value) -> dict:
    *parents, last = _parts(path)
    node = _get(doc, parents)
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


BROKEN = [
    # (kind, path, new value, what the error must mention)
    ("RayCluster", "spec.workerGroupSpecs.1.maxReplicas", "8", "is not of type 'integer'"),
    ("RayCluster", "spec.enableInTreeAutoscaling", "yes", "is not of type 'boolean'"),
    ("RayCluster", "spec.enableInTreeAutoScaling", True, "Additional properties"),  # misspelt field
    ("RayCluster", "spec.autoscalerOptions.upscalingMode", "Fast", "is not one of"),
    ("RayCluster", "spec.workerGroupSpecs.1.rayStartParams.num-gpus", 1, "is not of type 'string'"),
    ("RayCluster", "spec.workerGroupSpecs.1.template.spec.containers.0.resources.limits.memory", "lots",
     "does not match"),
    ("RayCluster", "spec.workerGroupSpecs.1.groupName", _DELETE, "'groupName' is a required property"),
    ("RayJob", "spec.shutdownAfterJobFinishes", "true", "is not of type 'boolean'"),
    ("RayJob",
     "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.env.0.valueFrom.secretKeyRef.key", None,
     "is not of type 'string'"),
    ("RayCronJob", "spec.schedule", _DELETE, "'schedule' is a required property"),
    ("RayCronJob", "spec.jobTemplate.backoffLimit", 1.5, "is not of type 'integer'"),
    ("ConfigMap", ["data", "job.yaml"], {"input": {}}, "is not of type 'string'"),
]  # fmt: skip


@pytest.mark.parametrize(
    "kind,path,value,expected", BROKEN, ids=[f"{b[0]}:{'.'.join(map(str, _parts(b[1])))}" for b in BROKEN]
)
def test_schema_rejects_broken_manifest(kind, path, value, expected, crds):
    doc = of_kind(kind)
    assert schema_errors(doc, crds) == []
    errors = schema_errors(_set(doc, path, value), crds)
    # reported at the broken field, or at its parent for a missing or unknown field
    parent = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in _parts(path)[:-1])
    assert any(e.startswith(parent) and expected in e for e in errors), errors


def test_unknown_kind_is_not_silently_accepted(crds):
    assert schema_errors({"apiVersion": "ray.io/v1", "kind": "RayCronjob", "metadata": {"name": "x"}}, crds)


# ---------------------------------------------------------------------------------------------
# job configs


def test_job_configs_parse():
    configs = job_configs()
    assert configs
    for key, data in configs.items():
        assert key.endswith(".yaml")
        cfg = parse_job_config(data)
        # on the cluster the driver runs from /configs: every path must be absolute or a URL
        for path in [*(cfg.input.videos or []), cfg.input.manifest, cfg.questions.file, cfg.output.path,
                     cfg.answer.model]:  # fmt: skip
            if path and "://" not in path and path.startswith((".", "/", "~")):
                assert path.startswith("/"), f"{key}: relative path {path!r}"
        assert cfg.ray.address is None, f"{key}: leave `ray` out; the job joins $RAY_ADDRESS"


def mount_configs(root: pathlib.Path, data: dict[str, str]) -> pathlib.Path:
    """The ConfigMap's keys as files, as the head pod sees them under /configs."""
    mount = root / "configs"
    mount.mkdir()
    for key, text in data.items():
        (mount / key).write_text(text)
    return mount


def test_job_configs_load_as_the_driver_loads_them(tmp_path):
    """`jobs.cli run /configs/KEY` reads the file with load_job_config, which resolves relative
    paths against the file's folder: the result must not depend on where the ConfigMap is mounted."""
    data = of_kind("ConfigMap")["data"]
    mount = mount_configs(tmp_path, data)
    for key, text in data.items():
        loaded = load_job_config(mount / key)
        assert loaded == parse_job_config(yaml.safe_load(text)), f"{key}: a path resolved against the mount"
        out = loaded.output  # the output keys the committer and the lease read
        assert out.flush_interval_s >= 60 and out.lock_ttl_s >= 60 and out.target_file_mb >= 16, key


def test_loader_rejects_a_misspelt_output_key(tmp_path):
    data = of_kind("ConfigMap")["data"]
    broken = {"job.yaml": data["job.yaml"].replace("flush_interval_s:", "flush_interval:")}
    assert broken["job.yaml"] != data["job.yaml"]
    with pytest.raises(ConfigError, match="output.flush_interval: unknown key"):
        load_job_config(mount_configs(tmp_path, broken) / "job.yaml")


def test_broken_job_config_is_rejected():
    data = copy.deepcopy(next(iter(job_configs().values())))
    data["decode"]["num_frames"] = 0
    with pytest.raises(ConfigError, match="decode.num_frames"):
        parse_job_config(data)


def entrypoint_problems(entrypoint: str, configs: dict[str, dict]) -> list[str]:
    """An entrypoint is `python -m jobs.cli run /configs/KEY`, optionally followed by `&& python -m
    jobs.cli compact OUTPUT [--target-mb N]` of that config's output at its target_file_mb. Each
    command is parsed by the CLI's own parser (a bad option fails it, as it would on the head)."""
    problems: list[str] = []
    commands = [shlex.split(part) for part in entrypoint.split("&&")]
    cfg = None
    for i, argv in enumerate(commands):
        if argv[:3] != ["python", "-m", "jobs.cli"]:
            problems.append(f"not a jobs.cli command: {shlex.join(argv)}")
            continue
        try:
            args = build_parser().parse_args(argv[3:])
        except SystemExit:
            problems.append(f"jobs.cli rejects {shlex.join(argv[3:])}")
            continue
        if i == 0:
            key = args.config.removeprefix("/configs/") if args.command == "run" else ""
            if key not in configs:
                problems.append(f"the first command must run a config of the ConfigMap, not {shlex.join(argv[3:])}")
            else:
                cfg = parse_job_config(configs[key])
        elif args.command == "compact" and cfg is not None:
            if args.output != cfg.output.path:
                problems.append(f"compact {args.output} is not the run's output {cfg.output.path}")
            target = args.target_mb or OutputConfig(path=args.output).target_file_mb
            if target != cfg.output.target_file_mb:
                problems.append(f"compact --target-mb {target} != the run's output.target_file_mb "
                                f"{cfg.output.target_file_mb}")
        else:
            problems.append(f"after the run only `compact` of its output belongs here, not {args.command}")
    return problems


def test_entrypoints_run_a_config_from_the_configmap():
    cm = of_kind("ConfigMap")
    configs = job_configs()
    jobs = {"RayJob": of_kind("RayJob")["spec"], "RayCronJob": of_kind("RayCronJob")["spec"]["jobTemplate"]}
    for kind, spec in jobs.items():
        assert entrypoint_problems(spec["entrypoint"], configs) == [], kind
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["submissionMode"] in ("K8sJobMode", "SidecarMode", "HTTPMode")
    # the nightly job compacts what its incremental runs leave
    assert " compact " in of_kind("RayCronJob")["spec"]["jobTemplate"]["entrypoint"]
    for where, spec in cluster_specs().items():
        head = spec["headGroupSpec"]["template"]["spec"]
        volume = next(v["name"] for v in head["volumes"]
                      if v.get("configMap", {}).get("name") == cm["metadata"]["name"])
        mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
        assert mounts.get(volume) == "/configs", where


@pytest.mark.parametrize("entrypoint,expected", [
    ("python -m jobs.cli run /configs/nope.yaml", "must run a config of the ConfigMap"),
    ("python -m jobs.cli run /configs/job.yaml --sett x=1", "jobs.cli rejects"),
    ("python jobs/cli.py run /configs/job.yaml", "not a jobs.cli command"),
    ("python -m jobs.cli run /configs/captioning.yaml && python -m jobs.cli compact s3://elsewhere --target-mb 128",
     "is not the run's output"),
    ("python -m jobs.cli run /configs/captioning.yaml && "
     "python -m jobs.cli compact s3://my-video-archive/index/captions --target-mb 64", "!= the run's output"),
    ("python -m jobs.cli run /configs/job.yaml && python -m jobs.cli index s3://my-video-archive/index/qa-v1",
     "only `compact`"),
])  # fmt: skip
def test_entrypoint_check_catches(entrypoint, expected):
    assert any(expected in p for p in entrypoint_problems(entrypoint, job_configs())), \
        entrypoint_problems(entrypoint, job_configs())


def test_cron_schedule_and_no_overlap():
    spec = of_kind("RayCronJob")["spec"]
    assert len(spec["schedule"].split()) == 5 and "TZ" not in spec["schedule"], "5 cron fields; zone in timeZone"
    if "timeZone" in spec:
        zoneinfo = pytest.importorskip("zoneinfo")
        try:
            zoneinfo.ZoneInfo(spec["timeZone"])
        except zoneinfo.ZoneInfoNotFoundError:
            if zoneinfo.available_timezones():  # no tz database here at all: cannot tell
                raise
    # No concurrencyPolicy in KubeRay 1.7: a run must end before a daily schedule fires again.
    assert 0 < spec["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


# ---------------------------------------------------------------------------------------------
# cluster shape


def test_cluster_specs_are_identical():
    specs = cluster_specs()
    first = specs.pop("RayCluster.spec")
    for where, spec in specs.items():
        assert spec == first, f"{where} differs from raycluster.yaml's spec"


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first


def group_capacity(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees in one pod of the group: rayStartParams, else the container limits."""
    params = group.get("rayStartParams") or {}
    resources = _container(group)["resources"]
    limits = resources.get("limits") or resources.get("requests") or {}
    cpus = _quantity(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = _quantity(params.get("num-gpus", limits.get(GPU, 0)))
    return cpus, gpus


def gpu_problems(spec: dict) -> list[str]:
    """What is inconsistent in a cluster spec's autoscaling and GPU setup."""
    problems = []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    if (spec["headGroupSpec"].get("rayStartParams") or {}).get("num-cpus") != "0":
        problems.append('head: rayStartParams num-cpus must be "0" (no tasks on the head)')
    if GPU in str(spec["headGroupSpec"]["template"]):
        problems.append("head: asks for a GPU")
    gpu_groups = 0
    for group in spec.get("workerGroupSpecs", []):
        name = group["groupName"]
        resources = _container(group)["resources"]
        limit = (resources.get("limits") or {}).get(GPU)
        request = (resources.get("requests") or {}).get(GPU)
        params = group.get("rayStartParams") or {}
        # what Ray is told: rayStartParams num-gpus and/or the group's Ray resources (KubeRay >= 1.4)
        declared = [params.get("num-gpus"), (group.get("resources") or {}).get("GPU")]
        declared = [v for v in declared if v is not None]
        if not 0 <= group["minReplicas"] <= group["maxReplicas"]:
            problems.append(f"{name}: minReplicas/maxReplicas out of order")
        if limit is None:
            if request is not None:
                problems.append(f"{name}: requests {GPU} without a limit")
            if any(_quantity(v) for v in declared):
                problems.append(f"{name}: tells Ray it has GPUs but asks Kubernetes for none")
            continue
        gpu_groups += 1
        if _quantity(limit) < 1:
            problems.append(f"{name}: {GPU} limit must be a whole number >= 1")
        if request is not None and _quantity(request) != _quantity(limit):
            problems.append(f"{name}: {GPU} request {request} != limit {limit}")
        if not declared:
            problems.append(f"{name}: set rayStartParams num-gpus to the {GPU} limit")
        for v in declared:
            if _quantity(v) != _quantity(limit):
                problems.append(f"{name}: Ray is told {v} GPUs, the pod gets {limit}")
        if group["minReplicas"] != 0:
            problems.append(f"{name}: minReplicas should be 0 so idle GPU pods are given back")
        tolerated = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
        if GPU not in tolerated:
            problems.append(f"{name}: no toleration for the {GPU} taint")
    if gpu_groups == 0:
        problems.append(f"no worker group requests {GPU}")
    return problems


def test_gpu_group_consistent():
    for where, spec in cluster_specs().items():
        assert gpu_problems(spec) == [], where


@pytest.mark.parametrize(
    "path,value,expected",
    [
        ("workerGroupSpecs.1.rayStartParams.num-gpus", "2", "Ray is told 2 GPUs"),
        (["workerGroupSpecs", 1, "template", "spec", "containers", 0, "resources", "requests", GPU], 2,
         "request 2 != limit"),
        ("workerGroupSpecs.1.template.spec.tolerations", [], "no toleration"),
        ("workerGroupSpecs.0.rayStartParams", {"num-gpus": "1"}, "asks Kubernetes for none"),
        ("headGroupSpec.rayStartParams", {}, "num-cpus must be"),
        ("enableInTreeAutoscaling", False, "enableInTreeAutoscaling"),
    ],
)
def test_gpu_check_catches(path, value, expected):
    spec = _set(of_kind("RayCluster")["spec"], path, value)
    assert any(expected in p for p in gpu_problems(spec)), gpu_problems(spec)


def metrics_problems(spec: dict) -> list[str]:
    """The head serves Prometheus metrics (the driver's moref_* among them) on the port it declares."""
    head = spec["headGroupSpec"]
    port = (head.get("rayStartParams") or {}).get("metrics-export-port")
    ports = {p.get("name"): p.get("containerPort") for p in _container(head).get("ports", [])}
    if port is None:
        return ["head: set rayStartParams metrics-export-port (the job's metrics are served there)"]
    if ports.get("metrics") != int(port):
        return [f"head: metrics-export-port {port} is not its container port named metrics ({ports.get('metrics')})"]
    return []


def test_head_serves_metrics_on_its_declared_port():
    for where, spec in cluster_specs().items():
        assert metrics_problems(spec) == [], where
    spec = _set(of_kind("RayCluster")["spec"], "headGroupSpec.rayStartParams.metrics-export-port", "9090")
    assert "not its container port" in metrics_problems(spec)[0]
    spec = _set(spec, "headGroupSpec.rayStartParams.metrics-export-port", _DELETE)
    assert "set rayStartParams metrics-export-port" in metrics_problems(spec)[0]


def fit_problems(cfg, spec: dict) -> list[str]:
    """Whether a job's actors and tasks can all be scheduled within the groups' maxReplicas."""
    groups = [(g["groupName"], *group_capacity(g), g["maxReplicas"]) for g in spec["workerGroupSpecs"]]
    problems = []
    if not any(cpus >= cfg.decode.num_cpus for _, cpus, _, _ in groups):
        problems.append(f"no worker pod has decode.num_cpus={cfg.decode.num_cpus} CPUs")
    actors = sorted(
        [(cfg.answer.num_gpus, cfg.answer.num_cpus)] * cfg.answer.concurrency
        + [(cfg.guidance.num_gpus, cfg.guidance.num_cpus)] * cfg.guidance.concurrency,
        reverse=True,
    )
    gpu_groups = [g for g in groups if g[2] > 0]
    for _name, cpus, gpus, max_pods in gpu_groups:  # first-fit decreasing into one GPU group
        pods: list[list[float]] = []
        placed = True
        for need_gpu, need_cpu in (a for a in actors if a[0] > 0):
            pod = next((p for p in pods if p[0] >= need_gpu and p[1] >= need_cpu), None)
            if pod is None:
                if need_gpu > gpus or need_cpu > cpus or len(pods) == max_pods:
                    placed = False
                    break
                pods.append(pod := [gpus, cpus])
            pod[0] -= need_gpu
            pod[1] -= need_cpu
        if placed:
            return problems
    return problems + [f"the GPU actors ({actors}) do not fit in any GPU group ({gpu_groups})"]


def test_every_job_fits_the_cluster():
    spec = of_kind("RayCluster")["spec"]
    for key, data in job_configs().items():
        assert fit_problems(parse_job_config(data), spec) == [], key
        assert node_shape_problems(parse_job_config(data), spec) == [], key


def test_fit_check_catches_a_job_too_big():
    spec = of_kind("RayCluster")["spec"]
    data = copy.deepcopy(job_configs()["job.yaml"])
    data["answer"]["concurrency"] = 8  # + the CLIP actor: 9 GPUs, the group has 8
    assert fit_problems(parse_job_config(data), spec)
    data["answer"]["concurrency"] = 1
    data["answer"]["num_gpus"] = 2  # more than one pod has
    assert fit_problems(parse_job_config(data), spec)


def _memory_gib(value) -> float:
    """A Kubernetes memory quantity ('64Gi', '512Mi', '32G', bytes) in GiB."""
    text = str(value)
    for suffix, scale in (("Gi", 1), ("Mi", 2**-10), ("Ti", 2**10), ("G", 1e9 / 2**30), ("M", 1e6 / 2**30)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text) / 2**30


def node_shape_problems(cfg, spec: dict) -> list[str]:
    """Whether a job's `ray.node_shapes` are the worker groups (CPUs, GPUs, max pods, memory within
    the pod limit), and whether the stages' requests pass the runner's check against them."""
    from pipeline.run.job_stages import stage_requests
    from pipeline.run.resources import ClusterGPUs, UnschedulableError, check_placement, nodes_from_shapes

    shapes = cfg.ray.node_shapes or []
    groups = spec["workerGroupSpecs"]
    problems = [] if len(shapes) == len(groups) else [f"{len(shapes)} node shapes for {len(groups)} worker groups"]
    for shape, group in zip(shapes, groups):
        cpus, gpus = group_capacity(group)
        limits = _container(group)["resources"].get("limits") or {}
        pod_gib = _memory_gib(limits.get("memory", "0"))
        if (shape.cpus, shape.gpus, shape.max_nodes) != (cpus, gpus, group["maxReplicas"]):
            problems.append(f"{group['groupName']}: shape {shape} != group ({cpus}, {gpus}, {group['maxReplicas']})")
        if not 0 < shape.memory_gib <= pod_gib:
            problems.append(f"{group['groupName']}: memory_gib {shape.memory_gib} outside the pod's {pod_gib} GiB")
    requests = list(stage_requests(cfg, ClusterGPUs(usable=True, total=0)).values())
    try:
        check_placement(requests, nodes_from_shapes(shapes, requests), "ray.node_shapes")
    except UnschedulableError as exc:
        problems.append(str(exc))
    return problems


def test_node_shape_check_catches_drift_and_a_job_too_big():
    spec = of_kind("RayCluster")["spec"]
    data = copy.deepcopy(job_configs()["job.yaml"])
    data["ray"]["node_shapes"][1]["max_nodes"] = 4  # the gpu group says 8
    assert any("gpu: shape" in p for p in node_shape_problems(parse_job_config(data), spec))
    data = copy.deepcopy(job_configs()["job.yaml"])
    data["answer"]["concurrency"] = 8  # + the CLIP actor: 9 GPU pods, the group has 8
    assert any(p.startswith("guidance: ") and "short of GPU" in p
               for p in node_shape_problems(parse_job_config(data), spec))


# ---------------------------------------------------------------------------------------------
# secrets


def _secret_like_strings(text: str) -> list[str]:
    hits = re.findall(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{16}\b", text)  # AWS key ids
    hits += re.findall(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text)
    # 40-character base64 runs with mixed case and digits: the shape of an AWS secret key
    for run in re.findall(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])", text):
        if re.search(r"[a-z]", run) and re.search(r"[A-Z]", run) and re.search(r"[0-9]", run):
            hits.append(run)
    # NAME=value / NAME: value where NAME says it is a credential
    hits += re.findall(
        r"(?i)\b\w*(?:secret|password|passwd|token|access_key)\w*\s*[=:]\s*[\"']?[A-Za-z0-9/+]{8,}", text
    )
    return hits


_CREDENTIAL_NAME = re.compile(r"(?i)(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)")


def env_problems(doc) -> list[str]:
    """Container env entries that carry a credential other than through a secretKeyRef."""
    problems = []

    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "env" and isinstance(v, list):
                    for e in v:
                        name = e.get("name", "")
                        if "value" in e and _CREDENTIAL_NAME.search(name):
                            problems.append(f"{where}.env {name}: literal value")
                        if name.startswith("AWS_") and "secretKeyRef" not in (e.get("valueFrom") or {}):
                            problems.append(f"{where}.env {name}: not from a secretKeyRef")
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}.{i}")

    walk(doc, "$")
    return problems


def test_no_literal_secrets_in_infra():
    files = [p for p in sorted(INFRA.rglob("*")) if p.is_file()]
    assert DOCKERFILE in files and LAUNCHER in files
    for path in files:
        assert _secret_like_strings(path.read_text()) == [], path
    for name, doc in manifests().items():
        assert env_problems(doc) == [], name
    refs = [e for spec in cluster_specs().values() for e in _walk_env(spec) if e["name"].startswith("AWS_")]
    assert refs and all(e["valueFrom"]["secretKeyRef"]["name"] for e in refs)
    for key, data in job_configs().items():
        cfg = parse_job_config(data)
        for storage in (cfg.input.storage, cfg.output.storage):
            assert not (storage.key or storage.secret or storage.token), f"{key}: credentials inline"


def _walk_env(node):
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            yield from node["env"]
        for v in node.values():
            yield from _walk_env(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_env(v)


def test_secret_checks_bite():
    fake_id = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documented example, assembled so no scanner trips
    fake_secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    text = (KUBERAY / "raycluster.yaml").read_text()
    assert _secret_like_strings(text.replace("key: AWS_ACCESS_KEY_ID", f"key: {fake_id}"))
    assert _secret_like_strings(f"{text}\n# {fake_secret}\n")
    assert _secret_like_strings("AWS_SECRET_ACCESS_KEY=abcdefgh12345678")
    doc = of_kind("RayCluster")
    env = doc["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["env"]
    env[1] = {"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-one"}
    assert len(env_problems(doc)) == 2  # a literal credential, and not from the Secret


# ---------------------------------------------------------------------------------------------
# image and versions


def _images(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "image" and isinstance(v, str):
                yield v
            else:
                yield from _images(v)
    elif isinstance(node, list):
        for v in node:
            yield from _images(v)


def test_one_image_and_one_ray_version_everywhere():
    images = {img for doc in manifests().values() for img in _images(doc)}
    assert len(images) == 1, f"different images across manifests: {images}"
    image = images.pop()
    repo, _, tag = image.rpartition(":")
    assert repo and "/" not in tag and tag not in ("", "latest"), f"pin a tag, not {image!r}"

    pins = pyproject_pins()
    ray, torch = pins["ray"], pins["torch"]
    for where, spec in cluster_specs().items():
        assert spec["rayVersion"] == ray, f"{where}: rayVersion {spec['rayVersion']} != pyproject ray {ray}"

    dockerfile = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray}-py311-cu"), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.M)
    assert f"torch=={torch} " in dockerfile and f"torchvision=={pins['torchvision']} " in dockerfile
    # only the packages go into the image: never the whole context (.venv, outputs, credentials)
    assert not re.search(r"^(COPY|ADD)\s+(--\S+\s+)*\.\s", dockerfile, re.M)

    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert launcher["docker"]["image"].startswith(f"rayproject/ray:{ray}-py311-cu")
    setup = " ".join(launcher["setup_commands"])
    assert f"torch=={torch} " in setup and f"torchvision=={pins['torchvision']} " in setup


def test_image_and_launcher_install_ray_as_pyproject_pins_it():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray = [d for d in deps if re.match(r"ray\b", d)]
    assert len(ray) == 1 and (m := re.fullmatch(r"ray\[([\w,]+)\]==[\d.]+", ray[0])), ray
    # data: Ray Data; default: what a head needs for `ray start --head`, `ray job submit` and metrics
    assert {"data", "default"} <= set(m.group(1).split(","))
    # The image and the launcher take Ray from the package's own dependencies, never pin it apart.
    dockerfile = DOCKERFILE.read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert any(re.search(r'pip install "\.\$\{EXTRAS', line) for line in installs), installs
    assert not [line for line in installs if re.search(r"\bray\b", line)], installs
    setup = yaml.safe_load(LAUNCHER.read_text())["setup_commands"]
    assert "pip install -q /home/ray/moref-index" in setup
    assert not [c for c in setup if re.search(r"\bray\b", c.replace("/home/ray/", ""))], setup


# ---------------------------------------------------------------------------------------------
# cluster launcher


def _ray_launcher_schema() -> dict | None:
    spec = importlib.util.find_spec("ray")  # locate without importing ray (seconds)
    if spec is None or spec.origin is None:
        return None
    path = pathlib.Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text()) if path.is_file() else None


def launcher_problems(cfg) -> list[str]:
    if not isinstance(cfg, dict):
        return ["not a mapping"]
    problems = [f"missing {k}" for k in ("cluster_name", "provider", "available_node_types", "head_node_type")
                if k not in cfg]  # fmt: skip
    schema = _ray_launcher_schema()
    if schema is not None:
        validator = jsonschema.Draft7Validator(schema)
        problems += [f"{e.json_path}: {e.message[:200]}" for e in validator.iter_errors(cfg)]
    if problems:
        return problems
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    if head not in types:
        return [f"head_node_type {head!r} is not in available_node_types"]
    if types[head]["resources"].get("CPU") != 0:
        problems.append("head: resources CPU must be 0 (no tasks on the head)")
    workers = {k: v for k, v in types.items() if k != head}
    if not any(v["resources"].get("GPU", 0) >= 1 for v in workers.values()):
        problems.append("no GPU worker type")
    if not any(v["resources"].get("CPU", 0) >= 1 and not v["resources"].get("GPU") for v in workers.values()):
        problems.append("no CPU worker type")
    for name, t in workers.items():
        if not 0 <= t.get("min_workers", 0) <= t.get("max_workers", 0):
            problems.append(f"{name}: min_workers/max_workers out of order")
    if sum(t.get("max_workers", 0) for t in workers.values()) > cfg.get("max_workers", math.inf):
        problems.append("max_workers is below the node types' sum")
    return problems


def test_cluster_launcher_config():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    assert launcher_problems(cfg) == []
    assert cfg["provider"]["type"] == "aws"
    assert _ray_launcher_schema() is not None, "Ray's ray-schema.json not found: is ray installed?"


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda c: c.pop("head_node_type"), "missing head_node_type"),
        (lambda c: c.__setitem__("max_workers", "many"), "is not of type 'integer'"),
        (lambda c: c["available_node_types"]["gpu"].__setitem__("resources", {"GPU": 0.5}), "is not of type"),
        (lambda c: c.__setitem__("head_node_type", "ray.head.default"), "not in available_node_types"),
        (lambda c: c["available_node_types"]["head"].__setitem__("resources", {}), "CPU must be 0"),
    ],
)
def test_launcher_check_catches(mutate, expected):
    cfg = yaml.safe_load(LAUNCHER.read_text())
    mutate(cfg)
    assert any(expected in p for p in launcher_problems(cfg)), launcher_problems(cfg)
