"""Real speed from skipped channels, measured side by side in one process.

Every speed is a ratio of medians over interleaved repeated runs (each contender once per
round, in rotating order, after warm-up), printed beside its MAC ratio:
  - a training step (forward, backward, SGD) of dense vs static- vs dynamic-gated ResNet-56;
  - inference of dense vs pruned ResNet-56 (prune) at about 50%, 40% and 30% of the MACs;
  - the dynamic batch-1 path (SkipNet) and the masked dynamic forward vs the dense network,
    for CIFAR ResNet-56 (32x32) and torchvision ResNet-50 (224x224).
On CPU, inference rows run in both memory formats (CL: channels_last). On CUDA (when
present) every row runs with bf16 autocast and channels_last, timed with CUDA events.
Gates are set, not trained: decisions are random at the stated rates (about half on for
dynamic gates, varying per image).

    python benchmark.py             # the table (a few minutes on 2 CPU cores)
    python benchmark.py --smoke     # seconds: tiny sizes, every row once (run by the tests)
    python benchmark.py --macs      # the CIFAR ResNets' parameters and MACs
"""
import argparse
import contextlib
import copy
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

import gumbel_channels as gc
import gumbel_export as ge


def timed(fns, repeats, device):
    """Median seconds of each zero-argument callable in `fns`, interleaved round by round."""
    for fn in fns.values():                     # warm-up (allocator, oneDNN primitives, cuDNN)
        fn(), fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if device.type == 'cuda':
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def set_static_rate(model, rate, gen):
    """Turn on round(rate * C) random channels (at least one) of every static gate."""
    with torch.no_grad():
        for g in gc.gates(model):
            on = torch.zeros(g.channels, dtype=torch.bool)
            on[torch.randperm(g.channels, generator=gen)[:max(1, round(rate * g.channels))]] = True
            g.logits.copy_(torch.stack([torch.zeros(g.channels), torch.where(on, 3.0, -3.0)], 1))


def gated_copy(dense, depth, gating, device):
    model = gc.resnet_cifar(depth, gating=gating)
    model.load_state_dict(dense.state_dict(), strict=False)
    return model.to(device)


def macs_table():
    """The CIFAR ResNets' parameters and MACs (gumbel_channels' docstring table), measured:
    FlopCounterMode on the dense net, and GateInfo.macs of gated nets with every gate on."""
    x = torch.randn(1, 3, 32, 32)
    print(f"{'name':10} {'params':>8} {'MACs (counted)':>15} {'static all-on':>14} "
          f"{'dynamic all-on':>15}")
    for depth in (20, 32, 44, 56, 110):
        dense = gc.resnet_cifar(depth).eval()
        macs = [gc.set_inference(gc.resnet_cifar(depth, gating=g).eval(), 'all_on')(x)[1].macs
                for g in ('static', 'dynamic')]
        print(f'resnet{depth:<4} {sum(q.numel() for q in dense.parameters()) / 1e6:7.2f}M '
              f'{ge.counted_macs(dense, x):15,} {macs[0].item():14,.0f} {macs[1].item():15,.0f}')


def train_rows(dense, depth, batch, repeats, fmt, autocast):
    """A training step (forward, backward, SGD) of the dense, static- and dynamic-gated nets.
    Masked gates compute every channel, so the MACs match and the time is the overhead."""
    device = next(dense.parameters()).device
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    steps, macs = {}, {}
    for gating in (None, 'static', 'dynamic'):
        model = gated_copy(dense, depth, gating, device) if gating else copy.deepcopy(dense)
        model = model.to(memory_format=fmt).train()
        opt = torch.optim.SGD(gc.param_groups(model, 0.1, 5e-4), lr=0.1, momentum=0.9)

        def step(model=model, opt=opt):
            with autocast():
                logits, info = gc.split_output(model(x))
                loss = F.cross_entropy(logits, y) + (gc.flops_loss(info, 0.5) if info else 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        name = gating or 'dense'
        steps[name] = step
        macs[name] = ge.counted_macs(model.eval(), x[:1])
        model.train()
    t = timed(steps, repeats, device)
    rows = []
    for name, limit in (('dense', None), ('static', 1.10), ('dynamic', 1.25)):
        ratio = t[name] / t['dense']
        rows.append((f'train step, {name}', batch, t[name], 1 / ratio, macs['dense'] / macs[name],
                     f'time <= {limit:.2f} x dense' if limit else '',
                     '' if not limit else ratio <= limit))
    return rows


def pruned_rows(dense, pruned, batches, repeats, fmt, tag, autocast):
    """Inference of the dense net and of each pruned net, at each batch size."""
    device = next(dense.parameters()).device
    nets = {'dense': dense.to(memory_format=fmt),
            **{k: p.to(memory_format=fmt) for k, p in pruned.items()}}
    rows = []
    for batch in batches:
        xb = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=fmt)
        net_macs = {name: ge.counted_macs(net, xb[:1]) for name, net in nets.items()}
        with torch.inference_mode(), autocast():
            t = timed({name: (lambda net=net: net(xb)) for name, net in nets.items()}, repeats,
                      device)
        for name in nets:
            speedup, mac_red = t['dense'] / t[name], net_macs['dense'] / net_macs[name]
            target = batch == batches[0] and name != 'dense'
            rows.append((f'infer {name}{tag}', batch, t[name], speedup, mac_red,
                         '>= 0.85 x MAC reduction' if target else '',
                         speedup >= 0.85 * mac_red if target else ''))
    return rows


def skip_rows(label, model, dense, size, n, repeats, fmt, tag, autocast):
    """Dynamic gates, one image at a time: SkipNet and the masked forward vs the dense net."""
    device = next(dense.parameters()).device
    model, dense = model.eval().to(memory_format=fmt), dense.to(memory_format=fmt)
    skip = ge.SkipNet(model)
    images = torch.randn(n, 3, size, size, device=device).to(memory_format=fmt)
    with torch.inference_mode():
        _, info = model(images)
    red = info.max_macs / info.macs.mean().item()

    def one_by_one(net):
        return lambda: [net(images[i:i + 1]) for i in range(n)]
    with torch.inference_mode(), autocast():
        t = timed({'dense': one_by_one(dense), 'SkipNet': one_by_one(skip),
                   'masked': one_by_one(model)}, max(3, repeats // 2), device)
    speedup = t['dense'] / t['SkipNet']
    return [(f'{label} dense{tag}', 1, t['dense'] / n, 1.0, 1.0, '', ''),
            (f'{label} masked{tag}', 1, t['masked'] / n, t['dense'] / t['masked'], red, '', ''),
            (f'{label} SkipNet{tag}', 1, t['SkipNet'] / n, speedup, red,
             '>= 0.6 x MAC reduction', speedup >= 0.6 * red)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--smoke', action='store_true',
                    help='tiny sizes, two rounds: checks that it runs')
    ap.add_argument('--macs', action='store_true', help="print the CIFAR ResNets' MACs and exit")
    ap.add_argument('--repeats', type=int, default=11, help='timed rounds per comparison (median)')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--threads', type=int, default=torch.get_num_threads(), help='CPU threads')
    args = ap.parse_args()
    if args.repeats < 1 or args.threads < 1:
        raise SystemExit('error: --repeats and --threads must be >= 1')
    if args.macs:
        return macs_table()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    depth, b_train, b_infer, n_single, repeats = \
        (8, 8, 4, 2, 2) if args.smoke else (56, 128, 64, 16, args.repeats)
    formats = [torch.channels_last] if cuda else [torch.contiguous_format, torch.channels_last]
    autocast = (lambda: torch.autocast('cuda', torch.bfloat16)) if cuda else contextlib.nullcontext
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dense = gc.resnet_cifar(depth).to(device)
    print(f'device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, '
          f'ResNet-{depth}, {repeats} rounds, medians' + (', bf16 + channels_last' if cuda else ''))
    rows = train_rows(dense, depth, b_train, repeats, formats[0], autocast)  # first format only
    dense.eval()
    pruned = {}
    for rate in (0.5, 0.4, 0.3):                # pruned at about 50 / 40 / 30 % of the MACs
        model = gated_copy(dense, depth, 'static', device)
        set_static_rate(model, rate, gen)
        pruned[f'pruned {rate:.0%}'] = ge.prune(model)
    tv = (torchvision.models.resnet18() if args.smoke else torchvision.models.resnet50())
    tv = tv.to(device).eval()
    big = 64 if args.smoke else 224
    dynamic = {f'ResNet-{depth} {32}px': (gated_copy(dense, depth, 'dynamic', device), dense, 32,
                                          n_single),
               f'tv-ResNet-{18 if args.smoke else 50} {big}px': (
                   gc.gate_resnet(tv, 'dynamic'), tv, big, 2 if args.smoke else 4)}
    with torch.no_grad():                       # data-dependent decisions, about half on
        for model, *_ in dynamic.values():
            for g in gc.gates(model):
                torch.nn.init.normal_(g.fc2.weight, std=1.0)
                g.fc2.bias.zero_()
    for fmt in formats:                         # CPU: both memory formats; CUDA: channels_last
        tag = ' CL' if fmt == torch.channels_last else ''
        rows += pruned_rows(dense, pruned, (b_infer, 1), repeats, fmt, tag, autocast)
        for label, (model, dense_net, size, n) in dynamic.items():
            rows += skip_rows(label, model, dense_net, size, n, repeats, fmt, tag, autocast)
    print(f"{'row':34} {'batch':>5} {'ms':>9} {'speedup':>8} {'MAC red.':>8}  {'target':24} met")
    for row, batch, sec, speedup, mac_red, target, met in rows:
        met = '' if met == '' else ('yes' if met else 'NO')
        print(f'{row:34} {batch:5d} {sec * 1e3:9.2f} {speedup:8.2f} {mac_red:8.2f}  '
              f'{target:24} {met}')


if __name__ == '__main__':
    main()
