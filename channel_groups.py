"""The channel analysis of any torch.fx-traceable CNN (Torch-Pruning's dependency graph): which
channels must be kept or removed together, which cannot be removed and why. gumbel_any
gates each group; print them before gating anything:

    print(channel_groups(model, example_input))     # the groups, and every fixed channel's reason

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
"""
import collections
import copy
import importlib
import math
import operator
import warnings
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['channel_groups', 'ChannelGroups', 'analyze']

ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid,
                        nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity,
                        nn.PReLU, nn.modules.dropout._DropoutNd,
                        nn.modules.padding._ReflectionPadNd,      # pad the spatial dims of
                        nn.modules.padding._ReplicationPadNd,     # each channel alike
                        nn.modules.padding._ConstantPadNd)
POOL_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                 nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                 nn.Upsample)
UNARY = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid,
          torch.sigmoid, torch.tanh, F.leaky_relu, F.mish, F.elu, F.dropout, F.dropout1d,
          F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout, 'relu', 'relu_', 'sigmoid',
          'sigmoid_', 'tanh', 'contiguous', 'clone', 'float', 'to', 'type_as'}
BINARY = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub,
           operator.truediv, torch.add, torch.mul, torch.sub, torch.div, 'add', 'add_', 'mul',
           'mul_', 'sub', 'div', 'div_'}
POOL = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
         F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d,
         F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.interpolate}
REDUCE = {torch.mean, torch.sum, torch.amax, 'mean', 'sum', 'amax'}
RESHAPE = {torch.flatten, torch.reshape, 'flatten', 'view', 'reshape'}
MOVE = {torch.permute, torch.transpose, 'permute', 'transpose', torch.squeeze, 'squeeze',
         torch.unsqueeze, 'unsqueeze'}
SPLIT = {torch.chunk, 'chunk', torch.split, 'split'}
_SHAPE_ONLY = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.rand_like,    # read
               torch.randn_like, torch.full_like, 'new_empty', 'new_zeros', 'new_ones',  # no
               'new_full'}                                                               # value
# F.conv*d / F.linear: argument names after (input, weight, bias); transposed convs
CONV_FNS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
TRANSPOSED_FNS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
CONV_ARGS = ('stride', 'padding', 'dilation', 'groups')
TRANSPOSED_ARGS = ('stride', 'padding', 'output_padding', 'groups', 'dilation')


def is_norm(m):
    """A BatchNorm of any dimension or subclass, or a BN with frozen statistics (torchvision's
    FrozenBatchNorm2d): a per-channel affine map in evaluation mode."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or any(
        c.__name__ == 'FrozenBatchNorm2d' for c in type(m).__mro__)


def per_channel(m):
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
    weight and bias, so that slicing those would change what they compute: a parametrization,
    a forward hook, or a forward of their own whose output on x differs from their base
    class's at the same MACs (weight standardization, a gain; a subclass with MACs beyond its
    weight's is left to the MAC check; one that only calls F.conv2d / F.linear on its weight
    passes). The old nn.utils.weight_norm is refused (ValueError)."""
    found, seen, hooks = {}, {}, []

    def record(name, args, out):                # returns None: a hook's value replaces out
        seen.setdefault(name, (args, out))
    for name, m in model.named_modules():
        if not _is_layer(m) or name in ignore or any(inside(name, i) for i in ignore):
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
        return _is_layer(m) or is_norm(m) or type(m).__name__ == 'StochasticDepth' \
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
        self.why.update(dict.fromkeys(range(start, start + n), why) if why else {})
        self.source.update(dict.fromkeys(range(start, start + n), source) if source else {})
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


def tensors(value):
    """The tensors in a (nested) argument, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
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
        self.constant_ids = set()   # ids fixed where they arise: one per source, its reason
        self.fixed_id = self.fixed('the network input')

    def fixed(self, why):
        """A new fixed id, `why` its reason: a value's channels that no gate may remove."""
        i = self.ids.new(1, why=why)[0]
        self.constant_ids.add(int(i))
        return i

    def barrier(self, args, value, why):
        """An op beyond analysis: the ids it reads are fixed, its output is one fixed id."""
        for t in tensors(args):
            self.ids.fix(t, why)
        return _fixed_like(value, self.fixed(f'the output of {why}'))

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
                for t in tensors(load_ids(node.args)):
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
            if not tensors(value):
                ids[node] = None
            elif node.op == 'get_attr':
                ids[node] = _fixed_like(value, self.fixed(f'a parameter or buffer read '
                                                          f'across channels ({node.target})'))
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
                kind = 'linear' if isinstance(module, nn.Linear) else \
                    'transposed' if module.transposed else 'conv'
                return self.layer(target, node, kind, x, value, module.weight,
                                  getattr(module, 'groups', 1))
            if is_norm(module) or per_channel(module):
                channels = self.ids.per_index(x, 1)
                if target in self.bns:
                    self.ids.union(self.bns[target], channels)
                self.bns[target] = channels
                return x
            if isinstance(module, ELEMENTWISE_MODULES) or type(module).__name__ == \
                    'StochasticDepth':
                return x
            if isinstance(module, POOL_MODULES):
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
            if key in CONV_FNS or key in TRANSPOSED_FNS or key is F.linear:
                layer = self.call_layer(node, id_args, value)
                if layer is not None:
                    return layer
            if key in UNARY:
                return id_args[0]
            if key in BINARY:
                return self.elementwise(*id_args[:2])
            if key in POOL:
                return self.pool(id_args[0], value)
            if key is F.pad and len(args[1]) <= 2 * (args[0].dim() - 2):   # spatial padding
                return self.pool(id_args[0], value)
            if key in REDUCE:
                return self.reduce(id_args[0], args, kwargs, value, why)
            if key in RESHAPE:                 # ids may be expanded views: reshape, not view
                return self.reshape(node, apply('reshape' if key == 'view' else None), why)
            if key in MOVE or key is torch.cat:
                return apply()
            if key in SPLIT:
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
        call = bound_args(node)
        weight, bias = call.get('weight'), call.get('bias')
        if not _param_node(self.gm, weight) or not (bias is None or _param_node(self.gm, bias)) \
                or any(isinstance(v, fx.Node) for k, v in call.items()
                       if k not in ('input', 'weight', 'bias')):
            return None
        kind = 'linear' if node.target is F.linear else \
            'conv' if node.target in CONV_FNS else 'transposed'
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
        first = int(this.reshape(-1)[0]) if this.numel() else None
        if first not in self.constant_ids or not bool((this == first).all()):
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


def bound_args(node):
    """An F.conv*d / F.linear call's arguments by name."""
    names = ('input', 'weight', 'bias') + (
        () if node.target is F.linear else CONV_ARGS if node.target in CONV_FNS
        else TRANSPOSED_ARGS)
    return {**dict(zip(names, node.args)), **node.kwargs}


def _param_node(gm, node):
    """Whether node reads a parameter of the model (get_attr)."""
    if not (isinstance(node, fx.Node) and node.op == 'get_attr'):
        return False
    try:
        return isinstance(gm.get_parameter(node.target), nn.Parameter)
    except AttributeError:
        return False


def gate_groups(ids):
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


def inside(q, p):
    """Whether module path q lies in p (or is p)."""
    return p == '' or q == p or q.startswith(p + '.')


# ----------------------------------------------------------------------------- the analysis, whole

def analyze(model, example_input, ignore=()):
    """Trace `model` in both modes and run the channel analysis on example_input[:1]; layers
    that compute from more than their weight are kept whole with a warning. Every failure is a
    ValueError that says what to do. `model` is left as it was. -> (its copy in evaluation
    mode, its torch.fx graphs {training: graph}, whether their code is the same, the
    _Analysis, the modules kept whole)."""
    ignore = set([ignore] if isinstance(ignore, str) else ignore or ())
    names = dict(model.named_modules())
    if ignore - set(names):
        raise ValueError(f'ignore names no module of the model: {sorted(ignore - set(names))}; '
                         'names are as model.named_modules() gives them')
    reworked = _reworked_layers(model, example_input, ignore)
    if reworked:
        listed = ', '.join(f'{n} ({type(names[n]).__name__}, {why})' for n, why in reworked.items())
        warnings.warn(f'gate_any: {listed} computed from more than its weight as stored: kept '
                      'whole, its channels fixed (slicing its weight would change what it '
                      'computes)', stacklevel=3)
        ignore |= set(reworked)
    model = copy.deepcopy(model)
    graphs = {}
    for mode in (False, True):                 # code reading self.training follows the mode
        tracer = _Tracer(ignore)
        try:
            graphs[mode] = tracer.trace(model.train(mode))
        except Exception as e:
            module, first = tracer.failed, (str(e).splitlines() or [''])[0][:160]
            leaf = f"ignore=['{module.split(' ')[0]}']" if module and module[0] != 't' \
                else "ignore=['name']"
            raise ValueError(f'torch.fx cannot trace {module or "the model"} ({type(e).__name__}: '
                             f'{first}). Decorate the function that branches on a tensor with '
                             f'torch.fx.wrap, or pass {leaf} to keep that module whole (its '
                             'channels stay ungated, its MACs a fixed cost)') from None
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
    return model, graphs, same, analysis, ignore


class ChannelGroups(NamedTuple):
    """groups: per gate module gate_any would build, (the layers writing it, its channel
    decisions); fixed: (layer, its output channels fixed, why) per reason. Prints as a table."""
    groups: list
    fixed: list

    def __str__(self):
        lines = [f'{len(self.groups)} groups, {sum(n for _, n in self.groups)} channel decisions:']
        lines += [f'  {n:5d}  {", ".join(layers)}' for layers, n in self.groups]
        lines += [f'{sum(n for _, n, _ in self.fixed)} output channels fixed:']
        lines += [f'  {n:5d}  {layer}: {why}' for layer, n, why in self.fixed]
        return '\n'.join(lines)


def channel_groups(model, example_input, ignore=()):
    """The channel groups of any torch.fx-traceable CNN (the module docstring says how) and
    the op that fixed each output channel no gate may remove. -> ChannelGroups."""
    found = analyze(model, example_input, ignore)[3]
    ids, fixed_roots = found.ids, found.ids.fixed_roots()
    groups = [(list(layers), len(roots)) for layers, roots in gate_groups(ids).items()]
    fixed = collections.Counter((name, fixed_roots[ids.find(i)])    # each output channel
                                for name, seen in found.layers.items()
                                for i in seen['outs'].tolist() if ids.find(i) in fixed_roots)
    return ChannelGroups(groups, [(layer, n, why) for (layer, why), n in fixed.items()])
