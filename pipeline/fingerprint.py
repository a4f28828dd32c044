"""What produced an answers row, as a short digest: resume asks a pair again when it changed.

A row's fingerprint is `pair_fingerprint(config_fingerprint(cfg), question)`, where the question is
the text the model sees (with its options and the benchmark's instructions) and the config part
holds everything else that changes an answer:
- the Video-LLM's identity and revision (`model_identity`): a local checkpoint by the digest of its
  config and weight files (names, sizes, first and last MiB), so a copy elsewhere matches and a
  retrained one does not; a hub id with the commit of its cached snapshot on this machine;
- the prompt: template, layout, system prompt;
- generation: max_new_tokens, sampling, temperature, top_p, seed, stop strings;
- Free-MoRef's settings;
- the frames: sampling, count or rate, size;
- the selection: its mode, scope, frames per question, prompt share, RoI ratio, and the CLIP model
  when it picks frames or boxes.
Settings that do not change an answer (resources, batch sizes, dtype, backends, retries, the
token limits) are left out, so changing them redoes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

from pipeline.config import JobConfig

DIGEST_CHARS = 16  # 64 bits: a changed question's fingerprint is never taken for the old one's
_EDGE_BYTES = 1 << 20  # of each weight file, from each end
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def pair_fingerprint(config_fingerprint: str, question: str) -> str:
    """The fingerprint of a (video, question) row: the job's config part and the question as asked."""
    return _digest(f"{config_fingerprint}\n{question}")


def model_identity(model: str, pretrained: str | None = None) -> str:
    """A model's name and revision: a local folder by the digest of its files, a hub id by the
    commit of its snapshot cached here ('uncached' when there is none), a built-in name by itself
    and its pretrained tag (or the weights file's digest)."""
    path = pathlib.Path(model.removeprefix("local-dir:")).expanduser()
    if path.is_dir():
        return f"{path.name}@{_folder_digest(path)}"
    if pretrained and os.path.isfile(pretrained):
        return f"{model}+{pathlib.Path(pretrained).name}@{_files_digest([pathlib.Path(pretrained)])}"
    if pretrained:
        return f"{model}+{pretrained}"
    return f"{model}@{_hub_revision(model) or 'uncached'}"


def config_fingerprint(cfg: JobConfig) -> str:
    """The part of every row's fingerprint the job's config decides (see the module docstring)."""
    answer, decode, guidance = cfg.answer, cfg.decode, cfg.guidance
    frames: dict[str, object] = {"sampling": decode.sampling, "frame_size": decode.frame_size}
    frames.update({"num_frames": decode.num_frames} if decode.sampling == "uniform"
                  else {"fps": decode.fps, "max_frames": decode.max_frames})
    selection: dict = {"selection": guidance.selection, "frames_per_question": guidance.frames_per_question,
                       "roi_ratio": guidance.roi_ratio}
    if guidance.selection != "uniform":
        selection["selection_scope"] = guidance.selection_scope
    if guidance.selection == "mix":
        selection["prompt_fraction"] = guidance.prompt_fraction
    if guidance.selection != "uniform" or guidance.roi_ratio is not None:
        selection["clip"] = model_identity(guidance.model, guidance.pretrained)
    generation = {"max_new_tokens": answer.max_new_tokens, "do_sample": answer.do_sample, "seed": answer.seed,
                  "stop_strings": answer.stop_strings}
    if answer.do_sample:
        generation.update(temperature=answer.temperature, top_p=answer.top_p)
    parts = {
        "model": model_identity(answer.model),
        "prompt": {"template": answer.prompt_template, "layout": answer.layout, "system": answer.system_prompt},
        "generation": generation,
        "moref": _moref(cfg),
        "frames": frames,
        "selection": selection,
    }
    return _digest(json.dumps(parts, sort_keys=True, default=str))


def _moref(cfg: JobConfig) -> dict:
    import dataclasses

    moref = cfg.answer.moref
    return dataclasses.asdict(moref) if moref.enabled else {"enabled": False}


def _folder_digest(folder: pathlib.Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and (
        p.name.endswith(_WEIGHT_SUFFIXES) or p.name == "config.json"))
    return _files_digest(files, folder)


def _files_digest(files: list[pathlib.Path], root: pathlib.Path | None = None) -> str:
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.relative_to(root) if root else path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            h.update(f.read(_EDGE_BYTES))
            if size > 2 * _EDGE_BYTES:
                f.seek(size - _EDGE_BYTES)
                h.update(f.read(_EDGE_BYTES))
            elif size > _EDGE_BYTES:
                h.update(f.read())
    return h.hexdigest()[:DIGEST_CHARS]


def _hub_revision(model: str) -> str | None:
    """The commit of the hub model's snapshot in the local cache, without the network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # noqa: BLE001 - not a valid hub id (a built-in name), or no hub client: no revision
        return None
    if not isinstance(found, str):
        return None
    parts = pathlib.PurePath(found).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None
