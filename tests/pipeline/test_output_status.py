"""`moref-index status OUTPUT` on a real run's output: runs, pairs ok and in error by reason,
files, the last run's throughput, all as the output itself holds them."""

import json
import os
import shutil

from jobs.cli import main
from pipeline.config import OutputConfig
from pipeline.run.runner import RunSummary
from pipeline.schema import Col
from pipeline.store.output_store import ANSWERS_DIR, FRAMES_DIR, OutputStore


def test_status_of_a_real_run(small_run_output, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(small_run_output, out)
    store = OutputStore(OutputConfig(path=str(out)))
    answers = store.read_answers(columns=[Col.STATUS, Col.ERROR_REASON]).to_pylist()
    (run,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    # a later run that found nothing to do, written after the first: it is the last one
    later = RunSummary(run_id="a-later-run", output=str(out), videos=3, inputs=6, skipped_done=6, elapsed_s=2.5)
    (out / "runs" / "a-later-run.json").write_text(json.dumps(later.to_dict()))
    first = out / "runs" / f"{run['run_id']}.json"
    os.utime(first, (first.stat().st_mtime - 60,) * 2)

    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out.splitlines()
    ok = sum(r[Col.STATUS] == "ok" for r in answers)
    errors = [r[Col.ERROR_REASON] for r in answers if r[Col.STATUS] != "ok"]
    assert text[0] == f"output {out}"
    assert text[1] == "  runs: 2 (2 complete)"
    assert text[2] == f"  pairs: {len(answers)} ({ok} ok, {len(errors)} error)"
    assert errors and all(f"    {reason}: {errors.count(reason)}" in text for reason in set(errors))
    files = {sub: len(list((out / sub).glob("*.parquet"))) for sub in (ANSWERS_DIR, FRAMES_DIR)}
    assert any(line.startswith(f"  answers files: {files[ANSWERS_DIR]} (") for line in text)
    assert any(line.startswith(f"  frames files: {files[FRAMES_DIR]} (") for line in text)
    assert "  search index: none" in text
    assert text[-1] == "  last run a-later-run: complete, 0 pairs (0 ok, 0 error) in 2.5 s, 0.00 pairs/s"

    # with the first run last, its throughput is the one shown
    later_file = out / "runs" / "a-later-run.json"
    os.utime(later_file, (first.stat().st_mtime - 60,) * 2)
    assert main(["index", str(out)]) == 0
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out.splitlines()
    rate = run["processed"] / run["elapsed_s"]
    assert text[-1] == (f"  last run {run['run_id']}: complete, {run['processed']} pairs ({run['ok']} ok, "
                        f"{run['errors']} error) in {run['elapsed_s']:.1f} s, {rate:.2f} pairs/s")
    frames = store.read_frames().num_rows
    assert f"  search index: {frames} frames" in text
