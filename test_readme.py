"""README.md and the docs as a newcomer reads them (issue 44): every fenced block marked
"runs as written" runs (the module usage, your own model end to end, every script's --help),
and every relative link points at a file of the repository."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PAGES = [HERE / 'README.md', HERE / 'NOTES.md', *sorted((HERE / 'docs').glob('*.md'))]
MARK = 'runs as written'


def blocks(language):
    """(page name, index, code) of every fenced block in `language` marked to run."""
    return [(page.name, k, code) for page in PAGES
            for k, code in enumerate(re.findall(rf'```{language}\n(.*?)```', page.read_text(),
                                                re.S)) if MARK in code]


def test_the_readme_says_how_to_use_the_module_early_and_briefly():
    """README.md at most 12,000 characters, its usage before its 40% mark; NOTES.md at most
    30,000."""
    readme = (HERE / 'README.md').read_text()
    assert len(readme) <= 12_000 and readme.index('## Using the module') < 0.4 * len(readme)
    assert len((HERE / 'NOTES.md').read_text()) <= 30_000


@pytest.mark.parametrize('name, k, code', blocks('python'), ids=lambda v: str(v)[:20])
def test_python_marked_to_run_runs_as_written(name, k, code, tmp_path):
    """README's module usage and own-model recipe (gate, train with the FLOPs loss, eval,
    recalibrate, prune, write pruned.pt / .pt2 / .onnx), each in a fresh folder and process."""
    (tmp_path / 'snippet.py').write_text(code)
    done = subprocess.run([sys.executable, 'snippet.py'], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(HERE)))
    assert done.returncode == 0, done.stderr[-2000:]
    if 'write_exports' in code:
        assert {p.name for p in (tmp_path / 'deploy').iterdir()} >= {'pruned.pt', 'pruned.pt2'}


@pytest.mark.parametrize('name, k, code', blocks('bash'), ids=lambda v: str(v)[:20])
def test_commands_marked_to_run_run_as_written(name, k, code):
    for line in [line for line in code.splitlines() if line and not line.startswith('#')]:
        words = line.split()
        words[0] = sys.executable if words[0] == 'python' else words[0]
        done = subprocess.run(words, cwd=HERE, text=True, capture_output=True, timeout=300)
        assert done.returncode == 0, f'{name}: {line}: {done.stderr[-1000:]}'
        assert 'usage:' in done.stdout


def test_something_is_marked_to_run():
    assert len(blocks('python')) >= 2 and blocks('bash')


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    links = re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', page.read_text())
    local = [link for link in links if not re.match(r'[a-z]+://|mailto:', link)]
    missing = [link for link in local if not (page.parent / link).exists()]
    assert not missing, f'{page.name} links to missing files: {missing}'
