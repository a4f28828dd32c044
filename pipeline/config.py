"""The job config: one YAML file, validated before any work starts.

One typed model per stage. Unknown keys and bad values fail fast with the dotted key and the
expected form (see `load_job_config`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import hashlib
import pathlib
import typing
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from freemoref.config import MAX_BATCH_TOKENS, GenerationOptions, MoRefConfig, VideoLayout
from freemoref.prompts import MultipleChoiceStyle, OpenEndedStyle, PromptTemplate
from pipeline.errors import TRANSIENT_REASONS, ErrorReason

MB = 1 << 20  # a megabyte as the config's *_mb keys mean it


class ConfigError(ValueError):
    """A job config that cannot run; the message names the key and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(_Strict):
    """fsspec storage options for object stores. Credentials default to the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL, instance roles); values set
    here are never written to outputs or logs."""

    endpoint_url: str | None = None
    key: str | None = Field(default=None, repr=False)
    secret: str | None = Field(default=None, repr=False)
    token: str | None = Field(default=None, repr=False)
    anon: bool = False

    def fsspec_options(self, protocol: str) -> dict[str, Any]:
        if protocol not in ("s3", "s3a"):
            return {}
        opts: dict[str, Any] = {"anon": self.anon}
        for name in ("key", "secret", "token"):
            value = getattr(self, name)
            if value:
                opts[name] = value
        if self.endpoint_url:
            opts["client_kwargs"] = {"endpoint_url": self.endpoint_url}
        return opts


class InputConfig(_Strict):
    """Where the videos are: glob(s) over a local or fsspec path, or a manifest file."""

    videos: list[str] | None = None
    manifest: str | None = None
    limit: int | None = Field(default=None, ge=1)
    storage: StorageConfig = StorageConfig()
    # Where the videos are listed and paired with their pending questions (pipeline/run/planning.py):
    # in Ray tasks, on the driver, or auto: the driver for local globs and manifests up to 8 MiB.
    planning: Literal["auto", "driver", "tasks"] = "auto"

    @field_validator("videos", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one_source(self):
        if bool(self.videos) == bool(self.manifest):
            raise ValueError("give exactly one of 'videos' (glob or list of globs) or 'manifest' (file)")
        return self


def prompt_id(question: str) -> str:
    """The question_id of a prompt given as a plain string: 'prompt-' and 12 hex digits of its text's SHA-256."""
    return f"prompt-{hashlib.sha256(question.encode()).hexdigest()[:12]}"


class GlobalQuestion(_Strict):
    question_id: str
    question: str = Field(min_length=1)


class QuestionsConfig(_Strict):
    """Per-video questions from a file (JSONL/Parquet/CSV: video_id, question_id, question) and/or
    global prompts asked of every video (captioning)."""

    file: str | None = None
    prompts: list[GlobalQuestion] = []
    # Wording of the file's questions (freemoref.prompts), as lmms-eval evaluates each benchmark:
    # rows with `options` are multiple choice; the others get the open-ended post-prompt.
    multiple_choice_prompt: MultipleChoiceStyle = "videomme"
    open_ended_prompt: OpenEndedStyle = "none"

    @field_validator("prompts", mode="before")
    @classmethod
    def _strings_become_prompts(cls, value):
        # A plain string's question_id comes from its text: an edited prompt is a new question.
        if isinstance(value, list):
            return [{"question_id": prompt_id(v), "question": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _some_questions(self):
        if not self.file and not self.prompts:
            raise ValueError("give 'file' (per-video questions) and/or 'prompts' (asked of every video)")
        ids = [p.question_id for p in self.prompts]
        if len(ids) != len(set(ids)):
            raise ValueError("prompt question_id values must be unique")
        return self


# The pipeline's own lists of choices, defined here once; the stages that implement them derive
# their tuples from these (pipeline/stages/decode/stage.py, frame_selection.py). The model library's
# choices (layouts, templates, benchmark wordings, MoRef and generation options) come from freemoref.
DecodeBackendChoice = Literal["auto", "pyav", "decord", "nvdec"]
FrameSelection = Literal["uniform", "prompt", "mix"]
DEFAULT_PROMPT_FRACTION = 0.5  # mix: share of the K frames chosen by the prompt


class DecodeConfig(_Strict):
    """Candidate frames are sampled by time, decoded only where needed, resized to a square."""

    backend: DecodeBackendChoice = "auto"
    sampling: Literal["uniform", "fps"] = "uniform"
    num_frames: int = Field(default=32, ge=1, le=4096)  # uniform: frames over the duration
    fps: float = Field(default=1.0, gt=0)  # fps sampling: frames per second of video ...
    max_frames: int = Field(default=256, ge=1, le=4096)  # ... capped at this many
    frame_size: int = Field(default=384, ge=8, le=2048)  # square side the frames are resized to
    # exact: the frame shown at each sampled time. keyframe: the keyframe nearest each sampled time,
    # each once (no decoding between keyframes: at most one frame per keyframe interval).
    seek: Literal["exact", "keyframe"] = "exact"
    timeout_s: float = Field(default=300.0, gt=0)  # per attempt, in an isolated process
    retries: int = Field(default=1, ge=0, le=5)  # retries per backend after a crash or timeout
    read_retries: int = Field(default=4, ge=0, le=20)  # retries after a storage failure, with backoff
    max_duration_s: float = Field(default=4 * 3600.0, gt=0)  # refuse longer videos before decoding
    max_pixels: int = Field(default=8192 * 8192, ge=1)  # refuse larger frames before decoding
    max_bytes: int = Field(default=20 * 1024**3, ge=1)  # refuse larger files before reading
    num_cpus: float = Field(default=1.0, gt=0)
    # GPU share of each decode task: Ray shows a task no GPU unless it asks for one, so `nvdec` needs
    # it above 0; the tasks share the GPU with the CLIP and Video-LLM actors (lower answer.num_gpus
    # to make room: docs/CONFIGURATION.md, "GPU decoding").
    num_gpus: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _nvdec_has_a_gpu(self):
        if self.backend == "nvdec" and self.num_gpus <= 0:
            raise ValueError("backend 'nvdec' decodes on a GPU: set decode.num_gpus above 0 (e.g. 0.05), "
                             "and leave room for it beside guidance.num_gpus and answer.num_gpus")
        return self


class GuidanceConfig(_Strict):
    """CLIP frame embeddings (the frames table) and per-question frame selection."""

    model: str = "ViT-L-14-336-quickgelu"  # open_clip model name, 'hf-hub:org/name' or a local dir
    pretrained: str | None = "openai"  # open_clip pretrained tag or a weights file; None for a local dir
    selection: FrameSelection = "uniform"  # per question, from the candidates
    # question: each question picks its own frames and RoI; video: one pick for all of a video's
    # questions (from their scores together), so they can share the answer stage's prefill.
    selection_scope: Literal["question", "video"] = "question"
    frames_per_question: int = Field(default=32, ge=1, le=4096)
    prompt_fraction: float = Field(default=DEFAULT_PROMPT_FRACTION, ge=0, le=1)  # mix: share picked by the prompt
    roi_ratio: float | None = Field(default=None, gt=0, le=1)  # RoI box area / frame; None: no RoI (paper: 0.8)
    batch_size: int = Field(default=128, ge=1)  # frames per image-tower forward, across videos
    videos_per_batch: int = Field(default=4, ge=1)  # videos one guidance call takes together
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: float16 on CUDA, float32 on CPU
    # 0.2 beside answer.num_gpus 0.8: the defaults fill one GPU exactly (a one-GPU machine runs them).
    num_gpus: float = Field(default=0.2, ge=0)
    num_cpus: float = Field(default=1.0, ge=0)
    memory_gib: float = Field(default=2.0, ge=0)  # host memory each CLIP actor reserves from Ray
    concurrency: int = Field(default=1, ge=1)
    # separate: CLIP actors of their own (num_gpus, concurrency, memory_gib above); answer_actor:
    # CLIP runs inside each Video-LLM actor, on its GPU, between its videos (README "GPU placement").
    placement: Literal["separate", "answer_actor"] = "separate"


# The generation keys of `answer`, one field per GenerationOptions field (the one definition).
_GenerationKeys: Any = create_model(  # type: ignore[call-overload]  # fields built from the dataclass
    "_GenerationKeys", __base__=_Strict,
    **{f.name: (get_type_hints(GenerationOptions, include_extras=True)[f.name], f.default)
       for f in dataclasses.fields(GenerationOptions)})


class AnswerConfig(_GenerationKeys):  # a model class made by create_model
    """The Video-LLM actor: a checkpoint of any supported model family (LlavaOnevision, Qwen2.5-VL,
    Qwen3-VL; picked from the checkpoint's config.json, freemoref.families) and generation."""

    # The checkpoint: a local directory or a hub id; its config.json names the model family.
    model: str = "llava-hf/LLaVA-Video-7B-Qwen2-hf"
    # LlavaOnevision's video token layout; auto: what the checkpoint records. Other families ignore it.
    layout: Literal["auto"] | VideoLayout = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    # LlavaOnevision's prompt format (freemoref.prompts): LLaVA-Video's evaluations or HF's template.
    # The Qwen families prompt with their processor's chat template.
    prompt_template: PromptTemplate = "llava_vid"
    system_prompt: str | None = None  # None: the template's own ("You are a helpful assistant." for llava_vid)
    # max_new_tokens, do_sample, temperature, top_p, seed, stop_strings: GenerationOptions' fields
    # (_GenerationKeys, below), with their types, ranges and defaults.
    # freemoref's own dataclass: its annotations give each key's type and range, checked here.
    moref: MoRefConfig = MoRefConfig()
    # Questions answered together per batch (sharing the video's prefill): their sequences in the
    # layers from the fusion layer on, summed, stay under this many tokens. Bounds GPU memory.
    max_batch_tokens: int = Field(default=MAX_BATCH_TOKENS, ge=1)
    # A question (with its options and the template's text around it) of more tokens than this is an
    # error row `question_too_long`, found before any model work, as is one whose whole prompt and
    # max_new_tokens exceed the model's context: one oversized question never sinks its video's others.
    max_question_tokens: int = Field(default=4096, ge=1)
    num_gpus: float = Field(default=0.8, ge=0)  # the rest of the GPU beside CLIP's 0.2
    num_cpus: float = Field(default=1.0, ge=0)
    # Host memory each actor reserves from Ray. auto: the checkpoint's weight files (loading passes
    # them through host memory) plus ANSWER_BASE_MEMORY_GIB; a hub id counts as HUB_MODEL_MEMORY_GIB.
    memory_gib: float | Literal["auto"] = "auto"
    # Actors; auto: one per whole GPU share of the cluster (GPUs / num_gpus), 1 without GPUs.
    concurrency: int | Literal["auto"] = 1
    # Videos each actor holds at once: one on the model, the others preparing frames or rows on
    # the host meanwhile, so the GPU does not wait for host work between videos.
    videos_in_flight: int = Field(default=2, ge=1, le=16)

    def generation(self) -> GenerationOptions:
        """The generation options, as the engine takes them."""
        return GenerationOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationOptions)})

    @field_validator("memory_gib", "concurrency")
    @classmethod
    def _positive(cls, value, info):
        if value != "auto" and (value < 0 or (info.field_name == "concurrency" and value < 1)):
            raise ValueError(f"expected 'auto' or a number >= {1 if info.field_name == 'concurrency' else 0}")
        return value


class OutputConfig(_Strict):
    """Where answers/ and frames/ Parquet tables go (local dir or fsspec URL)."""

    path: str
    storage: StorageConfig = StorageConfig()
    resume: bool = True  # skip (video_id, question_id) pairs already written
    # Ask a written pair again when what produced its row changed (its fingerprint: the question,
    # the model, the config that changes answers; pipeline/fingerprint.py); the new row replaces it.
    # false: keep rows as written, whatever changed.
    redo_changed: bool = True
    # Rerun pairs whose row is an error with one of these reasons (the new row replaces the old):
    # false / [] = errors are final; true = the transient ErrorReasons; or a list of reasons.
    retry_errors: bool | list[str] = False
    write_retries: int = Field(default=6, ge=0, le=20)  # retries of a failed write, with backoff
    # Answers and frames are committed in files of many videos: a file is closed when the buffered
    # rows reach target_file_mb (answers or frames), max_videos_per_file videos (None: no cap; tests
    # use it to force several files), or when the oldest buffered row is flush_interval_s old (a
    # crash loses at most that much work) - and at the end of the run.
    target_file_mb: float = Field(default=128.0, gt=0)
    max_videos_per_file: int | None = Field(default=None, ge=1)
    flush_interval_s: float = Field(default=600.0, gt=0)
    # One job per output path: a lease in <output>/_lock.json renewed every lock_ttl_s / 3 by the
    # driver; a lease not renewed for lock_ttl_s (a crashed driver) is taken over by the next job.
    lock_ttl_s: float = Field(default=300.0, ge=5)

    @field_validator("retry_errors")
    @classmethod
    def _reasons(cls, value):
        if isinstance(value, list):
            bad = [r for r in value if r not in ErrorReason._value2member_map_]
            if bad:
                raise ValueError(f"retry_errors: unknown reasons {bad}; known: {[r.value for r in ErrorReason]}")
        return value

    @property
    def target_file_bytes(self) -> int:
        return int(self.target_file_mb * MB)

    def retry_reasons(self) -> frozenset[ErrorReason]:
        if self.retry_errors is True:
            return TRANSIENT_REASONS
        return frozenset(ErrorReason(r) for r in self.retry_errors or ())


class NodeShape(_Strict):
    """One kind of node an autoscaling cluster can add (a KubeRay worker group, a launcher node type)."""

    cpus: float = Field(gt=0)
    gpus: int = Field(default=0, ge=0)
    memory_gib: float = Field(gt=0)
    max_nodes: int | None = Field(default=None, ge=1)  # None: as many as the job needs


class RayConfig(_Strict):
    address: str | None = None  # None: $RAY_ADDRESS if set (ray job submit), else a local Ray
    num_cpus: int | None = Field(default=None, ge=1)  # local Ray only
    # The stages' resource requests are checked against these before any work; None: against the
    # nodes of the cluster as it is (strict on a local Ray, a warning on a joined cluster, whose
    # autoscaler may still add nodes).
    node_shapes: list[NodeShape] | None = None
    # Seconds between the driver's progress lines when stderr is not a terminal (pipeline/run/metrics.py).
    progress_interval_s: float = Field(default=30.0, gt=0)


@dataclasses.dataclass(frozen=True)
class FramePlan:
    """How many frames each stage handles, resolved from decode.num_frames (or fps sampling's
    decode.max_frames), guidance.frames_per_question and answer.moref: the one place these three
    keys are related. None where fps sampling decides per video."""

    decoded: int | None  # candidate frames per video (uniform sampling)
    decoded_max: int
    per_question: int  # frames each question's answer sees (at most)
    references: int | None  # MoRef references N for a question of `per_question` frames

    def describe(self) -> str:
        decoded = (f"{self.decoded} decoded per video" if self.decoded is not None
                   else f"up to {self.decoded_max} decoded per video (fps sampling)")
        refs = ("native attention (1 reference)" if self.references == 1
                else f"{self.references} MoRef references" if self.references else "MoRef references per video")
        return f"frames: {decoded}, {self.per_question} per question, {refs}"


class JobConfig(_Strict):
    # names runs/<run_id>.json and goes into file names: a safe name, never a path
    run_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    input: InputConfig
    questions: QuestionsConfig
    decode: DecodeConfig = DecodeConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    answer: AnswerConfig = AnswerConfig()
    output: OutputConfig
    ray: RayConfig = RayConfig()

    def frame_plan(self) -> FramePlan:
        """The frames decoded, seen per question and split into references; a ConfigError naming
        the keys when they cannot go together. An explicit guidance.frames_per_question above the
        frames decoded is an error; the default is capped at them."""
        uniform = self.decode.sampling == "uniform"
        decoded_max = self.decode.num_frames if uniform else self.decode.max_frames
        source = "decode.num_frames" if uniform else "decode.max_frames"
        per_question = self.guidance.frames_per_question
        if per_question > decoded_max:
            if "frames_per_question" in self.guidance.model_fields_set:
                raise ConfigError(
                    f"guidance.frames_per_question ({per_question}) exceeds {source} ({decoded_max}), the frames "
                    f"decoded per video: lower it, or raise {source}")
            per_question = decoded_max
        moref = self.answer.moref
        if moref.references is not None and moref.enabled and moref.references > per_question:
            raise ConfigError(
                f"answer.moref.references ({moref.references}) exceeds the {per_question} frames a question sees "
                f"(guidance.frames_per_question, at most {source}): a reference needs at least one frame")
        references = moref.resolve(per_question, num_layers=_ANY_DEPTH).references if uniform else None
        return FramePlan(decoded_max if uniform else None, decoded_max, per_question, references)

    def resolved_run_id(self) -> str:
        if self.run_id:
            return self.run_id
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        return f"{stamp}-{uuid.uuid4().hex[:8]}"


# The reference count does not depend on the model's depth; resolving it needs some depth.
_ANY_DEPTH = 1 << 10


def _describe(errors: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for err in errors:
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        # Unknown keys: of a model (extra_forbidden) or of a dataclass such as answer.moref.
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            lines.append(f"{key}: unknown key{_did_you_mean(err['loc'])}")
        else:
            value = err.get("input")
            # Echo scalars only: a mapping may hold storage credentials, and so may these keys.
            secret = any(str(p) in ("storage", "key", "secret", "token") for p in err["loc"])
            shown = "" if secret or isinstance(value, (dict, list)) else f" (got {value!r})"
            lines.append(f"{key}: {err['msg']}{shown}")
    return "; ".join(lines)


def _did_you_mean(loc: Sequence[Any]) -> str:
    """' (did you mean 'x'?)' when a key valid where the unknown one stands is spelled close to it."""
    node: Any = JobConfig
    for part in loc[:-1]:
        if isinstance(part, str):  # ints index list items, whose type _unwrapped already took
            fields = _keys_of(node)
            node = _unwrapped(fields[part]) if part in fields else None
    close = difflib.get_close_matches(str(loc[-1]), list(_keys_of(node)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _keys_of(node: Any) -> dict[str, Any]:
    """Key -> annotation of a config model or dataclass; empty for anything else."""
    if isinstance(node, type) and issubclass(node, BaseModel):
        return {name: f.annotation for name, f in node.model_fields.items()}
    if dataclasses.is_dataclass(node):
        return {f.name: f.type for f in dataclasses.fields(node)}
    return {}


def _unwrapped(annotation: Any) -> Any:
    """The model or dataclass inside `X | None` and `list[X]`."""
    for arg in typing.get_args(annotation) or ():
        if _keys_of(inner := _unwrapped(arg)):
            return inner
    return annotation


def parse_job_config(data: Any, base_dir: pathlib.Path | None = None) -> JobConfig:
    """Validate a config mapping. Relative local paths resolve against `base_dir`."""
    if not isinstance(data, dict):
        raise ConfigError(f"job config must be a mapping of keys, got {type(data).__name__}")
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid job config: {_describe(exc.errors())}") from None
    cfg.frame_plan()  # frames decoded, per question and references must go together
    return _resolve_paths(cfg, base_dir) if base_dir is not None else cfg


def load_job_config(path: str | pathlib.Path, overrides: dict | None = None) -> JobConfig:
    """Read a YAML job config (safe loader), apply dotted-key overrides, validate."""
    path = pathlib.Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"job config not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"job config {path} is not valid YAML: {exc}") from None
    data = data or {}
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return parse_job_config(data, base_dir=path.parent.resolve())


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot override {dotted}: {part} is not a mapping")
    node[parts[-1]] = value


def _is_local(path: str) -> bool:
    return "://" not in path


def _resolve(path: str | None, base_dir: pathlib.Path) -> str | None:
    if path is None or not _is_local(path):
        return path
    expanded = pathlib.Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else (base_dir / expanded).resolve())


def _resolve_paths(cfg: JobConfig, base_dir: pathlib.Path) -> JobConfig:
    inp = cfg.input.model_copy(
        update={
            "videos": [_resolve(v, base_dir) for v in cfg.input.videos] if cfg.input.videos else None,
            "manifest": _resolve(cfg.input.manifest, base_dir),
        }
    )
    questions = cfg.questions.model_copy(update={"file": _resolve(cfg.questions.file, base_dir)})
    output = cfg.output.model_copy(update={"path": _resolve(cfg.output.path, base_dir)})
    guidance = cfg.guidance
    if _looks_like_local_path(guidance.model):
        guidance = guidance.model_copy(update={"model": _resolve(guidance.model, base_dir)})
    answer = cfg.answer
    if _looks_like_local_path(answer.model):
        answer = answer.model_copy(update={"model": _resolve(answer.model, base_dir)})
    return cfg.model_copy(
        update={"input": inp, "questions": questions, "output": output, "guidance": guidance, "answer": answer}
    )


def _looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~"))
