"""Training plumbing shared by train_cifar.py and train_imagenet.py: one-line errors, run
folders, atomic checkpoints and exact resume, the training epoch, the gate terms of the
loss, logging rows, and the files a finished run leaves. The method itself is in
gumbel_channels.py; nothing here is specific to a data set.
"""
import argparse
import contextlib
import fcntl
import importlib.util
import io
import itertools
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gumbel_channels as gc
import gumbel_export as ge

ROW = '{:>5} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>7} {:>8} {:>8}'
HEADER = ('epoch', 'lr', 'CE', 'gate', 'train%', 'test%', 'rate', 'MACs%', 'polar', 'sec', 'img/s',
          'thrMACs%')


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, nothing overwritten."""


class RunError(Exception):
    """A run that cannot go on (a diverged loss, a failed write): one line, exit status 1;
    the last good checkpoint is kept and nothing is exported."""


def run_cli(main, argv=None):
    """Run main(argv); bad input (exit status 2), a run that cannot go on and a failed read
    or write (exit status 1) are reported as one line on stderr, without a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    WHERE.update(now='before training', saved='nothing saved yet')
    try:
        main(argv)
    except (UsageError, RunError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except OSError as e:                                    # disk full, permissions, I/O
        where = f' ({e.filename})' if e.filename else ''
        print(f'error: {e.strerror or e}{where}', file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print(f'error: out of memory {WHERE["now"]}: lower --batch-size (or --dense-batch-size'
              '); the last checkpoint is kept', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = ' '.join(shlex.quote(a) for a in argv + ['--resume'] * ('--resume' not in argv))
        print(f'\ninterrupted {WHERE["now"]} ({WHERE["saved"]}); continue with: python '
              f'{os.path.basename(main.__code__.co_filename)} {again}', file=sys.stderr)
        return 130
    return 0


WHERE = {'now': 'before training', 'saved': 'nothing saved yet'}  # for an interrupt's line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default once: none for flags that default to nothing or off, or whose
    help already says its default."""

    def _get_help_string(self, action):
        text = action.help or ''
        if action.default in (None, False, [], argparse.SUPPRESS) or 'default' in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input as UsageError: one line, no usage dump. Flags are
    taken whole, never abbreviated: a command keeps its meaning when flags are added, and
    settings_of_run can tell from argv which flags a command gives."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UsageError(message)


def check_args(args, rules):
    """Before any work: {dest: (test, what)} -> UsageError naming the first flag whose value
    (each value, for a list) fails its test; None (not given) passes."""
    for name, (test, what) in rules.items():
        value = getattr(args, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not test(v):
                raise UsageError(f'--{name.replace("_", "-")} must be {what}, got {value}')


AT_LEAST_1 = (lambda v: v >= 1, '>= 1')
POSITIVE = (lambda v: v > 0 and math.isfinite(v), '> 0')
NON_NEGATIVE = (lambda v: v >= 0 and math.isfinite(v), '>= 0')
OPEN_UNIT = (lambda v: 0 < v < 1, 'in (0, 1)')
UNIT = (lambda v: 0 <= v <= 1, 'in [0, 1]')


# ----------------------------------------------------------------------------- the gate recipe

# One recipe for both scripts (NOTES.md, deviations 18-20): measured to deliver t on real
# images (digits in CIFAR's format and in ImageNet's folders, static and dynamic gates).
# PAPER_GATES gives the paper's own settings back.
RECIPE = dict(loss_weight=20.0, gate_lr_mult=1000.0, polarize=5e-5, gate_lr_decay=False)
PAPER_GATES = '--gate-lr-mult 1 --loss-weight 1 --polarize 0 --gate-lr-decay'


def add_gate_args(p):
    """The gate flags both scripts take, with the recipe's defaults (the paper's: PAPER_GATES)."""
    a = p.add_argument
    a('--loss', default='flops', choices=('flops', 'batch', 'per-gate'),
      help='flops (3.4), batch (Eq. 1) or per-gate (AIG, 2.1)')
    a('--targets', type=float, nargs='+', help='per-gate loss: a rate per gate module (default t)')
    a('--tau', type=float, default=0.5, help='inference threshold (3.3)')
    a('--loss-weight', type=float, default=RECIPE['loss_weight'],
      help='gate loss weight (the paper: 1; NOTES.md 18)')
    a('--gate-lr-mult', type=float, default=RECIPE['gate_lr_mult'],
      help='gate lr / lr (the paper: 1; NOTES.md 18)')
    a('--gate-lr-decay', action='store_true', default=RECIPE['gate_lr_decay'],
      help='the gate lr follows --milestones too (the paper); by default it stays constant so '
           'the gates can finish polarizing')
    a('--gate-decay', type=float, default=20.0, help='gate decay: weight decay * this / |G| (3.2)')
    a('--gate-init-p', type=float, default=gc.INIT_P,
      help='initial on-probability of the gates (DenseNet exits: 1 - this is the p of leaving)')
    a('--soft-gates', action='store_true', help='soft Gumbel-softmax, not straight-through (3.2)')
    a('--temperature', type=float, default=1.0, help='Gumbel-softmax temperature (3.2: fixed at 1)')
    a('--gate-sample', default='image', choices=('image', 'batch'),
      help='static gates draw once per image or once per batch')
    a('--polarize', type=float, default=RECIPE['polarize'], help='weight per gate of the '
      'polarization term (summed over gates), rising from 0 over fine-tuning (the paper: 0; '
      'NOTES.md 20)')
    a('--milestones', type=int, nargs='+',
      help='lr / 10 at these epochs (default: at fixed shares of --epochs)')


GATE_RULES = dict(tau=OPEN_UNIT, loss_weight=NON_NEGATIVE, gate_lr_mult=POSITIVE,
                  gate_decay=NON_NEGATIVE, gate_init_p=OPEN_UNIT, temperature=POSITIVE,
                  polarize=NON_NEGATIVE, targets=UNIT, milestones=AT_LEAST_1)


def milestones_at(epochs, *shares):
    """lr milestones (epochs) at these shares of `epochs` (num, den); none at epoch 0, so a
    run of one epoch trains at the base lr. Schedules follow training progress, so that one
    recipe serves 11 steps an epoch and 5,000."""
    return sorted({epochs * num // den for num, den in shares} - {0})


def sampling(model, args):
    """The model with its gates sampling as the gate flags say (3.2)."""
    return gc.set_sampling(model, args.soft_gates, args.temperature,
                           per_batch=args.gate_sample == 'batch')


def optimizer(model, args, weight_decay, milestones, warmup=False):
    """SGD (momentum 0.9) over gc.param_groups and its LambdaLR: the weights' lr / 10 at each
    milestone (epochs; warmup: lr / 10 in epoch 0), the gates' lr constant unless
    --gate-lr-decay (NOTES.md 18). -> (opt, sched)."""
    groups = gc.param_groups(model, args.lr, weight_decay, args.gate_decay, args.gate_lr_mult)
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)

    def weights_lr(e):
        return (0.1 if warmup and e == 0 else 1) * 0.1 ** sum(e >= m for m in milestones)
    gates_lr = weights_lr if args.gate_lr_decay else (lambda e: 1.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, [weights_lr, gates_lr][:len(groups)])


def progress(epoch, step, epochs, steps):
    """Share of training done at `step` of `epoch` (both from 0): 0 at the first step, 1 at
    the last, what the polarization ramp reads."""
    return (epoch * steps + step) / max(epochs * steps - 1, 1)


def device_for(name, env=None, gpus=None):
    """The one device rule of both scripts: --device cpu, cuda or cuda:N -> a torch.device with
    an index for CUDA. 'cuda' is cuda:LOCAL_RANK under torchrun (env), else cuda:0; an explicit
    cuda:N under torchrun with several processes is refused (they would share one GPU), and
    so is a device this machine does not have (gpus: its GPU count)."""
    env = os.environ if env is None else env
    gpus = torch.cuda.device_count() if gpus is None else gpus
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f'--device {name!r} is not a device (cpu, cuda, cuda:1, ...)') from None
    if device.type != 'cuda':
        return device
    if gpus == 0:
        raise UsageError(f'--device {name}: no CUDA GPU is available here (use --device cpu)')
    if device.index is not None and int(env.get('WORLD_SIZE', 1)) > 1:
        raise UsageError(f'--device {name}: under torchrun pass --device cuda (each process '
                         'takes cuda:LOCAL_RANK)')
    index = int(env.get('LOCAL_RANK', 0)) if device.index is None else device.index
    if index >= gpus:
        raise UsageError(f'--device {name}: this machine has {gpus} GPU(s), not cuda:{index}')
    return torch.device('cuda', index)


def autocast_for(device, amp='bf16'):
    """The precision context: autocast on CUDA in bf16 (no loss scaling needed) or fp16 (the
    caller scales the loss: grad_scaler_for), float32 with amp 'off' and on the CPU."""
    if device.type == 'cuda' and amp != 'off':
        dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
        return lambda: torch.autocast('cuda', dtype)
    return lambda: torch.autocast(device.type, enabled=False)


def grad_scaler_for(device, amp):
    """A GradScaler for fp16 on CUDA, else None (bf16 and float32 need no loss scaling)."""
    return torch.amp.GradScaler('cuda') if device.type == 'cuda' and amp == 'fp16' else None


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


@contextlib.contextmanager
def locked(dirs):
    """Hold an exclusive lock on each run folder for the with-block: a second run on one of
    them stops with a one-line error instead of interleaving its files."""
    with contextlib.ExitStack() as stack:
        for d in dirs:
            f = stack.enter_context(open(d / '.lock', 'a+'))
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f'{d} is in use by another run; wait for it, or choose '
                                 'another --out') from None
            stack.callback(fcntl.flock, f, fcntl.LOCK_UN)
        yield


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


def check_run_dir(run_dir, args, epochs_key, structure, settings=(), reuse_finished=False):
    """True when the run in run_dir finished training (getattr(args, epochs_key) epochs).
    Refuses a run of another structure (a key of `structure` differs); any run not asked to
    --resume, except a finished one when reuse_finished (a dense baseline: then its training
    `settings` must match, and the message says how to reuse it); a resume with other
    training `settings` than the run started with; and a finished run's results
    (final.json), which are never overwritten."""
    path, evaluate = run_dir / 'last.pt', getattr(args, 'evaluate', False)
    if not path.exists():
        if evaluate:
            raise UsageError(f'--evaluate: {run_dir} holds no run of this command')
        return False
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
    if evaluate and not reuse_finished:
        if changed or ckpt['epoch'] < getattr(args, epochs_key):
            raise UsageError(f'--evaluate needs the finished run of this command in {run_dir}'
                             + (f' ({_diff(saved, args, changed)})' if changed else ''))
        return True
    if reuse_finished and ckpt['epoch'] >= saved.get(epochs_key, math.inf):
        if changed:
            raise UsageError(f'{run_dir} holds a finished baseline trained with other settings '
                             f'({_diff(saved, args, changed)}): pass the same ones to reuse it, '
                             f'or --init {path}, or choose another --out')
        return True
    done = ckpt['epoch'] >= getattr(args, epochs_key)
    if not args.resume:
        state = 'a finished' if done else f'an unfinished (epoch {ckpt["epoch"]} of ' \
                                          f'{getattr(args, epochs_key)})'
        raise UsageError(f'{run_dir} holds {state} run: pass --resume to continue it, '
                         'or choose another --out')
    if done and (run_dir / 'final.json').exists():
        evaluate = 'to evaluate it with other settings add --evaluate, ' \
            if hasattr(args, 'evaluate') else ''
        raise UsageError(f'{run_dir} holds a finished run whose results (final.json) are kept; '
                         f'{evaluate}to train it again choose another --out')
    if changed:
        raise UsageError('--resume must train what the run started with '
                         f'({_diff(saved, args, changed)}): pass the same settings, or '
                         'choose another --out')
    return done


EVALUATION = ('tau', 'recal_batches', 'also', 'runs', 'round_to')   # what --evaluate may change


def finished_row(run_dir, args, settings):
    """The final row of a run in run_dir that finished (final.json) with these training
    `settings` and evaluation flags, to reuse instead of training again; None when it has
    not finished. A finished run trained or evaluated otherwise is refused, naming the
    command that works."""
    if not (run_dir / 'final.json').exists() or getattr(args, 'evaluate', False):
        return None
    saved = load_checkpoint(run_dir / 'last.pt').get('args', {})
    changed = [k for k in settings if saved.get(k) != getattr(args, k)]
    if changed:
        raise UsageError(f'{run_dir} holds a finished run trained with other settings '
                         f'({_diff(saved, args, changed)}): pass the same ones to reuse it, '
                         'or choose another --out')
    changed = [k for k in EVALUATION if hasattr(args, k) and saved.get(k) != getattr(args, k)]
    if changed:
        evaluate = 'add --evaluate to evaluate it with these settings, or ' \
            if hasattr(args, 'evaluate') else ''
        raise UsageError(f'{run_dir} holds a finished run whose results (final.json) are kept '
                         f'({_diff(saved, args, changed)}): {evaluate}choose another --out to '
                         'train again')
    return json.loads((run_dir / 'final.json').read_text())


def settings_of_run(args, argv, named_dir):
    """--evaluate [RUN_DIR]: the finished run's training settings (its args.json) with the
    evaluation flags given on this command line; with RUN_DIR that run's target and folder
    too, else the run in `named_dir` (the one this command names)."""
    run_dir = Path(args.evaluate) if isinstance(args.evaluate, str) else named_dir
    if not (run_dir / 'args.json').is_file():
        raise UsageError(f'--evaluate: {run_dir} holds no run (no args.json); name a finished '
                         'run: --evaluate runs/NAME')
    saved = json.loads((run_dir / 'args.json').read_text())
    given = {a.split('=')[0][2:].replace('-', '_') for a in argv if a.startswith('--')}
    keep = [*EVALUATION, 'device', 'threads', 'compile', 'data_dir']
    merged = {**vars(args), **{k: v for k, v in saved.items() if not (k in keep and k in given)
                               and k not in ('evaluate', 'resume')}}
    if isinstance(args.evaluate, str):
        merged.update(t=[saved['t']], out=str(run_dir.parent))
    else:
        merged.update(t=args.t)
    return argparse.Namespace(**merged)


def print_summary(rows):
    """One line per target at the end of a run with several: t, the MACs delivered, gates
    polarized, accuracy, the pruned net's accuracy, and a mark where t was missed."""
    print(f"{'t':>5} {'MACs %':>7} {'polar':>6} {'acc %':>7} {'pruned %':>8}  (dense "
          f"{rows[0]['baseline_acc']:.2f}%)")
    for r in sorted(rows, key=lambda r: r['t']):
        print(f"{r['t']:5.2f} {r['macs_percent']:7.2f} {r['polarized']:6.2f} "
              f"{r['gated_acc']:7.2f} {r.get('pruned_acc', math.nan):8.2f}"
              + ('  <- missed t by more than 3 points' if missed_t(r) else ''))


def _diff(saved, args, keys):
    return ', '.join(f'--{k.replace("_", "-")} {saved.get(k)} -> {getattr(args, k)}'
                     for k in keys[:3])


# ----------------------------------------------------------------------------- checkpoints

def checkpoint(model, opt, sched, epoch, best, args, metrics, gen=None, scaler=None):
    """Everything an exact resume needs: weights, optimizer, scheduler, epoch, best accuracy,
    args, the last metrics and every RNG state (torch, CUDA, the data generator)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    return dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                epoch=epoch, best_acc=best, args=vars(args), metrics=metrics,
                rng=dict(torch=torch.get_rng_state(), cuda=cuda,
                         data=None if gen is None else gen.get_state()),
                scaler=None if scaler is None else scaler.state_dict())


def resume(run_dir, model, opt, sched, gen=None, scaler=None):
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


def to_json(obj, indent=None):
    """Strict JSON (RFC 8259): a NaN or infinite float becomes null."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        return [clean(v) for v in o] if isinstance(o, (list, tuple)) else o
    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def record_epoch(run_dir, ckpt, metrics, improved):
    """The epoch's checkpoints (best.pt when the test accuracy improved, then last.pt), and
    only then its metrics line, so metrics.jsonl never runs ahead of last.pt."""
    WHERE['saved'] = f'last checkpoint: epoch {ckpt["epoch"]} in {run_dir}'
    if improved:
        save_atomic(ckpt, run_dir / 'best.pt')
    save_atomic(ckpt, run_dir / 'last.pt')
    with open(run_dir / 'metrics.jsonl', 'a') as f:
        f.write(to_json(metrics) + '\n')


# ----------------------------------------------------------------------------- the epoch

def gate_loss(args):
    """The gate terms of the training loss, built once per run -> loss(info, progress).
        loss_weight x L  +  polarize x progress x |G| x polarization_loss(info)
    L: L_FLOPs (3.4, --loss flops), Eq. (1) (batch) or the per-gate loss (2.1, per-gate);
    progress runs 0 -> 1 through fine-tuning, so the polarization term rises linearly from 0
    (NOTES.md 20). |G| x its mean is its sum over the gates: each gate feels the same push in
    a net of 336 gates or of 7,552."""
    t, weight, polarize = args.t, args.loss_weight, args.polarize
    targets = args.targets if args.loss == 'per-gate' else None
    terms = {'flops': lambda info: gc.flops_loss(info, t),
             'batch': lambda info: gc.batch_activation_loss(info, t),
             'per-gate': lambda info: gc.per_gate_loss(info, targets or [t] * len(info.z))}
    term = terms[args.loss]

    def loss(info, progress):
        n_gates = sum(z.shape[1] for z in info.z)
        return weight * term(info) + polarize * progress * n_gates * gc.polarization_loss(info)
    return loss


def gate_stats(info):
    """(activation rate, MACs % of the dense net, share of polarized p), a (3,) float64 tensor."""
    p = torch.cat(info.p, 1)
    return torch.stack([torch.cat(info.z, 1).double().mean(),
                        100 * (info.macs / info.max_macs).mean(),
                        gc.polarized(p).double().mean()])


def averages(stats, batches):
    """Per-batch gate statistics summed over an epoch -> their means (NaN for a dense net)."""
    return (stats / batches).tolist() if batches else [math.nan] * 3


CHECK_EVERY = 20          # steps between checks for a non-finite loss (each check syncs)
PROGRESS_SECONDS = 20     # seconds between status lines within an epoch


def _clock(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


@contextlib.contextmanager
def stage(label, log=print):
    """'label ...' before a long step of the pipeline, and its time after."""
    t0 = time.perf_counter()
    log(f'{label} ...', flush=True)
    WHERE['now'] = f'in: {label}'
    yield
    log(f'{label}: done in {time.perf_counter() - t0:.1f} s', flush=True)


def recal_batches(batches, asked, available, log=print):
    """BN recalibration's batches (4.1): `asked` (--recal-batches) of `batches`, but never
    more than the `available` training batches (one pass); a status line every
    PROGRESS_SECONDS. -> (label for stage(), the batches)."""
    n = min(asked, available)
    label = f'BN recalibration over {n} batches' + (
        f' (all the training batches; --recal-batches {asked} asked for more)'
        if n < asked else '')

    def shown():
        t0 = shown_at = time.perf_counter()
        for i, batch in enumerate(itertools.islice(batches, n)):
            if time.perf_counter() - shown_at > PROGRESS_SECONDS:
                shown_at = time.perf_counter()
                log(f'  BN recalibration: batch {i}/{n}, ETA '
                    f'{_clock((shown_at - t0) * (n - i) / i)}', flush=True)
            yield batch
    return label, shown()


def _stop_if_diverged(bad, epoch):
    step = int(bad)
    if step >= 0:
        raise RunError(f'the loss is not finite at epoch {epoch}, step {step + 1}: training '
                       'diverged (try a lower --lr); the last good checkpoint is kept and '
                       'nothing is exported')


COMPILE_MODES = ('auto', 'off', 'default', 'reduce-overhead', 'max-autotune')


def add_machine_args(p):
    """The flags both scripts take for where and how they run: --device, --threads,
    --compile, --seed."""
    a = p.add_argument
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
      help='cuda (under torchrun: cuda:LOCAL_RANK), cuda:N or cpu')
    a('--threads', type=int, help='CPU threads (default: the CPUs this process may use, its '
      'affinity and container quota, at most 8)')
    a('--compile', nargs='?', const='default', default='auto', choices=COMPILE_MODES,
      help="torch.compile the training step: auto = reduce-overhead (CUDA graphs) on CUDA, off "
           "on the CPU; off runs it eagerly (NOTES.md: the GPU path)")
    a('--seed', type=int, default=0, help='seeds the weights, gates, data order and noise')


def usable_cpus():
    """CPUs this process may really use: its affinity mask, and a container's (cgroup v2)
    CPU quota when one is set."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    try:
        quota, period = Path('/sys/fs/cgroup/cpu.max').read_text().split()
        if quota != 'max':
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n or 1)


def use_threads(args, device, log=print):
    """torch's CPU threads from --threads, else usable_cpus() up to 8, said in the log."""
    threads = args.threads or min(8, usable_cpus())
    torch.set_num_threads(threads)
    if torch.device(device).type == 'cpu':
        log(f'CPU threads: {threads} (--threads to change)')


def compile_mode(flag, device):
    """--compile -> the torch.compile mode of the training step, or None (eager). True and
    False are the flag's values in the args.json of older runs."""
    if flag is True:
        return 'default'
    if flag in (False, None, 'off'):
        return None
    if flag == 'auto':
        return 'reduce-overhead' if torch.device(device).type == 'cuda' else None
    return flag


class TrainStep:
    """One training step: forward, loss, backward, optimizer step; called (x, y, progress).
        loss = CE(the output each image takes) [+ each exit classifier's CE, 5]
               + gate_loss(info, progress)
    Fresh Gumbel noise at every call (3.2); `gate_loss` is what gate_loss(args) built. With a
    compile `mode` the forward and loss (and with them AOTAutograd's backward) and the
    optimizer step are torch.compiled; on CUDA 'reduce-overhead' replays them as CUDA graphs,
    so a step costs a few graph launches instead of a thousand kernel launches (issue 20).
    `net` is what the forward calls (a DDP wrapper of `model`); `scaler` (fp16) keeps the
    optimizer step eager. Returns (loss, ce, gate loss, correct count, gate stats or None),
    detached; they live until the next call (CUDA graph outputs are reused)."""

    def __init__(self, model, opt, gate_loss, autocast, mode=None, scaler=None, net=None):
        self.model = model
        self.net = net or model
        self.opt = opt
        self.gate_loss = gate_loss
        self.autocast = autocast
        self.mode = mode
        self.scaler = scaler
        self.losses = torch.compile(self._losses, mode=mode) if mode else self._losses
        self.opt_step = opt.step
        if mode and not scaler:
            for group in opt.param_groups:  # SGD's first step sets buf = grad = 0.9 * 0 + grad:
                for p in group['params']:   # zeros now give one compiled graph, not two
                    opt.state[p].setdefault('momentum_buffer', torch.zeros_like(p))
            self.opt_step = torch.compile(self._opt_step, mode=mode)
        self.compile_seconds = None         # the first compiled step's time, compile included

    def _losses(self, xb, yb, progress):
        # Nothing is detached in here: torch 2.14's inductor dropped the loss's grad_fn when
        # the graph also returned a detached alias of it (NOTES.md: the GPU path).
        with self.autocast():
            logits, info = gc.split_output(self.net(xb))
            ce = F.cross_entropy(logits, yb)
            for exit_logits in (info.exit_logits or [])[:-1] if info is not None else []:
                ce = ce + F.cross_entropy(exit_logits, yb)
            if info is None:
                return ce, ce, None, (logits.argmax(1) == yb).sum(), None
            gl = self.gate_loss(info, progress)
        return ce + gl, ce, gl, (logits.argmax(1) == yb).sum(), gate_stats(info)

    def _opt_step(self):            # compiled as a function: dynamo failed on bound opt.step
        self.opt.step()

    def __call__(self, xb, yb, progress):
        t0 = time.perf_counter()
        if self.mode:
            torch.compiler.cudagraph_mark_step_begin()
        loss, ce, gl, correct, stats = self.losses(xb, yb, progress)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.opt_step()
        else:                                               # fp16: scale, unscale, skip infs
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        if self.mode and self.compile_seconds is None:
            loss.item()                                     # wait for the first step's kernels
            self.compile_seconds = time.perf_counter() - t0
        gl = torch.zeros_like(ce) if gl is None else gl
        return loss.detach(), ce.detach(), gl.detach(), correct, \
            None if stats is None else stats.detach()


def train_epoch(step, batches, progress, epoch, steps, log=print):
    """One epoch of `steps` batches through `step` (a TrainStep). `progress(i)` is the share
    of training done at step i. A status line (step, loss, img/s, ETA) goes to `log` every
    PROGRESS_SECONDS. A loss that is not finite stops the run (RunError) within CHECK_EVERY
    steps, naming the step where it began; nothing of this epoch is saved. Under torchrun the
    statistics are averaged over all processes.
    Returns dict(ce, gate_loss, train_acc, rate, macs, polarized, images, seconds, first_loss)."""
    step.model.train()
    WHERE['now'] = f'in epoch {epoch}'
    device = next(step.model.parameters()).device
    t0, n, stats, gated, first = time.perf_counter(), 0, 0, 0, None
    sums = torch.zeros(3, device=device)                    # CE, gate loss, correct: no sync
    bad = torch.full((), -1, device=device)                 # the first step with a bad loss
    ramp = torch.tensor([progress(i) for i in range(max(steps, 1))], device=device)
    shown = t0
    for i, (xb, yb) in enumerate(batches):
        if i % CHECK_EVERY == 0:
            _stop_if_diverged(bad, epoch)
        if time.perf_counter() - shown > PROGRESS_SECONDS and i < steps:
            shown, spent = time.perf_counter(), time.perf_counter() - t0
            log(f'  epoch {epoch} step {i}/{steps}  loss {sums[0].item() / max(n, 1):.3f}  '
                f'{n / spent:.0f} img/s  ETA {_clock(spent * (steps - i) / i)}', flush=True)
        compiled = step.mode and step.compile_seconds is None
        loss, ce, gl, correct, info_stats = step(xb, yb, ramp[min(i, len(ramp) - 1)])
        if compiled:
            log(f'  compiled the training step (torch.compile mode {step.mode}): first step '
                f'{step.compile_seconds:.1f} s', flush=True)
        bad = torch.where((bad < 0) & ~torch.isfinite(loss), i, bad)
        first = loss.clone() if first is None else first
        sums += torch.stack([ce * len(yb), gl * len(yb), correct])
        n += len(yb)
        if info_stats is not None:
            stats, gated = stats + info_stats, gated + 1
    if n == 0:
        raise RunError(f'epoch {epoch} had no training batch: the data set is smaller than '
                       'the batch')
    _stop_if_diverged(bad, epoch)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        totals = torch.cat([sums.double(), torch.tensor([n, gated], device=device).double(),
                            torch.as_tensor(stats, device=device).double().expand(3)])
        torch.distributed.all_reduce(totals)                # every rank's images count
        sums, n, gated, stats = totals[:3], int(totals[3]), int(totals[4]), totals[5:]
    ce, gl, correct = (sums / n).tolist()
    rate, macs, polar = averages(stats, gated)
    return dict(ce=ce, gate_loss=gl, train_acc=100 * correct, rate=rate, macs=macs,
                polarized=polar, images=n, seconds=time.perf_counter() - t0,
                first_loss=first.item())


def print_row(epoch, lr, m, test_acc, test_macs, images_per_s):
    """One epoch's row (a test not run this epoch: '-')."""
    test = '-' if test_acc is None else f'{test_acc:.2f}'
    print(ROW.format(epoch, f'{lr:.4f}', f'{m["ce"]:.3f}', f'{m["gate_loss"]:.4f}',
                     f'{m["train_acc"]:.2f}', test, f'{m["rate"]:.3f}',
                     f'{m["macs"]:.1f}', f'{m["polarized"]:.2f}', f'{m["seconds"]:.1f}',
                     f'{images_per_s:.0f}', '-' if test_macs is None else f'{test_macs:.1f}'),
          flush=True)


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


def gate_names(model):
    """Each gate module's name in the network (layer1.0.gate1, ...), in GateInfo order."""
    found = {id(g) for g in gc.gates(model)}
    return [name for name, m in model.named_modules() if id(m) in found]


def write_class_rates(rates, names, gates, run_dir, tag=''):
    """Fig. 4: per-class activation rates (classes, gate modules named `gates`) as
    gate_classes.csv, and per gate the classes it runs on most and least and its
    specialization (the standard deviation of its per-class rates around its mean) in
    gate_classes.txt."""
    header = 'class,' + ','.join(gates)
    rows = [f'{name},' + ','.join(f'{r:.4f}' for r in row)
            for name, row in zip(names, rates.tolist())]
    save_atomic('\n'.join([header, *rows]) + '\n', run_dir / f'gate_classes{tag}.csv')
    lines = []
    for gate, col in zip(gates, rates.T):
        hi, lo = col.argmax().item(), col.argmin().item()
        lines.append(f'{gate}: mean {col.mean():.3f}, specialization '
                     f'{col.std(unbiased=False):.3f}, most {names[hi]} ({col[hi]:.2f}), '
                     f'least {names[lo]} ({col[lo]:.2f})')
    save_atomic('\n'.join(lines) + '\n', run_dir / f'gate_classes{tag}.txt')


def export(model, baseline, x, run_dir, row, tag=''):
    """Save the final gated weights (final.pt); for static gates also the physically pruned
    network, as a module (pruned.pt) and, BN folded into its convs, as a torch.export program
    with a dynamic batch (pruned.pt2, loadable without this repository) and, when the onnx
    package is installed, as an ONNX graph (pruned.onnx, for ONNX Runtime). Its FlopCounterMode
    MACs % of the dense net goes into row. x: an example batch of at least 2 inputs.
    Returns the pruned net."""
    save_atomic(model.state_dict(), run_dir / f'final{tag}.pt')
    if not all(isinstance(g, gc.StaticGate) for g in gc.gates(model)):
        return None
    pruned = ge.prune(model)
    dense_macs = ge.counted_macs(baseline.eval(), x[:1])
    row['pruned_macs_percent'] = 100 * ge.counted_macs(pruned, x[:1]) / dense_macs
    save_atomic(pruned, run_dir / f'pruned{tag}.pt')
    folded = ge.fold_bn(pruned)
    if importlib.util.find_spec('onnx') is not None:    # optional: for ONNX Runtime
        save_atomic(ge.onnx_graph(folded, x), run_dir / f'pruned{tag}.onnx')
    else:
        print(f'note: pruned{tag}.onnx not written: the onnx package is not installed '
              '(pip install onnx)')
    batch = torch.export.Dim('batch', min=1, max=65536)
    program = torch.export.export(folded, (x,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()               # in memory first: torch's C++ writer aborts the
    torch.export.save(program, buffer)  # process on a full disk instead of raising
    save_atomic(buffer.getvalue(), run_dir / f'pruned{tag}.pt2')
    return pruned


def print_exit_report(report):
    """Table 5 from gumbel_export.exit_report, one line per exit."""
    for e in report['exits']:
        print(f"exit {e['exit']}: {100 * e['share']:5.2f}% of images leave, accuracy "
              f"{100 * e['acc_all']:5.2f} on all, {100 * e['acc_taken']:5.2f} on those taken")
    print(f"MACs spent {report['counted_macs'] / report['full_macs']:.1%} of running every "
          f"image to the end; time {report['seconds'] / report['seconds_to_the_end']:.2f} x")


def missed_t(row, points=3):
    """Whether a final row's delivered MACs miss 100 t by more than `points`."""
    return abs(row['macs_percent'] - 100 * row['t']) > points


def warn_if_missed(row, last=None, points=3, why='NOTES.md: polarization'):
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


def finish(row, run_dir, tag=''):
    save_atomic(to_json(row, indent=1), run_dir / f'final{tag}.json')
    print('final:', '  '.join(f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}'
                              for k, v in row.items() if not isinstance(v, dict)))
    files = sorted(f.name for f in run_dir.iterdir() if f.is_file() and f.name != '.lock'
                   and tag in f.name)                      # --evaluate: only its own files
    print(f'written to {run_dir}: {", ".join(files)}')
