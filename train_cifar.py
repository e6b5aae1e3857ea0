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
import json
import math
import sys
from pathlib import Path

import torch
import torchvision

import cifar_data
import gumbel_any
import gumbel_channels as gc
import gumbel_export as ge
import train_common as common
import train_loop
from train_common import UsageError

DEPTHS = {
    **{f'resnet{d}': d for d in (8, 20, 32, 44, 56, 110)},  # resnet8, densenet16: quick checks
    **{f'densenet{d}': d for d in (16, 40, 100)},
}
ANY = sorted(set(torchvision.models.list_models(module=torchvision.models)) - set(DEPTHS))
STRUCTURE = ('arch', 'gating', 'granularity', 'seed', 'synthetic', 'dataset')  # a checkpoint must match
DENSE_SETTINGS = ('dense_epochs', 'dense_batch_size', 'dense_weight_decay', 'lr')
FREE = ('resume', 'out', 'device', 'threads', 'compile', 'data_dir', 'tau', 'recal_batches',
        'also', 'runs', 'evaluate', 'round_to')


def parse_args(argv):
    p = common.Parser(description=__doc__.splitlines()[0], formatter_class=common.HelpFormatter)
    a = p.add_argument
    a('--arch', default='resnet56', choices=list(DEPTHS) + ANY, metavar='ARCH',
      help='the CIFAR ResNets resnet8 ... resnet110 and DenseNets densenet16/40/100 (early '
           'exits), or any torchvision classifier (static gates on its channel groups: '
           'gumbel_any), e.g. mobilenet_v2')
    a('--gating', choices=('static', 'dynamic', 'none'),
      help="static (pruning; ResNet default), dynamic (conditional computation; the DenseNets' "
           "early exits), none (the dense baseline only) (3.2, 5)")
    a('--granularity', choices=gc.GRANULARITIES,
      help='ResNets: channel (filter, default) or layer gates (4.4, Table 4)')
    a('--t', type=float, nargs='+', help='target rate(s), one run each (default 0.5)')
    common.add_gate_args(p)
    a('--epochs', type=int, default=100, help='gated fine-tuning epochs (4.1)')
    a('--batch-size', type=int, default=256, help='gated fine-tuning batch (4.1)')
    a('--lr', type=float, default=0.1, help='SGD lr of both phases (momentum 0.9)')
    a('--weight-decay', type=float, default=5e-4, help='fine-tuning weight decay (official code)')
    a('--dense-epochs', type=int, default=200, help='dense baseline epochs; lr / 10 at 50%%, 75%%')
    a('--dense-batch-size', type=int, default=128, help='dense baseline batch')
    a('--dense-weight-decay', type=float, default=1e-4, help='dense baseline weight decay')
    a('--init', help='dense checkpoint (or state_dict) to fine-tune from instead of training one')
    a('--recal-batches', type=int, default=200, help='BN recalibration batches (4.1)')
    a('--also', nargs='*', default=[], choices=('all_on', 'sample', 'ensemble'),
      help='more evaluations (3.3)')
    a('--runs', type=int, default=8, help='stochastic runs for --also sample / ensemble')
    a('--dataset', default='cifar10', choices=list(cifar_data.DATASETS),
      help="the data set, in torchvision's layout under --data-dir (downloaded there when "
           'absent); grey 28 x 28 sets are padded to 32 x 32 on 3 channels')
    a('--data-dir', default='data', help='holds the data set (cifar-10-batches-py for CIFAR-10)')
    a('--synthetic', action='store_true', help='6,000 generated stripe images: runs offline')
    a('--out', default='runs', help='runs are written in subfolders of this folder')
    a('--resume', action='store_true', help="continue this configuration's unfinished run")
    a('--round-to', type=int, default=0, help='keep each gate\'s channel count a multiple of '
      'this before export (16: AVX-512 float32; 0: off; NOTES.md: speed)')
    a('--evaluate', nargs='?', const=True, default=False, metavar='RUN_DIR',
      help='re-evaluate a finished run (RUN_DIR, or those this command names) with '
           '--tau/--recal-batches/--also/--round-to; every other setting comes from the '
           "run's args.json; results go to new files named by those settings")
    common.add_machine_args(p)
    args = p.parse_args(argv)
    common.check_args(args, dict(
        common.GATE_RULES, epochs=common.AT_LEAST_1, batch_size=common.AT_LEAST_1,
        dense_epochs=common.AT_LEAST_1, dense_batch_size=common.AT_LEAST_1,
        recal_batches=common.AT_LEAST_1, runs=common.AT_LEAST_1, lr=common.POSITIVE,
        threads=common.AT_LEAST_1,
        round_to=common.NON_NEGATIVE, weight_decay=common.NON_NEGATIVE,
        dense_weight_decay=common.NON_NEGATIVE, t=(lambda v: 0 < v <= 1, 'in (0, 1]')))
    common.device_for(args.device)
    if args.arch in ANY and (args.gating not in (None, 'static', 'none') or args.granularity):
        raise UsageError(f'--arch {args.arch} takes --gating static (its channel groups, '
                         'gumbel_any) or none; dynamic and layer gates are for the ResNets')
    if args.arch in DEPTHS and args.arch.startswith('densenet'):  # early exits (5)
        if args.gating not in (None, 'dynamic', 'none') or args.granularity is not None:
            raise UsageError('the DenseNets have early-exit gates: --gating dynamic (or none), '
                             'no --granularity')
        args.gating, args.granularity = args.gating or 'dynamic', 'exit'
    args.gating, args.granularity = args.gating or 'static', args.granularity or 'channel'
    if args.gating == 'dynamic' and args.granularity != 'exit' and args.batch_size < 2:
        raise UsageError('--gating dynamic: its gates normalize over the batch (BatchNorm), so '
                         '--batch-size must be at least 2')
    if args.gating == 'none' and (args.t is not None or args.init):
        raise UsageError('--gating none trains the dense baseline only: it takes no --t, and '
                         '--init would replace what it trains')
    args.t = [] if args.gating == 'none' else args.t or [0.5]
    args.milestones = args.milestones or common.milestones_at(args.epochs, (2, 5), (7, 10))
    if len(set(args.t)) != len(args.t):
        raise UsageError(f'--t must be distinct rates, got {args.t}')
    return args


# ----------------------------------------------------------------------------- training

def build(args, gated):
    """The CIFAR network of --arch: dense, or with its gates (ResNets, any torchvision
    classifier) or exits (DenseNets)."""
    if args.arch in ANY:
        model = torchvision.models.get_model(args.arch, num_classes=classes(args))
        model = model.to(args.device)
        return gated_from(model, args) if gated else model.to(memory_format=torch.channels_last)
    depth = DEPTHS[args.arch]
    if args.arch.startswith('densenet'):
        model = gc.densenet_cifar(depth, num_classes=classes(args), exits=gated,
                                  init_leave_p=1 - args.gate_init_p)
    else:
        model = gc.resnet_cifar(depth, num_classes=classes(args),
                                gating=args.gating if gated else None,
                                granularity=args.granularity, init_p=args.gate_init_p)
    return model.to(args.device, memory_format=torch.channels_last)


def classes(args):
    return 10 if args.synthetic else len(cifar_data.DATASETS[args.dataset][2])


def gated_from(baseline, args):
    """The gated network that fine-tuning starts from: the dense weights, new gates."""
    if args.arch in ANY:
        example = torch.zeros(2, 3, 32, 32, device=args.device)
        model = gumbel_any.gate_any(baseline, example, init_p=args.gate_init_p)
        return common.sampling(model.to(memory_format=torch.channels_last), args)
    model = common.sampling(build(args, gated=True), args)
    common.load_weights(model, baseline.state_dict(), 'the dense baseline', gated=True)
    return model


def run_phase(phase, model, data, args, run_dir, autocast):
    """Train `model` for one phase ('dense' or 'gated') with checkpoints in run_dir; returns the
    trained model and the phase's last metrics row."""
    first = phase == 'dense'                            # He et al.'s recipe for the baseline
    epochs = args.dense_epochs if first else args.epochs
    return train_loop.fit(
        model, data, args, epochs=epochs,
        batch_size=args.dense_batch_size if first else args.batch_size,
        weight_decay=args.dense_weight_decay if first else args.weight_decay,
        milestones=common.milestones_at(epochs, (1, 2), (3, 4)) if first else args.milestones,
        warmup=first and DEPTHS.get(args.arch, 0) >= 110,   # ResNet-110: lr 0.01 in epoch 0
        gen=torch.Generator().manual_seed(args.seed + (0 if first else 1)),
        gate_loss=common.gate_loss(args), autocast=autocast,
        mode=common.compile_mode(args.compile, args.device), run_dir=run_dir, phase=phase)


def run_name(args, phase):
    prefix = 'synthetic-' if args.synthetic else '' if args.dataset == 'cifar10' \
        else f'{args.dataset}-'
    if phase == 'dense':
        return f'{prefix}dense-{args.arch}-s{args.seed}'
    soft = '-soft' if args.soft_gates else ''
    return (f'{prefix}{args.arch}-{args.gating}-{args.granularity}-{args.loss}-t{args.t:g}{soft}'
            f'-s{args.seed}')


def main(argv=None):
    args = parse_args(argv)
    if args.evaluate:                   # the named run: argparse.Namespace of its settings
        first = argparse.Namespace(**{**vars(args), 't': (args.t or [0.5])[0]})
        args = common.settings_of_run(args, sys.argv[1:] if argv is None else argv,
                                      Path(args.out) / run_name(first, 'gated'))
    device = common.device_for(args.device)
    out = Path(args.out)
    dense_dir = out / run_name(args, 'dense')
    runs = [argparse.Namespace(**{**vars(args), 't': t}) for t in args.t]  # one run per target
    finished = {}                                   # targets finished before: reused
    for run in runs:
        row = common.finished_row(out / run_name(run, 'gated'), run,
                                  [k for k in vars(run) if k not in FREE])
        if row is not None:
            print(f't = {run.t:g}: reusing the finished run in {out / run_name(run, "gated")}')
            finished[run.t] = row
    runs = [run for run in runs if run.t not in finished]
    if finished and not runs:
        common.print_summary(list(finished.values()))
        return list(finished.values())
    dense_done = bool(args.init) or common.check_run_dir(
        dense_dir, args, 'dense_epochs', ('arch', 'seed', 'synthetic', 'dataset'), DENSE_SETTINGS,
        reuse_finished=bool(runs))
    for run in runs:
        common.check_run_dir(out / run_name(run, 'gated'), run, 'epochs', STRUCTURE,
                             [k for k in vars(run) if k not in FREE])
    dirs = [out / run_name(run, 'gated') for run in runs]
    dirs += [dense_dir] * (not runs or not dense_done)
    for d in dirs if args.evaluate else []:
        if (d / f'final{tag(args)}.json').exists():
            raise UsageError(f'{d} was evaluated with these settings already '
                             f'(final{tag(args)}.json): change --tau, --recal-batches or --also')
    if device.type == 'cpu' and not args.evaluate:
        print('warning: training on the CPU; a GPU is much faster', file=sys.stderr)
    common.use_threads(args, device)
    common.ensure_writable(dirs, out)
    with common.locked(dirs):
        rows = pipeline(args, runs, dense_dir, dense_done, device) + list(finished.values())
    if len(rows) > 1 or finished:
        common.print_summary(rows)
    return rows


def pipeline(args, runs, dense_dir, dense_done, device):
    """1. the dense baseline, then 2-4 (fine_tune) for each target."""
    print('args:', json.dumps(vars(args)))
    autocast = common.autocast_for(device)
    torch.manual_seed(args.seed)
    data = cifar_data.load(args.data_dir, args.synthetic, device, args.dataset)
    if len(data.x_test) < 2:
        raise UsageError(f'the test set has {len(data.x_test)} image(s): evaluation and export '
                         'need at least 2')
    sizes = [args.batch_size] * bool(runs) + [args.dense_batch_size] * (not dense_done)
    if len(data.x_train) < max(sizes, default=0):
        raise UsageError(f'the training set has {len(data.x_train)} images, fewer than one batch '
                         f'({max(sizes)}): lower --batch-size / --dense-batch-size')
    if runs:  # the gated net's checks are cheap: first
        n_modules = len(gc.gates(build(args, gated=True)))
        if args.loss == 'per-gate' and args.targets and len(args.targets) != n_modules:
            raise UsageError(f'--targets must give one rate per gate module ({n_modules}), '
                             f'got {len(args.targets)}')

    # 1. dense baseline: --init, an earlier run, or trained here (He et al.'s recipe)
    torch.manual_seed(args.seed)  # the same dense net, gated run or not
    baseline = build(args, gated=False)
    if args.init:
        common.load_init(baseline, args.init)
        print(f'dense: weights from {args.init}')
    elif dense_done:
        common.load_weights(baseline, common.load_checkpoint(dense_dir / 'last.pt')['model'],
                            dense_dir / 'last.pt', gated=False)
        print(f'dense: reusing the finished baseline in {dense_dir}')
    else:
        baseline, _ = run_phase('dense', baseline, data, args, dense_dir, autocast)
    base_acc = train_loop.evaluate(baseline, data, autocast)[0]
    if not runs:
        row = dict(arch=args.arch, gating=args.gating, baseline_acc=base_acc)
        common.finish(row, dense_dir)
        return [row]
    return [fine_tune(run, Path(args.out) / run_name(run, 'gated'), baseline, base_acc, data,
                      autocast) for run in runs]


def fine_tune(args, run_dir, baseline, base_acc, data, autocast):
    """2-4 for one target t: gated fine-tuning from the dense weights, BN recalibration,
    evaluation, export. Returns the final row."""
    torch.manual_seed(args.seed)
    model = gated_from(baseline, args)
    if args.evaluate:                                           # the trained, unrecalibrated net
        ckpt = common.load_checkpoint(run_dir / 'last.pt')
        common.load_weights(model, ckpt['model'], run_dir / 'last.pt', gated=False)
        last = ckpt['metrics']
    else:
        model, last = run_phase('gated', model, data, args, run_dir, autocast)
    # 3. BN recalibration under threshold inference, then the evaluation (3.3, 4.1)
    gc.set_inference(model, 'threshold', args.tau)
    if args.round_to > 1 and args.gating == 'static':           # widths on the vector width
        model = ge.round_gates(model, args.round_to)
    gen = torch.Generator().manual_seed(args.seed + 2)
    label, recal = common.recal_batches(data.train_batches(args.batch_size, gen),
                                        args.recal_batches, len(data.x_train) // args.batch_size)
    with common.stage(label), autocast():
        gc.recalibrate_bn(model, (xb for xb, _ in recal))
    with common.stage(f'evaluation at threshold {args.tau}'):
        acc, rate, macs, polar = train_loop.evaluate(model, data, autocast)
    row = dict(arch=args.arch, gating=args.gating, baseline_acc=base_acc,
               granularity=args.granularity, loss=args.loss, t=args.t, tau=args.tau, gated_acc=acc,
               macs_percent=macs, train_macs_percent=last['macs'] if last else math.nan,
               activation_rate=rate, polarized=polar, epochs=last['epoch'] if last else 0,
               round_to=args.round_to)
    for strategy in args.also:                                  # 3.3's other strategies
        with gc.evaluation(model, 'all_on' if strategy == 'all_on' else 'sample'):
            if strategy == 'ensemble':
                with autocast():
                    probs = torch.cat([gc.ensemble_predict(model, xb, args.runs)
                                       for xb, _ in data.test_batches()])
                row['ensemble_acc'] = 100 * (probs.argmax(1) == data.y_test).float().mean().item()
            else:
                accs = [train_loop.evaluate(model, data, autocast)[0]
                        for _ in range(args.runs if strategy == 'sample' else 1)]
                row[f'{strategy}_acc'] = sum(accs) / len(accs)
    if args.gating == 'dynamic':  # Fig. 4: which classes each gate runs on
        with autocast():
            rates = common.per_class_rates(model, data.test_batches(), len(data.classes))
        common.write_class_rates(rates, data.classes, common.gate_names(model), run_dir,
                                 tag(args))
    if isinstance(model, gc.DenseNetExits):                    # Table 5: where images leave
        with autocast():
            row['table5'] = ge.exit_report(model, data.test_batches(size=500))
        common.print_exit_report(row['table5'])
    with common.stage('export'):                                # 4. the pruned network
        pruned = common.export(model, baseline, data.prepare(data.x_test[:2]), run_dir, row,
                               tag(args))
        if pruned is not None:
            row['pruned_acc'] = train_loop.evaluate(pruned, data, autocast)[0]
    common.warn_if_missed(row, last)
    common.finish(row, run_dir, tag(args))
    return row


def tag(args):
    """'' for the files of a training run; for --evaluate, the settings that name its files."""
    if not args.evaluate:
        return ''
    return (f'-tau{args.tau:g}-recal{args.recal_batches}' + ''.join(f'-{s}' for s in args.also)
            + (f'-round{args.round_to}' if args.round_to > 1 else ''))


def cli(argv=None):
    """main with bad input reported as one line on stderr and exit status 2."""
    return common.run_cli(main, argv)


if __name__ == '__main__':
    sys.exit(cli())
