"""`moref-index report` rendered in a real headless browser (Debian's chromium through
chromedriver): every image loads and every plot is there, on a real run's output and on an
output that holds error rows only."""

import pathlib
import shutil

import pyarrow as pa
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from jobs.cli import main
from pipeline.config import OutputConfig
from pipeline.schema import ANSWERS_SCHEMA, Col, empty_answer_row
from pipeline.store.output_store import ANSWERS_DIR, OutputStore

BROWSER_MISSING = ("the report test needs Debian's chromium and chromium-driver "
                   "(`apt-get install -y chromium chromium-driver`; `make test` installs them when run as root)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, BROWSER_MISSING
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def rendered(browser, page: pathlib.Path) -> dict:
    """What the browser made of the page: every image's load state, and the plots per section."""
    browser.get(page.resolve().as_uri())
    return browser.execute_script("""
        const images = Array.from(document.images).map(i => ({ok: i.complete && i.naturalWidth > 0,
            cls: i.className, section: i.closest('section').id}));
        const plots = {};
        for (const s of document.querySelectorAll('section')) plots[s.id] = s.querySelectorAll('img.plot').length;
        return {images: images, plots: plots, thumbs: document.querySelectorAll('figure.thumb img').length,
                external: Array.from(document.querySelectorAll('[src]')).filter(e => !e.src.startsWith('data:')).length,
                text: document.body.innerText};
    """)


def test_report_of_a_real_run(small_run_output, tiny_model_dir, browser, tmp_path, capsys):
    page = tmp_path / "report.html"
    assert main(["report", str(small_run_output), "--out", str(page), "--clip-model", tiny_model_dir["clip"]]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {page}"
    seen = rendered(browser, page)
    assert seen["images"] and all(i["ok"] for i in seen["images"]), seen["images"]
    assert seen["external"] == 0  # self-contained
    # relevance plot per answered video, an RoI frame per question, then cost, stages, errors
    assert seen["plots"]["videos"] == 2 + 2 * 2
    assert sum(i["cls"] == "plot roi" for i in seen["images"]) == 4
    assert seen["thumbs"] == 2 * 2 * 4
    assert seen["plots"]["cost"] == seen["plots"]["stages"] == seen["plots"]["errors"] == 1
    assert "3 video(s) in detail: all." in seen["text"]
    assert "3 videos, 6 answers rows (4 ok, 2 errors)" in seen["text"]


def test_report_samples_videos_and_says_so(small_run_output, browser, tmp_path, capsys):
    page = tmp_path / "report.html"
    assert main(["report", str(small_run_output), "--out", str(page), "--max-videos", "1"]) == 0
    seen = rendered(browser, page)
    assert "1 video(s) in detail: a random sample (seed 0) of 3." in seen["text"]
    # without the CLIP model's directory the relevance plots are replaced by the reason
    assert "CLIP relevance not shown" in seen["text"] or "broken.mp4" in seen["text"]
    assert all(i["ok"] for i in seen["images"])


def test_report_of_an_output_with_error_rows_only(browser, tmp_path, capsys):
    store = OutputStore(OutputConfig(path=str(tmp_path / "out")))
    rows = []
    for i, reason in enumerate(["not_found", "not_found", "timeout", "no_video_stream"]):
        row = empty_answer_row() | {"run_id": "r", "video_id": f"v{i}.mp4", "video_uri": f"/gone/v{i}.mp4",
                                    "question_id": "q", "question": "What?", "status": "error",
                                    Col.ERROR_REASON: reason, Col.ERROR_DETAIL: "detail"}
        rows.append(row)
    store.write_table(pa.Table.from_pylist(rows, schema=ANSWERS_SCHEMA), ANSWERS_DIR, "errors.parquet")
    page = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "out"), "--out", str(page)]) == 0
    seen = rendered(browser, page)
    assert seen["images"] and all(i["ok"] for i in seen["images"])
    assert seen["plots"] == {"runs": 0, "answers": 0, "videos": 0, "cost": 0, "stages": 0, "errors": 1}
    assert "4 videos, 4 answers rows (0 ok, 4 errors)" in seen["text"]
    assert "no answered questions with token and FLOP counts" in seen["text"]
    assert "not_found: detail" in seen["text"]


def answers_shown(browser) -> list[dict]:
    """The answers table's rows the page shows now, as the reader sees them."""
    return browser.execute_script("""
        return Array.from(document.querySelectorAll('#answers-table tbody tr')).filter(r => !r.hidden)
            .map(r => { const c = Array.from(r.cells).map(td => td.innerText);
                        return {video: c[0], question_id: c[1], question: c[2], status: c[3], reason: c[4],
                                said: c[5]}; });
    """)


def test_report_shows_answers_and_filters_them_in_the_page(small_run_output, browser, tmp_path):
    page = tmp_path / "report.html"
    assert main(["report", str(small_run_output), "--out", str(page), "--max-videos", "0"]) == 0
    expected = OutputStore(OutputConfig(path=str(small_run_output))).read_answers().to_pylist()
    browser.get(page.resolve().as_uri())
    shown = answers_shown(browser)
    # every answers row, each answer (or error detail) beside its question, status and reason
    assert sorted((r["video"], r["question_id"]) for r in shown) == sorted(
        (r[Col.VIDEO_ID], r[Col.QUESTION_ID]) for r in expected)
    by_pair = {(r[Col.VIDEO_ID], r[Col.QUESTION_ID]): r for r in expected}
    for row in shown:
        want = by_pair[(row["video"], row["question_id"])]
        assert row["question"] == want[Col.QUESTION] and row["status"] == want[Col.STATUS]
        said = want[Col.ANSWER] if want[Col.STATUS] == "ok" else want[Col.ERROR_DETAIL]
        assert row["said"].split() == (said or "").split()  # the page collapses runs of white space
        assert row["reason"] == (want[Col.ERROR_REASON] or "(none)")

    def counter() -> str:
        return browser.find_element(By.ID, "answers-shown").text

    assert counter() == f"{len(expected)} of {len(expected)} rows shown"
    errors = [r for r in expected if r[Col.STATUS] != "ok"]
    assert errors and len(errors) < len(expected)  # the filter has something to tell apart
    Select(browser.find_element(By.ID, "filter-status")).select_by_value("error")
    assert sorted(r["video"] for r in answers_shown(browser)) == sorted(r[Col.VIDEO_ID] for r in errors)
    assert counter() == f"{len(errors)} of {len(expected)} rows shown"
    reason = errors[0][Col.ERROR_REASON]
    Select(browser.find_element(By.ID, "filter-status")).select_by_value("")
    Select(browser.find_element(By.ID, "filter-reason")).select_by_value(reason)
    assert {r["reason"] for r in answers_shown(browser)} == {reason}
    assert len(answers_shown(browser)) == sum(r[Col.ERROR_REASON] == reason for r in expected)
    Select(browser.find_element(By.ID, "filter-reason")).select_by_value("")
    browser.find_element(By.ID, "filter-question").send_keys("who")
    assert sorted(r["video"] for r in answers_shown(browser)) == sorted(
        r[Col.VIDEO_ID] for r in expected if r[Col.QUESTION_ID] == "who")
    Select(browser.find_element(By.ID, "filter-status")).select_by_value("ok")
    assert all(r["question_id"] == "who" and r["status"] == "ok" for r in answers_shown(browser))
    assert len(answers_shown(browser)) == sum(r[Col.QUESTION_ID] == "who" and r[Col.STATUS] == "ok" for r in expected)
