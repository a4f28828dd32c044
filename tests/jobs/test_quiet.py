"""Quiet by default: a run and a search, as a user starts them (a fresh process, stderr a pipe as
in a log), print our own lines and other libraries' warnings only; `--verbose` brings the rest
back. The run's progress lines: the first within 10 s of the start, the counts of every step.
Real tiny models, a real local Ray."""

import datetime
import os
import re
import subprocess
import sys
import time

import pytest

from pipeline.config import OutputConfig
from pipeline.store.output_store import OutputStore
from tests.paths import DEMO_VIDEOS, REPO

# Lines other libraries print at INFO, or that we caused and must not: the loaders of faiss and
# open_clip, transformers' weight bars, Ray's driver and Ray Data's plan, our own deprecated arguments.
NOISE = re.compile(r"INFO root:|faiss\.loader|Loading faiss|swigfaiss|Loading weights|"
                   r"Started a local Ray instance|streaming_executor|ray_remote_args|DeprecationWarning")


def cli(*argv: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env)


def info_lines_not_ours(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " INFO " in line and " moref_index: " not in line]


@pytest.fixture(scope="module")
def quiet_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quiet") / "out"
    started = time.time()
    done = cli("run", str(REPO / "jobs" / "configs" / "demo.yaml"), "--set", f"output.path={out}",
               "--set", f"input.videos={DEMO_VIDEOS}/kinetics_armwrestling.mp4", "--set", "decode.num_frames=4",
               "--set", f"guidance.model={tiny_model_dir['clip']}", "--set", "guidance.frames_per_question=4",
               "--set", f"answer.model={tiny_model_dir['llava']}", "--set", "answer.max_new_tokens=2",
               "--set", "answer.moref.temporal_units=2", "--set", "ray.progress_interval_s=2")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done, started


def test_a_run_prints_our_lines_only(quiet_run):
    _, done, _ = quiet_run
    assert not NOISE.search(done.stderr + done.stdout), [
        line for line in (done.stderr + done.stdout).splitlines() if NOISE.search(line)]
    assert info_lines_not_ours(done.stderr) == []
    assert " moref_index: planned 1 videos" in done.stderr  # our own INFO lines stay
    assert "answered ok:" in done.stdout


def test_search_is_quiet_unless_verbose(quiet_run, tiny_model_dir):
    out, _, _ = quiet_run
    argv = ["search", "a person", "--index", str(out), "--clip-model", tiny_model_dir["clip"],
            "--ann-min-frames", "0", "--min-score", "-1"]
    quiet = cli(*argv)
    assert quiet.returncode == 0, quiet.stderr
    assert "moment(s) from" in quiet.stdout
    assert info_lines_not_ours(quiet.stderr) == [] and not NOISE.search(quiet.stderr), quiet.stderr
    loud = cli(*argv, "--verbose")
    assert loud.returncode == 0 and loud.stdout.splitlines()[0] == quiet.stdout.splitlines()[0]
    # the same command with --verbose shows what the default hides: faiss's loader, open_clip's INFO
    assert info_lines_not_ours(loud.stderr), loud.stderr
    assert "faiss" in loud.stderr


PROGRESS = re.compile(r"^(\S+ \S+) INFO moref_index: progress: (.*)$", re.M)


def test_progress_comes_early_and_counts_every_step(quiet_run):
    out, done, started = quiet_run
    lines = PROGRESS.findall(done.stderr)
    assert len(lines) >= 2, done.stderr[-3000:]
    first = datetime.datetime.strptime(lines[0][0], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert first - started < 10, (lines[0], started)
    final = re.fullmatch(r"listed 1 videos \((\d+) pairs\); decoded 1, embedded 1 videos; answered (\d+)/(\d+) pairs, "
                         r"committed (\d+); 0 errors; [\d.]+ pairs/s, done after \S+", lines[-1][1])
    assert final, lines[-1]
    pairs = OutputStore(OutputConfig(path=str(out))).read_answers().num_rows
    assert [int(n) for n in final.groups()] == [pairs] * 4
    # no step runs backwards from one line to the next
    step = re.compile(r"decoded (\d+), embedded (\d+) videos; answered (\d+)/\d+ pairs, committed (\d+)")
    counts = [[int(n) for n in m.groups()] for _, text in lines if (m := step.search(text))]
    assert all(a <= b for before, after in zip(counts, counts[1:]) for a, b in zip(before, after)), counts


LOAD_BOTH_MODELS = """
import sys
from pipeline.run.quiet import configure_logging
configure_logging(verbose=sys.argv[1] == "verbose")
from transformers import AutoModelForImageTextToText
from pipeline.stages.clip_models import load_clip
AutoModelForImageTextToText.from_pretrained(sys.argv[2])
load_clip(sys.argv[3], None, "cpu")
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_model_loading_bars_and_loader_lines_only_when_verbose(tiny_model_dir, mode):
    """What a Video-LLM or CLIP actor prints loading its model (the same calls, in a process set
    up as the CLI sets up its own and, through the environment, its local Ray's workers)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    done = subprocess.run([sys.executable, "-c", LOAD_BOTH_MODELS, mode, tiny_model_dir["llava"],
                           tiny_model_dir["clip"]], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = ("Loading weights" in done.stderr, "INFO root:" in done.stderr)
    assert shown == ((True, True) if mode == "verbose" else (False, False)), done.stderr[-3000:]
