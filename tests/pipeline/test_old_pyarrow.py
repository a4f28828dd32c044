"""Outputs read back by older readers: pyarrow 14 (the oldest supported; Ray images and Spark bring
their own pyarrow) in a venv of its own, and DuckDB. The venv is made once with pip under .cache/
(about 40 MB; reruns reuse it)."""

import json
import subprocess
import sys

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import OutputConfig
from pipeline.schema import ANSWERS_SCHEMA, STATUS_OK, Col, empty_answer_row
from pipeline.stages.output_rows import FramesWriter, frames_table
from pipeline.store.committer import OutputCommitter
from pipeline.store.output_store import OutputStore
from tests.paths import REPO

OLDEST_PYARROW = "14.0.2"
# pyarrow 14's wheels are built against numpy 1.x and do not import under numpy 2.
OLD_NUMPY = "1.26.4"
VENV = REPO / ".cache" / f"venv-pyarrow-{OLDEST_PYARROW}-numpy-{OLD_NUMPY}"

READ_WITH_OLD_PYARROW = """
import json, pathlib, sys
import pyarrow, pyarrow.dataset as ds, pyarrow.parquet as pq
root = pathlib.Path(sys.argv[1])
out = {"version": pyarrow.__version__, "files": {}, "datasets": {}}
for sub in ("answers", "frames"):
    for path in sorted((root / sub).glob("*.parquet")):
        out["files"][f"{sub}/{path.name}"] = pq.read_table(path).to_pylist()
    out["datasets"][sub] = ds.dataset(str(root / sub), format="parquet").to_table().num_rows
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def old_python():
    python = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"pyarrow=={OLDEST_PYARROW}",
                        f"numpy=={OLD_NUMPY}"], check=True, timeout=900)
        stamp.touch()
    return python


def _answers() -> pa.Table:
    rows = []
    for qid, status, roi in [("q-roi", STATUS_OK, [0.1, 0.2, 0.9, 0.8]), ("q-plain", STATUS_OK, None),
                             ("q-failed", "error", None)]:
        row = empty_answer_row()
        row.update(run_id="r1", video_id="clips/a.mp4", video_uri="/v/clips/a.mp4", question_id=qid,
                   question="What happens?", status=status, model="tiny", frames_decoded=4)
        if status == STATUS_OK:
            row.update(answer="a dog runs", frame_indices=[0, 5, 9], frame_times_s=[0.0, 0.5, 0.9], roi_box=roi,
                       references=2, temporal_units=4, fusion_layer=3, visual_tokens_native=100,
                       visual_tokens_used=50, prompt_tokens=80, output_tokens=3, attn_flops_ratio=0.5,
                       total_flops=1e9, total_flops_native=2e9, decode_s=0.1, guidance_s=0.2, prefill_s=0.3,
                       generate_s=0.4)
        else:
            row.update({Col.ERROR_REASON: "no_video_stream", Col.ERROR_DETAIL: "audio only"})
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=ANSWERS_SCHEMA)


def test_answers_and_frames_read_back_with_pyarrow_14_and_duckdb(tmp_path, old_python):
    cfg = OutputConfig(path=str(tmp_path / "out"))
    video = {Col.VIDEO_ID: "clips/a.mp4", Col.STATUS: STATUS_OK, Col.CLIP_MODEL: "tiny-clip",
             Col.FRAME_EMBEDDINGS: np.eye(4, 8, dtype=np.float32), Col.FRAME_INDICES: np.arange(4) * 3,
             Col.FRAME_TIMES_S: np.arange(4) * 0.25}
    FramesWriter(cfg).write_row(video)  # staged, then committed with the video's answers
    committer = OutputCommitter(OutputStore(cfg), "r1", supersede=False)
    committer.add(_answers())
    committer.close()
    expected = {f"{p.parent.name}/{p.name}": pq.read_table(p).to_pylist()
                for p in sorted((tmp_path / "out").glob("*/*.parquet"))}
    assert len(expected) == 2 and frames_table(video).num_rows == 4

    run = subprocess.run([str(old_python), "-c", READ_WITH_OLD_PYARROW, str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    old = json.loads(run.stdout)
    assert old["version"] == OLDEST_PYARROW
    assert old["files"] == json.loads(json.dumps(expected))  # through JSON both ways: same value types
    assert old["datasets"] == {"answers": 3, "frames": 4}

    boxes = dict(duckdb.sql(f"SELECT question_id, roi_box FROM '{tmp_path}/out/answers/*.parquet'").fetchall())
    assert boxes["q-plain"] is None and boxes["q-failed"] is None
    assert boxes["q-roi"] == pytest.approx([0.1, 0.2, 0.9, 0.8])
