"""Progress bars go to a terminal only: a log gets one line per stage (issue 26)."""

import io
import sys

from dgmood.utils import progress
from dgmood.utils.progress import LogLine, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_stage(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress_bar(total=300, desc="features", unit="img", enabled=True)
    assert isinstance(bar, LogLine)
    for _ in range(3):
        bar.update(100)
    bar.set_postfix(loss="0.25")
    bar.close()
    bar.close()  # closing twice writes once
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("features: 300 img in ") and lines[0].endswith("loss=0.25")
    assert list(progress_bar(range(4), desc="epochs", unit="epoch")) == [0, 1, 2, 3]
    assert log.getvalue().splitlines()[1].startswith("epochs: 4 epoch in ")


def test_a_terminal_gets_tqdms_bar_and_quiet_gets_nothing(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress_bar(total=10, desc="train", unit="step", enabled=True)
    assert not isinstance(bar, LogLine) and type(bar).__module__.startswith("tqdm")
    bar.close()
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    quiet = progress_bar(total=10, desc="train", enabled=False)
    quiet.update(10)
    quiet.close()
    assert log.getvalue() == "" and progress.__all__ == ["LogLine", "progress_bar"]
