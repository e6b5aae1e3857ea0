"""Real speed from skipped channels, measured side by side in one process.

Every speed is a ratio of medians over interleaved repeated runs (each contender once per
round, in rotating order, after warm-up), printed beside its MAC ratio:
  - a training step (forward, backward, SGD) of dense vs static- vs dynamic-gated ResNet-56;
  - inference of dense vs pruned ResNet-56 (prune) at about 50%, 40% and 30% of the MACs;
  - the dynamic batch-1 path (SkipNet) and the masked dynamic forward vs the dense network,
    for CIFAR ResNet-56 (32x32) and torchvision ResNet-50 (224x224), beside the bound a
    skipping path can reach: a static net pruned to the same MACs, BN folded, in eager.
Inference rows run in each deploy form (eager; BN folded + channels_last; inductor; ONNX
Runtime when installed). On CUDA (when present) every row runs with bf16 autocast and
channels_last, timed with CUDA events.
Gates are set, not trained: decisions are random at the stated rates (about half on for
dynamic gates, varying per image).

    python benchmark.py             # the table (a few minutes on 2 CPU cores)
    python benchmark.py --smoke     # seconds: tiny sizes, every row once (run by the tests)
    python benchmark.py --macs      # the CIFAR ResNets' parameters and MACs
    python benchmark.py --convs --threads 1   # single convs: how pruned widths scale
    python benchmark.py --any       # gumbel_any on 19 models: gates, FLOPs(Z) vs counted MACs
    python benchmark.py --gpu-check # the GPU path's self-check (gpu_check.py; CPU without a GPU)
    python benchmark.py --file dense.pt2 runs/.../pruned.pt2 --shape 1 3 32 32   # your files
"""
import argparse
import contextlib
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import channel_groups
import gumbel_any
import gumbel_channels as gc
import gumbel_export as ge
import gumbel_skip as gs


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


def cuda_graphed(fn):
    """`fn` (zero arguments, fixed shapes, no host sync) captured as one CUDA graph: warmed up
    on a side stream, captured once; -> its replay. A training step captured whole writes its
    gradients into the graph's memory and draws fresh Gumbel noise at every replay (CUDA
    graphs advance the generator's offset per replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


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


def conv_table(repeats):
    """One 3x3 conv of each CIFAR ResNet stage, dense (C -> C) against half its outputs
    (C -> C/2, a pruned conv1) and half its inputs (C/2 -> C, a pruned conv2): time ratios
    at batch 64 in channels_last (oneDNN) and at batch 1 in NCHW (im2col), for half the MACs."""
    print(f"{'conv':14} {'batch 64 CL: C->C/2':>20} {'C/2->C':>7} {'batch 1: C->C/2':>16} "
          f"{'C/2->C':>7}")
    for c, hw in ((16, 32), (32, 16), (64, 8)):
        ratios = []
        for batch, fmt in ((64, torch.channels_last), (1, torch.contiguous_format)):
            fns = {}
            for cin, cout in ((c, c), (c, c // 2), (c // 2, c)):
                x = torch.randn(batch, cin, hw, hw).to(memory_format=fmt)
                w = torch.randn(cout, cin, 3, 3).to(memory_format=fmt)
                fns[cin, cout] = lambda x=x, w=w: F.conv2d(x, w, None, 1, 1)
            with torch.inference_mode():
                t = timed(fns, repeats, torch.device('cpu'))
            ratios += [t[c, c] / t[c, c // 2], t[c, c] / t[c // 2, c]]
        print(f'{c}x{hw}x{hw}'.ljust(14) + ''.join(f'{r:{w}.2f}' for r, w in
                                                  zip(ratios, (21, 8, 17, 8))))


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
        if device.type == 'cuda':               # the whole step as one CUDA graph
            steps[f'{name} [CUDA graph]'] = cuda_graphed(step)
    t = timed(steps, repeats, device)
    rows = []
    for name in steps:
        kind = name.split()[0]
        limit = {'static': 1.10, 'dynamic': 1.25}.get(kind) if name == kind else None
        ratio = t[name] / t['dense']
        rows.append(row(f'train step, {name}', batch, t[name], 1 / ratio,
                        macs['dense'] / macs[kind], target=f'time <= {limit:.2f} x dense'
                        if limit else '', met='' if not limit else ratio <= limit))
    return rows


def row(name, batch, seconds, speedup, mac_red, overall=None, lane_red=None, target='', met=''):
    return dict(row=name, batch=batch, ms=1e3 * seconds, speedup=speedup,
                overall=speedup if overall is None else overall, mac_red=mac_red,
                lane_red=mac_red if lane_red is None else lane_red, target=target, met=met)


FORMS = {'eager': None, 'folded CL': 'eager', 'inductor': 'inductor',   # deploy backend
         'onnxruntime': 'onnxruntime', 'CUDA graph': 'eager'}


def deploy_rows(dense, pruned, batch, repeats, forms, lanes, autocast):
    """Inference of the dense net and each pruned net in each deploy form at one batch size:
    speedup in the same form, overall speedup vs the dense net in eager mode, MAC ratio and
    lane-rounded MAC ratio (output channels rounded up to the CPU's vector width)."""
    device = next(dense.parameters()).device
    nets = {'dense': dense, **pruned}
    x = torch.randn(batch, 3, 32, 32, device=device)
    macs = {k: ge.counted_macs(n, x[:1]) for k, n in nets.items()}
    lane = {k: ge.lane_macs(n, x[:1], lanes) for k, n in nets.items()}
    rows, times = [], {}
    for form in forms:
        run = {k: n if FORMS[form] is None else ge.deploy(n, x, FORMS[form])
               for k, n in nets.items()}
        with torch.inference_mode(), autocast():
            fns = {k: (lambda n=n: n(x)) for k, n in run.items()}
            if form == 'CUDA graph':            # the folded net's kernels, replayed
                fns = {k: cuda_graphed(fn) for k, fn in fns.items()}
            times[form] = timed(fns, repeats, device)
    for name in pruned:
        best = max(forms, key=lambda f: times[f]['dense'] / times[f][name])
        for form in forms:
            t = times[form]
            speedup, mac_red, lane_red = t['dense'] / t[name], macs['dense'] / macs[name], \
                lane['dense'] / lane[name]
            target = form == best and batch > 1 and name == 'pruned 50%' and device.type == 'cpu'
            met = (speedup >= 0.95 * lane_red and speedup >= 0.8 * mac_red
                   and times['eager']['dense'] / t[name] >= 2) if target else ''
            rows.append(row(f'infer {name} [{form}]', batch, t[name], speedup, mac_red,
                            times['eager']['dense'] / t[name], lane_red,
                            '>= .95 lane, .8 MAC, 2x all' if target else '', met))
    for form in forms:
        rows.append(row(f'infer dense [{form}]', batch, times[form]['dense'], 1.0, 1.0,
                        times['eager']['dense'] / times[form]['dense']))
    return rows


def skip_rows(label, model, dense, bound, size, n, repeats, fmt, tag, autocast):
    """Dynamic gates, one image at a time: SkipNet and the masked forward vs the dense net, and
    `bound`: a static net pruned to about the same MACs with BN folded (no gates, no gathers),
    the speed that any skipping path built from these convs can at best reach."""
    device = next(dense.parameters()).device
    model, dense = model.eval().to(memory_format=fmt), dense.to(memory_format=fmt)
    bound = ge.fold_bn(bound).to(memory_format=fmt)
    skip = gs.SkipNet(model)
    images = torch.randn(n, 3, size, size, device=device).to(memory_format=fmt)
    with torch.inference_mode():
        _, info = model(images)
    red = info.max_macs / info.macs.mean().item()
    bound_red = ge.counted_macs(dense, images[:1]) / ge.counted_macs(bound, images[:1])

    def one_by_one(net):
        return lambda: [net(images[i:i + 1]) for i in range(n)]
    with torch.inference_mode(), autocast():
        t = timed({'dense': one_by_one(dense), 'SkipNet': one_by_one(skip),
                   'masked': one_by_one(model), 'bound': one_by_one(bound)},
                  max(3, repeats // 2), device)
    speedup = t['dense'] / t['SkipNet']
    return [row(f'{label} dense{tag}', 1, t['dense'] / n, 1.0, 1.0),
            row(f'{label} masked{tag}', 1, t['masked'] / n, t['dense'] / t['masked'], red),
            row(f'{label} static bound{tag}', 1, t['bound'] / n, t['dense'] / t['bound'],
                bound_red),
            row(f'{label} SkipNet{tag}', 1, t['SkipNet'] / n, speedup, red,
                target='>= 0.75 x MAC reduction', met=speedup >= 0.75 * red)]


ALLOCATOR = {'MALLOC_MMAP_THRESHOLD_': '33554432', 'MALLOC_TRIM_THRESHOLD_': '4294967296'}


ANY = ('resnet18', 'resnet50', 'resnext50_32x4d', 'wide_resnet50_2', 'mobilenet_v2',
       'mobilenet_v3_small', 'efficientnet_b0', 'regnet_y_400mf', 'vgg11_bn', 'densenet121',
       'convnext_tiny', 'shufflenet_v2_x1_0')


class AudioCNN(torch.nn.Module):
    """A 1D CNN on raw audio (M5's shape: a wide strided first conv, BatchNorm1d, pooling)."""

    def __init__(self, classes=35):
        super().__init__()
        nn = torch.nn
        widths, layers = (1, 32, 32, 64, 64), []
        for k, (a, b) in enumerate(zip(widths, widths[1:])):
            conv = nn.Conv1d(a, b, 80, 16) if k == 0 else nn.Conv1d(a, b, 3, padding=1)
            layers += [conv, nn.BatchNorm1d(b), nn.ReLU(), nn.MaxPool1d(4 if k < 3 else 1)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.fc = nn.Linear(64, classes)

    def forward(self, x):                                       # (B, 1, samples)
        return self.fc(self.features(x))


class UNet(torch.nn.Module):
    """A two-level U-Net: max-pool down, transposed convs up, concatenated skips."""

    def __init__(self, classes=2, width=32):
        super().__init__()
        nn = torch.nn

        def block(a, b):
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b),
                                 nn.ReLU(), nn.Conv2d(b, b, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(b), nn.ReLU())
        w = width
        self.down = nn.ModuleList([block(3, w), block(w, 2 * w), block(2 * w, 4 * w)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(4 * w, 2 * w, 2, 2),
                                 nn.ConvTranspose2d(2 * w, w, 2, 2)])
        self.merge = nn.ModuleList([block(4 * w, 2 * w), block(2 * w, w)])
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x):
        skips = []
        for k, down in enumerate(self.down):
            x = down(F.max_pool2d(x, 2) if k else x)
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], 1))
        return self.head(x)


def any_models(size):
    """(name, model, example input, gate_any keywords): torchvision's classifiers at size,
    then models beyond them (issue 30): 1D and 3D CNNs, a U-Net, a detection backbone with
    FrozenBatchNorm2d (an OrderedDict of feature maps), a segmentation model (a dict), and
    transformers whose attention gate_any does not see (refused, then uncovered='fixed')."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models import segmentation, video
    image = torch.randn(2, 3, size, size)
    rows = [(name, lambda name=name: torchvision.models.get_model(name), image, {})
            for name in ANY]
    rows += [
        ('audio CNN (1D)', AudioCNN, torch.randn(2, 1, 16000), {}),
        ('r3d_18 (3D)', video.r3d_18, torch.randn(2, 3, 16, 112, 112), {}),
        ('U-Net (transposed)', UNet, torch.randn(2, 3, 128, 128), {}),
        ('fpn resnet50 (frozen BN)', lambda: resnet_fpn_backbone(
            backbone_name='resnet50', weights=None, trainable_layers=3), image, {}),
        ('deeplabv3 mnv3 (dict)', lambda: segmentation.deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None), image, {}),
        ('swin_t', torchvision.models.swin_t, image, {}),
        ('swin_t', torchvision.models.swin_t, image, dict(uncovered='fixed'))]
    return rows


def any_table(size=224):
    """gumbel_any on CNNs (random weights, BN statistics from the input): gate modules and
    channels, the dense MACs, and with half of every gate's channels on at random FLOPs(Z)
    beside the pruned net's conv and linear MACs as FlopCounterMode counts them, and the
    pruned net's largest output difference from threshold inference (relative to the
    largest output); or the refusal."""
    import warnings
    print(f"{'model':26} {'gates':>5} {'channels':>8} {'dense MACs':>15} {'FLOPs(Z)':>15} "
          f"{'pruned, counted':>15} {'out diff':>8} {'seconds':>7}")
    for name, make, x, kw in any_models(size):
        t0 = time.perf_counter()
        model = gc.recalibrate_bn(make().eval(), [x])     # BN statistics of x: a live signal
        label = name + (' ' + ','.join(f'{k}={v}' for k, v in kw.items()) if kw else '')
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                gated = gumbel_any.gate_any(model, x, **kw).eval()
        except ValueError as e:
            print(f'{label:26} refused: {str(e)[:140]}...')
            continue
        set_static_rate(gated, 0.5, torch.Generator().manual_seed(0))
        with torch.no_grad():
            out, info = gated(x)
            pruned = ge.prune(gated)
            diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(
                channel_groups.tensors(pruned(x)), channel_groups.tensors(out)))
        print(f'{label:26} {len(gated.gates):5} {sum(g.channels for g in gated.gates):8} '
              f'{info.max_macs:15,} {info.macs[0].item():15,.0f} '
              f"{ge.counted_macs(pruned, x[:1]):15,} {diff:8.1e} "
              f'{time.perf_counter() - t0:7.1f}', flush=True)


def loader_table(folder, device, batch=32, batches=10, rounds=5):
    """The ImageNet input pipeline apart from the model (issue 20), in img/s, medians of
    interleaved rounds: train_imagenet.py's training loader (decode, RandomResizedCrop 224,
    flip, uint8 out) beside the usual float32 transform (+ ToTensor + Normalize in the
    workers) at 0, 1, 2 ... cpu_count workers, over the first `batches` batches of an epoch
    (the workers' start-up included); then one image at a time in one thread (as a
    worker runs): decoding alone (PIL, torchvision.io on the CPU), each transform step, and
    on CUDA decode_jpeg on the GPU (nvJPEG, batched)."""
    import imagenet_data
    from PIL import Image

    def settings(workers=0):                          # what imagenet_data.loaders reads
        return argparse.Namespace(data_dir=str(folder), synthetic=False, crop_size=224,
                                  batch_size=batch, gating='static', seed=0, device='cpu',
                                  workers=workers)
    args = settings()
    transform = imagenet_data.loaders(args, 1, 0)[0].dataset.transform     # ends in uint8
    crop = torchvision.transforms.Compose(transform.transforms[:2])         # RRC, flip
    usual = torchvision.transforms.Compose([crop, torchvision.transforms.ToTensor(),
                                            torchvision.transforms.Normalize(imagenet_data.MEAN,
                                                                             imagenet_data.STD)])
    loaders = {}
    for workers in sorted({0, 1, 2, os.cpu_count() or 1}):
        for name, steps in (('uint8 (the loader)', transform), ('float32 (usual)', usual)):
            loader = imagenet_data.loaders(settings(workers), 1, 0)[0]
            loader.dataset.transform = steps

            def epoch(loader=loader):                 # workers' start-up included
                it = iter(loader)
                return [next(it) for _ in range(batches)]
            loaders[f'train loader, {name}, {workers} workers'] = epoch
    times = {name: [] for name in loaders}
    for r in range(rounds):                           # each a fresh epoch, rotating order
        names = list(loaders)[r % len(loaders):] + list(loaders)[:r % len(loaders)]
        for name in names:
            t0 = time.perf_counter()
            loaders[name]()
            times[name].append(time.perf_counter() - t0)
    rows = [dict(row=name, img_s=batch * batches / statistics.median(t))
            for name, t in times.items()]
    files = sorted(str(p) for p in Path(folder, 'train').glob('*/*.jpg'))[:48]
    data = [torchvision.io.read_file(f) for f in files]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                          # as one DataLoader worker runs
    steps = {'decode only, PIL': lambda: [Image.open(f).convert('RGB') for f in files],
             'decode only, torchvision.io, CPU': lambda: [torchvision.io.decode_jpeg(d)
                                                          for d in data]}
    for name, t in (('decode + crop + flip, PIL', crop),
                    ('decode + crop + flip + PILToTensor: uint8', transform),
                    ('decode + crop + flip + ToTensor + Normalize', usual)):
        steps[name] = lambda t=t: [t(Image.open(f).convert('RGB')) for f in files]
    medians = timed(steps, rounds, torch.device('cpu'))
    torch.set_num_threads(threads)
    rows += [dict(row=f'{name}, 1 thread', img_s=len(files) / m) for name, m in medians.items()]
    if device.type == 'cuda':
        gpu = {'decode, torchvision.io, GPU': lambda: [torchvision.io.decode_jpeg(
            data[i:i + 16], device=device) for i in range(0, len(data), 16)]}
        rows.append(dict(row='decode only, torchvision.io, GPU (nvJPEG, batches of 16)',
                         img_s=len(files) / timed(gpu, rounds, device)[
                             'decode, torchvision.io, GPU']))
    print(f"{'pipeline':56} {'img/s':>8}")
    for r in rows:
        print(f"{r['row']:56} {r['img_s']:8.0f}")
    return rows


def load_exported(path):
    """A deployed file as a callable on a float32 CPU batch: .pt2 (torch.export), .onnx
    (ONNX Runtime, installed apart), or .pt (a pickled module, as pruned.pt: only a file you
    trust, it can run code)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f'error: {path}: no such file')
    if path.suffix == '.pt2':
        net = torch.export.load(path).module()
        return lambda x: net(x)
    if path.suffix == '.onnx':
        try:
            import onnxruntime as ort
        except ImportError:
            raise SystemExit('error: timing an .onnx file needs onnxruntime (pip install '
                             'onnxruntime)') from None
        session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x.numpy()})
    if path.suffix == '.pt':
        net = torch.load(path, weights_only=False, map_location='cpu').eval()
        return lambda x: net(x)
    raise SystemExit(f'error: {path}: expected a .pt2, .onnx or .pt file')


def file_table(paths, shape, repeats):
    """Your own exported files (pruned.pt2 beside a dense export, say), each timed on one
    random batch of `shape` on the CPU: medians of interleaved runs and each file's time
    relative to the first's."""
    x = torch.randn(*shape)
    fns = {p: load_exported(p) for p in paths}
    with torch.no_grad():
        seconds = timed({p: (lambda f=f: f(x)) for p, f in fns.items()}, repeats,
                        torch.device('cpu'))
    first = seconds[paths[0]]
    print(f"{'file':50} {'ms / batch':>10} {'x first':>8}   (batch {tuple(shape)}, "
          f'{torch.get_num_threads()} threads, median of {repeats})')
    for p in paths:
        print(f'{str(p)[-50:]:50} {1000 * seconds[p]:10.2f} {first / seconds[p]:8.2f}')
    return [dict(file=str(p), seconds=seconds[p], speedup=first / seconds[p]) for p in paths]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--smoke', action='store_true',
                    help='tiny sizes, two rounds, no inductor: checks that it runs')
    ap.add_argument('--macs', action='store_true', help="print the CIFAR ResNets' MACs and exit")
    ap.add_argument('--any', action='store_true',
                    help='gumbel_any on 19 models (FLOPs(Z) vs counted MACs) and exit')
    ap.add_argument('--convs', action='store_true',
                    help='time single pruned convs against dense ones (CPU) and exit')
    ap.add_argument('--gpu-check', action='store_true', help='the prepared self-check of the '
                    'GPU path (gpu_check.py; about 5 minutes): correctness on tiny models, then '
                    'speed; on the CPU where no GPU is; one table and --out/gpu_check.json')
    ap.add_argument('--short', action='store_true', help='--gpu-check: its short CPU form (the '
                    'test suite runs it)')
    ap.add_argument('--out', default='gpu-check', help='--gpu-check: its folder')
    ap.add_argument('--budget', type=float, default=290, help='--gpu-check: seconds in all')
    ap.add_argument('--loader', metavar='DIR', help='time the ImageNet input pipeline on the '
                    'JPEGs in DIR/train and DIR/val (docs/photos_as_imagefolder.py) and exit')
    ap.add_argument('--file', nargs='+', metavar='PATH', help='time your own exported files '
                    '(.pt2, .onnx, .pt; e.g. a dense export, then pruned.pt2) side by side on '
                    'the CPU and exit')
    ap.add_argument('--shape', type=int, nargs='+', default=[1, 3, 32, 32],
                    help='--file: the input batch shape')
    ap.add_argument('--repeats', type=int, default=11, help='timed rounds per comparison (median)')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--threads', type=int, default=torch.get_num_threads(), help='CPU threads')
    ap.add_argument('--json', help='also write every row to this file')
    args = ap.parse_args()
    if args.repeats < 1 or args.threads < 1:
        raise SystemExit('error: --repeats and --threads must be >= 1')
    if args.macs:
        return macs_table()
    if args.file:
        torch.set_num_threads(args.threads)
        rows = file_table(args.file, args.shape, args.repeats)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(cpus=os.cpu_count(), rows=rows), indent=1))
        return rows
    if args.any:
        return any_table()
    if args.gpu_check:
        import gpu_check
        device = torch.device('cpu' if args.short else args.device)
        return gpu_check.run(Path(args.out), device, args.budget, short=args.short)
    if args.loader:
        rows = loader_table(args.loader, torch.device(args.device))
        if args.json:
            Path(args.json).write_text(json.dumps(dict(cpus=os.cpu_count(), rows=rows), indent=1))
        return rows
    if any(os.environ.get(k) != v for k, v in ALLOCATOR.items()):   # glibc keeps freed
        os.execve(sys.executable, [sys.executable] + sys.argv,        # activations mapped
                  {**os.environ, **ALLOCATOR})
    torch.set_num_threads(args.threads)
    if args.convs:
        return conv_table(args.repeats * 5)
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    depth, b_train, b_infer, n_single, repeats = \
        (8, 8, 4, 2, 2) if args.smoke else (56, 128, 64, 16, args.repeats)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    onnx = not cuda and importlib.util.find_spec('onnxruntime') is not None   # optional
    forms = ['eager', 'folded CL', 'CUDA graph'] if cuda else \
        [f for f in FORMS if not (args.smoke and f == 'inductor') and (f != 'onnxruntime' or onnx)
         and f != 'CUDA graph']
    batches = (256, 2048, 1) if cuda and not args.smoke else (b_infer, 1)
    lanes = ge.vector_lanes()
    autocast = (lambda: torch.autocast('cuda', torch.bfloat16, cache_enabled=False)) if cuda \
        else contextlib.nullcontext                 # no cast cache: CUDA graphs capture it
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dense = gc.resnet_cifar(depth).to(device)
    print(f'device {device} ({torch.get_num_threads()} threads, {lanes} float32 lanes), torch '
          f'{torch.__version__}, ResNet-{depth}, {repeats} rounds, medians; allocator: '
          + ' '.join(f'{k}={v}' for k, v in ALLOCATOR.items())
          + (', bf16 + channels_last' if cuda else ''))
    rows = train_rows(dense, depth, b_train, repeats, fmt, autocast)
    dense.eval()
    pruned = {}
    for rate in (0.5, 0.4, 0.3):                # pruned at about 50 / 40 / 30 % of the MACs
        model = gated_copy(dense, depth, 'static', device)
        set_static_rate(model, rate, gen)
        pruned[f'pruned {rate:.0%}'] = ge.prune(model)
    for batch in batches:
        rows += deploy_rows(dense, pruned, batch, repeats, forms, lanes, autocast)
    tv = (torchvision.models.resnet18() if args.smoke else torchvision.models.resnet50())
    tv = tv.to(device).eval()
    big = 64 if args.smoke else 224
    static_tv = gc.gate_resnet(tv, 'static')
    set_static_rate(static_tv, 0.5, gen)
    dynamic = {f'ResNet-{depth} {32}px': (gated_copy(dense, depth, 'dynamic', device), dense,
                                          pruned['pruned 50%'], 32, n_single),
               f'tv-ResNet-{18 if args.smoke else 50} {big}px': (
                   gc.gate_resnet(tv, 'dynamic'), tv, ge.prune(static_tv.eval()), big,
                   2 if args.smoke else 4)}
    with torch.no_grad():                       # data-dependent decisions, about half on
        for model, *_ in dynamic.values():
            for g in gc.gates(model):
                torch.nn.init.normal_(g.fc2.weight, std=1.0)
                g.fc2.bias.zero_()
    for label, (model, dense_net, bound, size, n) in dynamic.items():
        rows += skip_rows(label, model, dense_net, bound, size, n, repeats, fmt, '',
                          autocast)
    if args.smoke:                              # tiny sizes, two rounds: it runs, no verdict
        for r in rows:
            r['target'], r['met'] = '', ''
    print('speedup: vs the dense net in the same form; overall: vs the dense net in eager; '
          'MAC red.: dense MACs / its MACs; lane red.: the same with output channels rounded '
          f'up to {lanes} lanes (what the CPU computes)' + ('; smoke: no targets judged'
                                                             if args.smoke else ''))
    print(f"{'row':34} {'batch':>5} {'ms':>9} {'speedup':>8} {'overall':>8} {'MAC red.':>8} "
          f"{'lane red.':>9}  {'target':28} met")
    for r in rows:
        met = '' if r['met'] == '' else ('yes' if r['met'] else 'NO')
        print(f"{r['row']:34} {r['batch']:5d} {r['ms']:9.2f} {r['speedup']:8.2f} "
              f"{r['overall']:8.2f} {r['mac_red']:8.2f} {r['lane_red']:9.2f}  {r['target']:28} "
              f"{met}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(device=str(device), threads=torch.get_num_threads(), lanes=lanes,
                           torch=torch.__version__, allocator=ALLOCATOR, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
