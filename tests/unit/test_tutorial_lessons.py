"""Lesson files: the packaged ten, an operator's override or addition in <data-dir>/tutorial, edits picked up
without a restart, a broken file refused with its name."""

import time
from pathlib import Path

import pytest

from ussycode.errors import UsageError
from ussycode.services import tutorial


def later(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    now = time.monotonic() + seconds
    monkeypatch.setattr(time, "monotonic", lambda: now)


def test_operator_lessons_replace_add_and_change_without_a_restart(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = tutorial.load_lessons(tmp_path)
    assert [lesson.number for lesson in packaged] == list(range(1, 11))
    own = tmp_path / "tutorial"
    own.mkdir()
    (own / "01-mine.toml").write_text('title = "Our first lesson"\ncheck = "vm_running"\ntext = "Make {vm}."\n')
    (own / "11-extra.toml").write_text('title = "Extra"\ncheck = "vm_gone"\ntext = "Remove {vm}."\n')
    later(monkeypatch, tutorial.LESSONS_RESCAN + 1)
    lessons = tutorial.load_lessons(tmp_path)
    assert lessons[0].title == "Our first lesson" and lessons[-1].number == 11 and len(lessons) == 11
    assert tutorial.load_lessons(tmp_path) is not lessons  # callers get their own list
    (own / "11-extra.toml").write_text('title = "Extra, edited"\ncheck = "vm_gone"\ntext = "Remove it."\n')
    later(monkeypatch, 2 * tutorial.LESSONS_RESCAN + 2)
    assert tutorial.load_lessons(tmp_path)[-1].title == "Extra, edited"
    (own / "11-extra.toml").write_text('title = "Broken"\ncheck = "rm_rf"\ntext = "x"\n')
    later(monkeypatch, 3 * tutorial.LESSONS_RESCAN + 3)
    with pytest.raises(UsageError, match="11-extra.toml: unknown check 'rm_rf'"):
        tutorial.load_lessons(tmp_path)
    with pytest.raises(UsageError):  # still refused on the next read: a broken set is never remembered
        tutorial.load_lessons(tmp_path)
