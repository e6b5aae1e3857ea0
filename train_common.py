"""Training plumbing shared by train_cifar.py and train_imagenet.py: one-line errors, run
folders, atomic checkpoints and exact resume, the training epoch, the gate terms of the
loss, logging rows, and the files a finished run leaves. The method itself is in
gumbel_channels.py; nothing here is specific to a data set.
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import gumbel_channels as gc
import gumbel_export as ge

ROW = '{:>5} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>7} {:>8} {:>8}'
HEADER = ('epoch', 'lr', 'CE', 'gate', 'train%', 'test%', 'rate', 'MACs%', 'polar', 'sec', 'img/s',
          'thrMACs%')


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, nothing overwritten."""


def run_cli(main, argv=None):
    """Run main(argv) with bad input reported as one line on stderr and exit status 2."""
    try:
        main(argv)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


def autocast_for(device):
    """The precision context: bf16 autocast on CUDA (no loss scaling needed), float32 elsewhere."""
    if device.type == 'cuda':
        return lambda: torch.autocast('cuda', torch.bfloat16)
    return lambda: torch.autocast('cpu', enabled=False)


# ----------------------------------------------------------------------------- run folders

def ensure_writable(dirs, out):
    """Create the run folders and prove they are writable, before any work is done."""
    try:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / '.write-test').touch()
            (d / '.write-test').unlink()
    except OSError as e:
        raise UsageError(f'cannot write in --out {out}: {e.strerror}') from None


def save_atomic(obj, path):
    tmp = path.with_suffix('.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ''
        raise UsageError(f'cannot read checkpoint {path}: {type(e).__name__}: {first}') from None


def load_weights(model, state, source, gated):
    """Dense weights into `model`; only gates (and exit heads) may be missing when `gated`."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip()
        raise UsageError(f'{source} does not fit {type(model).__name__}: {detail}') from None
    missing = [k for k in missing if not (gated and ('.gate' in k or k.startswith('exits.')))]
    if missing or unexpected:
        raise UsageError(f'{source} does not fit the model: missing {missing[:3]}, '
                         f'unexpected {unexpected[:3]}')


def check_run_dir(run_dir, args, epochs, keys, reuse_finished=False):
    """True when the run in run_dir finished already. Refuses a run written by another
    configuration (keys differ), and any run not asked to --resume, except a finished one
    when reuse_finished (a dense baseline)."""
    path = run_dir / 'last.pt'
    if not path.exists():
        return False
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or any(ckpt.get('args', {}).get(k) != getattr(args, k)
                                         for k in keys):
        raise UsageError(f'{path} was not written by this configuration ({", ".join(keys)} differ)')
    done = ckpt['epoch'] >= epochs
    if not args.resume and not (done and reuse_finished):
        state = 'a finished' if done else f'an unfinished (epoch {ckpt["epoch"]} of {epochs})'
        raise UsageError(f'{run_dir} holds {state} run: pass --resume to continue it, '
                         'or choose another --out')
    return done


# ----------------------------------------------------------------------------- checkpoints

def checkpoint(model, opt, sched, epoch, best, args, metrics, gen=None):
    """Everything an exact resume needs: weights, optimizer, scheduler, epoch, best accuracy,
    args, the last metrics and every RNG state (torch, CUDA, the data generator)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    return dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                epoch=epoch, best_acc=best, args=vars(args), metrics=metrics,
                rng=dict(torch=torch.get_rng_state(), cuda=cuda,
                         data=None if gen is None else gen.get_state()))


def resume(run_dir, model, opt, sched, gen=None):
    """Restore what checkpoint() saved in run_dir/last.pt; returns (epoch, best, metrics)."""
    ckpt = load_checkpoint(run_dir / 'last.pt')
    load_weights(model, ckpt['model'], run_dir / 'last.pt', gated=False)
    opt.load_state_dict(ckpt['optimizer'])
    sched.load_state_dict(ckpt['scheduler'])
    torch.set_rng_state(ckpt['rng']['torch'])
    if ckpt['rng'].get('cuda') is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt['rng']['cuda'])
    if gen is not None:
        gen.set_state(ckpt['rng']['data'])
    _sync_metrics(run_dir / 'metrics.jsonl', ckpt['metrics'])
    return ckpt['epoch'], ckpt['best_acc'], ckpt['metrics']


def _sync_metrics(path, last):
    """metrics.jsonl up to the checkpoint's epoch: lines written after it are dropped, and a
    line lost to a crash between checkpoint and log is restored from the checkpoint."""
    lines = path.read_text().splitlines() if path.exists() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    kept = [r for r in rows if r.get('epoch', 0) <= last['epoch']]
    if not kept or kept[-1].get('epoch') != last['epoch']:
        kept.append(last)
    path.write_text(''.join(json.dumps(r) + '\n' for r in kept))


def record_epoch(run_dir, ckpt, metrics, improved):
    """The epoch's checkpoints (best.pt when the test accuracy improved, then last.pt), and
    only then its metrics line, so metrics.jsonl never runs ahead of last.pt."""
    if improved:
        save_atomic(ckpt, run_dir / 'best.pt')
    save_atomic(ckpt, run_dir / 'last.pt')
    with open(run_dir / 'metrics.jsonl', 'a') as f:
        f.write(json.dumps(metrics) + '\n')


# ----------------------------------------------------------------------------- the epoch

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
    """(activation rate, MACs % of the dense net, share of polarized p), a (3,) float64 tensor."""
    p = torch.cat(info.p, 1)
    return torch.stack([torch.cat(info.z, 1).double().mean(),
                        100 * (info.macs / info.max_macs).mean(),
                        gc.polarized(p).double().mean()]).detach()


def averages(stats, batches):
    """Per-batch gate statistics summed over an epoch -> their means (NaN for a dense net)."""
    return (stats / batches).tolist() if batches else [math.nan] * 3


def train_epoch(model, step_model, batches, opt, args, autocast, progress):
    """One epoch: loss = CE of the output each image takes (+ every exit classifier's CE for
    an early-exit net, 5) + gate_loss. `progress(i)` is the share of training done at step i.
    Returns dict(ce, gate_loss, train_acc, rate, macs, polarized, images, seconds, first_loss)."""
    model.train()
    device = next(model.parameters()).device
    t0, n, stats, gated, first = time.perf_counter(), 0, 0, 0, None
    sums = torch.zeros(3, device=device)                    # CE, gate loss, correct: no sync
    for i, (xb, yb) in enumerate(batches):
        with autocast():
            logits, info = gc.split_output(step_model(xb))
            ce = F.cross_entropy(logits, yb)
            for exit_logits in (info.exit_logits or [])[:-1] if info is not None else []:
                ce = ce + F.cross_entropy(exit_logits, yb)
            gl = torch.zeros((), device=device) if info is None else gate_loss(info, args,
                                                                                 progress(i))
            loss = ce + gl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.detach() if first is None else first
        sums += torch.stack([ce.detach() * len(yb), gl.detach() * len(yb),
                             (logits.argmax(1) == yb).sum()])
        n += len(yb)
        if info is not None:
            stats, gated = stats + gate_stats(info), gated + 1
    ce, gl, correct = (sums / n).tolist()
    rate, macs, polar = averages(stats, gated)
    return dict(ce=ce, gate_loss=gl, train_acc=100 * correct, rate=rate, macs=macs,
                polarized=polar, images=n, seconds=time.perf_counter() - t0,
                first_loss=first.item())


def print_row(epoch, lr, m, test_acc, test_macs, images_per_s):
    print(ROW.format(epoch, f'{lr:.4f}', f'{m["ce"]:.3f}', f'{m["gate_loss"]:.4f}',
                     f'{m["train_acc"]:.2f}', f'{test_acc:.2f}', f'{m["rate"]:.3f}',
                     f'{m["macs"]:.1f}', f'{m["polarized"]:.2f}', f'{m["seconds"]:.1f}',
                     f'{images_per_s:.0f}', f'{test_macs:.1f}'), flush=True)


# ----------------------------------------------------------------------------- the end of a run

@torch.no_grad()
def per_class_rates(model, batches, num_classes):
    """Fig. 4: activation rate of every gate module (mean of Z over its channels) per class,
    (num_classes, modules), over (images, labels) batches, in evaluation mode (restored after)."""
    sums, counts = 0, torch.zeros(num_classes, 1)
    with gc.evaluation(model):
        for x, y in batches:
            z = torch.stack([z.float().mean(1) for z in model(x)[1].z], 1).cpu()  # (B, modules)
            y = F.one_hot(y.cpu(), num_classes).float()                             # (B, classes)
            sums, counts = sums + y.T @ z, counts + y.sum(0)[:, None]
    return sums / counts.clamp(min=1)


def write_class_rates(rates, names, run_dir):
    """Fig. 4: per-class activation rates (classes, gate modules) as gate_classes.csv, and per
    gate the classes it runs on most and least and its specialization (the standard deviation
    of its per-class rates around its mean) in gate_classes.txt."""
    header = 'class,' + ','.join(f'gate{j}' for j in range(rates.shape[1]))
    rows = [f'{name},' + ','.join(f'{r:.4f}' for r in row)
            for name, row in zip(names, rates.tolist())]
    (run_dir / 'gate_classes.csv').write_text('\n'.join([header, *rows]) + '\n')
    lines = []
    for j, col in enumerate(rates.T):
        hi, lo = col.argmax().item(), col.argmin().item()
        lines.append(f'gate{j}: mean {col.mean():.3f}, specialization '
                     f'{col.std(unbiased=False):.3f}, most {names[hi]} ({col[hi]:.2f}), '
                     f'least {names[lo]} ({col[lo]:.2f})')
    (run_dir / 'gate_classes.txt').write_text('\n'.join(lines) + '\n')


def export(model, baseline, x1, run_dir, row):
    """Save the final gated weights; for static gates also the physically pruned network
    (pruned.pt), whose FlopCounterMode MACs % of the dense net goes into row. Returns it."""
    save_atomic(model.state_dict(), run_dir / 'final.pt')
    if not all(isinstance(g, gc.StaticGate) for g in gc.gates(model)):
        return None
    pruned = ge.prune(model)
    dense_macs = ge.counted_macs(baseline.eval(), x1)
    row['pruned_macs_percent'] = 100 * ge.counted_macs(pruned, x1) / dense_macs
    torch.save(pruned, run_dir / 'pruned.pt')
    return pruned


def warn_if_missed(row, points=3):
    """One line on stderr when the delivered net's MACs miss 100 t by more than `points`."""
    if abs(row['macs_percent'] - 100 * row['t']) > points:
        print(f"warning: the delivered net runs {row['macs_percent']:.1f}% of the dense MACs, "
              f"more than {points} points from t = {row['t']:g} (training reached "
              f"{row['train_macs_percent']:.1f}%; NOTES.md: polarization)", file=sys.stderr)


def finish(row, run_dir):
    (run_dir / 'final.json').write_text(json.dumps(row, indent=1))
    print('final:', '  '.join(f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}'
                              for k, v in row.items()))
