"""tools/readme_figures.py on a tiny fake figure (its command a one-line Python print), and the
real README's blocks checked against what the code prints now (no expensive command is run)."""
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
    assert len(renamed) == 1 and "only in the README: ['waiting']" in renamed[0]
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


def test_the_readme_figures_match_the_code():
    """Every block of README.md: known, dated, one place, and (the demo) the table run.py prints now."""
    text = (REPO / "README.md").read_text()
    assert "<!-- figures:demo -->" in text
    assert rf.check(text) == []
