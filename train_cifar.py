"""Reproduce a CIFAR-10 row of Herrmann, Bowen and Zabih (ECCV 2020) with one command.

    python train_cifar.py --arch resnet56 --t 0.5          # Table 3: pruning ResNet-56, t = 0.5
    python train_cifar.py --synthetic --arch resnet20 --dense-epochs 1 --epochs 1   # anywhere

The paper's whole pipeline: a dense baseline (trained with the standard recipe, or reused
from --init or from an earlier run of the same arch and seed), gated fine-tuning from it
(4.1), BN recalibration under threshold inference (4.1), evaluation at tau = 0.5 (3.3),
and the row to hold against Table 3, printed and saved as final.json. Static gates also
give a physically pruned model, pruned.pt (load with torch.load(..., weights_only=False)).
CIFAR-10 lives on the training device as uint8; crops and flips happen there per batch.
"""
import argparse
import itertools
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gumbel_channels as gc

DEPTHS = {**{f'resnet{d}': d for d in (8, 20, 32, 44, 56, 110)},  # resnet8, densenet16: quick checks
          **{f'densenet{d}': d for d in (16, 40, 100)}}
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1) * 255
STRUCTURE = ('arch', 'gating', 'granularity', 'seed', 'synthetic')  # a checkpoint must match these
CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, nothing overwritten."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a('--arch', default='resnet56', help=f'one of {", ".join(DEPTHS)}')
    a('--gating', help="static (pruning; ResNet default), dynamic (conditional computation; the DenseNets' "
                        "early exits), none (the dense baseline only) (3.2, 5)")
    a('--granularity', help='ResNets: channel (filter, default) or layer gates (4.4, Table 4)')
    a('--loss', default='flops', help='flops (3.4), batch (Eq. 1) or per-gate (AIG, 2.1)')
    a('--t', type=float, default=None, help='target rate t in (0, 1]; 0.5 for gated runs if not given')
    a('--targets', type=float, nargs='+', help='per-gate loss: one rate per gate module (default: t for each)')
    a('--tau', type=float, default=0.5, help='inference threshold (3.3)')
    a('--loss-weight', type=float, default=1.0, help='weight of the gate loss (the paper: 1)')
    a('--gate-lr-mult', type=float, default=10.0, help='gate learning rate / base (NOTES.md: gate dynamics)')
    a('--gate-init-p', type=float, default=gc.INIT_P, help='initial on-probability of the gates '
                                                             '(DenseNet exits: 1 - this is the p of leaving)')
    a('--gate-decay', type=float, default=20.0, help='gate weight decay = weight decay * this / |G| (3.2)')
    a('--soft-gates', action='store_true', help='train with the soft Gumbel-softmax instead of straight-through (3.2)')
    a('--epochs', type=int, default=100, help='gated fine-tuning epochs (4.1)')
    a('--batch-size', type=int, default=256, help='gated fine-tuning batch (4.1)')
    a('--lr', type=float, default=0.1)
    a('--milestones', type=int, nargs='+', default=[40, 70], help='lr / 10 at these epochs (4.1)')
    a('--weight-decay', type=float, default=5e-4, help='fine-tuning weight decay (official code)')
    a('--dense-epochs', type=int, default=200, help='dense baseline epochs; lr / 10 at 50%% and 75%%')
    a('--dense-batch-size', type=int, default=128)
    a('--dense-weight-decay', type=float, default=1e-4)
    a('--init', help='dense checkpoint (or state_dict) to fine-tune from instead of training one')
    a('--recal-batches', type=int, default=200, help='BN recalibration batches before the final evaluation (4.1)')
    a('--also', nargs='*', default=[], help='more evaluations: all_on, sample, ensemble (3.3)')
    a('--runs', type=int, default=8, help='stochastic runs for --also sample / ensemble')
    a('--data-dir', default='data', help='holds cifar-10-batches-py (downloaded there when absent)')
    a('--synthetic', action='store_true', help='5,000 + 1,000 random CIFAR-shaped images: the pipeline offline')
    a('--out', default='runs', help='runs are written in subfolders of this folder')
    a('--resume', action='store_true', help="continue this configuration's unfinished run from last.pt")
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    a('--compile', action='store_true', help='torch.compile the model')
    a('--seed', type=int, default=0)
    args = p.parse_args(argv)
    if args.arch not in DEPTHS:
        raise UsageError(f'--arch must be one of {", ".join(DEPTHS)}, got {args.arch!r}')
    if args.arch.startswith('densenet'):                        # early exits (5): data-dependent gates
        if args.gating not in (None, 'dynamic', 'none') or args.granularity is not None:
            raise UsageError('the DenseNets have early-exit gates: --gating dynamic (or none), no --granularity')
        args.gating, args.granularity = args.gating or 'dynamic', 'exit'
    args.gating, args.granularity = args.gating or 'static', args.granularity or 'channel'
    for name, allowed in (('gating', ('static', 'dynamic', 'none')), ('granularity', (*gc.GRANULARITIES, 'exit')),
                          ('loss', ('flops', 'batch', 'per-gate'))):
        if getattr(args, name) not in allowed:
            raise UsageError(f'--{name} must be one of {", ".join(allowed)}, got {getattr(args, name)!r}')
    if args.gating == 'none' and args.t is not None:
        raise UsageError('--t sets the target rate of gates; --gating none trains only the dense baseline')
    args.t = 0.5 if args.t is None else args.t
    if not 0 < args.t <= 1:
        raise UsageError(f'--t must be in (0, 1], got {args.t}')
    if not 0 < args.tau < 1:
        raise UsageError(f'--tau must be in (0, 1), got {args.tau}')
    if set(args.also) - {'all_on', 'sample', 'ensemble'}:
        raise UsageError(f'--also takes all_on, sample, ensemble; got {args.also}')
    return args


# ----------------------------------------------------------------------------- data

def read_cifar(folder):
    """CIFAR-10 python batches (data_batch_*, test_batch) -> uint8 (N, 3, 32, 32), int64 (N,)."""
    folder = Path(folder)
    train_files = sorted(folder.glob('data_batch_*'))
    if not train_files or not (folder / 'test_batch').is_file():
        raise FileNotFoundError(folder)

    def read(files):
        xs, ys = [], []
        for f in files:
            with open(f, 'rb') as fh:
                batch = pickle.load(fh, encoding='bytes')       # the official format is pickle
            x, y = batch[b'data'], batch[b'labels']
            if x.dtype.name != 'uint8' or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
                raise UsageError(f'{f}: expected uint8 data (N, 3072) with N labels')
            xs.append(torch.from_numpy(x).view(-1, 3, 32, 32))
            ys.append(torch.tensor(y, dtype=torch.int64))
        x, y = torch.cat(xs), torch.cat(ys)
        if y.min() < 0 or y.max() > 9:
            raise UsageError(f'{folder}: labels must lie in 0..9')
        return x, y
    return (*read(train_files), *read([folder / 'test_batch']))


def load_data(args, device):
    """(x_train, y_train, x_test, y_test) on `device`, images uint8."""
    if args.synthetic:
        g = torch.Generator().manual_seed(1234)
        data = (torch.randint(0, 256, (5_000, 3, 32, 32), generator=g, dtype=torch.uint8),
                torch.randint(0, 10, (5_000,), generator=g),
                torch.randint(0, 256, (1_000, 3, 32, 32), generator=g, dtype=torch.uint8),
                torch.randint(0, 10, (1_000,), generator=g))
        return [d.to(device) for d in data]
    folder = Path(args.data_dir) / 'cifar-10-batches-py'
    if not folder.is_dir():
        try:
            import torchvision
            torchvision.datasets.CIFAR10(args.data_dir, download=True)
        except Exception as e:                                   # offline, or no permission
            raise UsageError(f'CIFAR-10 is not in {folder} and could not be downloaded ({type(e).__name__}). '
                             f'Put the python version (cifar-10-python.tar.gz, extracted) there, '
                             f'or pass --synthetic') from None
    try:
        return [d.to(device) for d in read_cifar(folder)]
    except FileNotFoundError:
        raise UsageError(f'{folder} holds no data_batch_* and test_batch files') from None


def augment(x, gen):
    """Random crop (zero padding 4) and horizontal flip of uint8 (B, 3, 32, 32), on x's device."""
    b = x.shape[0]
    shift = torch.randint(0, 9, (2, b, 1), generator=gen).to(x.device)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    padded = F.pad(x, (4, 4, 4, 4))
    rows = (shift[0] + torch.arange(32, device=x.device))[:, :, None]        # (B, 32, 1)
    cols = (shift[1] + torch.arange(32, device=x.device))[:, None, :]        # (B, 1, 32)
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # (B, 32, 32, 3)
    out = out.permute(0, 3, 1, 2)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def prepare(x):
    """uint8 (B, 3, 32, 32) -> normalized float, channels_last."""
    return ((x.float() - MEAN.to(x.device)) / STD.to(x.device)).contiguous(memory_format=torch.channels_last)


def train_batches(x, y, batch_size, gen):
    perm = torch.randperm(len(x), generator=gen).to(x.device)
    for i in range(0, len(x) - batch_size + 1, batch_size):     # drop the last partial batch
        idx = perm[i:i + batch_size]
        yield prepare(augment(x[idx], gen)), y[idx]


# ----------------------------------------------------------------------------- training

def build(args, gated):
    """The CIFAR network of --arch: dense, or with its gates (ResNets) or exits (DenseNets)."""
    depth = DEPTHS[args.arch]
    if args.arch.startswith('densenet'):
        model = gc.densenet_cifar(depth, exits=gated, init_p=1 - args.gate_init_p)   # p of leaving
    else:
        model = gc.resnet_cifar(depth, gating=args.gating if gated else None, granularity=args.granularity,
                                init_p=args.gate_init_p)
    return model.to(args.device, memory_format=torch.channels_last)


def gate_loss(info, args):
    if args.loss == 'flops':
        return gc.flops_loss(info, args.t)
    if args.loss == 'batch':
        return gc.batch_activation_loss(info, args.t)
    return gc.per_gate_loss(info, args.targets or [args.t] * len(info.z))


def gate_stats(info):
    """(activation rate, MACs % of the dense net, share of polarized probabilities), a (3,) tensor."""
    p = torch.cat(info.p, 1)
    return torch.stack([torch.cat(info.z, 1).mean(), 100 * (info.flops / info.max_flops).mean().float(),
                        ((p < 0.01) | (p > 0.99)).float().mean()]).detach()


def averages(stats, batches):
    """Per-batch gate statistics summed over an epoch -> their means (NaN for a dense net)."""
    return (stats / batches).tolist() if batches else [math.nan] * 3


def test_batches(x, y, size=1000):
    """(prepared images, labels) of the test set in chunks, as every evaluation reads it."""
    for i in range(0, len(x), size):
        yield prepare(x[i:i + size]), y[i:i + size]


@torch.no_grad()
def evaluate(model, x, y, autocast):
    """Accuracy % and (rate, MACs %, polarized) under the model's current inference strategy."""
    model.eval()
    correct, stats, batches = 0, 0, 0
    for xb, yb in test_batches(x, y):
        with autocast():
            out = model(xb)
        logits, info = out if isinstance(out, tuple) else (out, None)
        correct += (logits.argmax(1) == yb).sum()
        if info is not None:
            stats, batches = stats + gate_stats(info), batches + 1
    return 100 * correct.item() / len(x), *averages(stats, batches)


def write_class_rates(rates, names, run_dir):
    """Fig. 4: per-class activation rates (classes, gate modules) as gate_classes.csv, and per
    gate the classes it runs on most and least and its specialization (the standard deviation
    of its per-class rates around its mean) in gate_classes.txt."""
    header = 'class,' + ','.join(f'gate{j}' for j in range(rates.shape[1]))
    rows = [f'{name},' + ','.join(f'{r:.4f}' for r in row) for name, row in zip(names, rates.tolist())]
    (run_dir / 'gate_classes.csv').write_text('\n'.join([header, *rows]) + '\n')
    lines = []
    for j, col in enumerate(rates.T):
        hi, lo = col.argmax().item(), col.argmin().item()
        lines.append(f'gate{j}: mean {col.mean():.3f}, specialization {col.std(unbiased=False):.3f}, most '
                     f'{names[hi]} ({col[hi]:.2f}), least {names[lo]} ({col[lo]:.2f})')
    (run_dir / 'gate_classes.txt').write_text('\n'.join(lines) + '\n')


def save_atomic(obj, path):
    tmp = path.with_suffix('.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UsageError(f'cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}') from None


def load_weights(model, state, source, gated):
    """Dense weights into `model`; only gates (and exit heads) may be missing when `gated`."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UsageError(f'{source} does not fit {type(model).__name__}: {str(e).splitlines()[1].strip()}') from None
    missing = [k for k in missing if not (gated and ('.gate' in k or k.startswith('exits.')))]
    if missing or unexpected:
        raise UsageError(f'{source} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}')


ROW = '{:>5} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>7} {:>8}'


def run_phase(phase, model, data, args, run_dir, device, autocast):
    """Train `model` for one phase ('dense' or 'gated') with checkpoints in run_dir; returns the
    trained model and the phase's last metrics row."""
    dense = phase == 'dense'
    epochs = args.dense_epochs if dense else args.epochs
    batch_size = args.dense_batch_size if dense else args.batch_size
    milestones = [epochs // 2, epochs * 3 // 4] if dense else args.milestones
    warmup = dense and DEPTHS[args.arch] >= 110                 # ResNet-110: lr 0.01 in epoch 0
    groups = gc.param_groups(model, args.lr, args.dense_weight_decay if dense else args.weight_decay,
                             args.gate_decay, args.gate_lr_mult)
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: (0.1 if warmup and e == 0 else 1) * 0.1 ** sum(e >= m for m in milestones))
    gen = torch.Generator().manual_seed(args.seed + (0 if dense else 1))
    start, best, last = 0, -1.0, None
    if (run_dir / 'last.pt').exists():                          # only with --resume (checked in main)
        ckpt = load_checkpoint(run_dir / 'last.pt')
        load_weights(model, ckpt['model'], run_dir / 'last.pt', gated=False)
        opt.load_state_dict(ckpt['optimizer'])
        sched.load_state_dict(ckpt['scheduler'])
        gen.set_state(ckpt['rng']['data'])
        torch.set_rng_state(ckpt['rng']['torch'])
        if device.type == 'cuda' and ckpt['rng']['cuda'] is not None:
            torch.cuda.set_rng_state(ckpt['rng']['cuda'])
        start, best, last = ckpt['epoch'], ckpt['best_acc'], ckpt['metrics']
        print(f'{phase}: resumed from {run_dir / "last.pt"} after epoch {start}')
    step_model = torch.compile(model) if args.compile else model
    x_train, y_train, x_test, y_test = data
    print(f'{phase}: {epochs} epochs, batch {batch_size}, lr {args.lr} / 10 at {milestones}, run dir {run_dir}')
    print(ROW.format('epoch', 'lr', 'CE', 'gate', 'train%', 'test%', 'rate', 'MACs%', 'polar', 'sec', 'img/s'))
    for epoch in range(start, epochs):
        model.train()
        t0, n, batches, stats, first = time.perf_counter(), 0, 0, 0, None
        sums = torch.zeros(3, device=device)                    # CE, gate loss, correct: no sync per step
        for xb, yb in train_batches(x_train, y_train, batch_size, gen):
            with autocast():
                out = step_model(xb)
                logits, info = out if isinstance(out, tuple) else (out, None)
                ce = F.cross_entropy(logits, yb)                # of the output each image takes
                for exit_logits in getattr(info, 'exit_logits', [])[:-1]:
                    ce = ce + F.cross_entropy(exit_logits, yb)  # each exit learns to classify (5)
                gl = gate_loss(info, args) if info is not None else torch.zeros((), device=device)
                loss = ce + args.loss_weight * gl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            first = loss.detach() if first is None else first
            sums += torch.stack([ce.detach() * len(yb), gl.detach() * len(yb), (logits.argmax(1) == yb).sum()])
            n += len(yb)
            if info is not None:
                stats, batches = stats + gate_stats(info), batches + 1
        lr = opt.param_groups[0]['lr']
        sched.step()
        ce, gl, correct = (sums / n).tolist()
        rate, macs, polar = averages(stats, batches)
        seconds = time.perf_counter() - t0
        test_acc, *test_gates = evaluate(model, x_test, y_test, autocast)
        last = dict(phase=phase, epoch=epoch + 1, lr=lr, ce=ce, gate_loss=gl, train_acc=100 * correct,
                    test_acc=test_acc, rate=rate, macs=macs, polarized=polar, test_rate=test_gates[0],
                    test_macs=test_gates[1], seconds=seconds, images_per_s=n / seconds, first_loss=first.item())
        print(ROW.format(epoch + 1, f'{lr:.4f}', f'{last["ce"]:.3f}', f'{last["gate_loss"]:.4f}',
                         f'{last["train_acc"]:.2f}', f'{test_acc:.2f}', f'{rate:.3f}', f'{macs:.1f}',
                         f'{polar:.2f}', f'{seconds:.1f}', f'{n / seconds:.0f}'), flush=True)
        with open(run_dir / 'metrics.jsonl', 'a') as f:
            f.write(json.dumps(last) + '\n')
        ckpt = dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                    epoch=epoch + 1, best_acc=max(best, test_acc), args=vars(args), metrics=last,
                    rng=dict(data=gen.get_state(), torch=torch.get_rng_state(),
                             cuda=torch.cuda.get_rng_state() if device.type == 'cuda' else None))
        if test_acc > best:
            best = test_acc
            save_atomic(ckpt, run_dir / 'best.pt')
        save_atomic(ckpt, run_dir / 'last.pt')
    return model, last


def run_name(args, phase):
    prefix = 'synthetic-' if args.synthetic else ''
    if phase == 'dense':
        return f'{prefix}dense-{args.arch}-s{args.seed}'
    soft = '-soft' if args.soft_gates else ''
    return f'{prefix}{args.arch}-{args.gating}-{args.granularity}-{args.loss}-t{args.t:g}{soft}-s{args.seed}'


def check_run_dir(run_dir, args, epochs, keys, reuse_finished=False):
    """True when the run in run_dir finished already. Refuses a run written by another
    configuration (keys differ), and any run not asked to --resume, except a finished one
    when reuse_finished (a dense baseline)."""
    path = run_dir / 'last.pt'
    if not path.exists():
        return False
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or any(ckpt.get('args', {}).get(k) != getattr(args, k) for k in keys):
        raise UsageError(f'{path} was not written by this configuration ({", ".join(keys)} differ)')
    done = ckpt['epoch'] >= epochs
    if not args.resume and not (done and reuse_finished):
        state = 'a finished' if done else f'an unfinished (epoch {ckpt["epoch"]} of {epochs})'
        raise UsageError(f'{run_dir} holds {state} run: pass --resume to continue it, or choose another --out')
    return done


def autocast_for(device):
    """The precision context: bf16 autocast on CUDA (no loss scaling needed), float32 elsewhere."""
    if device.type == 'cuda':
        return lambda: torch.autocast('cuda', torch.bfloat16)
    return lambda: torch.autocast('cpu', enabled=False)


def ensure_writable(dirs, out):
    """Create the run folders and prove they are writable, before any work is done."""
    try:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / '.write-test').touch()
            (d / '.write-test').unlink()
    except OSError as e:
        raise UsageError(f'cannot write in --out {out}: {e.strerror}') from None


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cpu':
        print('warning: training on the CPU; a GPU is much faster', file=sys.stderr)
    autocast = autocast_for(device)
    out = Path(args.out)
    dense_dir, gated_dir = out / run_name(args, 'dense'), out / run_name(args, 'gated')
    dense_done = bool(args.init) or check_run_dir(dense_dir, args, args.dense_epochs, ('arch', 'seed', 'synthetic'),
                                                  reuse_finished=True)
    gated = args.gating != 'none'
    if gated:
        check_run_dir(gated_dir, args, args.epochs, STRUCTURE)
    ensure_writable([gated_dir] * gated + [dense_dir] * (not gated or not dense_done), out)
    print('args:', json.dumps(vars(args)))
    torch.manual_seed(args.seed)
    data = load_data(args, device)

    if gated:                                                   # the gated net first: its checks are cheap
        model = gc.set_relaxation(build(args, gated=True), soft=args.soft_gates)
        n_modules = len(gc._gates(model))
        if args.loss == 'per-gate' and args.targets and len(args.targets) != n_modules:
            raise UsageError(f'--targets must give one rate per gate module ({n_modules}), got {len(args.targets)}')

    # 1. dense baseline: --init, an earlier run, or trained here (He et al.'s recipe)
    torch.manual_seed(args.seed)                                # the same dense net, gated run or not
    dense = build(args, gated=False)
    if args.init:
        state = load_checkpoint(args.init)
        load_weights(dense, state.get('model', state), args.init, gated=False)
        print(f'dense: weights from {args.init}')
    elif dense_done:
        load_weights(dense, load_checkpoint(dense_dir / 'last.pt')['model'], dense_dir / 'last.pt', gated=False)
        print(f'dense: reusing the finished baseline in {dense_dir}')
    else:
        dense, _ = run_phase('dense', dense, data, args, dense_dir, device, autocast)
    base_acc = evaluate(dense, data[2], data[3], autocast)[0]
    row = dict(arch=args.arch, gating=args.gating, baseline_acc=base_acc)
    if gated:
        # 2. gated fine-tuning from the dense weights (4.1)
        load_weights(model, dense.state_dict(), 'the dense baseline', gated=True)
        model, last = run_phase('gated', model, data, args, gated_dir, device, autocast)
        # 3. BN recalibration under threshold inference, then the evaluation (3.3, 4.1)
        gc.set_inference(model, 'threshold', args.tau)
        gen = torch.Generator().manual_seed(args.seed + 2)
        epochs_of_batches = (b for _ in itertools.count() for b in train_batches(*data[:2], args.batch_size, gen))
        recal = (xb for xb, _ in itertools.islice(epochs_of_batches, args.recal_batches))
        with autocast():
            gc.recalibrate_bn(model, recal)
        acc, rate, macs, polar = evaluate(model, data[2], data[3], autocast)
        row.update(granularity=args.granularity, loss=args.loss, t=args.t, tau=args.tau, gated_acc=acc,
                   macs_percent=macs, activation_rate=rate, polarized=polar, epochs=last['epoch'] if last else 0)
        for strategy in args.also:
            if strategy == 'all_on':
                gc.set_inference(model, 'all_on')
                row['all_on_acc'] = evaluate(model, data[2], data[3], autocast)[0]
            elif strategy == 'sample':
                gc.set_inference(model, 'sample')
                row['sample_acc'] = sum(evaluate(model, data[2], data[3], autocast)[0]
                                        for _ in range(args.runs)) / args.runs
            else:
                with autocast():
                    probs = torch.cat([gc.ensemble_predict(model, xb, args.runs) for xb, _ in test_batches(*data[2:])])
                row['ensemble_acc'] = 100 * (probs.argmax(1) == data[3]).float().mean().item()
            gc.set_inference(model, 'threshold', args.tau)
        if args.gating == 'dynamic':                            # Fig. 4: which classes each gate runs on
            with autocast():
                rates = gc.per_class_rates(model, test_batches(*data[2:]), 10)
            write_class_rates(rates, CLASSES, gated_dir)
        if isinstance(model, gc.DenseNetExits):                # Table 5: where images leave
            with autocast():
                row['table5'] = report = gc.exit_report(model, test_batches(*data[2:], size=500))
            for e in report['exits']:
                print(f"exit {e['exit']}: {100 * e['share']:5.2f}% of images leave, accuracy "
                      f"{100 * e['acc_all']:5.2f} on all, {100 * e['acc_taken']:5.2f} on those taken")
            print(f"MACs spent {report['counted_macs'] / report['full_macs']:.1%} of running every image to the "
                  f"end; time {report['seconds'] / report['seconds_to_the_end']:.2f} x")
        pruned = export(model, dense, prepare(data[2][:1]), gated_dir, row)    # 4. the pruned network
        if pruned is not None:
            row['pruned_acc'] = evaluate(pruned, data[2], data[3], autocast)[0]
    finish(row, gated_dir if gated else dense_dir)
    return row


def export(model, dense, x1, run_dir, row):
    """Save the final gated weights; for static gates also the physically pruned network
    (pruned.pt), whose FlopCounterMode MACs % of the dense net goes into row. Returns it."""
    save_atomic(model.state_dict(), run_dir / 'final.pt')
    if not all(isinstance(g, gc.StaticGate) for g in gc._gates(model)):
        return None
    pruned = gc.prune(model)
    row['pruned_macs_percent'] = 100 * gc.counted_macs(pruned, x1) / gc.counted_macs(dense.eval(), x1)
    torch.save(pruned, run_dir / 'pruned.pt')
    return pruned


def finish(row, run_dir):
    (run_dir / 'final.json').write_text(json.dumps(row, indent=1))
    print('final:', '  '.join(f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()))


def cli(argv=None, entry=None):
    """Run `entry` (main) with bad input reported as one line on stderr and exit status 2."""
    try:
        (entry or main)(argv)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(cli())
