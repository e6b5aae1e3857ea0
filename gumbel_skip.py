"""Conditional computation that really skips work (1.1, 5): gate decisions of the paper's
dynamic gates and DenseNet exits turned into computation not done, for one input at a time.

    SkipNet(model)         dynamic gates -> batch-1 inference that runs only the on channels
    early_exit(model, x)   DenseNet exits -> a batch split, images that leave skip later blocks
    exit_report(model, b)  Table 5: exits taken, accuracies, MACs spent and wall time

Each computes what threshold inference computes in the masked network, and spends the
MACs its GateInfo.macs counts (both tested). Static gates deploy through gumbel_export.prune.
"""
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:                                                    # beside gumbel_channels, or in a package
    from . import gumbel_channels as gc
    from . import gumbel_export as ge
except ImportError:
    import gumbel_channels as gc
    import gumbel_export as ge

__all__ = ['SkipNet', 'early_exit', 'exit_report']


# ----------------------------------------------------------------------------- skipping (1.1)

def _pick(t, i, dim=0):
    """t restricted to indices i along dim (None keeps all)."""
    return t if i is None else t.index_select(dim, i)


def _shortcut_folded(downsample):
    """A (conv, BN) Sequential shortcut (torchvision's projection) as one biased conv; any
    other shortcut (or None) as it is."""
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2 and isinstance(
            downsample[0], nn.Conv2d) and isinstance(downsample[1], nn.BatchNorm2d):
        return ge.folded_conv(*downsample)
    return downsample


class _LeanGate(nn.Module):
    """A gate's threshold decision for one input, with as little work as it allows.
    Static: the on channels, fixed. Dynamic: BN folded into the first linear map, and one
    ge.logit difference per channel instead of two logits (equal decisions, up to rounding at
    the threshold itself):
        p > tau    iff    d = w1 - w0 > ge.logit(tau)"""

    def __init__(self, gate):
        super().__init__()
        self.static = isinstance(gate, gc.StaticGate)
        if self.static:
            self.register_buffer('on', gate.kept().nonzero().flatten())
            return
        bn, fc2 = gate.bn, gate.fc2
        scale = ge.bn_scale(bn)
        w = fc2.weight.view(gate.channels, 2, -1)                          # (C, (off, on), hidden)
        b = fc2.bias.view(gate.channels, 2)
        self.register_buffer('w1', (gate.fc1.weight * scale[:, None]).contiguous())
        self.register_buffer('b1', bn.bias - bn.running_mean * scale)
        self.register_buffer('wd', (w[:, 1] - w[:, 0]).contiguous())
        self.register_buffer('bd', b[:, 1] - b[:, 0] - ge.logit(gate.tau))

    def forward(self, x):                                   # -> indices of the on channels
        if self.static:
            return self.on
        pooled = x.sum((0, 2, 3))                           # the mean's 1/HW: in the product
        h = torch.addmv(self.b1, self.w1, pooled, alpha=1 / x[0, 0].numel()).relu_()
        return torch.addmv(self.bd, self.wd, h).relu_().nonzero().view(-1)   # d > 0


class _SkipBlock(nn.Module):
    """A gated block for one input at a time, running only the channels its gates keep.
    The gates decide (threshold inference), then the convs run on the sliced weights of the
    on channels, BN folded in; a conv with nothing on at either side is a ge.Constant."""

    def __init__(self, block):
        super().__init__()
        self.bottleneck = isinstance(block, gc.Bottleneck)
        self.downsample = _shortcut_folded(block.downsample)
        for name in ('gate', 'gate1', 'gate2'):
            g = getattr(block, name, None)
            setattr(self, name, None if g is None else _LeanGate(g))
        bns = [block.bn1, block.bn2] + ([block.bn3] if self.bottleneck else [])
        self.convs = nn.ModuleList(ge.folded_conv(c, bn).requires_grad_(False)    # a snapshot
                                   for c, bn in zip(gc.branch_convs(block), bns))
        self.empty = nn.ModuleList(ge.Constant(c, None, 0) for c in self.convs)

    def _conv(self, k, x, i_in=None, i_out=None):
        """Conv k (BN folded in) from the input channels i_in to the outputs i_out (indices;
        None: all)."""
        conv = self.convs[k]
        w, b = _pick(_pick(conv.weight, i_out), i_in, 1), _pick(conv.bias, i_out)
        if w.shape[0] == 0 or w.shape[1] == 0:
            return self.empty[k](x, b)
        return F.conv2d(x, w, b, conv.stride, conv.padding)

    def forward(self, x):                                                   # x: (1, C, H, W)
        identity = x if self.downsample is None else self.downsample(x)
        if self.gate is not None and len(self.gate(x)) == 0:               # layer gate off
            return F.relu(identity)
        i1, i2 = (None if g is None else g(x) for g in (self.gate1, self.gate2))  # None: all
        a = F.relu_(self._conv(0, x, i_out=i1))
        if self.bottleneck:
            a = F.relu_(self._conv(1, a, i1, i2))
            return F.relu_(self._conv(2, a, i_in=i2).add_(identity))
        return F.relu_(self._conv(1, a, i_in=i1).add_(identity))


class SkipNet(nn.Module):
    """Conditional computation that really skips work (1.1): one input, threshold inference.
    For x (1, 3, H, W), every block runs its convs on the sliced weights of the channels its
    gates turn on, and an off layer gate skips its branch. A snapshot of a gated net in
    evaluation mode, BN folded into the convs and gates (NOTES.md 16). Returns the masked
    forward's logits and spends the MACs GateInfo.macs counts less hidden x C per dynamic
    gate (one ge.logit difference per channel instead of two)."""

    def __init__(self, model):
        super().__init__()
        if not gc.gates(model):
            raise ValueError('model must be a gated network (gating="dynamic" or "static")')
        if not isinstance(model, gc.ResNet):
            raise ValueError(f'SkipNet runs the gated ResNets of gumbel_channels; a '
                             f'{type(model).__name__} has static gates: its fast form is '
                             'gumbel_export.prune(model)')
        model = copy.deepcopy(model).eval()
        self.stem = nn.Sequential(ge.folded_conv(model.conv1, model.bn1), model.relu, model.maxpool)
        self.blocks = nn.ModuleList(_SkipBlock(b) for b in model.blocks())
        self.avgpool = model.avgpool
        self.fc = model.fc
        self.eval()

    @torch.inference_mode()
    def forward(self, x):
        if x.shape[0] != 1:
            raise ValueError(f'x must hold one input (batch size 1), got batch size {x.shape[0]}')
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------- early exits (5)

@torch.no_grad()
def early_exit(model, x, use_exits=True):
    """Early-exit inference (5) that splits the batch -> (logits, exit taken per image).
    A DenseNetExits in evaluation mode: images leaving at exit k (their gate's threshold
    decision) do not run later blocks; the final classifier's index is len(exits).
    use_exits=False runs every image to the end."""
    if model.training:
        raise ValueError('model must be in evaluation mode (model.eval()) for early_exit')
    x = model.conv1(x)
    n_exits = len(model.exits) if use_exits else 0
    rows = torch.arange(len(x), device=x.device)            # which images are still running
    logits = x.new_zeros(len(x), model.fc.out_features)
    taken = torch.full((len(x),), n_exits, dtype=torch.long, device=x.device)
    for k in range(3):
        x = model.stage(k, x)
        if k >= n_exits:
            continue
        out, z, _ = model.exits[k](x)
        leave = z[:, 0] > 0
        logits[rows[leave]], taken[rows[leave]] = out[leave].to(logits.dtype), k
        rows, x = rows[~leave], x[~leave]
        if len(rows) == 0:
            return logits, taken
    logits[rows] = model.head(x).to(logits.dtype)
    return logits, taken


def _synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@torch.no_grad()
def exit_report(model, batches):
    """Table 5 for an early-exit network over (images, labels) batches -> dict.
    Per exit (the final classifier last): the share of images that leave there, its
    classifier's accuracy on all images and on the images it took. Also the MACs the batch
    split spends (FlopCounterMode / 2) beside the accounting's, and its wall time beside
    running every image to the end. Evaluation mode, restored after."""
    counts, n, macs, seconds = 0, 0, torch.zeros(3, dtype=torch.float64), torch.zeros(2)
    with gc.evaluation(model):
        for x, y in batches:
            _, info = model(x)
            _, taken = early_exit(model, x)
            counts = counts + torch.tensor([[(taken == k).sum(), (logits.argmax(1) == y).sum(),
                                             ((logits.argmax(1) == y) & (taken == k)).sum()]
                                            for k, logits in enumerate(info.exit_logits)])
            macs += torch.tensor([ge.counted_macs(lambda t: early_exit(model, t), x),
                                  info.macs.sum().item(), info.max_macs * len(x)],
                                 dtype=torch.float64)
            for i, use_exits in enumerate((True, False)):
                _synchronize(x.device)          # each path timed to its GPU work's end
                t0 = time.perf_counter()
                early_exit(model, x, use_exits)
                _synchronize(x.device)
                seconds[i] += time.perf_counter() - t0
            n += len(x)
    exits = [dict(exit=k, share=took / n, acc_all=hit / n,
                  acc_taken=hit_taken / took if took else math.nan)
             for k, (took, hit, hit_taken) in enumerate(counts.tolist())]
    counted, accounted, full = macs.tolist()
    with_exits, to_the_end = seconds.tolist()
    return dict(exits=exits, counted_macs=counted, accounted_macs=accounted, full_macs=full,
                seconds=with_exits, seconds_to_the_end=to_the_end)
