"""The paper's static gates in any CNN a user brings (MobileNet, EfficientNet, RegNet, ConvNeXt,
DenseNet, ShuffleNet, VGG, U-Nets, 1D and 3D CNNs, detection backbones, their own blocks):
gate, train toward t, prune physically.

    gated = gate_any(model, example_input)    # a StaticGate on every prunable channel group
    logits, info = gated(x)                   # info.macs: FLOPs(Z) per sample (3.4)
    pruned = gated.pruned()                   # or gumbel_export.prune(gated): a plain module

How channels are grouped. The model is traced with torch.fx (in training and in evaluation
mode, so that code reading self.training follows the mode) and run once on example_input;
every channel of every tensor carries an id, and ids that must be kept or removed together
are merged (union-find):
- a residual add or any elementwise product (squeeze-excitation's scale) merges the channels
  it combines position by position; a concatenation keeps each input's ids;
- a grouped conv merges each group's input and output channels (one decision per group: a
  depthwise conv ties its output channel to its input channel);
- a reshape that splits channels into (groups, channels) and a chunk into equal parts merge
  the positions they pair, so the pruned net's reshape stays valid (channel shuffle);
- anything else that reads across channels (LayerNorm, a slice or a literal index of the
  channel dimension, a parameter broadcast onto channels, an unknown op or module) and the
  network's input and output fix the channels it touches: they are never gated.
Each remaining group of ids is one gate channel, one Bernoulli decision; the channels whose
ids come from the same set of layers share one StaticGate module.

Where decisions act. Z multiplies the input of every conv (1D, 2D, 3D, transposed) and
linear layer, modules or F.conv*d / F.linear calls on module parameters, the only ops that mix
channels: an off channel reaches no mixing op, so the masked network computes what the network
without that channel computes (NOTES.md 21). FLOPs(Z) counts the conv and linear MACs of that
network exactly, per sample: n_in * n_out (per group for grouped convs) times kernel and
positions, summed over every call of a layer. Work gate_any does not see (inside a module
named in `ignore`, or with uncovered='fixed' an op it does not know) is a fixed cost. Attention's
batched products (bmm, scaled dot product) are not conv or linear MACs and are not counted.

Every number is checked. gate_any compares FLOPs(Z) with every gate on against the conv and
linear MACs torch.utils.flop_counter counts in the model, module by module, and refuses to go
on when they differ; it warns when less than half of the MACs can be gated, naming the ops
that fixed the channels.
"""
import copy
import importlib
import math
import operator
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import _get_qualified_name
from torch.utils.flop_counter import FlopCounterMode

try:                                                    # beside gumbel_channels, or in a package
    from . import gumbel_channels as gc
    from . import gumbel_export as ge
except ImportError:
    import gumbel_channels as gc
    import gumbel_export as ge

__all__ = ['gate_any', 'GatedNet', 'any_macs', 'decision_macs', 'conv_linear_macs']

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid,
                        nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity,
                        nn.PReLU, nn.modules.dropout._DropoutNd,
                        nn.modules.padding._ReflectionPadNd,      # pad the spatial dims of
                        nn.modules.padding._ReplicationPadNd,     # each channel alike
                        nn.modules.padding._ConstantPadNd)
_POOL_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                 nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                 nn.Upsample)
_UNARY = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid,
          torch.sigmoid, torch.tanh, F.leaky_relu, F.mish, F.elu, F.dropout, F.dropout1d,
          F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout, 'relu', 'relu_', 'sigmoid',
          'sigmoid_', 'tanh', 'contiguous', 'clone', 'float', 'to', 'type_as'}
_BINARY = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub,
           operator.truediv, torch.add, torch.mul, torch.sub, torch.div, 'add', 'add_', 'mul',
           'mul_', 'sub', 'div', 'div_'}
_POOL = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
         F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d,
         F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.interpolate}
_REDUCE = {torch.mean, torch.sum, torch.amax, 'mean', 'sum', 'amax'}
_RESHAPE = {torch.flatten, torch.reshape, 'flatten', 'view', 'reshape'}
_MOVE = {torch.permute, torch.transpose, 'permute', 'transpose', torch.squeeze, 'squeeze',
         torch.unsqueeze, 'unsqueeze'}
_SPLIT = {torch.chunk, 'chunk', torch.split, 'split'}
_SHAPE_ONLY = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.rand_like,    # read
               torch.randn_like, torch.full_like, 'new_empty', 'new_zeros', 'new_ones',  # no
               'new_full'}                                                               # value
# F.conv*d / F.linear: argument names after (input, weight, bias); transposed convs
_CONV_FNS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_TRANSPOSED_FNS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_CONV_ARGS = ('stride', 'padding', 'dilation', 'groups')
_TRANSPOSED_ARGS = ('stride', 'padding', 'output_padding', 'groups', 'dilation')


def _is_norm(m):
    """A BatchNorm of any dimension or subclass, or a BN with frozen statistics (torchvision's
    FrozenBatchNorm2d): a per-channel affine map in evaluation mode."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or any(
        c.__name__ == 'FrozenBatchNorm2d' for c in type(m).__mro__)


def _per_channel(m):
    """A module that treats each channel of dim 1 on its own, with at most one parameter or
    statistic per channel (PReLU(C), InstanceNorm): its channels pass through and it is
    sliced with them, as a BN is. (GroupNorm and LayerNorm mix the channels they normalize
    together: they fix them.)"""
    return (isinstance(m, nn.PReLU) and m.num_parameters > 1) or isinstance(
        m, nn.modules.instancenorm._InstanceNorm)


_PLAIN = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d, nn.Linear)
_PLAIN_FORWARDS = {c.forward for c in _PLAIN}
_WeightNorm = importlib.import_module('torch.nn.utils.weight_norm').WeightNorm  # the old one


def _reworked_layers(model, x, ignore):
    """{name: why} of the conv and linear layers that compute from more than their stored
    weight and bias, so that slicing those would change what they compute: a
    parametrization, a forward hook, or a forward of their own
    whose output on x differs from their base class's at the same MACs (weight
    standardization, a gain; a subclass with MACs beyond its weight's is left to the MAC
    check, which refuses it; one that only calls F.conv2d / F.linear on its weight passes).
    The old nn.utils.weight_norm is refused (ValueError)."""
    found, seen, hooks = {}, {}, []

    def record(name, args, out):                # returns None: a hook's value replaces out
        seen.setdefault(name, (args, out))
    for name, m in model.named_modules():
        if not _is_layer(m) or name in ignore or any(_inside(name, i) for i in ignore):
            continue
        if any(isinstance(h, _WeightNorm) for h in m._forward_pre_hooks.values()):
            # its weight is computed with grad, and such a tensor has no deepcopy
            raise ValueError(f'gate_any cannot copy {name} ({type(m).__name__}): with '
                             'torch.nn.utils.weight_norm, remove_weight_norm first or use '
                             'torch.nn.utils.parametrizations.weight_norm')
        if torch.nn.utils.parametrize.is_parametrized(m):
            found[name] = 'a parametrization'
        elif m._forward_pre_hooks or m._forward_hooks:
            found[name] = 'a forward hook'
        elif type(m).forward not in _PLAIN_FORWARDS:
            hooks.append(m.register_forward_hook(
                lambda m, a, out, name=name: record(name, a, out)))
    if hooks:
        was = model.training
        try:
            with torch.no_grad():
                model.eval()(x[:1])
        except Exception:
            pass                                            # said later, where it fails
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
    for name, (args, out) in seen.items():
        m = model.get_submodule(name)
        base = next(c for c in type(m).__mro__ if c in _PLAIN)
        with torch.no_grad(), FlopCounterMode(display=False) as own:
            m(*args)
        with torch.no_grad(), FlopCounterMode(display=False) as plain:
            expected = base.forward(m, *args)
        if own.get_total_flops() == plain.get_total_flops() and not (
                isinstance(out, torch.Tensor) and out.shape == expected.shape
                and torch.allclose(out, expected, rtol=1e-4, atol=1e-6)):
            found[name] = 'a forward of its own'
    return found


def _is_layer(m):
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))


class _Tracer(fx.Tracer):
    """torch.fx's tracer that keeps whole the layers and norms (subclasses too: timm's Linear
    and BatchNormAct2d), torchvision's StochasticDepth (its forward branches on
    self.training), and the modules named in `ignore`; it remembers the innermost module
    that failed to trace."""

    def __init__(self, ignore=()):           # a default: torch.load re-creates it bare
        super().__init__()
        self.ignore = ignore
        self.failed = None

    def is_leaf_module(self, m, qualname):
        return _is_layer(m) or _is_norm(m) or type(m).__name__ == 'StochasticDepth' \
            or qualname in self.ignore or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = f'{self.path_of_module(m) or "the top module"} ({type(m).__name__})'
            raise


class _Ids:
    """Channel ids and their union-find: which channels must be kept or removed together;
    for each fixed id, the op that fixed it."""

    def __init__(self):
        self.parent, self.why, self.source = [], {}, {}

    def new(self, n, why=None, source=None):
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        for i in range(start, start + n):
            if why:
                self.why[i] = why
            if source:
                self.source[i] = source
        return torch.arange(start, start + n)

    def find(self, i):
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a, b):
        """Merge ids a and b position by position (tensors broadcast to one shape)."""
        a, b = (t.reshape(-1) for t in torch.broadcast_tensors(a, b))
        n, differ = len(self.parent), a != b
        for pair in torch.unique(a[differ] * n + b[differ]).tolist():     # each pair once
            ri, rj = self.find(pair // n), self.find(pair % n)
            if ri != rj:
                self.parent[rj] = ri

    def fix(self, ids, why):
        for i in torch.unique(ids).tolist():
            self.why.setdefault(i, why)

    def per_index(self, ids, dim):
        """One id per index along dim: every id in that slice merged. -> (size of dim,)."""
        rows = ids.movedim(dim, 0).reshape(ids.shape[dim], -1)
        self.union(rows[:, :1], rows)
        return rows[:, 0].clone()

    def fixed_roots(self):
        """{root: why} of every group holding a fixed id (the first reason, by id)."""
        roots = {}
        for i in sorted(self.why):
            roots.setdefault(self.find(i), self.why[i])
        return roots


def _varies(ids, dim):
    return not bool((ids == ids.narrow(dim, 0, 1)).all())


def _tensors(value):
    """The tensors in a (nested) argument, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _fixed_like(value, fixed_id):
    """A value's ids when it is beyond analysis: one fixed id for every element, in the value's
    own structure (tuple, namedtuple, list, dict)."""
    if isinstance(value, torch.Tensor):
        return fixed_id.expand(value.shape)
    if isinstance(value, dict):
        return type(value)((k, _fixed_like(v, fixed_id)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        items = [_fixed_like(v, fixed_id) for v in value]
        return type(value)(*items) if hasattr(value, '_fields') else type(value)(items)
    return None


def _where(node):
    """The module path a node runs in, '' for the top module."""
    stack = node.meta.get('nn_module_stack') or {}
    return next(reversed(stack.values()))[0] if stack else ''


def _describe(node, gm):
    if node.op == 'call_module':
        return f'{node.target} ({type(gm.get_submodule(node.target)).__name__})'
    name = getattr(node.target, '__name__', str(node.target))
    call = f'.{name}()' if node.op == 'call_method' else f'{name}()'
    return f'{call} in {_where(node) or "the top module"}'


class _Analysis:
    """Runs traced graphs on example_input, value and ids side by side, and records for every
    layer (conv, linear, or an F.conv*d / F.linear call on module parameters) the ids of the
    channels it reads and writes, its kind, and where it is called; for every BN its ids."""

    def __init__(self, gm, ignore):
        self.gm = gm
        self.ids = _Ids()
        self.ignore = ignore
        self.layers = {}            # layer name -> dict(ins, outs, kind, kernel, groups)
        self.sites = {}             # the last graph's layer calls: node name -> (layer, path)
        self.bns = {}               # module name -> channel ids
        self.fixed_id = self.ids.new(1, why='the network input')[0]

    def barrier(self, args, value, why):
        """An op beyond analysis: the ids it reads are fixed, its output is one fixed id."""
        for t in _tensors(args):
            self.ids.fix(t, why)
        return _fixed_like(value, self.fixed_id)

    def run(self, graph, x):
        values, ids, self.sites = {}, {}, {}
        load = lambda a: fx.node.map_arg(a, lambda n: values[n])                  # noqa: E731
        # an argument's ids where it holds tensors, its value where it does not (sizes)
        load_ids = lambda a: fx.node.map_arg(                                     # noqa: E731
            a, lambda n: values[n] if ids[n] is None else ids[n])
        for node in graph.nodes:
            self.node = node                        # where a failure happened, for the refusal
            if node.op == 'placeholder':
                values[node], ids[node] = x, self.fixed_id.expand(x.shape)
                continue
            if node.op == 'output':
                for t in _tensors(load_ids(node.args)):
                    self.ids.fix(t, "the network's output")
                continue
            args, kwargs = load(node.args), load(node.kwargs)
            if node.op == 'get_attr':
                value = self.gm
                for part in node.target.split('.'):
                    value = getattr(value, part)
            elif node.op == 'call_module':
                value = self.gm.get_submodule(node.target)(*args, **kwargs)
            elif node.op == 'call_function':
                value = node.target(*args, **kwargs)
            else:
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            values[node] = value
            if not _tensors(value):
                ids[node] = None
            elif node.op == 'get_attr':
                ids[node] = _fixed_like(value, self.fixed_id)
            else:
                ids[node] = self.rule(node, args, kwargs, load_ids(node.args),
                                      load_ids(node.kwargs), value)

    def rule(self, node, args, kwargs, id_args, id_kwargs, value):
        """The ids of node's output, merging or fixing the ids it combines."""
        target, why = node.target, _describe(node, self.gm)
        if node.op == 'call_module':
            module = self.gm.get_submodule(target)
            x = id_args[0] if id_args else None
            if target in self.ignore:
                return self.barrier(id_args, value, f'ignore={target!r}')
            if _is_layer(module):
                return self.layer(target, node, ge.kind(module), x, value, module.weight,
                                  getattr(module, 'groups', 1))
            if _is_norm(module) or _per_channel(module):
                channels = self.ids.per_index(x, 1)
                if target in self.bns:
                    self.ids.union(self.bns[target], channels)
                self.bns[target] = channels
                return x
            if isinstance(module, _ELEMENTWISE_MODULES) or type(module).__name__ == \
                    'StochasticDepth':
                return x
            if isinstance(module, _POOL_MODULES):
                return self.pool(x, value)
            if isinstance(module, nn.Flatten):
                return self.reshape(node, x.flatten(module.start_dim, module.end_dim), why)
            return self.barrier(id_args, value, why)
        key = target if node.op == 'call_function' else str(target)

        def apply(name=None):                   # the same op on the ids
            if node.op == 'call_method':
                return getattr(id_args[0], name or target)(*id_args[1:], **id_kwargs)
            return target(*id_args, **id_kwargs)
        try:
            if key in _CONV_FNS or key in _TRANSPOSED_FNS or key is F.linear:
                layer = self.call_layer(node, id_args, value)
                if layer is not None:
                    return layer
            if key in _UNARY:
                return id_args[0]
            if key in _BINARY:
                return self.elementwise(*id_args[:2])
            if key in _POOL:
                return self.pool(id_args[0], value)
            if key is F.pad and len(args[1]) <= 2 * (args[0].dim() - 2):   # spatial padding
                return self.pool(id_args[0], value)
            if key in _REDUCE:
                return self.reduce(id_args[0], args, kwargs, value, why)
            if key in _RESHAPE:                 # ids may be expanded views: reshape, not view
                return self.reshape(node, apply('reshape' if key == 'view' else None), why)
            if key in _MOVE or key is torch.cat:
                return apply()
            if key in _SPLIT:
                size = node.args[1] if len(node.args) > 1 else next(iter(node.kwargs.values()))
                literal = key in (torch.split, 'split') and isinstance(size, int)
                return self.split(id_args, id_kwargs, value, why, literal)
            if key is operator.getitem:
                return self.getitem(id_args[0], args[1], why)
            if key in _SHAPE_ONLY:
                return _fixed_like(value, self.fixed_id)
        except (TypeError, RuntimeError, IndexError):          # an unusual call of a known op
            pass
        return self.barrier(id_args, value, why)

    def layer(self, name, node, kind, x, value, weight, groups):
        """A conv or linear layer's call: its input channels (merged over calls), its output
        channels (new ids the first time, the same ids at every later call)."""
        linear = kind == 'linear'
        channels = self.ids.per_index(x, -1 if linear else 1)                   # (C_in,)
        if name in self.layers:
            seen = self.layers[name]
            self.ids.union(seen['ins'], channels)
            out = seen['outs']
        else:
            out = self.ids.new(weight.shape[1] * groups if kind == 'transposed'
                               else weight.shape[0], source=name)
            seen = self.layers[name] = dict(kind=kind, groups=groups,
                                            kernel=math.prod(weight.shape[2:]))
        if groups > 1:                                          # a group is one decision
            self.ids.union(channels.view(groups, -1)[:, :1], torch.cat(
                [channels.view(groups, -1), out.view(groups, -1)], 1))
        seen.update(ins=channels, outs=out)
        self.sites[node.name] = (name, node.target if node.op == 'call_module' else _where(node))
        if linear:
            return out.expand(value.shape)
        return out.view(1, -1, *[1] * (value.dim() - 2)).expand(value.shape)

    def call_layer(self, node, id_args, value):
        """F.conv*d / F.linear whose weight (and bias) are module parameters: a layer named
        after the weight; None for any other call (then beyond analysis)."""
        call = _bound(node)
        weight, bias = call.get('weight'), call.get('bias')
        if not _param_node(self.gm, weight) or not (bias is None or _param_node(self.gm, bias)) \
                or any(isinstance(v, fx.Node) for k, v in call.items()
                       if k not in ('input', 'weight', 'bias')):
            return None
        kind = 'linear' if node.target is F.linear else \
            'conv' if node.target in _CONV_FNS else 'transposed'
        return self.layer(weight.target, node, kind, id_args[0], value,
                          self.gm.get_parameter(weight.target), call.get('groups', 1))

    def elementwise(self, a, b):
        """a op b elementwise: the channels combined position by position merge; a tensor that
        is one fixed value across the other's channels (a per-sample scale: drop-path) merges
        nothing."""
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return a if isinstance(a, torch.Tensor) else b
        for this, other in ((a, b), (b, a)):
            if self.constant_across(this, other):
                return torch.broadcast_tensors(other, this)[0]
        self.ids.union(a, b)
        return torch.broadcast_tensors(a, b)[0]

    def constant_across(self, this, other):
        if not bool((this == self.fixed_id).all()):
            return False
        shape = (1,) * (other.dim() - this.dim()) + tuple(this.shape)
        full = torch.broadcast_tensors(other, this)[0]
        return all(shape[d] == 1 for d in range(len(shape)) if _varies(full, d)) \
            if len(shape) == full.dim() else False

    def pool(self, x, value):
        """A per-channel spatial op (pooling, interpolation, spatial padding) of (B, C, ...):
        needs one id per channel."""
        channels = self.ids.per_index(x, 1)
        return channels.view(1, -1, *[1] * (value.dim() - 2)).expand(value.shape)

    def reduce(self, x, args, kwargs, value, why):
        dims = kwargs.get('dim', args[1] if len(args) > 1 else None)
        dims = [dims] if isinstance(dims, int) else list(dims or range(x.dim()))
        dims = [d % x.dim() for d in dims]
        if any(_varies(x, d) for d in dims):                   # a sum across channels mixes
            return self.barrier([x], value, why)
        keep = kwargs.get('keepdim', args[2] if len(args) > 2 else False)
        for d in sorted(dims, reverse=True):
            x = x.narrow(d, 0, 1) if keep else x.select(d, 0)
        return x

    def reshape(self, node, out, why):
        """A reshape may split channels into (groups, channels): the positions it pairs are
        merged so that a pruned net, reshaping fewer channels the same way, stays valid; a
        channel count written into the code cannot follow pruning, so it fixes them."""
        varying = [d for d in range(1, out.dim()) if _varies(out, d)]
        if len(varying) > 1:
            self.ids.per_index(out, varying[-1])
        if varying and node.target in ('view', 'reshape', torch.reshape):
            sizes = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
            size = sizes[varying[-1]] if varying[-1] < len(sizes) else None
            if isinstance(size, int) and size != -1:
                self.ids.fix(out, f'a channel count written into {why}')
        return out

    def split(self, id_args, id_kwargs, value, why, literal=False):
        """chunk / split into equal parts: the positions the parts pair are merged, so that
        a pruned net splits its fewer channels at the same places. A size written into the
        code (x.split(4, 1), res2net's and cspnet's) stays 4 after pruning: it fixes the
        channels it splits, as sizes given per part do; one computed from the input's shape
        (x.split(x.shape[1] // 2, 1)) follows the pruned width, as chunk does."""
        x, size = id_args[0], id_args[1]
        dim = id_kwargs.get('dim', id_args[2] if len(id_args) > 2 else 0) % x.dim()
        parts = [p.shape[dim] for p in value]
        if isinstance(size, (list, tuple)) or len(set(parts)) > 1 or (literal and len(parts) > 1):
            return self.barrier([x], value, f'split sizes written into {why}')
        if len(parts) > 1:
            pairs = x.movedim(dim, 0).reshape(len(parts), parts[0], -1)
            self.ids.union(pairs[:1], pairs)
        return tuple(p.movedim(0, dim) for p in x.movedim(dim, 0).split(parts[0]))

    def getitem(self, x, index, why):
        """x[index]: an index that selects along a dimension whose ids vary (a slice, a list
        or a permutation of channels) is written for the unpruned channels: it fixes them."""
        if not isinstance(x, torch.Tensor):
            return x[index]
        parts = list(index) if isinstance(index, tuple) else [index]
        for k, i in enumerate(parts):
            if i is Ellipsis:
                taken = sum(1 for j in parts if j is not None and j is not Ellipsis)
                parts[k:k + 1] = [slice(None)] * (x.dim() - taken)
                break
        dim = 0
        for i in parts:
            if i is None:
                continue
            whole = isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1) \
                and (i.stop is None or (isinstance(i.stop, int) and dim < x.dim()
                                        and i.stop >= x.shape[dim]))   # x[:, :C] of C: all
            spans = i.dim() if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1
            if not whole and any(_varies(x, d) for d in range(dim, min(dim + spans, x.dim()))):
                self.ids.fix(x, f'a literal channel index in {why}')
                break
            dim += spans
        return x[index]


def _bound(node):
    """An F.conv*d / F.linear call's arguments by name."""
    names = ('input', 'weight', 'bias') + (
        () if node.target is F.linear else _CONV_ARGS if node.target in _CONV_FNS
        else _TRANSPOSED_ARGS)
    return {**dict(zip(names, node.args)), **node.kwargs}


def _param_node(gm, node):
    """Whether node reads a parameter of the model (get_attr)."""
    if not (isinstance(node, fx.Node) and node.op == 'get_attr'):
        return False
    try:
        return isinstance(gm.get_parameter(node.target), nn.Parameter)
    except AttributeError:
        return False


def _gate_groups(ids):
    """The prunable channel groups (union-find roots) by gate module: {the layers that write
    them: [root, ...]}, in forward order. A gate module holds the groups the same layers
    write."""
    roots = {}
    for i in range(len(ids.parent)):
        roots.setdefault(ids.find(i), []).append(i)
    fixed = ids.fixed_roots()
    modules = {}
    for root, members in roots.items():
        sources = tuple(sorted({ids.source[i] for i in members if i in ids.source}))
        if root in fixed or not sources:
            continue
        modules.setdefault(sources, []).append(root)
    return modules


class _Mask(nn.Module):
    """x times the decisions of the channels (dim 1) or features (last dim) it carries."""

    def __init__(self, index, last):
        super().__init__()
        self.last = last
        self.register_buffer('index', index, persistent=False)

    def forward(self, x, zfull):
        z = zfull.index_select(1, self.index).to(x.dtype)                     # (B, C)
        if self.last:
            return x * z.view(z.shape[0], *[1] * (x.dim() - 2), -1)
        return x * z.view(*z.shape, *[1] * (x.dim() - 2))


class _Layer(nn.Module):
    """Where a conv or linear layer (a module, or the weight an F.conv*d / F.linear call reads)
    or a BN of a GatedNet reads and writes: the gate channel (a column of zfull) of each input
    and output channel; kind ('conv', 'transposed', 'linear'), kernel size and groups for the
    MACs."""

    def __init__(self, name, ins, outs, kind='norm', kernel=1, groups=1):
        super().__init__()
        self.name = name
        self.kind = kind
        self.kernel = kernel
        self.groups = groups
        self.register_buffer('ins', ins, persistent=False)
        self.register_buffer('outs', outs, persistent=False)

    def dense_macs(self):
        """MACs per output position (per input position for a transposed conv), all on."""
        return self.kernel * len(self.ins) * len(self.outs) // self.groups

    def extra_repr(self):
        return f'{self.name!r}, {self.kind}, in={len(self.ins)}, out={len(self.outs)}, ' \
               f'groups={self.groups}'


def conv_linear_macs(model, *inputs):
    """{module path: MACs}: the conv and linear (mm, addmm, mv, addmv) MACs of model(*inputs)
    as torch.utils.flop_counter counts them, for every module that runs (its calls summed;
    '': the whole model; paths as model.named_modules() names them).
    Attention's bmm and scaled dot products are not counted. Runs with autograd on: without
    it nn.MultiheadAttention takes a fused path that the counter does not see."""
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
    for name, m in model.named_modules() if isinstance(model, nn.Module) else ():
        hooks += [m.register_forward_pre_hook(enter),
                  m.register_forward_hook(lambda m, a, o, name=name: leave(m, a, o, name))]
    try:
        with counter, torch.enable_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    macs[''] = total()
    return macs


class GatedNet(nn.Module):
    """A traced CNN with StaticGates (3.2) on its prunable channel groups. forward(x) ->
    (output, GateInfo): the model's own output (tensor, tuple, dict ...); info.macs the conv
    and linear MACs per sample of the network without the off channels (FLOPs(Z), 3.4) plus
    the fixed cost of work beyond the gates, info.max_macs those of the dense network at x's
    size. gates: the StaticGate modules, in GateInfo order; sources: the layers each gates.
    Follows train() / eval() as the model does (a model whose code reads self.training
    runs its evaluation-mode trace in evaluation mode)."""

    def __init__(self, net, eval_net, sites, gates, sources, layers, norms, input_shape):
        super().__init__()
        self.input_shape = input_shape              # (C, ...) of the traced example
        self.net = net                              # fx.GraphModule: forward(x, zfull)
        self.__dict__['_eval_net'] = eval_net       # same modules, evaluation-mode code; None
        self.sites = sites                          # node name -> (layer name, module path)
        self.gates = nn.ModuleList(gates)
        self.sources = sources
        self.layers = nn.ModuleList(layers)         # convs and linears: FLOPs(Z), pruning
        self.norms = nn.ModuleList(norms)           # BNs: pruning
        self._sizes = {}                            # input shape -> (positions, fixed, max)
        self.floor = 0.0                            # MACs share no gate can remove (gate_any)

    def extra_repr(self):
        return f'gates={len(self.gates)}, channels={sum(g.channels for g in self.gates)}'

    def decisions(self, x):
        """[(z, p)] per gate, and zfull (B, channels + 1): every decision, then a 1 (the
        column of the channels no gate decides)."""
        zp = [g(x) for g in self.gates]
        ones = torch.ones(x.shape[0], 1, device=x.device)
        return zp, torch.cat([z for z, _ in zp] + [ones], 1)

    def graph(self):
        """The evaluation-mode graph (the pruned net's)."""
        return (self._eval_net or self.net).graph

    def run(self, x, zfull):
        if self.training or self._eval_net is None:
            return self.net(x, zfull)
        return type(self._eval_net).forward(self.net, x, zfull)   # its code, our modules

    def site_positions(self, x):
        """{node name: output positions (input positions for a transposed conv)} of every
        layer call, and the conv and linear MACs counted in the whole pass: one
        evaluation-mode pass of x[:1] with every gate on."""
        positions, sites = {}, self.sites

        class Shapes(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n.name in sites:
                    kind = layer_kind[sites[n.name][0]]
                    ref = self.env[n.args[0]] if kind == 'transposed' else out
                    positions[n.name] = ref[0, ..., 0].numel() if kind == 'linear' \
                        else ref[0, 0].numel()
                return out
        layer_kind = {layer.name: layer.kind for layer in self.layers}
        ones = torch.ones(1, sum(g.channels for g in self.gates) + 1, device=x.device)
        training = self.net.training
        try:
            self.net.eval()
            counted = conv_linear_macs(Shapes(self.net, graph=self.graph()).run, x[:1], ones)
        finally:
            self.net.train(training)
        return positions, counted.get('', 0)

    def sizes(self, x):
        """Positions of every layer at x's size (summed over its calls), the fixed MACs (work
        beyond the gates), and MaxFLOPs: one pass per input size, cached."""
        key = tuple(x.shape[1:])
        if key not in self._sizes:
            per_site, counted = self.site_positions(x)
            positions = {layer.name: 0 for layer in self.layers}
            for node, n in per_site.items():
                positions[self.sites[node][0]] += n
            dense = sum(positions[layer.name] * layer.dense_macs() for layer in self.layers)
            self._sizes[key] = positions, counted - dense, counted
        return self._sizes[key]

    def forward(self, x):
        zp, zfull = self.decisions(x)
        positions, fixed, max_macs = self.sizes(x)
        out = self.run(x, zfull)
        macs = any_macs(self.layers, positions, zfull.double()) + fixed
        return out, gc.GateInfo([z for z, _ in zp], [p for _, p in zp], macs, max_macs)

    @torch.no_grad()
    def pruned(self):
        """Physical pruning (3.1, 3.3): a plain module (fx.GraphModule) without the off
        channels of threshold inference (each gate's tau), in evaluation mode, computing
        what this network computes in evaluation mode; this network is left as it was."""
        keep = [g.kept() for g in self.gates]
        device = self.layers[0].ins.device if len(self.layers) else None
        keep = torch.cat(keep + [torch.ones(1, dtype=torch.bool, device=device)])
        param = next(self.net.parameters(), None)               # the net's dtype: float64 too
        x = torch.zeros(1, *self.input_shape, device=keep.device,
                        dtype=param.dtype if param is not None else None)
        return _prune(fx.GraphModule(self.net, self.graph()), self.layers, self.norms, keep, x)


def any_macs(layers, positions, zfull):
    """FLOPs(Z) (3.4) of a GatedNet's conv and linear layers, per sample: for each, positions
    x kernel x n_in x n_out, n the channels on (a grouped conv's group is one decision: a x b
    MACs per position for each group on). zfull (B, channels + 1) float64. -> (B,) float64."""
    total = 0
    for layer in layers:
        if layer.groups == 1:
            pairs = zfull[:, layer.ins].sum(1) * zfull[:, layer.outs].sum(1)
        else:
            a, b = len(layer.ins) // layer.groups, len(layer.outs) // layer.groups
            pairs = a * b * zfull[:, layer.outs[::b]].sum(1)
        total = total + positions[layer.name] * layer.kernel * pairs
    return total


def decision_macs(layers, positions, columns):
    """The MACs per sample that turning off each gate channel alone (every other one on)
    removes: any_macs(all on) - any_macs(all on but column j), for j < columns, from the
    per-layer counts of the channels each column decides. -> (columns,) float64."""
    removed = torch.zeros(columns, dtype=torch.float64)
    for layer in layers:
        ins, outs = layer.ins.cpu(), layer.outs.cpu()
        if layer.groups == 1:
            a = torch.bincount(ins, minlength=columns)[:columns].double()
            b = torch.bincount(outs, minlength=columns)[:columns].double()
            pairs = len(ins) * len(outs) - (len(ins) - a) * (len(outs) - b)
        else:
            a, b = len(ins) // layer.groups, len(outs) // layer.groups
            pairs = a * b * torch.bincount(outs[::b], minlength=columns)[:columns].double()
        removed += positions[layer.name] * layer.kernel * pairs
    return removed


def gate_any(model, example_input, gating='static', init_p=gc.INIT_P, ignore=(),
             uncovered='raise'):
    """The paper's static gates (3.2) on every prunable channel group of any torch.fx-traceable
    CNN (the module docstring says how channels are grouped). Returns a GatedNet: forward ->
    (output, GateInfo), so the losses, BN recalibration and threshold inference of
    gumbel_channels work unchanged; `model` is left as it was (the gated net is a copy).
    ignore: names of modules kept whole and ungated (not traced into; the channels they read
        and write stay on; their MACs are a fixed cost).
    uncovered: 'raise' (default) when the model runs conv or linear MACs that gate_any does
        not see; 'fixed' counts them as a fixed cost (their channels stay on) and warns."""
    if gating != 'static':
        raise ValueError("gate_any gives static gates (gating='static'); dynamic gates: "
                         'gumbel_channels.gate_resnet, for ResNets')
    if uncovered not in ('raise', 'fixed'):
        raise ValueError(f"uncovered must be 'raise' or 'fixed', got {uncovered!r}")
    if gc.gates(model):
        raise ValueError('model has gates already: pass the dense model')
    ignore = set([ignore] if isinstance(ignore, str) else ignore or ())
    names = dict(model.named_modules())
    if ignore - set(names):
        raise ValueError(f'ignore names no module of the model: {sorted(ignore - set(names))}; '
                         'names are as model.named_modules() gives them')
    reworked = _reworked_layers(model, example_input, ignore)
    if reworked:
        warnings.warn('gate_any: ' + ', '.join(f'{n} ({type(names[n]).__name__}, {why})'
                                               for n, why in reworked.items())
                      + ' computed from more than its weight as stored: kept whole, its '
                      'channels fixed (slicing its weight would change what it computes)',
                      stacklevel=2)
        ignore |= set(reworked)
    training, model = model.training, copy.deepcopy(model)
    graphs = {}
    for mode in (False, True):                 # code reading self.training follows the mode
        tracer = _Tracer(ignore)
        try:
            graphs[mode] = tracer.trace(model.train(mode))
        except Exception as e:
            raise ValueError(_trace_refusal(tracer.failed, e)) from None
    same = graphs[True].python_code('self').src == graphs[False].python_code('self').src
    x = example_input[:1]
    analysis = _Analysis(model.eval(), ignore)
    try:
        with torch.no_grad():
            if not same:
                analysis.run(graphs[True], x)
                trained = {name for name, _ in analysis.sites.values()}
            analysis.run(graphs[False], x)
    except Exception as e:
        cause = f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:160]}'
        try:
            with torch.no_grad():
                model.eval()(x)
        except Exception:
            raise ValueError(f'the model cannot run on example_input '
                             f'{tuple(example_input.shape)} ({cause}): pass an input of the size '
                             'it is trained at') from None
        raise ValueError(f'the model runs on example_input {tuple(example_input.shape)}, but '
                         f'the channel analysis of its torch.fx trace failed at '
                         f'{_describe(analysis.node, model)} ({cause}); pass ignore=[the module '
                         'that holds it] to keep that module whole (its channels fixed)') from None
    if not same and trained != {name for name, _ in analysis.sites.values()}:
        extra = sorted(trained ^ {name for name, _ in analysis.sites.values()})
        raise ValueError(f'the model runs other layers in training than in evaluation '
                         f'({", ".join(extra[:4])}): gate_any needs the same layers in both '
                         '(build it without its auxiliary heads, e.g. aux_logits=False)')
    found, device = analysis.ids, example_input.device
    column, gates, sources = {}, [], []
    for srcs, roots in _gate_groups(found).items():
        column.update({root: len(column) + k for k, root in enumerate(roots)})
        gates.append(gc.StaticGate(len(roots), init_p).to(device))
        sources.append(list(srcs))

    def columns(ids):                       # each id's column of zfull (the last: no gate)
        return torch.tensor([column.get(found.find(i), len(column)) for i in ids.tolist()],
                            dtype=torch.long, device=device)
    layers = [_Layer(name, columns(v['ins']), columns(v['outs']), v['kind'], v['kernel'],
                     v['groups']) for name, v in analysis.layers.items()]
    norms = [_Layer(name, columns(ch), columns(ch)) for name, ch in analysis.bns.items()]
    net = fx.GraphModule(model, graphs[False])
    eval_net = None
    if not same:                            # the training-mode code runs in self.net
        _copy_missing(model, net, graphs[True])
        eval_graph, net.graph = net.graph, graphs[True]
        _insert_masks(net, net.graph, layers, 'gate_mask')
        _insert_masks(net, eval_graph, layers, 'gate_mask_eval')
        eval_net = fx.GraphModule(net, eval_graph)
    else:
        _insert_masks(net, net.graph, layers, 'gate_mask')
    net.train(training)
    gated = GatedNet(net, eval_net, dict(analysis.sites), gates, sources, layers, norms,
                     tuple(example_input.shape[1:])).train(training)
    _check_count(gated, model.eval(), x, ignore, uncovered, analysis)
    model.train(training)
    return gated


def _trace_refusal(module, e):
    where = f'torch.fx cannot trace {module}' if module else 'torch.fx cannot trace the model'
    first = (str(e).splitlines() or [''])[0][:160]
    leaf = f"ignore=['{module.split(' ')[0]}']" if module and module[0] != 't' \
        else "ignore=['name']"
    return (f'{where} ({type(e).__name__}: {first}). Decorate the function that branches on a '
            f'tensor with torch.fx.wrap, or pass {leaf} to keep that module whole (its '
            'channels stay ungated, its MACs a fixed cost)')


def _copy_missing(root, gm, graph):
    """Give gm every module and attribute `graph` uses that it lacks, taken from root."""
    for node in graph.nodes:
        if node.op not in ('call_module', 'get_attr'):
            continue
        *path, field = node.target.split('.')
        src, dst = root, gm
        for part in path:
            src = getattr(src, part)
            if not hasattr(dst, part):
                setattr(dst, part, nn.Module())
            dst = getattr(dst, part)
        if not hasattr(dst, field):
            setattr(dst, field, getattr(src, field))


def _insert_masks(gm, graph, layers, prefix):
    """zfull becomes the graph's second input; each conv and linear call reads its input
    times the decisions of the channels it carries."""
    by_name = {layer.name: layer for layer in layers}
    x = next(n for n in graph.nodes if n.op == 'placeholder')
    with graph.inserting_after(x):
        zfull = graph.placeholder('zfull')
    sites = [(n, _layer_called(n, by_name)) for n in graph.nodes]
    for k, (node, layer) in enumerate((n, by_name[name]) for n, name in sites if name):
        gm.add_submodule(f'{prefix}{k}', _Mask(layer.ins, layer.kind == 'linear'))
        with graph.inserting_before(node):
            masked = graph.call_module(f'{prefix}{k}', (node.args[0], zfull))
        node.args = (masked, *node.args[1:])
    graph.lint()
    gm.recompile()


def _layer_called(node, layers):
    """The name of the layer (in `layers`) a node calls: a module, or the weight of an
    F.conv*d / F.linear call; None."""
    if node.op == 'call_module':
        return node.target if node.target in layers else None
    if node.op == 'call_function' and (node.target in _CONV_FNS or node.target in
                                       _TRANSPOSED_FNS or node.target is F.linear):
        weight = _bound(node).get('weight')
        if isinstance(weight, fx.Node) and weight.op == 'get_attr' and weight.target in layers:
            return weight.target
    return None


def _check_count(gated, model, x, ignore, uncovered, analysis):
    """FLOPs(Z) with every gate on against the conv and linear MACs FlopCounterMode counts in
    the model, module by module: a difference outside the modules in `ignore` is refused
    (or, uncovered='fixed', a fixed cost with a warning); a warning when less than half of
    the MACs can be gated, naming the ops that fixed the channels."""
    counted = conv_linear_macs(model, x)
    per_site, _ = gated.site_positions(x)
    by_name = {layer.name: layer for layer in gated.layers}
    names = {}                          # a module registered twice (TCN: conv1, net.0) runs
    for p, m in model.named_modules(remove_duplicate=False):    # inside both parents
        names.setdefault(id(m), []).append(p)
    modules = dict(model.named_modules())
    ours = {}
    for node, n in per_site.items():
        name, path = gated.sites[node]
        paths = names.get(id(modules[path]), [path]) if path in modules else [path]
        for p in {a for q in paths for a in _ancestors(q)}:     # the modules that ran
            if p == path or p in counted:
                ours[p] = ours.get(p, 0) + n * by_name[name].dense_macs()
    diff = {p: counted.get(p, 0) - ours.get(p, 0) for p in set(counted) | set(ours)}
    diff = {p: d for p, d in diff.items() if d}
    order = {p: k for k, p in enumerate(dict(model.named_modules()))}
    deepest = sorted((p for p in diff if not any(q != p and _inside(q, p) for q in diff)),
                     key=order.get)
    kinds = {p: type(model.get_submodule(p)).__name__ for p in deepest}
    modules = {n for node, (n, path) in gated.sites.items() if path == n}
    unseen = [p for p in deepest if not any(_inside(p, i) for i in ignore)]  # others: ignored
    wrong = [p for p in unseen if diff[p] < 0 or any(_inside(p, m) for m in modules)]
    if wrong:
        raise ValueError('gate_any cannot count the MACs of ' + ', '.join(
            f'{p or "the model"} ({kinds[p]}: {counted.get(p, 0):,} counted, '
            f'{ours.get(p, 0):,} by its weights)' for p in wrong) +
            f": pass ignore={wrong!r} to keep those modules whole and ungated")
    if unseen:
        listed = ', '.join(f'{p or "the top module"} ({kinds[p]}) {diff[p]:,}' for p in unseen[:3])
        listed += f' and {len(unseen) - 3} more modules' if len(unseen) > 3 else ''
        if uncovered == 'raise':
            raise ValueError(f'gate_any does not see these conv / linear MACs of the model: '
                             f"{listed}. Pass uncovered='fixed' to count them as a fixed cost "
                             '(their channels stay on), or name those modules in ignore= to '
                             'keep them whole')
        warnings.warn(f"gate_any: uncovered='fixed': {listed} MACs are a fixed cost, their "
                      'channels stay on', stacklevel=3)
    positions, fixed, total = gated.sizes(x)
    z = torch.zeros(1, sum(g.channels for g in gated.gates) + 1, dtype=torch.float64)
    z[:, -1] = 1                                               # every gate off
    gateable = total - fixed - float(any_macs(gated.layers, positions, z).sum())
    gated.floor = 1 - gateable / total if total else 0.0
    columns = sum(g.channels for g in gated.gates)
    largest = float(decision_macs(gated.layers, positions, columns).max()) if columns else 0.0
    if total and gateable and largest >= gateable / 2:
        warnings.warn(f'gate_any: one gate decides {100 * largest / gateable:.0f}% of the MACs '
                      f'the gates can remove ({columns} gate channel(s) in all): the channel '
                      'analysis tied the channels of many layers into one group (grouped convs '
                      'and a channel shuffle, as in ShuffleNet v1, tie every channel to every '
                      'other), so the gates can only keep or remove that group whole; one group '
                      'covering the net is as good as none', stacklevel=3)
    if total and gateable < total / 2:
        reasons, fixed_roots = {}, analysis.ids.fixed_roots()
        for layer in gated.layers:
            seen = analysis.layers[layer.name]
            roots = [analysis.ids.find(i) for i in torch.cat([seen['outs'], seen['ins']]).tolist()]
            why = next((fixed_roots[r] for r in roots if r in fixed_roots), 'fixed channels')
            reasons[why] = reasons.get(why, 0) + float(any_macs([layer], positions, z).sum())
        for p in deepest:
            kept = next((i for i in ignore if _inside(p, i)), None)
            why = f'ignore={kept!r}' if kept else f'{p or "the top module"} ({kinds[p]})'
            reasons[why] = reasons.get(why, 0) + diff[p]
        top = [(w, m) for w, m in sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
               if m >= total / 200]                            # those that round to 1% or more
        warnings.warn(f'gate_any: only {100 * gateable / total:.0f}% of the MACs can be gated, '
                      f'so a FLOPs target t below {gated.floor:.2f} cannot be reached: the loss '
                      'then turns every gate off; the channels of the rest are fixed by '
                      + ', '.join(f'{w} ({100 * m / total:.0f}%)' for w, m in top), stacklevel=3)


def _ancestors(path):
    """'a.b.c' -> ['a.b.c', 'a.b', 'a', '']."""
    parts = path.split('.') if path else []
    return ['.'.join(parts[:k]) for k in range(len(parts), -1, -1)]


def _inside(q, p):
    """Whether module path q lies in p (or is p)."""
    return p == '' or q == p or q.startswith(p + '.')


# ----------------------------------------------------------------------------- pruning

def _module_of_call(gm, node):
    """The nn module computing an F.conv*d / F.linear call on module parameters."""
    call = _bound(node)
    w = gm.get_parameter(call['weight'].target)
    bias = call.get('bias')
    bias = None if bias is None else gm.get_parameter(bias.target)
    if node.target is F.linear:
        new = nn.Linear(w.shape[1], w.shape[0], bias is not None)
    else:
        dim = {**_CONV_FNS, **_TRANSPOSED_FNS}[node.target]
        kw = {k: call[k] for k in (_CONV_ARGS if node.target in _CONV_FNS else _TRANSPOSED_ARGS)
              if k in call}
        groups = kw.get('groups', 1)
        if node.target in _CONV_FNS:
            new = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dim - 1](
                w.shape[1] * groups, w.shape[0], w.shape[2:], bias=bias is not None, **kw)
        else:
            new = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][dim - 1](
                w.shape[0], w.shape[1] * groups, w.shape[2:], bias=bias is not None, **kw)
    return ge.replaced(new.to(w), weight=w.detach(), bias=None if bias is None else bias.detach())


def _prune(gm, layers, norms, keep, x):
    """A copy of the traced net without its masks and zfull input, each conv, linear and BN
    sliced to the channels `keep` (per column of zfull) keeps (an F.conv*d / F.linear call
    becomes the module it computes, sliced); ops that cannot take a tensor left with no
    channel (a pool after a conv whose outputs are all off) are made to."""
    gm = copy.deepcopy(gm).eval()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == 'call_module' and node.target.startswith('gate_mask'):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.erase_node(next(n for n in graph.nodes if n.op == 'placeholder' and n.target == 'zfull'))
    by_name = {layer.name: layer for layer in layers}
    calls = [n for n in graph.nodes if n.op == 'call_function' and _layer_called(n, by_name)]
    for k, node in enumerate(calls):
        name = f'pruned_call{k}'
        gm.add_submodule(name, _module_of_call(gm, node))
        by_name[name] = by_name[_layer_called(node, by_name)]
        with graph.inserting_before(node):
            node.replace_all_uses_with(graph.call_module(name, (node.args[0],)))
        graph.erase_node(node)
    # a layer whose output nothing reads (WaveNet's last residual conv) still runs, as in the
    # gated net, whose FLOPs(Z) counts it: the pruned net computes what was counted
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or (
        n.op == 'call_module' and n.target in by_name))
    for target in {n.target for n in graph.nodes if n.op == 'call_module'} & set(by_name):
        layer = by_name[target]                          # once, however often it is called
        gm.set_submodule(target, ge.sliced(gm.get_submodule(target), keep[layer.ins],
                                            keep[layer.outs], layer.groups))
    for norm in norms:
        gm.set_submodule(norm.name, ge.sliced_norm(gm.get_submodule(norm.name),
                                                   keep[norm.ins]))
    gm.delete_all_unused_submodules()
    gm.recompile()
    _EmptySafe(gm.eval()).run(x)
    graph.lint()
    gm.recompile()
    return gm.eval()


def _on_empty(fn, x, *args, **kwargs):
    """fn(x, ...) for an x with no channel (dim 1 of size 0): fn on one zero channel, whose
    result's channels are then dropped again."""
    if x.shape[1] == 0:
        return fn(x.new_zeros(x.shape[0], 1, *x.shape[2:]), *args, **kwargs)[:, :0]
    return fn(x, *args, **kwargs)


def _on_empty_call(name, x, *args, **kwargs):
    """_on_empty of the function named `name` ('torch.nn.functional.max_pool2d')."""
    module, _, attr = name.rpartition('.')
    return _on_empty(getattr(importlib.import_module(module), attr), x, *args, **kwargs)


class _OnEmpty(nn.Module):
    """A module that takes a tensor with no channel through _on_empty."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, *args, **kwargs):
        return _on_empty(self.module, x, *args, **kwargs)


class _EmptySafe(fx.Interpreter):
    """Runs the pruned graph once; a node that fails on a channel-less input is rewritten to
    go through _on_empty. (A conv or linear layer with nothing on is already a
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
        elif n.op == 'call_function':                    # by name: the code stays printable
            n.target, n.args = _on_empty_call, (_get_qualified_name(n.target), *n.args)
        else:
            raise ValueError(f'the pruned net cannot run: .{n.target}() gets a tensor with no '
                             'channel left; pass its input\'s layer in gate_any(ignore=...) '
                             'so that those channels stay on')
        return super().run_node(n)
