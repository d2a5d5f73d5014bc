"""tools/readme_figures.py on a tiny fake figure (its command a one-line Python print), the README's
summary derived from the blocks it summarises, and the real pages' blocks (README.md, docs/*.md)
checked against what the code prints now (no expensive command is run)."""
import sys
from pathlib import Path

from tools import readme_figures as rf

REPO = Path(__file__).resolve().parents[1]

TINY = rf.Figure("tiny", (sys.executable, "-c", "print('noise'); print('speed  12.5 img/s'); print('wait  3 %')"),
                 render=lambda out: rf.fenced("\n".join(out.splitlines()[1:])), shape=rf.table_names,
                 expected_shape=lambda: ["speed", "wait"], shown="python tiny.py")
PAGE = "# Title\n\nbefore\n<!-- figures:tiny -->\nold typed numbers\n<!-- /figures -->\nafter\n"


def test_a_block_is_rewritten_from_its_command_and_checked_by_structure(tmp_path):
    text = rf.replace_block(PAGE, "tiny", rf.measure(TINY, note="a test", cwd=tmp_path))
    assert text.startswith("# Title\n\nbefore\n<!-- figures:tiny -->\n```\nspeed  12.5 img/s\nwait  3 %\n```\n")
    assert text.endswith("<!-- /figures -->\nafter\n") and "old typed numbers" not in text
    footer = rf.FOOTER.search(text)
    assert footer["name"] == "tiny" and footer["command"] == "python tiny.py" and footer["machine"].endswith("a test")
    figures = {"tiny": TINY}
    assert rf.check(text, figures) == []
    assert rf.check(text.replace("12.5", "99.0"), figures) == []  # numbers differ: same structure
    renamed = rf.check(text.replace("wait  3 %", "waiting  3 %"), figures)
    assert len(renamed) == 1 and "only in the page: ['waiting']" in renamed[0]
    assert "no line" in rf.check(text.replace("<sub>", "<b>"), figures)[0]  # the command/date/machine line
    assert "two places" in " ".join(rf.check(text + text[text.index("<!--"):], figures))
    assert "not closed" in rf.check(text.replace("<!-- /figures -->", ""), figures)[0]
    assert "not one of" in rf.check(PAGE.replace("tiny", "other"), figures)[0]


def test_a_failing_command_leaves_the_readme_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(PAGE)
    failing = rf.Figure("tiny", (sys.executable, "-c", "raise SystemExit(3)"), render=rf.fenced, shape=rf.table_names)
    try:
        rf.measure(failing, cwd=tmp_path)
    except RuntimeError as error:
        assert "exited 3" in str(error)
    else:
        raise AssertionError("a failing command gave a figure")
    assert readme.read_text() == PAGE


def test_the_figures_of_every_page_match_the_code():
    """Every block of README.md and docs/*.md: known, dated, in one place, shaped as the code prints
    now, and the README's summary saying what the blocks it summarises say."""
    text = rf.all_pages_text(rf.pages(REPO))
    assert all(f"<!-- figures:{name} -->" in text for name in [*rf.FIGURES, *rf.DERIVED])
    assert rf.check(text) == []


def test_the_summary_follows_the_blocks_it_summarises():
    text = rf.all_pages_text(rf.pages(REPO))
    steps = next(block for block in rf.blocks(text) if block["name"] == "steps")
    figure = rf.table_cells(steps["body"][:rf.FOOTER.search(steps["body"]).start()])
    date = next(row for row, _ in figure if row[:2] == "20")
    old = figure[date, "advprop_pgd5"]
    remeasured = text.replace(steps["body"], steps["body"].replace(f" {old} |", " 9.99 |", 1))
    stale = rf.check(remeasured)
    assert len(stale) == 1 and "summary: no longer says what the blocks it summarises" in stale[0]
    summary = next(block for block in rf.blocks(remeasured) if block["name"] == "summary")
    body = rf.DERIVED["summary"][1]({block["name"]: block["body"] for block in rf.blocks(remeasured)})
    assert "/ 9.99," in body and rf.check(remeasured.replace(summary["body"], body)) == []
