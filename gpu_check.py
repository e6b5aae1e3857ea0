"""The prepared self-check of the GPU path (issue 31): `python benchmark.py --gpu-check`.

Run from any folder. On a GPU it fits in about 5 minutes on a cold compile cache: tiny
models (ResNet-8) for correctness first, then ResNet-56 speed rows, each check with its own
budget (a check that would start past it is marked 'skipped: budget'). Without a GPU it runs
the same checks on the CPU and says so (the test suite runs its short form there):
  a  the compiled training step equals the eager step (static and dynamic gates; inductor's
     fallback_random draws the eager noise; bf16 tolerance on CUDA)
  b  fresh Gumbel noise on every replay: two replays at p = 0.5 decide differently, and the
     share of channels on is 0.5 +- 0.02
  c  steps compiled vs eager: time per step (CUDA events), host syncs per step (CUDA sync
     debug mode), GPU busy share (event time / wall time)
  d  a tiny whole pipeline: train_cifar.py --synthetic --arch resnet8, compiled, an lr
     milestone inside; its pruned.pt2 then runs on a CPU input
  e  torchrun --nproc_per_node 1 train_imagenet.py --synthetic, compiled; and a run whose
     compilation is forced to fail (no C compiler): it must go on eagerly
  f  ResNet-56 training speed, dense / static / dynamic, compiled (img/s)
TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1 while it runs, so a CUDA graph skipped in silence fails.
One table, and OUT/gpu_check.json.
"""
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import gumbel_channels as gc
import machine
import train_loop as tl

HERE = Path(__file__).resolve().parent
CHECKS = ('a', 'b', 'c', 'd', 'e', 'f')


def _model(depth, gating, device, init_p=gc.INIT_P, seed=0):
    torch.manual_seed(seed)
    model = gc.resnet_cifar(depth, gating=gating, init_p=init_p)
    return model.to(device, memory_format=torch.channels_last)


def _step(model, device, mode, backend=None):
    args = _recipe()
    opt, _ = tl.optimizer(model, args, 5e-4, [1000])
    return tl.TrainStep(model, opt, tl.gate_loss(args), machine.autocast_for(device), mode=mode,
                        backend=backend)


def _recipe():
    import argparse
    return argparse.Namespace(lr=0.05, gate_decay=20.0, gate_lr_decay=False, loss='flops', t=0.5,
                              targets=None, **{k: v for k, v in tl.RECIPE.items()
                                               if k != 'gate_lr_decay'})


def _batches(n, batch, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=gen, device=device).contiguous(
        memory_format=torch.channels_last),
        torch.randint(0, 10, (batch,), generator=gen, device=device)) for _ in range(n)]


def compiled_equals_eager(device, mode, backend, steps=3):
    """(a): the same steps from the same weights and noise, eager and compiled; the largest
    weight difference relative to the weights' scale, against the tolerance (float32 error
    over a few SGD steps; bf16 autocast on CUDA is far coarser)."""
    import torch._inductor.config as inductor
    inductor.fallback_random = True                         # the eager RNG ops, compiled
    worst = {}
    for gating in ('static', 'dynamic'):
        weights = []
        for m in (None, mode):
            model = _model(8, gating, device)
            step = _step(model, device, m, backend if m else None)
            torch.manual_seed(1)
            for x, y in _batches(steps, 16, device):
                step(x, y, torch.tensor(0.5, device=device))
            weights.append(torch.cat([p.detach().float().flatten() for p in model.parameters()]))
        worst[gating] = ((weights[0] - weights[1]).abs().max() / weights[0].abs().max()).item()
    tolerance = 3e-2 if device.type == 'cuda' else 1e-4
    return dict(ok=all(v <= tolerance for v in worst.values()), tolerance=tolerance,
                relative_difference=worst)


def fresh_noise(device, mode, backend):
    """(b): a compiled forward of static gates at p = 0.5 replayed twice: different decisions,
    each replay's share on within 0.02 of 0.5 (over 8,000 decisions its sd is 0.0056)."""
    model = _model(8, 'static', device, init_p=0.5).train()
    how = dict(backend=backend) if backend else dict(mode=mode)
    torch._dynamo.reset()
    forward = torch.compile(lambda x: torch.cat(model(x)[1].z, 1), dynamic=False, **how)
    x = torch.randn(64, 3, 32, 32, device=device)
    with torch.no_grad():
        torch.compiler.cudagraph_mark_step_begin()
        a = forward(x).clone()
        torch.compiler.cudagraph_mark_step_begin()
        b = forward(x).clone()
    shares = [a.float().mean().item(), b.float().mean().item()]
    return dict(ok=not torch.equal(a, b) and all(abs(s - 0.5) <= 0.02 for s in shares),
                decisions=a.numel(), shares=shares, differ=float((a != b).float().mean()))


def speed(device, mode, backend, steps=100, depth=8, batch=128):
    """(c): `steps` training steps of a static-gated ResNet, compiled and eager: ms per step
    (CUDA events on a GPU), host syncs per step, GPU busy share."""
    rows = {}
    for name, m in (('eager', None), ('compiled', mode)):
        step = _step(_model(depth, 'static', device), device, m, backend if m else None)
        data = _batches(4, batch, device)
        for x, y in data[:2]:                                   # compile and warm up
            step(x, y, torch.tensor(0.5, device=device))
        syncs = _SyncCount(device)
        t0 = time.perf_counter()
        events = []
        with syncs:
            for i in range(steps):
                x, y = data[i % len(data)]
                if device.type == 'cuda':
                    events.append((torch.cuda.Event(enable_timing=True),
                                   torch.cuda.Event(enable_timing=True)))
                    events[-1][0].record()
                step(x, y, torch.tensor(0.5, device=device))
                if device.type == 'cuda':
                    events[-1][1].record()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        gpu = sum(a.elapsed_time(b) for a, b in events) / 1000 if events else None
        rows[name] = dict(ms_per_step=1000 * (gpu if gpu is not None else wall) / steps,
                          img_s=steps * batch / wall, syncs_per_step=syncs.count / steps
                          if syncs.count is not None else None,
                          gpu_busy=None if gpu is None else min(1.0, gpu / wall))
    rows['speedup'] = rows['eager']['ms_per_step'] / rows['compiled']['ms_per_step']
    rows['ok'] = True
    return rows


class _SyncCount:
    """Host syncs inside the block (CUDA's sync debug mode warns at each); None on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == 'cuda'
        self.count = None

    def __enter__(self):
        if self.cuda:
            self.caught = warnings.catch_warnings(record=True)
            self.seen = self.caught.__enter__()
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            self.caught.__exit__(*exc)
            self.count = sum('synchroniz' in str(w.message) for w in self.seen)


def _run(command, timeout, env=None):
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env={**os.environ, **(env or {})})
    return done.returncode, done.stdout + done.stderr


def pipeline(out, device, compiled, timeout):
    """(d): train_cifar.py --synthetic --arch resnet8 on 128 images (compiled, an lr
    milestone inside), then its pruned.pt2 on a CPU input in a fresh process that sees no
    GPU."""
    runs = out / 'cifar'
    code, log = _run([sys.executable, str(HERE / 'train_cifar.py'), '--synthetic', '--arch',
                      'resnet8', '--train-size', '128', '--dense-epochs', '1', '--epochs', '2',
                      '--batch-size', '32', '--dense-batch-size', '32', '--recal-batches', '4',
                      '--device', device.type, '--compile', 'auto' if compiled else 'off',
                      '--out', str(runs)], timeout)      # --epochs 2: lr / 10 after epoch 1
    (out / 'cifar.log').write_text(log)
    pt2 = runs / 'synthetic-n128-resnet8-static-channel-flops-t0.5-s0' / 'pruned.pt2'
    if code != 0 or not pt2.exists():
        return dict(ok=False, exit=code, last_line=_last(log))
    probe = ('import torch; net = torch.export.load(%r).module(); '
             'print(tuple(net(torch.randn(3, 3, 32, 32)).shape))' % str(pt2))
    code, shape = _run([sys.executable, '-c', probe], timeout, env=dict(CUDA_VISIBLE_DEVICES=''))
    return dict(ok=code == 0 and shape.strip().endswith('(3, 10)'), exit=code,
                pt2_on_cpu=shape.strip()[-60:], compiled=compiled,
                first_steps_s=_compile_seconds(log))


def imagenet(out, device, timeout):
    """(e): torchrun --nproc_per_node 1 train_imagenet.py --synthetic, compiled; then one plain
    run with compilation forced to fail (CC/CXX pointing nowhere): it must go on eagerly."""
    base = ['--synthetic', '--arch', 'resnet18', '--epochs', '1', '--crop-size', '64',
            '--batch-size', '64', '--recal-batches', '2', '--workers', '0', '--device',
            device.type, '--compile', 'default' if device.type == 'cpu' else 'auto']
    code, log = _run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                      '--nproc_per_node', '1', str(HERE / 'train_imagenet.py'), *base,
                      '--out', str(out / 'imagenet')], timeout)
    (out / 'imagenet.log').write_text(log)
    broken = dict(CC='/nonexistent/cc', CXX='/nonexistent/c++', TORCHINDUCTOR_CACHE_DIR=str(
        out / 'empty-inductor-cache'))
    fcode, flog = _run([sys.executable, str(HERE / 'train_imagenet.py'), *base, '--out',
                        str(out / 'imagenet-broken')], timeout, env=broken)
    (out / 'imagenet-broken.log').write_text(flog)
    fell_back = 'continuing eagerly' in flog
    return dict(ok=code == 0 and fcode == 0 and fell_back, exit=code, last_line=_last(log),
                forced_failure_exit=fcode, fell_back_eagerly=fell_back)


def resnet56_speed(out, device, timeout):
    """(f): img/s of ResNet-56 training steps, dense, static and dynamic gates, compiled."""
    rows = {}
    mode = machine.compile_mode('auto', device) or 'default'
    for gating in (None, 'static', 'dynamic'):
        step = _step(_model(56, gating, device), device, mode)
        data = _batches(4, 256, device)
        for x, y in data[:2]:
            step(x, y, torch.tensor(0.5, device=device))
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(30):
            step(*data[i % 4], torch.tensor(0.5, device=device))
        if device.type == 'cuda':
            torch.cuda.synchronize()
        rows[gating or 'dense'] = 30 * 256 / (time.perf_counter() - t0)
    return dict(ok=True, img_s=rows)


def _compile_seconds(log):
    """The seconds of each phase's first (compiling) step, from a script's log."""
    return [float(s) for s in re.findall(r'first step ([0-9.]+) s', log)]


def _last(log):
    lines = log.strip().splitlines()
    return lines[-1][:200] if lines else ''


def run(out, device, budget=290, short=False):
    """Every check in order, each within its share of `budget` seconds; short: the CPU form
    the test suite runs (dynamo's graphs run eagerly, tiny sizes, checks a to d). -> the
    report."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ['TORCHINDUCTOR_CUDAGRAPH_OR_ERROR'] = '1'
    mode = machine.compile_mode('auto', device) or 'default'
    backend = 'eager' if short else None                # dynamo's graphs without a compiler
    shares = dict(a=0.12, b=0.06, c=0.17, d=0.25, e=0.2, f=0.2)
    plan = {
        'a': ('compiled step = eager step', lambda t: compiled_equals_eager(device, mode, backend)),
        'b': ('fresh noise on every replay', lambda t: fresh_noise(device, mode, backend)),
        'c': ('compiled vs eager steps', lambda t: speed(device, mode, backend,
                                                          steps=10 if short else 100,
                                                          batch=16 if short else 128)),
        'd': ('tiny pipeline, pt2 on the CPU', lambda t: pipeline(out, device, not short, t)),
        'e': ('imagenet under torchrun', lambda t: imagenet(out, device, t)),
        'f': ('ResNet-56 speed', lambda t: resnet56_speed(out, device, t)),
    }
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        'the CPU (no GPU here: the same checks, CPU timings)'
    print(f'gpu check on {where}; budget {budget:.0f} s')
    started, report = time.perf_counter(), []
    for key in ('a', 'b', 'c', 'd') if short else CHECKS:
        name, check = plan[key]
        left = budget - (time.perf_counter() - started)
        share = shares[key] * budget
        if left < share / 2:
            report.append(dict(check=key, name=name, status='skipped: budget'))
            continue
        t0 = time.perf_counter()
        try:
            result = check(min(share, left))
            status = 'ok' if result.pop('ok') else 'FAILED'
        except Exception as e:                              # a check that breaks is a row
            result, status = dict(error=f'{type(e).__name__}: {str(e)[:200]}'), 'FAILED'
        report.append(dict(check=key, name=name, status=status,
                           seconds=round(time.perf_counter() - t0, 1), **result))
        print(f"{key} {name:32} {status:16} {report[-1]['seconds']:6.1f} s  "
              f'{_brief(result)}', flush=True)
    summary = dict(device=where, torch=torch.__version__, short=short, budget=budget,
                   seconds=round(time.perf_counter() - started, 1), checks=report)
    (out / 'gpu_check.json').write_text(json.dumps(summary, indent=1, default=str))
    print(f"written to {out / 'gpu_check.json'}")
    return summary


def _brief(result):
    parts = []
    for k, v in result.items():
        if isinstance(v, float) and math.isfinite(v):
            v = f'{v:.3g}'
        elif isinstance(v, dict):
            v = ', '.join(f'{a} {b:.3g}' if isinstance(b, float) else f'{a} {b}'
                          for a, b in v.items())
        parts.append(f'{k}: {v}')
    return '; '.join(parts)[:220]
