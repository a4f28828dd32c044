"""Checks of a job config against the world, before the run takes the output's lease or starts Ray.

The config's own validation (pipeline/config.py) checks forms; these check that what it names
exists: the questions file and the manifest, the output path (a folder, or nothing yet), and, on a
local run, the models given as local paths and the GPU decoder's package. A model spelled like a
path (`/...`, `./...`, `~/...`, or with more than one '/') is a path and never a hub id: a missing one
is reported here, naming its key, instead of being looked up on the hub or failing inside an actor
minutes later. A job that joins a cluster skips the model check: its driver may run where the models
are not mounted (the KubeRay head). Each failure is a ConfigError whose message names the key.
"""

from __future__ import annotations

import importlib.util
import json
import os

from pipeline.config import ConfigError, JobConfig
from pipeline.sources import filesystem

_CLIP_LOCAL_PREFIX = "local-dir:"  # pipeline/stages/clip_models.py's prefix for a local directory


def is_path_like(model: str) -> bool:
    """A model value that names a local path rather than a hub id ("org/name") or a built-in name."""
    if "://" in model or model.startswith("hf-hub:"):
        return False
    return model.startswith(("/", ".", "~", _CLIP_LOCAL_PREFIX)) or model.count("/") > 1


def check_before_work(cfg: JobConfig, local: bool) -> None:
    """Raise ConfigError naming the key of the first thing the config names that is not there.
    `local`: the stages run on this machine (a local Ray), so the models must be here."""
    if local:
        _check_model("answer.model", cfg.answer.model)
        _check_model("guidance.model", cfg.guidance.model)
        _check_fusion_scope(cfg)
        _check_gpu_decoder(cfg)
    if cfg.questions.file:
        _check_file("questions.file", cfg.questions.file, cfg.input.storage)
    if cfg.input.manifest:
        _check_file("input.manifest", cfg.input.manifest, cfg.input.storage)
    fs, path = filesystem(cfg.output.path, cfg.output.storage)
    if fs.exists(path) and not fs.isdir(path):
        raise ConfigError(f"output.path: {cfg.output.path} is a file; give a folder (new or a job's output)")


def _check_model(key: str, model: str) -> None:
    if not is_path_like(model):
        return
    path = os.path.expanduser(model.removeprefix(_CLIP_LOCAL_PREFIX))
    if not os.path.isdir(path):
        what = "is a file, not a model folder" if os.path.exists(path) else "does not exist"
        raise ConfigError(f"{key}: {path} {what} (a path is never looked up on the model hub)")


def _check_gpu_decoder(cfg: JobConfig) -> None:
    """`decode.backend: nvdec` on a local run: its package must be installed here, or every video
    would quietly fall back to PyAV (on a cluster the workers' image is not this machine's)."""
    if cfg.decode.backend == "nvdec" and importlib.util.find_spec("PyNvVideoCodec") is None:
        raise ConfigError("decode.backend: nvdec needs PyNvVideoCodec, which is not installed here "
                          "(pip install 'moref-index[nvdec]'), or choose pyav")


def _check_fusion_scope(cfg: JobConfig) -> None:
    """Video scope shares one fused prefix with 1-D positions: the families with multimodal rotary
    positions (Qwen2.5-VL, Qwen3-VL) answer in question scope only."""
    if cfg.answer.moref.fusion_scope != "video":
        return
    family = local_model_family(cfg.answer.model)
    if family not in (None, "llava_onevision"):
        raise ConfigError(f"answer.moref.fusion_scope: 'video' runs on LlavaOnevision checkpoints; {cfg.answer.model} "
                          f"is {family}, whose multimodal positions need 'question'")


def local_model_family(model: str) -> str | None:
    """The model family of a local checkpoint folder, from its config.json (freemoref.families);
    None for a hub id, a folder without one, or an unsupported architecture."""
    if not is_path_like(model):
        return None
    config_file = os.path.join(os.path.expanduser(model.removeprefix(_CLIP_LOCAL_PREFIX)), "config.json")
    if not os.path.isfile(config_file):
        return None
    from freemoref.families import family_name_for_config

    with open(config_file) as f:
        return family_name_for_config(json.load(f))


def _check_file(key: str, url: str, storage) -> None:
    fs, path = filesystem(url, storage)
    if not fs.exists(path):
        raise ConfigError(f"{key}: file not found: {url}")
    if fs.isdir(path):
        raise ConfigError(f"{key}: {url} is a folder; give a file")
