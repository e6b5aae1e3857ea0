"""Fixtures shared by the script tests."""
import pytest


@pytest.fixture
def one_line_error(capsys):
    """check(code, status=2) -> the one error line a script printed (exit status 2: bad
    input; 1: a run that could not go on), with no traceback; warnings aside."""
    def check(code, status=2):
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if not line.startswith('warning:')]
        assert code == status and len(lines) == 1 and lines[0].startswith('error: '), err
        assert 'Traceback' not in err
        return lines[0]
    return check


@pytest.fixture
def crash_after_epoch_1(monkeypatch, capsys):
    """crash(run) -> run() killed right after epoch 1's checkpoint, before its metrics line
    (a KeyboardInterrupt there: the script's exit status 130), the scripts' writes working
    again after; -> what it printed on stderr (taken from capsys)."""
    import run_folder as rf

    def crash(run):
        save = rf.save_atomic

        def killing(obj, path):
            save(obj, path)
            if path.name == 'last.pt' and obj.get('epoch') == 1:
                raise KeyboardInterrupt
        monkeypatch.setattr(rf, 'save_atomic', killing)
        capsys.readouterr()
        assert run() == 130
        monkeypatch.setattr(rf, 'save_atomic', save)
        return capsys.readouterr().err
    return crash
