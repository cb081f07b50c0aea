"""Progress bars (tqdm): redrawn on a terminal, a line per tenth in a log, silent when off."""

import io

from fastlaplace.config import Config
from fastlaplace.progress import progress_bar
from fastlaplace.train import train


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run(stream, total=100, **kwargs):
    with progress_bar(total, "work", stream=stream, **kwargs) as bar:
        for _ in range(total):
            bar.set_postfix(loss=0.5, refresh=False)
            bar.update()
    return stream.getvalue()


def test_in_a_log_a_line_per_tenth():
    text = run(io.StringIO())
    lines = text.splitlines()
    assert "\r" not in text and 10 <= len(lines) <= 12, lines
    assert lines[-1].startswith("work: 100%") and "100/100" in lines[-1] and "loss=0.5" in lines[-1]
    assert text.count("100/100") == 1  # drawn by the last update and on closing, written once


def test_on_a_terminal_the_bar_is_redrawn():
    text = run(Terminal())
    assert "\r" in text and "100/100" in text


def test_disabled_writes_nothing():
    assert run(io.StringIO(), enabled=False) == ""
    assert run(Terminal(), enabled=False) == ""


def test_a_resumed_run_starts_at_its_iteration():
    stream = io.StringIO()
    with progress_bar(10, "train", initial=6, stream=stream) as bar:
        bar.update(4)
    assert stream.getvalue().splitlines()[0].startswith("train:  60%") and "10/10" in stream.getvalue()


def test_training_shows_progress_unless_told_not_to(tmp_path, capsys):
    cfg = dict(iterations=4, meta_batch=2, eval_tasks=4, method="maml")
    train(Config(out=str(tmp_path / "a"), **cfg), progress=True)
    err = capsys.readouterr().err
    assert "maml sinusoid: 100%" in err and "4/4" in err and err.count("eval test: 100%") == 1
    train(Config(out=str(tmp_path / "b"), **cfg), progress=False)
    err = capsys.readouterr().err
    assert "maml sinusoid" not in err and "eval test" not in err
