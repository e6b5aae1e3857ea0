"""Tests of gumbel_export.py: each export computes what threshold inference computes in the
masked network, and spends the MACs that GateInfo.macs counts."""
import ast
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch._dynamo
import torch.nn.functional as F
import torchvision

import gumbel_channels as gc
import gumbel_export as ge
import gumbel_skip as gs


# ------------------------------------------------------------------- export: real speed

ARCHS = {                                         # name: (builder(gating, granularity), input size)
    'resnet20': (lambda g, k: gc.resnet20(gating=g, granularity=k), 32),
    'resnet56': (lambda g, k: gc.resnet56(gating=g, granularity=k), 32),
    'tv-resnet18': (lambda g, k: gc.gate_resnet(torchvision.models.resnet18(), g, k), 64),
    'tv-resnet50': (lambda g, k: gc.gate_resnet(torchvision.models.resnet50(), g, k), 64),
}
# Exported nets change no arithmetic but the order of float32 sums inside convs (off
# channels add exact zeros). Reordering a K-term sum moves it by ~sqrt(K) u |terms|
# (K <= 9 * 512, u = 6e-8): ~4e-6 relative per layer, < 3e-5 over 56 layers. With logits
# below 10 (asserted), 1e-4 absolute holds.
EXPORT_ATOL = 1e-4


def randomize_bn(model):
    """BN statistics and affine parameters away from (0, 1): a collapsed branch's constant is
    not 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1)
                m.bias.normal_(0, 0.5)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)


def cycle_gates(model, set_off, set_on, set_random):
    """Gate k (in network order) is all off when k % 5 == 0, all on when k % 5 == 1, else
    random: every block kind occurs (emptied BasicBlocks, off layer gates, and Bottlenecks
    with gate1 or gate2 empty)."""
    for k, g in enumerate(gc.gates(model)):
        (set_off, set_on, set_random, set_random, set_random)[k % 5](g)


def static_config(model):
    def put(g, on):
        g.logits.copy_(torch.stack([torch.zeros(g.channels), torch.where(on, 3.0, -3.0)], 1))
    with torch.no_grad():
        cycle_gates(model, lambda g: put(g, torch.zeros(g.channels, dtype=torch.bool)),
                    lambda g: put(g, torch.ones(g.channels, dtype=torch.bool)),
                    lambda g: put(g, torch.rand(g.channels) < 0.5))


def dynamic_config(model):
    def put(g, off, on):
        torch.nn.init.normal_(g.fc2.weight, std=1.0)
        g.fc2.bias.view(-1, 2).copy_(torch.tensor([off, on]))
    with torch.no_grad():
        cycle_gates(
            model,
            lambda g: put(g, 20.0, 0.0),
            lambda g: put(g, 0.0, 20.0),
            lambda g: put(g, 0.0, 0.0),
        )


def configured(arch, gating, granularity, batch):
    """A gated net with random BN statistics and cycled gate decisions, in evaluation mode,
    an input batch, and its masked forward (logits, info)."""
    torch.manual_seed(0)
    build, size = ARCHS[arch]
    model = build(gating, granularity)
    randomize_bn(model)
    (static_config if gating == 'static' else dynamic_config)(model)
    model.eval()
    x = torch.randn(batch, 3, size, size)
    logits, info = model(x)
    assert logits.abs().max() < 10                          # the premise of EXPORT_ATOL
    return model, x, logits, info


@pytest.mark.parametrize('granularity', ['channel', 'layer'])
@pytest.mark.parametrize('arch', list(ARCHS))
def test_prune_computes_the_thresholded_network(arch, granularity):
    """prune: smaller convs, same function as threshold inference, and FlopCounterMode / 2
    of the pruned net equals info.macs of the gated net."""
    model, x, logits, info = configured(arch, 'static', granularity, 2)
    pruned = ge.prune(model)
    assert not gc.gates(pruned) and not isinstance(pruned(x), tuple)
    assert (pruned(x) - logits).abs().max() <= EXPORT_ATOL
    assert ge.counted_macs(pruned, x[:1]) == info.macs[0].item() < info.max_macs
    assert ge.lane_macs(pruned, x[:1], lanes=1) == info.macs[0].item()    # the one formula
    emptied = ge.ShortcutBlock if granularity == 'layer' else ge.Constant  # a group all off
    assert any(isinstance(m, emptied) for m in pruned.modules())
    if granularity == 'channel' and arch == 'tv-resnet50':  # both Bottleneck halves
        halves = [(b.gate1.kept().any().item(), b.gate2.kept().any().item())
                  for b in model.blocks()]
        assert (False, True) in halves and (True, False) in halves


def test_prune_keeps_gate_attributes_and_names_what_it_cannot_take():
    """Issue 21: a removed gate becomes None (code that asks `block.gate1 is None` runs on),
    a net without gates or of another structure is refused naming why."""
    model = gc.resnet20(gating='static').eval()
    pruned = ge.prune(model)
    kept = [b for b in pruned.blocks() if not isinstance(b, ge.ShortcutBlock)]
    assert kept and all(b.gate1 is None for b in kept)
    with pytest.raises(ValueError, match='no gates'):
        ge.prune(gc.resnet20())
    with pytest.raises(ValueError, match='lacks'):
        ge.prune(torch.nn.Sequential(gc.StaticGate(4)))


def test_the_modules_import_each_other_inside_a_package(tmp_path):
    """Vendored as myproj/vendor/, gumbel_export, channel_groups and gumbel_any find
    gumbel_channels and each other."""
    vendor = tmp_path / 'myproj' / 'vendor'
    vendor.mkdir(parents=True)
    (tmp_path / 'myproj' / '__init__.py').write_text('')
    (vendor / '__init__.py').write_text('')
    here = Path(__file__).parent
    for name in ('gumbel_channels.py', 'gumbel_export.py', 'gumbel_skip.py', 'channel_groups.py',
                 'gumbel_any.py'):
        (vendor / name).write_text((here / name).read_text())
    code = ('from myproj.vendor import gumbel_any, gumbel_export, gumbel_skip; '
            'assert gumbel_export.gc.__name__ == "myproj.vendor.gumbel_channels"; '
            'assert gumbel_any.cg.__name__ == "myproj.vendor.channel_groups"; '
            'assert gumbel_export.cg is gumbel_any.cg; '
            'assert gumbel_skip.ge is gumbel_export')
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]


TOP = {'benchmark', 'compare', 'train_cifar', 'train_imagenet'}   # scripts: nothing imports them


def local_imports(path, local):
    """The repository's modules that the file at `path` imports (at any depth, relative too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found |= {node.module.split('.')[0]} if node.module else {a.name for a in node.names}
    return found & local


def test_the_import_graph_has_no_circle_and_no_script_below_a_module():
    """Modules below, scripts on top: no module imports a training or benchmark script, no
    two modules import each other (at any distance), and the four files users copy import
    nothing of the repository but each other (gumbel_channels <- gumbel_export <- gumbel_any,
    both reading channel_groups, which imports nothing: issue 42, the analysis a room of its
    own, the pruning of a traced net beside sliced and Constant)."""
    here = Path(__file__).parent
    files = {p.stem: p for p in here.glob('*.py') if not p.stem.startswith(('test_', 'conftest'))}
    graph = {name: local_imports(path, set(files)) - {name} for name, path in files.items()}
    assert TOP <= set(graph) and not set().union(*graph.values()) & TOP
    assert graph['gumbel_channels'] == set()
    assert graph['gumbel_export'] == {'gumbel_channels', 'channel_groups'}   # issue 42
    assert graph['gumbel_skip'] == {'gumbel_channels', 'gumbel_export'}      # issue 43
    assert graph['paired_table'] == set()
    assert graph['channel_groups'] == set()
    assert graph['gumbel_any'] == {'gumbel_channels', 'gumbel_export', 'channel_groups'}
    # issue 43: the command line is the bottom of the training side; the data modules, the
    # machine and the training loop need no run folder (fit is handed one: run_folder.RunFolder)
    assert graph['cli'] == set()
    assert all(graph[m] <= {'cli'} for m in ('cifar_data', 'imagenet_data', 'machine'))
    assert 'run_folder' not in graph['train_loop']
    # run folders know runs, not models: the models and their exports are script_models'
    assert graph['run_folder'] <= {'cli', 'machine'} and 'torchvision' not in local_imports(
        files['run_folder'], {'torchvision'})

    def below(name, seen):                                  # every module name reaches
        for m in graph[name] - seen:
            seen.add(m)
            below(m, seen)
        return seen
    assert all(name not in below(name, set()) for name in graph)


def test_pruned_net_saves_loads_compiles_and_exports():
    model, x, _, _ = configured('resnet20', 'static', 'channel', 2)
    pruned = ge.prune(model)
    expected = pruned(x)
    buf = io.BytesIO()
    torch.save(pruned, buf)                                 # the whole module (needs this file)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), expected)
    program = torch.export.export(pruned, (x,))             # a graph that needs no Python code
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    torch.testing.assert_close(
        torch.export.load(buf).module()(x), expected, rtol=0, atol=EXPORT_ATOL
    )
    torch.testing.assert_close(
        torch.compile(pruned, backend='aot_eager')(x), expected, rtol=0, atol=EXPORT_ATOL
    )


@pytest.mark.parametrize('granularity', ['channel', 'layer'])
@pytest.mark.parametrize('arch', ['resnet20', 'tv-resnet50'])
def test_skipnet_computes_the_masked_forward_with_the_counted_macs(arch, granularity):
    """SkipNet runs only the on channels per input: the masked forward's decisions and
    logits, and its FlopCounterMode / 2 is that input's info.macs less the hidden x C MACs
    each lean gate saves (one logit difference per channel instead of two)."""
    model, x, logits, info = configured(arch, 'dynamic', granularity, 3)
    skip = gs.SkipNet(model)
    saved = sum(g.fc1.out_features * g.channels for g in gc.gates(model))
    for i in range(len(x)):
        assert (skip(x[i:i + 1]) - logits[i]).abs().max() <= EXPORT_ATOL
        assert ge.counted_macs(skip, x[i:i + 1]) == info.macs[i].item() - saved < info.max_macs
        decisions = iter(z[i].nonzero().flatten() for z in info.z)
        with torch.inference_mode():
            h = skip.stem(x[i:i + 1])
            for block in skip.blocks:
                for gate in (block.gate1, block.gate2, block.gate):
                    if gate is not None:                    # random logits: none at tau
                        assert torch.equal(gate(h), next(decisions))
                h = block(h)


@pytest.mark.parametrize('arch', ['resnet20', 'tv-resnet18'])
def test_fold_bn_and_deploy_eager_compute_what_the_net_computes(arch):
    """BN folded into the convs, channels_last: same logits (float32 rounding only), for a
    pruned net and for the dense one it is compared with."""
    model, x, logits, _ = configured(arch, 'static', 'channel', 4)
    pruned = ge.prune(model)
    dense = ARCHS[arch][0](None, 'channel').eval()
    randomize_bn(dense)
    for net, ref in ((pruned, logits), (dense, dense(x))):
        deployed = ge.deploy(net, x, 'eager')
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())
        assert (deployed(x) - ref).abs().max() <= EXPORT_ATOL


def test_deploy_onnxruntime_keeps_the_outputs_at_any_batch():
    pytest.importorskip('onnxruntime')                     # optional; .ci/run installs it
    model, x, logits, _ = configured('resnet20', 'static', 'channel', 4)
    deployed = ge.deploy(ge.prune(model), x, 'onnxruntime')
    assert (deployed(x) - logits).abs().max() <= EXPORT_ATOL
    assert (deployed(x[:1]) - logits[:1]).abs().max() <= EXPORT_ATOL


def test_deploy_inductor_compiles_each_net_and_keeps_the_outputs():
    """Inductor with freezing; and each deployed net compiled on its own: the dense and the
    pruned net share a class (one forward's code), and with dynamo's recompile limit set to
    one, a second compile of that code would fail here (by default: run eager, silently)."""
    torch.manual_seed(0)
    model = gc.resnet_cifar(8, gating='static').eval()
    randomize_bn(model)
    static_config(model)
    dense = gc.resnet_cifar(8).eval()
    randomize_bn(dense)
    x = torch.randn(4, 3, 32, 32)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for net in (ge.prune(model), dense):
            deployed = ge.deploy(net, x)
            assert (deployed(x) - net(x)).abs().max() <= EXPORT_ATOL


class _ValueBranch(torch.nn.Module):
    """A net torch.fx cannot trace: Python control flow on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y.relu() if y.mean() > 0 else -y


def test_deploy_inductor_compiles_a_net_fx_cannot_trace():
    torch.manual_seed(0)
    net = _ValueBranch().eval()
    randomize_bn(net)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(net)
    assert (ge.deploy(net, x)(x) - net(x)).abs().max() <= EXPORT_ATOL


def test_round_gates_keeps_widths_on_the_lanes_and_every_on_channel():
    model, _, _, _ = configured('resnet56', 'static', 'channel', 1)
    rounded = ge.round_gates(model, 8)
    for g, r in zip(gc.gates(model), gc.gates(rounded)):
        before, after = g.kept(), r.kept()
        assert (after | ~before).all()                      # every on channel stays on
        assert int(after.sum()) in {0, g.channels} | set(range(8, 65, 8))
        if before.any():                                    # rounded up, not further
            assert int(after.sum()) == min(g.channels, -(-int(before.sum()) // 8) * 8)


def test_benchmark_smoke_mode_runs(tmp_path):
    command = [sys.executable, 'benchmark.py', '--smoke', '--json', str(tmp_path / 'b.json')]
    out = subprocess.run(command,
                         capture_output=True, text=True, timeout=300,
                         cwd=__file__.rsplit('/', 1)[0] or '.')
    assert out.returncode == 0, out.stderr
    for name in ('train step, static', 'infer pruned 30% [folded CL]', 'ResNet-8 32px SkipNet',
                 'ResNet-8 32px static bound',
                 'tv-ResNet-18 64px SkipNet', 'MALLOC_MMAP_THRESHOLD_=33554432'):
        assert name in out.stdout
    rows = json.loads((tmp_path / 'b.json').read_text())['rows']
    assert {r['row'] for r in rows} >= {'infer pruned 50% [eager]', 'infer dense [folded CL]'}
    assert all(r['met'] == '' and r['target'] == '' for r in rows)     # smoke judges nothing
    assert 'lane red.: ' in out.stdout and 'overall: ' in out.stdout   # the columns explained
    out = subprocess.run([sys.executable, 'benchmark.py', '--convs', '--repeats', '1'],
                         capture_output=True, text=True, timeout=300,
                         cwd=__file__.rsplit('/', 1)[0] or '.')
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()[-3:]] == \
        ['16x32x32', '32x16x16', '64x8x8']


def test_benchmark_times_your_own_exported_files(tmp_path):
    """Issue 45.8: benchmark.py --file times the files a user deploys (a pruned .pt2 beside
    its .onnx, any batch shape) side by side, from the command line."""
    torch.manual_seed(0)
    gated = gc.resnet_cifar(8, gating='static')
    with torch.no_grad():
        for g in gc.gates(gated):
            g.logits[::2, 0] = 5.0                      # every other channel off
    _, files = ge.export_files(gated.eval(), torch.randn(2, 3, 32, 32))
    paths = []
    for name in [n for n in ('pruned.pt2', 'pruned.onnx') if n in files]:
        (tmp_path / name).write_bytes(files[name])
        paths.append(str(tmp_path / name))
    if 'pruned.onnx' in files:
        pytest.importorskip('onnxruntime')
    out = subprocess.run([sys.executable, 'benchmark.py', '--file', *paths, '--shape', '3', '3',
                          '32', '32', '--repeats', '2', '--threads', '1', '--json',
                          str(tmp_path / 'f.json')], capture_output=True, text=True,
                         timeout=300, cwd=__file__.rsplit('/', 1)[0] or '.')
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / 'f.json').read_text())['rows']
    assert [r['file'] for r in rows] == paths and rows[0]['speedup'] == 1.0
    assert all(r['seconds'] > 0 for r in rows) and '(3, 3, 32, 32)' in out.stdout
    bad = subprocess.run([sys.executable, 'benchmark.py', '--file', str(tmp_path / 'no.pt2')],
                         capture_output=True, text=True, timeout=300,
                         cwd=__file__.rsplit('/', 1)[0] or '.')
    assert bad.returncode == 1 and bad.stderr.strip().startswith('error: ')


# ------------------------------------------------------------------- early exits (5, Table 5)

def spread_exits(model, x):
    """Center each exit gate on this batch, so that about half the images still running leave."""
    model.eval()
    with torch.no_grad():
        h = model.conv1(x)
        for k, e in enumerate(model.exits):
            h = model.stage(k, h)
            torch.nn.init.normal_(e.gate.fc2.weight)
            e.gate.fc2.bias.zero_()
            logits = e.gate.fc2(F.relu(e.gate.bn(e.gate.fc1(h.mean((2, 3))))))
            e.gate.fc2.bias[1] = -(logits[:, 1] - logits[:, 0]).median() + 1e-3
    return model


def test_early_exit_split_equals_the_masked_computation_and_its_macs():
    """Images that leave at exit k skip the later blocks; the logits equal the training graph's
    mixture, and FlopCounterMode / 2 of the split run equals the per-image accounting."""
    torch.manual_seed(0)
    x = torch.randn(12, 3, 32, 32)
    model = spread_exits(gc.densenet_cifar(depth=40), x)
    logits, info = model(x)
    split, taken = gs.early_exit(model, x)
    assert set(taken.tolist()) == {0, 1, 2}
    assert (split - logits).abs().max() <= EXPORT_ATOL
    assert ge.counted_macs(lambda t: gs.early_exit(model, t), x) == info.macs.sum().item()
    assert ge.counted_macs(gc.densenet_cifar(depth=40, exits=False).eval(), x[:1]) == info.max_macs
    for k in range(3):                                       # image by image, exit by exit
        i = (taken == k).nonzero()[0, 0]
        assert ge.counted_macs(lambda t: gs.early_exit(model, t), x[i:i + 1]) == info.macs[i].item()


class FixedExit(torch.nn.Module):
    """A stand-in exit gate with given decisions, for the whole batch (masked pass) and for
    the images still running (split pass), told apart by their number."""
    def __init__(self, *decisions):
        super().__init__()
        self.z = {len(z): torch.tensor(z)[:, None] for z in decisions}

    def forward(self, x):
        return self.z[len(x)], self.z[len(x)]


def test_exit_report_on_a_constructed_case():
    """Exits forced to [0, 0, 1, 2, 2, 2], labels chosen so that every number is known."""
    torch.manual_seed(0)
    model = gc.densenet_cifar(depth=16).eval()
    model.exits[0].gate = FixedExit([1.0, 1, 0, 0, 0, 0])
    model.exits[1].gate = FixedExit(
        [1.0, 1, 1, 0, 0, 0], [1.0, 0, 0, 0]
    )  # images 2..5 reach exit 1
    x = torch.randn(6, 3, 32, 32)
    heads = model(x)[1].exit_logits
    pred = [h.argmax(1) for h in heads]
    y = torch.stack(
        [
            pred[0][0],
            (pred[0][1] + 1) % 10,
            pred[1][2],
            pred[2][3],
            pred[2][4],
            (pred[2][5] + 1) % 10,
        ]
    )  # right, wrong | right | right, right, wrong
    report = gs.exit_report(model, [(x, y)])
    shares = [e['share'] for e in report['exits']]
    assert shares == pytest.approx([2 / 6, 1 / 6, 3 / 6])
    assert [e['acc_taken'] for e in report['exits']] == pytest.approx([1 / 2, 1, 2 / 3])
    for e, p in zip(report['exits'], pred):
        assert e['acc_all'] == pytest.approx((p == y).float().mean().item())


@pytest.mark.parametrize('call,name', [
    (lambda: ge.prune(gc.resnet20()), 'model'),
    (lambda: ge.prune(gc.resnet20(gating='dynamic')), 'model'),
    (lambda: gs.SkipNet(gc.resnet20()), 'model'),
    (lambda: gs.SkipNet(gc.resnet20(gating='dynamic'))(torch.zeros(2, 3, 32, 32)), 'x'),
    (lambda: ge.deploy(gc.resnet20(gating='static'), torch.zeros(2, 3, 32, 32)), 'net'),
    (lambda: ge.deploy(gc.resnet20(), torch.zeros(2, 3, 32, 32), 'tvm'), 'backend'),
])
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf'^{name}\b'):
        call()


def test_skipnet_decides_exactly_at_tau_as_the_masked_net():
    """A dynamic gate with p = 0.5 exactly (zero last layer) is off in the masked forward
    (p > tau strictly) and in SkipNet's lean gate (its logit difference 0 is not > 0)."""
    model = gc.resnet20(gating='dynamic').eval()
    with torch.no_grad():
        for g in gc.gates(model):
            g.fc2.weight.zero_()
            g.fc2.bias.zero_()
    x = torch.randn(1, 3, 32, 32)
    logits, info = model(x)
    assert all((z == 0).all() for z in info.z)
    assert torch.allclose(gs.SkipNet(model)(x), logits, atol=1e-5)


def test_bn_folding_keeps_eps_at_small_running_variances():
    """fold_bn divides by sqrt(var + eps): at running variances of 1e-4 to 1e-3, eps (1e-5)
    moves outputs by 0.5-5%, far above float error."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(1e-4, 1e-3)
                m.running_mean.normal_(0, 0.01)
    x = torch.randn(2, 3, 32, 32)
    want = net(x)
    assert torch.allclose(ge.fold_bn(net)(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize('arch', ['resnet20', 'tv-resnet50'])
def test_a_pruned_net_in_training_mode_computes_the_gated_nets_training_forward(arch):
    """A channel group with nothing on is a Constant; the BN after it sees a constant batch
    and gives its beta, as the gated net's BN after a masked input does: fine-tuning a
    pruned net starts from the function the gated net has in training mode (gates at tau)."""
    model, x, _, _ = configured(arch, 'static', 'channel', 4)
    pruned = ge.prune(model).train()
    assert any(isinstance(m, ge.Constant) for m in pruned.modules())
    model.train()
    for g in gc.gates(model):
        g.eval()                                            # threshold decisions, no noise
    logits, _ = model(x)
    assert logits.abs().max() < 10                          # the premise of EXPORT_ATOL
    assert (pruned(x) - logits).abs().max() <= EXPORT_ATOL


def test_fold_bn_follows_the_data_flow_of_any_block():
    """Issue 43: a pre-activation block (BN before its conv, named bnK beside convK) keeps its
    output, and a torchvision-style conv-BN-ReLU Sequential is folded (no BN left), both to
    float32 rounding."""
    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)

        def forward(self, x):
            out = self.conv1(torch.relu(self.bn1(x)))
            return x + self.conv2(torch.relu(self.bn2(out)))
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PreAct(), PreAct())
    cbr = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    # pre-activation: each bn1 reads the block input (no conv's output) and stays; each bn2
    # reads conv1's output alone, so the data flow folds it into conv1 (under the name of
    # neither pair: the name-based fold changed the output)
    for net, bns_left in ((pre, 2), (cbr, 0)):
        for m in net.modules():                               # statistics that matter
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
                m.weight.data.uniform_(0.5, 2), m.bias.data.uniform_(-1, 1)
        net.eval()
        folded = ge.fold_bn(net)
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert (folded(x) - net(x)).abs().max() <= 1e-4 * net(x).abs().max()
        assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == bns_left
