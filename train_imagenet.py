"""Gated torchvision ResNet-18/34/50 on ImageNet from pretrained weights (Tables 1, 2, 4).

    python train_imagenet.py --arch resnet50 --pretrained --t 0.4 --data-dir /data/imagenet
    torchrun --nproc_per_node 8 train_imagenet.py --arch resnet50 --pretrained --t 0.4 --data-dir /data/imagenet

Gates are added to torchvision's ImageNet weights (IMAGENET1K_V1: the paper's 76.13% top-1
baseline for ResNet-50) by gate_resnet, then trained for 100 epochs (4.1). BN is then
recalibrated over 200 batches under threshold inference, and the script writes top-1 and
top-5 at tau = 0.5, MACs % of the baseline, and for static gates a physically pruned
model. DistributedDataParallel switches on from torchrun's environment; --batch-size is
the global batch. Checkpoints, logs and errors work as in train_cifar.py.
"""
import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms

import gumbel_channels as gc
import train_cifar
from train_cifar import (ROW, UsageError, autocast_for, averages, check_run_dir, ensure_writable, export, finish,
                         gate_loss, gate_stats, load_checkpoint, load_weights, save_atomic, write_class_rates)

WEIGHTS = {'resnet18': 'ResNet18_Weights', 'resnet34': 'ResNet34_Weights', 'resnet50': 'ResNet50_Weights'}
STRUCTURE = ('arch', 'gating', 'granularity', 'seed')


def aig_targets(t):
    """AIG's per-block targets for ResNet-50 (2.1). The paper lists 15 rates for 16 blocks;
    we restore a 1 for layer4's first block, where every other stage has one (NOTES.md)."""
    return [1, 1, 0.8, 1, t, t, t, 1, t, t, t, t, 1, 1, 0.7, 1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a('--arch', default='resnet50', help='resnet18, resnet34 or resnet50')
    a('--pretrained', action='store_true', help="start from torchvision's IMAGENET1K_V1 weights (4.1)")
    a('--gating', default='dynamic', help='static (pruning, Table 2) or dynamic (conditional, Table 1)')
    a('--granularity', default='channel', help='channel (filter) or layer (Table 4)')
    a('--loss', default='flops', help='flops (3.4), batch (Eq. 1) or per-gate (AIG, 2.1)')
    a('--t', type=float, default=0.5, help='target rate in (0, 1]')
    a('--targets', type=float, nargs='+', help='per-gate loss: one rate per gate module (default: t each)')
    a('--aig-targets', action='store_true', help="per-gate loss with AIG's ResNet-50 list (layer gates)")
    a('--tau', type=float, default=0.5, help='inference threshold (3.3)')
    a('--loss-weight', type=float, default=1.0, help='weight of the gate loss (the paper: 1)')
    a('--polarize', type=float, default=0.0, help='weight of the polarization term, rising from 0 (train_cifar.py '
                                                  'uses 0.01; NOTES.md: polarization)')
    a('--gate-lr-mult', type=float, default=1.0, help='gate learning rate / base')
    a('--gate-init-p', type=float, default=gc.INIT_P)
    a('--gate-decay', type=float, default=20.0, help='gate weight decay = weight decay * this / |G| (4.1)')
    a('--epochs', type=int, default=100)
    a('--batch-size', type=int, default=256, help='global batch, split over the processes')
    a('--lr', type=float, default=0.1)
    a('--lr-step', type=int, default=30, help='lr / 10 every this many epochs (4.1)')
    a('--weight-decay', type=float, default=1e-4)
    a('--recal-batches', type=int, default=200, help='BN recalibration batches (4.1)')
    a('--crop-size', type=int, default=224, help='training crop; validation resizes to 8/7 of it, then crops')
    a('--workers', type=int, default=8, help='DataLoader workers per process')
    a('--data-dir', default='imagenet', help='holds train/ and val/ in ImageFolder layout')
    a('--out', default='runs')
    a('--resume', action='store_true')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    a('--compile', action='store_true')
    a('--sync-bn', action='store_true', help='SyncBatchNorm across processes')
    a('--seed', type=int, default=0)
    args = p.parse_args(argv)
    if args.arch not in WEIGHTS:
        raise UsageError(f'--arch must be one of {", ".join(WEIGHTS)}, got {args.arch!r}')
    for name, allowed in (('gating', ('static', 'dynamic')), ('granularity', gc.GRANULARITIES),
                          ('loss', ('flops', 'batch', 'per-gate'))):
        if getattr(args, name) not in allowed:
            raise UsageError(f'--{name} must be one of {", ".join(allowed)}, got {getattr(args, name)!r}')
    if not 0 < args.t <= 1:
        raise UsageError(f'--t must be in (0, 1], got {args.t}')
    if not 0 < args.tau < 1:
        raise UsageError(f'--tau must be in (0, 1), got {args.tau}')
    if args.aig_targets:
        if (args.arch, args.granularity, args.loss) != ('resnet50', 'layer', 'per-gate'):
            raise UsageError('--aig-targets needs --arch resnet50 --granularity layer --loss per-gate')
        args.targets = aig_targets(args.t)
    return args


def loaders(args, world, rank):
    """ImageFolder train/val loaders; each process reads its own shard."""
    root = Path(args.data_dir)
    for split in ('train', 'val'):
        if not (root / split).is_dir():
            raise UsageError(f'{root / split} is missing: --data-dir must hold train/ and val/ (ImageFolder layout)')
    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train = torchvision.datasets.ImageFolder(root / 'train', transforms.Compose([
        transforms.RandomResizedCrop(args.crop_size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), normalize]))
    val = torchvision.datasets.ImageFolder(root / 'val', transforms.Compose([
        transforms.Resize(args.crop_size * 8 // 7), transforms.CenterCrop(args.crop_size),
        transforms.ToTensor(), normalize]))
    if train.classes != val.classes:
        raise UsageError(f'train/ has {len(train.classes)} classes and val/ {len(val.classes)}: they must match')
    if args.batch_size < world or args.batch_size % world:
        raise UsageError(f'--batch-size {args.batch_size} must divide over {world} processes')
    sampler = torch.utils.data.DistributedSampler(train, world, rank, seed=args.seed, drop_last=True)
    kw = dict(num_workers=args.workers, pin_memory=args.device.startswith('cuda'),
              persistent_workers=args.workers > 0)
    train_loader = torch.utils.data.DataLoader(train, args.batch_size // world, sampler=sampler,
                                               drop_last=True, **kw)
    val_shard = torch.utils.data.Subset(val, range(rank, len(val), world))     # no padding: exact counts
    val_loader = torch.utils.data.DataLoader(val_shard, 100, **kw)
    return train_loader, val_loader, train.classes


@torch.no_grad()
def evaluate(model, loader, device, autocast, distributed):
    """(top-1 %, top-5 %, rate, MACs %, polarized) over the whole validation set, all processes."""
    model.eval()
    sums, stats, batches = torch.zeros(3, device=device), 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last), y.to(device)
        with autocast():
            out = model(x)
        logits, info = out if isinstance(out, tuple) else (out, None)
        top5 = logits.topk(min(5, logits.shape[1]), 1).indices
        sums += torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(1).sum(), torch.tensor(len(y), device=device)])
        if info is not None:
            stats, batches = stats + gate_stats(info), batches + 1
    gates = torch.as_tensor(averages(stats, batches), device=device)
    if distributed:
        dist.all_reduce(sums)
        dist.all_reduce(gates)
        gates /= dist.get_world_size()
    top1, top5, n = sums.tolist()
    return 100 * top1 / n, 100 * top5 / n, *gates.tolist()


def main(argv=None):
    args = parse_args(argv)
    distributed = 'RANK' in os.environ                  # launched by torchrun
    if distributed:
        dist.init_process_group('nccl' if args.device.startswith('cuda') else 'gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith('cuda'):
            args.device = f'cuda:{int(os.environ["LOCAL_RANK"])}'
    else:
        rank, world = 0, 1
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    elif master:
        print('warning: training on the CPU; a GPU is much faster', file=sys.stderr)
    autocast = autocast_for(device)
    run_dir = Path(args.out) / f'imagenet-{args.arch}-{args.gating}-{args.granularity}-{args.loss}-t{args.t:g}-s{args.seed}'
    check_run_dir(run_dir, args, args.epochs, STRUCTURE)
    if master:
        ensure_writable([run_dir], args.out)
    log('args:', json.dumps(vars(args)))
    torch.manual_seed(args.seed)
    train_loader, val_loader, names = loaders(args, world, rank)
    classes = len(names)

    weights = getattr(torchvision.models, WEIGHTS[args.arch]).IMAGENET1K_V1 if args.pretrained else None
    dense = getattr(torchvision.models, args.arch)(weights=weights, num_classes=1000 if weights else classes)
    if dense.fc.out_features != classes:
        raise UsageError(f'the pretrained classifier has {dense.fc.out_features} classes, the data {classes}')
    dense = dense.to(device, memory_format=torch.channels_last)
    base_top1, base_top5, *_ = evaluate(dense, val_loader, device, autocast, distributed)
    log(f'baseline: top-1 {base_top1:.2f}  top-5 {base_top5:.2f}')
    model = gc.gate_resnet(dense, args.gating, args.granularity, args.gate_init_p)
    if args.targets and len(args.targets) != len(gc._gates(model)):
        raise UsageError(f'--targets must give one rate per gate module ({len(gc._gates(model))}), got {len(args.targets)}')
    if args.sync_bn and distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    groups = gc.param_groups(model, args.lr, args.weight_decay, args.gate_decay, args.gate_lr_mult)
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, args.lr_step, 0.1)
    start, best, last = 0, -1.0, None
    if (run_dir / 'last.pt').exists():                          # only with --resume (checked above)
        ckpt = load_checkpoint(run_dir / 'last.pt')
        load_weights(model, ckpt['model'], run_dir / 'last.pt', gated=False)
        opt.load_state_dict(ckpt['optimizer'])
        sched.load_state_dict(ckpt['scheduler'])
        torch.set_rng_state(ckpt['rng']['torch'])
        start, best, last = ckpt['epoch'], ckpt['best_acc'], ckpt['metrics']
        log(f'resumed from {run_dir / "last.pt"} after epoch {start}')
    step_model = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None) \
        if distributed else model
    step_model = torch.compile(step_model) if args.compile else step_model
    log(f'{args.epochs} epochs, global batch {args.batch_size} on {world} process(es), lr {args.lr} / 10 every {args.lr_step}')
    log(ROW.format('epoch', 'lr', 'CE', 'gate', 'train%', 'top-1', 'rate', 'MACs%', 'polar', 'sec', 'img/s',
                   'thrMACs%'))
    for epoch in range(start, args.epochs):
        model.train()
        train_loader.sampler.set_epoch(epoch)
        t0, n, stats, batches = time.perf_counter(), 0, 0, 0
        sums = torch.zeros(3, device=device)
        for i, (xb, yb) in enumerate(train_loader):
            xb = xb.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yb = yb.to(device, non_blocking=True)
            with autocast():
                logits, info = step_model(xb)
                ce = F.cross_entropy(logits, yb)
                progress = (epoch * len(train_loader) + i) / (args.epochs * len(train_loader))
                gl = gate_loss(info, args, progress)            # per replica, on its own batch
                loss = ce + gl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += torch.stack([ce.detach() * len(yb), gl.detach() * len(yb), (logits.argmax(1) == yb).sum()])
            stats, batches, n = stats + gate_stats(info), batches + 1, n + len(yb)
        lr = opt.param_groups[0]['lr']
        sched.step()
        ce, gl, correct = (sums / n).tolist()
        rate, macs, polar = averages(stats, batches)
        seconds = time.perf_counter() - t0
        top1, top5, _, test_macs, _ = evaluate(model, val_loader, device, autocast, distributed)
        last = dict(epoch=epoch + 1, lr=lr, ce=ce, gate_loss=gl, train_acc=100 * correct, top1=top1, top5=top5,
                    rate=rate, macs=macs, polarized=polar, test_macs=test_macs, seconds=seconds,
                    images_per_s=n * world / seconds)
        log(ROW.format(epoch + 1, f'{lr:.4f}', f'{ce:.3f}', f'{gl:.4f}', f'{100 * correct:.2f}', f'{top1:.2f}',
                       f'{rate:.3f}', f'{macs:.1f}', f'{polar:.2f}', f'{seconds:.1f}', f'{n * world / seconds:.0f}',
                       f'{test_macs:.1f}'), flush=True)
        if master:
            with open(run_dir / 'metrics.jsonl', 'a') as f:
                f.write(json.dumps(last) + '\n')
            ckpt = dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                        epoch=epoch + 1, best_acc=max(best, top1), args=vars(args), metrics=last,
                        rng=dict(torch=torch.get_rng_state()))
            if top1 > best:
                save_atomic(ckpt, run_dir / 'best.pt')
            save_atomic(ckpt, run_dir / 'last.pt')
        best = max(best, top1)

    # BN recalibration under threshold inference (4.1), then the final evaluation
    gc.set_inference(model, 'threshold', args.tau)
    with autocast():
        gc.recalibrate_bn(model, (x.contiguous(memory_format=torch.channels_last) for x, _ in
                                  itertools.islice(itertools.chain.from_iterable(itertools.repeat(train_loader)),
                                                   args.recal_batches)))
    if distributed:                                             # one set of BN statistics for all
        for buf in model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf /= world
    top1, top5, rate, macs, polar = evaluate(model, val_loader, device, autocast, distributed)
    row = dict(arch=args.arch, gating=args.gating, granularity=args.granularity, loss=args.loss, t=args.t,
               tau=args.tau, baseline_top1=base_top1, baseline_top5=base_top5, top1=top1, top5=top5,
               macs_percent=macs, activation_rate=rate, polarized=polar, epochs=last['epoch'] if last else 0)
    if master:
        if args.gating == 'dynamic':                            # Fig. 4, over the whole validation set
            full = torch.utils.data.DataLoader(val_loader.dataset.dataset, 100, num_workers=args.workers)
            with autocast():
                rates = gc.per_class_rates(model, ((x.to(device).contiguous(memory_format=torch.channels_last), y)
                                                   for x, y in full), classes)
            write_class_rates(rates, names, run_dir)
        export(model, dense, torch.zeros(1, 3, args.crop_size, args.crop_size, device=device), run_dir, row)
        finish(row, run_dir)
    return row


def cli(argv=None):
    try:
        return train_cifar.cli(argv, main)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    sys.exit(cli())
