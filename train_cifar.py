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
import figures
import gumbel_channels as gc
import gumbel_export as ge
import gumbel_skip as gs
import machine
import run_folder as rf
import script_models as sm
import train_loop as tl
from run_folder import UsageError

DEPTHS = {
    **{f'resnet{d}': d for d in (8, 20, 32, 44, 56, 110)},  # resnet8, densenet16: quick checks
    **{f'densenet{d}': d for d in (16, 40, 100)},
}
ANY = sorted(set(torchvision.models.list_models(module=torchvision.models)) - set(DEPTHS))
def parser():
    """The command line, its flags in run_folder.Parser's four groups."""
    p = rf.Parser(description=__doc__.splitlines()[0])
    s, t, e, m = (p.group[g].add_argument for g in p.GROUPS)
    s('--synthetic', action='store_true', help='6,000 generated stripe images: runs offline')
    s('--dataset', default='cifar10', choices=list(cifar_data.DATASETS),
      help="the data set, in torchvision's layout under --data-dir (downloaded there when "
           'absent); grey 28 x 28 sets are padded to 32 x 32 on 3 channels')
    s('--train-size', type=rf.COUNT, help='train on this many training images, a fixed random '
      'subset (default all; a quick look, not a paper row)')
    s('--arch', default='resnet56', choices=list(DEPTHS) + ANY, metavar='ARCH',
      help='the CIFAR ResNets resnet8 ... resnet110 and DenseNets densenet16/40/100 (early '
           'exits), or any torchvision classifier (static gates on its channel groups: '
           'gumbel_any), e.g. mobilenet_v2')
    s('--gating', choices=('static', 'dynamic', 'none'),
      help="static (pruning; ResNet default), dynamic (conditional computation; the DenseNets' "
           "early exits), none (the dense baseline only) (3.2, 5)")
    s('--granularity', choices=gc.GRANULARITIES,
      help='ResNets: channel (filter, default) or layer gates (4.4, Table 4)')
    tl.add_gate_args(p)
    s('--t', type=rf.RATE, nargs='+', help='target rate(s), one run each (default 0.5; '
      f'DenseNets with early exits: {EXIT_T}, docs/reproducing.md "Early exits")')
    s('--seed', type=int, default=0, help='seeds the weights, gates, data order and noise')
    t('--epochs', type=rf.COUNT, default=100, help='gated fine-tuning epochs (4.1)')
    t('--batch-size', type=rf.COUNT, default=256, help='gated fine-tuning batch (4.1)')
    t('--lr', type=rf.POSITIVE, default=0.1, help='SGD lr of both phases (momentum 0.9)')
    t('--weight-decay', type=rf.NON_NEGATIVE, default=5e-4,
      help='fine-tuning weight decay (official code)')
    t('--dense-epochs', type=rf.COUNT, default=200,
      help='dense baseline epochs; lr / 10 at 50%%, 75%%')
    t('--dense-batch-size', type=rf.COUNT, default=128, help='dense baseline batch')
    t('--dense-weight-decay', type=rf.NON_NEGATIVE, default=1e-4,
      help='dense baseline weight decay')
    t('--init', help='dense checkpoint (or state_dict) to fine-tune from instead of training one')
    tl.add_evaluation_args(p.group['evaluation'])
    e('--also', nargs='*', default=[], choices=('all_on', 'sample', 'ensemble'),
      help='more evaluations (3.3)')
    e('--runs', type=rf.COUNT, default=8, help='stochastic runs for --also sample / ensemble')
    e('--round-to', type=rf.WHOLE, default=0, help="keep each gate's channel count a multiple "
      'of this before export (16: AVX-512 float32; 0: off; docs/deployment.md: speed)')
    m('--evaluate', nargs='?', const=True, default=False, metavar='RUN_DIR',
      help='re-evaluate a finished run (RUN_DIR, or those this command names) with '
           '--tau/--recal-batches/--also/--round-to; every other setting comes from the '
           "run's args.json; results go to new files named by those settings")
    m('--data-dir', default='data', help='holds the data set (cifar-10-batches-py for CIFAR-10)')
    m('--out', default='runs', help='runs are written in subfolders of this folder')
    m('--resume', action='store_true', help="continue this configuration's unfinished run")
    machine.add_machine_args(p.group['machine'])
    return p


def parse_args(argv):
    args = parser().parse_args(argv)
    machine.device_for(args.device)
    if args.arch in ANY and (args.gating not in (None, 'static', 'none') or args.granularity):
        raise UsageError(f'--arch {args.arch} takes --gating static (its channel groups, '
                         'gumbel_any) or none; dynamic and layer gates are for this '
                         "script's resnet8 ... resnet110 (and train_imagenet.py's ResNets)")
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
    args.t = [] if args.gating == 'none' else args.t or [
        EXIT_T if args.granularity == 'exit' else 0.5]
    least = exit_costs(DEPTHS[args.arch])[0] if args.granularity == 'exit' else 0
    if args.t and min(args.t) <= least:                 # the cheapest way out of an exit net
        raise UsageError(f'--t {min(args.t):g}: an image that leaves at the first exit already '
                         f'costs {100 * least:.1f}% of the MACs of {args.arch}, so every image '
                         f'would leave there; choose t in ({least:.2f}, 1] (default {EXIT_T})')
    args.milestones = tl.checked_milestones(args.milestones, args.epochs, ((2, 5), (7, 10)))
    if len(set(args.t)) != len(args.t):
        raise UsageError(f'--t must be distinct rates, got {args.t}')
    return args


EXIT_T = 0.88     # the paper's Table 5 split's cost on DenseNet-BC-100 (docs/reproducing.md)


def exit_costs(depth, hw=(32, 32)):
    """Each way out of the early-exit DenseNet of `depth` as a share of its MaxFLOPs: leaving
    at exit 1, at exit 2, running to the end (gc.exit_net_macs)."""
    model = gc.densenet_cifar(depth)
    n = len(model.exits)
    return [(gc.exit_net_macs(model, hw, [torch.full((1, 1), float(j == k)) for j in range(n)])
             / gc.exit_net_macs(model, hw)).item() for k in range(n + 1)]


# ----------------------------------------------------------------------------- training

def build(args, gated):
    """The CIFAR network of --arch: dense, or with its gates (ResNets, any torchvision
    classifier) or exits (DenseNets)."""
    if args.arch in ANY:
        model = sm.torchvision_model(args.arch, num_classes=classes(args)).to(args.device)
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
        model = sm.gate_model(baseline, example, init_p=args.gate_init_p)
        tl.warn_below_floor(model, args.t)
        return tl.sampling(model.to(memory_format=torch.channels_last), args)
    model = tl.sampling(build(args, gated=True), args)
    rf.load_weights(model, baseline.state_dict(), 'the dense baseline', gated=True)
    return tl.init_gates(model, args)


def run_phase(phase, model, data, args, run_dir, autocast):
    """One phase ('dense' or 'gated') in run_dir -> (the trained model, its last metrics row)."""
    first = phase == 'dense'                            # He et al.'s recipe for the baseline
    epochs = args.dense_epochs if first else args.epochs
    batch_size = args.dense_batch_size if first else args.batch_size
    milestones = tl.milestones_at(epochs, (1, 2), (3, 4)) if first else args.milestones
    if first:                   # its folder records the dense run, whatever command made it
        args = argparse.Namespace(**{**vars(args), 'gating': 'none', 't': [], 'init': None})
    last = tl.fit_images(
        model, data, args, epochs=epochs, batch_size=batch_size,
        weight_decay=args.dense_weight_decay if first else args.weight_decay,
        milestones=milestones, warmup=first and DEPTHS.get(args.arch, 0) >= 110,  # ResNet-110
        gen=data.generator(args.seed + (0 if first else 1)),      # lr 0.01 at 0
        gate_loss=tl.gate_loss(args), autocast=autocast, phase=phase,
        mode=machine.compile_mode(args.compile, args.device),
        folder=rf.RunFolder(run_dir, 'train_cifar.py'))
    return model, last


DENSE = ('synthetic', 'dataset', 'train_size', 'arch', 'seed', 'dense_epochs', 'dense_batch_size',
         'dense_weight_decay', 'lr')                   # what the dense baseline depends on


def flags(*groups):
    """The flags of these groups of the command line (run_folder.Parser)."""
    return parser().dests(*groups)


def run_name(args, phase):
    """The run folder's name: its structure flags ('resnet56-static-channel-flops-t0.5-s0');
    the dense baseline's, from those it depends on ('dense-resnet56-s0')."""
    if phase == 'dense':
        return rf.run_name(args, [k for k in flags('structure') if k in DENSE], 'dense')
    return rf.run_name(args, flags('structure'))


def main(argv=None):
    args = parse_args(argv)
    if args.evaluate:
        return evaluate_runs(args, sys.argv[1:] if argv is None else argv)
    device = machine.device_for(args.device)
    out = Path(args.out)
    dense_dir = out / run_name(args, 'dense')
    free = flags('evaluation', 'machine')
    runs, finished = [], {}                         # targets to train, and those reused
    for t in args.t:                                # one run per target
        run = argparse.Namespace(**{**vars(args), 't': t})
        action, row = rf.decide(out / run_name(run, 'gated'), run, epochs_key='epochs',
                                structure=flags('structure'), evaluation=flags('evaluation'),
                                settings=[k for k in vars(run) if k not in free])
        if action == 'reuse':
            print(f't = {t:g}: reusing the finished run in {out / run_name(run, "gated")}')
            finished[t] = row
        else:
            runs.append(run)
    if finished and not runs:
        rf.print_summary(list(finished.values()))
        return list(finished.values())
    dense_done = bool(args.init) or rf.decide(
        dense_dir, args, epochs_key='dense_epochs', dense=True,
        structure=[k for k in flags('structure') if k in DENSE],
        settings=[k for k in DENSE if k not in flags('structure')])[0] == 'reuse'
    dirs = [out / run_name(run, 'gated') for run in runs]
    dirs += [dense_dir] * (not runs or not dense_done)
    if args.arch in ANY:                           # before any folder: it runs, it gates
        sm.check_model(build(args, gated=False), torch.zeros(2, 3, 32, 32, device=device),
                       runs, f'--arch {args.arch}')
    if device.type == 'cpu':
        print('warning: training on the CPU; a GPU is much faster', file=sys.stderr)
    machine.use_machine(args, device)
    rf.ensure_writable(dirs, out)
    with rf.locked(dirs):
        rows = pipeline(args, runs, dense_dir, dense_done, device) + list(finished.values())
    if len(rows) > 1 or finished:
        rf.print_summary(rows)
    return rows


def evaluate_runs(args, argv):
    """--evaluate [RUN_DIR]: finished runs (RUN_DIR, or those this command names) evaluated
    again with this command's evaluation flags, into files named by them; the run's final.json
    gives its dense accuracy, so the dense folder need not be there."""
    if args.gating == 'none' and not isinstance(args.evaluate, str):
        raise UsageError('--evaluate re-evaluates gated runs; a dense baseline has no gates '
                         '(its accuracy is baseline_acc in its final.json)')
    dirs = [Path(args.evaluate)] if isinstance(args.evaluate, str) else [
        Path(args.out) / run_name(argparse.Namespace(**{**vars(args), 't': t}), 'gated')
        for t in args.t]
    rows = []
    for run_dir in dirs:
        run, saved = rf.settings_of_run(args, argv, run_dir, flags('evaluation'),
                                        'train_cifar.py')
        row = rf.evaluated_before(run, saved, run_dir, flags('evaluation'))
        if row is None:
            free = flags('evaluation', 'machine')
            rf.decide(run_dir, run, epochs_key='epochs', structure=flags('structure'),
                      settings=[k for k in saved if k not in free and k in vars(run)])
            device = machine.device_for(run.device)
            machine.use_machine(run, device)
            with rf.locked([run_dir]):
                data = cifar_data.load(run.data_dir, run.synthetic, device, run.dataset)
                base_acc = json.loads((run_dir / 'final.json').read_text())['baseline_acc']
                torch.manual_seed(run.seed)
                row = fine_tune(run, run_dir, build(run, gated=False), base_acc,
                                data.subset(run.train_size), machine.autocast_for(device))
        rows.append(row)
    if len(rows) > 1:
        rf.print_summary(rows)
    return rows


def pipeline(args, runs, dense_dir, dense_done, device):
    """1. the dense baseline, then 2-4 (fine_tune) for each target."""
    print('args:', json.dumps(vars(args)))
    autocast = machine.autocast_for(device)
    torch.manual_seed(args.seed)
    data = cifar_data.load(args.data_dir, args.synthetic, device, args.dataset)
    data = data.subset(args.train_size)
    if len(data.x_test) < 2:
        raise UsageError(f'the test set has {len(data.x_test)} image(s): evaluation and export '
                         'need at least 2')
    sizes = [args.batch_size] * bool(runs) + [args.dense_batch_size] * (not dense_done)
    if len(data.x_train) < max(sizes, default=0):
        raise UsageError(f'the training set has {len(data.x_train)} images, fewer than one batch '
                         f'({max(sizes)}): lower --batch-size / --dense-batch-size')
    if runs and args.loss == 'per-gate' and args.targets:  # cheap: before any training
        n_modules = len(gc.gates(build(args, gated=True)))
        if len(args.targets) != n_modules:
            raise UsageError(f'--targets must give one rate per gate module ({n_modules}), '
                             f'got {len(args.targets)}')

    # 1. dense baseline: --init, an earlier run, or trained here (He et al.'s recipe)
    torch.manual_seed(args.seed)  # the same dense net, gated run or not
    baseline = build(args, gated=False)
    if args.init:
        rf.load_init(baseline, args.init)
        print(f'dense: weights from {args.init}')
    elif dense_done:
        rf.load_weights(baseline, rf.load_checkpoint(dense_dir / 'last.pt')['model'],
                            dense_dir / 'last.pt', gated=False)
        print(f'dense: reusing the finished baseline in {dense_dir}')
    else:
        baseline, _ = run_phase('dense', baseline, data, args, dense_dir, autocast)
    base_acc = tl.evaluate(baseline, data, autocast)[0]
    if not runs:
        row = dict(arch=args.arch, gating=args.gating, baseline_acc=base_acc,
                   normalization=rf.normalization(data.mean, data.std))
        if dense_done:                                          # reused: its files as they are
            print(f'final: baseline_acc {base_acc:.2f} (the finished baseline in {dense_dir})')
        else:
            rf.finish(row, dense_dir)
        return [row]
    return [fine_tune(run, Path(args.out) / run_name(run, 'gated'), baseline, base_acc, data,
                      autocast) for run in runs]


def fine_tune(args, run_dir, baseline, base_acc, data, autocast):
    """2-4 for one target t: gated fine-tuning from the dense weights, BN recalibration,
    evaluation, export. Returns the final row."""
    torch.manual_seed(args.seed)
    model = gated_from(baseline, args)
    if args.evaluate:                                           # the trained, unrecalibrated net
        ckpt = rf.load_checkpoint(run_dir / 'last.pt')
        rf.load_weights(model, ckpt['model'], run_dir / 'last.pt', gated=False)
        last = ckpt['metrics']
    else:
        model, last = run_phase('gated', model, data, args, run_dir, autocast)
    # 3. BN recalibration under threshold inference, then the evaluation (3.3, 4.1)
    gc.set_inference(model, 'threshold', args.tau)
    if args.round_to > 1 and args.gating == 'static':           # widths on the vector width
        model = ge.round_gates(model, args.round_to)
    gen = data.generator(args.seed + 2)
    label, recal = rf.recal_batches(data.train_batches(args.batch_size, gen),
                                        args.recal_batches, len(data.x_train) // args.batch_size)
    with rf.stage(label), autocast():
        gc.recalibrate_bn(model, (xb for xb, _ in recal))
    with rf.stage(f'evaluation at threshold {args.tau}'):
        acc, rate, macs, polar, _ = tl.evaluate(model, data, autocast)
    row = dict(arch=args.arch, gating=args.gating, baseline_acc=base_acc,
               test_images=len(data.x_test), normalization=rf.normalization(data.mean, data.std),
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
                accs = [tl.evaluate(model, data, autocast)[0]
                        for _ in range(args.runs if strategy == 'sample' else 1)]
                row[f'{strategy}_acc'] = sum(accs) / len(accs)
    if args.gating == 'dynamic':  # Fig. 4: which classes each gate runs on
        with autocast():
            rates = figures.per_class_rates(model, data.test_batches(), len(data.classes))
        rf.save_files(figures.class_rate_files(rates, data.classes, figures.gate_names(model)),
                      run_dir, rf.evaluation_tag(args))
    if isinstance(model, gc.DenseNetExits):                    # Table 5: where images leave
        with autocast():
            row['table5'] = gs.exit_report(model, data.test_batches(size=500))
        print_exit_report(row['table5'])
    static = args.gating == 'static'                            # 4. the pruned network
    with rf.stage('export' if static else 'export of final.pt (dynamic gates: no pruned net)'):
        pruned = sm.save_exports(model, baseline, data.prepare(data.x_test[:2]), run_dir, row,
                                 rf.evaluation_tag(args))
        if pruned is not None:
            row['pruned_acc'] = tl.evaluate(pruned.to(data.x_test.device), data, autocast)[0]
    rf.warn_if_missed(row, last)
    rf.finish(row, run_dir, rf.evaluation_tag(args))
    return row


def print_exit_report(report):
    """Table 5 from gumbel_skip.exit_report, one line per exit, named as the paper does
    ('block 1', 'block 2', ..., 'final block')."""
    n = len(report['exits'])
    for e, name in zip(report['exits'], [f'block {k + 1}' for k in range(n - 1)] + ['final block']):
        print(f"{name}: {100 * e['share']:5.2f}% of images leave, accuracy "
              f"{100 * e['acc_all']:5.2f} on all, {100 * e['acc_taken']:5.2f} on those taken")
    print(f"MACs spent {report['counted_macs'] / report['full_macs']:.1%} of running every "
          f"image to the end; time {report['seconds'] / report['seconds_to_the_end']:.2f} x")


def cli(argv=None):
    """main with bad input reported as one line on stderr and exit status 2."""
    return rf.run_cli(main, argv)


if __name__ == '__main__':
    sys.exit(cli())
