"""The paper's training loop (4.1), for a reader of the paper: the gate recipe, the optimizer,
the loss with its gate terms, the (compiled) training step, the epoch, and one fit() that
every phase of both scripts and compare.py runs (a dense baseline, the gated fine-tuning,
plain fine-tuning of a pruned net).

    args = parser.parse_args()                         # lr, t, the gate recipe's flags
    last = fit_images(model, data, args, epochs=100, batch_size=256, weight_decay=5e-4,
                      milestones=[40, 70], gen=data.generator(seed),
                      autocast=machine.autocast_for(dev), gate_loss=gate_loss(args))

fit() itself takes any batches (train_imagenet.py's loaders), and keeps its run in the
folder it is handed (folder=run_folder.RunFolder(path, script): checkpoints, resume). Two modules a
first reading may skip: machine.py (the device, precision, threads, the compile mode, RNG
states) and run_folder.py (what a run folder keeps and the rules for reusing one).
"""
import copy
import math
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

import cli
import gumbel_channels as gc
import machine
from cli import RunError, UsageError

# ----------------------------------------------------------------------------- the gate recipe

# One recipe for both scripts, not the paper's (NOTES.md, deviations 18-20), measured to
# deliver t on real images (digits in CIFAR's format and in ImageNet's folders, static and
# dynamic gates); PAPER_GATES gives the paper's own settings back. Why each differs:
# - gate lr x1000 (x100 dynamic, x10 DenseNet exits), constant, and loss weight 20: at the
#   paper's x1 and weight 1 the gates on real images neither reached t nor polarized (100%
#   of the MACs delivered); a dynamic gate is a small network that collapsed at x1000, and
#   exit gates at x100 shut every exit within two epochs;
# - the gate decay divided by the multiplier (gc.param_groups): the paper's shrink per step;
# - a polarization hinge summed over gates, ramped in: Property 1's variance term weighs a
#   gate by (its MACs / MaxFLOPs)^2, so gates the task ignores stayed undecided, and the
#   threshold then decided them by a coin flip the training never made.
RECIPE = dict(loss_weight=20.0, gate_lr_mult=None, polarize=5e-5, gate_lr_decay=False)
GATE_LR_MULT = dict(static=1000.0, dynamic=100.0, exit=10.0)
PAPER_GATES = '--gate-lr-mult 1 --loss-weight 1 --polarize 0 --gate-lr-decay'


def add_gate_args(parser):
    """The gate flags of a run_folder.Parser: the loss and the estimator (structure: they
    name the run), and the recipe (training), its defaults (the paper's: PAPER_GATES)."""
    s, a = parser.group['structure'].add_argument, parser.group['training'].add_argument
    s('--loss', default='flops', choices=('flops', 'batch', 'per-gate'),
      help='flops (3.4), batch (Eq. 1) or per-gate (AIG, 2.1)')
    s('--soft-gates', action='store_true', help='soft Gumbel-softmax, not straight-through (3.2)')
    a('--targets', type=cli.UNIT, nargs='+',
      help='per-gate loss: a rate per gate module (default t)')
    a('--loss-weight', type=cli.NON_NEGATIVE, default=RECIPE['loss_weight'],
      help='gate loss weight (the paper: 1; NOTES.md 18)')
    a('--gate-lr-mult', type=cli.POSITIVE, default=RECIPE['gate_lr_mult'],
      help=f"gate lr / lr (default: {GATE_LR_MULT['static']:g} for static gates, "
           f"{GATE_LR_MULT['dynamic']:g} for dynamic ones, {GATE_LR_MULT['exit']:g} for "
           "DenseNet exits; the paper: 1; NOTES.md 18)")
    a('--gate-lr-decay', action='store_true', default=RECIPE['gate_lr_decay'],
      help='the gate lr follows --milestones too (the paper); by default it stays constant so '
           'the gates can finish polarizing')
    a('--gate-decay', type=cli.NON_NEGATIVE, default=20.0,
      help='gate decay: weight decay * this / |G| (3.2)')
    a('--gate-init-p', type=cli.OPEN_UNIT, default=gc.INIT_P,
      help='initial on-probability of the gates (DenseNet exits: 1 - this is the p of leaving)')
    a('--temperature', type=cli.POSITIVE, default=1.0,
      help='Gumbel-softmax temperature (3.2: fixed at 1)')
    a('--gate-sample', default='image', choices=('image', 'batch'),
      help='static gates draw once per image or once per batch')
    a('--polarize', type=cli.NON_NEGATIVE, default=RECIPE['polarize'], help='weight per gate of '
      'the polarization term (summed over gates), rising from 0 over fine-tuning (the paper: 0; '
      'NOTES.md 20)')
    a('--gate-init', default='uniform', choices=('uniform', 'magnitude'),
      help='uniform: every gate at --gate-init-p (the paper); magnitude: within each gate '
           "module the logits spread by the rank of the dense filter's L1 norm (static gates "
           "of the paper's ResNets), recommended for t of 0.25 and below: on CIFAR-10 it was "
           '+1.27 points at equal MACs there, a tie at 0.5 (docs/comparison.md)')
    a('--t-ramp', type=cli.UNIT, default=0.0,
      help='the FLOPs target falls linearly from 1 to t over this share of the fine-tuning '
           '(0: t from the first step, the paper)')
    a('--gate-anneal', type=cli.UNIT, default=0.0,
      help="the gates' lr falls linearly toward 0 from this share of the fine-tuning on, once "
           'the gates have polarized (0: constant, the recipe)')
    a('--milestones', type=cli.COUNT, nargs='+',
      help='lr / 10 at these epochs (default: at fixed shares of --epochs)')


def add_evaluation_args(group):
    """The evaluation flags both scripts take (a parser's evaluation group)."""
    group.add_argument('--tau', type=cli.OPEN_UNIT, default=0.5, help='inference threshold (3.3)')
    group.add_argument('--recal-batches', type=cli.COUNT, default=200,
                       help='BN recalibration batches (4.1)')


def checked_milestones(milestones, epochs, shares):
    """--milestones as given (each epoch once, within 1 .. epochs - 1; anything else is
    refused in one line, never dropped or doubled), or milestones_at(epochs, *shares)."""
    if not milestones:
        return milestones_at(epochs, *shares)
    if len(set(milestones)) != len(milestones):
        raise UsageError(f'--milestones {" ".join(map(str, milestones))}: each epoch once (the '
                         'lr is divided by 10 at each)')
    late = [m for m in milestones if m >= epochs]
    if late:
        raise UsageError(f'--milestones {" ".join(map(str, late))}: at or past the last epoch '
                         f'(--epochs {epochs}), so never reached')
    return sorted(milestones)


def milestones_at(epochs, *shares):
    """lr milestones (epochs) at these shares of `epochs` (num, den); none at epoch 0, so a
    run of one epoch trains at the base lr. Schedules follow training progress, so that one
    recipe serves 11 steps an epoch and 5,000."""
    return sorted({epochs * num // den for num, den in shares} - {0})


def sampling(model, args):
    """The model with its gates sampling as the gate flags say (3.2)."""
    return gc.set_sampling(model, args.soft_gates, args.temperature,
                           per_batch=args.gate_sample == 'batch')


def optimizer(model, args, weight_decay, milestones, warmup=False, epochs=None):
    """SGD (momentum 0.9) over gc.param_groups and its LambdaLR: the weights' lr / 10 at each
    milestone (epochs; warmup: lr / 10 in epoch 0), the gates' lr constant unless
    --gate-lr-decay (NOTES.md 18) or --gate-anneal S (from epoch round(S x epochs) on, one
    step of 1 / (epochs - that + 1) down per epoch: never 0). -> (opt, sched)."""
    groups = gc.param_groups(model, args.lr, weight_decay, args.gate_decay,
                             gate_lr_mult(args, gate_kind(model)))
    if getattr(args, 'freeze_weights', False):          # the gates alone (compare's select)
        groups[0].update(lr=0.0, weight_decay=0.0)
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)

    def weights_lr(e):
        return (0.1 if warmup and e == 0 else 1) * 0.1 ** sum(e >= m for m in milestones)
    anneal = getattr(args, 'gate_anneal', 0.0)
    first = round(anneal * epochs) if anneal and epochs else None

    def gates_lr(e):
        decay = weights_lr(e) if args.gate_lr_decay else 1.0
        if first is None or e < first:
            return decay
        return decay * (1 - (e - first + 1) / (epochs - first + 1))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, [weights_lr, gates_lr][:len(groups)])


def gate_kind(model):
    """'exit' (a DenseNet's exit gates), 'dynamic' or 'static': what GATE_LR_MULT is keyed by."""
    if isinstance(model, gc.DenseNetExits):
        return 'exit'
    return 'dynamic' if any(isinstance(g, gc.DynamicGate) for g in gc.gates(model)) else 'static'


def gate_lr_mult(args, kind):
    """--gate-lr-mult, or the recipe's for gates of kind 'static', 'dynamic' or 'exit'."""
    return args.gate_lr_mult or GATE_LR_MULT[kind]


MAGNITUDE_SPREAD = 4.0    # --gate-init magnitude: logits l(init_p) - 4 .. l(init_p) + 4 by rank


def gated_convs(model):
    """(static gate, the conv whose output channels it gates) of a channel-gated ResNet of
    gumbel_channels: gate1 after conv1, a Bottleneck's gate2 after conv2."""
    pairs = [(getattr(b, f'gate{k}'), getattr(b, f'conv{k}')) for b in model.blocks()
             for k in (1, 2) if getattr(b, f'gate{k}', None) is not None]
    assert [g for g, _ in pairs] == gc.gates(model)
    return pairs


def init_gates(model, args):
    """--gate-init magnitude (an option; docs/comparison.md, "Gates on photographs"): each static
    gate's logit difference set from the rank r in [0, 1] of its channel's filter L1 norm
    within the gate module,
        w1 - w0 = logit(init_p) + MAGNITUDE_SPREAD (2 r - 1)
    so that the FLOPs loss, which pushes every channel of a module alike, turns off the
    smallest filters first (network slimming's ranking) instead of those the Gumbel noise
    picks. Call after the dense weights are loaded; 'uniform' leaves the gates as built."""
    if getattr(args, 'gate_init', 'uniform') == 'uniform':
        return model
    if not isinstance(model, gc.ResNet) or gate_kind(model) != 'static':
        raise UsageError('--gate-init magnitude: static gates of the paper\'s ResNets only')
    base = math.log(args.gate_init_p / (1 - args.gate_init_p))
    with torch.no_grad():
        for gate, conv in gated_convs(model):
            norms = conv.weight.abs().sum((1, 2, 3))
            rank = norms.argsort().argsort().to(gate.logits.dtype) / max(len(norms) - 1, 1)
            diff = base + MAGNITUDE_SPREAD * (2 * rank - 1)
            gate.logits.copy_(torch.stack([-diff / 2, diff / 2], 1))
    return model


def warn_below_floor(model, t):
    """One line when t is below the share of the MACs no gate can remove (a gumbel_any net's
    floor): the FLOPs loss would then turn every gate off and still miss t."""
    floor = getattr(model, 'floor', 0.0)
    if t < floor:
        print(f'warning: t = {t:g} is below {floor:.2f}, the share of the MACs no gate can '
              'remove here: every gate will turn off and the net will still run '
              f'{100 * floor:.0f}% of the MACs', file=sys.stderr)


def target(t, ramp, progress):
    """The FLOPs target at `progress` (0 -> 1 through fine-tuning): 1 at the start, falling
    linearly to t at progress `ramp` (--t-ramp; CoFi's warm-up of the target), t after;
    ramp 0: t throughout (the paper)."""
    if not ramp:
        return t
    return t + (1 - t) * torch.clamp(1 - torch.as_tensor(progress) / ramp, min=0)


def gate_loss(args):
    """The gate terms of the training loss, built once per run -> loss(info, progress).
        loss_weight x L  +  polarize x progress x |G| x polarization_loss(info)
    L: L_FLOPs (3.4, --loss flops), Eq. (1) (batch) or the per-gate loss (2.1, per-gate);
    progress runs 0 -> 1 through fine-tuning, so the polarization term rises linearly from 0
    (NOTES.md 20). |G| x its mean is its sum over the gates: each gate feels the same push in
    a net of 336 gates or of 7,552."""
    t, weight, polarize, ramp = args.t, args.loss_weight, args.polarize, args.t_ramp
    targets = args.targets if args.loss == 'per-gate' else None
    if ramp and args.loss == 'per-gate':
        raise UsageError('--t-ramp ramps the flops or batch loss\'s target, not per-gate targets')
    terms = {'flops': gc.flops_loss, 'batch': gc.batch_activation_loss,
             'per-gate': lambda info, t: gc.per_gate_loss(info, targets or [t] * len(info.z))}
    term = terms[args.loss]

    def loss(info, progress):
        n_gates = sum(z.shape[1] for z in info.z)
        return weight * term(info, target(t, ramp, progress)) \
            + polarize * progress * n_gates * gc.polarization_loss(info)
    return loss


KD_TEMPERATURE = 4.0      # Hinton, Vinyals and Dean (2015)'s softened outputs


def distillation(teacher, weight, temperature=KD_TEMPERATURE):
    """Knowledge distillation from a dense net (an option of compare.py, for every arm
    alike; not the paper's): the step's task loss becomes
        (1 - weight) CE(student, y) + weight T^2 KL(softmax(teacher / T) || softmax(student / T))
    with T = temperature (T^2 keeps the gradient's scale as T changes). The teacher runs in
    evaluation mode without gradients, a copy of its own (the caller's net is left as it is).
    -> term(x, student_logits), its .weight the weight."""
    teacher = copy.deepcopy(teacher).eval().requires_grad_(False)

    def term(xb, logits):
        with torch.no_grad():
            target = gc.split_output(teacher(xb))[0]
        return temperature ** 2 * F.kl_div(F.log_softmax(logits.float() / temperature, 1),
                                           F.log_softmax(target.float() / temperature, 1),
                                           reduction='batchmean', log_target=True)
    term.weight = weight
    return term


# ----------------------------------------------------------------------------- the step

class TrainStep:
    """One training step of the paper (4.1): forward, loss, backward, optimizer step; called
    (x, y, progress).
        loss = CE(the output each image takes) [+ each exit classifier's CE, 5]
               + gate_loss(info, progress)
    Fresh Gumbel noise at every call (3.2); `gate_loss` is what gate_loss(args) built; with
    `distill` (what distillation() built) the CE is mixed with the teacher's term. `net`
    is what the forward calls (a DDP wrapper of `model`); `scaler` (fp16) scales the loss and
    keeps the optimizer step eager. With a compile `mode` the step runs through
    CompiledStep (below: how, and what happens when compiling fails). Returns (loss, ce,
    gate loss, correct count, gate stats or None), detached; they live until the next call
    (CUDA graph outputs are reused)."""

    def __init__(self, model, opt, gate_loss, autocast, mode=None, scaler=None, net=None,
                 backend=None, distill=None):
        self.model, self.net, self.opt = model, net or model, opt
        self.gate_loss, self.autocast, self.scaler = gate_loss, autocast, scaler
        self.distill = distill
        self.compiled = CompiledStep(self, mode, backend) if mode else None

    def losses(self, xb, yb, progress):
        # Nothing is detached in here: torch 2.14's inductor dropped the loss's grad_fn when
        # the graph also returned a detached alias of it (docs/deployment.md: the GPU path).
        with self.autocast():
            logits, info = gc.split_output(self.net(xb))
            ce = F.cross_entropy(logits, yb)
            for exit_logits in (info.exit_logits or [])[:-1] if info is not None else []:
                ce = ce + F.cross_entropy(exit_logits, yb)
            task = ce
            if self.distill is not None:
                w = self.distill.weight
                task = (1 - w) * ce + w * self.distill(xb, logits)
            if info is None:
                return task, ce, None, (logits.argmax(1) == yb).sum(), None
            gl = self.gate_loss(info, progress)
        return task + gl, ce, gl, (logits.argmax(1) == yb).sum(), gate_stats(info)

    def backward(self, loss):
        self.opt.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def opt_step(self):
        if self.scaler is None:
            self.opt.step()
        else:                                               # fp16: unscale, skip infs
            self.scaler.step(self.opt)
            self.scaler.update()

    def eager(self, xb, yb, progress):
        out = self.losses(xb, yb, progress)
        self.backward(out[0])
        self.opt_step()
        return out

    def __call__(self, xb, yb, progress):
        compiled = self.compiled and self.compiled.mode
        out = (self.compiled if compiled else self.eager)(xb, yb, progress)
        loss, ce, gl, correct, stats = out
        gl = torch.zeros_like(ce) if gl is None else gl
        return loss.detach(), ce.detach(), gl.detach(), correct, \
            None if stats is None else stats.detach()

    @property
    def mode(self):
        """The compile mode the step runs in now (None: eager, or fallen back to eager)."""
        return self.compiled.mode if self.compiled else None


class CompiledStep:
    """A TrainStep's forward and loss (and with them AOTAutograd's backward) and its SGD step,
    torch.compiled once per phase (static shapes: a phase has one batch size; the caches a
    forward fills are filled before, and every lr is a tensor that the scheduler fills in
    place, so lr milestones do not recompile); on CUDA 'reduce-overhead' replays them as CUDA
    graphs, a few graph launches a step instead of a thousand kernel launches (issue 20).
    A failure to compile (torch.compile itself, no C compiler, a Triton or driver mismatch,
    an inductor bug) is said in one line and the step goes on eagerly from the same state:
    the BN buffers and RNG states taken before the compiled forward are put back (AOTAutograd
    compiles the backward lazily, after the forward has run), the gradients are dropped, and
    the step is redone; a failing optimizer step is done eagerly on the same gradients. The
    run then ends as an eager run would. Under torchrun it stops instead (torchrun then ends
    the other processes), naming --compile off. `backend` replaces inductor (tests)."""

    def __init__(self, step, mode, backend=None):
        self.step, self.mode = step, mode
        self.seconds = None                 # the first compiled step's time, compile included
        self.fallback = None                # why the step went on eagerly
        self.buffers = list(step.model.buffers())       # what a forward mutates: BN's
        self.saved = [b.clone() for b in self.buffers]
        if step.scaler is None:
            for group in step.opt.param_groups:     # a tensor lr: a milestone is no new graph
                group['lr'] = torch.as_tensor(group['lr'], dtype=torch.float64,
                                              device=group['params'][0].device)
                for p in group['params']:   # SGD's first step sets buf = grad = 0.9 * 0 + grad:
                    step.opt.state[p].setdefault('momentum_buffer', torch.zeros_like(p))
        try:
            torch._dynamo.reset()           # this phase's graphs only: no cache of an earlier one
            how = dict(backend=backend) if backend else dict(mode=mode)
            self.losses = torch.compile(step.losses, dynamic=False, **how)
            self.opt_step = torch.compile(step.opt_step, dynamic=False, **how) \
                if step.scaler is None else step.opt_step
        except Exception as e:              # an unsupported Python, a broken install
            self._eagerly(e)

    def __call__(self, xb, yb, progress):
        step, t0 = self.step, time.perf_counter()
        if self.seconds is None:            # caches keyed by input size (the MaxFLOPs) filled
            with torch.no_grad(), gc.evaluation(step.model):   # eagerly: the graph keeps them
                step.model(xb[:2])
        rng = machine.rng_state()
        torch._foreach_copy_(self.saved, self.buffers)
        try:
            torch.compiler.cudagraph_mark_step_begin()
            out = self.losses(xb, yb, progress)
            step.backward(out[0])
        except (KeyboardInterrupt, RunError, UsageError):
            raise
        except Exception as e:                              # compiling, or a compiled call
            if cli.out_of_memory(e):
                raise
            self._eagerly(e)
            torch._foreach_copy_(self.buffers, self.saved)  # BN statistics as before
            machine.set_rng_state(rng)                      # the same noise, the same batch
            return step.eager(xb, yb, progress)
        try:
            self.opt_step()
        except (KeyboardInterrupt, RunError, UsageError):
            raise
        except Exception as e:
            if cli.out_of_memory(e):
                raise
            self._eagerly(e)
            step.opt_step()                                 # the same gradients
            return out
        if self.seconds is None:
            out[0].item()                                   # wait for the first step's kernels
            self.seconds = time.perf_counter() - t0
        return out

    def _eagerly(self, error):
        """Compiling failed: go on eagerly (one line says why; the compiled graphs and their
        memory freed), or, under torchrun where the processes must agree, stop."""
        cause = f'{type(error).__name__}: {(str(error).strip().splitlines() or [""])[0][:200]}'
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise RunError(f'torch.compile failed ({cause}); run again with --compile off') \
                from None
        print(f'warning: torch.compile failed ({cause}); continuing eagerly (--compile off '
              'skips compiling)', file=sys.stderr, flush=True)
        self.mode, self.fallback = None, cause
        torch._dynamo.reset()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()                        # CUDA graphs' memory pools


def gate_stats(info):
    """(activation rate, MACs % of the dense net, share of polarized p), a (3,) float64 tensor."""
    p = torch.cat(info.p, 1)
    return torch.stack([torch.cat(info.z, 1).double().mean(),
                        100 * (info.macs / info.max_macs).mean(),
                        gc.polarized(p).double().mean()])


def averages(stats, batches):
    """Per-batch gate statistics summed over an epoch -> their means (NaN for a dense net)."""
    return (stats / batches).tolist() if batches else [math.nan] * 3


def progress(epoch, step, epochs, steps):
    """Share of training done at `step` of `epoch` (both from 0): 0 at the first step, 1 at
    the last, what the polarization ramp reads."""
    return (epoch * steps + step) / max(epochs * steps - 1, 1)


# ----------------------------------------------------------------------------- the epoch

class Divergence:
    """The first step whose loss is not finite, watched without making the host wait for the
    GPU at every step: the step number stays on the device; check() reads the copy its
    previous call started, waiting for that copy if it has not landed yet (so the host runs
    at most two check spans ahead of the GPU and a bad loss is seen within them), or reads
    it at once (wait=True, at the end of an epoch). A bad loss stops the run (RunError)
    naming the step."""

    def __init__(self, device):
        self.bad = torch.full((), -1, dtype=torch.long, device=device)
        self.host = torch.full((), -1, dtype=torch.long, pin_memory=device.type == 'cuda')
        self.landed = None                                  # the CUDA event after a copy

    def see(self, i, loss):
        self.bad = torch.where((self.bad < 0) & ~torch.isfinite(loss), i, self.bad)

    def check(self, epoch, wait=False):
        if wait or self.bad.device.type != 'cuda':
            step = int(self.bad)
        else:
            step = -1
            if self.landed is not None:
                self.landed.synchronize()                   # at once, unless the GPU lags
                step = int(self.host)
            self.host.copy_(self.bad, non_blocking=True)
            self.landed = torch.cuda.Event()
            self.landed.record()
        if step >= 0:
            raise RunError(f'the loss is not finite at epoch {epoch}, step {step + 1}: training '
                           'diverged (try a lower --lr); the last good checkpoint is kept and '
                           'nothing is exported')


CHECK_EVERY = 20          # steps between checks for a non-finite loss (each check syncs)


def train_epoch(step, batches, progress, epoch, steps, log=print):
    """One epoch of `steps` batches through `step` (a TrainStep). `progress(i)` is the share
    of training done at step i. A status line (step, loss, img/s, ETA) goes to `log` every
    cli.PROGRESS_SECONDS. A loss that is not finite stops the run (RunError) within
    CHECK_EVERY steps (two such spans on CUDA, whose host never waits for it), naming the step
    where it began; nothing of this epoch is saved. Under torchrun the statistics are averaged
    over all processes.
    Returns dict(ce, gate_loss, train_acc, rate, macs, polarized, images, seconds, first_loss)."""
    step.model.train()
    device = next(step.model.parameters()).device
    t0, n, stats, gated, first = time.perf_counter(), 0, 0, 0, None
    sums = torch.zeros(3, device=device)                    # CE, gate loss, correct: no sync
    bad = Divergence(device)
    ramp = torch.tensor([progress(i) for i in range(max(steps, 1))], device=device)
    shown = t0
    for i, (xb, yb) in enumerate(batches):
        if i % CHECK_EVERY == 0:
            bad.check(epoch)
        if time.perf_counter() - shown > cli.PROGRESS_SECONDS and i < steps:
            shown, spent = time.perf_counter(), time.perf_counter() - t0
            log(f'  epoch {epoch} step {i}/{steps}  loss {sums[0].item() / max(n, 1):.3f}  '
                f'{n / spent:.0f} img/s  ETA {cli.clock(spent * (steps - i) / max(i, 1))}',
                flush=True)
        compiling = step.mode and step.compiled.seconds is None
        loss, ce, gl, correct, info_stats = step(xb, yb, ramp[min(i, len(ramp) - 1)])
        if compiling and step.mode:                         # else it said why it fell back
            log(f'  compiled the training step (torch.compile mode {step.mode}): first step '
                f'{step.compiled.seconds:.1f} s', flush=True)
        bad.see(i, loss)
        first = loss.clone() if first is None else first
        sums += torch.stack([ce * len(yb), gl * len(yb), correct])
        n += len(yb)
        if info_stats is not None:
            stats, gated = stats + info_stats, gated + 1
    if n == 0:
        raise RunError(f'epoch {epoch} had no training batch: the data set is smaller than '
                       'the batch')
    bad.check(epoch, wait=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        totals = torch.cat([sums.double(), torch.tensor([n, gated], device=device).double(),
                            torch.as_tensor(stats, device=device).double().expand(3)])
        torch.distributed.all_reduce(totals)                # every rank's images count
        sums, n, gated, stats = totals[:3], int(totals[3]), int(totals[4]), totals[5:]
    ce, gl, correct = (sums / n).tolist()
    rate, macs, polar = averages(stats, gated)
    return dict(ce=ce, gate_loss=gl, train_acc=100 * correct, rate=rate, macs=macs,
                polarized=polar, images=n, seconds=time.perf_counter() - t0,
                first_loss=first.item())


ROW = '{:>5} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>7} {:>8} {:>8}'
HEADER = ('epoch', 'lr', 'CE', 'gate', 'train%', 'test%', 'rate', 'MACs%', 'polar', 'sec', 'img/s',
          'thrMACs%')


def print_row(epoch, lr, m, test_acc, test_macs, images_per_s):
    """One epoch's row (a test not run this epoch: '-')."""
    test = '-' if test_acc is None else f'{test_acc:.2f}'
    print(ROW.format(epoch, f'{lr:.4f}', f'{m["ce"]:.3f}', f'{m["gate_loss"]:.4f}',
                     f'{m["train_acc"]:.2f}', test, f'{m["rate"]:.3f}',
                     f'{m["macs"]:.1f}', f'{m["polarized"]:.2f}', f'{m["seconds"]:.1f}',
                     f'{images_per_s:.0f}', '-' if test_macs is None else f'{test_macs:.1f}'),
          flush=True)


# ----------------------------------------------------------------------------- fit

def fit(model, args, *, epochs, batches, steps, evaluate, weight_decay, milestones,
        gate_loss, autocast, mode=None, warmup=False, folder=None, gen=None, scaler=None,
        net=None, log=print, phase=None, after_epoch=None, test_column='test%', distill=None):
    """Train `model` for `epochs` (4.1): SGD over gc.param_groups (optimizer(): the lr and the
    gate recipe from args), the weights' lr / 10 at each milestone, loss = CE [+ gate_loss(
    info, progress) for a gated net] through TrainStep (compiled with `mode`).
        batches(epoch) -> the epoch's `steps` (x, y) batches, in the order `gen` draws
        evaluate(epoch) -> the epoch's test items, dict(test_acc=..., test_macs=..., ...), or
                           None (no test this epoch)
        after_epoch(epoch) -> more items for the epoch's row (ImageNet: unreadable images)
    folder (run_folder.RunFolder, or None: nothing kept) resumes the run when it holds one,
    then keeps args.json, each epoch's checkpoint and metrics line; rows are printed where
    it writes (rank 0 under torchrun). `net` is what the forward calls (a DDP wrapper);
    `distill`: distillation(). -> the last epoch's row."""
    opt, sched = optimizer(model, args, weight_decay=weight_decay, milestones=milestones,
                           warmup=warmup, epochs=epochs)
    start, best, last = 0, -1.0, None
    resumed = folder.resume(model, opt, sched, gen=gen, scaler=scaler) if folder else None
    if resumed:
        start, best, last = resumed
        log(f'{phase + ": " if phase else ""}resumed from {folder}/last.pt after epoch {start}')
    writes = folder is None or folder.writes
    if folder:
        folder.begin(args)
    step = TrainStep(model, opt, gate_loss, autocast, mode=mode, scaler=scaler, net=net,
                     distill=distill)
    log(ROW.format(*HEADER[:5], test_column, *HEADER[6:]))
    saved = f'last checkpoint: epoch {start} in {folder}' if start else 'nothing saved yet'
    epoch = start
    try:
        for epoch in range(start, epochs):
            m = train_epoch(step, batches(epoch), epoch=epoch + 1, steps=steps, log=log,
                            progress=lambda i: progress(epoch, i, epochs, steps))
            m.update(after_epoch(epoch) if after_epoch else {})
            lr = float(opt.param_groups[0]['lr'])
            sched.step()
            test = evaluate(epoch) or dict(test_acc=None, test_macs=None)
            last = dict(**({'phase': phase} if phase else {}), epoch=epoch + 1, lr=lr, **m,
                        **test, images_per_s=m['images'] / m['seconds'])
            if writes:
                print_row(epoch + 1, lr, m, test['test_acc'], test['test_macs'],
                          last['images_per_s'])
            improved = test['test_acc'] is not None and test['test_acc'] > best
            best = max(best, test['test_acc']) if improved else best
            if folder:
                saved = f'last checkpoint: epoch {epoch + 1} in {folder}'
                folder.save_epoch(model, opt, sched, epoch=epoch + 1, best=best, args=args,
                                  metrics=last, improved=improved, gen=gen, scaler=scaler)
    except KeyboardInterrupt:
        raise cli.Interrupted(f'in epoch {epoch + 1}', saved) from None
    except RuntimeError as e:                               # CUDA's or the CPU's OOM
        if not cli.out_of_memory(e):
            raise
        graphs = ', or --compile off (CUDA graphs keep memory pools of their own)' \
            if step.mode else ''
        raise RunError(f'out of memory in epoch {epoch + 1}: lower --batch-size (or '
                       f'--dense-batch-size){graphs}; the last checkpoint is kept') from None
    return last


def fit_images(model, data, args, *, batch_size, gen, autocast, test_each_epoch=True, **kw):
    """fit() on a cifar_data.Images set: its augmented batches in gen's order, its test set
    every epoch (test_each_epoch=False: never; the caller tests). -> the last epoch's row."""
    epochs = kw['epochs']
    phase = kw.get('phase') or 'train'
    print(f"{phase}: {epochs} epochs, batch {batch_size}, lr {args.lr} / 10 at "
          f"{kw['milestones']}" + (f", run dir {kw['folder']}" if kw.get('folder') else ''))

    def test(epoch):
        if not test_each_epoch:
            return None
        acc, rate, macs, _, _ = evaluate(model, data, autocast)
        return dict(test_acc=acc, test_rate=rate, test_macs=macs)
    return fit(model, args, batches=lambda epoch: data.train_batches(batch_size, gen),
               steps=len(data.x_train) // batch_size, evaluate=test, gen=gen,
               autocast=autocast, **kw)


class Evaluation(NamedTuple):
    """What evaluate() measures on a test set."""
    acc: float                  # top-1 %
    rate: float                 # gate activation rate (NaN for a net without gates)
    macs: float                 # MACs % of the dense net
    polarized: float            # share of polarized gate probabilities
    predictions: torch.Tensor   # (N,) the predicted classes, in the test set's order


@torch.no_grad()
def evaluate(model, data, autocast):
    """Accuracy % on data's test set (cifar_data.Images) and (rate, MACs %, polarized) under
    the model's current inference strategy, and the predictions -> Evaluation."""
    model.eval()
    correct, stats, batches, predictions = 0, 0, 0, []
    for xb, yb in data.test_batches():
        with autocast():
            out = model(xb)
        logits, info = gc.split_output(out)
        predictions.append(logits.argmax(1))
        correct += (predictions[-1] == yb).sum()
        if info is not None:
            stats, batches = stats + gate_stats(info), batches + 1
    return Evaluation(100 * correct.item() / len(data.x_test), *averages(stats, batches),
                      torch.cat(predictions))


