"""Is it worth it? The learned gates beside magnitude pruning, fairly, on your own data.

    python compare.py --dataset fashion-mnist --data-dir data --t 0.5      # every arm, 3 seeds
    python compare.py --synthetic --arch resnet8 --dense-epochs 2 --epochs 3 --seeds 2  # offline

From ONE dense start (trained here, or --init), each arm spends the same post-dense budget
(--epochs: the gates' joint training counts as fine-tuning) with the same optimizer, lr
schedule, weight decay, batch, augmentation and data order; every arm's BN is recalibrated
and its FINAL-epoch test accuracy is reported (never the best epoch). The pruned arms match
the gates' MACs, counted by one counter (FlopCounterMode) on the physically pruned nets:
  gates    (a) the paper's static gates at t, trained with the weights (3.2, 3.4)
  uniform  (b) one-shot L1 magnitude, the same share of channels kept in every layer
  global   (c) Torch-Pruning's global group-norm magnitude (pip install torch-pruning)
  random   (d) random channels at the gates' per-layer widths
  l1       (e) L1-magnitude channels at the gates' widths
  scratch  (f) the gates' widths trained from scratch for --dense-epochs + --epochs
  dynamic  (g) the paper's dynamic gates at t (conditional computation: average MACs)
  select   (h) the gates choose for --select-epochs, then the pruned net is fine-tuned
               plainly for the rest, like (b) to (e)
All prune the same channels: each residual block's inner ones (the gates' search space).
Seeds are paired: seed s gives every arm the same data order. Each arm per t and seed is a
run folder of its own (OUT/t0.5/s0/uniform) that is reused when finished, so a sweep can be
stopped and continued. The table (paired_table.py): the paired difference of each arm to
the gates, its 95% interval and McNemar's test; OUT/compare.json and OUT/compare.png.
"""
import argparse
import copy
import functools
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

import cifar_data
import paired_table as pt
import gumbel_channels as gc
import gumbel_export as ge
import machine
import run_folder as rf
import train_loop as tl
from run_folder import UsageError

ARMS = ('gates', 'uniform', 'global', 'random', 'l1', 'scratch', 'dynamic', 'select')
DEPTHS = {f'resnet{d}': d for d in (8, 20, 32, 44, 56, 110)}
def parser():
    """The command line, its flags in run_folder.Parser's four groups."""
    p = rf.Parser(description=__doc__.splitlines()[0])
    s, t, e, m = (p.group[g].add_argument for g in p.GROUPS)
    s('--arch', default='resnet20', choices=list(DEPTHS), help='a CIFAR ResNet')
    s('--t', type=rf.OPEN_UNIT, nargs='+', default=[0.5], help='target rate(s) of the gates')
    s('--seeds', type=rf.COUNT, default=3, help='paired seeds 0 .. N-1')
    s('--arms', nargs='+', default=list(ARMS), choices=ARMS, metavar='ARM',
      help=f'the arms to run, of {", ".join(ARMS)} (the module docstring says what each is)')
    s('--dataset', default='cifar10', choices=list(cifar_data.DATASETS),
      help="the data set, in torchvision's layout under --data-dir (downloaded when absent)")
    s('--synthetic', action='store_true', help='the offline stripes instead of a data set')
    s('--train-size', type=rf.COUNT, help='train on this many training images (a fixed random '
      'subset; default all)')
    tl.add_gate_args(p)
    t('--init', help='the dense start: a checkpoint or state_dict (default: trained here)')
    t('--dense-epochs', type=rf.COUNT, default=200, help='epochs of the dense start')
    t('--dense-batch-size', type=rf.COUNT, default=128, help='batch of the dense start')
    t('--dense-weight-decay', type=rf.NON_NEGATIVE, default=1e-4,
      help='weight decay of the dense start')
    t('--epochs', type=rf.COUNT, default=100, help='the post-dense budget of every arm (4.1)')
    t('--select-epochs', type=rf.COUNT, help='arm select: epochs of gate training before the '
      'plain fine-tuning (default a third of --epochs)')
    t('--select-frozen', action='store_true', help='arm select: the weights frozen while the '
      'gates choose (Gate Decorator), trained only after')
    t('--distill', type=rf.UNIT, default=0.0, help='every arm learns from the dense start too '
      '(knowledge distillation, T = 4): (1 - this) CE + this x the teacher\'s term (0: off, '
      'the paper)')
    t('--batch-size', type=rf.COUNT, default=256, help='fine-tuning batch of every arm')
    t('--lr', type=rf.POSITIVE, default=0.1, help='SGD lr of every phase (momentum 0.9)')
    t('--weight-decay', type=rf.NON_NEGATIVE, default=5e-4, help='fine-tuning weight decay')
    p.group['evaluation'].description = ('how each arm is evaluated (--evaluate changes them '
                                         'for finished arms without retraining)')
    tl.add_evaluation_args(p.group['evaluation'])
    e('--final-test-only', action='store_true', help='test each arm once, its final net after '
      'BN recalibration (faster; otherwise every epoch too, for the curves)')
    e('--table-only', action='store_true', help='train nothing: the table of the arms finished '
      'so far (a sweep still running, or arms some seeds lack)')
    e('--evaluate', action='store_true', help='train nothing: the finished arms evaluated again '
      'at this --tau / --recal-batches from their last checkpoints (taken before BN '
      'recalibration); their rows, predictions and compare.json are written beside the '
      'trained ones, named by those settings')
    m('--data-dir', default='data', help='holds the data set')
    m('--out', default='runs/compare', help='the sweep folder')
    m('--also', nargs='+', default=[], metavar='DIR:ARM', help='add ARM of another sweep folder '
      'to the table, paired by seed (a recipe variant run there with --init OUT/dense/last.pt '
      'and the same seeds, say); nothing is trained for it')
    machine.add_machine_args(p.group['machine'])
    return p


def parse_args(argv):
    args = parser().parse_args(argv)
    args.select_epochs = args.select_epochs or max(1, args.epochs // 3)
    if args.select_epochs >= args.epochs and 'select' in args.arms:
        raise UsageError(f'--select-epochs must be fewer than --epochs ({args.epochs})')
    args.milestones = tl.checked_milestones(args.milestones, args.epochs, ((2, 5), (7, 10)))
    for spec in args.also:
        also_spec(spec)
    if args.evaluate and (args.also or args.table_only):
        raise UsageError('--evaluate takes this folder alone: no --also, no --table-only')
    args.gating, args.granularity = 'static', 'channel'
    return args


# ----------------------------------------------------------------------------- channels

def l1_scores(model):
    """Each gated channel's L1 norm of the filter that computes it, per gate."""
    return [conv.weight.detach().abs().sum((1, 2, 3)) for _, conv in tl.gated_convs(model)]


def top(scores, n):
    """A keep mask of the n channels with the largest scores."""
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[scores.argsort(descending=True)[:n]] = True
    return keep


def pruned_with(gated, keeps):
    """The physically pruned copy of a static-gated ResNet keeping exactly `keeps` (a mask per
    gate), and its MACs."""
    gated = copy.deepcopy(gated)
    with torch.no_grad():
        for (gate, _), keep in zip(tl.gated_convs(gated), keeps):
            gate.logits.copy_(torch.stack([torch.zeros(len(keep)),
                                           torch.where(keep, 4.0, -4.0)], 1))
    gc.set_inference(gated, 'threshold', 0.5)
    return ge.prune(gated)


def nearest(candidates, target):
    """The (macs, net) of candidates (an iterable of them) whose MACs are nearest target."""
    return min(candidates, key=lambda c: abs(c[0] - target))


def uniform_keeps(template, target):
    """(b): the same share of each gate's channels, those of largest L1 norm, the share (in
    steps of one channel of the widest gate) whose pruned net's MACs are nearest target."""
    scores = l1_scores(template)
    most = max(len(s) for s in scores)
    candidates = [[top(s, max(1, round(k / most * len(s)))) for s in scores]
                  for k in range(1, most + 1)]
    return nearest(((pruned_macs(template, keeps), keeps) for keeps in candidates), target)[1]


def pruned_macs(template, keeps):
    x = torch.zeros(1, 3, 32, 32, device=next(template.parameters()).device)
    return ge.counted_macs(pruned_with(template, keeps), x)


def tp_global(dense, x, target):
    """(c): Torch-Pruning's global group-norm magnitude (GroupMagnitudeImportance, L2, mean-
    normalized groups) on each block's inner channels, one shot, its global ratio bisected
    until the pruned net's MACs are nearest `target`. -> (macs, net)."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise UsageError('arm global needs Torch-Pruning: pip install torch-pruning (or leave '
                         'it out of --arms)') from None

    def pruned(ratio):
        net = copy.deepcopy(dense).eval()
        inner = {b.conv1 for b in net.blocks()}
        ignored = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                   and m not in inner]
        tp.pruner.MetaPruner(net, x, tp.importance.GroupMagnitudeImportance(p=2),
                             global_pruning=True, pruning_ratio=ratio,
                             ignored_layers=ignored).step()
        return ge.counted_macs(net, x), net
    lo, hi, tried = 0.0, 0.99, []
    for _ in range(14):                                 # MACs fall as the ratio rises
        mid = (lo + hi) / 2
        tried.append(pruned(mid))
        lo, hi = (mid, hi) if tried[-1][0] > target else (lo, mid)
    return nearest(tried, target)


# ----------------------------------------------------------------------------- training

def preflight(args, data):
    """Before anything trains: each gated arm's net built at each t and its gate loss computed
    on two test images, so that a recipe the arms cannot run (--targets that do not match the
    gate modules, say) is one line now, not a traceback after the dense start."""
    x = data.prepare(data.x_test[:2])
    kinds = {'dynamic' if a == 'dynamic' else 'static' for a in args.arms if a != 'global'}
    for gating in sorted(kinds):
        for t in args.t:
            run = argparse.Namespace(**{**vars(args), 't': t, 'gating': gating})
            model = gc.resnet_cifar(DEPTHS[args.arch], num_classes=len(data.classes),
                                    gating=gating, init_p=args.gate_init_p).to(x.device)
            tl.init_gates(tl.sampling(model, run), run)
            _, info = gc.split_output(model.train()(x))
            try:
                tl.gate_loss(run)(info, torch.tensor(0.0, device=x.device))
            except ValueError as e:
                raise UsageError(f'the {gating} gates at t = {t:g}: {e}') from None


def dense_start(args, data, out, autocast):
    """The one dense net every arm starts from: --init, or trained once in OUT/dense."""
    torch.manual_seed(0)
    dense = gc.resnet_cifar(DEPTHS[args.arch], num_classes=len(data.classes)).to(
        args.device, memory_format=torch.channels_last)
    run_dir = out / 'dense'
    settings = rf.to_json({k: getattr(args, k) for k in (
        'arch', 'dataset', 'synthetic', 'train_size', 'dense_epochs', 'dense_batch_size', 'lr',
        'dense_weight_decay')})
    if args.init:
        rf.load_init(dense, args.init)
        return dense
    if (run_dir / 'final.json').exists():
        differ = settings_differ(
            json.loads(json.loads((run_dir / 'final.json').read_text())['settings']),
            json.loads(settings))
        if differ:
            raise UsageError(f'{run_dir} holds a dense start trained with other settings '
                             f'({differ}): pass the same ones, --init it, or choose another --out')
        rf.load_weights(dense, rf.load_checkpoint(run_dir / 'last.pt')['model'],
                        run_dir / 'last.pt', gated=False)
        return dense
    tl.fit_images(dense, data, args, epochs=args.dense_epochs,
                  batch_size=args.dense_batch_size, weight_decay=args.dense_weight_decay,
                  milestones=tl.milestones_at(args.dense_epochs, (1, 2), (3, 4)),
                  gen=data.generator(0), gate_loss=None, autocast=autocast,
                  mode=machine.compile_mode(args.compile, args.device),
                  folder=rf.RunFolder(run_dir, 'compare.py'),
                  phase='dense')                           # tested every epoch: converged?
    acc = tl.evaluate(dense, data, autocast)[0]
    rf.save_atomic(rf.to_json(dict(acc=acc, settings=settings)), run_dir / 'final.json')
    return dense


def fine_tune(net, data, args, seed, run_dir, autocast, gate_loss=None, phase='arm',
              part=None, gen=None, distill=None):
    """Epochs part = (first, end) of the post-dense budget (default all of it) with the
    fine-tuning recipe every arm shares (its lr milestones at the same epochs; `distill`, the
    dense start's distillation term under --distill), the data in seed's order (gen: carried
    on from an earlier part), then BN recalibrated."""
    first, end = part or (0, args.epochs)
    tl.fit_images(net, data, args, epochs=end - first, batch_size=args.batch_size,
                  weight_decay=args.weight_decay,
                  milestones=[m - first for m in args.milestones if first < m < end],
                  gen=gen or data.generator(seed + 1), gate_loss=gate_loss,
                  autocast=autocast, folder=rf.RunFolder(run_dir, 'compare.py'),
                  phase=phase, mode=machine.compile_mode(args.compile, args.device),
                  test_each_epoch=not args.final_test_only, distill=distill)
    return recalibrated(net, data, args, seed, autocast)


def recalibrated(net, data, args, seed, autocast):
    """BN statistics re-estimated over --recal-batches training batches (4.1), gates (if any)
    deciding by threshold inference."""
    gc.set_inference(net, 'threshold', args.tau)
    gen = data.generator(seed + 2)
    steps = len(data.x_train) // args.batch_size
    _, recal = rf.recal_batches(data.train_batches(args.batch_size, gen), args.recal_batches,
                                    steps, log=lambda *a, **k: None)
    with autocast():
        gc.recalibrate_bn(net, (xb for xb, _ in recal))
    return net


def gated_arm(dense, data, args, t, seed, gating, run_dir, autocast, part=None, gen=None,
              frozen=False, distill=None):
    """The paper's gates (static or dynamic) trained with the weights from the dense start
    (frozen: the gates alone, the weights' lr 0)."""
    torch.manual_seed(seed)
    run = argparse.Namespace(**{**vars(args), 't': t, 'gating': gating, 'freeze_weights': frozen})
    model = gc.resnet_cifar(DEPTHS[args.arch], num_classes=len(data.classes), gating=gating,
                            init_p=args.gate_init_p)
    model = tl.sampling(model.to(args.device, memory_format=torch.channels_last), run)
    rf.load_weights(model, dense.state_dict(), 'the dense start', gated=True)
    tl.init_gates(model, run)
    return fine_tune(model, data, run, seed, run_dir, autocast, gate_loss=tl.gate_loss(run),
                     phase=gating, part=part, gen=gen, distill=distill)


def keeps_of(gated):
    """Each static gate's channels on under threshold inference (3.3)."""
    return [g.kept().cpu() for g in gc.gates(gated)]


def reinit(net):
    """Fresh weights as resnet_cifar draws them (He et al.: Kaiming normal, fan out)."""
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Linear)):
            m.reset_parameters()
    return net


NEEDS_GATES = ('uniform', 'global', 'random', 'l1', 'scratch')    # the gates' MACs or widths


def arm_dir(out, arm, t, seed):
    return out / f't{t:g}' / f's{seed}' / arm


EVALUATION = ('tau', 'recal_batches')       # what --evaluate changes after training


def finished_row(arm, t, seed, ctx, ignoring=()):
    """The row of a finished arm (its settings checked against this sweep's, but for those
    `ignoring` names), or None."""
    run_dir = arm_dir(ctx['out'], arm, t, seed)
    if not (run_dir / 'final.json').exists():
        return None
    row = json.loads((run_dir / 'final.json').read_text())
    old, new = json.loads(row['settings']), arm_settings(arm, t, seed, ctx)
    differ = settings_differ({k: v for k, v in old.items() if k not in ignoring},
                             {k: v for k, v in new.items() if k not in ignoring})
    if differ:
        raise UsageError(f'{run_dir} holds a finished arm with other settings ({differ}): '
                         'pass the same ones to reuse it, or another --out')
    return row


def arm_settings(arm, t, seed, ctx):
    settings = dict(ctx['settings'], arm=arm, t=t, seed=seed)
    settings['gate_lr_mult'] = tl.gate_lr_mult(ctx['args'],
                                               'dynamic' if arm == 'dynamic' else 'static')
    return settings


class Job(NamedTuple):
    """An arm function's input: t, seed, folder, the sweep's context, the dense start as a
    static-gated template, the gates' row and keeps (NEEDS_GATES), the --distill term."""
    t: float
    seed: int
    run_dir: Path
    ctx: dict
    template: torch.nn.Module
    gates_row: dict
    keeps: list
    distill: object


def arm_gates(job, gating='static'):
    """(a), (g): the paper's gates trained with the weights; static ones then pruned."""
    ctx = job.ctx
    net = gated_arm(ctx['dense'], ctx['data'], ctx['args'], job.t, job.seed, gating,
                    job.run_dir, ctx['autocast'], distill=job.distill)
    if gating == 'dynamic':
        return net, {}
    return ge.prune(net), dict(keeps=[k.tolist() for k in keeps_of(net)])


def arm_select(job):
    """(h): the gates choose for --select-epochs, then the pruned net is fine-tuned (plainly,
    one schedule and one data order)."""
    args, data, autocast = job.ctx['args'], job.ctx['data'], job.ctx['autocast']
    order, cut = data.generator(job.seed + 1), args.select_epochs
    gated = gated_arm(job.ctx['dense'], data, args, job.t, job.seed, 'static',
                      job.run_dir / 'select', autocast, part=(0, cut), gen=order,
                      frozen=args.select_frozen, distill=job.distill)
    net = fine_tune(ge.prune(gated).train(), data, args, job.seed, job.run_dir / 'finetune',
                    autocast, part=(cut, args.epochs), gen=order, distill=job.distill)
    return net, dict(keeps=[k.tolist() for k in keeps_of(gated)])


def arm_scratch(job):
    """(f): the gates' widths trained from scratch for --dense-epochs + --epochs."""
    args, data, autocast = job.ctx['args'], job.ctx['data'], job.ctx['autocast']
    net = reinit(pruned_with(job.template, job.keeps)).train()
    total = args.dense_epochs + args.epochs
    tl.fit_images(net, data, args, epochs=total, batch_size=args.dense_batch_size,
                  weight_decay=args.dense_weight_decay,
                  milestones=tl.milestones_at(total, (1, 2), (3, 4)),
                  gen=data.generator(job.seed + 1), gate_loss=None, autocast=autocast,
                  folder=rf.RunFolder(job.run_dir, 'compare.py'), phase='scratch',
                  mode=machine.compile_mode(args.compile, args.device),
                  test_each_epoch=not args.final_test_only, distill=job.distill)
    return recalibrated(net, data, args, job.seed, autocast), {}


def pruned_arm(choose):
    """(b) to (e): a net pruned once, then fine-tuned; choose(job) -> the pruned net."""
    def arm(job):
        args, data = job.ctx['args'], job.ctx['data']
        return fine_tune(choose(job).train(), data, args, job.seed, job.run_dir,
                         job.ctx['autocast'], distill=job.distill), {}
    return arm


def random_keeps(job):
    gen = torch.Generator().manual_seed(job.seed)
    return [top(torch.rand(len(k), generator=gen), int(k.sum())) for k in job.keeps]


ARM_FUNCTIONS = {
    'gates': arm_gates,
    'uniform': pruned_arm(lambda job: pruned_with(job.template, uniform_keeps(
        job.template, job.gates_row['macs']))),
    'global': pruned_arm(lambda job: tp_global(job.ctx['dense'], job.ctx['data'].prepare(
        job.ctx['data'].x_test[:1]), job.gates_row['macs'])[1]),
    'random': pruned_arm(lambda job: pruned_with(job.template, random_keeps(job))),
    'l1': pruned_arm(lambda job: pruned_with(job.template, [
        top(s, int(k.sum())) for s, k in zip(l1_scores(job.template), job.keeps)])),
    'scratch': arm_scratch,
    'dynamic': functools.partial(arm_gates, gating='dynamic'),
    'select': arm_select,
}


def run_arm(arm, t, seed, ctx):
    """Train one arm at (t, seed) in its folder through ARM_FUNCTIONS (the gates' row, where
    it needs it, is in ctx['rows']). -> its row."""
    args, data, dense = ctx['args'], ctx['data'], ctx['dense']
    run_dir = arm_dir(ctx['out'], arm, t, seed)
    print(f'--- arm {arm}, t = {t:g}, seed {seed}: {run_dir}', flush=True)
    gates_row = ctx['rows'][('gates', t, seed)] if arm in NEEDS_GATES else None
    keeps = gates_row and [torch.tensor(k, dtype=torch.bool) for k in gates_row['keeps']]
    template = gc.resnet_cifar(DEPTHS[args.arch], num_classes=len(data.classes),
                               gating='static').to(args.device)
    rf.load_weights(template, dense.state_dict(), 'the dense start', gated=True)
    torch.manual_seed(seed)
    distill = tl.distillation(dense, args.distill) if args.distill else None
    net, extra = ARM_FUNCTIONS[arm](Job(t, seed, run_dir, ctx, template, gates_row, keeps,
                                        distill))
    return finish(net, arm, t, seed, ctx, extra)


def finish(net, arm, t, seed, ctx, extra, suffix=''):
    """An arm's final net tested: its row (accuracy, counted MACs, settings) in
    final{suffix}.json and its test predictions in predictions{suffix}.pt. -> the row."""
    run_dir, x = arm_dir(ctx['out'], arm, t, seed), ctx['data'].prepare(ctx['data'].x_test[:1])
    acc, _, macs_percent, _, predictions = tl.evaluate(net, ctx['data'], ctx['autocast'])
    macs = ge.counted_macs(net, x) if arm != 'dynamic' else macs_percent / 100 * ctx['dense_macs']
    row = dict(arm=arm, t=t, seed=seed, acc=acc, macs=macs,
               macs_percent=100 * macs / ctx['dense_macs'],
               settings=rf.to_json(arm_settings(arm, t, seed, ctx)),
               train_acc=_last_train_acc(run_dir), predictions=f'predictions{suffix}.pt', **extra)
    rf.save_atomic(predictions.cpu().to(torch.int16), run_dir / row['predictions'])
    rf.save_atomic(rf.to_json(row, indent=1), run_dir / f'final{suffix}.json')
    print(f'arm {arm}, t = {t:g}, seed {seed}: {acc:.2f}% at {row["macs_percent"]:.2f}% MACs')
    return row


def reevaluated(arm, t, seed, ctx):
    """--evaluate: a finished arm rebuilt from its last checkpoint (weights before BN
    recalibration; a pruned arm's widths read from them), recalibrated and tested at this
    --tau / --recal-batches, the gates re-pruned at this tau; nothing retrained. -> its row."""
    args, data = ctx['args'], ctx['data']
    run_dir, suffix = arm_dir(ctx['out'], arm, t, seed), rf.evaluation_tag(args)
    if (run_dir / f'final{suffix}.json').exists():
        return json.loads((run_dir / f'final{suffix}.json').read_text())
    depth, classes = DEPTHS[args.arch], len(data.classes)
    gated = arm in ('gates', 'dynamic')
    path = (run_dir / 'finetune' if arm == 'select' else run_dir) / 'last.pt'
    state = rf.load_checkpoint(path)['model']
    if gated:
        net = gc.resnet_cifar(depth, num_classes=classes, init_p=args.gate_init_p,
                              gating='static' if arm == 'gates' else 'dynamic')
    else:                                       # the widths it was trained at, any channels
        template = gc.resnet_cifar(depth, num_classes=classes, gating='static')
        names = {id(m): n for n, m in template.named_modules()}
        widths = [len(state.get(f'{names[id(conv)]}.weight', ())) for _, conv in
                  tl.gated_convs(template)]
        net = pruned_with(template, [torch.arange(len(g.logits)) < n for (g, _), n in
                                     zip(tl.gated_convs(template), widths)])
    net = net.to(args.device, memory_format=torch.channels_last)
    rf.load_weights(net, state, path, gated=False)
    net = recalibrated(net, data, args, seed, ctx['autocast'])
    extra = {}
    if arm == 'gates':
        extra['keeps'] = [k.tolist() for k in keeps_of(net)]
        net = ge.prune(net)
    return finish(net, arm, t, seed, ctx, extra, suffix)


# what a sweep runs and how it reports, not what an arm is: never part of its settings
NOT_SETTINGS = ('t', 'seeds', 'arms', 'final_test_only', 'table_only', 'evaluate')


@functools.cache
def setting_names():
    """An arm's settings: every flag of the parser's structure, training and evaluation
    groups but NOT_SETTINGS (a flag added to those groups is a setting at once)."""
    return tuple(k for k in parser().dests('structure', 'training', 'evaluation')
                 if k not in NOT_SETTINGS)


@functools.cache
def _defaults():
    return json.loads(rf.to_json(vars(parser().parse_args([]))))


def settings_differ(old, new):
    """'key: old -> new, ...' for the settings that differ ('' if none). A key the old run
    did not record (a flag added since) counts as its default."""
    defaults, new = _defaults(), json.loads(rf.to_json(new))
    keys = sorted(set(old) | set(new))
    return ', '.join(f'{k}: {old.get(k, defaults.get(k))!r} -> {new.get(k, defaults.get(k))!r}'
                     for k in keys if old.get(k, defaults.get(k)) != new.get(k, defaults.get(k)))


POLL_SECONDS = 5          # a finished arm is a final.json: cheap to look for


def sweep(ctx, arms):
    """Every arm at every t and seed into ctx['rows'], in order (t, seed, arm): a finished
    one is read, a free one trained under its folder's lock, one that another process is
    training (several compare.py on one --out: a job array, one process per GPU) skipped
    and waited for at the end. An arm that needs the gates' row (NEEDS_GATES) waits for it,
    and has the gates trained first when --arms leaves them out."""
    args, out, rows = ctx['args'], ctx['out'], ctx['rows']
    wanted = [(arm, t, seed) for t in args.t for seed in range(args.seeds)
              for arm in (['gates'] if any(a in NEEDS_GATES for a in arms) and 'gates'
                          not in arms else []) + arms]
    if args.table_only:                                     # what is finished, nothing more
        rows.update({key: row for key in wanted if (row := finished_row(*key, ctx))})
        return
    if args.evaluate:                                       # the finished ones, again
        done = [key for key in wanted if finished_row(*key, ctx, ignoring=EVALUATION)]
        left = [f'{arm} (t = {t:g}, seed {seed})' for arm, t, seed in wanted if
                (arm, t, seed) not in done]
        if left:
            print(f'--evaluate: not finished, left out: {", ".join(left)}', flush=True)
        rows.update({key: reevaluated(*key, ctx) for key in done})
        return
    pending, waited = list(wanted), False
    while pending:
        for key in pending:
            arm, t, seed = key
            row = finished_row(arm, t, seed, ctx)
            if row is None and arm in NEEDS_GATES and ('gates', t, seed) not in rows:
                continue                                    # its gates are not finished yet
            if row is None:
                run_dir = arm_dir(out, arm, t, seed)
                run_dir.mkdir(parents=True, exist_ok=True)
                try:
                    with rf.locked([run_dir]):
                        row = finished_row(arm, t, seed, ctx) or run_arm(arm, t, seed, ctx)
                except rf.InUse:
                    continue                                # another process trains it
            rows[key] = row
            pending.remove(key)
            waited = False
            break
        else:                                               # all left are someone else's
            if not waited:
                print(f'waiting for {len(pending)} arm(s) that other processes are training '
                      f'(checking every {POLL_SECONDS} s)', flush=True)
                waited = True
            time.sleep(POLL_SECONDS)


def _last_train_acc(run_dir):
    """The last epoch's training accuracy of the run (its last phase)."""
    rows = [json.loads(line) for d in (run_dir, run_dir / 'finetune')
            if (d / 'metrics.jsonl').exists()
            for line in (d / 'metrics.jsonl').read_text().splitlines()]
    return rows[-1]['train_acc'] if rows else None


def _right(out, row, truth):
    folder = Path(row['dir']) if 'dir' in row else arm_dir(out, row['arm'], row['t'], row['seed'])
    return torch.load(folder / row.get('predictions', 'predictions.pt')).long() == truth


def also_spec(spec):
    """--also DIR:ARM -> (DIR, ARM), checked before anything trains."""
    folder, _, arm = spec.rpartition(':')
    if not folder or not Path(folder).is_dir() or arm not in ARMS:
        raise UsageError(f'--also {spec}: expected DIR:ARM, DIR a sweep folder and ARM one of '
                         f'{", ".join(ARMS)}')
    return folder, arm


def also_rows(specs, args):
    """--also DIR:ARM: the finished rows of ARM in another sweep folder at this sweep's t and
    seeds, named ARM@DIR's name, with where they are."""
    rows = []
    for spec in specs:
        folder, arm = also_spec(spec)
        for t in args.t:
            for seed in range(args.seeds):
                run_dir = arm_dir(Path(folder), arm, t, seed)
                if (run_dir / 'final.json').exists():
                    row = json.loads((run_dir / 'final.json').read_text())
                    rows.append(dict(row, arm=f'{arm}@{Path(folder).name}', dir=str(run_dir)))
        if not any(r['arm'] == f'{arm}@{Path(folder).name}' for r in rows):
            raise UsageError(f'--also {spec}: no finished {arm} arm at these t and seeds')
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = machine.device_for(args.device)
    args.device = str(device)
    machine.use_machine(args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    autocast = machine.autocast_for(device)
    data = cifar_data.load(args.data_dir, args.synthetic, device, args.dataset)
    preflight(args, data)
    data = data.subset(args.train_size)
    if len(data.x_train) < max(args.batch_size, args.dense_batch_size):
        raise UsageError(f'the training set has {len(data.x_train)} images, fewer than one batch')
    quiet = '--table-only' if args.table_only else '--evaluate' if args.evaluate else None
    if quiet and not args.init and not (out / 'dense' / 'final.json').exists():
        raise UsageError(f'{quiet}: {out} holds no finished dense start')
    with rf.locked([out], wait=True, name='.dense.lock'):      # trained once: others wait
        dense = dense_start(args, data, out, autocast)
    dense_acc = tl.evaluate(dense, data, autocast)[0]
    x = data.prepare(data.x_test[:1])
    ctx = dict(args=args, data=data, dense=dense, autocast=autocast, out=out, rows={},
               dense_macs=ge.counted_macs(dense.eval(), x),
               settings={k: getattr(args, k) for k in setting_names()})
    arms = [a for a in ARMS if a in args.arms]
    sweep(ctx, arms)
    rows = [r for (arm, _, _), r in ctx['rows'].items() if arm in arms]
    rows += also_rows(args.also, args)
    truth = data.y_test.cpu()
    table = pt.summary(rows, ARMS, lambda row: _right(out, row, truth))
    pt.print_table(table, dense_acc)
    result = dict(settings=ctx['settings'], dense_acc=dense_acc, dense_macs=ctx['dense_macs'],
                  train_images=len(data.x_train), test_images=len(data.x_test),
                  rows=[{k: v for k, v in r.items() if k not in ('keeps', 'settings')}
                        for r in rows], summary=table)
    name = f'compare{rf.evaluation_tag(args)}'        # -tau0.4-recal100 under --evaluate
    rf.save_atomic(rf.to_json(result, indent=1), out / f'{name}.json')
    try:
        import figures
        figures.comparison(result, out / f'{name}.png')
        print(f'written: {out / f"{name}.json"}, {out / f"{name}.png"}')
    except ImportError:
        print(f'written: {out / f"{name}.json"} (pip install matplotlib for {name}.png)')
    return result


def cli(argv=None):
    """main() with one-line errors; Ctrl-C hints the same command (finished arms are reused)."""
    return rf.run_cli(main, argv, resume=None)


if __name__ == '__main__':
    sys.exit(cli())
