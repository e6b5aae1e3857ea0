"""One test per claim of the paper (section numbers refer to Herrmann, Bowen and Zabih,
ECCV 2020).

Statistical tests use 5-sigma bounds: a correct implementation fails one with probability
below 6e-7 per comparison. Float comparisons state where their tolerance comes from.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings, strategies as st

import gumbel_channels as gc
import gumbel_export as ge

CONFIGS = [(g, k) for g in ('static', 'dynamic') for k in ('channel', 'layer')]
U64 = 2.0 ** -53                       # float64 unit roundoff


def all_on(model):
    return gc.set_inference(model.eval(), 'all_on')


def set_static_logits(model, fn):
    """Overwrite every static gate's logits (C, 2) with fn(C) -> (C, 2)."""
    with torch.no_grad():
        for g in gc.gates(model):
            g.logits.copy_(fn(g.channels))


# ------------------------------------------------------------------- Property 1 (3.1)

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 2), st.data())
def test_property1_closed_form_equals_enumeration(g, b, data):
    """E[L_B] = (t - E[Q])^2 + Var(Q), checked against every one of the 2^(G*B) outcomes."""
    p = torch.tensor(
        data.draw(st.lists(st.floats(0, 1), min_size=g, max_size=g)), dtype=torch.float64
    )
    t = data.draw(st.floats(0.01, 1))
    expected = 0.0
    for bits in itertools.product((0, 1), repeat=g * b):
        z = torch.tensor(bits, dtype=torch.float64).view(b, g)      # Z_ij, sample j, gate i
        prob = torch.prod(torch.where(z == 1, p, 1 - p)).item()
        expected += prob * (t - z.mean().item()) ** 2
    bias_sq, var = gc.expected_activation_loss(p, t, b)
    # each side is a sum of at most 64 products of float64 numbers in [0, 1]
    assert abs((bias_sq + var).item() - expected) <= 256 * U64


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0]), max_size=6), st.floats(1e-6, 1 - 1e-6),
       st.floats(0.01, 1), st.integers(1, 512))
def test_property1_expected_loss_positive_unless_polarized(polarized, p_mid, t, b):
    """The variance term is 0 iff every gate is polarized, so E[L_B] > 0 with any p in (0, 1)."""
    bias_sq, var = gc.expected_activation_loss(
        torch.tensor(polarized + [p_mid], dtype=torch.float64), t, b
    )
    assert var > 0 and bias_sq + var > 0
    if polarized:
        _, var_polar = gc.expected_activation_loss(
            torch.tensor(polarized, dtype=torch.float64), t, b
        )
        assert var_polar == 0


def test_variance_decomposition_matches_monte_carlo():
    """Mean of Eq. (1) over N sampled batches of a static gate = bias^2 + Var(Q) (Property 1)."""
    torch.manual_seed(0)
    n, b, t, p = 40_000, 2, 0.3, torch.tensor([0.1, 0.5, 0.7, 0.95])
    gate = gc.StaticGate(len(p)).train()
    with torch.no_grad():
        gate.logits.copy_(torch.stack([torch.zeros(4), torch.logit(p)], 1))
    z, _ = gate(torch.zeros(n * b, 1, 1, 1))                                # (N*B, G)
    losses = (t - z.view(n, b, -1).mean((1, 2))) ** 2                       # N draws of L_B
    bias_sq, var = gc.expected_activation_loss(p.double(), t, b)
    sigma = losses.double().std() / math.sqrt(n)
    assert abs(losses.double().mean() - (bias_sq + var)) < 5 * sigma
    assert losses.double().mean() - bias_sq > 5 * sigma  # the variance term is real


# ------------------------------------------------------------------- weight decay (3.2)

@settings(max_examples=200, deadline=None)
@given(st.floats(-10, 10), st.floats(-10, 10))
def test_weight_decay_identity(w0, w1):
    """w0^2 + w1^2 = 1/2((w0 + w1)^2 + ln((1-p)/p)^2), p the gate's own on-probability."""
    gate = gc.StaticGate(1).double().eval()
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([[w0, w1]], dtype=torch.float64))
    _, p = gate(torch.zeros(1, 1, 1, 1))
    p = p.item()
    log_odds = math.log((1 - p) / p)
    rhs = 0.5 * ((w0 + w1) ** 2 + log_odds ** 2)
    # p carries a few ulps of error (|dp| <= 4u); d ln((1-p)/p) = dp / (p (1-p)); the squares
    # and sums add a few ulps of their magnitudes
    d_log = 4 * U64 / (p * (1 - p)) + 4 * U64 * abs(log_odds)
    tol = abs(log_odds) * d_log + d_log ** 2 + 8 * U64 * (w0 ** 2 + w1 ** 2 + rhs)
    assert abs(w0 ** 2 + w1 ** 2 - rhs) <= tol


# ------------------------------------------------------------------- estimator (1.1, 3.2)

def test_estimator_forward_is_exactly_binary():
    logits = torch.randn(1000, 2, requires_grad=True) * 3
    z = gc.straight_through_gumbel(logits, temperature=0.7)
    assert z.shape == (1000,) and ((z == 0) | (z == 1)).all()
    assert z.requires_grad                       # binary forward, yet differentiable


@pytest.mark.parametrize('p', [0.02, 0.3, 0.5, 0.9, 0.98])
def test_estimator_on_rate_within_binomial_bound(p):
    """P(Z = 1) = p, and F.gumbel_softmax(hard=True) has the same distribution."""
    torch.manual_seed(1)
    n = 200_000
    logits = torch.tensor([0.0, math.log(p / (1 - p))]).expand(n, 2)
    bound = 5 * math.sqrt(p * (1 - p) / n)                                  # binomial, 5 sigma
    assert abs(gc.straight_through_gumbel(logits).mean().item() - p) < bound
    assert abs(F.gumbel_softmax(logits, hard=True)[:, 1].mean().item() - p) < bound


@pytest.mark.parametrize('temp', [1.0, 0.5, 2.0])
def test_estimator_backward_is_soft_sample_gradient(temp):
    """The backward pass is that of the soft sample sigmoid((w1 - w0 + L) / T) with the
    same noise L, i.e. dZ/dw1 = -dZ/dw0 = s (1 - s) / T; the temperature T is honoured."""
    logits = torch.randn(500, 2).requires_grad_()
    weights = torch.randn(500)
    gen = torch.Generator().manual_seed(7)
    (weights * gc.straight_through_gumbel(logits, temp, generator=gen)).sum().backward()
    u = torch.rand(500, generator=torch.Generator().manual_seed(7)).clamp(min=torch.finfo().tiny)
    s = torch.sigmoid(
        (logits[:, 1] - logits[:, 0] + torch.log(u) - torch.log1p(-u)) / temp
    ).detach()
    expected = weights * s * (1 - s) / temp
    # same float32 operations in another order: default float32 tolerances (rtol 1.3e-6)
    torch.testing.assert_close(logits.grad[:, 1], expected)
    torch.testing.assert_close(logits.grad[:, 0], -expected)


@pytest.mark.parametrize('d', [-2.0, 1.0, 3.0])
def test_soft_relaxation_stays_in_0_1_and_rounds_to_the_hard_sample(d):
    """3.2's soft version, Z = sigmoid(w1 - w0 + L) in (0, 1). Rounded it is the hard sample
    (P = p); its mean is not p but a/(a-1) (1 - ln a/(a-1)), a = e^d, nearer 1/2 (NOTES.md).
    float64, because float32 rounds sigmoid(y) to exactly 1 for y > 17."""
    torch.manual_seed(2)
    n, p, a = 200_000, 1 / (1 + math.exp(-d)), math.exp(d)
    soft = gc.straight_through_gumbel(
        torch.tensor([0.0, d], dtype=torch.float64).expand(n, 2), hard=False
    )
    assert ((soft > 0) & (soft < 1)).all()
    assert abs((soft > 0.5).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    closed = a / (a - 1) * (1 - math.log(a) / (a - 1))
    assert abs(soft.mean().item() - closed) < 5 * soft.std().item() / math.sqrt(n)
    model = gc.set_sampling(gc.resnet_cifar(8, gating='static'), soft=True).train()
    z = torch.cat(model(torch.randn(4, 3, 32, 32))[1].z, 1)
    assert ((z > 0) & (z < 1)).any()                        # the gates train on soft values


def test_per_batch_sampling_draws_one_decision_per_gate_for_the_whole_batch():
    """set_sampling(per_batch=True): static gates share one draw across the batch (every row
    equal), still with P(Z = 1) = p over batches (binomial bound); per sample by default."""
    torch.manual_seed(3)
    gate = gc.StaticGate(2000).train()
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([0.0, math.log(0.3 / 0.7)]).expand(2000, 2))
    z, _ = gate(torch.zeros(16, 1, 1, 1))
    assert not (z == z[:1]).all()                           # per sample by default
    gate.per_batch = True
    z, _ = gate(torch.zeros(16, 1, 1, 1))
    assert (z == z[:1]).all() and abs(z[0].mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 2000)
    model = gc.set_sampling(gc.resnet_cifar(8, gating='static'), per_batch=True, temperature=0.5)
    assert all(g.per_batch and g.temperature == 0.5 for g in gc.gates(model))
    assert 'per_batch=True' in repr(gc.gates(model)[0])     # the settings show in repr


# ------------------------------------------------------------------- FLOPs (3.4)

@pytest.mark.parametrize('depth', [20, 32, 44, 56, 110])
def test_flops_equal_flop_counter_cifar(depth):
    """info.macs with all gates on = FlopCounterMode / 2 (gates' own MACs included), and
    info.max_macs = the dense network's count."""
    x = torch.randn(2, 3, 32, 32)
    dense_macs = ge.counted_macs(gc.resnet_cifar(depth).eval(), x[:1])
    for gating, granularity in CONFIGS:
        model = all_on(gc.resnet_cifar(depth, gating=gating, granularity=granularity))
        _, info = model(x)
        assert info.macs.tolist() == [ge.counted_macs(model, x[:1])] * 2
        assert info.max_macs == dense_macs


@pytest.mark.parametrize('arch', ['resnet18', 'resnet34', 'resnet50'])
def test_flops_equal_flop_counter_torchvision(arch):
    x = torch.randn(1, 3, 224, 224)
    tv = getattr(torchvision.models, arch)().eval()
    dense_macs = ge.counted_macs(tv, x)
    for gating, granularity in CONFIGS:
        model = all_on(gc.gate_resnet(tv, gating, granularity))
        _, info = model(x)
        assert info.macs.item() == ge.counted_macs(model, x)
        assert info.max_macs == dense_macs


def test_headline_mac_counts(capsys):
    """ResNet-56 at 32x32: 125.49 M MACs; torchvision ResNet-50 at 224x224: 4,089,184,256."""
    r56 = ge.counted_macs(gc.resnet56().eval(), torch.randn(1, 3, 32, 32))
    r50 = ge.counted_macs(torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224))
    _, info = all_on(gc.resnet56(gating='static'))(torch.randn(1, 3, 32, 32))
    with capsys.disabled():
        print(f'\nheadline MACs: CIFAR ResNet-56 {r56:,} ({r56 / 1e6:.2f} M, gated all-on '
              f'{info.macs.item():,.0f}); torchvision ResNet-50 {r50:,}')
    assert round(r56 / 1e6, 2) == 125.49 and info.macs.item() == r56
    assert r50 == 4_089_184_256


def test_flops_follow_the_gates():
    """Per-sample MACs fall by exactly each off channel's conv cost (a BasicBlock channel
    costs 3*3*C_in*H*W in conv1 plus 3*3*C_out*H*W in conv2)."""
    model = gc.resnet20(gating='static').eval()
    set_static_logits(model, lambda c: torch.tensor([[0.0, 5.0]]).repeat(c, 1))  # all on
    with torch.no_grad():
        model.layer2[1].gate1.logits[:3] = torch.tensor([5.0, 0.0])            # 3 channels off
    _, info = model(torch.randn(1, 3, 32, 32))
    assert info.max_macs - info.macs.item() == 3 * (9 * 32 * 16 * 16 + 9 * 32 * 16 * 16)


# ------------------------------------------------------------------- equivalences (3.3, 4.4)

def test_off_channel_contributes_exactly_zero():
    """Fig. 1: an off channel is a block of zeros, so the gated net equals the dense net
    whose next conv ignores that channel (its input weights zeroed)."""
    torch.manual_seed(0)
    gated = gc.resnet20(gating='static')
    set_static_logits(gated, lambda c: torch.randn(c, 2) * 3)
    dense = gc.resnet20()
    dense.load_state_dict(gated.state_dict(), strict=False)
    gated.eval(), dense.eval()
    with torch.no_grad():
        for block, d_block in zip(gated.blocks(), dense.blocks()):
            p = torch.sigmoid(block.gate1.logits[:, 1] - block.gate1.logits[:, 0])
            d_block.conv2.weight[:, p <= 0.5] = 0
    x = torch.randn(4, 3, 32, 32)
    logits, info = gated(x)
    assert 0 < torch.cat(info.z, 1).mean() < 1
    # equal up to float32 summation order in the two convolutions (products are exactly 0 in both)
    torch.testing.assert_close(logits, dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('gating,granularity', CONFIGS)
def test_all_gates_on_computes_the_dense_function(gating, granularity):
    """Same weights, every Z = 1: the gated network computes the dense network exactly."""
    torch.manual_seed(0)
    dense = gc.resnet20().eval()
    gated = gc.resnet20(gating=gating, granularity=granularity)
    missing, unexpected = gated.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all('gate' in k for k in missing)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(all_on(gated)(x)[0], dense(x))
    for arch in ('resnet18', 'resnet50'):
        tv = getattr(torchvision.models, arch)().eval()
        x = torch.randn(2, 3, 64, 64)
        assert torch.equal(all_on(gc.gate_resnet(tv, gating, granularity))(x)[0], tv(x))


@pytest.mark.parametrize('gating,granularity', CONFIGS)
def test_threshold_inference_is_deterministic(gating, granularity):
    """Evaluation mode thresholds p at tau (0.5 by default): Z = [p > tau], the same every run."""
    torch.manual_seed(0)
    model = gc.resnet20(gating=gating, granularity=granularity)
    if gating == 'static':
        set_static_logits(model, lambda c: torch.randn(c, 2))
    else:                                        # spread the dynamic gates' probabilities
        for g in gc.gates(model):
            torch.nn.init.normal_(g.fc2.weight, std=2.0)
    model.eval()
    x = torch.randn(8, 3, 32, 32)
    (y1, i1), (y2, i2) = model(x), model(x)
    assert torch.equal(y1, y2)
    for z, z_again, p in zip(i1.z, i2.z, i1.p):
        assert torch.equal(z, z_again) and torch.equal(z, (p > 0.5).float())
    gc.set_inference(model, 'threshold', tau=0.8)
    _, i3 = model(x)
    assert all(torch.equal(z, (p > 0.8).float()) for z, p in zip(i3.z, i3.p))
    model.train()
    _, i4 = model(x)                             # training always samples
    assert not all(torch.equal(z, (p > 0.8).float()) for z, p in zip(i4.z, i4.p))


@pytest.mark.parametrize('gating', ['static', 'dynamic'])
def test_layer_gate_off_makes_the_block_its_shortcut(gating):
    """Z = 0 on a layer gate: block(x) = ReLU(shortcut(x)) and its branch costs no MACs."""
    torch.manual_seed(0)
    cifar = gc.resnet20(gating=gating, granularity='layer').eval()
    tv = gc.gate_resnet(torchvision.models.resnet18(), gating, 'layer').eval()
    for block, x, shortcut_macs in (
            (cifar.layer2[0], torch.randn(2, 16, 32, 32), 0),                 # option-A shortcut
            (cifar.layer1[1], torch.randn(2, 16, 32, 32), 0),                 # identity
            (tv.layer2[0], torch.randn(2, 64, 16, 16), 8 * 8 * 64 * 128)):    # 1x1 conv, stride 2
        with torch.no_grad():
            if gating == 'static':
                block.gate.logits.copy_(torch.tensor([[5.0, -5.0]]))
            else:
                block.gate.fc2.bias.copy_(torch.tensor([50.0, -50.0]))
        out, decisions = block(x)
        shortcut = x if block.downsample is None else block.downsample(x)
        assert decisions['gate'][0].eq(0).all() and torch.equal(out, F.relu(shortcut))
        macs, _ = gc.block_macs(block, x.shape[-2:], {'gate': decisions['gate'][0]})
        assert macs.tolist() == [shortcut_macs + block.gate.macs] * 2


def test_polarized_gates_make_sampling_equal_thresholding():
    """3.3: with every p polarized, stochastic inference (and its ensemble) is the threshold net."""
    torch.manual_seed(0)
    model = gc.resnet20(gating='static')
    set_static_logits(model, lambda c: torch.tensor([[-40.0, 40.0]]) * torch.randn(c, 1).sign())
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)[0].softmax(1)
    torch.testing.assert_close(gc.ensemble_predict(model, x, runs=4), expected)
    votes = gc.ensemble_predict(model, x, runs=4, vote=True)
    assert torch.equal(votes, F.one_hot(expected.argmax(1), 10).float())
    assert all(g.strategy == 'threshold' for g in gc.gates(model)) and not model.training


# ------------------------------------------------------------------- losses (1.2, 2.1, 3.4)

def test_losses_follow_their_equations():
    z = [torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0], [1.0]])]
    info = gc.GateInfo(z, z, torch.tensor([30.0, 50.0], dtype=torch.float64), 100)
    assert gc.batch_activation_loss(info, 0.5).item() == pytest.approx((0.5 - 4 / 6) ** 2)
    assert gc.flops_loss(info, 0.5).item() == pytest.approx((0.5 - 0.4) ** 2)
    assert gc.per_gate_loss(info, [0.5, 0.25]).item() == pytest.approx(
        ((0.5 - 0.75) ** 2 + 0.25**2) / 2
    )
    p = [torch.tensor([[0.5, 0.0], [0.5, 1.0]]), torch.tensor([[0.1], [0.9]])]
    info = gc.GateInfo(z, p, info.macs, 100)
    far = math.log(99)                                      # |logit| of a polarized edge
    assert gc.polarization_loss(info).item() == pytest.approx(
        (far + 0 + far + 0 + 2 * (far - math.log(9))) / 6, rel=1e-5)


def test_polarization_term_moves_undecided_gates_at_one_pace():
    """Deviation 20: the term's gradient on a gate's logit difference is the same at p = 0.6
    and p = 0.95 (toward the nearer pole), and 0 once the gate is polarized."""
    d = torch.tensor([[math.log(1.5), math.log(19), -math.log(19), 6.0]], requires_grad=True)
    info = gc.GateInfo([d], [torch.sigmoid(d)], torch.zeros(1, dtype=torch.float64), 1)
    gc.polarization_loss(info).backward()
    assert d.grad[0].tolist() == pytest.approx([-0.25, -0.25, 0.25, 0.0], rel=1e-4)


@pytest.mark.parametrize('gating', ['static', 'dynamic'])
def test_flops_loss_gradient_reaches_every_gate(gating):
    """Straight-through: L_FLOPs sends a gradient to every gate module's parameters."""
    torch.manual_seed(0)
    model = gc.resnet20(gating=gating).train()
    _, info = model(torch.randn(8, 3, 32, 32))
    gc.flops_loss(info, 0.3).backward()
    for g in gc.gates(model):
        assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in g.parameters())


# ------------------------------------------------------------------- training set-up (3.2, 4.1)

@pytest.mark.parametrize('gating,granularity', CONFIGS)
def test_param_groups_scale_gate_decay_by_the_number_of_gates(gating, granularity):
    model = gc.resnet20(gating=gating, granularity=granularity)
    _, info = model.eval()(torch.randn(1, 3, 32, 32))
    n_gates = sum(z.shape[1] for z in info.z)                # |G| as the forward pass sees it
    assert n_gates == (9 if granularity == 'layer' else 3 * (16 + 32 + 64))
    groups = gc.param_groups(model, lr=0.1, weight_decay=5e-4, gate_decay=20.0, gate_lr_mult=10.0)
    ids = [id(q) for g in groups for q in g['params']]
    assert sorted(ids) == sorted(id(q) for q in model.parameters())     # each exactly once
    gate_ids = {id(q) for g in gc.gates(model) for q in g.parameters()}
    dense, gates = groups
    assert {id(q) for q in gates['params']} == gate_ids and not gate_ids & {
        id(q) for q in dense['params']
    }
    assert (dense['lr'], dense['weight_decay']) == (0.1, 5e-4)
    assert gates['lr'] == pytest.approx(1.0) and gates['weight_decay'] == pytest.approx(
        5e-4 * 20 / n_gates / 10
    )
    # the paper's per-step shrink, lr * decay = 0.1 * 5e-4 * 20 / |G|, at any multiplier
    assert gates['lr'] * gates['weight_decay'] == pytest.approx(0.1 * 5e-4 * 20 / n_gates)
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)                       # accepted by torch.optim
    assert len(gc.param_groups(gc.resnet20(), 0.1)) == 1


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_gate_resnet_keeps_pretrained_state_dict_loadable(arch):
    """Dense keys stay torchvision's: a pretrained state_dict loads with strict=True once the
    (new) gate entries are added, and the converted net holds the source weights."""
    source = getattr(torchvision.models, arch)()
    pretrained = source.state_dict()
    for gating, granularity in CONFIGS:
        model = gc.gate_resnet(getattr(torchvision.models, arch)(), gating, granularity)
        own = model.state_dict()
        gate_keys = {k for k in own if '.gate' in k}
        assert gate_keys and set(own) - gate_keys == set(pretrained)
        model.load_state_dict({**pretrained, **{k: own[k] for k in gate_keys}}, strict=True)
        converted = gc.gate_resnet(source, gating, granularity)
        assert all(torch.equal(converted.state_dict()[k], v) for k, v in pretrained.items())
        assert converted.conv1.weight.data_ptr() != source.conv1.weight.data_ptr()


def test_recalibrate_bn_reestimates_statistics_and_changes_no_parameter():
    torch.manual_seed(0)
    model = gc.resnet20(gating='static').train()
    params = {k: v.clone() for k, v in model.named_parameters()}
    batches = [torch.randn(16, 3, 32, 32) * 2 + 1 for _ in range(3)]
    gc.recalibrate_bn(model, [(x, None) for x in batches])
    assert model.training and all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    conv1_out = model.conv1(torch.cat(batches))                         # (48, 16, 32, 32)
    # cumulative average of three equal-size batch means = the mean over all 48 images;
    # float32 sums over 16k values per channel: relative error well under 1e-5
    torch.testing.assert_close(
        model.bn1.running_mean, conv1_out.mean((0, 2, 3)), rtol=1e-5, atol=1e-5
    )
    assert model.bn1.momentum == 0.1 and model.bn1.num_batches_tracked.item() == 3


@pytest.mark.parametrize('gating', ['static', 'dynamic'])
def test_gated_training_step_compiles_with_changing_batch_sizes(gating):
    """train_cifar.py --compile: a gated net's training step traces under torch.compile, also
    once the batch size changes and the graph turns dynamic (aot_eager: no C++ compile)."""
    torch.manual_seed(0)
    model = gc.resnet_cifar(8, gating=gating).train()
    step = torch.compile(model, backend='aot_eager')
    for batch in (4, 6):                                    # static, then dynamic: two graphs
        logits, info = step(torch.randn(batch, 3, 32, 32))
        (
            F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long)) + gc.flops_loss(info, 0.5)
        ).backward()
        assert logits.shape == (batch, 10) and info.macs.shape == (batch,)


# ------------------------------------------------------------------- bad input

@pytest.mark.parametrize('call,name', [
    (lambda: gc.resnet_cifar(21), 'depth'),
    (lambda: gc.resnet_cifar(20, gating='random'), 'gating'),
    (lambda: gc.resnet_cifar(20, gating='static', granularity='filter'), 'granularity'),
    (lambda: gc.gate_resnet(torchvision.models.resnet18(), 'soft'), 'gating'),
    (lambda: gc.gate_resnet(gc.resnet20(), 'static'), 'model'),
    (lambda: gc.StaticGate(4, init_p=1.0), 'init_p'),
    (lambda: gc.straight_through_gumbel(torch.zeros(3, 3)), 'logits'),
    (lambda: gc.straight_through_gumbel(torch.zeros(3, 2), temperature=0), 'temperature'),
    (lambda: gc.set_sampling(gc.resnet20(gating='static'), temperature=-1), 'temperature'),
    (lambda: gc.set_inference(gc.resnet20(), 'vote'), 'strategy'),
    (lambda: gc.set_inference(gc.resnet20(), 'threshold', tau=1.0), 'tau'),
    (lambda: gc.set_inference(gc.resnet20(), 'threshold', tau=0.0), 'tau'),
    (lambda: gc.expected_activation_loss(torch.rand(3), 0.0, 2), 't'),
    (lambda: gc.batch_activation_loss(gc.GateInfo([torch.ones(1, 1)], [], None, 1), 1.5), 't'),
    (lambda: gc.flops_loss(gc.GateInfo([], [], torch.ones(1), 1), -0.1), 't'),
    (lambda: gc.per_gate_loss(gc.GateInfo([torch.ones(1, 1)], [], None, 1), [0.5, 0.5]), 'targets'),
    (lambda: gc.ensemble_predict(gc.resnet20(), torch.zeros(1, 3, 8, 8), runs=0), 'runs'),
    (lambda: gc.recalibrate_bn(gc.resnet20(), []), 'batches'),
])
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf'^{name}\b'):
        call()


# ------------------------------------------------------------------- issue 25: edges of claims

def test_a_decision_exactly_at_tau_is_off():
    """3.3 / NOTES 11: Z = 1 iff p > tau, strictly: logits (0, 0) give p = 0.5 exactly."""
    static, dynamic = gc.StaticGate(3), gc.DynamicGate(4, 3)
    with torch.no_grad():
        static.logits.zero_()
        dynamic.fc2.weight.zero_()
        dynamic.fc2.bias.zero_()
    for gate in (static, dynamic):
        z, p = gate.eval()(torch.randn(2, 4, 3, 3))
        assert (p == 0.5).all() and (z == 0).all()


def test_polarized_share_cuts_at_one_percent_on_both_sides():
    p = torch.tensor([0.005, 0.0099, 0.0101, 0.05, 0.2, 0.5, 0.8, 0.95, 0.9899, 0.9901, 0.995])
    assert gc.polarized(p).tolist() == [True, True, False, False, False, False, False, False,
                                         False, True, True]


def test_the_polarization_ramp_starts_at_zero_and_ends_at_full_weight():
    """Deviation 20: the gate loss at progress 0 is the weighted FLOPs loss alone, at 1 it
    adds the whole term; and the scripts' progress is 0 at the first gated step and 1 at
    the last."""
    import argparse
    import train_loop as tl
    z = [torch.tensor([[1.0, 0.0], [1.0, 1.0]])]
    p = [torch.tensor([[0.6, 0.3], [0.6, 0.3]])]
    info = gc.GateInfo(z, p, torch.tensor([30.0, 50.0], dtype=torch.float64), 100)
    args = argparse.Namespace(loss='flops', t=0.5, loss_weight=20.0, polarize=0.5, t_ramp=0.0)
    flops = 20 * gc.flops_loss(info, 0.5)
    assert tl.gate_loss(args)(info, 0.0).item() == pytest.approx(flops.item())
    term = 0.5 * 2 * gc.polarization_loss(info)
    assert tl.gate_loss(args)(info, 1.0).item() == pytest.approx((flops + term).item())
    steps, epochs = 7, 3
    ramp = [tl.progress(e, i, epochs, steps) for e in range(epochs) for i in range(steps)]
    assert ramp[0] == 0 and ramp[-1] == 1 and ramp == sorted(ramp)
