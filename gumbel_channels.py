"""Channel selection using Gumbel Softmax (Herrmann, Bowen and Zabih, ECCV 2020).

Reading map, in the paper's order (section -> where it lives here):

    1.1, 3.2  straight-through Gumbel estimator     straight_through_gumbel, gate_probability
    1.2       the batch activation loss, Eq. (1)    batch_activation_loss
    2.1       AIG's per-gate loss                   per_gate_loss
    3.1       Property 1; polarization              expected_activation_loss, polarized
    3.2       static and dynamic gates; decay       StaticGate, DynamicGate, param_groups
    3.3       inference strategies                  set_inference, evaluation, ensemble_predict
    3.4       gated blocks; FLOPs(Z); L_FLOPs       BasicBlock, Bottleneck, block_macs, flops_loss
    4.1       BN recalibration                      recalibrate_bn
    4.2, 4.3  gated ResNets: ImageNet, CIFAR-10     gate_resnet, resnet_cifar (resnet56 ...)
    4.4       channel vs layer granularity          the blocks' granularity='channel'/'layer'
    5         DenseNet early exits                  DenseNetExits, exit_net_macs

    model = resnet56(gating='static')                     # dense weights load (strict=False)
    logits, info = model(x)                               # training: gates sampled per image
    loss = F.cross_entropy(logits, y) + flops_loss(info, t=0.5)
    set_inference(model, 'threshold'); model.eval()       # Z = 1 iff p > 0.5 (3.3)
    recalibrate_bn(model, batches)                        # 4.1, then evaluate

The file itself runs bottom-up, each part using only what is above it: estimator, gates,
blocks, FLOPs(Z), networks, losses, training settings, inference, BN recalibration, early
exits; what is not in the paper sits under its own banner. A gated network returns (logits,
GateInfo), a dense one logits. Decisions Z multiply
activations after BN and ReLU, so an off channel adds exactly zero downstream: the masked
network computes what a physically pruned one would (gumbel_export.py prunes it).
"""
import contextlib
import copy
import itertools
import math
from typing import Mapping, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'INIT_P', 'POLAR', 'straight_through_gumbel', 'gate_probability', 'Decision',
    'StaticGate', 'DynamicGate', 'gates', 'GATE_NAMES', 'decide', 'ShortcutA', 'BasicBlock',
    'Bottleneck',
    'conv_macs', 'branch_convs', 'basic_block_macs', 'bottleneck_macs', 'block_macs',
    'resnet_macs', 'GateInfo', 'split_output', 'ResNet', 'resnet_cifar', 'resnet20',
    'resnet32', 'resnet44', 'resnet56', 'resnet110', 'gate_resnet', 'batch_activation_loss',
    'flops_loss', 'per_gate_loss', 'expected_activation_loss', 'polarized', 'polarization_loss',
    'param_groups', 'set_sampling', 'set_inference', 'evaluation', 'ensemble_predict',
    'recalibrate_bn', 'exit_net_macs', 'DenseNetExits', 'densenet_cifar', 'GATINGS',
    'GRANULARITIES', 'STRATEGIES', 'BRANCH_MACS']

INIT_P = 0.98            # initial on-probability; the official code's logits (0.1, 4) give 0.980
POLAR = 0.01             # a gate is polarized when p < POLAR or p > 1 - POLAR
GATINGS = (None, 'static', 'dynamic')
GRANULARITIES = ('channel', 'layer')
STRATEGIES = ('threshold', 'sample', 'all_on')


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {value!r}')


def _check_t(t):
    if not isinstance(t, torch.Tensor) and not 0 < t <= 1:     # a tensor: a scheduled target
        raise ValueError(f't (target rate) must be in (0, 1], got {t!r}')


# ----------------------------------------------------------------------------- estimator

def _at_least_float(x):
    """x in float32 at least: bf16 logits under autocast are raised, float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def straight_through_gumbel(logits, temperature=1.0, generator=None, hard=True):
    """Straight-through Gumbel-softmax for on/off gates (1.1, 3.2), at least float32.
        logits (..., 2) = (w0 "off", w1 "on"),   g0, g1 ~ Gumbel(0, 1),   T = temperature
        forward:   Z = [w1 + g1 > w0 + g0]                   in {0., 1.}, shape (...)
        backward:  dZ := d sigmoid((w1 - w0 + g1 - g0) / T)  (the paper fixes T = 1)
    hard=False returns the soft relaxation sigmoid((w1 - w0 + g1 - g0) / T) itself (3.2)."""
    if logits.shape[-1] != 2:
        raise ValueError('logits must have last dimension 2 (off, on), '
                         f'got shape {tuple(logits.shape)}')
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature!r}')
    logits = _at_least_float(logits)
    rng = {} if generator is None else {'generator': generator}  # None breaks torch.compile
    u = torch.rand(logits.shape[:-1], dtype=logits.dtype, device=logits.device, **rng)
    u = u.clamp(min=torch.finfo(u.dtype).tiny)                  # U = 0 would give -inf noise
    # g1 - g0 ~ Logistic(0, 1) = log U - log(1 - U): one uniform draw, not two (NOTES.md 1)
    y = logits[..., 1] - logits[..., 0] + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid(y / temperature)
    if not hard:
        return soft
    # exactly 0/1 forward (hard - soft + soft could round), soft's gradient backward (NOTES.md 2)
    return (y > 0).to(y.dtype) + (soft - soft.detach())


def gate_probability(logits):
    """The on-probability of logits (..., 2) = (w0, w1) (3.2), at least float32.
        p = P(Z = 1) = sigmoid(w1 - w0) = 1 / (1 + exp(w0 - w1))
    The one place p is computed."""
    logits = _at_least_float(logits)
    return torch.sigmoid(logits[..., 1] - logits[..., 0])


# ----------------------------------------------------------------------------- gates

def _init_logits(channels, init_p):
    """(C, 2) logits (-l/2, l/2), l = logit(init_p): the minimum-norm pair for p (NOTES.md 3)."""
    if not 0 < init_p < 1:
        raise ValueError(f'init_p must be in (0, 1), got {init_p!r}')
    half = math.log(init_p / (1 - init_p)) / 2
    return torch.tensor([-half, half]).repeat(channels, 1)


class Decision(NamedTuple):
    """What a gate module decides for a batch; blocks return {gate name: Decision}."""
    z: torch.Tensor            # (B, C) 0/1: channel c of sample b on
    p: torch.Tensor            # (B, C): its on-probability


class _Gate(nn.Module):
    """The settings both kinds of gate share, shown in repr: how they decide (3.3), sample (3.2).
    Training samples; evaluation follows `strategy`: 'threshold' at `tau`, 'sample', 'all_on'."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.strategy = 'threshold'
        self.tau = 0.5
        self.soft = False
        self.temperature = 1.0

    def extra_repr(self):
        return (f'channels={self.channels}, strategy={self.strategy!r}, tau={self.tau}, '
                f'soft={self.soft}, temperature={self.temperature}')

    def decide(self, logits):
        """logits (B, C, 2) -> Decision(z, p), each (B, C)."""
        p = gate_probability(logits)
        if self.training or self.strategy == 'sample':
            return Decision(straight_through_gumbel(logits, self.temperature,
                                                    hard=not self.soft), p)
        if self.strategy == 'all_on':
            return Decision(torch.ones_like(p), p)
        return Decision(self.keep(p).to(p.dtype), p)

    def keep(self, p):
        """Threshold inference (3.3): Z = 1 iff p > tau, strictly (NOTES.md 11)."""
        return p > self.tau

    def kept(self):
        """A static gate's channels on under threshold inference, (C,) bool."""
        return self.keep(gate_probability(self.logits))


class StaticGate(_Gate):
    """Data-independent gates (pruning, 3.2): two free logits per channel.
    forward(x) -> Decision(z, p), each (B, C); x is only read for its batch size."""

    def __init__(self, channels, init_p=INIT_P):
        super().__init__(channels)
        self.macs = 0
        self.per_batch = False                    # True: one draw per batch (NOTES.md 17)
        self.logits = nn.Parameter(_init_logits(channels, init_p))          # (C, 2)

    def extra_repr(self):
        return f'{super().extra_repr()}, per_batch={self.per_batch}'

    def forward(self, x):
        z, p = self.decide(self.logits.expand(1 if self.per_batch else x.shape[0], -1, -1))
        return Decision(z.expand(x.shape[0], -1), p.expand(x.shape[0], -1))


class DynamicGate(_Gate):
    """Data-dependent gates (conditional computation, 3.2), two logits per channel from
        x -> global average pool -> 1-d conv -> BN -> ReLU -> 1-d conv
    forward(x: (B, C_in, H, W)) -> Decision(z, p), each (B, channels)."""

    def __init__(self, in_channels, channels, hidden=16, init_p=INIT_P):
        super().__init__(channels)
        self.macs = in_channels * hidden + hidden * 2 * channels            # per sample
        # the 1-d convs have kernel 1 on the pooled (C_in,) vector: linear maps (NOTES.md 5)
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)               # BN follows
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 2 * channels)      # outputs 2c, 2c + 1: channel c's (w0, w1)
        with torch.no_grad():
            self.fc2.bias.copy_(_init_logits(channels, init_p).flatten())   # (off, on) pairs

    def forward(self, x):
        logits = self.fc2(F.relu(self.bn(self.fc1(x.mean((2, 3))))))        # (B, 2C)
        return self.decide(logits.view(x.shape[0], self.channels, 2))


def _make_gate(gating, in_channels, channels, init_p):
    _check_choice('gating', gating, GATINGS)
    if gating is not None:
        return StaticGate(channels, init_p) if gating == 'static' else \
            DynamicGate(in_channels, channels, init_p=init_p)


def gates(model):
    """Every gate module of `model`, in forward order (the order of GateInfo.z)."""
    return [m for m in model.modules() if isinstance(m, _Gate)]


# ----------------------------------------------------------------------------- blocks

def _mask(x, decision):
    """x (B, C, H, W) times a Decision's z (B, C); None: all on."""
    return x if decision is None else x * decision.z[:, :, None, None].to(x.dtype)


GATE_NAMES = ('gate1', 'gate2', 'gate')   # a block's gates in GateInfo order (None: unused)


def decide(block, x) -> Mapping[str, Decision]:
    """The decisions of a block's gates on its input x: {name: Decision}, in GATE_NAMES order
    (the order of GateInfo.z); a gate that is None (unused, or dropped) is all on."""
    return {name: gate(x) for name in GATE_NAMES if (gate := getattr(block, name)) is not None}


class ShortcutA(nn.Module):
    """He et al.'s option A: subsample by `stride`, zero-pad channels up to `planes`."""

    def __init__(self, planes, stride=2):
        super().__init__()
        self.planes = planes
        self.stride = stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        pad = self.planes - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """The basic residual block with gates (3.4) -> (out, {gate name: Decision}).
        3x3 conv -> BN -> ReLU -> [gate1] -> 3x3 conv -> BN, + shortcut, ReLU
    granularity 'channel': gate1 on conv1's output channels; 'layer': one `gate` that keeps or
    drops the whole branch (the block is then its shortcut, ReLU applied)."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, gating=None,
                 granularity='channel', init_p=INIT_P):
        super().__init__()
        _check_choice('granularity', granularity, GRANULARITIES)
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        channel = granularity == 'channel'
        self.gate1 = _make_gate(gating, inplanes, planes, init_p) if channel else None
        self.gate2 = None
        self.gate = None if channel else _make_gate(gating, inplanes, 1, init_p)

    def forward(self, x):                                       # x (B, C_in, H, W)
        d = decide(self, x)
        out = self.relu(self.bn1(self.conv1(x)))                # (B, planes, H', W')
        out = self.bn2(self.conv2(_mask(out, d.get('gate1'))))  # (B, planes, H', W')
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(_mask(out, d.get('gate')) + identity), d   # layer gate: AIG's place


class Bottleneck(nn.Module):
    """torchvision's bottleneck (ResNet v1.5) with gates (3.4) -> (out, {gate name: Decision}).
        1x1 conv -> [gate1] -> 3x3 conv (stride) -> [gate2] -> 1x1 conv (x4), + shortcut, ReLU
    `width`: the inner width (default planes); granularity as in BasicBlock."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, gating=None,
                 granularity='channel', init_p=INIT_P, width=None):
        super().__init__()
        _check_choice('granularity', granularity, GRANULARITIES)
        width = width or planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        channel = granularity == 'channel'
        # both channel gates read the block input: every decision is known before the block
        # runs, so inference can skip work (NOTES.md 4)
        self.gate1 = _make_gate(gating, inplanes, width, init_p) if channel else None
        self.gate2 = _make_gate(gating, inplanes, width, init_p) if channel else None
        self.gate = None if channel else _make_gate(gating, inplanes, 1, init_p)

    def forward(self, x):                                       # x (B, C_in, H, W)
        d = decide(self, x)
        out = self.relu(self.bn1(self.conv1(x)))                # (B, width, H, W)
        out = self.relu(self.bn2(self.conv2(_mask(out, d.get('gate1')))))  # (B, width, H', W')
        out = self.bn3(self.conv3(_mask(out, d.get('gate2'))))  # (B, 4 planes, H', W')
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(_mask(out, d.get('gate')) + identity), d   # layer gate: AIG's place


# ----------------------------------------------------------------------------- FLOPs(Z) (3.4)
# Conv and linear multiply-accumulates per sample: ints without gates, (B,) float64 given
# decisions (float64 keeps them exact: NOTES.md 7). An off channel removes its conv's
# output and the next conv's input; an off layer gate removes the branch.

def _out_hw(m, hw):
    """Spatial size after a Conv2d, MaxPool2d or Identity on an input of size hw."""
    if isinstance(m, nn.Identity):
        return tuple(hw)
    k, s, p, d = (nn.modules.utils._pair(v) for v in (m.kernel_size, m.stride, m.padding,
                                                       m.dilation))
    return tuple((h + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, h in enumerate(hw))


def conv_macs(conv, hw, n_in=None, n_out=None):
    """MACs per sample of `conv` on an input of size hw, n_in of its inputs and n_out of its
    outputs on (ints or (B,) tensors; default all):
        h_out * w_out * k_h * k_w * n_in * n_out
    0 when nothing is on at either side: such a conv computes a constant, its bias (or 0) at
    every output position, which is all the exporters run for it (gumbel_export.Constant)."""
    h, w = _out_hw(conv, hw)
    n_in = conv.in_channels // conv.groups if n_in is None else n_in
    n_out = conv.out_channels if n_out is None else n_out
    return h * w * conv.kernel_size[0] * conv.kernel_size[1] * n_in * n_out


def branch_convs(block):
    """The convs of a block's residual branch, in order."""
    return [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])


def _z(decision):
    """The (B, C) z of a Decision, or a bare z as given."""
    return decision.z if isinstance(decision, Decision) else decision


def _on(decisions, name):
    """(B,) float64 channels on of gate `name`; None: no such gate."""
    d = decisions.get(name)
    return None if d is None else _z(d).sum(1, dtype=torch.float64)


def basic_block_macs(block, sizes, decisions):
    """A BasicBlock's branch, sizes its convs' input sizes, n1 the channels gate1 keeps:
        conv_macs(conv1, n_out=n1) + conv_macs(conv2, n_in=n1)"""
    n1 = _on(decisions, 'gate1')
    return conv_macs(block.conv1, sizes[0], n_out=n1) + conv_macs(block.conv2, sizes[1], n_in=n1)


def bottleneck_macs(block, sizes, decisions):
    """A Bottleneck's branch, n1 and n2 the channels gate1 and gate2 keep:
        conv_macs(conv1, n_out=n1) + conv_macs(conv2, n1, n2) + conv_macs(conv3, n_in=n2)
    (with gate1 empty, conv3 still runs on the constant conv2 leaves; NOTES.md 15)"""
    n1, n2 = _on(decisions, 'gate1'), _on(decisions, 'gate2')
    return (conv_macs(block.conv1, sizes[0], n_out=n1) + conv_macs(block.conv2, sizes[1], n1, n2)
            + conv_macs(block.conv3, sizes[2], n_in=n2))


BRANCH_MACS = {BasicBlock: basic_block_macs, Bottleneck: bottleneck_macs}


def block_macs(block, hw, z=None):
    """FLOPs(Z) of one residual block on an input of size hw -> (MACs, output size).
        branch (x the layer gate's z) + shortcut + the gates' own MACs
    z: the block's decisions {gate name: Decision (or its z)}; None: the block without gates."""
    z = z or {}
    convs, sizes = branch_convs(block), [tuple(hw)]
    for conv in convs:
        sizes.append(_out_hw(conv, sizes[-1]))
    shortcut = 0 if block.downsample is None else sum(
        conv_macs(m, hw) for m in block.downsample.modules() if isinstance(m, nn.Conv2d))
    branch = BRANCH_MACS[type(block)](block, sizes, z)
    if z.get('gate') is not None:
        branch = branch * _z(z['gate'])[:, 0].double()
    return branch + shortcut + sum(getattr(block, name).macs for name in z), sizes[-1]


def _once(cache, hw, count):
    """count(hw), kept in `cache` per input size: MaxFLOPs is counted once per size."""
    if hw not in cache:
        cache[hw] = count(hw)
    return cache[hw]


def resnet_macs(model, hw, z=None):
    """FLOPs(Z) of a ResNet on inputs of size hw: stem, blocks, classifier.
    z: each block's decisions, as block_macs takes them; None: without gates (MaxFLOPs)."""
    macs = conv_macs(model.conv1, hw)
    hw = _out_hw(model.maxpool, _out_hw(model.conv1, hw))
    for k, block in enumerate(model.blocks()):
        m, hw = block_macs(block, hw, None if z is None else z[k])
        macs = macs + m
    return macs + model.fc.in_features * model.fc.out_features


# ----------------------------------------------------------------------------- networks

class GateInfo(NamedTuple):
    """What the losses need from a gated forward pass, one entry per gate module in z and p."""
    z: list                    # (B, C_i) 0/1 decisions; C_i = 1 for a layer or exit gate
    p: list                    # (B, C_i) on-probabilities
    macs: torch.Tensor         # (B,) float64 FLOPs(Z): each sample's MACs, the gates' own too
    max_macs: int              # MaxFLOPs: the MACs of the network without gates, this size
    exit_logits: Optional[list] = None    # an exit net's every classifier's logits, final last


def split_output(out):
    """(logits, GateInfo) of a gated network's output, (logits, None) of a dense one's."""
    return out if isinstance(out, tuple) else (out, None)


class ResNet(nn.Module):
    """A ResNet in torchvision's names -> logits (gating None) or (logits, GateInfo).
        conv1 -> bn1 -> ReLU -> maxpool -> layer1 .. layerN -> avgpool -> fc"""

    def __init__(self, conv1, bn1, maxpool, layers, fc, gating=None):
        super().__init__()
        self.conv1 = conv1
        self.bn1 = bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = maxpool
        self.num_stages = len(layers)
        for i, layer in enumerate(layers, 1):
            setattr(self, f'layer{i}', layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = fc
        self.gating = gating
        self._max_macs = {}                         # input size -> MaxFLOPs

    def max_macs(self, hw):
        """MaxFLOPs (3.4) at input size hw: the network without gates, computed once."""
        return _once(self._max_macs, tuple(hw), lambda size: resnet_macs(self, size))

    def blocks(self):
        for i in range(1, self.num_stages + 1):
            yield from getattr(self, f'layer{i}')

    def forward(self, x):
        hw = x.shape[-2:]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))    # (B, C_1, H', W')
        decisions = []                              # per block: {gate name: Decision}
        for block in self.blocks():
            x, d = block(x)
            decisions.append(d)
        logits = self.fc(torch.flatten(self.avgpool(x), 1))     # (B, classes)
        if self.gating is None:
            return logits
        every = [d for block in decisions for d in block.values()]
        macs = resnet_macs(self, hw, decisions) * x.new_ones(x.shape[0], dtype=torch.float64)
        return logits, GateInfo([d.z for d in every], [d.p for d in every], macs,
                                self.max_macs(hw))


def resnet_cifar(depth, num_classes=10, gating=None, granularity='channel', init_p=INIT_P):
    """CIFAR ResNet of depth 6n+2 (4.3; He et al. 2016, option-A shortcuts): 16/32/64 channels."""
    if not (isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0):
        raise ValueError(f'depth must be 6n+2, n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}')
    n, inplanes, layers = (depth - 2) // 6, 16, []
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        blocks = []
        for i in range(n):
            s = stride if i == 0 else 1
            shortcut = ShortcutA(planes, s) if s != 1 or inplanes != planes else None
            blocks.append(BasicBlock(inplanes, planes, stride=s, downsample=shortcut,
                                     gating=gating, granularity=granularity, init_p=init_p))
            inplanes = planes
        layers.append(nn.Sequential(*blocks))
    model = ResNet(_conv3x3(3, 16), nn.BatchNorm2d(16), nn.Identity(), layers,
                   nn.Linear(64, num_classes), gating)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    return model


def resnet20(**kw): return resnet_cifar(20, **kw)
def resnet32(**kw): return resnet_cifar(32, **kw)
def resnet44(**kw): return resnet_cifar(44, **kw)
def resnet56(**kw): return resnet_cifar(56, **kw)
def resnet110(**kw): return resnet_cifar(110, **kw)


def gate_resnet(model, gating, granularity='channel', init_p=INIT_P):
    """A copy of a torchvision ResNet (resnet18/34/50, wide_resnet, ...) with gated blocks (4.2).
    Dense weights keep torchvision's state_dict keys, so pretrained weights load; only the
    gates are new. Grouped or dilated convs are refused."""
    import torchvision
    if not isinstance(model, torchvision.models.ResNet):
        raise ValueError(f'model must be a torchvision.models.ResNet, got {type(model).__name__}')
    _check_choice('gating', gating, GATINGS)
    _check_choice('granularity', granularity, GRANULARITIES)
    model, layers = copy.deepcopy(model), []                # `model` itself is left as it was
    for name in ('layer1', 'layer2', 'layer3', 'layer4'):
        blocks = []
        for old in getattr(model, name):
            convs = [c for c in old.modules() if isinstance(c, nn.Conv2d)]
            if any(c.groups != 1 or c.dilation != (1, 1) for c in convs):
                raise ValueError('gate_resnet supports groups=1 and dilation=1 convs only')
            if isinstance(old, torchvision.models.resnet.Bottleneck):
                new = Bottleneck(old.conv1.in_channels, old.conv3.out_channels // 4,
                                 stride=old.conv2.stride, downsample=old.downsample,
                                 gating=gating, granularity=granularity, init_p=init_p,
                                 width=old.conv1.out_channels)
            elif isinstance(old, torchvision.models.resnet.BasicBlock):
                new = BasicBlock(old.conv1.in_channels, old.conv1.out_channels,
                                 stride=old.conv1.stride, downsample=old.downsample,
                                 gating=gating, granularity=granularity, init_p=init_p)
            else:
                raise ValueError(f'unknown block type {type(old).__name__} in {name}')
            missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
            assert not unexpected and all('gate' in k for k in missing), (missing, unexpected)
            new.to(next(old.parameters()))
            blocks.append(new)
        layers.append(nn.Sequential(*blocks))
    return ResNet(model.conv1, model.bn1, model.maxpool, layers, model.fc, gating)


# ----------------------------------------------------------------------------- losses

def batch_activation_loss(info, t):
    """Eq. (1): the batch activation loss, every gate i (each channel) and sample j in B.
        L_B = (t - Q)^2,    Q = 1 / (|B| |G|) sum_{i,j} Z_ij"""
    _check_t(t)
    q = torch.cat(info.z, dim=1).mean()                                     # (B, |G|) -> ()
    return (t - q) ** 2


def flops_loss(info, t):
    """3.4: the FLOPs loss, FLOPs(Z_j) the MACs sample j runs.
        L_FLOPs = (t - 1/|B| sum_j FLOPs(Z_j) / MaxFLOPs)^2"""
    _check_t(t)
    return ((t - (info.macs / info.max_macs).mean()) ** 2).float()


def per_gate_loss(info, targets):
    """2.1 (AIG): the per-gate loss, one target rate t_i per gate module i.
        L_G = 1/|G| sum_i (t_i - 1/|B| sum_j Z_ij)^2
    A channel-gate module's rate is its mean over channels and batch (NOTES.md 8)."""
    if len(targets) != len(info.z):
        raise ValueError(f'targets must give one rate per gate module ({len(info.z)}), '
                         f'got {len(targets)}')
    if not all(0 <= t <= 1 for t in targets):
        raise ValueError(f'targets must lie in [0, 1], got {list(targets)}')
    rates = torch.stack([z.mean() for z in info.z])
    return ((torch.as_tensor(targets, dtype=rates.dtype, device=rates.device) - rates) ** 2).mean()


def expected_activation_loss(p, t, batch_size):
    """Property 1 (3.1): E[L_B] of independent gates p (G,), Z_ij ~ Bernoulli(p_i) per sample.
        E[L_B] = (t - E[Q])^2 + Var(Q)
        E[Q] = mean_i p_i,    Var(Q) = sum_i p_i (1 - p_i) / (G^2 |B|)
    -> (bias_sq, variance); the variance is 0 only if every p_i is 0 or 1."""
    _check_t(t)
    g = p.numel()
    return (t - p.mean()) ** 2, (p * (1 - p)).sum() / (g * g * batch_size)


def polarized(p):
    """3.1: which on-probabilities are polarized (bool, p's shape).
        p < 0.01  or  p > 0.99"""
    return (p < POLAR) | (p > 1 - POLAR)


# ----------------------------------------------------------------------------- training

def param_groups(model, lr, weight_decay=1e-4, gate_decay=20.0, gate_lr_mult=1.0):
    """torch.optim parameter groups (3.2, 4.1): the gates' lr and (smaller) decay apart.
        dense:  lr,                  weight_decay
        gates:  lr * gate_lr_mult,   weight_decay * gate_decay / |G| / gate_lr_mult
    |G| the number of gates (channels, or blocks for layer gates); a dynamic gate's whole
    network counts as gate. SGD shrinks a parameter by lr * decay per step, so the gates
    keep the paper's per-step decay at any multiplier (NOTES.md 19). Why less decay (3.2):
        w0^2 + w1^2 = 1/2 ((w0 + w1)^2 + ln((1 - p) / p)^2),    p = sigmoid(w1 - w0)
    is smallest at p = 1/2, so decay works against polarization; it is summed over gates
    while the gate loss is averaged, hence / |G|."""
    found = gates(model)
    gate_ids = {id(q) for g in found for q in g.parameters()}
    dense = [q for q in model.parameters() if id(q) not in gate_ids]
    groups = [{'params': dense, 'lr': lr, 'weight_decay': weight_decay}]
    if found:
        n_gates = sum(g.channels for g in found)
        groups.append({'params': [q for g in found for q in g.parameters()],
                       'lr': lr * gate_lr_mult,
                       'weight_decay': weight_decay * gate_decay / n_gates / gate_lr_mult})
    return groups


def set_sampling(model, soft=False, temperature=1.0, per_batch=False):
    """How gates sample in training (3.2); returns model. soft=True: the soft relaxation,
    Z in (0, 1), instead of straight-through; the Gumbel temperature (the paper fixes 1);
    per_batch=True: static gates draw once per batch, not per sample (NOTES.md 17)."""
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature!r}')
    for g in gates(model):
        g.soft, g.temperature = soft, temperature
        if isinstance(g, StaticGate):
            g.per_batch = per_batch
    return model


# ----------------------------------------------------------------------------- not in the paper
# Our deviations that the training recipe uses (NOTES.md, deviations 17-20).

def polarization_loss(info):
    """Deviation (NOTES.md 20): each logit difference's mean distance from polarization.
        mean over gates (and samples) of max(0, logit(1 - POLAR) - |w1 - w0|)
    Every undecided gate moves toward its nearer pole at one pace, where Var(Q) of Property 1
    weighs a gate by (its MACs / MaxFLOPs)^2 and its 4p(1 - p) fades near the poles."""
    p = torch.cat(info.p, 1).clamp(1e-6, 1 - 1e-6)              # a finite logit, 0 gradient
    return F.relu(math.log((1 - POLAR) / POLAR) - (torch.log(p) - torch.log1p(-p)).abs()).mean()


# ----------------------------------------------------------------------------- inference

def set_inference(model, strategy='threshold', tau=0.5):
    """How gates decide in evaluation mode (3.3); returns model. Training always samples.
    'threshold': Z = 1 iff p > tau (deterministic); 'sample': as in training; 'all_on'."""
    _check_choice('strategy', strategy, STRATEGIES)
    if not 0 < tau < 1:
        raise ValueError(f'tau (threshold) must be in (0, 1), got {tau!r}')
    for g in gates(model):
        g.strategy, g.tau = strategy, tau
    return model


@contextlib.contextmanager
def evaluation(model, strategy=None):
    """with evaluation(model[, strategy]): evaluation mode, gates deciding by `strategy`
    (default their own); the mode and the gates' strategies are restored after."""
    found, was_training = gates(model), model.training
    saved = [g.strategy for g in found]
    model.eval()
    try:
        for g in found:
            g.strategy = strategy or g.strategy
        yield model
    finally:
        for g, old in zip(found, saved):
            g.strategy = old
        model.train(was_training)


@torch.no_grad()
def ensemble_predict(model, x, runs=8, vote=False):
    """An ensemble of `runs` stochastic passes of one network (3.3) -> (B, classes).
    The mean softmax, or with vote=True each class's share of the votes (argmax: the
    majority, NOTES.md 14). Evaluation mode, gates sampling; mode and strategies restored."""
    if runs < 1:
        raise ValueError(f'runs must be >= 1, got {runs!r}')
    total = 0
    with evaluation(model, 'sample'):
        for _ in range(runs):
            logits = split_output(model(x))[0]
            total = total + (F.one_hot(logits.argmax(1), logits.shape[1]).float() if vote
                             else logits.float().softmax(1))
    return total / runs


# ----------------------------------------------------------------------------- BN

@torch.no_grad()
def recalibrate_bn(model, batches):
    """Re-estimate every BatchNorm's running statistics from `batches` (4.1); returns model.
    `batches`: tensors, or tuples whose first item is the input; gates decide by the current
    inference strategy. The paper's lr-0 pass, as an exact cumulative average (NOTES.md 10);
    no parameter changes; the model's mode is restored."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:                             # checked before any statistic is reset
        raise ValueError('batches must yield at least one batch')
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    device = next(model.parameters()).device
    with evaluation(model):
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None                    # None: a cumulative average
            bn.train()
        try:
            for x in itertools.chain([first], batches):
                x = x[0] if isinstance(x, (tuple, list)) else x
                model(x.to(device, non_blocking=True))
        finally:
            for bn, m in zip(bns, momenta):
                bn.momentum = m
    return model


# ----------------------------------------------------------------------------- early exits (5)

class _DenseLayer(nn.Module):
    """DenseNet-BC layer, its output appended to its input.
        BN -> ReLU -> 1x1 conv (4k) -> BN -> ReLU -> 3x3 conv (k)"""

    def __init__(self, cin, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = _conv3x3(4 * growth, growth)

    def forward(self, x):
        y = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))   # (B, k, H, W)
        return torch.cat([x, y], 1)


class _Transition(nn.Module):
    """Between dense blocks: BN -> ReLU -> 1x1 conv -> 2x2 average pool."""

    def __init__(self, cin, cout):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class _Exit(nn.Module):
    """A classifier (BN -> ReLU -> pool -> linear) and its exit gate -> (logits, z, p).
    The gate is a one-channel DynamicGate whose Z = 1 means "leave here": p = P(leave)."""

    def __init__(self, cin, num_classes, init_leave_p):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        self.gate = DynamicGate(cin, 1, init_p=init_leave_p)
        self.macs = cin * num_classes + self.gate.macs

    def forward(self, x):
        return self.fc(F.relu(self.bn(x)).mean((2, 3))), *self.gate(x)


def exit_net_macs(model, hw, z=None):
    """FLOPs(Z) of an early-exit DenseNet on inputs of size hw: a sample pays the stages it
    runs and every exit it passes. z: the exit decisions, each (B, 1), Z = 1: leave; None:
    every image runs to the end and no exit is evaluated (MaxFLOPs)."""
    stages, size = [], tuple(hw)
    stem = conv_macs(model.conv1, size)
    for k, block in enumerate(model.blocks):
        macs = 0
        if k > 0:
            macs = conv_macs(model.transitions[k - 1].conv, size)
            size = (size[0] // 2, size[1] // 2)
        stages.append(macs + sum(conv_macs(l.conv1, size) + conv_macs(l.conv2, size)
                                 for l in block))
    total = model.fc.in_features * model.fc.out_features
    if z is None:
        return stem + sum(stages) + total
    for k in reversed(range(len(z))):       # exit k, then (if staying) stage k + 1 and on
        total = model.exits[k].macs + (1 - z[k][:, 0].double()) * (stages[k + 1] + total)
    return stem + stages[0] + total


class DenseNetExits(nn.Module):
    """DenseNet-BC for CIFAR (3 dense blocks, compression 0.5) with early exits (5, Table 5).
    exits=True: a classifier and an exit gate after dense blocks 1 and 2, p(leave) starting
    at init_leave_p. Every image runs to the end (training, masked evaluation); the output
    each image takes, with GateInfo (exit_logits set), is
        Z1 l1 + (1 - Z1) (Z2 l2 + (1 - Z2) l3)
    gumbel_skip.early_exit really skips the blocks after an exit."""

    def __init__(self, depth=100, growth_rate=12, num_classes=10, exits=True,
                 init_leave_p=1 - INIT_P):
        super().__init__()
        if not (isinstance(depth, int) and depth >= 10 and (depth - 4) % 6 == 0):
            raise ValueError('depth must be 6n+4 with n >= 1 (DenseNet-BC: 100, 190, ...), '
                             f'got {depth!r}')
        n, c = (depth - 4) // 6, 2 * growth_rate
        self.conv1 = _conv3x3(3, c)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.exits = nn.ModuleList()
        for k in range(3):
            self.blocks.append(nn.Sequential(*(_DenseLayer(c + i * growth_rate, growth_rate)
                                               for i in range(n))))
            c += n * growth_rate
            if k < 2:
                if exits:
                    self.exits.append(_Exit(c, num_classes, init_leave_p))
                self.transitions.append(_Transition(c, c // 2))
                c //= 2
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        self._max_macs = {}                         # input size -> MaxFLOPs

    def stage(self, k, x):
        """Transition into dense block k (k > 0), then the block."""
        return self.blocks[k](x if k == 0 else self.transitions[k - 1](x))

    def head(self, x):
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))

    def forward(self, x):
        hw = x.shape[-2:]
        x = self.conv1(x)
        heads = []                                          # (logits, z, p) of each exit
        for k in range(3):
            x = self.stage(k, x)
            if k < len(self.exits):
                heads.append(self.exits[k](x))
        logits = self.head(x)
        if not self.exits:
            return logits
        exit_logits, zs, ps = ([h[i] for h in heads] for i in range(3))
        exit_logits.append(logits)
        for k in reversed(range(len(zs))):                  # the output each image takes
            logits = zs[k] * exit_logits[k] + (1 - zs[k]) * logits
        max_macs = _once(self._max_macs, tuple(hw), lambda size: exit_net_macs(self, size))
        return logits, GateInfo(zs, ps, exit_net_macs(self, hw, zs), max_macs, exit_logits)


def densenet_cifar(depth=100, growth_rate=12, num_classes=10, exits=True,
                   init_leave_p=1 - INIT_P):
    """DenseNet-BC (k = 12) for CIFAR with early exits after dense blocks 1 and 2 (5)."""
    return DenseNetExits(depth, growth_rate, num_classes, exits, init_leave_p)
