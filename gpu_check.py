"""The prepared self-check of the GPU path (issues 31, 41): `python benchmark.py --gpu-check`.

Run from any folder. On a GPU it fits in about 5 minutes on a cold compile cache: tiny
models (ResNet-8) for correctness first, then ResNet-56 speed rows; a check that would start
with less than half its share of the budget left is 'skipped: budget'. Without a GPU it runs
the checks on the CPU and says so (under 5 minutes on 2 cores; the suite runs its short
form, dynamo's graphs run eagerly). Every row says 'ok', 'FAILED', or 'not exercised here'
with the reason: a check whose compiled step fell back to eager, or made no graph, never
passes, since it would compare eager with eager.
  a  the compiled training step equals the eager step (static and dynamic gates; inductor's
     fallback_random, for this check only, draws the eager noise): losses per step,
     decisions, weights norm-wise (bf16 tolerance on CUDA)
  b  fresh Gumbel noise on every replay: of three calls at p = 0.5, the two replays decide
     differently, and each share of channels on is 0.5 +- 0.02
  c  steps compiled vs eager: time per step (CUDA events), host syncs per step (CUDA sync
     debug mode), GPU busy share (event time / wall time)
  d  a tiny whole pipeline: train_cifar.py --synthetic --arch resnet8, compiled, an lr
     milestone inside (no recompile: the lr is a tensor); its pruned.pt2 runs on a CPU input
  e  torchrun --nproc_per_node 1 train_imagenet.py --synthetic, compiled on a GPU; and a run
     whose compiled functions are forced to raise (torch.compile replaced in that process):
     it must say so, go on eagerly and finish
  f  ResNet-56 training speed, dense / static / dynamic, compiled (img/s; GPU only)
inductor's triton.cudagraph_or_error (and TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1 for the scripts
it starts) while it runs, so a CUDA graph skipped in silence fails. One table, and
OUT/gpu_check.json.
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
                              t_ramp=0.0,
                              targets=None, **{k: v for k, v in tl.RECIPE.items()
                                               if k != 'gate_lr_decay'})


def _batches(n, batch, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=gen, device=device).contiguous(
        memory_format=torch.channels_last),
        torch.randint(0, 10, (batch,), generator=gen, device=device)) for _ in range(n)]


def _not_exercised(step):
    """The row of a check whose compiled step fell back to eager: nothing compiled was run."""
    return dict(ok=None, why=f'the step fell back to eager ({step.compiled.fallback})')


def compiled_equals_eager(device, mode, backend, steps=3):
    """(a): the same steps from the same weights and noise (inductor's fallback_random: the
    eager RNG ops, for this check only), eager and compiled; compared where it matters: each
    step's losses (relative, float32 reassociation: 1e-5; bf16 autocast on CUDA: 3e-2), the
    gates' decisions at the end, and the weights other than gate logits, all together,
    norm-wise against their update (within float32 summation's error bound; the gates' lr
    of x1000 amplifies the rounding of their gradients, where a gate loss and the CE nearly
    cancel, so raw logits are not compared, nor one tensor whose gradient is such a
    cancellation)."""
    import torch._inductor.config as inductor
    tolerance = 3e-2 if device.type == 'cuda' else 1e-5
    worst = {}
    for gating in ('static', 'dynamic'):
        runs = []
        for m in (None, mode):
            model = _model(8, gating, device)
            start = [p.detach().clone() for p in model.parameters()]
            step = _step(model, device, m, backend if m else None)
            torch.manual_seed(1)
            losses = []
            with inductor.patch(fallback_random=True):
                for x, y in _batches(steps, 16, device):
                    losses.append(step(x, y, torch.tensor(0.5, device=device))[0].item())
            if m and not step.mode:
                return _not_exercised(step)
            gate_ids = {id(q) for g in gc.gates(model) for q in g.parameters()}
            runs.append(dict(losses=losses, decisions=[g.kept() if gating == 'static' else None
                                                       for g in gc.gates(model)],
                             weights=[(p.detach(), p0) for p, p0 in zip(model.parameters(), start)
                                      if id(p) not in gate_ids]))
        eager, compiled = runs
        loss = max(abs(a - b) / abs(a) for a, b in zip(eager['losses'], compiled['losses']))
        flat = [torch.cat([t.flatten().double() for t in ts]) for ts in (
            [a for a, _ in eager['weights']], [p0 for _, p0 in eager['weights']],
            [b for b, _ in compiled['weights']])]
        weights = ((flat[2] - flat[0]).norm() / (flat[0] - flat[1]).norm()).item()
        same = all(a is None or torch.equal(a, b)
                   for a, b in zip(eager['decisions'], compiled['decisions']))
        worst[gating] = dict(loss=loss, weights=weights, decisions_equal=same)
    # a float32 sum of n terms may err by (n - 1) eps relative to the sum of their sizes
    # (recursive summation's bound); a conv weight's gradient sums B x H x W = 16 x 32 x 32
    # products, in another order when compiled
    weight_tolerance = 3e-2 if device.type == 'cuda' else 16 * 32 * 32 * torch.finfo(
        torch.float32).eps
    ok = all(w['loss'] <= tolerance and w['weights'] <= weight_tolerance and w['decisions_equal']
             for w in worst.values())
    return dict(ok=ok, tolerance=dict(loss=tolerance, weights=weight_tolerance),
                relative_difference=worst)


def _graphs():
    return torch._dynamo.utils.counters['stats']['unique_graphs']


def fresh_noise(device, mode, backend):
    """(b): a compiled forward of static gates at p = 0.5 called three times: the second and
    third calls (replays, after the first compiled and, on CUDA, warmed up) decide
    differently, each share on within 0.02 of 0.5 (over 8,000 decisions its sd is 0.0056):
    noise baked into a graph as a constant would repeat."""
    model = _model(8, 'static', device, init_p=0.5).train()
    how = dict(backend=backend) if backend else dict(mode=mode)
    torch._dynamo.reset()
    before = _graphs()
    forward = torch.compile(lambda x: torch.cat(model(x)[1].z, 1), dynamic=False, **how)
    x = torch.randn(64, 3, 32, 32, device=device)
    calls = []
    with torch.no_grad():
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            calls.append(forward(x).clone())
    if _graphs() == before:
        return dict(ok=None, why='dynamo made no graph of the forward')
    a, b = calls[1:]
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
        if m and not step.mode:
            return _not_exercised(step)
        syncs = _SyncCount(device)
        _sync(device)
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
        _sync(device)
        wall = time.perf_counter() - t0
        gpu = sum(a.elapsed_time(b) for a, b in events) / 1000 if events else None
        rows[name] = dict(ms_per_step=1000 * (gpu if gpu is not None else wall) / steps,
                          img_s=steps * batch / wall, syncs_per_step=syncs.count / steps
                          if syncs.count is not None else None,
                          gpu_busy=None if gpu is None else min(1.0, gpu / wall))
    rows['speedup'] = rows['eager']['ms_per_step'] / rows['compiled']['ms_per_step']
    rows['ok'] = True
    return rows


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


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


def _compiled_in(log):
    """None if a script's log shows its steps compiled; else why not (the row's reason)."""
    fell = [line for line in log.splitlines() if 'continuing eagerly' in line]
    if fell:
        return f'the step fell back to eager ({fell[0][:160]})'
    return None if 'compiled the training step' in log else 'no compiled step in the log'


def pipeline(out, device, compiled, timeout):
    """(d): train_cifar.py --synthetic --arch resnet8 on 128 images (compiled, an lr
    milestone inside), then its pruned.pt2 on a CPU input in a fresh process that sees no
    GPU."""
    runs = out / 'cifar'
    code, log = _run([sys.executable, str(HERE / 'train_cifar.py'), '--synthetic', '--arch',
                      'resnet8', '--train-size', '128', '--dense-epochs', '1', '--epochs', '2',
                      '--batch-size', '32', '--dense-batch-size', '32', '--recal-batches', '4',
                      '--device', device.type, '--compile',
                      ('default' if device.type == 'cpu' else 'auto') if compiled else 'off',
                      '--out', str(runs)], timeout)      # --epochs 2: lr / 10 after epoch 1
    (out / 'cifar.log').write_text(log)
    pt2 = runs / 'synthetic-n128-resnet8-static-channel-flops-t0.5-s0' / 'pruned.pt2'
    if code != 0 or not pt2.exists():
        return dict(ok=False, exit=code, last_line=_last(log))
    probe = ('import torch; net = torch.export.load(%r).module(); '
             'print(tuple(net(torch.randn(3, 3, 32, 32)).shape))' % str(pt2))
    code, shape = _run([sys.executable, '-c', probe], timeout, env=dict(CUDA_VISIBLE_DEVICES=''))
    ran = code == 0 and shape.strip().endswith('(3, 10)')
    why = _compiled_in(log) if compiled else None
    return dict(ok=ran if ran is False or why is None else None, exit=code,
                pt2_on_cpu=shape.strip()[-60:], compiled=compiled,
                first_steps_s=_compile_seconds(log), **(dict(why=why) if why else {}))


# run a script with torch.compile replaced by one whose compiled functions raise: the failure
# a first GPU user may meet (no C compiler, a Triton mismatch), forced without the environment
BROKEN_COMPILE = """import runpy, sys, torch
def broken(fn, **kw):
    def call(*a, **k):
        raise RuntimeError('forced compile failure (gpu_check)')
    return call
torch.compile = broken
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def imagenet(out, device, timeout):
    """(e): torchrun --nproc_per_node 1 train_imagenet.py --synthetic, compiled; then one plain
    run whose compiled functions are forced to raise: it must go on eagerly and finish."""
    cpu = device.type == 'cpu'
    base = ['--synthetic', '--arch', 'resnet18', '--epochs', '1', '--crop-size', '64',
            '--batch-size', '64', '--recal-batches', '2', '--workers', '0', '--device',
            device.type, '--compile']
    script = str(HERE / 'train_imagenet.py')
    code, log = _run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                      '--nproc_per_node', '1', script, *base, 'off' if cpu else 'auto',
                      '--out', str(out / 'imagenet')], timeout)
    (out / 'imagenet.log').write_text(log)
    fcode, flog = _run([sys.executable, '-c', BROKEN_COMPILE, script, *base, 'default',
                        '--out', str(out / 'imagenet-broken')], timeout)
    (out / 'imagenet-broken.log').write_text(flog)
    fell_back = 'forced compile failure' in flog and 'continuing eagerly' in flog
    why = ('on the CPU it runs eagerly: inductor takes minutes to compile ResNet-18 on a few '
           'cores' if cpu else _compiled_in(log))
    ok = code == 0 and fcode == 0 and fell_back
    return dict(ok=None if ok and why else ok, exit=code, last_line=_last(log),
                forced_failure_exit=fcode, fell_back_eagerly=fell_back,
                **(dict(why=f'torchrun run: {why}') if why else {}))


def resnet56_speed(out, device, timeout, batch=256, steps=30):
    """(f): img/s of ResNet-56 training steps, dense, static and dynamic gates, compiled."""
    rows = {}
    mode = machine.compile_mode('auto', device) or 'default'
    for gating in (None, 'static', 'dynamic'):
        step = _step(_model(56, gating, device), device, mode)
        data = _batches(4, batch, device)
        for x, y in data[:2]:
            step(x, y, torch.tensor(0.5, device=device))
        if not step.mode:
            return _not_exercised(step)
        _sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            step(*data[i % 4], torch.tensor(0.5, device=device))
        _sync(device)
        rows[gating or 'dense'] = steps * batch / (time.perf_counter() - t0)
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
    import torch._inductor.config as inductor
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ['TORCHINDUCTOR_CUDAGRAPH_OR_ERROR'] = '1'     # the scripts it starts
    inductor.triton.cudagraph_or_error = True                # this process (read at import)
    cpu = device.type == 'cpu'
    mode = machine.compile_mode('auto', device) or 'default'
    backend = 'eager' if short else None                # dynamo's graphs without a compiler
    shares = dict(a=0.2, b=0.05, c=0.1, d=0.25, e=0.2, f=0.2)     # the subprocesses may
    plan = {
        'a': ('compiled step = eager step', lambda t: compiled_equals_eager(device, mode, backend)),
        'b': ('fresh noise on every replay', lambda t: fresh_noise(device, mode, backend)),
        'c': ('compiled vs eager steps', lambda t: speed(device, mode, backend,
                                                          steps=10 if cpu else 100,
                                                          batch=16 if cpu else 128)),
        'd': ('tiny pipeline, pt2 on the CPU', lambda t: pipeline(out, device, not short, t)),
        'e': ('imagenet under torchrun', lambda t: imagenet(out, device, t)),
        'f': ('ResNet-56 speed', lambda t: dict(ok=None, why='no GPU to time') if cpu
              else resnet56_speed(out, device, t)),
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
            result = check(left)                            # take what is left
            ok = result.pop('ok')
            status = 'ok' if ok else 'FAILED' if ok is False else \
                f"not exercised here: {result.pop('why')}"

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
