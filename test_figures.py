"""figures.py draws each figure from small result files written here (matplotlib is the
optional extra that figures.py alone needs; .ci/run installs it)."""
import json
import sys

import numpy as np
import pytest
import torch

import figures


def write_runs(root):
    static, dynamic = root / 'resnet56-static', root / 'resnet56-dynamic'
    static.mkdir(parents=True)
    dynamic.mkdir()
    for folder, gating, acc, macs in (
        (static, 'static', 93.1, 51.0),
        (dynamic, 'dynamic', 93.5, 60.0),
    ):
        (folder / 'final.json').write_text(
            json.dumps(
                dict(
                    arch='resnet56',
                    gating=gating,
                    gated_acc=acc,
                    baseline_acc=93.9,
                    macs_percent=macs,
                )
            )
        )
    torch.save(
        {'layer1.0.gate1.logits': torch.randn(16, 2) * 5, 'layer1.0.conv1.weight': torch.zeros(1)},
        static / 'final.pt',
    )
    rates = np.random.default_rng(0).random((10, 4))
    lines = ['class,' + ','.join(f'gate{j}' for j in range(4))]
    lines += [f'c{i},' + ','.join(f'{r:.4f}' for r in row) for i, row in enumerate(rates)]
    (dynamic / 'gate_classes.csv').write_text('\n'.join(lines) + '\n')
    return static, dynamic


def test_figures_are_drawn(tmp_path):
    pytest.importorskip('matplotlib')
    from PIL import Image
    static, dynamic = write_runs(tmp_path)
    out = tmp_path / 'figs'
    assert figures.main([str(static), str(dynamic), '--out', str(out)]) == 0
    for name, size in (
        ('fig3_resnet56.png', (850, 450)),
        ('polarization_resnet56-static.png', (600, 450)),
        ('fig4_resnet56-dynamic.png', None),
    ):
        image = np.asarray(Image.open(out / name).convert('RGB'))
        assert size is None or image.shape[1::-1] == size
        assert image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 20   # not blank


def test_without_matplotlib_it_says_how_to_install(tmp_path, monkeypatch, capsys):
    static, _ = write_runs(tmp_path)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)        # import matplotlib now fails
    assert figures.main([str(static), '--out', str(tmp_path / 'f')]) == 2
    assert 'pip install matplotlib' in capsys.readouterr().err


def test_bad_run_folders_give_one_line_errors(tmp_path, one_line_error):
    pytest.importorskip('matplotlib')
    static, dynamic = write_runs(tmp_path)
    dense = tmp_path / 'dense-resnet56-s0'                  # a baseline's row: the star only
    dense.mkdir()
    (dense / 'final.json').write_text(json.dumps(dict(arch='resnet56', baseline_acc=93.9)))
    assert figures.main([str(static), str(dense), '--out', str(tmp_path / 'a')]) == 0
    (static / 'final.pt').write_bytes(b'not a checkpoint')
    assert 'final.pt' in one_line_error(figures.main([str(static), '--out', str(tmp_path / 'b')]))
    (dynamic / 'gate_classes.csv').write_text('')
    assert 'gate_classes.csv' in one_line_error(
        figures.main([str(dynamic), '--out', str(tmp_path / 'c')]))
    (tmp_path / 'file').write_text('')
    assert 'exists' in one_line_error(
        figures.main([str(dense), '--out', str(tmp_path / 'file')]), status=1)
    code = figures.main([str(tmp_path), '--out', str(tmp_path / 'd')])
    assert 'final.json' in one_line_error(code)


def test_figures_count_from_zero_show_whole_titles_and_keep_legends_off_the_data(
        tmp_path, monkeypatch):
    """Issue 22: the histogram's count axis is linear from 0; every title lies inside its
    figure; each legend lies outside its axes; a synthetic run says so beside the paper."""
    matplotlib = pytest.importorskip('matplotlib')
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    static, _ = write_runs(tmp_path)
    synthetic = static.rename(tmp_path / 'synthetic-resnet56-static')
    kept = []
    monkeypatch.setattr(figures, 'save', lambda plt, fig, path: kept.append(fig) or path)
    figures.polarization(plt, synthetic, tmp_path)
    figures.fig3(plt, 'resnet56', [figures.read_run(synthetic)], tmp_path)
    hist, fig3 = kept
    assert hist.axes[0].get_yscale() == 'linear' and hist.axes[0].get_ylim()[0] == 0
    for fig in kept:
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        title = ax.title.get_window_extent(renderer)
        assert fig.bbox.x0 <= title.x0 and title.x1 <= fig.bbox.x1 and title.y1 <= fig.bbox.y1
        legend, box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert not legend.overlaps(box)
    labels = [t.get_text() for t in fig3.axes[0].get_legend().get_texts()]
    assert any('(synthetic data)' in t for t in labels) and 'synthetic' in fig3.axes[0].get_title()


def test_mistyped_final_json_gives_one_line(tmp_path, one_line_error):
    static, _ = write_runs(tmp_path)
    row = json.loads((static / 'final.json').read_text())
    (static / 'final.json').write_text(json.dumps({**row, 'macs_percent': '50.1'}))
    assert 'macs_percent must be a number' in one_line_error(
        figures.main([str(static), '--out', str(tmp_path / 'f')]))


def test_fig3_says_which_data_and_shows_the_paper_only_beside_its_own(tmp_path):
    """Issue 32: a resnet56 run on a 297-image folder in CIFAR's format is titled with that
    data and drawn without the paper's CIFAR-10 points; a run with CIFAR-10's 10,000 test
    images from cifar10 gets them."""
    pytest.importorskip('matplotlib')
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    runs = []
    for name, images in (('digits', 297), ('cifar', 10_000)):
        run = tmp_path / name / 'resnet56-static-channel-flops-t0.5-s0'
        run.mkdir(parents=True)
        (run / 'args.json').write_text(json.dumps({'dataset': 'cifar10', 'data_dir': name}))
        (run / 'final.json').write_text(json.dumps(dict(
            arch='resnet56', gating='static', granularity='channel', loss='flops', t=0.5,
            tau=0.5, baseline_acc=94.0, gated_acc=93.0, macs_percent=50.0, test_images=images)))
        runs.append(figures.read_run(run))
    for run, paper in ((runs[0], None), (runs[1], 'CIFAR-10')):
        assert figures.paper_beside('resnet56', [run]) == paper
    assert 'digits, 297 test images' in runs[0][1]['data']
    figures.fig3(plt, 'resnet56', [runs[0]], tmp_path)         # draws, titled with its data
