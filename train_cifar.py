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


def steps_at(epochs, *fractions):
    """lr milestones at these fractions (num, den) of `epochs`; none at epoch 0, so a run of
    one epoch trains at the base lr."""
    return sorted({epochs * num // den for num, den in fractions} - {0})


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a('--arch', default='resnet56', help=f'one of {", ".join(DEPTHS)}')
    a('--gating', help="static (pruning; ResNet default), dynamic (conditional computation; the DenseNets' "
                        "early exits), none (the dense baseline only) (3.2, 5)")
    a('--granularity', help='ResNets: channel (filter, default) or layer gates (4.4, Table 4)')
    a('--loss', default='flops', help='flops (3.4), batch (Eq. 1) or per-gate (AIG, 2.1)')
    a('--t', type=float, nargs='+', help='target rate(s) t in (0, 1], each a run from one dense baseline '
                                          '(default 0.5)')
    a('--targets', type=float, nargs='+', help='per-gate loss: one rate per gate module (default: t for each)')
    a('--tau', type=float, default=0.5, help='inference threshold (3.3)')
    a('--loss-weight', type=float, default=20.0, help='weight of the gate loss (the paper: 1; NOTES.md: polarization)')
    a('--gate-lr-mult', type=float, default=1000.0, help='gate learning rate / base (the paper: 1; NOTES.md: '
                                                         'polarization)')
    a('--gate-init-p', type=float, default=gc.INIT_P, help='initial on-probability of the gates '
                                                             '(DenseNet exits: 1 - this is the p of leaving)')
    a('--gate-lr-decay', action='store_true', help='the gate lr follows --milestones too (the paper); by default '
                                                    'it stays constant so the gates can finish polarizing')
    a('--gate-decay', type=float, default=20.0, help='gate weight decay = weight decay * this / |G| / gate lr mult '
                                                     '(3.2, 4.1)')
    a('--soft-gates', action='store_true', help='train with the soft Gumbel-softmax instead of straight-through (3.2)')
    a('--temperature', type=float, default=1.0, help='Gumbel-softmax temperature (3.2: fixed at 1)')
    a('--gate-sample', default='image', help='static gates draw once per image or once per batch')
    a('--polarize', type=float, default=0.01, help='weight of the polarization term mean 4p(1-p), rising from 0 '
                                                   'over fine-tuning (the paper: 0; NOTES.md: polarization)')
    a('--epochs', type=int, default=100, help='gated fine-tuning epochs (4.1)')
    a('--batch-size', type=int, default=256, help='gated fine-tuning batch (4.1)')
    a('--lr', type=float, default=0.1)
    a('--milestones', type=int, nargs='+', help='lr / 10 at these epochs (4.1; default 40%% and 70%% of --epochs)')
    a('--weight-decay', type=float, default=5e-4, help='fine-tuning weight decay (official code)')
    a('--dense-epochs', type=int, default=200, help='dense baseline epochs; lr / 10 at 50%% and 75%%')
    a('--dense-batch-size', type=int, default=128)
    a('--dense-weight-decay', type=float, default=1e-4)
    a('--init', help='dense checkpoint (or state_dict) to fine-tune from instead of training one')
    a('--recal-batches', type=int, default=200, help='BN recalibration batches before the final evaluation (4.1)')
    a('--also', nargs='*', default=[], help='more evaluations: all_on, sample, ensemble (3.3)')
    a('--runs', type=int, default=8, help='stochastic runs for --also sample / ensemble')
    a('--data-dir', default='data', help='holds cifar-10-batches-py (downloaded there when absent)')
    a('--synthetic', action='store_true', help='5,000 + 1,000 generated images of 10 stripe orientations: '
                                                'the whole method offline')
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
    args.t = [] if args.gating == 'none' else args.t or [0.5]
    args.milestones = args.milestones or steps_at(args.epochs, (2, 5), (7, 10))
    if not all(0 < t <= 1 for t in args.t) or len(set(args.t)) != len(args.t):
        raise UsageError(f'--t must be distinct rates in (0, 1], got {args.t}')
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


def stripes(n, seed):
    """A learnable offline stand-in for CIFAR-10: (uint8 (n, 3, 32, 32), int64 (n,)). Class k
    is a sinusoidal grating with unsigned orientation 22.5 * (k % 5) degrees (mirrored at
    random, so horizontal flips keep the class) and period 4 or 8 px (k < 5 or not), with
    random phase, contrast and colour under Gaussian noise: a few channels suffice."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    mirror = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    theta = mirror * (y % 5) * math.pi / 8
    period = 4 + 4 * (y // 5) + torch.rand(n, generator=g) - 0.5
    phase = 2 * math.pi * torch.rand(n, generator=g)
    r = torch.arange(32.0)
    proj = r.view(1, 32, 1) * torch.cos(theta).view(n, 1, 1) + r.view(1, 1, 32) * torch.sin(theta).view(n, 1, 1)
    wave = torch.sin(2 * math.pi * proj / period.view(n, 1, 1) + phase.view(n, 1, 1))          # (n, 32, 32)
    colour = (20 + 60 * torch.rand(n, 3, 1, 1, generator=g)) * torch.sign(torch.randn(n, 3, 1, 1, generator=g))
    x = 128 + colour * wave[:, None] + 30 * torch.randn(n, 3, 32, 32, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8), y


def load_data(args, device):
    """(x_train, y_train, x_test, y_test) on `device`, images uint8."""
    if args.synthetic:
        return [d.to(device) for d in (*stripes(5_000, seed=1234), *stripes(1_000, seed=4321))]
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


def gate_loss(info, args, progress):
    """The gate terms of the training loss at `progress` (0 -> 1) through fine-tuning:
    loss weight x (L_FLOPs (3.4), Eq. (1) or the per-gate loss (2.1)), plus the polarization
    term, its weight rising linearly from 0 (NOTES.md: polarization)."""
    if args.loss == 'flops':
        loss = gc.flops_loss(info, args.t)
    elif args.loss == 'batch':
        loss = gc.batch_activation_loss(info, args.t)
    else:
        loss = gc.per_gate_loss(info, args.targets or [args.t] * len(info.z))
    return args.loss_weight * loss + args.polarize * progress * gc.polarization_loss(info)


def gate_stats(info):
    """(activation rate, MACs % of the dense net, share of polarized probabilities), a (3,) tensor."""
    p = torch.cat(info.p, 1)
    return torch.stack([torch.cat(info.z, 1).double().mean(), 100 * (info.flops / info.max_flops).mean(),
                        ((p < 0.01) | (p > 0.99)).double().mean()]).detach()       # float64: exact MACs


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


ROW = '{:>5} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>7} {:>8} {:>8}'


def run_phase(phase, model, data, args, run_dir, device, autocast):
    """Train `model` for one phase ('dense' or 'gated') with checkpoints in run_dir; returns the
    trained model and the phase's last metrics row."""
    dense = phase == 'dense'
    epochs = args.dense_epochs if dense else args.epochs
    batch_size = args.dense_batch_size if dense else args.batch_size
    milestones = steps_at(epochs, (1, 2), (3, 4)) if dense else args.milestones
    warmup = dense and DEPTHS[args.arch] >= 110                 # ResNet-110: lr 0.01 in epoch 0
    groups = gc.param_groups(model, args.lr, args.dense_weight_decay if dense else args.weight_decay,
                             args.gate_decay, args.gate_lr_mult)
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)

    def weights_lr(e):
        return (0.1 if warmup and e == 0 else 1) * 0.1 ** sum(e >= m for m in milestones)
    gates_lr = weights_lr if args.gate_lr_decay else (lambda e: 1.0)     # NOTES.md: polarization
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [weights_lr, gates_lr][:len(groups)])
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
    print(ROW.format('epoch', 'lr', 'CE', 'gate', 'train%', 'test%', 'rate', 'MACs%', 'polar', 'sec', 'img/s',
                     'thrMACs%'))
    steps_per_epoch = len(x_train) // batch_size
    for epoch in range(start, epochs):
        model.train()
        t0, n, batches, stats, first = time.perf_counter(), 0, 0, 0, None
        sums = torch.zeros(3, device=device)                    # CE, gate loss, correct: no sync per step
        for i, (xb, yb) in enumerate(train_batches(x_train, y_train, batch_size, gen)):
            progress = (epoch * steps_per_epoch + i) / (epochs * steps_per_epoch)
            with autocast():
                out = step_model(xb)
                logits, info = out if isinstance(out, tuple) else (out, None)
                ce = F.cross_entropy(logits, yb)                # of the output each image takes
                for exit_logits in getattr(info, 'exit_logits', [])[:-1]:
                    ce = ce + F.cross_entropy(exit_logits, yb)  # each exit learns to classify (5)
                gl = gate_loss(info, args, progress) if info is not None else torch.zeros((), device=device)
                loss = ce + gl
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
                         f'{polar:.2f}', f'{seconds:.1f}', f'{n / seconds:.0f}', f'{test_gates[1]:.1f}'), flush=True)
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
    dense_dir = out / run_name(args, 'dense')
    dense_done = bool(args.init) or check_run_dir(dense_dir, args, args.dense_epochs, ('arch', 'seed', 'synthetic'),
                                                  reuse_finished=True)
    runs = [argparse.Namespace(**{**vars(args), 't': t}) for t in args.t]     # one gated run per target
    for run in runs:
        check_run_dir(out / run_name(run, 'gated'), run, run.epochs, STRUCTURE)
    ensure_writable([out / run_name(run, 'gated') for run in runs] + [dense_dir] * (not runs or not dense_done), out)
    print('args:', json.dumps(vars(args)))
    torch.manual_seed(args.seed)
    data = load_data(args, device)
    if runs:                                                    # the gated net's checks are cheap: first
        n_modules = len(gc._gates(build(args, gated=True)))
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
    if not runs:
        row = dict(arch=args.arch, gating=args.gating, baseline_acc=base_acc)
        finish(row, dense_dir)
        return [row]
    return [fine_tune(run, out / run_name(run, 'gated'), dense, base_acc, data, device, autocast) for run in runs]


def fine_tune(args, run_dir, dense, base_acc, data, device, autocast):
    """2-4 for one target t: gated fine-tuning from the dense weights, BN recalibration,
    evaluation, export. Returns the final row."""
    torch.manual_seed(args.seed)
    model = gc.set_sampling(build(args, gated=True), args.soft_gates, args.temperature,
                            per_batch=args.gate_sample == 'batch')
    load_weights(model, dense.state_dict(), 'the dense baseline', gated=True)
    model, last = run_phase('gated', model, data, args, run_dir, device, autocast)
    # 3. BN recalibration under threshold inference, then the evaluation (3.3, 4.1)
    gc.set_inference(model, 'threshold', args.tau)
    gen = torch.Generator().manual_seed(args.seed + 2)
    epochs_of_batches = (b for _ in itertools.count() for b in train_batches(*data[:2], args.batch_size, gen))
    recal = (xb for xb, _ in itertools.islice(epochs_of_batches, args.recal_batches))
    with autocast():
        gc.recalibrate_bn(model, recal)
    acc, rate, macs, polar = evaluate(model, data[2], data[3], autocast)
    row = dict(arch=args.arch, gating=args.gating, baseline_acc=base_acc, granularity=args.granularity,
               loss=args.loss, t=args.t, tau=args.tau, gated_acc=acc, macs_percent=macs,
               train_macs_percent=last['macs'] if last else math.nan, activation_rate=rate, polarized=polar,
               epochs=last['epoch'] if last else 0)
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
    if args.gating == 'dynamic':                                # Fig. 4: which classes each gate runs on
        with autocast():
            rates = gc.per_class_rates(model, test_batches(*data[2:]), 10)
        write_class_rates(rates, CLASSES, run_dir)
    if isinstance(model, gc.DenseNetExits):                    # Table 5: where images leave
        with autocast():
            row['table5'] = report = gc.exit_report(model, test_batches(*data[2:], size=500))
        for e in report['exits']:
            print(f"exit {e['exit']}: {100 * e['share']:5.2f}% of images leave, accuracy "
                  f"{100 * e['acc_all']:5.2f} on all, {100 * e['acc_taken']:5.2f} on those taken")
        print(f"MACs spent {report['counted_macs'] / report['full_macs']:.1%} of running every image to the "
              f"end; time {report['seconds'] / report['seconds_to_the_end']:.2f} x")
    pruned = export(model, dense, prepare(data[2][:1]), run_dir, row)    # 4. the pruned network
    if pruned is not None:
        row['pruned_acc'] = evaluate(pruned, data[2], data[3], autocast)[0]
    warn_if_missed(row)
    finish(row, run_dir)
    return row


def warn_if_missed(row, points=3):
    """One line on stderr when the delivered net's MACs miss 100 t by more than `points`."""
    if abs(row['macs_percent'] - 100 * row['t']) > points:
        print(f"warning: the delivered net runs {row['macs_percent']:.1f}% of the dense MACs, more than {points} "
              f"points from t = {row['t']:g} (training reached {row['train_macs_percent']:.1f}%; NOTES.md: "
              f"polarization)", file=sys.stderr)


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
