"""train_imagenet.py on CPU: a tiny ImageFolder of JPEGs written by the test, no pretrained
weights, one short epoch; one process, and two processes under torchrun (gloo)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import imagenet_data
import machine
import run_folder as rf
import train_imagenet

HERE = Path(__file__).parent
FAST = ('--arch resnet18 --crop-size 32 --batch-size 4 --workers 0 '
        '--epochs 1 --recal-batches 2 --device cpu --lr 0.01').split()
RUN = 'imagenet-resnet18-static-channel-flops-t0.5-s0'


def write_imagefolder(root, classes=('ant', 'bee', 'cat'), n_train=4, n_val=2, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('val', n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f'{i}.jpg', quality=90)


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp('imagenet')
    write_imagefolder(root)
    return root


def run(data, out, *extra):
    return train_imagenet.cli(
        FAST + ['--gating', 'static', '--data-dir', str(data), '--out', str(out), *extra]
    )


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def test_one_process_writes_the_final_row_and_an_exact_pruned_net(imagenet, tmp_path):
    assert run(imagenet, tmp_path) == 0
    row = json.loads((tmp_path / RUN / 'final.json').read_text())
    keys = ('baseline_acc gated_acc gated_top5 pruned_acc macs_percent activation_rate '
            'pruned_macs_percent')
    assert set(keys.split()) <= set(row)
    assert row['pruned_macs_percent'] == pytest.approx(row['macs_percent'], abs=1e-9)
    assert len(metrics(tmp_path / RUN)) == 1
    assert torch.load(tmp_path / RUN / 'last.pt', weights_only=True)['epoch'] == 1
    assert json.loads((tmp_path / RUN / 'args.json').read_text())['script'] == 'train_imagenet.py'


@pytest.mark.parametrize('workers', ['0', '2'])
def test_resume_continues_exactly(imagenet, tmp_path, crash_after_epoch_1, workers):
    """Two epochs in one go, or a crash right after epoch 1's checkpoint and --resume with the
    same command: the same second epoch, with the main process decoding or with workers."""
    same = ['--epochs', '2', '--workers', workers]
    assert run(imagenet, tmp_path / 'a', *same) == 0
    crash_after_epoch_1(lambda: run(imagenet, tmp_path / 'b', *same))
    assert run(imagenet, tmp_path / 'b', *same, '--resume') == 0
    a, b = metrics(tmp_path / 'a' / RUN), metrics(tmp_path / 'b' / RUN)
    assert (
        [r['epoch'] for r in b] == [1, 2]
        and b[1]['first_loss'] == a[1]['first_loss']
        and b[1]['ce'] == a[1]['ce']
        and b[1]['top1'] == a[1]['top1']
    )


def test_a_dense_baseline_then_gates_from_it(imagenet, tmp_path, one_line_error):
    """--gating none trains the dense start in its own folder; --init gates it, and the
    gated run's baseline is that net's accuracy; a net of another arch is refused."""
    assert run(imagenet, tmp_path, '--gating', 'none') == 0
    dense = tmp_path / 'imagenet-dense-resnet18-s0'
    base = json.loads((dense / 'final.json').read_text())
    assert base['gating'] == 'none' and set(torch.load(dense / 'final.pt')) == set(
        torchvision.models.resnet18(num_classes=3).state_dict())
    assert run(imagenet, tmp_path, '--init', str(dense / 'last.pt')) == 0
    row = json.loads((tmp_path / RUN / 'final.json').read_text())
    assert row['baseline_acc'] == base['baseline_acc']
    assert 'does not fit' in one_line_error(
        run(imagenet, tmp_path / 'x', '--arch', 'resnet34', '--init', str(dense / 'last.pt')))


CRASH_AFTER_EPOCH_1 = """
import sys, run_folder, train_imagenet
save = run_folder.save_atomic
def killing(obj, path):
    save(obj, path)
    if path.name == 'last.pt' and obj.get('epoch') == 1:
        raise KeyboardInterrupt
run_folder.save_atomic = killing
sys.exit(train_imagenet.cli())
"""


def test_torchrun_processes_draw_their_own_noise_and_resume_exactly(imagenet, tmp_path):
    """Two processes (gloo), dynamic layer gates: rank 0 alone logs and writes; each process
    seeds its generators from (seed, rank), so their noise differs, and each one's state is
    saved: a crash after epoch 1 and --resume give the second epoch of an uninterrupted
    run."""
    (tmp_path / 'crash.py').write_text(CRASH_AFTER_EPOCH_1)

    def torchrun(script, out, *extra):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
               '2', str(script), *FAST, '--gating', 'dynamic', '--granularity', 'layer',
               '--epochs', '2',
               '--data-dir', str(imagenet), '--out', str(out), *extra]
        env = dict(os.environ, PYTHONPATH=str(HERE))
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE,
                              env=env)
    done = torchrun(HERE / 'train_imagenet.py', tmp_path / 'a')
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count('final:') == 1                 # rank 0 alone logged
    assert torchrun(tmp_path / 'crash.py', tmp_path / 'b').returncode != 0
    assert torch.load(tmp_path / 'b' / 'imagenet-resnet18-dynamic-layer-flops-t0.5-s0' /
                      'last.pt', weights_only=False)['epoch'] == 1
    resumed = torchrun(HERE / 'train_imagenet.py', tmp_path / 'b', '--resume')
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run_dir = 'imagenet-resnet18-dynamic-layer-flops-t0.5-s0'
    ranks = torch.load(tmp_path / 'a' / run_dir / 'last.pt', weights_only=False)['rng']['ranks']
    assert len(ranks) == 2 and not torch.equal(ranks[0][0], ranks[1][0])
    a, b = metrics(tmp_path / 'a' / run_dir), metrics(tmp_path / 'b' / run_dir)
    assert len(a) == 2 and 'pruned_macs_percent' not in json.loads(
        (tmp_path / 'a' / run_dir / 'final.json').read_text())      # one row per epoch
    assert [r['epoch'] for r in b] == [1, 2]
    assert (b[1]['first_loss'], b[1]['ce'], b[1]['top1']) == \
        (a[1]['first_loss'], a[1]['ce'], a[1]['top1'])


@pytest.mark.parametrize(
    'extra,words',
    [
        (['--t', '0'], '--t'),
        (['--arch', 'resnet57'], '--arch'),
        (['--aig-targets'], '--aig-targets'),
        (['--targets', '0.5'], '--targets'),
        (['--batch-size', '0'], '--batch-size'),
        (['--milestones', '0'], '--milestones'),
        (['--gating', 'none', '--t', '0.5'], '--gating none'),
        (['--init', 'x.pt', '--pretrained'], '--init'),
        (['--polarize', '-1'], '--polarize'),
        (['--workers', '-1'], '--workers'),
        (['--epochs', '0'], '--epochs'),
        (['--device', 'cuda:99'], '--device'),
        (['--batch-size', '16'], 'fewer than one batch'),
    ],
)
def test_bad_arguments_give_one_line_errors(imagenet, tmp_path, one_line_error, extra, words):
    assert words in one_line_error(run(imagenet, tmp_path, *extra))


def test_bad_folders_give_one_line_errors(imagenet, tmp_path, one_line_error):
    assert 'train/' in one_line_error(run(tmp_path / 'nowhere', tmp_path / 'o'))
    mismatch = tmp_path / 'mismatch'
    write_imagefolder(mismatch)
    (mismatch / 'val' / 'cat').rename(mismatch / 'val' / 'dog')
    (mismatch / 'val' / 'extra').mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(mismatch / 'val' / 'extra' / '0.jpg')
    assert 'class folders' in one_line_error(run(mismatch, tmp_path / 'o'))
    assert run(imagenet, tmp_path / 'done') == 0
    last = tmp_path / 'done' / RUN / 'last.pt'
    before = last.read_bytes()
    assert run(imagenet, tmp_path / 'done') == 0                # finished: reused, not rewritten
    assert last.read_bytes() == before
    error = one_line_error(run(imagenet, tmp_path / 'done', '--tau', '0.4'))
    assert 'final.json' in error and '--evaluate' in error      # as train_cifar.py


def test_aig_targets_follow_the_paper():
    """The paper's list (2.1) plus the restored first block of layer4: 16 rates, t where AIG
    puts t."""
    targets = train_imagenet.aig_targets(0.4)
    assert (
        len(targets) == 16 and targets.count(0.4) == 7 and targets[2] == 0.8 and targets[14] == 0.7
    )


def test_unreadable_images_are_skipped_with_a_warning(tmp_path, capsys):
    data = tmp_path / 'data'
    write_imagefolder(data)
    (data / 'train' / 'ant' / 'empty.jpg').write_bytes(b'')
    jpeg = (data / 'train' / 'bee' / '0.jpg').read_bytes()
    (data / 'train' / 'bee' / 'cut.jpg').write_bytes(jpeg[:50])                 # truncated
    assert run(data, tmp_path / 'o', '--batch-size', '14') == 0
    assert 'unreadable' in capsys.readouterr().err
    assert metrics(tmp_path / 'o' / RUN)[0]['unreadable_images'] == 2


def test_an_empty_class_folder_and_missing_weights_are_one_line(tmp_path, one_line_error,
                                                                monkeypatch):
    data = tmp_path / 'data'
    write_imagefolder(data)
    (data / 'train' / 'dog').mkdir()
    assert 'dog' in one_line_error(run(data, tmp_path / 'o'))
    (data / 'train' / 'dog').rmdir()

    def offline(*args, **kwargs):
        raise OSError('no route to host')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    assert '--pretrained' in one_line_error(run(data, tmp_path / 'o', '--pretrained'))


def test_synthetic_mode_runs_without_data(tmp_path, capsys):
    """--synthetic: random ImageFolder-shaped data, no files needed, its own folder name;
    strict JSON results; it delivers t or says in one line why it need not."""
    assert train_imagenet.cli(FAST + ['--synthetic', '--batch-size', '64', '--out',
                                      str(tmp_path)]) == 0
    run_dir = tmp_path / 'synthetic-imagenet-resnet18-dynamic-channel-flops-t0.5-s0'
    row = json.loads((run_dir / 'final.json').read_text())
    assert row['epochs'] == 1 and row['test_images'] == 256     # the synthetic val set
    warnings = [line for line in capsys.readouterr().err.splitlines() if 'more than 3 points'
                in line]
    missed = abs(row['macs_percent'] - 50) > 3                  # a miss is said, and only then
    assert len(warnings) == missed and all('random labels' in w for w in warnings)



def test_any_torchvision_model_takes_static_gates(imagenet, tmp_path, one_line_error):
    """Issue 21: --arch takes any torchvision classifier for static gating (gumbel_any); the
    pruned export is the thresholded net; dynamic gates stay ResNet-only, said in one line."""
    assert run(imagenet, tmp_path, '--arch', 'mobilenet_v3_small') == 0
    run_dir = tmp_path / 'imagenet-mobilenet_v3_small-static-channel-flops-t0.5-s0'
    row = json.loads((run_dir / 'final.json').read_text())
    assert row['pruned_macs_percent'] == pytest.approx(row['macs_percent'], abs=1e-9)
    assert row['pruned_acc'] == row['gated_acc'] and (run_dir / 'pruned.pt2').exists()
    assert 'ResNets' in one_line_error(run(imagenet, tmp_path / 'd', '--arch', 'mobilenet_v2',
                                           '--gating', 'dynamic'))


@pytest.mark.parametrize('name,env,gpus,want', [
    ('cpu', {}, 0, 'cpu'), ('cpu', {'LOCAL_RANK': '1', 'WORLD_SIZE': '2'}, 2, 'cpu'),
    ('cuda', {}, 1, 'cuda:0'), ('cuda', {'LOCAL_RANK': '1', 'WORLD_SIZE': '2'}, 2, 'cuda:1'),
    ('cuda:1', {}, 2, 'cuda:1'), ('cuda:0', {'LOCAL_RANK': '0', 'WORLD_SIZE': '1'}, 1, 'cuda:0'),
    ('cuda', {}, 0, 'error: no CUDA GPU'), ('cuda:2', {}, 2, 'error: has 2 GPU'),
    ('gpu', {}, 1, 'error: not a device'),
    ('cuda:1', {'LOCAL_RANK': '0', 'WORLD_SIZE': '2'}, 2, 'error: under torchrun'),
    ('cuda', {'LOCAL_RANK': '3', 'WORLD_SIZE': '4'}, 2, 'error: not cuda:3'),
])
def test_one_device_rule_for_both_scripts(name, env, gpus, want):
    """Issue 20: --device cuda on a GPU machine gets an index (torch.cuda.set_device refuses
    a bare 'cuda'): LOCAL_RANK's under torchrun, else 0; impossible choices are one line."""
    if not want.startswith('error: '):
        assert str(machine.device_for(name, env, gpus)) == want
    else:
        with pytest.raises(rf.UsageError, match=want[len('error: '):]):
            machine.device_for(name, env, gpus)


def test_loader_yields_uint8_and_on_device_normalizes_as_torchvision(imagenet):
    """The workers decode, crop and flip only (uint8); on_device gives what ToTensor +
    Normalize give, to float32 rounding (a few ulps of values up to |2.7|)."""
    args = train_imagenet.parse_args(FAST + ['--data-dir', str(imagenet)])
    train_loader, val_loader, _ = imagenet_data.loaders(args, 1, 0)
    x, y, bad = next(iter(val_loader))
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and bad == 0
    usual = torchvision.transforms.Normalize(imagenet_data.MEAN, imagenet_data.STD)(x / 255)
    got = imagenet_data.on_device(x, 'cpu')
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, usual, rtol=0, atol=4e-6)


def test_benchmark_times_the_input_pipeline(imagenet):
    """benchmark.py --loader's table on real JPEGs: both loaders at each worker count and
    the one-thread steps, each a positive rate."""
    import benchmark
    rows = benchmark.loader_table(imagenet, torch.device('cpu'), batch=2, batches=2, rounds=1)
    names = [r['row'] for r in rows]
    assert 'train loader, uint8 (the loader), 0 workers' in names
    assert 'train loader, float32 (usual), 1 workers' in names
    assert 'decode + crop + flip + PILToTensor: uint8, 1 thread' in names
    assert all(r['img_s'] > 0 for r in rows)


# ----------------------------------------------------------------------------- issue 32: the
# third hour, as a user meets it

def test_evaluate_a_finished_run_with_another_threshold(imagenet, tmp_path, capsys,
                                                        one_line_error):
    """train_imagenet.py --evaluate RUN_DIR --tau 0.4, as train_cifar.py: new files named by
    the settings, the finished ones untouched, its dense accuracy from its final.json (the
    --init file need not be there any more); the run's own settings are its final.json."""
    assert run(imagenet, tmp_path, '--gating', 'none') == 0
    dense = tmp_path / 'imagenet-dense-resnet18-s0'
    init = tmp_path / 'init.pt'
    init.write_bytes((dense / 'last.pt').read_bytes())
    assert run(imagenet, tmp_path, '--init', str(init)) == 0
    run_dir = tmp_path / RUN
    before = {f: f.read_bytes() for f in run_dir.iterdir() if f.name != '.lock'}
    init.unlink()
    assert train_imagenet.cli(['--evaluate', str(run_dir), '--tau', '0.4', '--device', 'cpu',
                               '--workers', '0']) == 0
    assert {f: f.read_bytes() for f in before} == before
    row = json.loads((run_dir / 'final-tau0.4-recal2.json').read_text())
    final = json.loads((run_dir / 'final.json').read_text())
    assert row['tau'] == 0.4 and row['baseline_acc'] == final['baseline_acc']
    assert (run_dir / 'pruned-tau0.4-recal2.pt2').exists()
    capsys.readouterr()
    assert train_imagenet.cli(['--evaluate', str(run_dir), '--workers', '0']) == 0
    assert 'before (final.json)' in capsys.readouterr().out
    assert 'dense baseline' in one_line_error(train_imagenet.cli(['--evaluate', str(dense)]))


def test_other_models_default_to_static_gates_and_a_random_start_is_said(imagenet, tmp_path,
                                                                         capsys):
    """--arch mobilenet_v3_small without --gating: static gates (dynamic ones are for the
    ResNets); without --init or --pretrained, one warning line says the start is random."""
    capsys.readouterr()
    assert run(imagenet, tmp_path, '--arch', 'mobilenet_v3_small', '--gating', 'static') == 0
    err = capsys.readouterr().err
    assert 'gating a randomly initialized network' in err
    assert train_imagenet.parse_args(['--arch', 'mobilenet_v3_small']).gating == 'static'
    assert train_imagenet.parse_args(['--arch', 'resnet50']).gating == 'dynamic'


def test_a_model_that_cannot_run_at_the_crop_is_refused_before_any_folder(imagenet, tmp_path,
                                                                          one_line_error):
    error = one_line_error(run(imagenet, tmp_path / 'out', '--arch', 'vit_b_16'))
    assert '--arch vit_b_16 at --crop-size 32 cannot run' in error
    assert not (tmp_path / 'out').exists()


def test_reuse_prints_the_final_line_and_the_run_folder_comes_first(imagenet, tmp_path, capsys):
    """Issue 32's wording: the run folder is said before training; the same command again
    prints the finished run's 'final:' line as train_cifar.py does, not raw JSON."""
    capsys.readouterr()
    assert run(imagenet, tmp_path) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f'run folder: {tmp_path / RUN}' in lines[:3]            # before 'args:' and training
    assert run(imagenet, tmp_path) == 0
    out = capsys.readouterr().out
    assert 'reusing the finished run in' in out and '\nfinal: arch resnet18' in out
    assert '{' not in out
