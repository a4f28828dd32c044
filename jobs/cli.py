"""The `moref-index` command line; also the entry point for `ray job submit`.

    moref-index run CONFIG.yaml [--set key.path=value ...]
    moref-index convert SRC_LLAVA_NEXT_DIR DST_HF_DIR
    moref-index tiny-models DIR
    moref-index import-questions --format videomme|mlvu|longvideobench SRC... --out SET.jsonl
    moref-index score OUTPUT --questions SET.jsonl [--compare OTHER_OUTPUT] [--json] [--endpoint-url URL]
    moref-index search "TEXT" --index OUTPUT [--top-k 20] [--json]
    moref-index index OUTPUT [--rebuild]
    moref-index report OUTPUT [--out report.html]
    moref-index compact OUTPUT [--target-mb 128]
    moref-index status OUTPUT
    moref-index cluster start [--num-cpus N] [--shell] | cluster stop HEAD_DIR
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import yaml

# What `moref-index run` exits with (listed in `run --help`).
RUN_EXIT_CODES = {
    0: "the run finished (pairs in error included: each has its row and reason)",
    1: "the run failed (a traceback says why); a rerun resumes",
    2: "a bad job config (the message names the key), or stages that can never be scheduled",
    3: "the output is in use by another run (its lease is held)",
}


def _parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key.path=value, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def cmd_run(args) -> int:
    from pipeline.config import ConfigError, load_job_config
    from pipeline.run.resources import UnschedulableError
    from pipeline.run.runner import run_job
    from pipeline.store.output_lock import OutputLockedError

    try:
        cfg = load_job_config(args.config, _parse_overrides(args.set))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_job(cfg)
    except UnschedulableError as exc:
        print(f"error: the job can never be scheduled: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # found once the config meets its inputs (files, globs, models)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OutputLockedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(summary.render())
    _update_search_index(cfg.output.path, cfg.output.storage)
    if args.show:
        _show_answers(cfg, args.show)
    if args.summary_json:
        pathlib.Path(args.summary_json).write_text(json.dumps(summary.to_dict(), indent=2))
    return 0


def cmd_plan(args) -> int:
    """Videos listed, pairs pending (changed, retried), skipped as done, models, resources and an
    estimate: the run's own planning and checks, with no lease taken and nothing written."""
    from pipeline.config import load_job_config
    from pipeline.run.preview import preview_job

    preview = preview_job(load_job_config(args.config, _parse_overrides(args.set)))  # ConfigError: exit 2
    print(preview.render())
    return 0 if preview.placeable else 2


def _show_answers(cfg, n: int) -> None:
    from pipeline.schema import Col
    from pipeline.store.output_store import OutputStore

    rows = OutputStore(cfg.output).read_answers(
        columns=[Col.VIDEO_ID, Col.QUESTION_ID, Col.STATUS, Col.ANSWER, Col.ERROR_REASON, Col.ERROR_DETAIL,
                 Col.REFERENCES, Col.VISUAL_TOKENS_USED]
    ).slice(0, n).to_pylist()
    print(f"first {len(rows)} answers rows:")
    for r in rows:
        text = r[Col.ANSWER] if r[Col.STATUS] == "ok" else f"<{r[Col.ERROR_REASON]}: {r[Col.ERROR_DETAIL]}>"
        print(f"  {r[Col.VIDEO_ID]} / {r[Col.QUESTION_ID]} [{r[Col.STATUS]}, N={r[Col.REFERENCES]}, "
              f"visual tokens {r[Col.VISUAL_TOKENS_USED]}]: {text!r}"[:160])


def _update_search_index(output: str, storage) -> None:
    """Add a run's new frames to the output's approximate search index, when it has one."""
    from pipeline.readers.search import FramesIndex
    from pipeline.readers.vector_index import VectorIndex

    index = VectorIndex(FramesIndex(output, storage))
    if index.exists():
        state = index.sync()
        print(f"search index: {state['frames']} frames")


def _storage(args):
    from pipeline.config import StorageConfig

    return StorageConfig(endpoint_url=args.endpoint_url)


def _equals_pairs(pairs: list[str]) -> dict[str, str]:
    where = {}
    for pair in pairs:
        column, sep, value = pair.partition("=")
        if not sep or not column:
            raise SystemExit(f"--where expects COLUMN=VALUE, got {pair!r}")
        where[column] = value
    return where


def cmd_search(args) -> int:
    from pipeline.readers.search import SearchError, manifest_video_ids, render_moments, search_text

    storage = _storage(args)
    video_ids = list(args.video_id) or None
    if args.where and not args.manifest:
        raise SystemExit("--where needs --manifest (the file whose columns it filters)")
    try:
        if args.manifest:
            chosen = manifest_video_ids(args.manifest, _equals_pairs(args.where), storage)
            video_ids = [v for v in chosen if video_ids is None or v in video_ids]
        result = search_text(args.text, args.index, storage=storage, top_k=args.top_k, min_score=args.min_score,
                             video_ids=video_ids, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                             ann_min_frames=args.ann_min_frames, update_index=not args.no_index_update)
    except SearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"query": args.text, "clip_model": result.clip_model, "method": result.method,
                          "frames_searched": result.frames_searched,
                          "moments": [m.to_dict() for m in result.moments]}, indent=2))
    else:
        print(render_moments(result))
    return 0


def cmd_index(args) -> int:
    from pipeline.readers.search import FramesIndex
    from pipeline.readers.vector_index import VectorIndex
    from pipeline.store.commit_log import CommitLog
    from pipeline.store.output_store import FRAMES_DIR

    frames = FramesIndex(args.output, _storage(args))
    frames.store.require(FRAMES_DIR)
    state = VectorIndex(frames).sync(rebuild=args.rebuild)
    videos = len(set(CommitLog(frames.store).record(FRAMES_DIR, save=False).column("video_id").to_pylist()))
    print(f"search index: {state['frames']} frames of {videos} videos in {state['nlist']} lists")
    return 0


def cmd_report(args) -> int:
    from pipeline.readers.report import write_report

    path = write_report(args.output, args.out, storage=_storage(args), video_ids=list(args.video) or None,
                        max_videos=args.max_videos, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained)
    print(f"wrote {path}")
    return 0


def cmd_compact(args) -> int:
    from pipeline.config import OutputConfig
    from pipeline.store.compact import compact
    from pipeline.store.output_lock import OutputLockedError
    from pipeline.store.output_store import OutputStore

    store = OutputStore(OutputConfig(path=args.output, storage=_storage(args)))
    try:
        result = compact(store, target_mb=args.target_mb)
    except OutputLockedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for sub in result.files_before:
        print(f"{sub}: {result.files_before[sub]} -> {result.files_after[sub]} files "
              f"({result.rows[sub]} rows rewritten)")
    return 0


def cmd_status(args) -> int:
    from pipeline.readers.output_status import output_status

    print(output_status(args.output, _storage(args)).render())  # no output: OutputNotFoundError, exit 2 in main
    return 0


def cmd_cluster_start(args) -> int:
    from jobs.local_cluster import HeadError, start_head

    try:
        head = start_head(num_cpus=args.num_cpus)
    except HeadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(head.shell_variables() if args.shell else head.describe())
    return 0


def cmd_cluster_stop(args) -> int:
    from jobs.local_cluster import HeadError, LocalHead

    try:
        head = LocalHead.load(args.head_dir)
    except HeadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"stopped the Ray head of {args.head_dir} ({head.stop()} processes)")
    return 0


def cmd_convert(args) -> int:
    from freemoref.convert import convert_llava_next_checkpoint

    out = convert_llava_next_checkpoint(args.src, args.dst, vision_config_dir=args.vision_config, dtype=args.dtype)
    print(f"wrote HF LlavaOnevision checkpoint to {out}")
    return 0


def build_tiny_models(root: pathlib.Path) -> dict[str, str]:
    """Tiny random models for the demo and tests, built offline once and reused."""
    from freemoref.tiny import build_tiny_llava_onevision, build_tiny_qwen2_5_vl, build_tiny_qwen3_vl
    from pipeline.stages.clip_models import build_tiny_clip

    paths = {"llava": root / "tiny-llava-onevision", "clip": root / "tiny-clip",
             "qwen2_5_vl": root / "tiny-qwen2_5_vl", "qwen3_vl": root / "tiny-qwen3_vl"}
    if not (paths["llava"] / "config.json").exists():
        build_tiny_llava_onevision(str(paths["llava"]))
    if not (paths["qwen2_5_vl"] / "config.json").exists():
        build_tiny_qwen2_5_vl(str(paths["qwen2_5_vl"]))
    if not (paths["qwen3_vl"] / "config.json").exists():
        build_tiny_qwen3_vl(str(paths["qwen3_vl"]))
    if not paths["clip"].exists() or not any(paths["clip"].iterdir()):
        build_tiny_clip(str(paths["clip"]))
    return {name: str(path) for name, path in paths.items()}


def cmd_tiny_models(args) -> int:
    for name, path in build_tiny_models(pathlib.Path(args.dir)).items():
        print(f"{name}: {path}")
    return 0


def cmd_import_questions(args) -> int:
    from pipeline.readers.benchmark import IMPORTERS, write_benchmark

    options = {"video_suffix": args.video_suffix} if args.format == "videomme" else {}
    questions = IMPORTERS[args.format](args.src, **options)
    if not questions:
        print(f"error: no multiple-choice questions in {args.src}", file=sys.stderr)
        return 2
    out = write_benchmark(questions, args.out)
    videos = len({q.video_id for q in questions})
    print(f"wrote {len(questions)} questions about {videos} videos to {out}")
    return 0


def cmd_score(args) -> int:
    from pipeline.config import ConfigError
    from pipeline.readers.benchmark import read_benchmark
    from pipeline.readers.scoring import render_comparison, render_score, score_output

    try:
        questions = read_benchmark(args.questions)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    scores = [score_output(path, questions, _storage(args))
              for path in [args.output] + ([args.compare] if args.compare else [])]
    if args.json:
        print(json.dumps(scores[0] if len(scores) == 1 else {"runs": scores}, indent=2))
    else:
        print(render_score(scores[0]) if len(scores) == 1 else render_comparison(*scores))
    return 0


def _model_args(parser) -> None:
    parser.add_argument("--clip-model", help="the CLIP model the frames were embedded with, when not loadable by "
                        "its recorded name (a local open_clip directory, or a model name)")
    parser.add_argument("--clip-pretrained", help="with a model name: its pretrained tag or weights file")


def _storage_args(parser) -> None:
    parser.add_argument("--endpoint-url", help="object store endpoint (MinIO, Ceph, R2); credentials come from "
                        "the environment")


class _HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help, unless it has none or the help gives it; epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moref-index")
    except PackageNotFoundError:  # run from a checkout that was never installed (`python -m jobs.cli`)
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/infra parses the KubeRay entrypoints with it)."""
    parser = argparse.ArgumentParser(prog="moref-index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    exit_codes = "exit codes:\n" + "\n".join(f"  {code}  {what}" for code, what in RUN_EXIT_CODES.items())
    run = sub.add_parser("run", help="run a job config (YAML)", epilog=exit_codes)
    run.add_argument("config", help="the job config (YAML); relative paths in it resolve against its folder")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--summary-json", help="also write the run summary to this file")
    run.add_argument("--show", type=int, default=0, metavar="N", help="print N rows of the answers table")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="what a run of a job config would do, without doing it", epilog=exit_codes)
    plan.add_argument("config", help="the job config (YAML), as for run")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    plan.set_defaults(func=cmd_plan)

    convert = sub.add_parser("convert", help="convert a LLaVA-NeXT LLaVA-Video checkpoint to HF LlavaOnevision")
    convert.add_argument("src", help="the LLaVA-NeXT checkpoint folder (e.g. LLaVA-Video-7B-Qwen2)")
    convert.add_argument("dst", help="the folder to write the HF LlavaOnevision checkpoint to")
    convert.add_argument("--vision-config", help="dir with the SigLIP config, if not derivable from src")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                         help="the weights' dtype in dst (default: as stored in src)")
    convert.set_defaults(func=cmd_convert)

    tiny = sub.add_parser("tiny-models", help="build the tiny offline models used by the demo")
    tiny.add_argument("dir", help="where to build them (reused when already there)")
    tiny.set_defaults(func=cmd_tiny_models)

    importer = sub.add_parser("import-questions",
                              help="convert benchmark annotations into a multiple-choice question set")
    importer.add_argument("--format", required=True, choices=["videomme", "mlvu", "longvideobench"],
                          help="the benchmark whose annotations these are")
    importer.add_argument("src", nargs="+", help="annotation files (.json, .jsonl or .parquet)")
    importer.add_argument("--out", "-o", required=True, help="the question set to write (.jsonl or .parquet)")
    importer.add_argument("--video-suffix", default=".mp4", help="videomme: appended to videoID to make video_id")
    importer.set_defaults(func=cmd_import_questions)

    score = sub.add_parser("score", help="accuracy of a run's answers against a multiple-choice benchmark file")
    score.add_argument("output", help="the job's output.path (local or URL)")
    score.add_argument("--questions", required=True, help="the question set (.jsonl or .parquet)")
    score.add_argument("--compare", metavar="OTHER_OUTPUT", help="a second run's output.path, shown side by side")
    score.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _storage_args(score)
    score.set_defaults(func=cmd_score)

    search = sub.add_parser("search", help="text search over the frames of an output: the best matching moments")
    search.add_argument("text", help="what to look for, in words")
    search.add_argument("--index", required=True, metavar="OUTPUT", help="the job's output path (local or URL)")
    search.add_argument("--top-k", type=int, default=20, help="moments to print (default 20)")
    search.add_argument("--min-score", type=float, default=0.2,
                        help="a frame matches at this cosine similarity or more (default 0.2, for OpenAI CLIP)")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--video-id", action="append", default=[], help="search only this video (repeatable)")
    search.add_argument("--manifest", help="a manifest (.parquet/.jsonl/.csv) whose columns --where filters")
    search.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                        help="search only the manifest's videos with this value (repeatable: all must hold)")
    search.add_argument("--ann-min-frames", type=int, default=1_000_000,
                        help="search through the approximate index from this many frames (default 1,000,000)")
    search.add_argument("--no-index-update", action="store_true",
                        help="use the approximate index as it is, without adding new frames first")
    _model_args(search)
    _storage_args(search)
    search.set_defaults(func=cmd_search)

    index = sub.add_parser("index", help="build or update the approximate search index of an output")
    index.add_argument("output", help="the job's output path (local or URL)")
    index.add_argument("--rebuild", action="store_true", help="retrain from scratch instead of adding new frames")
    _storage_args(index)
    index.set_defaults(func=cmd_index)

    report = sub.add_parser("report", help="a self-contained HTML report of an output")
    report.add_argument("output", help="the job's output path (local or URL)")
    report.add_argument("--out", default="report.html", help="the HTML file to write")
    report.add_argument("--video", action="append", default=[], help="a video to show in detail (repeatable)")
    report.add_argument("--max-videos", type=int, default=6, help="videos shown in detail when none are chosen")
    _model_args(report)
    _storage_args(report)
    report.set_defaults(func=cmd_report)

    compact = sub.add_parser("compact", help="rewrite an output's small answers and frames files into large ones")
    compact.add_argument("output", help="the job's output path (local or URL)")
    compact.add_argument("--target-mb", type=float, help="file size to pack up to (default output.target_file_mb)")
    _storage_args(compact)
    compact.set_defaults(func=cmd_compact)

    status = sub.add_parser("status", help="what an output holds: runs, pairs ok and in error by reason, files, "
                            "the last run's throughput")
    status.add_argument("output", help="the job's output path (local or URL)")
    _storage_args(status)
    status.set_defaults(func=cmd_status)

    cluster = sub.add_parser("cluster", help="a Ray head of its own on this machine (own temp dir, free ports, "
                             "own token) for ray job submit, and its stop")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="start|stop",
                                         help="start a head, or stop one")
    start = cluster_sub.add_parser("start", help="start a head; print its address and the ray job submit line",
                                   formatter_class=_HelpWithDefaults)
    start.add_argument("--num-cpus", type=int, help="logical CPUs of the head (default: the machine's)")
    start.add_argument("--shell", action="store_true",
                       help="print HEAD_DIR, HEAD_ADDRESS, HEAD_TOKEN and HEAD_METRICS as shell assignments (for eval)")
    start.set_defaults(func=cmd_cluster_start)
    stop = cluster_sub.add_parser("stop", help="stop the head of HEAD_DIR (only it) and delete HEAD_DIR",
                                  formatter_class=_HelpWithDefaults)
    stop.add_argument("head_dir", metavar="HEAD_DIR", help="the folder `cluster start` printed")
    stop.set_defaults(func=cmd_cluster_stop)
    for command in (start, stop):
        command.add_argument("-v", "--verbose", action="store_true", help="also log other libraries' INFO lines")

    for command in sub.choices.values():
        command.formatter_class = _HelpWithDefaults
        if command is cluster:
            continue  # its start and stop take --verbose
        command.add_argument("-v", "--verbose", action="store_true",
                             help="also log other libraries' INFO lines and model-loading progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a command. A user's mistake (a config error, a path that holds no output) is one
    `error:` line and exit status 2, never a traceback."""
    from pipeline.config import ConfigError
    from pipeline.run.quiet import configure_logging
    from pipeline.store.output_store import OutputNotFoundError

    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        return args.func(args)
    except (ConfigError, OutputNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
