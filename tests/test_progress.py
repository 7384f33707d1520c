"""Progress: a bar on a terminal, periodic plain lines in a log."""
import io

from pixelseg.core.progress import progress


def test_log_gets_plain_lines_not_carriage_returns():
    log = io.StringIO()
    for _ in progress(range(50), desc="evaluate test", unit="img", stream=log, every_s=0):
        pass
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) >= 2
    assert all(line.startswith("evaluate test") for line in lines) and "50/50" in lines[-1]


def test_quiet_when_disabled():
    log = io.StringIO()
    for _ in progress(range(5), stream=log, enabled=False):
        pass
    assert log.getvalue() == ""


def test_final_state_is_written_once():
    log = io.StringIO()
    bar = progress(total=2, desc="epoch 1/1", stream=log, every_s=0)
    bar.update(2)
    bar.close()
    assert log.getvalue().count("2/2") == 1
