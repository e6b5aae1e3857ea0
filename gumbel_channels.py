"""Channel selection using Gumbel Softmax (Herrmann, Bowen and Zabih, ECCV 2020).

One module, read bottom-up beside the paper (section numbers refer to it):

    estimator     straight_through_gumbel                          (1.1, 3.2)
    gates         StaticGate (pruning), DynamicGate (conditional)  (3.2)
    blocks        BasicBlock, Bottleneck; channel or layer gates   (3.4, 4.4)
    networks      resnet_cifar / resnet20..resnet110, gate_resnet  (4)
    FLOPs         MACs of conv and linear layers, per sample       (3.4)
    losses        Eq. (1), L_FLOPs, AIG per-gate loss, Property 1  (1.2, 2.1, 3.1, 3.4)
    inference     set_inference, ensemble_predict, recalibrate_bn  (3.3, 4.1)
    export        prune (static gates -> smaller convs), SkipNet (dynamic, batch 1)
    early exits   densenet_cifar: exit gates after dense blocks 1 and 2 (5, Table 5)

CIFAR ResNets (He et al. 2016, option-A shortcut), MACs at 32x32 counted as in the paper
(conv + linear multiply-accumulates):

    name        depth  blocks/stage  params   MACs
    resnet20      20        3        0.27 M    40.55 M
    resnet32      32        5        0.46 M    68.86 M
    resnet44      44        7        0.66 M    97.17 M
    resnet56      56        9        0.85 M   125.49 M
    resnet110    110       18        1.73 M   252.89 M

A gated network returns (logits, GateInfo); a dense one (gating=None) returns logits.
Gate decisions Z multiply activations after BN and ReLU, so an off channel contributes
exactly zero downstream: the masked network computes what a physically pruned one would.
"""
import copy
import itertools
import math
import time
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'straight_through_gumbel', 'StaticGate', 'DynamicGate', 'BasicBlock', 'Bottleneck',
    'ResNet', 'GateInfo', 'resnet_cifar', 'resnet20', 'resnet32', 'resnet44', 'resnet56',
    'resnet110', 'gate_resnet', 'counted_macs', 'batch_activation_loss', 'flops_loss',
    'per_gate_loss', 'expected_activation_loss', 'param_groups', 'set_inference',
    'ensemble_predict', 'recalibrate_bn', 'ShortcutBlock', 'prune', 'SkipNet', 'DenseNetExits',
    'ExitInfo', 'densenet_cifar', 'exit_report', 'set_sampling', 'per_class_rates', 'polarization_loss',
    'gate_probability',
]

INIT_P = 0.98            # initial on-probability; the official code's logits (0.1, 4) give 0.980
GATINGS = (None, 'static', 'dynamic')
GRANULARITIES = ('channel', 'layer')
STRATEGIES = ('threshold', 'sample', 'all_on')


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {value!r}')


def _check_t(t):
    if not 0 < t <= 1:
        raise ValueError(f't (target rate) must be in (0, 1], got {t!r}')


# ----------------------------------------------------------------------------- estimator

def _at_least_float(x):
    """Gate math in float32 at least (bf16 logits under autocast), float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def straight_through_gumbel(logits, temperature=1.0, generator=None, hard=True):
    """Straight-through Gumbel-softmax for on/off gates (1.1, 3.2); hard=False returns the
    soft relaxation itself, in (0, 1), which the paper found to train worse (3.2).

    logits: (..., 2) = (w0 "off", w1 "on"); P(Z=1) = p = sigmoid(w1 - w0).
    Returns Z in {0., 1.} of shape (...), at least float32. Forward: the hard sample
    Z = [w1 + g1 > w0 + g0]; backward: the gradient of the soft sample
    softmax((w + g) / T)[..., 1] = sigmoid((w1 - w0 + g1 - g0) / T), T the temperature (the
    paper fixes T = 1).

    g1 - g0 of two independent Gumbel(0, 1) variables is Logistic(0, 1), drawn here as
    log(U) - log(1 - U) from one U = torch.rand(logits.shape[:-1], generator=generator):
    the same distribution as F.gumbel_softmax(hard=True)[..., 1] with half the noise.
    Unlike F.gumbel_softmax, the forward value is exactly 0 or 1 (hard + (soft - soft), not
    hard - soft + soft, which rounds).
    """
    if logits.shape[-1] != 2:
        raise ValueError(f'logits must have last dimension 2 (off, on), got shape {tuple(logits.shape)}')
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature!r}')
    logits = _at_least_float(logits)
    rng = {} if generator is None else {'generator': generator}    # an explicit None breaks torch.compile
    u = torch.rand(logits.shape[:-1], dtype=logits.dtype, device=logits.device, **rng)
    u = u.clamp(min=torch.finfo(u.dtype).tiny)                  # U = 0 would give -inf noise
    y = logits[..., 1] - logits[..., 0] + torch.log(u) - torch.log1p(-u)   # logistic noise: NOTES.md 1
    soft = torch.sigmoid(y / temperature)
    if not hard:
        return soft
    return (y > 0).to(y.dtype) + (soft - soft.detach())                   # exactly 0/1: NOTES.md 2


# ----------------------------------------------------------------------------- gates

def _init_logits(channels, init_p):
    """(C, 2) logits (-l/2, l/2) with l = logit(init_p): the minimum-norm pair for p (3.2;
    the official code uses (0.1, 4), the same p = 0.98: NOTES.md 3)."""
    if not 0 < init_p < 1:
        raise ValueError(f'init_p must be in (0, 1), got {init_p!r}')
    half = math.log(init_p / (1 - init_p)) / 2
    return torch.tensor([-half, half]).repeat(channels, 1)


def gate_probability(logits):
    """3.2: the on-probability p = 1 / (1 + exp(w0 - w1)) of logits (..., 2) = (w0, w1), at
    least float32. The one place p is computed."""
    logits = _at_least_float(logits)
    return torch.sigmoid(logits[..., 1] - logits[..., 0])


class _Gate(nn.Module):
    """How a gate decides (3.3) and samples (3.2): settings shared by both kinds of gate,
    shown in repr. Training samples, unless the gate is frozen at its threshold decisions;
    evaluation follows `strategy` ('threshold' at `tau`, 'sample' or 'all_on')."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.strategy, self.tau = 'threshold', 0.5
        self.soft, self.temperature, self.frozen = False, 1.0, False

    def extra_repr(self):
        return (f'channels={self.channels}, strategy={self.strategy!r}, tau={self.tau}, '
                f'soft={self.soft}, temperature={self.temperature}, frozen={self.frozen}')

    def decide(self, logits):
        """logits (B, C, 2) -> (z, p), each (B, C): decisions and on-probabilities."""
        p = gate_probability(logits)
        if (self.training and not self.frozen) or (not self.training and self.strategy == 'sample'):
            return straight_through_gumbel(logits, self.temperature, hard=not self.soft), p
        if not self.training and self.strategy == 'all_on':
            return torch.ones_like(p), p
        return self.keep(p).to(p.dtype), p

    def keep(self, p):
        """Threshold inference (3.3): Z = 1 iff p > tau, strictly (NOTES.md 11)."""
        return p > self.tau


class StaticGate(_Gate):
    """Data-independent gates (pruning, 3.2): two free logits per channel.

    forward(x) -> (z, p), each (B, C): decisions (sampled per sample, or with per_batch one
    draw for the whole batch: NOTES.md 17) and on-probabilities. x is only read for its
    batch size.
    """

    def __init__(self, channels, init_p=INIT_P):
        super().__init__(channels)
        self.macs, self.per_batch = 0, False
        self.logits = nn.Parameter(_init_logits(channels, init_p))          # (C, 2)

    def extra_repr(self):
        return f'{super().extra_repr()}, per_batch={self.per_batch}'

    def forward(self, x):
        z, p = self.decide(self.logits.expand(1 if self.per_batch else x.shape[0], -1, -1))
        return z.expand(x.shape[0], -1), p.expand(x.shape[0], -1)


class DynamicGate(_Gate):
    """Data-dependent gates (conditional computation, 3.2):
    global average pool -> 1-d conv -> BN -> ReLU -> 1-d conv -> two logits per channel.
    The 1-d convs have kernel 1 on the pooled (C_in,) vector, i.e. they are linear maps,
    and are written as such (same function and MACs, no im2col: NOTES.md 5).

    forward(x: (B, C_in, H, W)) -> (z, p), each (B, channels).
    """

    def __init__(self, in_channels, channels, hidden=16, init_p=INIT_P):
        super().__init__(channels)
        self.macs = in_channels * hidden + hidden * 2 * channels            # per sample
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)               # BN follows
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 2 * channels)
        with torch.no_grad():
            self.fc2.bias.copy_(_init_logits(channels, init_p).flatten())   # (off, on) per channel

    def forward(self, x):
        logits = self.fc2(F.relu(self.bn(self.fc1(x.mean((2, 3))))))        # (B, 2C)
        return self.decide(logits.view(x.shape[0], self.channels, 2))


def _make_gate(gating, in_channels, channels, init_p):
    _check_choice('gating', gating, GATINGS)
    if gating is None:
        return None
    if gating == 'static':
        return StaticGate(channels, init_p)
    return DynamicGate(in_channels, channels, init_p=init_p)


def _gates(model):
    return [m for m in model.modules() if isinstance(m, (StaticGate, DynamicGate))]


# ----------------------------------------------------------------------------- blocks

def _conv_macs(conv, y, n_in=None, n_out=None):
    """MACs per sample of `conv` producing y (B, C, H, W) with n_in input and n_out output
    channels active (ints or (B,) tensors; default all)."""
    kh, kw = conv.kernel_size
    n_in = conv.in_channels // conv.groups if n_in is None else n_in
    n_out = conv.out_channels if n_out is None else n_out
    return y.shape[-2] * y.shape[-1] * kh * kw * n_in * n_out


def _mask(x, z):
    """x (B, C, H, W) times decisions z (B, C); z None means all on."""
    return x if z is None else x * z[:, :, None, None].to(x.dtype)


def _active(z):
    """Active channels per sample (B,), float64 so MAC counts stay exact (NOTES.md 7); None if ungated."""
    return None if z is None else z.sum(1, dtype=torch.float64)


def _any(n):
    """1 where a gate has any channel on (per sample), else 0; 1 if ungated."""
    return 1 if n is None else (n > 0).double()


class ShortcutA(nn.Module):
    """He et al.'s option A: subsample by `stride`, zero-pad channels up to `planes` (no parameters)."""

    def __init__(self, planes, stride=2):
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        pad = self.planes - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))


def _run_gates(block, x, names):
    """Run the block's gates among `names` -> ({name: z (B, C)}, [(z, p), ...])."""
    out = [(n, g(x)) for n in names if (g := getattr(block, n, None)) is not None]
    return {n: zp[0] for n, zp in out}, [zp for _, zp in out]


def _residual(block, x, branch, z_layer, macs, dense_macs, gates):
    """out = ReLU(shortcut(x) + Z * branch), Z (B, 1) the layer gate (None: no layer gate;
    AIG's placement, NOTES.md 6).

    Returns (out, [(z, p), ...], MACs per sample given Z, MACs without gates).
    """
    if z_layer is not None:
        branch = _mask(branch, z_layer)
        macs = macs * z_layer[:, 0].double()
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(branch + identity)
    ds = 0 if block.downsample is None else sum(
        _conv_macs(m, out) for m in block.downsample.modules() if isinstance(m, nn.Conv2d))
    return out, gates, macs + ds + block.gate_macs, dense_macs + ds


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> [gate1] -> 3x3 conv -> BN, plus shortcut, ReLU.

    granularity 'channel': gate1 on conv1's output channels; 'layer': one gate that keeps
    or drops the whole residual branch (then the block is its shortcut, ReLU applied).
    """
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, gating=None,
                 granularity='channel', init_p=INIT_P):
        super().__init__()
        _check_choice('granularity', granularity, GRANULARITIES)
        self.conv1, self.bn1 = _conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        if granularity == 'channel':
            self.gate1 = _make_gate(gating, inplanes, planes, init_p)
        else:
            self.gate = _make_gate(gating, inplanes, 1, init_p)
        self.gate_macs = sum(g.macs for g in _gates(self))

    def forward(self, x):
        zs, gates = _run_gates(self, x, ('gate1', 'gate'))
        z1 = zs.get('gate1')
        a = _mask(self.relu(self.bn1(self.conv1(x))), z1)                   # (B, P, H, W)
        b = self.bn2(self.conv2(a))
        n1 = _active(z1)
        macs = _conv_macs(self.conv1, a, n_out=n1) + _conv_macs(self.conv2, b, n_in=n1)
        dense = _conv_macs(self.conv1, a) + _conv_macs(self.conv2, b)
        return _residual(self, x, b, zs.get('gate'), macs, dense, gates)


class Bottleneck(nn.Module):
    """1x1 -> [gate1] -> 3x3 (stride) -> [gate2] -> 1x1 (x4), torchvision's ResNet v1.5 layout.

    Both channel gates read the block input, so every decision is known before the block
    runs, which lets inference skip work (NOTES.md 4). `width` is the inner width
    (default planes).
    """
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, gating=None,
                 granularity='channel', init_p=INIT_P, width=None):
        super().__init__()
        _check_choice('granularity', granularity, GRANULARITIES)
        width = width or planes
        self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        if granularity == 'channel':
            self.gate1 = _make_gate(gating, inplanes, width, init_p)
            self.gate2 = _make_gate(gating, inplanes, width, init_p)
        else:
            self.gate = _make_gate(gating, inplanes, 1, init_p)
        self.gate_macs = sum(g.macs for g in _gates(self))

    def forward(self, x):
        zs, gates = _run_gates(self, x, ('gate1', 'gate2', 'gate'))
        z1, z2 = zs.get('gate1'), zs.get('gate2')
        a = _mask(self.relu(self.bn1(self.conv1(x))), z1)                   # (B, W, H, W)
        b = _mask(self.relu(self.bn2(self.conv2(a))), z2)
        c = self.bn3(self.conv3(b))
        n1, n2 = _active(z1), _active(z2)
        # with gate2 empty conv1 feeds nothing; with gate1 empty conv3 sees a constant, which
        # prune folds for static gates (NOTES.md 7)
        macs = (_conv_macs(self.conv1, a, n_out=n1) * _any(n2) + _conv_macs(self.conv2, b, n1, n2)
                + _conv_macs(self.conv3, c, n_in=n2) * _any(n1))
        if isinstance(getattr(self, 'gate1', None), DynamicGate):   # that constant, per input, 1x1
            macs = macs + n2 * self.conv3.out_channels * (1 - _any(n1))
        dense = _conv_macs(self.conv1, a) + _conv_macs(self.conv2, b) + _conv_macs(self.conv3, c)
        return _residual(self, x, c, zs.get('gate'), macs, dense, gates)


# ----------------------------------------------------------------------------- networks

class GateInfo(NamedTuple):
    """What the losses need from a gated forward pass.

    z: list of (B, C_i) 0/1 decisions, one per gate module (C_i = 1 for a layer gate);
    p: the matching on-probabilities; flops: (B,) float64 MACs per sample given Z, gates'
    own MACs included; max_flops: MACs of the network without gates at this input size.
    """
    z: list
    p: list
    flops: torch.Tensor
    max_flops: int


class ResNet(nn.Module):
    """conv1 -> bn1 -> ReLU -> maxpool -> layer1..layerN -> avgpool -> fc, torchvision's names.

    Built by resnet_cifar and gate_resnet. With gating None it returns logits, otherwise
    (logits, GateInfo).
    """

    def __init__(self, conv1, bn1, maxpool, layers, fc, gating=None):
        super().__init__()
        self.conv1, self.bn1 = conv1, bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = maxpool
        self.num_stages = len(layers)
        for i, layer in enumerate(layers, 1):
            setattr(self, f'layer{i}', layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = fc
        self.gating = gating

    def blocks(self):
        for i in range(1, self.num_stages + 1):
            yield from getattr(self, f'layer{i}')

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        macs = dense = _conv_macs(self.conv1, x)
        x = self.maxpool(x)
        zs, ps = [], []
        for block in self.blocks():
            x, gates, m, d = block(x)
            zs += [z for z, _ in gates]
            ps += [p for _, p in gates]
            macs, dense = macs + m, dense + d
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        if self.gating is None:
            return logits
        fc_macs = self.fc.in_features * self.fc.out_features
        flops = (macs + fc_macs) * x.new_ones(x.shape[0], dtype=torch.float64)
        return logits, GateInfo(zs, ps, flops, dense + fc_macs)


def resnet_cifar(depth, num_classes=10, gating=None, granularity='channel', init_p=INIT_P):
    """CIFAR ResNet of depth 6n+2 (He et al. 2016, option-A shortcuts): 16/32/64 channels."""
    if not (isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0):
        raise ValueError(f'depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}')
    _check_choice('gating', gating, GATINGS)
    _check_choice('granularity', granularity, GRANULARITIES)
    n, inplanes, layers = (depth - 2) // 6, 16, []
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        blocks = []
        for i in range(n):
            s = stride if i == 0 else 1
            shortcut = ShortcutA(planes, s) if s != 1 or inplanes != planes else None
            blocks.append(BasicBlock(inplanes, planes, s, shortcut, gating, granularity, init_p))
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
    """A torchvision ResNet (resnet18/34/50, wide_resnet, ...) with gated blocks.

    Every dense weight is kept under torchvision's state_dict key, so pretrained weights
    load unchanged; only gate parameters are new. `model` itself is left as it was (the
    result shares no tensor with it). Grouped or dilated convs are refused.
    """
    import torchvision
    if not isinstance(model, torchvision.models.ResNet):
        raise ValueError(f'model must be a torchvision.models.ResNet, got {type(model).__name__}')
    _check_choice('gating', gating, GATINGS)
    _check_choice('granularity', granularity, GRANULARITIES)
    model, layers = copy.deepcopy(model), []
    for name in ('layer1', 'layer2', 'layer3', 'layer4'):
        blocks = []
        for old in getattr(model, name):
            if any(c.groups != 1 or c.dilation != (1, 1) for c in old.modules() if isinstance(c, nn.Conv2d)):
                raise ValueError('gate_resnet supports groups=1 and dilation=1 convs only')
            if isinstance(old, torchvision.models.resnet.Bottleneck):
                new = Bottleneck(old.conv1.in_channels, old.conv3.out_channels // 4, old.conv2.stride,
                                 old.downsample, gating, granularity, init_p, width=old.conv1.out_channels)
            elif isinstance(old, torchvision.models.resnet.BasicBlock):
                new = BasicBlock(old.conv1.in_channels, old.conv1.out_channels, old.conv1.stride,
                                 old.downsample, gating, granularity, init_p)
            else:
                raise ValueError(f'unknown block type {type(old).__name__} in {name}')
            missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
            assert not unexpected and all('gate' in k for k in missing), (missing, unexpected)
            new.to(next(old.parameters()))
            blocks.append(new)
        layers.append(nn.Sequential(*blocks))
    return ResNet(model.conv1, model.bn1, model.maxpool, layers, model.fc, gating)


# ----------------------------------------------------------------------------- FLOPs

def counted_macs(model, x):
    """MACs of one forward pass of `model` on x, as torch.utils.flop_counter counts them
    (conv, mm, addmm; 2 FLOPs per MAC). The independent check of info.flops."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


# ----------------------------------------------------------------------------- losses

def batch_activation_loss(info, t):
    """Eq. (1): L_B = (t - Q)^2, Q = 1/(|B||G|) sum_{i,j} Z_ij, the batch's activation rate
    over every gate i (all channels of every gate module) and every sample j."""
    _check_t(t)
    q = torch.cat(info.z, dim=1).mean()                                     # (B, |G|) -> ()
    return (t - q) ** 2


def flops_loss(info, t):
    """3.4: L_FLOPs = (t - mean_j FLOPs(Z_j) / MaxFLOPs)^2, FLOPs the MACs each sample j runs."""
    _check_t(t)
    return ((t - (info.flops / info.max_flops).mean()) ** 2).float()


def per_gate_loss(info, targets):
    """2.1 (AIG): L_G = 1/|G| sum_i (t_i - 1/|B| sum_j Z_ij)^2, one target rate t_i per gate
    module (a channel-gate module's rate is its mean over channels and batch: NOTES.md 8)."""
    if len(targets) != len(info.z):
        raise ValueError(f'targets must give one rate per gate module ({len(info.z)}), got {len(targets)}')
    if not all(0 <= t <= 1 for t in targets):
        raise ValueError(f'targets must lie in [0, 1], got {list(targets)}')
    rates = torch.stack([z.mean() for z in info.z])
    return ((torch.as_tensor(targets, dtype=rates.dtype, device=rates.device) - rates) ** 2).mean()


def expected_activation_loss(p, t, batch_size):
    """Property 1 (3.1): E[L_B] = (t - E[Q])^2 + Var(Q), in closed form for independent
    gates with on-probabilities p (G,), each Z_ij ~ Bernoulli(p_i) drawn per sample:
        E[Q] = mean_i p_i,   Var(Q) = sum_i p_i (1 - p_i) / (G^2 |B|).
    Returns (bias_sq, variance); the variance is 0 only if every p_i is 0 or 1."""
    _check_t(t)
    g = p.numel()
    return (t - p.mean()) ** 2, (p * (1 - p)).sum() / (g * g * batch_size)


def polarization_loss(info):
    """Deviation (NOTES.md 20): mean over gates (and samples) of 4 p (1 - p): 1 at p = 1/2,
    0 only when every gate is polarized. Property 1's Var(Q) has this shape, but weighs a
    gate by (its MACs / MaxFLOPs)^2, which leaves gates that neither loss needs (p anywhere)
    where they are; this term weighs every gate alike."""
    p = torch.cat(info.p, 1)
    return (4 * p * (1 - p)).mean()


# ----------------------------------------------------------------------------- training

def param_groups(model, lr, weight_decay=1e-4, gate_decay=20.0, gate_lr_mult=1.0):
    """torch.optim parameter groups (3.2, 4.1). Gate parameters (a dynamic gate's whole
    network too) get lr * gate_lr_mult and the decay weight_decay * gate_decay / |G| /
    gate_lr_mult, |G| the number of gates (channels, or blocks for layer gates): SGD shrinks
    a parameter by lr * decay per step, so this is the paper's per-step gate decay at any
    multiplier (NOTES.md 19). The rest get the base values.

    Why gates get less decay (3.2): for logits (w0, w1) with p = sigmoid(w1 - w0),
        w0^2 + w1^2 = 1/2 ((w0 + w1)^2 + ln((1 - p) / p)^2),
    whose second term is smallest at p = 1/2: decay works against polarization, and it is
    summed over gates while the gate loss is averaged, hence the division by |G|."""
    gates = _gates(model)
    gate_ids = {id(q) for g in gates for q in g.parameters()}
    dense = [q for q in model.parameters() if id(q) not in gate_ids]
    groups = [{'params': dense, 'lr': lr, 'weight_decay': weight_decay}]
    if gates:
        n_gates = sum(g.channels for g in gates)
        groups.append({'params': [q for g in gates for q in g.parameters()],
                       'lr': lr * gate_lr_mult,
                       'weight_decay': weight_decay * gate_decay / n_gates / gate_lr_mult})
    return groups


# ----------------------------------------------------------------------------- inference

def set_inference(model, strategy='threshold', tau=0.5):
    """3.3: how gates decide in evaluation mode: 'threshold' (Z = 1 iff p > tau,
    deterministic), 'sample' (stochastic, as in training) or 'all_on' (Z = 1).
    Training mode always samples. Returns model."""
    _check_choice('strategy', strategy, STRATEGIES)
    if not 0 < tau < 1:
        raise ValueError(f'tau (threshold) must be in (0, 1), got {tau!r}')
    for g in _gates(model):
        g.strategy, g.tau = strategy, tau
    return model


def set_sampling(model, soft=False, temperature=1.0, per_batch=False):
    """3.2: how gates sample in training: the straight-through estimator (default) or, with
    soft=True, the soft Gumbel-softmax relaxation Z in (0, 1); the Gumbel temperature (the
    paper fixes 1); and whether static gates draw once per batch instead of once per sample
    (NOTES.md 17). Returns model."""
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature!r}')
    for g in _gates(model):
        g.soft, g.temperature = soft, temperature
        if isinstance(g, StaticGate):
            g.per_batch = per_batch
    return model


@torch.no_grad()
def per_class_rates(model, batches, num_classes):
    """Fig. 4: activation rate of every gate module (mean of Z over its channels) per class,
    (num_classes, modules), over (images, labels) batches, under the inference strategy."""
    model.eval()
    sums, counts = 0, torch.zeros(num_classes, 1)
    for x, y in batches:
        z = torch.stack([z.float().mean(1) for z in model(x)[1].z], 1).cpu()   # (B, modules)
        y = F.one_hot(y.cpu(), num_classes).float()                              # (B, classes)
        sums, counts = sums + y.T @ z, counts + y.sum(0)[:, None]
    return sums / counts.clamp(min=1)


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def ensemble_predict(model, x, runs=8, vote=False):
    """3.3: an ensemble of `runs` stochastic passes of one network (evaluation mode, gates
    sampling). Returns (B, classes): the mean softmax, or with vote=True each class's share
    of the runs' votes (argmax is the majority). The model's mode and strategies are restored."""
    if runs < 1:
        raise ValueError(f'runs must be >= 1, got {runs!r}')
    gates, was_training = _gates(model), model.training
    saved = [(g.strategy, g.tau) for g in gates]
    model.eval()
    try:
        for g in gates:
            g.strategy = 'sample'
        total = 0
        for _ in range(runs):
            logits = _logits(model(x))
            total = total + (F.one_hot(logits.argmax(1), logits.shape[1]).float() if vote
                             else logits.float().softmax(1))
        return total / runs
    finally:
        for g, (s, tau) in zip(gates, saved):
            g.strategy, g.tau = s, tau
        model.train(was_training)


@torch.no_grad()
def recalibrate_bn(model, batches):
    """4.1: reset every BatchNorm's running statistics and re-estimate them from `batches`
    (tensors, or tuples whose first item is the input), with gates deciding by the current
    inference strategy: the paper's learning-rate-0 pass, as an exact cumulative average
    (NOTES.md 10). No parameter changes; the model's mode is restored."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:                             # checked before any statistic is reset
        raise ValueError('batches must yield at least one batch')
    was_training = model.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    device = next(model.parameters()).device
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for x in itertools.chain([first], batches):
            x = x[0] if isinstance(x, (tuple, list)) else x
            model(x.to(device, non_blocking=True))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)
    return model

# ----------------------------------------------------------------------------- export

def _sliced_weight(conv, out=None, in_=None):
    """conv.weight (C_out, C_in, kh, kw) restricted to output channels `out` and input
    channels `in_` (index tensors; None keeps all)."""
    w = conv.weight if out is None else conv.weight[out]
    return w if in_ is None else w[:, in_]


def _bn_params(bn, idx=None):
    """(running_mean, running_var, weight, bias) of an eval-mode BN, restricted to idx."""
    idx = slice(None) if idx is None else idx
    return bn.running_mean[idx], bn.running_var[idx], bn.weight[idx], bn.bias[idx]


def _fold(conv, bn):
    """conv then eval-mode BN as one conv: (weight * scale, shift), scale = gamma / sqrt(var + eps)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (conv.weight * scale.view(-1, 1, 1, 1)).contiguous(), bn.bias - bn.running_mean * scale


def _pick(t, i, dim=0):
    """t restricted to indices i along dim (None keeps all)."""
    return t if i is None else t.index_select(dim, i)


def _folded(block):
    """[(w1, b1), (w2, b2) (, (w3, b3))]: each conv of the block with its BN folded in."""
    convs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    return [_fold(c, bn) for c, bn in convs + ([(block.conv3, block.bn3)] if isinstance(block, Bottleneck) else [])]


def _collapsed_branch(bias, on2=None, shift2=None, w3=None):
    """(1, C_out, 1, 1): what a branch whose gate1 (or a Bottleneck's gate2) is all off still
    adds, from folded parameters. The last conv sees zeros, so its BN leaves `bias`; in a
    Bottleneck with only gate1 empty, conv3 (folded weight w3) also maps the constants
    ReLU(bn2(0)) = ReLU(shift2) of gate2's on channels on2 (indices), at 1x1: n2 * C_out MACs."""
    y = bias.view(1, -1, 1, 1)
    if on2 is not None and len(on2):
        y = y + F.conv2d(_pick(F.relu(shift2), on2).view(1, -1, 1, 1), _pick(w3, on2, 1))
    return y


class ShortcutBlock(nn.Module):
    """An exported block whose branch no longer runs: ReLU(shortcut(x) + bias), bias (C_out,)
    the constant its branch left (0 for an off layer gate)."""

    def __init__(self, downsample, bias):
        super().__init__()
        self.downsample, self.relu, self.gate_macs = downsample, nn.ReLU(inplace=True), 0
        self.register_buffer('bias', bias.detach().flatten().clone())

    def forward(self, x):
        return _residual(self, x, self.bias.view(1, -1, 1, 1), None, 0, 0, [])


def _threshold(gate):
    """A static gate's threshold decisions (C,) bool."""
    return gate.keep(gate_probability(gate.logits))


def _sliced_conv(conv, out=None, in_=None):
    w = _sliced_weight(conv, out, in_)
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    bias=False).to(w)
    new.weight.copy_(w)
    return new


def _sliced_bn(bn, keep):
    new = nn.BatchNorm2d(int(keep.sum()), bn.eps, bn.momentum).to(bn.weight)
    for dst, src in zip((new.running_mean, new.running_var, new.weight, new.bias), _bn_params(bn, keep)):
        dst.copy_(src)
    return new


def _drop_gates(block):
    for name in ('gate', 'gate1', 'gate2'):
        if name in block._modules:
            delattr(block, name)
    block.gate_macs = 0
    return block


def _prune_block(block):
    """The gate-free block that computes what `block` computes under threshold inference."""
    if getattr(block, 'gate', None) is not None:                            # layer gate
        if _threshold(block.gate).item():
            return _drop_gates(block)
        last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        return ShortcutBlock(block.downsample, last_bn.bias.new_zeros(last_bn.num_features))
    keep1 = _threshold(block.gate1)
    keep2 = _threshold(block.gate2) if isinstance(block, Bottleneck) else None
    if not keep1.any() or (keep2 is not None and not keep2.any()):
        folded = _folded(block)
        on2 = None if keep2 is None else keep2.nonzero().flatten()
        return ShortcutBlock(block.downsample, _collapsed_branch(folded[-1][1], on2, folded[1][1], folded[-1][0]))
    block.conv1, block.bn1 = _sliced_conv(block.conv1, out=keep1), _sliced_bn(block.bn1, keep1)
    if keep2 is None:
        block.conv2 = _sliced_conv(block.conv2, in_=keep1)
    else:
        block.conv2, block.bn2 = _sliced_conv(block.conv2, keep2, keep1), _sliced_bn(block.bn2, keep2)
        block.conv3 = _sliced_conv(block.conv3, in_=keep2)
    return _drop_gates(block)


@torch.no_grad()
def prune(model):
    """Physical pruning: a gate-free copy of a statically gated network with smaller convs
    and BNs, computing what threshold inference (each gate's tau) computes, in evaluation
    mode. Blocks whose branch empties keep the constant their last BN adds. Returns an
    ordinary ResNet (logits only) in evaluation mode; `model` is left as it was."""
    gates = _gates(model)
    if not gates or not all(isinstance(g, StaticGate) for g in gates):
        raise ValueError('model must have static gates (gating="static"); dynamic gates decide '
                         'per input: use SkipNet')
    model = copy.deepcopy(model).eval()
    layers = [nn.Sequential(*[_prune_block(b) for b in getattr(model, f'layer{i}')])
              for i in range(1, model.num_stages + 1)]
    return ResNet(model.conv1, model.bn1, model.maxpool, layers, model.fc).eval()


class _SkipBlock(nn.Module):
    """A gated block for one input at a time: its gates decide (as in the masked forward),
    then its convs run on the sliced weights of the on channels only, BN folded in."""

    def __init__(self, block):
        super().__init__()
        self.bottleneck = isinstance(block, Bottleneck)
        self.stride = block.conv2.stride if self.bottleneck else block.conv1.stride
        for name in ('gate', 'gate1', 'gate2', 'downsample'):
            setattr(self, name, getattr(block, name, None))
        for k, (w, b) in enumerate(_folded(block), 1):                     # w1, b1, w2, b2 (, w3, b3)
            self.register_buffer(f'w{k}', w)
            self.register_buffer(f'b{k}', b)

    def forward(self, x):                                                   # x: (1, C, H, W)
        identity = x if self.downsample is None else self.downsample(x)
        if self.gate is not None and self.gate(x)[0].item() == 0:          # layer gate off
            return F.relu(identity)
        i1, i2 = (g(x)[0][0].nonzero().flatten() if g is not None else None
                  for g in (self.gate1, self.gate2))                        # on channels, None: all
        if any(i is not None and len(i) == 0 for i in (i1, i2)):           # a collapsed branch
            last = (self.w3, self.b3) if self.bottleneck else (self.w2, self.b2)
            return F.relu_(identity + _collapsed_branch(last[1], i2, self.b2, last[0]))
        if self.bottleneck:
            a = F.relu_(F.conv2d(x, _pick(self.w1, i1), _pick(self.b1, i1)))
            w2 = _pick(_pick(self.w2, i2), i1, 1)
            a = F.relu_(F.conv2d(a, w2, _pick(self.b2, i2), self.stride, 1))
            return F.relu_(F.conv2d(a, _pick(self.w3, i2, 1), self.b3).add_(identity))
        a = F.relu_(F.conv2d(x, _pick(self.w1, i1), _pick(self.b1, i1), self.stride, 1))
        return F.relu_(F.conv2d(a, _pick(self.w2, i1, 1), self.b2, 1, 1).add_(identity))


class SkipNet(nn.Module):
    """Conditional computation that really skips work (dynamic gates, threshold inference):
    for one input (1, 3, H, W), every block runs its convs on the sliced weights of the
    channels its gates turn on, and an off layer gate skips its branch. Built from a gated
    network in evaluation mode (a snapshot, BN folded into the convs); returns the logits
    of the masked forward, and spends the MACs info.flops counts."""

    def __init__(self, model):
        super().__init__()
        if not _gates(model):
            raise ValueError('model must be a gated network (gating="dynamic" or "static")')
        model = copy.deepcopy(model).eval()
        self.stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        self.blocks = nn.ModuleList(_SkipBlock(b) for b in model.blocks())
        self.avgpool, self.fc = model.avgpool, model.fc
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

class _DenseLayer(nn.Module):
    """DenseNet-BC layer: BN-ReLU-1x1 conv (4k) -> BN-ReLU-3x3 conv (k), appended to its input."""

    def __init__(self, cin, growth):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * growth), _conv3x3(4 * growth, growth)

    def forward(self, x):                                                   # -> (out, MACs)
        h = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(h)))
        return torch.cat([x, y], 1), _conv_macs(self.conv1, h) + _conv_macs(self.conv2, y)


class _Transition(nn.Module):
    """BN-ReLU-1x1 conv -> 2x2 average pool, between dense blocks."""

    def __init__(self, cin, cout):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):                                                   # -> (out, MACs)
        y = self.conv(F.relu(self.bn(x)))
        return F.avg_pool2d(y, 2), _conv_macs(self.conv, y)


class _Exit(nn.Module):
    """A classifier (BN-ReLU-pool-linear) and its exit gate (a one-channel DynamicGate, Z = 1: leave)."""

    def __init__(self, cin, num_classes, init_p):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(cin), nn.Linear(cin, num_classes)
        self.gate = DynamicGate(cin, 1, init_p=init_p)
        self.macs = cin * num_classes + self.gate.macs

    def forward(self, x):
        return self.fc(F.relu(self.bn(x)).mean((2, 3))), *self.gate(x)


class ExitInfo(NamedTuple):
    """GateInfo of an early-exit network, plus every classifier's logits on every image
    (the final classifier last): each exit's own CE loss and Table 5 read them."""
    z: list
    p: list
    flops: torch.Tensor
    max_flops: int
    exit_logits: list


class DenseNetExits(nn.Module):
    """DenseNet-BC for CIFAR (3 dense blocks, compression 0.5) with, when exits=True, a
    classifier and an exit gate at the end of dense blocks 1 and 2 (5, Table 5).

    Training (and the masked evaluation) runs every image to the end and returns the output
    each image takes, Z1 l1 + (1 - Z1)(Z2 l2 + (1 - Z2) l3), with ExitInfo; early_exit()
    really skips the blocks after an image's exit."""

    def __init__(self, depth=100, growth_rate=12, num_classes=10, exits=True, init_p=1 - INIT_P):
        super().__init__()
        if not (isinstance(depth, int) and depth >= 10 and (depth - 4) % 6 == 0):
            raise ValueError(f'depth must be 6n+4 with n >= 1 (DenseNet-BC: 100, 190, ...), got {depth!r}')
        n, c = (depth - 4) // 6, 2 * growth_rate
        self.conv1 = _conv3x3(3, c)
        self.blocks, self.transitions, self.exits = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for k in range(3):
            self.blocks.append(nn.ModuleList(_DenseLayer(c + i * growth_rate, growth_rate) for i in range(n)))
            c += n * growth_rate
            if k < 2:
                if exits:
                    self.exits.append(_Exit(c, num_classes, init_p))
                self.transitions.append(_Transition(c, c // 2))
                c //= 2
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c, num_classes)

    def stage(self, k, x):
        """Transition into dense block k (k > 0), then the block: -> (features, MACs)."""
        macs = 0
        if k > 0:
            x, macs = self.transitions[k - 1](x)
        for layer in self.blocks[k]:
            x, m = layer(x)
            macs += m
        return x, macs

    def head(self, x):
        return self.fc(F.relu(self.bn(x)).mean((2, 3))), self.fc.in_features * self.fc.out_features

    def forward(self, x):
        x = self.conv1(x)
        stem = _conv_macs(self.conv1, x)
        exit_logits, zs, ps, costs = [], [], [], []
        for k in range(3):
            x, m = self.stage(k, x)
            costs.append(m)
            if k < len(self.exits):
                logits, z, p = self.exits[k](x)
                exit_logits.append(logits)
                zs.append(z)
                ps.append(p)
        logits, fc = self.head(x)
        if not self.exits:
            return logits
        exit_logits.append(logits)
        for k in reversed(range(len(zs))):                  # the output each image takes
            logits = zs[k] * exit_logits[k] + (1 - zs[k]) * logits
        flops = fc                                          # MACs per sample, from the final classifier back
        for k in reversed(range(len(zs))):                  # exit k, then (if staying) stage k + 1 and on
            flops = self.exits[k].macs + (1 - zs[k][:, 0].double()) * (costs[k + 1] + flops)
        flops = stem + costs[0] + flops
        return logits, ExitInfo(zs, ps, flops, stem + sum(costs) + fc, exit_logits)

    @torch.no_grad()
    def early_exit(self, x, use_exits=True):
        """Evaluation-mode inference that splits the batch: images leaving at exit k (their
        gate's threshold decision) are not run through later blocks. Returns (logits, exit
        index per image, len(exits) for the final classifier). use_exits=False runs every
        image to the end."""
        if self.training:
            raise ValueError('model must be in evaluation mode (model.eval()) for early_exit')
        x = self.conv1(x)
        n_exits = len(self.exits) if use_exits else 0
        rows = torch.arange(len(x), device=x.device)        # which images are still running
        logits = x.new_zeros(len(x), self.fc.out_features)
        taken = torch.full((len(x),), n_exits, dtype=torch.long, device=x.device)
        for k in range(3):
            x, _ = self.stage(k, x)
            if k >= n_exits:
                continue
            out, z, _ = self.exits[k](x)
            leave = z[:, 0] > 0
            logits[rows[leave]], taken[rows[leave]] = out[leave].to(logits.dtype), k
            rows, x = rows[~leave], x[~leave]
            if len(rows) == 0:
                return logits, taken
        logits[rows] = self.head(x)[0].to(logits.dtype)
        return logits, taken


@torch.no_grad()
def exit_report(model, batches):
    """Table 5 for an early-exit network in evaluation mode, over (images, labels) batches.
    Per exit (the final classifier last): the share of images that leave there, its
    classifier's accuracy on all images and on the images it took. Also the MACs that the
    batch split spends (FlopCounterMode / 2) beside the accounting's, and its wall time
    beside running every image to the end."""
    model.eval()
    counts, n, macs, seconds = 0, 0, torch.zeros(3, dtype=torch.float64), torch.zeros(2)
    for x, y in batches:
        _, info = model(x)
        _, taken = model.early_exit(x)
        counts = counts + torch.tensor([[(taken == k).sum(), (logits.argmax(1) == y).sum(),
                                         ((logits.argmax(1) == y) & (taken == k)).sum()]
                                        for k, logits in enumerate(info.exit_logits)])
        macs += torch.tensor([counted_macs(lambda t: model.early_exit(t), x), info.flops.sum().item(),
                              info.max_flops * len(x)], dtype=torch.float64)
        for i, use_exits in enumerate((True, False)):
            t0 = time.perf_counter()
            model.early_exit(x, use_exits)
            seconds[i] += time.perf_counter() - t0
        n += len(x)
    exits = [dict(exit=k, share=took / n, acc_all=hit / n, acc_taken=hit_taken / took if took else math.nan)
             for k, (took, hit, hit_taken) in enumerate(counts.tolist())]
    return dict(exits=exits, counted_macs=macs[0].item(), accounted_macs=macs[1].item(),
                full_macs=macs[2].item(), seconds=seconds[0].item(), seconds_to_the_end=seconds[1].item())


def densenet_cifar(depth=100, growth_rate=12, exits=True, num_classes=10, init_p=1 - INIT_P):
    """DenseNet-BC (k = 12) for CIFAR with early exits after dense blocks 1 and 2 (5);
    init_p is the exit gates' initial probability of leaving."""
    return DenseNetExits(depth, growth_rate, num_classes, exits, init_p)

if __name__ == '__main__':      # python gumbel_channels.py: the table in the docstring, measured
    x = torch.randn(1, 3, 32, 32)
    print(f"{'name':10} {'params':>8} {'MACs (counted)':>15} {'static all-on':>14} {'dynamic all-on':>15}")
    for depth in (20, 32, 44, 56, 110):
        dense = resnet_cifar(depth).eval()
        flops = [set_inference(resnet_cifar(depth, gating=g).eval(), 'all_on')(x)[1].flops.item()
                 for g in ('static', 'dynamic')]
        print(f'resnet{depth:<4} {sum(q.numel() for q in dense.parameters()) / 1e6:7.2f}M '
              f'{counted_macs(dense, x):15,} {flops[0]:14,.0f} {flops[1]:15,.0f}')
