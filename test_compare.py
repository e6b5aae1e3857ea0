"""compare.py (issue 33): the arms at equal MACs and budget, the paired statistics against
hand-computed cases, reuse of finished arms, and the small data sets in torchvision's layouts."""
import importlib.util
import json
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import cifar_data
import compare
import paired_table

TINY = ['--synthetic', '--arch', 'resnet8', '--dense-epochs', '1', '--epochs', '3',
        '--final-test-only', '--select-epochs', '1', '--seeds', '2', '--train-size', '320',
        '--batch-size', '32', '--dense-batch-size', '32', '--recal-batches', '2', '--device',
        'cpu', '--threads', '1']
PRUNED = ('uniform', 'random', 'l1', 'scratch')          # matched to the gates' MACs


def test_mcnemar_and_the_paired_interval_match_hand_computed_cases():
    assert paired_table.mcnemar_p(5, 0) == pytest.approx(2 / 32)                     # 2 P(X = 0)
    assert paired_table.mcnemar_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # n = 12
    assert paired_table.mcnemar_p(3, 3) == 1.0 and paired_table.mcnemar_p(0, 0) == 1.0
    a = torch.tensor([True, True, False, False, True])
    b = torch.tensor([True, False, True, False, False])
    assert paired_table.discordant(a, b) == (2, 1)
    mean, half = paired_table.t_interval([1.0, 2.0, 3.0])                 # sd 1, t(2) = 4.303
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3))
    assert paired_table.t_interval([0.5]) == (0.5, None)


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp('compare')
    arms = [a for a in compare.ARMS if a != 'global']                # optional dependency
    result = compare.main(TINY + ['--out', str(out), '--arms', *arms])
    return out, result


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def test_every_arm_matches_the_gates_macs_and_budget(sweep):
    out, result = sweep
    rows = {(r['arm'], r['seed']): r for r in result['rows']}
    for seed in (0, 1):
        gates = rows[('gates', seed)]
        for arm in PRUNED:
            assert abs(rows[(arm, seed)]['macs_percent'] - gates['macs_percent']) <= 1, arm
        steps = {}
        for arm in ('gates', 'uniform', 'random', 'l1', 'dynamic'):
            epochs = metrics(out / 't0.5' / f's{seed}' / arm)
            steps[arm] = sum(e['images'] for e in epochs)            # images = steps x batch
            assert len(epochs) == 3
        select = [metrics(out / 't0.5' / f's{seed}' / 'select' / part)
                  for part in ('select', 'finetune')]
        assert [len(p) for p in select] == [1, 2]
        steps['select'] = sum(e['images'] for p in select for e in p)
        assert len(set(steps.values())) == 1, steps
        scratch = metrics(out / 't0.5' / f's{seed}' / 'scratch')
        assert len(scratch) == 1 + 3                                 # dense + fine-tuning
        made = json.loads((out / 't0.5' / f's{seed}' / 'gates' / 'args.json').read_text())
        assert made['script'] == 'compare.py'               # what train_cifar --evaluate says
    assert result['dense_macs'] > 0 and len(result['rows']) == 2 * (len(compare.ARMS) - 1)


def test_the_summary_pairs_seeds_and_tests_predictions(sweep):
    out, result = sweep
    truth = cifar_data.stripes(1_000, seed=4321)[1]
    for entry in result['summary']:
        if entry['arm'] == 'gates':
            continue
        accs = {r['seed']: r['acc'] for r in result['rows'] if r['arm'] == entry['arm']}
        gates = {r['seed']: r['acc'] for r in result['rows'] if r['arm'] == 'gates'}
        assert entry['diff'] == pytest.approx(sum(accs[s] - gates[s] for s in (0, 1)) / 2)
        b = c = 0
        per_seed = []
        for seed in (0, 1):
            mine = torch.load(out / 't0.5' / f's{seed}' / entry['arm'] / 'predictions.pt').long()
            theirs = torch.load(out / 't0.5' / f's{seed}' / 'gates' / 'predictions.pt').long()
            assert 100 * (mine == truth).float().mean().item() == pytest.approx(accs[seed])
            bs = int(((theirs == truth) & (mine != truth)).sum())
            cs = int(((theirs != truth) & (mine == truth)).sum())
            per_seed.append(paired_table.mcnemar_p(bs, cs))
            b, c = b + bs, c + cs
        assert (entry['mcnemar_b'], entry['mcnemar_c']) == (b, c)
        assert entry['mcnemar_p_seeds'] == per_seed            # each image once per test
        assert entry['mcnemar_p_pooled'] == paired_table.mcnemar_p(b, c)
    assert json.loads((out / 'compare.json').read_text())['summary'] == json.loads(
        json.dumps(result['summary']))


def test_a_variant_from_another_folder_is_paired_by_seed(sweep, tmp_path):
    """--also DIR:ARM (issue 40's recipe variants): a gates arm trained in another folder from
    the same dense start (--init) joins the table as gates@DIR, paired with this sweep's gates
    seed by seed (its difference and McNemar counts from its own predictions)."""
    out, result = sweep
    other = tmp_path / 'magnitude'
    compare.main(TINY + ['--out', str(other), '--arms', 'gates', '--gate-init', 'magnitude',
                         '--init', str(out / 'dense' / 'last.pt')])
    again = compare.main(TINY + ['--out', str(out), '--arms', 'gates', '--also',
                                 f'{other}:gates'])
    entry = next(e for e in again['summary'] if e['arm'] == 'gates@magnitude')
    mine = {r['seed']: r['acc'] for r in again['rows'] if r['arm'] == 'gates@magnitude'}
    gates = {r['seed']: r['acc'] for r in result['rows'] if r['arm'] == 'gates'}
    assert entry['seeds'] == 2 and entry['diff'] == pytest.approx(
        sum(mine[s] - gates[s] for s in (0, 1)) / 2)
    truth = cifar_data.stripes(1_000, seed=4321)[1]
    theirs = torch.load(other / 't0.5' / 's0' / 'gates' / 'predictions.pt').long()
    base = torch.load(out / 't0.5' / 's0' / 'gates' / 'predictions.pt').long()
    b = int(((base == truth) & (theirs != truth)).sum())
    c = int(((base != truth) & (theirs == truth)).sum())
    assert entry['mcnemar_p_seeds'][0] == paired_table.mcnemar_p(b, c)


def test_a_frozen_search_trains_the_gates_alone_then_the_weights(sweep, tmp_path):
    """--select-frozen (issue 40, Gate Decorator's search): in select's first part every
    weight and BN affine parameter stays the dense start's while the gates move; the plain
    fine-tuning after it trains the weights."""
    out, _ = sweep
    dense = torch.load(out / 'dense' / 'last.pt', weights_only=True)['model']
    compare.main(TINY + ['--out', str(tmp_path), '--arms', 'select', '--seeds', '1',
                         '--select-frozen', '--init', str(out / 'dense' / 'last.pt')])
    part = tmp_path / 't0.5' / 's0' / 'select'
    searched = torch.load(part / 'select' / 'last.pt', weights_only=True)['model']
    params = [k for k in dense if k.endswith(('weight', 'bias'))]
    assert all(torch.equal(searched[k], dense[k]) for k in params)
    moved = [not torch.allclose(v, compare.gc._init_logits(len(v), compare.gc.INIT_P))
             for k, v in searched.items() if k.endswith('logits')]
    assert moved and all(moved)
    tuned = torch.load(part / 'finetune' / 'last.pt', weights_only=True)['model']
    assert not torch.equal(tuned['fc.weight'], dense['fc.weight'])


def test_distillation_is_hintons_term_and_leaves_the_teacher_as_it_was():
    """--distill (issue 40): T^2 KL(softmax(teacher / T) || softmax(student / T)), 0 when the
    student is the teacher; the term runs on a copy, so the dense start the arms are built
    from keeps its gradients and mode."""
    net = compare.gc.resnet_cifar(8).train()
    term = compare.tl.distillation(net, 0.5)
    x = torch.randn(4, 3, 32, 32)
    assert term.weight == 0.5
    assert all(p.requires_grad for p in net.parameters()) and net.training
    net.eval()
    assert term(x, net(x)).item() == pytest.approx(0.0, abs=1e-5)
    student = torch.randn(4, 10)
    teacher = net(x)
    t = compare.tl.KD_TEMPERATURE
    q = torch.softmax(teacher / t, 1)
    by_hand = t * t * (q * (q.log() - torch.log_softmax(student / t, 1))).sum(1).mean()
    assert term(x, student).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_distillation_reaches_every_arm_at_every_step(monkeypatch, tmp_path):
    """--distill w: each arm's every training step (gates, a pruned arm, both parts of
    select) mixes the teacher's term in, (1 - w) CE + w KD; without it no term is built."""
    calls, current = [], [None]
    real_arm, real_distillation = compare.run_arm, compare.tl.distillation

    def arm(name, *a):
        current[0] = name
        return real_arm(name, *a)

    def distillation(teacher, weight):
        term = real_distillation(teacher, weight)

        def counted(x, logits):
            calls.append(current[0])
            return term(x, logits)
        counted.weight = weight
        return counted
    monkeypatch.setattr(compare, 'run_arm', arm)
    monkeypatch.setattr(compare.tl, 'distillation', distillation)
    base = TINY + ['--arms', 'gates', 'uniform', 'select', '--seeds', '1']
    compare.main(base + ['--out', str(tmp_path / 'plain')])
    assert calls == []
    compare.main(base + ['--out', str(tmp_path / 'kd'), '--distill', '0.5',
                         '--init', str(tmp_path / 'plain' / 'dense' / 'last.pt')])
    steps = 3 * 320 // 32                                        # 3 epochs of 10 batches
    assert {a: calls.count(a) for a in set(calls)} == dict(gates=steps, uniform=steps,
                                                          select=steps)


def test_the_table_says_when_not_to_trust_it(sweep):
    """Issue 45.9: a dense start below every arm (not converged) and fewer than three
    paired seeds are said; a converged start with three seeds says nothing."""
    _, result = sweep
    table = result['summary']
    low = paired_table.warnings_for(table, dense_acc=min(e['acc'] for e in table) - 1)
    assert any('not converged' in w for w in low) and any('2 paired seed' in w for w in low)
    three = [dict(e, seeds=3) for e in table]
    assert paired_table.warnings_for(three, dense_acc=max(e['acc'] for e in table) + 1) == []


def test_a_finished_sweep_is_evaluated_again_without_training(sweep, capsys):
    """Issue 45.4: --evaluate rebuilds each finished arm from its last checkpoint (before BN
    recalibration), so at the settings it was trained with it reproduces every row and
    prediction exactly; at another --tau the gates are pruned again (a lower tau keeps more,
    so no fewer MACs) and the gate-free arms keep their MACs; at other --recal-batches the
    BN statistics are estimated again. Nothing is trained, the trained rows are kept, an
    unfinished arm is named."""
    out, result = sweep
    arms = sorted({r['arm'] for r in result['rows']})
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob('*') if p.name in ('last.pt',
                                                                          'final.json')}
    capsys.readouterr()
    same = compare.main(TINY + ['--out', str(out), '--arms', *arms, '--evaluate'])
    assert '--- arm' not in capsys.readouterr().out
    key = lambda r: (r['arm'], r['seed'])                                   # noqa: E731
    trained = {key(r): r for r in result['rows']}
    assert {key(r) for r in same['rows']} == set(trained)
    truth = cifar_data.stripes(1_000, seed=4321)[1]
    for row in same['rows']:
        assert row['acc'] == trained[key(row)]['acc'], key(row)
        assert row['macs_percent'] == pytest.approx(trained[key(row)]['macs_percent'])
        assert torch.equal(compare._right(out, row, truth), compare._right(out, trained[key(row)],
                                                                           truth))
    assert (out / 'compare-tau0.5-recal2.json').exists()
    lower = compare.main(TINY + ['--out', str(out), '--arms', 'gates', 'l1', '--seeds', '3',
                                 '--evaluate', '--tau', '0.2', '--recal-batches', '3'])
    assert 'not finished, left out: gates (t = 0.5, seed 2), l1 (t = 0.5, seed 2)' in \
        capsys.readouterr().out
    for row in lower['rows']:
        before = trained[key(row)]['macs_percent']
        assert row['macs_percent'] >= before - 1e-9 if row['arm'] == 'gates' else \
            row['macs_percent'] == pytest.approx(before)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / 't0.5' / 's0' / 'l1' / 'final-tau0.2-recal3.json').exists()


def test_finished_arms_are_reused_and_other_settings_refused(sweep, capsys, one_line_error):
    out, result = sweep
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob('last.pt')}
    capsys.readouterr()
    again = compare.main(TINY + ['--out', str(out), '--arms', 'gates', 'l1'])
    assert '--- arm' not in capsys.readouterr().out                  # nothing trained again
    assert {p: p.stat().st_mtime_ns for p in out.rglob('last.pt')} == stamps
    assert [r['acc'] for r in again['rows'] if r['arm'] == 'l1'] == \
        [r['acc'] for r in result['rows'] if r['arm'] == 'l1']
    capsys.readouterr()
    table = compare.main(TINY + ['--out', str(out), '--seeds', '3', '--table-only'])
    assert '--- arm' not in capsys.readouterr().out                  # seed 2: not trained
    assert {r['seed'] for r in table['rows']} == {0, 1} and len(table['rows']) == len(
        result['rows'])
    code = compare.rf.run_cli(compare.main, TINY + ['--out', str(out), '--lr', '0.05',
                                                       '--arms', 'gates'])
    assert 'dense start trained with other settings (lr: 0.1 -> 0.05)' in one_line_error(code)
    code = compare.rf.run_cli(compare.main, TINY + ['--out', str(out), '--weight-decay',
                                                       '0.001', '--arms', 'gates'])
    assert 'arm with other settings (weight_decay: 0.0005 -> 0.001)' in one_line_error(code)
    row_file = out / 't0.5' / 's0' / 'gates' / 'final.json'      # written before --t-ramp was
    row = json.loads(row_file.read_text())                         # a flag: its default
    old = json.loads(row['settings'])
    del old['t_ramp']
    row_file.write_text(json.dumps(dict(row, settings=json.dumps(old))))
    capsys.readouterr()
    compare.main(TINY + ['--out', str(out), '--arms', 'gates'])
    assert '--- arm' not in capsys.readouterr().out
    code = compare.rf.run_cli(compare.main, TINY + ['--out', str(out), '--t-ramp', '0.5',
                                                       '--arms', 'gates'])
    assert 'other settings (t_ramp: 0.0 -> 0.5)' in one_line_error(code)
    # an arm is keyed by the gate lr multiplier it trained with, the recipe's by its kind, so
    # the same value given explicitly reuses it (and a sweep begun before the default moved)
    kinds = {'gates': 'static', 'l1': 'static', 'dynamic': 'dynamic'}
    for arm, kind in kinds.items():
        row = json.loads((out / 't0.5' / 's0' / arm / 'final.json').read_text())
        assert json.loads(row['settings'])['gate_lr_mult'] == compare.tl.GATE_LR_MULT[kind]
    capsys.readouterr()
    compare.main(TINY + ['--out', str(out), '--arms', 'gates', '--gate-lr-mult',
                         str(compare.tl.GATE_LR_MULT['static'])])
    assert '--- arm' not in capsys.readouterr().out


def test_ctrl_c_hints_a_command_compare_accepts(monkeypatch, capsys, tmp_path):
    """Issue 45.1: the hint after Ctrl-C is the same command (compare.py has no --resume)."""
    import shlex

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(compare, 'dense_start', interrupted)
    assert compare.cli(TINY + ['--out', str(tmp_path)]) == 130
    hint = capsys.readouterr().err.split('continue with: python compare.py ')[1].strip()
    assert shlex.split(hint) == TINY + ['--out', str(tmp_path)]
    compare.parse_args(shlex.split(hint))


@pytest.mark.parametrize('flags, says', [
    (['--arms', 'dynamic', '--loss', 'per-gate', '--targets', '0.5', '0.5'],
     'one rate per gate module (3), got 2'),
    (['--milestones', '7', '--epochs', '2', '--select-epochs', '1'], 'never reached'),
    (['--milestones', '1', '1'], 'each epoch once'),
    (['--train-size', '99999999'], 'the training set has 5000 images'),
    (['--dataset', 'mnist'], 'takes no --dataset mnist')])
def test_what_can_be_checked_before_training_is_one_line_before_it(tmp_path, one_line_error,
                                                                   flags, says):
    """Issue 45.2-3: refused in one line (exit 2) before the dense start trains, never
    dropped, doubled or found wrong after it."""
    line = one_line_error(compare.cli(TINY + ['--out', str(tmp_path)] + flags))
    assert says in line, line
    assert not (tmp_path / 'dense').exists()


def test_two_processes_on_one_out_train_every_arm_once(tmp_path):
    """Issue 40.5: two compare.py processes on one --out (a job array, one process per GPU):
    the dense start is trained once, each arm by one of them, and both end with the whole
    table."""
    import subprocess
    import sys
    here = Path(compare.__file__).parent
    command = [sys.executable, str(here / 'compare.py'), *TINY, '--arms', 'gates', 'uniform',
               'random', '--out', str(tmp_path)]
    procs = [subprocess.Popen(command, cwd=here, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    trained = [line for log in logs for line in log.splitlines() if line.startswith('--- arm')]
    assert sorted(trained) == sorted(set(trained)) and len(trained) == 3 * 2
    assert sum(log.count('dense: ') for log in logs) == 1                # trained once
    result = json.loads((tmp_path / 'compare.json').read_text())
    assert len(result['rows']) == 6


def test_compare_compiles_the_steps_when_asked(tmp_path, monkeypatch):
    """Issue 41.8: --compile reaches every arm's training (it was accepted and dropped)."""
    compiled = []

    def counting(fn, **kw):
        compiled.append(fn.__name__)
        return fn
    monkeypatch.setattr(torch, 'compile', counting)
    compare.main(TINY + ['--out', str(tmp_path), '--arms', 'gates', '--seeds', '1',
                         '--compile', 'default'])
    assert compiled.count('losses') == 2          # the dense start and the gates arm


def test_the_global_magnitude_arm_matches_the_macs_or_names_its_install(tmp_path, sweep,
                                                                        one_line_error):
    out, result = sweep
    if importlib.util.find_spec('torch_pruning') is None:
        code = compare.rf.run_cli(compare.main, TINY + ['--out', str(out), '--arms',
                                                           'global', '--seeds', '1'])
        assert 'pip install torch-pruning' in one_line_error(code)
        return
    again = compare.main(TINY + ['--out', str(out), '--arms', 'gates', 'global', '--seeds', '1'])
    rows = {r['arm']: r for r in again['rows']}
    assert abs(rows['global']['macs_percent'] - rows['gates']['macs_percent']) <= 1


# ----------------------------------------------------------------------------- the data sets

def write_idx(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'wb') as f:
        f.write(struct.pack('>HBB', 0, 8, array.ndim))
        f.write(struct.pack(f'>{array.ndim}I', *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.mark.parametrize('name,folder', [('mnist', 'MNIST'), ('fashion-mnist', 'FashionMNIST')])
def test_grey_sets_are_read_from_torchvision_raw_files_padded_to_32(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 10, 20)
    raw = tmp_path / folder / 'raw'
    for split, n in (('train', 12), ('t10k', 8)):
        rows = slice(0, 12) if split == 'train' else slice(12, 20)
        write_idx(raw / f'{split}-images-idx3-ubyte', x[rows])
        write_idx(raw / f'{split}-labels-idx1-ubyte', y[rows])
    data = cifar_data.load(tmp_path, False, torch.device('cpu'), name)
    assert data.x_train.shape == (12, 3, 32, 32) and data.x_test.shape == (8, 3, 32, 32)
    assert data.x_train.dtype == torch.uint8 and data.y_test.tolist() == y[12:].tolist()
    assert torch.equal(data.x_train[:, 1, 2:30, 2:30], torch.from_numpy(x[:12]).to(torch.uint8))
    assert data.x_train[:, :, :2].sum() == 0                          # the zero padding
    assert data.flip == (name == 'fashion-mnist')                    # digits are not mirrored
    mean = torch.from_numpy(np.pad(x[:12], ((0, 0), (2, 2), (2, 2)))).float().mean()
    assert data.mean.flatten().tolist() == pytest.approx([mean.item()] * 3, rel=1e-5)
    assert data.subset(5).x_train.shape[0] == 5


def test_cifar100_is_read_with_its_fine_labels_and_bad_files_are_one_line(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / 'cifar-100-python'
    folder.mkdir()
    for split, n in (('train', 10), ('test', 4)):
        with open(folder / split, 'wb') as f:
            pickle.dump({b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b'fine_labels': rng.integers(0, 100, n).tolist()}, f)
    data = cifar_data.load(tmp_path, False, torch.device('cpu'), 'cifar100')
    assert data.x_train.shape == (10, 3, 32, 32) and len(data.classes) == 100
    (folder / 'test').write_bytes(b'not a pickle')
    with pytest.raises(cifar_data.UsageError, match='not a CIFAR python batch'):
        cifar_data.load(tmp_path, False, torch.device('cpu'), 'cifar100')


def test_train_cifar_takes_another_data_set(tmp_path):
    """--dataset mnist in train_cifar.py: the set read from torchvision's raw files, its run
    folders named after it, and the test images counted in the final row."""
    import train_cifar
    rng = np.random.default_rng(0)
    raw = tmp_path / 'MNIST' / 'raw'
    for split, n in (('train', 64), ('t10k', 16)):
        write_idx(raw / f'{split}-images-idx3-ubyte', rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f'{split}-labels-idx1-ubyte', rng.integers(0, 10, n))
    assert train_cifar.cli(['--dataset', 'mnist', '--data-dir', str(tmp_path), '--arch',
                            'resnet8', '--dense-epochs', '1', '--epochs', '1', '--batch-size',
                            '16', '--dense-batch-size', '16', '--recal-batches', '2', '--device',
                            'cpu', '--out', str(tmp_path / 'runs')]) == 0
    row = json.loads((tmp_path / 'runs' / 'mnist-resnet8-static-channel-flops-t0.5-s0' /
                      'final.json').read_text())
    assert row['test_images'] == 16 and (tmp_path / 'runs' / 'mnist-dense-resnet8-s0').is_dir()
