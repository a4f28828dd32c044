"""`moref-index report`: one self-contained HTML page about an output (answers, frames, runs).

Sections: the runs and their throughput; every answer beside its question with status and reason,
filtered in the page (`pipeline.readers.report_answers`); for a few videos (chosen, or a seeded random sample on a
large output, which the page says), each question's CLIP relevance over time with the frames the
Video-LLM saw marked, thumbnails of those frames and the RoI box drawn on one of them; visual
tokens and FLOPs spent against native per answer; seconds per stage; error reasons.

Every image is a PNG embedded as base64, so the page opens anywhere with no other file.
Thumbnails are re-decoded from `video_uri` at the answer's `frame_times_s` with the pipeline's
own PyAV decode path (same resize as the model saw; nothing extra is stored by the run); a video
that cannot be read any more gets a note instead. Relevance needs the CLIP model that embedded the
frames (`pipeline.readers.search.QueryEncoder`); without it the page says so and shows the rest.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DecodeConfig, StorageConfig
from pipeline.readers.report_answers import answers_table_html
from pipeline.readers.search import FrameRows, FramesIndex, QueryEncoder, SearchError, the_clip_model
from pipeline.schema import STATUS_OK, Col
from pipeline.store.output_store import ANSWERS_DIR, FRAMES_DIR

log = logging.getLogger("moref_index")

DEFAULT_MAX_VIDEOS = 6
THUMBNAILS_PER_QUESTION = 8
THUMBNAIL_SIZE = 128
MAX_SCATTER_POINTS = 5000  # beyond this, per-answer plots show a random sample (and say so)
STAGES = (Col.DECODE_S, Col.GUIDANCE_S, Col.PREFILL_S, Col.GENERATE_S)
PER_VIDEO_STAGES = (Col.DECODE_S, Col.GUIDANCE_S)  # recorded once per video, repeated on its rows
REPORT_COLUMNS = (Col.VIDEO_ID, Col.VIDEO_URI, Col.QUESTION_ID, Col.QUESTION, Col.STATUS, Col.ERROR_REASON,
                  Col.ERROR_DETAIL, Col.ANSWER,
                  Col.FRAME_TIMES_S, Col.ROI_BOX, Col.VISUAL_TOKENS_NATIVE, Col.VISUAL_TOKENS_USED, Col.TOTAL_FLOPS,
                  Col.TOTAL_FLOPS_NATIVE,
                  *STAGES)


@dataclasses.dataclass
class Section:
    title: str
    html: str
    css_id: str


def _png(fig) -> str:
    """A matplotlib figure as an <img> with the PNG inline; closes the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img class="plot" alt="plot" src="data:image/png;base64,{data}">'


def _thumbnail(frame: np.ndarray, caption: str) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE)).save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<figure class="thumb"><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _figure(width: float = 8.0, height: float = 3.0, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")  # headless: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), squeeze=False)


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


# ------------------------------------------------------------------------------------- frames


def decode_at(uri: str, times_s: Sequence[float], storage: StorageConfig, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """Frames (T, size, size, 3) of a video at the given times, with the pipeline's PyAV decoder."""
    import fsspec

    from pipeline.stages.decode.backend import Limits
    from pipeline.stages.decode.pyav_backend import PyAVBackend
    from pipeline.stages.decode.source import open_source

    cfg = DecodeConfig(frame_size=size)
    backend = PyAVBackend(size)
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    with open_source(uri, storage.fsspec_options(protocol), cfg.max_bytes, local_path=False) as src:
        info = backend.probe(src, Limits.from_config(cfg))
        return backend.read(src, np.asarray(sorted(times_s), np.float64), info).frames


# ------------------------------------------------------------------------------------ sections


def runs_section(store) -> Section:
    runs = store.run_records()
    if not runs:
        return Section("Runs", _note("no run summaries under runs/"), "runs")
    rows = []
    for r in sorted(runs, key=lambda r: (str(r.get("run_id")), int(r.get("attempt") or 1))):
        elapsed = float(r.get("elapsed_s") or 0.0)
        processed = int(r.get("processed") or 0)
        rate = f"{processed / elapsed:.2f}" if elapsed > 0 else "-"
        cells = [r.get("run_id"), r.get("status"), r.get("videos"), processed, r.get("ok"), r.get("errors"),
                 f"{elapsed:.1f}", rate]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in
                   ("run", "status", "videos", "answers", "ok", "errors", "seconds", "answers / s"))
    return Section("Runs and throughput", f"<table><tr>{head}</tr>{''.join(rows)}</table>", "runs")


def _sample(n: int, k: int) -> np.ndarray:
    return np.sort(np.random.default_rng(0).choice(n, size=k, replace=False)) if n > k else np.arange(n)


def answers_section(answers: pa.Table) -> Section:
    table, note = answers_table_html(answers)
    return Section("Answers", _note(note) + table, "answers")


def cost_section(answers: pa.Table) -> Section:
    ok = answers.filter(pc.equal(answers.column(Col.STATUS), STATUS_OK))
    cols = (Col.VISUAL_TOKENS_USED, Col.VISUAL_TOKENS_NATIVE, Col.TOTAL_FLOPS, Col.TOTAL_FLOPS_NATIVE)
    values = {c: np.asarray(ok.column(c).to_pylist(), dtype=float) for c in cols}
    known = np.all([np.isfinite(v) for v in values.values()], axis=0) if len(ok) else np.zeros(0, bool)
    if not known.any():
        return Section("Tokens and FLOPs", _note("no answered questions with token and FLOP counts"), "cost")
    values = {c: v[known] for c, v in values.items()}
    pick = _sample(len(values[Col.TOTAL_FLOPS]), MAX_SCATTER_POINTS)
    fig, axes = _figure(10, 4, ncols=2)
    for ax, (used, native, label) in zip(axes[0], [(Col.VISUAL_TOKENS_USED, Col.VISUAL_TOKENS_NATIVE, "visual tokens"),
                                                   (Col.TOTAL_FLOPS, Col.TOTAL_FLOPS_NATIVE, "FLOPs")]):
        x, y = values[native][pick], values[used][pick]
        ax.scatter(x, y, s=12, alpha=0.6, label="answers")
        top = float(max(x.max(), y.max()))
        ax.plot([0, top], [0, top], "k--", lw=1, label="native = spent")
        ax.set_xlabel(f"{label}, native")
        ax.set_ylabel(f"{label}, spent")
        ax.set_title(f"{label} per answer")
        ax.legend(loc="upper left")
    saved = 1 - values[Col.TOTAL_FLOPS].sum() / values[Col.TOTAL_FLOPS_NATIVE].sum()
    tokens_saved = 1 - values[Col.VISUAL_TOKENS_USED].sum() / values[Col.VISUAL_TOKENS_NATIVE].sum()
    text = (f"{known.sum()} answers: {saved:.1%} of the native FLOPs saved, "
            f"{tokens_saved:.1%} of the native visual tokens.")
    if len(pick) < known.sum():
        text += f" Plots show a random sample of {len(pick)} answers."
    return Section("Tokens and FLOPs", _note(text) + _png(fig), "cost")


def stages_section(answers: pa.Table) -> Section:
    totals = {}
    per_video = answers.group_by(Col.VIDEO_ID).aggregate([(s, "max") for s in PER_VIDEO_STAGES])
    for stage in STAGES:
        column = per_video.column(f"{stage}_max") if stage in PER_VIDEO_STAGES else answers.column(stage)
        totals[stage.removesuffix("_s")] = float(np.nansum(np.asarray(column.to_pylist(), dtype=float)))
    if not any(totals.values()):
        return Section("Time per stage", _note("no stage timings recorded (no video got past decoding)"), "stages")
    fig, axes = _figure(7, 3)
    ax = axes[0][0]
    ax.barh(list(totals), list(totals.values()), color="tab:blue")
    ax.set_xlabel("seconds, summed over the output (decode and guidance once per video)")
    ax.set_title("time per stage")
    return Section("Time per stage", _png(fig), "stages")


def errors_section(answers: pa.Table) -> Section:
    errors = [reason or "unknown" for s, reason in zip(answers.column(Col.STATUS).to_pylist(),
                                                       answers.column(Col.ERROR_REASON).to_pylist()) if s != STATUS_OK]
    if not errors:
        return Section("Errors", _note(f"no errors in {answers.num_rows} answers"), "errors")
    reasons, counts = np.unique(errors, return_counts=True)
    order = np.argsort(counts)
    fig, axes = _figure(7, 0.6 + 0.35 * len(reasons))
    ax = axes[0][0]
    ax.barh(reasons[order], counts[order], color="tab:red")
    ax.set_xlabel("answers rows")
    ax.set_title(f"error reasons ({len(errors)} of {answers.num_rows} rows)")
    return Section("Errors", _png(fig), "errors")


# ----------------------------------------------------------------------------------- per video


def _relevance_encoder(frames_index: FramesIndex, video_ids: list[str], clip_model, clip_pretrained):
    """The CLIP text encoder of the frames, or (None, why not)."""
    try:
        recorded = the_clip_model(frames_index.models(video_ids))
        return QueryEncoder.load(recorded, frames_index.embedding_dim(), clip_model, clip_pretrained), None
    except SearchError as exc:
        return None, f"CLIP relevance not shown: {exc}"


def video_section(video_id: str, rows: list[dict], frames: FrameRows | None, encoder, why_no_relevance: str | None,
                  storage: StorageConfig) -> str:
    parts = [f'<div class="video"><h3>{html.escape(video_id)}</h3>']
    answered = [r for r in rows if r[Col.STATUS] == STATUS_OK]
    for r in rows:
        if r[Col.STATUS] != STATUS_OK:
            parts.append(_note(f"{r[Col.QUESTION_ID]}: {r[Col.ERROR_REASON]}: {r[Col.ERROR_DETAIL]}"))
    if not answered:
        return "".join(parts) + "</div>"
    if frames is not None and encoder is not None:
        order = np.argsort(frames.times_s)
        times, emb = frames.times_s[order], frames.embeddings[order]
        fig, axes = _figure(9, 3.2)
        ax = axes[0][0]
        for r in answered:
            score = emb @ encoder(r[Col.QUESTION])
            line, = ax.plot(times, score, label=f"{r[Col.QUESTION_ID]}: {r[Col.QUESTION][:50]}")
            chosen = np.asarray(r[Col.FRAME_TIMES_S] or [], float)
            at = np.searchsorted(times, chosen).clip(0, len(times) - 1)
            ax.scatter(chosen, score[at], color=line.get_color(), marker="o", s=28, zorder=3)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("CLIP relevance (cosine)")
        ax.set_title("relevance over time; dots: frames the Video-LLM saw")
        ax.legend(fontsize=7, loc="best")
        parts.append(_png(fig))
    else:
        parts.append(_note(why_no_relevance or "no frame embeddings for this video"))
    parts.append(_thumbnails(answered, storage))
    return "".join(parts) + "</div>"


def _thumbnails(answered: list[dict], storage: StorageConfig) -> str:
    wanted = {}
    for r in answered:
        times = list(r[Col.FRAME_TIMES_S] or [])
        wanted[r[Col.QUESTION_ID]] = [times[i] for i in np.unique(
            np.linspace(0, len(times) - 1, min(THUMBNAILS_PER_QUESTION, len(times))).astype(int))] if times else []
    all_times = sorted({t for ts in wanted.values() for t in ts})
    if not all_times:
        return ""
    try:
        frames = decode_at(answered[0][Col.VIDEO_URI], all_times, storage)
    except Exception as exc:  # noqa: BLE001 - the page still renders without the pictures
        return _note(f"thumbnails not shown: cannot decode {answered[0][Col.VIDEO_URI]}: {type(exc).__name__}: {exc}")
    by_time = dict(zip(all_times, frames))
    out = []
    for r in answered:
        times = [t for t in wanted[r[Col.QUESTION_ID]] if t in by_time]
        out.append(f'<div class="strip"><p>{html.escape(r[Col.QUESTION_ID])}: {html.escape(r[Col.QUESTION])} '
                   f'<span class="answer">&rarr; {html.escape(r[Col.ANSWER] or "")}</span></p>')
        out.extend(_thumbnail(by_time[t], f"{t:.1f} s") for t in times)
        if r[Col.ROI_BOX] is not None and times:
            out.append(_roi_plot(by_time[times[len(times) // 2]], r[Col.ROI_BOX], times[len(times) // 2]))
        out.append("</div>")
    return "".join(out)


def _roi_plot(frame: np.ndarray, box: Sequence[float], time_s: float) -> str:
    from matplotlib.patches import Rectangle

    fig, axes = _figure(3, 3)
    ax = axes[0][0]
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = box
    ax.imshow(frame)
    ax.add_patch(Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h, fill=False, lw=2, color="yellow"))
    ax.set_title(f"RoI at {time_s:.1f} s", fontsize=9)
    ax.axis("off")
    return _png(fig).replace('class="plot"', 'class="plot roi"')


# -------------------------------------------------------------------------------------- report


def build_report(output: str, storage: StorageConfig | None = None, video_ids: Sequence[str] | None = None,
                 max_videos: int = DEFAULT_MAX_VIDEOS, clip_model: str | None = None,
                 clip_pretrained: str | None = None) -> str:
    """The report's HTML."""
    storage = storage or StorageConfig()
    frames_index = FramesIndex(output, storage)
    store = frames_index.store
    store.require(ANSWERS_DIR, FRAMES_DIR)  # OutputNotFoundError before any page is written
    answers = store.read_answers(columns=list(REPORT_COLUMNS))
    all_videos = sorted(set(answers.column(Col.VIDEO_ID).to_pylist()))
    if video_ids:
        chosen, how = [v for v in video_ids if v in all_videos], "chosen"
    else:
        chosen = [all_videos[i] for i in _sample(len(all_videos), max_videos)]
        how = "all" if len(chosen) == len(all_videos) else f"a random sample (seed 0) of {len(all_videos)}"
    sections = [runs_section(store), answers_section(answers)]
    detail = [_note(f"{len(chosen)} video(s) in detail: {how}.")]
    if chosen:
        table = answers.filter(pc.is_in(answers.column(Col.VIDEO_ID), pa.array(chosen, pa.string())))
        rows = table.to_pylist()
        encoder, why = _relevance_encoder(frames_index, chosen, clip_model, clip_pretrained)
        frames_table = frames_index.read(chosen)
        for vid in chosen:
            vid_frames = frames_table.filter(pc.equal(frames_table.column(Col.VIDEO_ID), vid))
            frames = FrameRows.from_table(vid_frames) if vid_frames.num_rows else None
            video_rows = [r for r in rows if r[Col.VIDEO_ID] == vid]
            detail.append(video_section(vid, video_rows, frames, encoder, why, storage))
    sections.append(Section("Videos", "".join(detail), "videos"))
    sections += [cost_section(answers), stages_section(answers), errors_section(answers)]
    ok = sum(s == STATUS_OK for s in answers.column(Col.STATUS).to_pylist())
    summary = (f"{len(all_videos)} videos, {answers.num_rows} answers rows "
               f"({ok} ok, {answers.num_rows - ok} errors)")
    return _page(output, summary, sections)


def _page(output: str, summary: str, sections: list[Section]) -> str:
    body = "".join(f'<section id="{s.css_id}"><h2>{html.escape(s.title)}</h2>{s.html}</section>' for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>moref-index report: {html.escape(output)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
.note {{ color: #555; }} .thumb {{ display: inline-block; margin: 2px; font-size: 11px; text-align: center; }}
.video {{ border-top: 1px solid #ddd; margin-top: 1em; }} img.plot {{ max-width: 100%; }}
table.answers td {{ text-align: left; vertical-align: top; }} .answer {{ font-weight: bold; }}
</style></head><body>
<h1>moref-index report</h1><p>{html.escape(output)}: {html.escape(summary)}</p>
{body}
</body></html>
"""


def write_report(output: str, out_path: str, **kwargs) -> str:
    import pathlib

    page = build_report(output, **kwargs)
    path = pathlib.Path(out_path)
    path.write_text(page, encoding="utf-8")
    return str(path)
