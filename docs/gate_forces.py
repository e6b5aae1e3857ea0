"""What moves a static gate in its first epochs: the cross-entropy's gradient, or the FLOPs
loss and the Gumbel noise? (a measurement tool for NOTES.md's "Gates on photographs")

    python docs/gate_forces.py --init runs/c10/dense/last.pt --data-dir data --train-size 10000

From a dense CIFAR ResNet, the gates' training starts as compare.py's gates arm does (the
recipe's flags, e.g. --gate-init magnitude, apply); for --epochs it records at every step the
gradient on each gate's logit difference w1 - w0 from the cross-entropy alone and from the
gate loss alone (before the optimizer step, which takes their sum), then prints per stage:
  force     the mean of each part's gradient per step, averaged in size over the channels
  ce snr    the CE part's mean over its standard error, per channel (|.| averaged): above
            about 2 the CE says something about a channel; below it is noise
and, for the decisions after --epochs (p > 0.5), how they agree with the dense net's filter
L1 norms (the kept share of the L1 top half against the 50% chance gives) and with the CE
force summed over the steps (Spearman's rho within each gate module, averaged).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cifar_data                                   # noqa: E402
import gumbel_channels as gc                        # noqa: E402
import run_folder as rf                             # noqa: E402
import train_loop as tl                             # noqa: E402


def spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def main(argv=None):
    p = rf.Parser(description=__doc__.splitlines()[0])
    s, t, _, m = (p.group[g].add_argument for g in p.GROUPS)
    s('--arch', default='resnet20')
    s('--t', type=rf.OPEN_UNIT, default=0.5)
    s('--dataset', default='cifar10', choices=list(cifar_data.DATASETS))
    s('--train-size', type=rf.COUNT)
    tl.add_gate_args(p)
    t('--init', required=True, help='the dense start (compare.py writes OUT/dense/last.pt)')
    t('--epochs', type=rf.COUNT, default=2)
    t('--batch-size', type=rf.COUNT, default=128)
    t('--lr', type=rf.POSITIVE, default=0.1)
    t('--weight-decay', type=rf.NON_NEGATIVE, default=5e-4)
    t('--seed', type=int, default=0)
    m('--data-dir', default='data')
    m('--threads', type=rf.COUNT, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = cifar_data.load(args.data_dir, False, torch.device('cpu'), args.dataset)
    data = data.subset(args.train_size)
    depth = int(args.arch.removeprefix('resnet'))
    dense = gc.resnet_cifar(depth, num_classes=len(data.classes))
    rf.load_init(dense, args.init)
    torch.manual_seed(args.seed)
    model = tl.sampling(gc.resnet_cifar(depth, num_classes=len(data.classes), gating='static',
                                        init_p=args.gate_init_p), args)
    rf.load_weights(model, dense.state_dict(), 'the dense start', gated=True)
    tl.init_gates(model, args)
    pairs = tl.gated_convs(model)
    logits = [g.logits for g, _ in pairs]
    norms = [c.weight.detach().abs().sum((1, 2, 3)) for _, c in pairs]
    steps = len(data.x_train) // args.batch_size
    opt, sched = tl.optimizer(model, args, args.weight_decay, milestones=[])
    loss_of = tl.gate_loss(args)
    ce_sum = [torch.zeros(len(n), dtype=torch.float64) for n in norms]
    ce_sq = [torch.zeros_like(c) for c in ce_sum]
    gl_sum = [torch.zeros_like(c) for c in ce_sum]
    n = 0
    gen = data.generator(args.seed + 1)
    model.train()
    for epoch in range(args.epochs):
        for i, (xb, yb) in enumerate(data.train_batches(args.batch_size, gen)):
            logits_out, info = gc.split_output(model(xb))
            ce = torch.nn.functional.cross_entropy(logits_out, yb)
            gl = loss_of(info, tl.progress(epoch, i, args.epochs, steps))
            g_ce = torch.autograd.grad(ce, logits, retain_graph=True)
            g_gl = torch.autograd.grad(gl, logits, retain_graph=True)
            for k, (a, b) in enumerate(zip(g_ce, g_gl)):
                d_ce, d_gl = (a[:, 1] - a[:, 0]).double(), (b[:, 1] - b[:, 0]).double()
                ce_sum[k] += d_ce
                ce_sq[k] += d_ce ** 2
                gl_sum[k] += d_gl
            n += 1
            opt.zero_grad(set_to_none=True)
            (ce + gl).backward()
            opt.step()
        kept = [g.kept() for g, _ in pairs]
        polar = torch.cat([gc.polarized(gc.gate_probability(w)) for w in logits])
        print(f'epoch {epoch + 1}: {sum(int(k.sum()) for k in kept)} of '
              f'{sum(len(k) for k in kept)} channels kept, polarized '
              f'{polar.double().mean().item():.3f}')
    print(f"\n{'stage':>5} {'|CE force|':>11} {'|FLOPs force|':>13} {'ce snr':>7} "
          f"{'kept %':>7} {'L1 top half kept %':>19} {'rho(keep, L1)':>14} {'rho(keep, CE)':>14}")
    per_stage = {}
    for k, (gate, conv) in enumerate(pairs):
        stage = {16: 1, 32: 2, 64: 3}.get(conv.out_channels, conv.out_channels)
        mean = ce_sum[k] / n
        se = ((ce_sq[k] / n - mean ** 2).clamp_min(0) / n).sqrt()
        keep = kept[k].double() + 1e-6 * gc.gate_probability(logits[k]).detach().double()
        top = norms[k] >= norms[k].median()
        per_stage.setdefault(stage, []).append(dict(
            ce=float(mean.abs().mean()), gl=float((gl_sum[k] / n).abs().mean()),
            snr=float((mean.abs() / se.clamp_min(1e-30)).mean()),
            kept=100 * float(kept[k].double().mean()),
            top=100 * float(kept[k][top].double().mean()) if kept[k].any() else float('nan'),
            rho_l1=spearman(keep, norms[k].double()), rho_ce=spearman(keep, -ce_sum[k])))
    for stage, rows in sorted(per_stage.items()):
        avg = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
        print(f"{stage:5} {avg['ce']:11.2e} {avg['gl']:13.2e} {avg['snr']:7.2f} "
              f"{avg['kept']:7.1f} {avg['top']:19.1f} {avg['rho_l1']:14.2f} "
              f"{avg['rho_ce']:14.2f}")


if __name__ == '__main__':
    sys.exit(rf.run_cli(main))
