"""Fixtures shared by the script tests."""
import pytest


@pytest.fixture
def one_line_error(capsys):
    """check(code) -> the one error line a script printed for bad input (exit status 2, no
    traceback; warnings aside)."""
    def check(code):
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if not line.startswith('warning:')]
        assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ')
        assert 'Traceback' not in err
        return lines[0]
    return check
