"""Run folders, safe to skip on a first reading: atomic writes, checkpoints and an exact
resume, the rules for starting, resuming and reusing a run, the timed stages after training,
and the final row a finished run leaves. The command line's errors and parser are in cli.py,
the training loop in train_loop.py (the machine it runs on in machine.py), the models the
scripts build and export in script_models.py, the method in gumbel_channels.py.
"""
import argparse
import contextlib
import fcntl
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import cli
import machine

# the command line's errors, parser and types, re-exported for the scripts (rf.UsageError)
from cli import (COUNT, NON_NEGATIVE, OPEN_UNIT, POSITIVE, RATE, UNIT, WHOLE,  # noqa: F401
                 clock, HelpFormatter, Interrupted, Parser, RunError, UsageError, checked,
                 out_of_memory, run_cli)

def run_name(args, keys, *fixed):
    """A run folder's name from its structure flags `keys`, fixed words after the data set:
    'synthetic-resnet56-static-channel-flops-t0.5-s0'. CIFAR-10 and flags off leave no word."""
    words = {'synthetic': lambda v: 'synthetic' if v else '',
             'dataset': lambda v: '' if v == 'cifar10' else v,
             'train_size': lambda v: f'n{v}' if v else '',
             't': lambda v: f't{v:g}', 'seed': lambda v: f's{v}',
             'soft_gates': lambda v: 'soft' if v else ''}
    data = ('synthetic', 'dataset', 'train_size')
    lead = [words[k](getattr(args, k)) for k in data if k in keys]
    rest = [words.get(k, str)(getattr(args, k)) for k in keys if k not in data]
    return '-'.join(w for w in [*lead, *fixed, *rest] if w)



# ----------------------------------------------------------------------------- files

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
    """torch.save(obj, path) (or the text or bytes obj) through a temporary file: path is
    either the old file or the new one, and a failed write leaves no temporary file behind."""
    tmp = path.with_name(path.name + '.tmp')
    try:
        if isinstance(obj, str):
            tmp.write_text(obj)
        elif isinstance(obj, bytes):
            tmp.write_bytes(obj)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:                    # torch.save wraps some OSErrors
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) else str(e).splitlines()[0][:120]
        raise RunError(f'cannot write {path}: {reason}') from None


def to_json(obj, indent=None):
    """Strict JSON (RFC 8259): a NaN or infinite float becomes null."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        return [clean(v) for v in o] if isinstance(o, (list, tuple)) else o
    return json.dumps(clean(obj), indent=indent, allow_nan=False)


class InUse(UsageError):
    """A run folder that another process holds."""


@contextlib.contextmanager
def locked(dirs, wait=False, name='.lock'):
    """Hold an exclusive lock (the file `name`) on each run folder for the with-block: a
    second run on one of them stops with a one-line error (InUse) instead of interleaving
    its files, or, with wait, waits for the first to finish."""
    with contextlib.ExitStack() as stack:
        for d in dirs:
            f = stack.enter_context(open(d / name, 'a+'))
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise InUse(f'{d} is in use by another run; wait for it, or choose '
                            'another --out') from None
            stack.callback(fcntl.flock, f, fcntl.LOCK_UN)
        yield


# ----------------------------------------------------------------------------- checkpoints

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


def load_init(model, path):
    """--init: the dense weights of a checkpoint (its 'model') or a state_dict into model."""
    state = load_checkpoint(path)
    if not isinstance(state, dict):
        raise UsageError(f'--init {path} holds a {type(state).__name__}, not a checkpoint or '
                         'state_dict')
    load_weights(model, state.get('model', state), path, gated=False)


def checkpoint(model, opt, sched, epoch, best, args, metrics, gen=None, scaler=None,
               ranks=None):
    """Everything an exact resume needs, on the CPU whatever device trained (a CPU machine
    reads it): weights, optimizer, scheduler, epoch, best accuracy, args, the last metrics
    and every RNG state (torch, CUDA, the data generator; under torchrun each process's)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    optimizer = _cpu(opt.state_dict())
    for group in optimizer['param_groups']:          # a compiled step's tensor lr: a number
        group['lr'] = float(group['lr'])
    return dict(model=_cpu(model.state_dict()), optimizer=optimizer,
                scheduler=sched.state_dict(), epoch=epoch, best_acc=best, args=vars(args),
                metrics=metrics,
                rng=dict(torch=torch.get_rng_state(), cuda=cuda, ranks=ranks,
                         data=None if gen is None else gen.get_state()),
                scaler=None if scaler is None else scaler.state_dict())


def _cpu(obj):
    """A (nested) state with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _cpu(v)) for k, v in obj.items())
    return type(obj)(_cpu(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


def resume(run_dir, model, opt, sched, gen=None, scaler=None):
    """Restore what checkpoint() saved in run_dir/last.pt; returns (epoch, best, metrics)."""
    ckpt = load_checkpoint(run_dir / 'last.pt')
    if gen is not None:              # a generator's state is its device's: CUDA's is 16 bytes
        cpu = ckpt['rng']['data'].numel() == torch.Generator().get_state().numel()
        saved = 'cpu' if cpu else 'cuda'
        if saved != gen.device.type:
            raise UsageError(f'{run_dir} was trained with its data on {saved}, this run has it '
                             f'on {gen.device.type}: resume it on a {saved} device (--device '
                             f'{saved}); the data order\'s generator cannot move between them')
    load_weights(model, ckpt['model'], run_dir / 'last.pt', gated=False)
    opt.load_state_dict(ckpt['optimizer'])
    sched.load_state_dict(ckpt['scheduler'])
    rng = ckpt['rng']
    if rng.get('ranks'):                                 # torchrun: this process's own states
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rng = dict(rng, torch=rng['ranks'][rank][0], cuda=rng['ranks'][rank][1])
    torch.set_rng_state(rng['torch'])
    if rng.get('cuda') is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng['cuda'])
    if gen is not None:
        gen.set_state(ckpt['rng']['data'])
    if scaler is not None and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    _sync_metrics(run_dir / 'metrics.jsonl', ckpt['metrics'])
    return ckpt['epoch'], ckpt['best_acc'], ckpt['metrics']


def _sync_metrics(path, last):
    """metrics.jsonl up to the checkpoint's epoch: lines written after it are dropped, and a
    line lost to a crash between checkpoint and log is restored from the checkpoint."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:                  # a line torn by a crash mid-append: the
            print(f'warning: {path}: dropped a damaged line ({line[:40]!r}...); the '
                  "checkpoint's row restores its epoch", file=sys.stderr)
    kept = [r for r in rows if r.get('epoch', 0) <= last['epoch']]
    if not kept or kept[-1].get('epoch') != last['epoch']:
        kept.append(last)
    save_atomic(''.join(to_json(r) + '\n' for r in kept), path)


def record_epoch(run_dir, ckpt, metrics, improved):
    """The epoch's checkpoints (best.pt when the test accuracy improved, then last.pt), and
    only then its metrics line, so metrics.jsonl never runs ahead of last.pt."""
    if improved:
        save_atomic(ckpt, run_dir / 'best.pt')
    save_atomic(ckpt, run_dir / 'last.pt')
    with open(run_dir / 'metrics.jsonl', 'a') as f:
        f.write(to_json(metrics) + '\n')


class RunFolder:
    """The folder fit() trains in, handed to it whole: args.json when training starts (with
    the script that made the run, `script`), per epoch a checkpoint and then its metrics
    line, a resume from its last.pt. writes=False (a torchrun process but rank 0) reads and
    never writes; under torchrun every process's RNG states go into rank 0's checkpoint, so
    each resumes its own."""

    def __init__(self, path, script, writes=True):
        self.path, self.script, self.writes = Path(path), script, writes

    def __str__(self):
        return str(self.path)

    def resume(self, model, opt, sched, gen=None, scaler=None):
        """(epoch, best, last metrics) restored from last.pt, or None where there is none."""
        if not (self.path / 'last.pt').exists():
            return None
        return resume(self.path, model, opt, sched, gen=gen, scaler=scaler)

    def begin(self, args):
        if self.writes:
            self.path.mkdir(parents=True, exist_ok=True)
            save_atomic(to_json({**vars(args), 'script': self.script}, indent=1),
                        self.path / 'args.json')

    def save_epoch(self, model, opt, sched, *, epoch, best, args, metrics, improved, gen=None,
                   scaler=None):
        ranks = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()      # every process's
            torch.distributed.all_gather_object(ranks, machine.rng_state())  # for resume
        if self.writes:
            ckpt = checkpoint(model, opt, sched, epoch=epoch, best=best, args=args,
                              metrics=metrics, gen=gen, scaler=scaler, ranks=ranks)
            record_epoch(self.path, ckpt, metrics, improved=improved)


# ----------------------------------------------------------------------------- the run rules

def decide(run_dir, args, *, epochs_key, structure, settings, evaluation=(), dense=False):
    """The run rules in one place: what this command does with run_dir. -> (action, row):
        'train'     nothing there yet: train from the start
        'resume'    --resume of a run that has not finished (or has no final.json yet)
        'reuse'     a finished run with these settings: row is its final.json (None for a
                    dense baseline, whose weights are what is reused)
        'evaluate'  --evaluate of a finished gated run
    structure: the flags a checkpoint must match; settings: the training flags a resume or a
    reuse must match; evaluation: the flags a reused run's results must match. Refused, one
    line naming what works: another structure; a run there, and neither --resume nor a
    finished run to reuse; a finished run's results trained or evaluated otherwise; --evaluate
    without the finished run."""
    path, evaluate = run_dir / 'last.pt', getattr(args, 'evaluate', False) and not dense
    if not path.exists():
        if evaluate:
            raise UsageError(f'--evaluate: {run_dir} holds no run of this command')
        return 'train', None
    ckpt = load_checkpoint(path)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get('epoch'), int)
            and isinstance(ckpt.get('args'), dict)):
        raise UsageError(f'{path} is not a checkpoint of this script')
    lost = sorted({'model', 'optimizer', 'scheduler', 'rng', 'metrics'} - set(ckpt))
    if lost:
        raise UsageError(f'{path} is damaged (no {", ".join(lost)}): move it away and use '
                         f'best.pt, or start again in another --out')
    saved = ckpt['args']
    changed = [k for k in structure if saved.get(k) != getattr(args, k)]
    if changed:
        raise UsageError(f'{path} was not written by this configuration '
                         f'({_diff(saved, args, changed)})')
    changed = [k for k in settings if saved.get(k) != getattr(args, k)]
    finished = ckpt['epoch'] >= (saved.get(epochs_key, math.inf) if dense
                                 else getattr(args, epochs_key))
    if evaluate:
        if changed or not finished:
            raise UsageError(f'--evaluate needs the finished run of this command in {run_dir}'
                             + (f' ({_diff(saved, args, changed)})' if changed else ''))
        return 'evaluate', None
    final = run_dir / 'final.json'
    if finished and (dense or final.exists()):
        if changed:
            how = f', or --init {path}' if dense else ''
            raise UsageError(f'{run_dir} holds a finished run trained with other settings '
                             f'({_diff(saved, args, changed)}): pass the same ones to reuse '
                             f'it{how}, or choose another --out')
        changed = [k for k in evaluation if saved.get(k) != getattr(args, k)]
        if changed and not dense:
            how = 'add --evaluate to evaluate it with these settings, or ' \
                if hasattr(args, 'evaluate') else ''
            raise UsageError(f'{run_dir} holds a finished run whose results (final.json) are '
                             f'kept ({_diff(saved, args, changed)}): {how}choose another --out '
                             'to train again')
        return 'reuse', None if dense else json.loads(final.read_text())
    if not args.resume:
        state = 'a finished' if finished else \
            f'an unfinished (epoch {ckpt["epoch"]} of {getattr(args, epochs_key)})'
        raise UsageError(f'{run_dir} holds {state} run: pass --resume to continue it, or '
                         'choose another --out')
    if changed:
        raise UsageError('--resume must train what the run started with '
                         f'({_diff(saved, args, changed)}): pass the same settings, or '
                         'choose another --out')
    return 'resume', None


OWN = ('device', 'threads', 'compile', 'workers', 'sync_bn')  # the machine running a command's


def settings_of_run(args, argv, run_dir, evaluation, script):
    """--evaluate RUN_DIR: the finished run's settings (its args.json), with the evaluation
    flags this command gives and this machine's own (device, threads, compile, workers).
    Refused, one line saying what works: no run there, a run of the other script, a dense
    baseline (nothing to re-evaluate), a run without final.json. -> (Namespace, saved)."""
    if not (run_dir / 'args.json').is_file():
        raise UsageError(f'--evaluate: {run_dir} holds no run (no args.json); name a finished '
                         'run: --evaluate runs/NAME')
    saved = json.loads((run_dir / 'args.json').read_text())
    made = saved.get('script') or ('train_imagenet.py' if 'crop_size' in saved  # args.json
                                   else 'train_cifar.py')         # written before 'script'
    if made == 'compare.py':
        raise UsageError(f'{run_dir} is an arm of a compare.py sweep: evaluate the sweep again '
                         'with python compare.py --evaluate, its flags and a --tau / '
                         '--recal-batches')
    if made != script:
        raise UsageError(f'{run_dir} is a {made} run: evaluate it with python {made} '
                         f'--evaluate {run_dir}')
    if saved.get('gating') == 'none':
        raise UsageError(f'{run_dir} is a dense baseline: it has no gates to evaluate again '
                         '(its accuracy is baseline_acc in its final.json)')
    if not (run_dir / 'final.json').is_file():
        raise UsageError(f'{run_dir} has not finished (no final.json): continue it with '
                         '--resume, then --evaluate it')
    given = {a.split('=')[0][2:].replace('-', '_') for a in argv if a.startswith('--')}
    merged = {**vars(args), **{k: v for k, v in saved.items() if k not in OWN
                               and not (k in evaluation and k in given)
                               and k not in ('evaluate', 'resume', 'script')}}
    merged.update(out=str(run_dir.parent), evaluate=str(run_dir))
    return argparse.Namespace(**merged), saved


def evaluation_tag(args):
    """'' for a training run's files; for --evaluate, the settings that name its own files
    (final-tau0.4-recal200.json)."""
    if not args.evaluate:
        return ''
    return (f'-tau{args.tau:g}-recal{args.recal_batches}'
            + ''.join(f'-{s}' for s in getattr(args, 'also', []))
            + (f'-round{args.round_to}' if getattr(args, 'round_to', 0) > 1 else ''))


def evaluated_before(run, saved, run_dir, evaluation):
    """The row of an evaluation of run_dir with these evaluation flags that exists already:
    final.json when they are the run's own, final-TAG.json when asked before; else None."""
    if all(getattr(run, k) == saved.get(k) for k in evaluation if hasattr(run, k)):
        name = 'final.json'
    else:
        name = f'final{evaluation_tag(run)}.json'
    if not (run_dir / name).is_file():
        return None
    print(f'{run_dir}: evaluated with these settings before ({name})')
    return json.loads((run_dir / name).read_text())


def _diff(saved, args, keys):
    return ', '.join(f'--{k.replace("_", "-")} {saved.get(k)} -> {getattr(args, k)}'
                     for k in keys[:3])


# ----------------------------------------------------------------------------- the end of training

@contextlib.contextmanager
def stage(label, log=print):
    """'label ...' before a long step of the pipeline after training, and its time after; Ctrl-C
    or running out of memory in it says where."""
    t0 = time.perf_counter()
    log(f'{label} ...', flush=True)
    try:
        yield
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        raise RunError(f'out of memory in: {label}: lower --batch-size; the checkpoints are '
                       'kept') from None
    except KeyboardInterrupt:
        raise Interrupted(f'in: {label}', 'the checkpoints are kept') from None
    log(f'{label}: done in {time.perf_counter() - t0:.1f} s', flush=True)


def recal_batches(batches, asked, available, log=print):
    """BN recalibration's batches (4.1): `asked` (--recal-batches) of `batches`, but never
    more than the `available` training batches (one pass); a status line every
    cli.PROGRESS_SECONDS. -> (label for stage(), the batches)."""
    n = min(asked, available)
    label = f'BN recalibration over {n} batches' + (
        f' (all the training batches; --recal-batches {asked} asked for more)'
        if n < asked else '')

    def shown():
        t0 = shown_at = time.perf_counter()
        for i, batch in enumerate(itertools.islice(batches, n)):
            if time.perf_counter() - shown_at > cli.PROGRESS_SECONDS:
                shown_at = time.perf_counter()
                log(f'  BN recalibration: batch {i}/{n}, ETA '
                    f'{clock((shown_at - t0) * (n - i) / max(i, 1))}', flush=True)
            yield batch
    return label, shown()


# ----------------------------------------------------------------------------- the final row

def save_files(files, run_dir, tag=''):
    """{name: object} -> run_dir/name, each through save_atomic; `tag` goes before the suffix
    (final-tau0.4.json)."""
    for name, obj in files.items():
        stem, dot, suffix = name.partition('.')
        save_atomic(obj, run_dir / f'{stem}{tag}{dot}{suffix}')


def normalization(mean, std):
    """What a deployed net expects of its input, for final.json and the exports' metadata:
    RGB images as uint8 (0..255), N x 3 x H x W, each channel then (x - mean) / std."""
    return dict(input='RGB, 0..255, (N, 3, H, W); per channel (x - mean) / std',
                mean=[round(float(v), 4) for v in torch.as_tensor(mean).flatten()],
                std=[round(float(v), 4) for v in torch.as_tensor(std).flatten()])


def print_summary(rows):
    """One line per target at the end of a run with several: t, the MACs delivered, gates
    polarized, accuracy, the pruned net's accuracy, and a mark where t was missed."""
    print(f"{'t':>5} {'MACs %':>7} {'polar':>6} {'acc %':>7} {'pruned acc %':>12}  (dense "
          f"{rows[0]['baseline_acc']:.2f}%)")
    for r in sorted(rows, key=lambda r: r['t']):
        print(f"{r['t']:5.2f} {r['macs_percent']:7.2f} {r['polarized']:6.2f} "
              f"{r['gated_acc']:7.2f} {r.get('pruned_acc', math.nan):12.2f}"
              + ('  <- missed t by more than 3 points' if missed_t(r) else ''))


def missed_t(row, points=3):
    """Whether a final row's delivered MACs miss 100 t by more than `points`."""
    return abs(row['macs_percent'] - 100 * row['t']) > points


def warn_if_missed(row, last=None, points=3, why='docs/reproducing.md: polarization'):
    """One line on stderr when the delivered net's MACs miss 100 t by more than `points`, and
    a note when they moved by more than 1 point from the last epoch row's thrMACs%."""
    before = (last or {}).get('test_macs')
    if before is not None and abs(before - row['macs_percent']) > 1:
        cause = ('dynamic gates decide from features whose BN statistics the recalibration '
                 'replaced' if row['gating'] == 'dynamic' else '--round-to rounded the gates')
        print(f"note: MACs at threshold {before:.1f}% in the last epoch row, "
              f"{row['macs_percent']:.1f}% in the final line: {cause} (4.1)")
    if missed_t(row, points):
        print(f"warning: the delivered net runs {row['macs_percent']:.1f}% of the dense MACs, "
              f"more than {points} points from t = {row['t']:g} (training reached "
              f"{row['train_macs_percent']:.1f}%; {why})", file=sys.stderr)


def show(row, log=print):
    """A final row as one 'final:' line."""
    log('final:', '  '.join(f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}'
                            for k, v in row.items() if not isinstance(v, dict)))


def finish(row, run_dir, tag=''):
    save_atomic(to_json(row, indent=1), run_dir / f'final{tag}.json')
    show(row)
    files = sorted(f.name for f in run_dir.iterdir() if f.is_file() and f.name != '.lock'
                   and tag in f.name)                      # --evaluate: only its own files
    print(f'written to {run_dir}: {", ".join(files)}')
