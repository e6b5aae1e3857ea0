"""Gated torchvision classifiers on ImageNet from a dense start (Tables 1, 2, 4).

    python train_imagenet.py --arch resnet50 --pretrained --t 0.4 --data-dir /data/imagenet
    torchrun --nproc_per_node 8 train_imagenet.py --arch resnet50 --pretrained --t 0.4 ...
    python train_imagenet.py --arch resnet18 --gating none --data-dir DIR     # a dense start
    python train_imagenet.py --arch resnet18 --init runs/imagenet-dense-resnet18-s0/last.pt ...

Gates are added to the dense start (--pretrained: torchvision's IMAGENET1K_V1, the paper's
76.13% ResNet-50; or --init) by gate_resnet (ResNets) or gumbel_any (any other model,
static gates), then trained for 100 epochs with the gate recipe both scripts share (4.1;
NOTES.md 18-20). BN is then recalibrated over 200 batches under threshold inference, and
the script writes top-1 and top-5 at tau = 0.5, MACs % of the baseline, and for static
gates a physically pruned model. DDP switches on from torchrun's environment; --batch-size
is the global batch. Checkpoints, logs and errors work as in train_cifar.py.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel

import figures
import gumbel_channels as gc
import gumbel_export as ge
import imagenet_data
import machine
import run_folder as rf
import script_models as sm
import train_loop as tl
from run_folder import UsageError

NORMALIZATION = rf.normalization([255 * v for v in imagenet_data.MEAN],
                                [255 * v for v in imagenet_data.STD])

ARCHS = sorted(torchvision.models.list_models(module=torchvision.models))  # classification


def is_resnet(arch):
    """ResNets take gate_resnet's gates (any kind); other models gumbel_any's static ones."""
    return arch.startswith(('resnet', 'wide_resnet'))


def aig_targets(t):
    """AIG's per-block targets for ResNet-50 (2.1). The paper lists 15 rates for 16 blocks;
    we restore a 1 for layer4's first block, where every other stage has one (NOTES.md)."""
    return [1, 1, 0.8, 1, t, t, t, 1, t, t, t, t, 1, 1, 0.7, 1]


def parser():
    """The command line, its flags in run_folder.Parser's four groups."""
    p = rf.Parser(description=__doc__.splitlines()[0])
    s, t, e, m = (p.group[g].add_argument for g in p.GROUPS)
    s('--synthetic', action='store_true', help='random images (1,024 train, 256 val, 10 '
      'classes) instead of --data-dir: the whole pipeline without ImageNet')
    s('--arch', default='resnet50', choices=ARCHS, metavar='ARCH',
      help='a torchvision classification model: ResNets take static or dynamic gates, any '
           'other model static gates on its prunable channel groups (gumbel_any)')
    s('--gating', choices=('static', 'dynamic', 'none'),
      help='static (pruning, Table 2), dynamic (conditional, Table 1) or none (a dense '
           'baseline to start from: --init); default dynamic for the ResNets, static for '
           'other models (their channel groups: gumbel_any)')
    s('--granularity', default='channel', choices=gc.GRANULARITIES,
      help='channel (filter) or layer (Table 4)')
    tl.add_gate_args(p)
    s('--t', type=rf.RATE, help='target rate in (0, 1] (default 0.5)')
    s('--seed', type=int, default=0, help='seeds the weights, gates, data order and noise')
    t('--pretrained', action='store_true',
      help="start from torchvision's IMAGENET1K_V1 weights (4.1)")
    t('--init', help='dense checkpoint (or state_dict) of --arch to gate, instead of --pretrained')
    t('--aig-targets', action='store_true',
      help="per-gate loss with AIG's ResNet-50 list (layer gates)")
    t('--epochs', type=rf.COUNT, default=100, help='gated (or dense) training epochs (4.1)')
    t('--batch-size', type=rf.COUNT, default=256, help='global batch, split over the processes')
    t('--lr', type=rf.POSITIVE, default=0.1, help='SGD lr (momentum 0.9)')
    t('--weight-decay', type=rf.NON_NEGATIVE, default=1e-4, help='SGD weight decay')
    t('--crop-size', type=rf.COUNT, default=224,
      help='training crop; validation resizes to 8/7 of it, then crops')
    t('--amp', default='bf16', choices=('bf16', 'fp16', 'off'),
      help='CUDA autocast precision (fp16 with loss scaling); float32 on the CPU')
    tl.add_evaluation_args(p.group['evaluation'])
    m('--workers', type=rf.checked(int, lambda v: 0 <= v <= 256, 'in 0..256'),
      default=min(8, os.cpu_count() or 1), help='DataLoader workers per process')
    m('--data-dir', default='imagenet', help='holds train/ and val/ in ImageFolder layout')
    m('--out', default='runs', help='runs are written in subfolders of this folder')
    m('--resume', action='store_true', help="continue this configuration's unfinished run")
    m('--evaluate', metavar='RUN_DIR', help='re-evaluate a finished run with --tau / '
      "--recal-batches; every other setting comes from the run's args.json; results go to new "
      'files named by those settings (final-tau0.4-recal200.json, ...)')
    machine.add_machine_args(p.group['machine'])
    m('--sync-bn', action='store_true', help='SyncBatchNorm across processes')
    return p


def parse_args(argv):
    args = parser().parse_args(argv)
    machine.device_for(args.device)
    if args.gating == 'none' and (args.t is not None or args.init):
        raise UsageError('--gating none trains the dense baseline only: it takes no --t, and '
                         '--init would replace what it trains')
    if args.init and args.pretrained:
        raise UsageError('--init and --pretrained both give the dense start: pass one')
    args.t = None if args.gating == 'none' else args.t or 0.5
    shares = [(3, 10), (6, 10), (9, 10)]                    # AIG's every 30 of 100 epochs
    args.milestones = tl.checked_milestones(args.milestones, args.epochs, shares)
    args.gating = args.gating or ('dynamic' if is_resnet(args.arch) else 'static')
    if not is_resnet(args.arch) and (args.gating == 'dynamic' or args.granularity != 'channel'):
        raise UsageError(f'--arch {args.arch}: dynamic gates and layer gates are for the '
                         'ResNets (here resnet18 ... resnet152, wide_resnet50_2 and '
                         "wide_resnet101_2; train_cifar.py's resnet8 ... resnet110); other "
                         'models take --gating static (their channel groups)')
    if args.aig_targets:
        if (args.arch, args.granularity, args.loss) != ('resnet50', 'layer', 'per-gate'):
            raise UsageError('--aig-targets needs --arch resnet50 --granularity layer '
                             '--loss per-gate')
        args.targets = aig_targets(args.t)
    return args


@torch.no_grad()
def evaluate(model, loader, device, autocast, distributed):
    """(top-1 %, top-5 %, rate, MACs %, polarized) over the whole validation set, all processes."""
    model.eval()
    sums, stats, batches = torch.zeros(3, device=device), 0, 0
    for x, y, _ in loader:                              # unreadable images left out
        x, y = imagenet_data.on_device(x, device), y.to(device)
        with autocast():
            out = model(x)
        logits, info = gc.split_output(out)
        top5 = logits.topk(min(5, logits.shape[1]), 1).indices
        sums += torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(1).sum(),
                             torch.tensor(len(y), device=device)])
        if info is not None:
            stats, batches = stats + tl.gate_stats(info), batches + 1
    gates = torch.as_tensor(tl.averages(stats, batches), dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(sums)
        dist.all_reduce(gates)
        gates /= dist.get_world_size()
    top1, top5, n = sums.tolist()
    return 100 * top1 / n, 100 * top5 / n, *gates.tolist()


def setup(args):
    """Processes (torchrun), device, precision: -> (device, rank, world, distributed, log)."""
    distributed = 'RANK' in os.environ                  # launched by torchrun
    device = machine.device_for(args.device)            # cuda -> cuda:LOCAL_RANK
    if device.type == 'cuda':
        torch.cuda.set_device(device)                   # before the process group (NCCL)
    if distributed:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    log = print if rank == 0 else (lambda *a, **k: None)
    if device.type != 'cuda' and rank == 0:
        print('warning: training on the CPU; a GPU is much faster', file=sys.stderr)
    machine.use_machine(args, device, log)
    return device, rank, world, distributed, log


def dense_network(args, classes, device):
    """torchvision's network for --arch: IMAGENET1K_V1 weights with --pretrained, the weights
    of --init, or a fresh one."""
    weights = None
    if args.pretrained:
        if classes != 1000:
            raise UsageError(f'--pretrained: the pretrained classifier has 1000 classes, the '
                             f'data {classes}')
        enum = torchvision.models.get_model_weights(args.arch)
        weights = getattr(enum, 'IMAGENET1K_V1', enum.DEFAULT)
    try:
        dense = sm.torchvision_model(args.arch, weights=weights, num_classes=classes)
    except Exception as e:                                  # offline, or a broken cache
        raise UsageError(f'cannot load the pretrained {args.arch} weights ({type(e).__name__}: '
                         f'{str(e)[:100]}): put them in the torch hub cache, or drop '
                         '--pretrained') from None
    if args.init:                                           # e.g. a --gating none run's last.pt
        rf.load_init(dense, args.init)
    return dense.to(device, memory_format=torch.channels_last)


def run_name(args):
    """'imagenet-resnet50-dynamic-channel-flops-t0.5-s0', or a dense baseline's
    'imagenet-dense-resnet18-s0'."""
    if args.gating == 'none':
        return rf.run_name(args, ['synthetic', 'arch', 'seed'], 'imagenet', 'dense')
    return rf.run_name(args, parser().dests('structure'), 'imagenet')


def main(argv=None):
    args = parse_args(argv)
    p = parser()
    free = p.dests('evaluation', 'machine')
    run_dir = Path(args.out) / run_name(args)
    if args.evaluate:                               # a finished run's settings, this machine's
        run_dir = Path(args.evaluate)
        args, saved = rf.settings_of_run(args, sys.argv[1:] if argv is None else argv, run_dir,
                                         p.dests('evaluation'), 'train_imagenet.py')
        row = rf.evaluated_before(args, saved, run_dir, p.dests('evaluation'))
        if row is not None:
            return row
    device, rank, world, distributed, log = setup(args)
    autocast = machine.autocast_for(device, args.amp)
    action, finished = rf.decide(run_dir, args, epochs_key='epochs',
                                 structure=p.dests('structure'), evaluation=p.dests('evaluation'),
                                 settings=[k for k in vars(args) if k not in free])
    if action == 'reuse':                           # the same command again: its results
        log(f'reusing the finished run in {run_dir}')
        rf.show(finished, log)
        return finished
    log(f'run folder: {run_dir}')
    if not is_resnet(args.arch) and not args.evaluate:   # before any folder: it runs, gates
        example = torch.zeros(2, 3, args.crop_size, args.crop_size, device=device)
        sm.check_model(dense_network(argparse.Namespace(**{**vars(args), 'pretrained': False,
                                                         'init': None}), 10, device),
                       example, args.gating != 'none',
                       f'--arch {args.arch} at --crop-size {args.crop_size}')
    if rank == 0:
        rf.ensure_writable([run_dir], args.out)
    with rf.locked([run_dir] if rank == 0 else []):
        return pipeline(args, run_dir, device, autocast, rank, world, distributed, log)


def pipeline(args, run_dir, device, autocast, rank, world, distributed, log):
    """The baseline's accuracy, gated training (4.1), BN recalibration, evaluation, export."""
    log('args:', json.dumps(vars(args)))
    torch.manual_seed(args.seed)
    train_loader, val_loader, names = imagenet_data.loaders(args, world, rank)
    baseline = dense_network(argparse.Namespace(**{**vars(args), 'pretrained': False, 'init': None})
                             if args.evaluate else args, len(names), device)   # --evaluate:
    # the architecture only; the run's own weights come from its last.pt
    if args.gating == 'none':                           # the dense baseline, trained here
        last = train(baseline, args, run_dir, (train_loader, val_loader), device, autocast,
                     (rank, world))
        top1, top5, *_ = evaluate(baseline, val_loader, device, autocast, distributed)
        row = dict(arch=args.arch, gating='none', baseline_acc=top1, baseline_top5=top5,
                   epochs=last['epoch'], normalization=NORMALIZATION)
        if rank == 0:
            rf.save_atomic(baseline.state_dict(), run_dir / 'final.pt')
            rf.finish(row, run_dir)
        return row
    if args.evaluate:                                   # its dense accuracy, from its row
        final = json.loads((run_dir / 'final.json').read_text())
        base_top1, base_top5 = final['baseline_acc'], final['baseline_top5']
    else:
        if not (args.pretrained or args.init) and rank == 0:
            print('warning: gating a randomly initialized network (neither --pretrained nor '
                  '--init): the paper gates a trained one (4.1)', file=sys.stderr)
        base_top1, base_top5, *_ = evaluate(baseline, val_loader, device, autocast, distributed)
        log(f'dense start: top-1 {base_top1:.2f}  top-5 {base_top5:.2f}')
    x2 = torch.zeros(2, 3, args.crop_size, args.crop_size, device=device)   # example inputs
    if is_resnet(args.arch):
        model = gc.gate_resnet(baseline, args.gating, args.granularity, args.gate_init_p)
    else:
        model = sm.gate_model(baseline, x2, init_p=args.gate_init_p)
        tl.warn_below_floor(model, args.t)
    model = tl.sampling(model, args)
    if args.targets and len(args.targets) != len(gc.gates(model)):
        raise UsageError(f'--targets must give one rate per gate module ({len(gc.gates(model))}), '
                         f'got {len(args.targets)}')
    if args.sync_bn and distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if rank:                                    # the same weights, each process its own noise
        torch.manual_seed(machine.rank_seed(args.seed, rank))
    if args.evaluate:                                   # the trained, unrecalibrated net
        ckpt = rf.load_checkpoint(run_dir / 'last.pt')
        rf.load_weights(model, ckpt['model'], run_dir / 'last.pt', gated=False)
        last = ckpt['metrics']
    else:
        last = train(model, args, run_dir, (train_loader, val_loader), device, autocast,
                     (rank, world))
    # BN recalibration under threshold inference (4.1), then the final evaluation
    gc.set_inference(model, 'threshold', args.tau)
    label, recal = rf.recal_batches(iter(train_loader), args.recal_batches,
                                        len(train_loader), log)
    with rf.stage(label, log), autocast():
        gc.recalibrate_bn(model, (imagenet_data.on_device(x, device) for x, _, _ in recal))
    if distributed:                                             # one set of BN statistics for all
        for buf in model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf /= world
    with rf.stage(f'evaluation at threshold {args.tau}', log):
        top1, top5, rate, macs, polar = evaluate(model, val_loader, device, autocast, distributed)
    row = dict(arch=args.arch, gating=args.gating, baseline_acc=base_top1,   # CIFAR's keys, and
               normalization=NORMALIZATION,
               granularity=args.granularity, loss=args.loss, t=args.t, tau=args.tau,
               gated_acc=top1, macs_percent=macs,                         # top-5 beside top-1
               train_macs_percent=last['macs'] if last else float('nan'), activation_rate=rate,
               polarized=polar, epochs=last['epoch'] if last else 0, baseline_top5=base_top5,
               gated_top5=top5, test_images=len(val_loader.dataset.dataset))   # all shards
    if args.gating == 'static':                                 # every rank: a shared evaluation
        row['pruned_acc'] = evaluate(ge.prune(model), val_loader, device, autocast, distributed)[0]
    if rank == 0:
        if args.gating == 'dynamic':  # Fig. 4, over the whole validation set
            full = torch.utils.data.DataLoader(val_loader.dataset.dataset, 100,
                                               num_workers=args.workers,
                                               collate_fn=imagenet_data.collate_readable)
            with autocast():
                batches = ((imagenet_data.on_device(x, device), y) for x, y, _ in full)
                rates = figures.per_class_rates(model, batches, len(names))
            rf.save_files(figures.class_rate_files(rates, names, figures.gate_names(model)),
                          run_dir, rf.evaluation_tag(args))
        with rf.stage('export' if args.gating == 'static' else
                      'export of final.pt (dynamic gates: no pruned net)'):
            sm.save_exports(model, baseline, x2, run_dir, row, rf.evaluation_tag(args))
        rf.warn_if_missed(row, last, why='--synthetic has random labels: no channel is '
                              'worth more than another' if args.synthetic else 'NOTES.md 20')
        rf.finish(row, run_dir, rf.evaluation_tag(args))
    return row


def train(model, args, run_dir, data, device, autocast, processes):
    """The 100 epochs of 4.1 through train_loop.fit, with checkpoints (rank 0) and an exact
    resume; -> the last metrics."""
    (train_loader, val_loader), (rank, world) = data, processes
    distributed = world > 1 or dist.is_initialized()
    log = print if rank == 0 else (lambda *a, **k: None)
    unreadable = []

    def batches(epoch):
        imagenet_data.seed_epoch(train_loader, args.seed, epoch, rank)
        unreadable.clear()
        for x, y, bad in train_loader:
            unreadable.append(bad)
            yield imagenet_data.on_device(x, device), y.to(device, non_blocking=True)

    def skipped(epoch):
        if sum(unreadable):
            print(f'warning: epoch {epoch + 1}: skipped {sum(unreadable)} unreadable training '
                  f'images (process {rank})', file=sys.stderr)
        return dict(unreadable_images=sum(unreadable))

    def test(epoch):
        top1, top5, _, test_macs, _ = evaluate(model, val_loader, device, autocast, distributed)
        return dict(top1=top1, top5=top5, test_acc=top1, test_macs=test_macs)
    log(f'{args.epochs} epochs, global batch {args.batch_size} on {world} process(es), '
        f'lr {args.lr} / 10 at epochs {args.milestones}')
    ids = [device] if device.type == 'cuda' else None
    return tl.fit(model, args, epochs=args.epochs, batches=batches, steps=len(train_loader),
                  evaluate=test, after_epoch=skipped, weight_decay=args.weight_decay,
                  milestones=args.milestones, gate_loss=tl.gate_loss(args), autocast=autocast,
                  mode=machine.compile_mode(args.compile, device),
                  folder=rf.RunFolder(run_dir, 'train_imagenet.py', writes=rank == 0),
                  scaler=machine.grad_scaler_for(device, args.amp), log=log,
                  net=DistributedDataParallel(model, device_ids=ids) if distributed else model,
                  test_column='top-1')


def cli(argv=None):
    """main with bad input reported as one line on stderr and exit status 2."""
    try:
        return rf.run_cli(main, argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    sys.exit(cli())
