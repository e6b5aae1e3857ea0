"""Deployment of statically gated networks (gumbel_channels.py): gate decisions turned into
smaller networks and their files.

    prune(model)           static gates -> a plain ResNet with physically smaller convs and BNs
    prune_graph(...)       the same for any traced CNN (gumbel_any.GatedNet.pruned calls it)
    deploy(net, x)         a pruned (or dense) net in its fastest inference form
    write_exports(m, x, d) pruned.pt, pruned.pt2 and pruned.onnx of a gated net
    counted_macs(model, x) conv and linear MACs as torch.utils.flop_counter counts them

Each computes what threshold inference computes in the masked network, and spends the
MACs that its GateInfo.macs counts (both are tested). Dynamic gates and early exits skip
work at run time instead: gumbel_skip.py.
"""
import copy
import importlib
import importlib.util
import io
import math
import warnings
from pathlib import Path

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import _get_qualified_name

try:                                                    # beside gumbel_channels, or in a package
    from . import channel_groups as cg
    from . import gumbel_channels as gc
except ImportError:
    import channel_groups as cg
    import gumbel_channels as gc

__all__ = ['counted_macs', 'vector_lanes', 'lane_macs', 'ShortcutBlock', 'kind', 'Constant',
           'replaced', 'sliced', 'sliced_norm', 'round_gates', 'prune', 'layer_called',
           'prune_graph',
           'fold_bn', 'onnx_graph', 'export_files', 'deploy', 'write_exports']


# ----------------------------------------------------------------------------- shared pieces

def counted_macs(model, *inputs, by_module=False):
    """The conv and linear MACs of model(*inputs) as torch.utils.flop_counter counts them
    (convolution, mm, addmm, and here mv and addmv; 2 FLOPs per MAC): the independent check
    of GateInfo.macs, gumbel_any's FLOPs(Z) and what each export spends. by_module: {module
    path: MACs} for every module that ran (its calls summed; '': the whole model; paths as
    model.named_modules() names them). Attention's bmm and scaled dot products are not
    counted. Runs with autograd on: without it nn.MultiheadAttention takes a fused path that
    the counter does not see."""
    from torch.utils.flop_counter import FlopCounterMode
    mv = {torch.ops.aten.mv: lambda mat, vec, **_: 2 * mat[0] * mat[1],   # not in its table
          torch.ops.aten.addmv: lambda bias, mat, vec, *_, **__: 2 * mat[0] * mat[1]}
    ops = {torch.ops.aten.convolution, torch.ops.aten._convolution, torch.ops.aten.mm,
           torch.ops.aten.addmm, torch.ops.aten.mv, torch.ops.aten.addmv}
    counter = FlopCounterMode(display=False, custom_mapping=mv)

    def total():
        return sum(f for op, f in counter.get_flop_counts().get('Global', {}).items()
                   if op in ops) // 2
    macs, started, hooks = {}, [], []

    def enter(module, args):
        started.append(total())

    def leave(module, args, out, name):                # every module that ran, 0 or more
        macs[name] = macs.get(name, 0) + total() - started.pop()
    if by_module and isinstance(model, nn.Module):
        for name, m in model.named_modules():
            hooks += [m.register_forward_pre_hook(enter),
                      m.register_forward_hook(lambda m, a, o, name=name: leave(m, a, o, name))]
    try:
        with counter, torch.enable_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    macs[''] = total()
    return macs if by_module else macs['']


ADDED_MARGIN = 4.0   # round_gates: an added channel's w1 - w0 sits this far above logit(tau)


def bn_scale(bn):
    """An eval-mode BN's per-channel scale.
        gamma / sqrt(running_var + eps)"""
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def logit(p):
    """The logit difference w1 - w0 at which a gate's on-probability is p.
        log(p / (1 - p))"""
    return math.log(p / (1 - p))


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


class ShortcutBlock(nn.Module):
    """An exported block whose layer gate is off -> (out, {}), as a block returns.
        ReLU(shortcut(x) + bias),    bias (C_out,): 0 (pruned.pt files written before the
    Constant took empty channel groups hold a collapsed branch's constant here)"""

    def __init__(self, downsample, bias):
        super().__init__()
        self.downsample = downsample
        self.register_buffer('bias', bias.detach().flatten().clone())

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(identity + self.bias.view(1, -1, 1, 1)), {}


# ----------------------------------------------------------------------------- pruning (3.1, 3.3)

def kind(layer):
    """'linear', 'transposed' (a transposed conv) or 'conv'."""
    if isinstance(layer, nn.Linear):
        return 'linear'
    return 'transposed' if layer.transposed else 'conv'


class Constant(nn.Module):
    """What a conv or linear layer with no input (or no output) channel left computes: its
    bias (or 0) at every output position, for out_channels channels, at 0 MACs. The one
    form of a channel group with nothing on: gumbel_channels.conv_macs counts it so, prune,
    SkipNet and gumbel_any's pruned nets run it (NOTES.md 15)."""

    def __init__(self, layer, bias, out_channels):
        super().__init__()
        self.kind = kind(layer)
        if self.kind != 'linear':
            self.geometry = [layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                             layer.output_padding]
        self.register_buffer('bias', torch.zeros(out_channels) if bias is None else bias.clone())

    def forward(self, x, bias=None):
        """bias: other values than the layer's (SkipNet's per-input picks of a folded bias)."""
        bias = self.bias if bias is None else bias
        if self.kind == 'linear':               # contiguous: later ops may work in place
            return bias.to(x.dtype).expand(*x.shape[:-1], len(bias)).contiguous()
        k, s, p, d, op = self.geometry
        size = []
        for i, n in enumerate(x.shape[2:]):
            pad = 0 if p == 'valid' else p[i] if p != 'same' else None
            if self.kind == 'transposed':
                size.append((n - 1) * s[i] - 2 * pad + d[i] * (k[i] - 1) + op[i] + 1)
            else:
                size.append(n if pad is None else (n + 2 * pad - d[i] * (k[i] - 1) - 1) // s[i] + 1)
        shape = (1, -1) + (1,) * len(size)
        return bias.to(x.dtype).view(shape).expand(x.shape[0], -1, *size).contiguous()


def replaced(module, **tensors):
    """A copy of module whose named parameters or buffers are replaced (same kind); its other
    buffers are copies too, nothing is shared with module."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = {k: None if v is None else v.clone() for k, v in module._buffers.items()}
    for name, t in tensors.items():
        if name in module._parameters:
            new._parameters[name] = None if t is None else nn.Parameter(
                t.clone(), requires_grad=module._parameters[name].requires_grad)
        else:
            new._buffers[name] = t.clone()
    return new


def sliced(layer, keep_in=None, keep_out=None, groups=1):
    """A conv (any dimension, transposed) or linear layer, or a subclass, with only the kept
    input and output channels (bool masks; None: all); a grouped conv keeps whole groups; a
    layer left with no input or output channel is a Constant."""
    how, w = kind(layer), layer.weight
    n_in, n_out = (w.shape[0], w.shape[1] * groups) if how == 'transposed' else \
        (w.shape[1] * groups, w.shape[0])
    keep_in = torch.ones(n_in, dtype=torch.bool, device=w.device) if keep_in is None else keep_in
    keep_out = torch.ones(n_out, dtype=torch.bool, device=w.device) if keep_out is None \
        else keep_out
    bias = None if layer.bias is None else layer.bias[keep_out]
    if groups == 1:
        w = w[keep_out][:, keep_in] if how != 'transposed' else w[keep_in][:, keep_out]
    else:                                                  # whole groups
        w = w[keep_out] if how == 'conv' else w[keep_in]
        groups = int(keep_out.view(groups, -1)[:, 0].sum())
    n_in, n_out = int(keep_in.sum()), int(keep_out.sum())
    if n_in == 0 or n_out == 0:
        return Constant(layer, bias, n_out)
    new = replaced(layer, weight=w, bias=bias)
    if how == 'linear':
        new.in_features, new.out_features = n_in, n_out
    else:
        new.in_channels, new.out_channels, new.groups = n_in, n_out, groups
    return new


def sliced_norm(bn, keep):
    """A BatchNorm of any dimension or subclass, a frozen one, or a PReLU(C), with only the
    kept channels; Identity when none is kept (a tensor with no channel left)."""
    if not keep.any():
        return nn.Identity()                               # a tensor with no channel left
    new = replaced(bn, **{k: getattr(bn, k)[keep] for k in ('weight', 'bias', 'running_mean',
                                                         'running_var')
                       if isinstance(getattr(bn, k, None), torch.Tensor)})
    for size in ('num_features', 'num_parameters'):              # a BN's; PReLU(C)'s
        if hasattr(new, size):
            setattr(new, size, int(keep.sum()))
    return new


def _drop_gates(block):
    """The block without its gates; each gate attribute becomes None, which a block reads as
    "all on" (so code that checks `block.gate1 is None` keeps working)."""
    for name in ('gate', 'gate1', 'gate2'):
        if name in block._modules:
            setattr(block, name, None)
    return block


def _prune_block(block):
    """The gate-free block that computes what `block` computes under threshold inference."""
    bottleneck = isinstance(block, gc.Bottleneck)
    if getattr(block, 'gate', None) is not None:                            # layer gate
        if block.gate.kept().item():
            return _drop_gates(block)
        last_bn = block.bn3 if bottleneck else block.bn2
        return ShortcutBlock(block.downsample, last_bn.bias.new_zeros(last_bn.num_features))
    keep1 = block.gate1.kept()                  # a conv left with nothing on becomes a Constant
    keep2 = block.gate2.kept() if bottleneck else None
    block.conv1 = sliced(block.conv1, keep_out=keep1)
    block.bn1 = sliced_norm(block.bn1, keep1)
    if keep2 is None:
        block.conv2 = sliced(block.conv2, keep_in=keep1)
    else:
        block.conv2 = sliced(block.conv2, keep_in=keep1, keep_out=keep2)
        block.bn2 = sliced_norm(block.bn2, keep2)
        block.conv3 = sliced(block.conv3, keep_in=keep2)
    return _drop_gates(block)


@torch.no_grad()
def round_gates(model, lanes=16):
    """A copy of a static-gated net whose channel gates each keep a multiple of `lanes`.
    Under threshold inference each keeps none, all, or a multiple: the off channels with the
    highest p are turned on until the count is rounded up. Why: oneDNN pads a conv's output
    channels to its vector width (16 float32 on AVX-512), so a pruned net's speed follows
    widths on it. The net changes (more channels): recalibrate BN and evaluate."""
    if lanes < 1:
        raise ValueError(f'lanes must be >= 1, got {lanes!r}')
    model = copy.deepcopy(model)
    for g in gc.gates(model):
        if not isinstance(g, gc.StaticGate) or g.channels == 1:
            continue
        p = gc.gate_probability(g.logits)
        on = g.keep(p)
        want = min(g.channels, _round_up(int(on.sum()), lanes))
        extra = (p.masked_fill(on, -1)).argsort(descending=True)[:want - int(on.sum())]
        margin = logit(g.tau) + ADDED_MARGIN
        g.logits[extra] = torch.tensor([0.0, margin], dtype=g.logits.dtype)
    return model


@torch.no_grad()
def prune(model):
    """Physical pruning (3.1): a gate-free copy of a static-gated net, smaller convs and BNs.
    It computes what threshold inference (each gate's tau) computes in evaluation mode; a
    conv left with nothing on at either side is a Constant, an off layer gate's block a
    ShortcutBlock. Returns an ordinary
    ResNet (logits only) in evaluation mode; `model` is left as it was."""
    found = gc.gates(model)
    if not found:
        raise ValueError(f'model ({type(model).__name__}) has no gates: nothing to prune (gate '
                         'it with gumbel_channels.gate_resnet or gumbel_any.gate_any)')
    if not all(isinstance(g, gc.StaticGate) for g in found):
        raise ValueError('model must have static gates (gating="static"); dynamic gates decide '
                         'per input: use SkipNet')
    if callable(getattr(model, 'pruned', None)):           # gumbel_any.GatedNet prunes itself
        return model.pruned()
    missing = [k for k in ('conv1', 'bn1', 'maxpool', 'fc', 'layer1') if not hasattr(model, k)]
    if missing or not isinstance(model, gc.ResNet):
        raise ValueError(f'model must be a gumbel_channels.ResNet or a gumbel_any.GatedNet; '
                         f'{type(model).__name__} lacks {", ".join(missing) or "that class"}')
    model = copy.deepcopy(model).eval()
    layers = [nn.Sequential(*[_prune_block(b) for b in getattr(model, f'layer{i}')])
              for i in range(1, model.num_stages + 1)]
    return gc.ResNet(model.conv1, model.bn1, model.maxpool, layers, model.fc).eval()


# ----------------------------------------------------------------------- pruning a traced net

def layer_called(node, layers):
    """The name of the layer (in `layers`) a node calls: a module, or the weight of an
    F.conv*d / F.linear call; None."""
    if node.op == 'call_module':
        return node.target if node.target in layers else None
    if node.op == 'call_function' and (node.target in cg.CONV_FNS or node.target in
                                       cg.TRANSPOSED_FNS or node.target is F.linear):
        weight = cg.bound_args(node).get('weight')
        if isinstance(weight, torch.fx.Node) and weight.op == 'get_attr' \
                and weight.target in layers:
            return weight.target
    return None


def _module_of_call(gm, node):
    """The nn module computing an F.conv*d / F.linear call on module parameters."""
    call = cg.bound_args(node)
    w = gm.get_parameter(call['weight'].target)
    bias = call.get('bias')
    bias = None if bias is None else gm.get_parameter(bias.target)
    if node.target is F.linear:
        new = nn.Linear(w.shape[1], w.shape[0], bias is not None)
    else:
        dim = {**cg.CONV_FNS, **cg.TRANSPOSED_FNS}[node.target]
        names = cg.CONV_ARGS if node.target in cg.CONV_FNS else cg.TRANSPOSED_ARGS
        kw = {k: call[k] for k in names if k in call}
        groups = kw.get('groups', 1)
        if node.target in cg.CONV_FNS:
            new = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dim - 1](
                w.shape[1] * groups, w.shape[0], w.shape[2:], bias=bias is not None, **kw)
        else:
            new = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][dim - 1](
                w.shape[0], w.shape[1] * groups, w.shape[2:], bias=bias is not None, **kw)
    return replaced(new.to(w), weight=w.detach(), bias=None if bias is None else bias.detach())


def prune_graph(gm, layers, norms, keep, alive, example_input):
    """Physical pruning of a traced net (3.1, 3.3; gumbel_any.GatedNet.pruned's, its masks
    taken out): each conv, linear and BN that the records `layers` and `norms` name (.name:
    the module, or the weight an F.conv*d / F.linear call reads; .ins / .outs: the column of
    `keep` deciding each input and output channel; .groups) sliced to the channels `keep`
    keeps, an F.conv*d / F.linear call made the module it computes; a layer whose `alive`
    entry is 0 (its output only feeds layers with nothing on) a Constant. Ops that cannot
    take a tensor left with no channel (a pool after a conv whose outputs are all off) are
    made to. gm is changed and returned, in evaluation mode."""
    graph = gm.graph
    by_name = {layer.name: layer for layer in layers}
    calls = [n for n in graph.nodes if n.op == 'call_function' and layer_called(n, by_name)]
    for k, node in enumerate(calls):
        name = f'pruned_call{k}'
        gm.add_submodule(name, _module_of_call(gm, node))
        by_name[name] = by_name[layer_called(node, by_name)]
        with graph.inserting_before(node):
            node.replace_all_uses_with(graph.call_module(name, (node.args[0],)))
        graph.erase_node(node)
    # a layer whose output nothing reads (WaveNet's last residual conv) still runs, as in the
    # gated net, whose FLOPs(Z) counts it: the pruned net computes what was counted
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or (
        n.op == 'call_module' and n.target in by_name))
    for target in {n.target for n in graph.nodes if n.op == 'call_module'} & set(by_name):
        layer = by_name[target]                          # once, however often it is called
        new = sliced(gm.get_submodule(target), keep[layer.ins], keep[layer.outs], layer.groups)
        if not isinstance(new, Constant) and not float(alive[layer.name]):
            new = Constant(new, None, int(keep[layer.outs].sum()))        # feeds constants
        gm.set_submodule(target, new)
    for norm in norms:
        gm.set_submodule(norm.name, sliced_norm(gm.get_submodule(norm.name), keep[norm.ins]))
    gm.delete_all_unused_submodules()
    gm.recompile()
    _EmptySafe(gm.eval()).run(example_input)
    graph.lint()
    gm.recompile()
    return gm.eval()


class _OnEmpty(nn.Module):
    """A module, or a function (kept by its qualified name: the pruned net's code stays
    printable and picklable), that takes a tensor with no channel (dim 1 of size 0): it runs
    on one zero channel, whose result's channels are then dropped again. A module of its own
    so that torch.load's retrace of a pruned net does not trace into the shape test."""

    def __init__(self, fn):
        super().__init__()
        if isinstance(fn, nn.Module):
            self.module = fn
        else:
            self.function = _get_qualified_name(fn)

    def forward(self, x, *args, **kwargs):
        fn = self.module if 'module' in self._modules else self._function()
        if x.shape[1] == 0:
            return fn(x.new_zeros(x.shape[0], 1, *x.shape[2:]), *args, **kwargs)[:, :0]
        return fn(x, *args, **kwargs)

    def _function(self):
        module, _, attr = self.function.rpartition('.')
        return getattr(importlib.import_module(module), attr)


class _EmptySafe(torch.fx.Interpreter):
    """Runs the pruned graph once; a node that fails on a channel-less input is rewritten to
    go through _OnEmpty. (A conv or linear layer with nothing on is already a
    gumbel_export.Constant, as in the ResNet exporter; this is for the other ops an
    arbitrary graph may put after one, which torch refuses at zero channels.)"""

    def run_node(self, n):
        try:
            return super().run_node(n)
        except RuntimeError:
            args = self.fetch_args_kwargs_from_env(n)[0]
            if not (args and isinstance(args[0], torch.Tensor) and args[0].dim() > 1
                    and args[0].shape[1] == 0):
                raise
        if n.op == 'call_module':
            self.module.set_submodule(n.target, _OnEmpty(self.module.get_submodule(n.target)))
        elif n.op == 'call_function':                       # a module call from now on
            self.module.add_submodule(f'on_empty_{n.name}', _OnEmpty(n.target))
            n.op, n.target = 'call_module', f'on_empty_{n.name}'
        else:
            raise ValueError(f'the pruned net cannot run: .{n.target}() gets a tensor with no '
                             'channel left; pass its input\'s layer in gate_any(ignore=...) '
                             'so that those channels stay on')
        return super().run_node(n)


# ----------------------------------------------------------------------------- fastest form

@torch.no_grad()
def folded_conv(conv, bn):
    """One Conv2d (with bias) computing bn(conv(x)) of an eval-mode BN; of a Constant, the
    Constant of bn(its bias):
        weight * s,    beta - (mean - conv bias) * s,    s = bn_scale(bn)"""
    scale = bn_scale(bn)
    mean = bn.running_mean if conv.bias is None else bn.running_mean - conv.bias
    if isinstance(conv, Constant):
        return replaced(conv, bias=bn.bias - mean * scale)
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, bias=True).to(conv.weight)
    new.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    new.bias.copy_(bn.bias - mean * scale)
    return new


@torch.no_grad()
def fold_bn(net):
    """A copy of a gate-free net in evaluation mode, each BatchNorm that follows a conv in
    the data flow folded into it (a biased conv; the BN gone). The net is traced with
    torch.fx (Constant kept whole) and the fold follows the traced graph, so a BN before its
    conv (a pre-activation block) is left as it is, and a conv-BN-ReLU Sequential folds like
    our blocks; a BN whose conv feeds anything else stays too. A net torch.fx cannot trace is
    returned unfolded, with a warning."""
    if gc.gates(net):
        raise ValueError('fold_bn takes a gate-free net: prune the gated net first '
                         '(gumbel_export.prune(model))')
    net = copy.deepcopy(net).eval()
    if not isinstance(net, torch.fx.GraphModule):
        try:
            net = torch.fx.GraphModule(net, _ConstantLeaves().trace(net), type(net).__name__)
        except Exception as e:                              # data-dependent control flow
            warnings.warn(f'fold_bn: torch.fx cannot trace {type(net).__name__} '
                          f'({type(e).__name__}); its BNs are left unfolded', stacklevel=2)
            return net
    return _fold_graph(net)


class _ConstantLeaves(torch.fx.Tracer):
    """torch.fx's tracer, with Constant a module call of its own (it may take a BN's fold)."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, Constant) or super().is_leaf_module(m, qualname)


def _fold_graph(gm):
    """fold_bn of a traced net: each BN whose input is a conv used nowhere else, folded in."""
    calls = {}
    for node in gm.graph.nodes:
        if node.op == 'call_module':
            calls.setdefault(node.target, []).append(node)
    for node in list(gm.graph.nodes):
        if node.op != 'call_module' or not _is_bn2d(gm.get_submodule(node.target)):
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == 'call_module'
                and type(gm.get_submodule(src.target)) in (nn.Conv2d, Constant)
                and len(src.users) == 1
                and len(calls[src.target]) == len(calls[node.target]) == 1):
            continue
        conv, bn = gm.get_submodule(src.target), gm.get_submodule(node.target)
        gm.set_submodule(src.target, folded_conv(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _is_bn2d(m):
    """A BatchNorm2d, or torchvision's FrozenBatchNorm2d (fixed statistics, folded alike)."""
    return isinstance(m, nn.BatchNorm2d) or type(m).__name__ == 'FrozenBatchNorm2d'


def onnx_graph(net, example_input):
    """The ONNX graph of a gate-free net in evaluation mode, as bytes (needs: pip install onnx).
    Input 'x', output 'logits', any batch size: what deploy(net, x, 'onnxruntime') runs (BN
    folded first), and what the training scripts write as pruned.onnx."""
    buf = io.BytesIO()
    torch.onnx.export(net, (example_input.contiguous(),), buf, input_names=['x'],
                      output_names=['logits'], dynamo=False,
                      dynamic_axes={'x': {0: 'batch'}, 'logits': {0: 'batch'}})
    return buf.getvalue()


class _OnnxRuntime(nn.Module):
    """An ONNX Runtime session (CPU) behind a module's call: tensor in, tensor out."""

    def __init__(self, net, example_input):
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise ValueError("backend 'onnxruntime' needs: pip install onnxruntime onnx") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(onnx_graph(net, example_input), options,
                                                    providers=['CPUExecutionProvider'])

    def forward(self, x):
        x = x.detach().cpu().contiguous().float().numpy()
        return torch.from_numpy(self.session.run(None, {'x': x})[0])


class _Deployed(nn.Module):
    """Runs `net` without autograd on channels_last inputs."""

    def __init__(self, net, compiled=None):
        super().__init__()
        self.net = net
        self.compiled = compiled

    @torch.no_grad()
    def forward(self, x):
        net = self.net if self.compiled is None else self.compiled
        return net(x.contiguous(memory_format=torch.channels_last))


BACKENDS = ('inductor', 'eager', 'onnxruntime')


def deploy(net, example_input, backend='inductor'):
    """The fastest inference form of a gate-free net (pruned, or dense to compare with).
    A module that computes what `net` computes in evaluation mode, without autograd:
        'inductor'     BN folded, channels_last, a traced copy torch.compiled with inductor's
                       freezing (weights as constants; on CPU also max_autotune), compiled now
                       on example_input
        'eager'        BN folded, channels_last, not compiled
        'onnxruntime'  the folded net's ONNX graph (CPU; pip install onnxruntime onnx)"""
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    if gc.gates(net):
        raise ValueError('net must be gate-free: prune(model) a static one first '
                         '(dynamic gates: SkipNet)')
    folded = fold_bn(net)
    if backend == 'onnxruntime':
        return _OnnxRuntime(folded, example_input)
    folded = folded.to(memory_format=torch.channels_last)
    if backend == 'eager':
        return _Deployed(folded)
    # A traced copy has code of its own, so a compiled-code cache of its own: nets of one class
    # would share one and, past dynamo's recompile limit, silently run eager. max_autotune:
    # on CPU it made the pruned nets 1-10% faster (docs/deployment.md, "Speed").
    try:
        traced = torch.fx.GraphModule(folded, _ConstantLeaves().trace(folded))
    except Exception:                                   # Python control flow on values
        traced = folded
    options = {'freezing': True, 'max_autotune': example_input.device.type == 'cpu'}
    deployed = _Deployed(folded, torch.compile(traced, options=options))
    deployed(example_input)                                 # compile now, not on first use
    return deployed


def vector_lanes():
    """float32 lanes of this CPU's widest vector unit that PyTorch uses (AVX-512: 16, AVX2: 8)."""
    return {'AVX512': 16, 'AVX2': 8}.get(torch.backends.cpu.get_cpu_capability(), 4)


def lane_macs(net, x, lanes=16):
    """MACs per input of a gate-free `net` on x, each conv's outputs rounded up to `lanes`.
    oneDNN pads output channels to its vector width (16 float32 on AVX-512): these are the
    MACs the CPU really spends."""
    total = []

    def hook(m, inputs, out):
        total.append(gc.conv_macs(m, inputs[0].shape[-2:], n_out=_round_up(m.out_channels, lanes)))
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            net(x[:1])
    finally:
        for h in handles:
            h.remove()
    linear = sum(m.in_features * m.out_features for m in net.modules() if isinstance(m, nn.Linear))
    return sum(total) + linear


def _with_metadata(onnx_bytes, metadata):
    """An ONNX graph's bytes with {key: text} added to its metadata_props."""
    if not metadata:
        return onnx_bytes
    import onnx
    graph = onnx.load_from_string(onnx_bytes)
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    return graph.SerializeToString()


def export_files(model, x, metadata=None):
    """The files a finished static-gated run leaves, on the CPU whatever device trained it
    (a CPU-only machine loads them): the physically pruned net as a module ('pruned.pt') and,
    BN folded into its convs, as a torch.export program with a dynamic batch ('pruned.pt2',
    loadable without this repository) and, when the onnx package is installed, as an ONNX
    graph ('pruned.onnx', for ONNX Runtime). x: an example batch of at least 2 inputs.
    metadata {key: text} (the input normalization, say) goes into both: the .pt2's extra
    files (torch.export.load(f, extra_files={key: ''}) reads it) and the ONNX graph's
    metadata_props. -> (the pruned net (CPU), {file name: module or bytes})."""
    pruned = prune(model).cpu()
    x = x.detach().cpu().contiguous()
    folded = fold_bn(pruned)
    files = {'pruned.pt': pruned}
    if importlib.util.find_spec('onnx') is not None:    # optional: for ONNX Runtime
        files['pruned.onnx'] = _with_metadata(onnx_graph(folded, x), metadata)
    batch = torch.export.Dim('batch', min=1, max=65536)
    program = torch.export.export(folded, (x,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()               # in memory first: torch's C++ writer aborts the
    torch.export.save(program, buffer, extra_files=metadata)   # process on a full disk
    files['pruned.pt2'] = buffer.getvalue()
    return pruned, files


def write_exports(model, x, folder, metadata=None):
    """export_files written into `folder` (made if absent): pruned.pt, pruned.pt2 and, with
    onnx installed, pruned.onnx; the legacy ONNX exporter's warnings silenced. -> (the pruned
    net, {name: path})."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                 # TracerWarnings, its deprecation note
        pruned, files = export_files(model, x, metadata)
    paths = {}
    for name, obj in files.items():
        paths[name] = folder / name
        if isinstance(obj, bytes):
            paths[name].write_bytes(obj)
        else:
            torch.save(obj, paths[name])
    return pruned, paths
