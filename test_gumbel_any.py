"""gumbel_any: the paper's static gates on any CNN, one test per model family (issue 21): the
channel groups are found, FLOPs(Z) is the pruned net's counted MACs exactly, and the pruned
net computes the thresholded gated net."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import gumbel_any as ga
import gumbel_channels as gc
import gumbel_export as ge

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
    assert bns[1] < bns[0]                          # those after a conv (not a constant) folded
    assert torch.allclose(folded(x), pruned(x), atol=1e-5)
    program = torch.export.export(folded, (x,))
    assert torch.allclose(program.module()(x), pruned(x), atol=1e-5)


def test_flops_of_any_cnn_are_differentiable_and_the_paper_losses_apply():
    gated = ga.gate_any(UserCNN(), torch.randn(2, 3, 16, 16)).train()
    logits, info = gated(torch.randn(4, 3, 16, 16))
    loss = gc.flops_loss(info, 0.5) + gc.batch_activation_loss(info, 0.5) \
        + gc.polarization_loss(info)
    loss.backward()
    assert all(g.logits.grad is not None and g.logits.grad.abs().sum() > 0 for g in gated.gates)
    assert len(gc.param_groups(gated, 0.1)) == 2


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
