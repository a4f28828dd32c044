"""The report's answers table: every question beside its answer, status and reason, filtered in the
page itself (status, reason, question id) by a few lines of inline script: no server, no other file.

Each row carries its filter values as data attributes; the controls list the values the table
holds. A large output shows its first `MAX_ANSWER_ROWS` rows (by video, then question) and says so:
the page stays small enough to open, and the filters apply to the rows shown.
"""

from __future__ import annotations

import html

import pyarrow as pa

from pipeline.schema import STATUS_OK, Col

MAX_ANSWER_ROWS = 5000
ANSWER_TABLE_COLUMNS = (Col.VIDEO_ID, Col.QUESTION_ID, Col.QUESTION, Col.STATUS, Col.ERROR_REASON, Col.ERROR_DETAIL,
                        Col.ANSWER)
NO_REASON = "(none)"  # the reason filter's value for rows without one (answered rows)

# Rows stay in the page and are hidden or shown; the counter says how many match.
_FILTER_SCRIPT = """
<script>
(function () {
  const table = document.getElementById('answers-table');
  const controls = ['filter-status', 'filter-reason', 'filter-question'].map(id => document.getElementById(id));
  const shown = document.getElementById('answers-shown');
  function apply() {
    const [status, reason, question] = controls.map(c => c.value.trim());
    let n = 0;
    for (const row of table.tBodies[0].rows) {
      const keep = (!status || row.dataset.status === status) && (!reason || row.dataset.reason === reason)
        && (!question || row.dataset.question === question);
      row.hidden = !keep;
      n += keep ? 1 : 0;
    }
    shown.textContent = n + ' of ' + table.tBodies[0].rows.length + ' rows shown';
  }
  for (const c of controls) { c.addEventListener('input', apply); c.addEventListener('change', apply); }
  apply();
})();
</script>
"""


def _options(values: list[str], with_all: bool = True) -> str:
    return ('<option value="">all</option>' if with_all else "") + "".join(
        f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in sorted(set(values)))


def answers_table_html(answers: pa.Table) -> tuple[str, str]:
    """(the section's HTML, a note on what it shows) for the answers rows of an output."""
    total = answers.num_rows
    table = answers.select(list(ANSWER_TABLE_COLUMNS)).sort_by([(Col.VIDEO_ID, "ascending"),
                                                                (Col.QUESTION_ID, "ascending")])
    rows = table.slice(0, MAX_ANSWER_ROWS).to_pylist()
    body = []
    for r in rows:
        reason = r[Col.ERROR_REASON] or NO_REASON
        said = r[Col.ANSWER] if r[Col.STATUS] == STATUS_OK else (r[Col.ERROR_DETAIL] or "")
        body.append(
            f'<tr data-status="{html.escape(r[Col.STATUS])}" data-reason="{html.escape(reason)}" '
            f'data-question="{html.escape(r[Col.QUESTION_ID])}">'
            + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
                r[Col.VIDEO_ID], r[Col.QUESTION_ID], r[Col.QUESTION], r[Col.STATUS], reason, said or ""))
            + "</tr>")
    note = f"{total} answers rows" if len(rows) == total else (
        f"the first {len(rows)} of {total} answers rows (by video, then question); the filters apply to these")
    controls = (
        '<div class="filters">'
        f'<label>status <select id="filter-status">{_options([r[Col.STATUS] for r in rows])}</select></label> '
        f'<label>reason <select id="filter-reason">'
        f'{_options([r[Col.ERROR_REASON] or NO_REASON for r in rows])}</select></label> '
        '<label>question id <input id="filter-question" list="question-ids" size="16"></label>'
        f'<datalist id="question-ids">{_options([r[Col.QUESTION_ID] for r in rows], False)}</datalist> '
        '<span id="answers-shown"></span></div>')
    head = "".join(f"<th>{h}</th>" for h in ("video", "question id", "question", "status", "reason",
                                             "answer (or error detail)"))
    page = (f'{controls}<table id="answers-table" class="answers"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>{_FILTER_SCRIPT}')
    return page, note
