"""README.md and the docs as a newcomer reads them: the snippets marked to run do, and every
relative link points at a file of the repository."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PAGES = [HERE / 'README.md', HERE / 'NOTES.md', *sorted((HERE / 'docs').glob('*.md'))]


def snippets(page, mark='runs as written'):
    return [b for b in re.findall(r'```python\n(.*?)```', page.read_text(), re.S) if mark in b]


def test_the_own_model_recipe_runs_as_written(tmp_path):
    """Issue 45.8: README's own-model recipe (gate, train with the FLOPs loss, eval,
    recalibrate, prune, write pruned.pt / .pt2 / .onnx), in a fresh folder and process."""
    blocks = snippets(HERE / 'README.md')
    assert blocks, 'README.md has no snippet marked "runs as written"'
    for k, block in enumerate(blocks):
        (tmp_path / f'snippet{k}.py').write_text(block)
        done = subprocess.run([sys.executable, f'snippet{k}.py'], cwd=tmp_path, text=True,
                              capture_output=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=str(HERE)))
        assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in (tmp_path / 'deploy').iterdir()} >= {'pruned.pt', 'pruned.pt2'}


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    links = re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', page.read_text())
    local = [link for link in links if not re.match(r'[a-z]+://|mailto:', link)]
    missing = [link for link in local if not (page.parent / link).exists()]
    assert not missing, f'{page.name} links to missing files: {missing}'
