"""gumbel_any: the paper's static gates on any CNN, one test per model family (issue 21): the
channel groups are found, FLOPs(Z) is the pruned net's counted MACs exactly, and the pruned
net computes the thresholded gated net."""
import collections
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import channel_groups as cg
import gumbel_any as ga
import gumbel_channels as gc
import gumbel_export as ge
import gumbel_skip as gs

FAMILIES = {
    'resnet': ['resnet18', 'resnet50', 'resnext50_32x4d', 'wide_resnet50_2'],
    'mobilenet': ['mobilenet_v2', 'mobilenet_v3_small'],
    'efficientnet': ['efficientnet_b0'],
    'regnet': ['regnet_y_400mf'],
    'vgg': ['vgg11_bn'],
    'densenet': ['densenet121'],
    'convnext': ['convnext_tiny'],
    'shufflenet': ['shufflenet_v2_x1_0'],
}


class UserBlock(nn.Module):
    """A user's own block: conv-BN-ReLU-conv-BN plus a conv shortcut, named their way."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv_a, self.norm_a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), \
            nn.BatchNorm2d(cout)
        self.conv_b, self.norm_b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), \
            nn.BatchNorm2d(cout)
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                  nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.norm_a(self.conv_a(x)))
        return F.relu(self.norm_b(self.conv_b(y)) + self.skip(x))


class UserCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(UserBlock(16, 24, 1), UserBlock(24, 32, 2))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def randomized(model, seed=0):
    """Random BN statistics and affine terms, so that a constant left by a removed channel
    (BN's shift) and every kept channel's scale show in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
            if hasattr(m, 'layer_scale'):                       # ConvNeXt starts at 1e-6
                m.layer_scale.fill_(1.0)
    return model.eval()


def random_decisions(gated, seed=0):
    """Gates half on at random, and the first gate module all off (its consumers then see
    no input channel at all)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, g in enumerate(gated.gates):
            d = 3 * torch.randn(g.channels, generator=gen) if k else -torch.ones(g.channels)
            g.logits.copy_(torch.stack([-d / 2, d / 2], 1))
    return gated.eval()


def check_exact(model, x):
    """Gate, decide at random, prune: FLOPs(Z) = the pruned net's counted MACs, pruned logits
    = thresholded logits (relative 1e-4), all gates on = the dense net."""
    dense = model(x)
    gated = random_decisions(ga.gate_any(model, x))
    logits, info = gated(x)
    pruned = ge.prune(gated)
    assert info.macs.tolist() == [ge.counted_macs(pruned, x[:1])] * len(x)
    assert info.max_macs == ge.counted_macs(model, x[:1]) > info.macs[0]
    scale = logits.abs().max()
    assert (pruned(x) - logits).abs().max() <= 1e-4 * scale
    with gc.evaluation(gated, 'all_on'):
        assert (gated(x)[0] - dense).abs().max() <= 1e-5 * scale
    return gated, pruned


@pytest.mark.parametrize('family', list(FAMILIES))
def test_any_torchvision_family_gates_and_prunes_exactly(family):
    torch.manual_seed(0)
    for name in FAMILIES[family]:
        model = randomized(getattr(torchvision.models, name)(num_classes=10))
        gated, _ = check_exact(model, torch.randn(2, 3, 32, 32))
        assert len(gated.gates) > 0


def test_a_users_own_cnn_gates_with_coupled_channels_and_exports():
    """The residual add couples conv_b's and the shortcut's outputs (and the head's input)
    into one gate module; conv_a's outputs are a gate of their own; the pruned net exports."""
    torch.manual_seed(0)
    model = randomized(UserCNN())
    x = torch.randn(2, 3, 16, 16)
    gated, pruned = check_exact(model, x)
    sources = [set(s) for s in gated.sources]
    assert {'body.0.conv_a'} in sources and {'body.1.conv_a'} in sources
    assert {'body.1.conv_b', 'body.1.skip.0'} in sources            # the stream into the head
    assert not any('head' in s for s in map(str, sources))          # logits are never gated
    folded = ge.fold_bn(pruned)
    bns = [sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) for net in (pruned, folded)]
    assert any(isinstance(m, ge.Constant) for m in pruned.modules())   # a group all off
    assert bns[1] == 0 < bns[0]                     # each BN follows a conv or a Constant
    assert torch.allclose(folded(x), pruned(x), atol=1e-5)
    program = torch.export.export(folded, (x,))
    assert torch.allclose(program.module()(x), pruned(x), atol=1e-5)
    buffer = io.BytesIO()                                   # pruned.pt: saved and loaded again
    torch.save(pruned, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), pruned(x))


def test_channel_groups_are_the_gates_and_every_fixed_channel_says_why():
    """Issue 42: the analysis on its own. channel_groups names the groups gate_any gates (the
    layers whose outputs a residual add ties, each inner conv alone) and, for the channels
    no gate may remove, the op that fixed them; it prints as a table."""
    class Sliced(nn.Module):                            # a literal index fixes conv c
        def __init__(self):
            super().__init__()
            self.cnn, self.c = UserCNN(), nn.Conv2d(3, 6, 1)

        def forward(self, x):
            return self.cnn(x) + self.c(x)[:, [5, 0, 1, 2, 3, 4]].mean((1, 2, 3))[:, None]
    model, x = Sliced().eval(), torch.randn(2, 3, 8, 8)
    found = cg.channel_groups(model, x)
    gated = ga.gate_any(model, x)
    assert found.groups == [(s, g.channels) for s, g in zip(gated.sources, gated.gates)]
    assert (['cnn.body.0.conv_a'], 24) in found.groups
    assert (['cnn.body.0.conv_b', 'cnn.body.0.skip.0', 'cnn.stem.0'], 16) not in found.groups
    assert (['cnn.body.0.conv_b', 'cnn.body.0.skip.0'], 24) in found.groups    # one residual
    assert ('c', 6, 'a literal channel index in getitem() in the top module') in found.fixed
    assert ('cnn.head', 10, "the network's output") in found.fixed
    text = str(found)
    assert 'a literal channel index' in text and 'cnn.body.0.conv_a' in text


def test_a_fixed_channel_names_its_own_cause_not_the_network_input():
    """What an op beyond the analysis outputs, and a parameter broadcast onto channels, were
    one id with the network input's reason, so the channels they fixed were said to be fixed
    by "the network input" (timm's resnest14d: 55%). Each now carries its own reason."""
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (nn.Conv2d(3, 8, 1) for _ in range(3))
            self.gamma = nn.Parameter(torch.rand(8))
            self.head, self.head2 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            attention = torch.softmax(self.b(x), 1)               # across channels: unknown
            y, z = self.a(x) * attention, self.gamma.view(1, -1, 1, 1) * self.c(x)
            return (self.head(y) + self.head2(z)).mean((2, 3))
    found = cg.channel_groups(Odd(), torch.randn(1, 3, 4, 4))
    fixed = {layer: why for layer, _, why in found.fixed}
    assert fixed['b'] == 'softmax() in the top module'
    assert fixed['a'] == 'the output of softmax() in the top module'
    assert fixed['c'] == 'a parameter or buffer read across channels (gamma)'


def test_flops_of_any_cnn_are_differentiable_and_the_paper_losses_apply():
    gated = ga.gate_any(UserCNN(), torch.randn(2, 3, 16, 16)).train()
    logits, info = gated(torch.randn(4, 3, 16, 16))
    loss = gc.flops_loss(info, 0.5) + gc.batch_activation_loss(info, 0.5) \
        + gc.polarization_loss(info)
    loss.backward()
    assert all(g.logits.grad is not None and g.logits.grad.abs().sum() > 0 for g in gated.gates)
    dense, gates = gc.param_groups(gated, 0.1, weight_decay=1e-4, gate_lr_mult=1000)
    assert {id(p) for p in gates['params']} == {id(g.logits) for g in gated.gates}
    assert len(dense['params']) + len(gates['params']) == len(list(gated.parameters()))
    assert gates['lr'] == 100 and gates['weight_decay'] == pytest.approx(
        1e-4 * 20 / sum(g.channels for g in gated.gates) / 1000)   # 3.2's decay, per step


def test_what_cannot_be_gated_is_refused_or_left_ungated():
    class Sliced(nn.Module):                        # a hard-coded slice of the channels
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(self.a(x)[:, :4]).mean((2, 3))

    gated = ga.gate_any(Sliced(), torch.randn(1, 3, 4, 4))
    assert len(gated.gates) == 0                    # a's channels are fixed by the slice
    with pytest.raises(ValueError, match='static'):
        ga.gate_any(UserCNN(), torch.randn(1, 3, 8, 8), gating='dynamic')
    with pytest.raises(ValueError, match='trace'):
        class Branchy(nn.Module):
            def forward(self, x):
                return x if x.sum() > 0 else -x
        ga.gate_any(Branchy(), torch.randn(1, 3, 4, 4))


# ----------------------------------------------------------------------------- issue 30: beyond
# the classifiers, every number exact or a plain refusal

def gate_and_check(model, x, **kw):
    """check_exact for any output structure and input dimension; returns (gated, pruned)."""
    model = randomized(model)
    dense = model(x)
    gated = random_decisions(ga.gate_any(model, x, **kw))
    out, info = gated(x)
    pruned = ge.prune(gated)
    assert info.macs.tolist() == [ge.counted_macs(pruned, x[:1])] * len(x)
    assert info.max_macs == ge.counted_macs(model, x[:1]) > info.macs[0]
    for a, b, d in zip(leaves(pruned(x)), leaves(out), leaves(dense)):
        scale = b.abs().max()
        assert (a - b).abs().max() <= 1e-4 * scale
    with gc.evaluation(gated, 'all_on'):
        for a, d in zip(leaves(gated(x)[0]), leaves(dense)):
            assert (a - d).abs().max() <= 1e-5 * d.abs().max()
    return gated, pruned


def leaves(out):
    return cg.tensors(out)


class Audio1d(nn.Module):
    """An audio CNN: Conv1d, BatchNorm1d, 1D pooling."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(1, 8, 9, 2, 4), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(8, 12, 3, padding=1), nn.BatchNorm1d(12), nn.ReLU(), nn.AvgPool1d(2),
            nn.Conv1d(12, 12, 3, padding=1, groups=4), nn.ReLU(), nn.AdaptiveAvgPool1d(1))
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


class Video3d(nn.Module):
    """A 3D CNN: Conv3d, BatchNorm3d, 3D pooling."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(3, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(6, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.AdaptiveAvgPool3d(1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


class UNet(nn.Module):
    """A small U-Net: a transposed conv up, a concatenated skip, per-pixel logits."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.enc1(x)
        b = self.enc2(F.max_pool2d(a, 2))
        return self.head(self.dec(torch.cat([self.up(b), a], 1)))


class TimmLinear(nn.Linear):
    """A Linear subclass whose forward calls F.linear (as timm's does)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Functional(nn.Module):
    """F.conv2d and F.linear on module parameters, a Linear subclass, a conv called twice."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b = nn.Parameter(torch.randn(8) * 0.1)
        self.bn = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = TimmLinear(8, 12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        y = F.relu(self.bn(F.conv2d(x, self.w, self.b, padding=1)))
        y = F.relu(self.shared(F.relu(self.shared(y))))
        y = F.relu(self.proj(y.mean((2, 3))))
        return F.linear(y, self.fc.weight, self.fc.bias)


def test_1d_and_3d_cnns_gate_and_prune_exactly():
    torch.manual_seed(0)
    for model, x in ((Audio1d(), torch.randn(2, 1, 64)), (Video3d(), torch.randn(2, 3, 4, 8, 8))):
        gated, _ = gate_and_check(model, x)
        assert {'body.0'} in [set(s) for s in gated.sources]


def test_a_unet_gates_its_transposed_conv_and_prunes_exactly():
    torch.manual_seed(0)
    gated, pruned = gate_and_check(UNet(), torch.randn(2, 3, 8, 8))
    assert any('up' in s for s in gated.sources)                   # gated, then sliced
    assert pruned.up.out_channels < 8 or pruned.up.in_channels < 16


def test_functional_calls_subclasses_and_a_module_called_twice_count_every_call():
    torch.manual_seed(0)
    model = Functional()
    gated, pruned = gate_and_check(model, torch.randn(2, 3, 6, 6))
    names = {layer.name for layer in gated.layers}
    assert {'w', 'shared', 'proj', 'fc.weight'} <= names
    positions = gated.sizes(torch.randn(1, 3, 6, 6))[0]
    assert positions['shared'] == 2 * 36                           # both calls counted


def test_frozen_batchnorm_is_gated_pruned_and_folded():
    """A detection backbone's FrozenBatchNorm2d: a BN with fixed statistics."""
    from torchvision.ops import FrozenBatchNorm2d
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.uniform_(0.5, 2)
                m.bias.normal_(0, 0.1)
    gated, pruned = gate_and_check(model, torch.randn(2, 3, 32, 32))
    assert sum(g.channels for g in gated.gates) > 1000
    folded = ge.fold_bn(pruned)
    frozen = [sum(isinstance(m, FrozenBatchNorm2d) for m in n.modules()) for n in (pruned, folded)]
    assert frozen[1] < frozen[0]
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(folded(x), pruned(x), atol=1e-4)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's fused norm and activation: a BN subclass that calls F.batch_norm."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, 0.1, self.eps)
        return F.relu(x)


def test_a_batchnorm_subclass_keeps_its_channels_gateable():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8), nn.Conv2d(8, 8, 3),
                          BatchNormAct2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    gated, _ = gate_and_check(model, torch.randn(2, 3, 8, 8))
    assert sum(g.channels for g in gated.gates) == 16


@torch.fx.wrap
def window_attention(x, weight):
    """A function torch.fx does not trace into (as swin_t's attention is)."""
    return F.linear(x, weight)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return window_attention(x, self.qkv.weight)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.attn = Attention()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)                   # (B, HW, 8)
        return self.head(self.attn(t).mean(1))


def test_macs_it_does_not_see_are_refused_or_counted_as_a_fixed_cost():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"attn \(Attention\) 1,024.*uncovered='fixed'"):
        ga.gate_any(Tokens(), x)
    with pytest.warns(UserWarning, match='fixed cost'):
        gated, _ = gate_and_check(Tokens(), x, uncovered='fixed')
    assert gated.sizes(x)[1] == 16 * 8 * 8                          # the attention's MACs


class LoRALinear(nn.Linear):
    """A Linear subclass with MACs beyond its weight's."""

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out)
        self.a = nn.Parameter(torch.randn(2, n_in))
        self.b = nn.Parameter(torch.randn(n_out, 2))

    def forward(self, x):
        return super().forward(x) + F.linear(F.linear(x, self.a), self.b)


def test_a_layer_with_unexpected_macs_is_refused_then_kept_whole_with_ignore():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), LoRALinear(8, 8), nn.ReLU(),
                          nn.Linear(8, 4))
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match=r"6 \(LoRALinear: 96 counted, 64 by its weights\).*"
                                         r"ignore=\['6'\]"):
        ga.gate_any(model, x)
    gated, _ = gate_and_check(model, x, ignore=['6'])
    assert gated.sources == [['0']]                                 # conv 2 feeds the kept one
    assert gated.sizes(x)[1] == 96                                  # a fixed cost


def drop_path(x, p, training):
    """timm's drop path: a per-sample 0/1 scale in training, nothing in evaluation."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep.div_(1 - p)


class Drops(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.conv(x))
        y = y + drop_path(F.relu(self.conv2(y)), 0.5, self.training)
        return self.head(F.dropout(y.mean((2, 3)), 0.5, self.training))


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_the_gated_net_follows_train_and_eval_whichever_mode_it_was_gated_in(mode):
    torch.manual_seed(0)
    model, x = Drops(), torch.randn(8, 3, 6, 6)
    gated = ga.gate_any(getattr(model, mode)(), x)
    assert gated.training == (mode == 'train')
    assert {'conv', 'conv2'} <= {s for src in gated.sources for s in src}   # drop path fixes none
    with gc.evaluation(gated, 'all_on'):
        assert torch.equal(gated(x)[0], gated(x)[0])
        assert torch.allclose(gated(x)[0], model.eval()(x), atol=1e-6)
    gated.train()
    for g in gated.gates:
        g.strategy = 'all_on'
    assert not torch.equal(gated(x)[0], gated(x)[0])                    # dropout in training


def test_outputs_keep_their_structure():
    Out = collections.namedtuple('Out', 'logits extra')

    class Structured(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.conv2 = nn.Conv2d(8, 8, 1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            f = F.relu(self.conv2(F.relu(self.conv(x)))).mean((2, 3))
            return Out(self.head(f), {'features': f, 'list': [f * 2, (f,)]})

    gated, pruned = gate_and_check(Structured(), torch.randn(2, 3, 6, 6))
    out = gated(torch.randn(2, 3, 6, 6))[0]
    assert isinstance(out, Out) and isinstance(out.extra['list'][1], tuple)
    assert isinstance(pruned(torch.randn(2, 3, 6, 6)), Out)


def test_a_literal_channel_permutation_fixes_the_channels_it_indexes():
    class Permuted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 6, 1)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            y = self.b(F.relu(self.a(x))[:, [7, 6, 5, 4, 3, 2, 1, 0]])
            return self.head(F.relu(y).mean((2, 3)))

    gated, _ = gate_and_check(Permuted(), torch.randn(2, 3, 4, 4))
    assert gated.sources == [['b']]                                   # a's channels fixed
    assert cg.channel_groups(Permuted(), torch.randn(1, 3, 4, 4)).fixed[0] == (
        'a', 8, 'a literal channel index in getitem() in the top module')
    assert gated.floor < 0.5        # a only feeds b: with b's outputs all off, a is skipped


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_errors_are_one_sentence_that_says_what_to_do():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), Branchy(), nn.ReLU(),
                          nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match=r"cannot trace 3 \(Branchy\).*torch\.fx\.wrap.*"
                                         r"ignore=\['3'\]"):
        ga.gate_any(model, x)
    gated, _ = gate_and_check(model, x, ignore=['3'])                 # kept whole: a fixed cost
    assert gated.sizes(x)[1] == 8 * 8 * 16
    with pytest.raises(ValueError, match=r'ignore names no module'):
        ga.gate_any(model, x, ignore=['nope'])
    # issue 45.6: a model that runs but whose trace the analysis cannot: said as that, with
    # the op, not as an input of the wrong size; one that cannot run on it: said as that
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten())
    broken = cg._Analysis.rule

    def failing(self, node, *a):
        if node.op == 'call_module' and node.target == '1':
            raise RuntimeError('an op the analysis cannot follow')
        return broken(self, node, *a)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cg._Analysis, 'rule', failing)
        with pytest.raises(ValueError, match=r'runs on example_input .* channel analysis of its '
                                             r'torch\.fx trace failed at 1 \(ReLU\).*ignore='):
            ga.gate_any(plain, x)
    with pytest.raises(ValueError, match=r'cannot run on example_input \(2, 5, 6, 6\)'):
        ga.gate_any(plain, torch.randn(2, 5, 6, 6))
    with pytest.raises(ValueError, match=r'prune\(model\)'):
        gs.SkipNet(gated)
    with pytest.raises(ValueError, match=r'prune the gated net first'):
        ge.fold_bn(gated)


def test_pruned_equals_gated_to_float64_rounding_so_the_float32_bound_is_rounding():
    """Issue 32: efficientnet_b0 at 96 x 96 (random weights, BN statistics of the input). In
    float64 the pruned net and threshold inference agree to 1e-12 of the largest logit: the
    same function, so the README's float32 bound (1e-4) only has to cover rounding. Also the
    pruned net of a float64 GatedNet (it was built with a float32 probe input)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    model = gc.recalibrate_bn(torchvision.models.efficientnet_b0(num_classes=10).double().eval(),
                              [x])
    gated = random_decisions(ga.gate_any(model, x))
    gated.gates[0].logits.data[:, 1] = 3.0                   # the stem on: a live signal
    with torch.no_grad():
        logits = gated(x)[0]
        pruned = ge.prune(gated)
        assert (pruned(x) - logits).abs().max() <= 1e-12 * logits.abs().max()


def test_a_target_below_what_the_gates_can_remove_is_said():
    """Issue 45.5: GroupNorm fixes the channels of the convs around it, so here the gates can
    remove only conv1's output and conv2's input: gate_any says which t cannot be reached,
    the net records that floor, and the training scripts warn for a t below it."""
    import contextlib
    import io
    import train_loop as tl
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    hw = 8 * 8
    fixed = 2 * 32 * 32 * 9 * hw + 32 * 10                  # conv3, conv4, the classifier
    total = 3 * 32 * 9 * hw + 32 * 32 * 9 * hw + fixed
    with pytest.warns(UserWarning, match=rf't below {fixed / total:.2f} cannot be reached'):
        gated = ga.gate_any(model, torch.randn(2, 3, 8, 8))
    assert gated.floor == pytest.approx(fixed / total)
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        tl.warn_below_floor(gated, 0.5)
        tl.warn_below_floor(gated, 0.9)
    lines = said.getvalue().splitlines()
    assert len(lines) == 1 and 't = 0.5 is below 0.65' in lines[0]


def test_what_only_feeds_a_constant_is_neither_computed_nor_counted():
    """Issue 45.5: a conv whose outputs are all off computes a constant, reading only its
    input's shape; the layers that only feed it (here b, through BN, ReLU and an add with c)
    are skipped: FLOPs(Z) leaves them out and the pruned net runs them as constants, still
    equal to the gated net. A layer that also feeds the output (a) still runs."""
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (nn.Conv2d(3 if k == 0 else 8, 8, 3, padding=1)
                                      for k in range(3))
            self.bn = nn.BatchNorm2d(8)
            self.d, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            u = torch.relu(self.bn(self.b(h))) + self.c(h)
            return self.head(torch.cat([h, self.d(u)], 1)).mean((2, 3))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gated = ga.gate_any(randomized(Decoder()), x)
    by = {tuple(s): g for s, g in zip(gated.sources, gated.gates)}
    with torch.no_grad():
        for sources, g in by.items():
            on = -4.0 if sources == ('d',) else 4.0                 # d's outputs all off
            g.logits.copy_(torch.tensor([[-on / 2, on / 2]]).repeat(g.channels, 1))
    gated.eval()
    logits, info = gated(x)
    pruned = ge.prune(gated)
    hw = 8 * 8
    assert info.macs[0].item() == 9 * hw * 3 * 8 + hw * 8 * 4          # a, and head on h
    assert ge.counted_macs(pruned, x[:1]) == info.macs[0].item()
    assert (pruned(x) - logits).abs().max() <= 1e-5 * logits.abs().max()
    consumers = {layer.name: layer.consumers for layer in gated.layers}
    assert consumers['b'] == consumers['c'] == ['d'] and consumers['a'] == ['b', 'c', 'head']
    assert consumers['head'] is None                                   # the network's output
    assert isinstance(pruned.get_submodule('b'), ge.Constant)


def test_ops_that_refuse_a_tensor_with_no_channel_run_and_the_pruned_net_loads_again():
    """A pool (a module, and a function) after a conv whose outputs are all off gets a tensor
    with no channel, which torch refuses: the pruned net runs it on one zero channel (both
    now modules, gumbel_export._OnEmpty), equal to the gated net, at the MACs FLOPs(Z)
    counts; and torch.load of its pruned.pt, which retraces the code, gives it back (the
    function's rewrite had a shape test in the traced code: torch.load raised TraceError)."""
    class Pools(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(3, 4, 1)
            self.pool = nn.AdaptiveMaxPool2d(4)

        def forward(self, x):
            y = F.adaptive_max_pool2d(self.pool(torch.relu(self.a(x))), 2)
            return self.b(y).mean((2, 3)) + self.c(x).mean((2, 3))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 10)
    gated = ga.gate_any(Pools(), x)
    with torch.no_grad():
        for sources, g in zip(gated.sources, gated.gates):
            g.logits[:, 1] = -8.0 if sources == ['a'] else 8.0             # a's outputs off
    gated.eval()
    logits, info = gated(x)
    pruned = ge.prune(gated)
    assert [type(m.module).__name__ if hasattr(m, 'module') else m.function
            for m in pruned.modules() if isinstance(m, ge._OnEmpty)] == [
        'AdaptiveMaxPool2d', 'torch.nn.functional.adaptive_max_pool2d']
    assert ge.counted_macs(pruned, x[:1]) == info.macs[0].item() == 10 * 10 * 3 * 4   # c alone
    assert (pruned(x) - logits).abs().max() <= 1e-6 * logits.abs().max()
    buf = io.BytesIO()
    torch.save(pruned, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), pruned(x))


def test_a_dead_layer_is_counted_and_kept_and_a_full_slice_is_the_whole_dimension():
    """Issue 42.4 and 42.6: a conv whose output nothing reads runs in the gated net and is
    counted by FLOPs(Z), so the pruned net runs it too (it was removed: 351,232 counted vs
    343,040 run on WaveNet); x[:, :C] on C channels (ghostnet's out[:, :self.out_chs]) is
    the whole dimension and leaves the channels gateable."""
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.unused, self.head = nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            self.unused(h)                                  # computed, never read
            return self.head(torch.relu(self.b(h))[:, :8].mean((2, 3)))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gated, pruned = gate_and_check(Dead(), x)
    assert sum(g.channels for g in gated.gates) == 24       # a's, b's (sliced whole), unused's
    assert isinstance(pruned.get_submodule('unused'), nn.Module)


class _TemporalBlock(nn.Module):
    """locuslab's TCN block: conv1 and conv2 registered as themselves and again in `net`."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv1d(cout, cout, 3, padding=1)
        self.net = nn.Sequential(self.conv1, nn.ReLU(), self.conv2, nn.ReLU())
        self.downsample = nn.Conv1d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        res = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.net(x) + res)


def test_a_module_registered_twice_is_counted_under_both_names():
    """Issue 42.5: a conv registered twice (locuslab TCN: self.conv1 and self.net[0]) runs
    inside both parents; its MACs count there, so nothing is refused as unseen, and it gates
    and prunes exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(_TemporalBlock(3, 16), _TemporalBlock(16, 16))
    model.append(nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter('error')                      # no uncovered='fixed' needed
        gated, pruned = gate_and_check(model, torch.randn(2, 3, 20))
    assert gated.floor < 0.5


def _channel_shuffle(x, groups):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class _ShuffleUnit(nn.Module):
    """ShuffleNet v1's unit: grouped 1x1 convs around a channel shuffle and a depthwise conv."""

    def __init__(self, c, groups=4):
        super().__init__()
        self.groups = groups
        self.a, self.bn1 = nn.Conv2d(c, c, 1, groups=groups), nn.BatchNorm2d(c)
        self.dw, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)
        self.b, self.bn3 = nn.Conv2d(c, c, 1, groups=groups), nn.BatchNorm2d(c)

    def forward(self, x):
        h = _channel_shuffle(torch.relu(self.bn1(self.a(x))), self.groups)
        return torch.relu(x + self.bn3(self.b(self.bn2(self.dw(h)))))


def test_one_group_covering_the_net_is_said():
    """Issue 42.8: grouped 1x1 convs and a channel shuffle tie every channel into one decision;
    gate_any says so (it still gates and prunes exactly). decision_macs, which finds it, is
    any_macs(all on) - any_macs(all on but one column), column by column."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          _ShuffleUnit(32), _ShuffleUnit(32), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 10))
    with pytest.warns(UserWarning, match='one group covering the net'):
        gated = ga.gate_any(model, torch.randn(2, 3, 16, 16))
    assert sum(g.channels for g in gated.gates) == 1
    for model, x in ((model, torch.randn(2, 3, 16, 16)),
                     (nn.Sequential(_TemporalBlock(3, 8), _TemporalBlock(8, 6),
                                    nn.Conv1d(6, 6, 3, groups=2)), torch.randn(2, 3, 12))):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')                   # the shuffle net's, seen above
            gated = ga.gate_any(model, x)
        positions = gated.sizes(x)[0]
        n = sum(g.channels for g in gated.gates)
        z = torch.ones(n + 1, n + 1, dtype=torch.float64)
        z[torch.arange(n), torch.arange(n)] = 0                # row j: column j off
        macs = ga.any_macs(gated.layers, positions, z)
        assert ga.decision_macs(gated.layers, positions, n).tolist() == \
            (macs[-1] - macs[:-1]).tolist()


def test_a_prelu_per_channel_is_sliced_with_its_channels():
    """Issue 42.3: PReLU(C) (iresnet) passes its channels through and its C slopes are sliced
    with them (prune failed on the unsliced weight); PReLU() with one slope is elementwise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(),   # (all off: the helper)
                          nn.Conv2d(8, 8, 3, padding=1), nn.PReLU(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[3].weight.uniform_(-1, 1)                      # slopes that differ per channel
    gated, pruned = gate_and_check(model, torch.randn(2, 3, 8, 8))
    kept = int(gated.gates[1].kept().sum())
    assert 0 < kept < 8                                      # some channels gone, some kept
    prelu = pruned.get_submodule('3')
    assert prelu.weight.numel() == prelu.num_parameters == kept


class _StdConv(nn.Conv2d):
    """Weight standardization: the forward uses the standardized weight, not self.weight."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _GainConv(nn.Conv2d):
    """ScaledStdConv2d's shape: a per-output-channel gain beside the weight."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.gain, self.bias, self.stride, self.padding)


class _OwnForwardConv(nn.Conv2d):
    """A forward of its own that computes what Conv2d's does (timm's Conv2dSame, say)."""

    def forward(self, x):
        return super().forward(x)


@pytest.mark.parametrize('kind', ['standardized', 'gain', 'parametrized', 'old weight_norm'])
def test_a_layer_that_reworks_its_weight_is_kept_whole_with_a_warning(kind):
    """Issue 42.2: a conv whose output is not conv(x, its stored weight) (its own forward, a
    parametrization, a hook) was sliced like a plain conv: the pruned net silently computed
    something else, or prune failed. It is kept whole, named in a warning, and the rest of
    the net still gates and prunes exactly. A layer before it with a forward of its own that
    computes the same (checked first, as it runs first) is not named, and does not hide the
    one after it (its check's hook once replaced its output, and nothing later was seen). The
    old weight_norm is refused whatever runs before it (its weight, computed with grad, has no
    deepcopy: the gated net's copies would fail later)."""
    torch.manual_seed(0)
    odd = {'standardized': lambda: _StdConv(8, 8, 3, padding=1),
           'gain': lambda: _GainConv(8, 8, 3, padding=1),
           'parametrized': lambda: torch.nn.utils.parametrizations.weight_norm(
               nn.Conv2d(8, 8, 3, padding=1)),
           'old weight_norm': lambda: torch.nn.utils.weight_norm(
               nn.Conv2d(8, 8, 3, padding=1))}[kind]()
    model = nn.Sequential(_OwnForwardConv(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), odd, nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(2, 3, 8, 8)
    if kind == 'old weight_norm':     # its weight, computed with grad, cannot be deep-copied
        with pytest.raises(ValueError, match='remove_weight_norm first or use torch.nn.utils'
                                             '.parametrizations.weight_norm'):
            ga.gate_any(model, x)
        return                        # (a forward with grad recomputes it so, every time)
    with pytest.warns(UserWarning, match=r'4 \(.*\) computed from more than its weight'):
        gated, pruned = gate_and_check(model, x)
    assert sum(g.channels for g in gated.gates) == 16     # conv0's and conv6's outputs


def test_a_split_size_written_into_the_code_fixes_the_channels_it_splits():
    """Issue 42.1: x.split(4, dim=1) with a literal 4 (res2net, cspresnet) was paired like
    chunk(2), and prune crashed (the pruned width no longer splits into 4s); now those
    channels are fixed and the rest gates and prunes exactly. A size computed from the
    input's shape follows the pruned width, as chunk does."""
    class Literal(nn.Module):
        def __init__(s):
            super().__init__()
            s.z = nn.Conv2d(3, 3, 1)          # the first gate module (the helper: all off)
            s.a, s.b, s.c = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            s.d = nn.Conv2d(8, 8, 1)

        def forward(s, x):
            p, q = s.a(s.z(x)).split(4, dim=1)
            return s.d(torch.cat([s.b(p), s.c(q)], 1)).mean((2, 3))

    class Computed(Literal):
        def forward(s, x):
            h = s.a(s.z(x))
            p, q = h.split(h.shape[1] // 2, dim=1)
            return s.d(torch.cat([s.b(p), s.c(q)], 1)).mean((2, 3))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    gated, _ = gate_and_check(Literal(), x)
    assert not any('a' in src for src in gated.sources)        # a's outputs: fixed
    gated, _ = gate_and_check(Computed(), x)
    assert any('a' in src for src in gated.sources)            # a's outputs: paired, gated


@pytest.mark.parametrize('affine', [False, True])
def test_instance_norm_and_reflection_padding_keep_channels_gateable(affine):
    """Issue 42.7: InstanceNorm (a CycleGAN generator's) normalizes each channel alone and
    ReflectionPad2d pads each alike: both pass their channels through (an InstanceNorm's
    affine parameters and statistics sliced with them); GroupNorm still fixes its channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(),
                          nn.ReflectionPad2d(1), nn.Conv2d(4, 8, 3),
                          nn.InstanceNorm2d(8, affine=affine, track_running_stats=affine),
                          nn.ReLU(), nn.ReflectionPad2d(1), nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8),
                          nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if affine:
        with torch.no_grad():
            model[4].weight.uniform_(0.5, 2), model[4].bias.uniform_(-1, 1)
    gated, pruned = gate_and_check(model, torch.randn(2, 3, 8, 8))
    assert [len(src) for src in gated.sources] and any('3' in src for src in gated.sources)
    assert not any('7' in src for src in gated.sources)        # into the GroupNorm: fixed


TIMM_EXACT = ['resnet18d', 'regnetx_002', 'mobilenetv3_small_050', 'ghostnet_100',
              'cspresnet50', 'convnext_atto']


@pytest.mark.parametrize('name', TIMM_EXACT)
def test_timm_models_gate_and_prune_exactly(name):
    """Issue 42 (optional: with timm installed, as .ci/run does): models people bring from
    timm, each a rule of the analysis (a deep stem and average-pool shortcut, SE, a slice to
    out_chs, a literal split and cross-stage partial concatenation, LayerNorm2d) gate and
    prune exactly."""
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='gate_any: only')    # convnext: 12% fixed
        gate_and_check(model, torch.randn(2, 3, 64, 64))


def test_timms_scaled_weight_standardization_is_kept_whole_and_said():
    """nf_resnet26's ScaledStdConv2d standardizes its weight over its inputs: every one is
    named and kept whole, so nothing is left to prune, which prune says."""
    timm = pytest.importorskip('timm')
    model = timm.create_model('nf_resnet26', pretrained=False, num_classes=10).eval()
    with pytest.warns(UserWarning, match=r'stages\.3\.1\.conv3 \(ScaledStdConv2d'):
        gated = ga.gate_any(model, torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match='no gates'):
        ge.prune(gated)
