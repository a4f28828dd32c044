"""The command line itself: --version, help for every argument with its default, the exit codes
in `run --help`, "did you mean" for a mistyped config key, and `status` of a missing output."""

import argparse
import subprocess
import sys
from importlib.metadata import version

import pytest

from jobs.cli import RUN_EXIT_CODES, build_parser, main
from tests.paths import REPO as ROOT

DEMO = str(ROOT / "jobs" / "configs" / "demo.yaml")


def cli(*argv: str) -> subprocess.CompletedProcess:
    """The installed entry point's module in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_version_is_the_installed_package():
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"moref-index {version('moref-index')}"


def subcommands(parser: argparse.ArgumentParser | None = None, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command, nested ones (`cluster start`) included, by its words."""
    found = {}
    for action in (parser or build_parser())._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                found[prefix + name] = command
                found |= subcommands(command, prefix + name + " ")
    return found


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_argument_has_help_and_its_default(name):
    command = subcommands()[name]
    text = command.format_help()
    has_subcommands = any(isinstance(a, argparse._SubParsersAction) for a in command._actions)
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: {action.dest} has no help"
        if action.default not in (None, False, [], argparse.SUPPRESS):
            shown = action.default if not isinstance(action.default, int) else f"{action.default}"
            assert str(shown) in text or f"{action.default:,}" in text, f"{name}: default of {action.dest} not shown"
    assert "--verbose" in text or has_subcommands


def test_run_help_lists_the_exit_codes_and_they_hold(tmp_path):
    text = " ".join(subcommands()["run"].format_help().split())
    for code, what in RUN_EXIT_CODES.items():
        assert f"{code} {' '.join(what.split())}" in text
    # a mistyped key: exit 2, naming the key and the one meant, from --set and from the YAML alike
    done = cli("run", DEMO, "--set", "decode.num_frame=4")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: invalid job config: decode.num_frame: unknown key (did you mean 'num_frames'?)")
    config = tmp_path / "job.yaml"
    config.write_text((ROOT / "jobs" / "configs" / "demo.yaml").read_text().replace("answer:", "anser:"))
    assert main(["run", str(config)]) == 2


def test_did_you_mean_in_yaml(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("input: {videos: '*.mp4'}\nquestions: {prompts: [hi]}\noutput: {pth: out}\n"
                      "answer: {moref: {referencs: 2}}\n")
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "output.pth: unknown key (did you mean 'path'?)" in err
    assert "answer.moref.referencs: unknown key (did you mean 'references'?)" in err
    assert "output.path: Field required" in err


def test_no_suggestion_when_nothing_is_close(tmp_path, capsys):
    assert main(["run", DEMO, "--set", "zzzz=1"]) == 2
    assert capsys.readouterr().err.strip() == "error: invalid job config: zzzz: unknown key"


def test_status_of_a_missing_output_is_one_line(tmp_path):
    done = cli("status", str(tmp_path / "nothing-here"))
    assert done.returncode == 2
    assert done.stdout == ""
    missing = tmp_path / "nothing-here"
    assert done.stderr.strip() == f"error: no job output at {missing}: it holds no answers/ or frames/ or runs/"
