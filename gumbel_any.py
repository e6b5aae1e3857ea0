"""The paper's static gates in any CNN a user brings (MobileNet, EfficientNet, RegNet, ConvNeXt,
DenseNet, ShuffleNet, VGG, their own blocks): gate, train toward t, prune physically.

    gated = gate_any(model, example_input)    # a StaticGate on every prunable channel group
    logits, info = gated(x)                   # info.macs: FLOPs(Z) per sample (3.4)
    pruned = gated.pruned()                   # or gumbel_export.prune(gated): a plain module

How channels are grouped. The model is traced with torch.fx and run once on example_input;
every channel of every tensor carries an id, and ids that must be kept or removed together
are merged (union-find):
- a residual add or any elementwise product (squeeze-excitation's scale) merges the channels
  it combines position by position; a concatenation keeps each input's ids;
- a grouped conv merges each group's input and output channels (one decision per group: a
  depthwise conv ties its output channel to its input channel);
- a reshape that splits channels into (groups, channels) and a chunk into equal parts merge
  the positions they pair, so the pruned net's reshape stays valid (channel shuffle);
- anything else that reads across channels (LayerNorm, a slice of the channel dimension, a
  parameter broadcast onto channels, an unknown op) and the network's input and output fix
  the channels it touches: they are never gated.
Each remaining group of ids is one gate channel, one Bernoulli decision; the channels whose
ids come from the same set of convs share one StaticGate module.

Where decisions act. Z multiplies the input of every conv and linear layer, the only ops that
mix channels: an off channel reaches no mixing op, so the masked network computes what the
network without that channel computes (NOTES.md 21), and FLOPs(Z) counts the conv and linear
MACs of that network exactly: n_in * n_out (per group for grouped convs) times kernel and
positions, per sample.
"""
import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

try:                                                    # beside gumbel_channels, or in a package
    from . import gumbel_channels as gc
except ImportError:
    import gumbel_channels as gc

__all__ = ['gate_any', 'GatedNet', 'any_macs']

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid,
                        nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity,
                        nn.Dropout, nn.Dropout2d)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_UNARY = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid,
          torch.sigmoid, torch.tanh, F.dropout, 'relu', 'relu_', 'sigmoid', 'sigmoid_', 'tanh',
          'contiguous', 'clone', 'float', 'to', 'type_as'}
_BINARY = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub,
           operator.truediv, torch.add, torch.mul, torch.sub, torch.div, 'add', 'add_', 'mul',
           'mul_', 'sub', 'div'}
_POOL = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d}
_REDUCE = {torch.mean, torch.sum, torch.amax, 'mean', 'sum', 'amax'}
_RESHAPE = {torch.flatten, torch.reshape, 'flatten', 'view', 'reshape'}
_MOVE = {torch.permute, torch.transpose, 'permute', 'transpose', torch.squeeze, 'squeeze',
         torch.unsqueeze, 'unsqueeze'}
_SPLIT = {torch.chunk, 'chunk', torch.split, 'split'}


def _leaf(m):
    """Modules the trace keeps whole besides torch.nn's: torchvision's StochasticDepth (its
    forward branches on self.training, which a trace would freeze)."""
    return type(m).__name__ == 'StochasticDepth'


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return _leaf(m) or super().is_leaf_module(m, qualname)


class _Ids:
    """Channel ids and their union-find: which channels must be kept or removed together."""

    def __init__(self):
        self.parent, self.fixed, self.source = [], set(), {}

    def new(self, n, fixed=False, source=None):
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        if fixed:
            self.fixed.update(range(start, start + n))
        for i in range(start, start + n) if source else ():
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

    def fix(self, ids):
        self.fixed.update(torch.unique(ids).tolist())

    def per_index(self, ids, dim):
        """One id per index along dim: every id in that slice merged. -> (size of dim,)."""
        rows = ids.movedim(dim, 0).reshape(ids.shape[dim], -1)
        self.union(rows[:, :1], rows)
        return rows[:, 0].clone()


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
    """A value's ids when it is beyond analysis: one fixed id for every element."""
    if isinstance(value, torch.Tensor):
        return fixed_id.expand(value.shape)
    if isinstance(value, (list, tuple)):
        return type(value)(_fixed_like(v, fixed_id) for v in value)
    return None


class _Analysis:
    """Runs the traced graph on example_input, value and ids side by side, and records for
    every conv, linear and BN module the ids of the channels it reads and writes."""

    def __init__(self, gm, example_input, ignore):
        self.gm = gm
        self.ids = _Ids()
        self.ignore = set(ignore or ())
        self.convs = {}                     # module name -> (in ids, out ids)
        self.bns = {}                       # module name -> channel ids
        self.fixed_id = self.ids.new(1, fixed=True)[0]
        self.run(example_input)

    def barrier(self, args, value):
        """An op beyond analysis: the ids it reads are fixed, its output is one fixed id."""
        for t in _tensors(args):
            self.ids.fix(t)
        return _fixed_like(value, self.fixed_id)

    def run(self, x):
        values, ids = {}, {}
        load = lambda a: fx.node.map_arg(a, lambda n: values[n])                  # noqa: E731
        # an argument's ids where it holds tensors, its value where it does not (sizes)
        load_ids = lambda a: fx.node.map_arg(                                     # noqa: E731
            a, lambda n: values[n] if ids[n] is None else ids[n])
        for node in self.gm.graph.nodes:
            if node.op == 'placeholder':
                values[node], ids[node] = x, self.fixed_id.expand(x.shape)
                continue
            if node.op == 'output':
                for t in _tensors(load_ids(node.args)):
                    self.ids.fix(t)
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
        target = node.target
        if node.op == 'call_module':
            module = self.gm.get_submodule(target)
            x = id_args[0]
            if isinstance(module, nn.Conv2d):
                return self.conv(node.target, module, x, value)
            if isinstance(module, nn.Linear):
                return self.linear(node.target, module, x, value)
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                channels = self.ids.per_index(x, 1)
                if target in self.bns:
                    self.ids.union(self.bns[target], channels)
                self.bns[target] = channels
                return x
            if isinstance(module, _ELEMENTWISE_MODULES) or _leaf(module):
                return x
            if isinstance(module, _POOL_MODULES):
                return self.pool(x, value)
            if isinstance(module, nn.Flatten):
                return self.reshape(node, x.flatten(module.start_dim, module.end_dim))
            return self.barrier(id_args, value)
        key = target if node.op == 'call_function' else str(target)

        def apply(name=None):                   # the same op on the ids
            if node.op == 'call_method':
                return getattr(id_args[0], name or target)(*id_args[1:], **id_kwargs)
            return target(*id_args, **id_kwargs)
        try:
            if key in _UNARY:
                return id_args[0]
            if key in _BINARY:
                a, b = id_args[:2]
                if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                    self.ids.union(a, b)
                    return torch.broadcast_tensors(a, b)[0]
                return a if isinstance(a, torch.Tensor) else b
            if key in _POOL:
                return self.pool(id_args[0], value)
            if key in _REDUCE:
                return self.reduce(id_args[0], args, kwargs, value)
            if key in _RESHAPE:                 # ids may be expanded views: reshape, not view
                return self.reshape(node, apply('reshape' if key == 'view' else None))
            if key in _MOVE or key is torch.cat:
                return apply()
            if key in _SPLIT:
                return self.split(id_args, id_kwargs, value)
            if key is operator.getitem:
                return self.getitem(id_args)
        except (TypeError, RuntimeError, IndexError):          # an unusual call of a known op
            pass
        return self.barrier(id_args, value)

    def conv(self, name, conv, x, value):
        channels = self.ids.per_index(x, 1)                                     # (C_in,)
        if name in self.convs:
            self.ids.union(self.convs[name][0], channels)
            out = self.convs[name][1]
        else:
            out = self.ids.new(conv.out_channels, fixed=name in self.ignore, source=name)
        g = conv.groups
        if g > 1:                                               # a group is one decision
            self.ids.union(channels.view(g, -1)[:, :1], torch.cat(
                [channels.view(g, -1), out.view(g, -1)], 1))
        self.convs[name] = (channels, out)
        return out.view(1, -1, 1, 1).expand(value.shape)

    def linear(self, name, linear, x, value):
        features = self.ids.per_index(x, -1)                                    # (F_in,)
        if name in self.convs:
            self.ids.union(self.convs[name][0], features)
            out = self.convs[name][1]
        else:
            out = self.ids.new(linear.out_features, fixed=name in self.ignore, source=name)
        self.convs[name] = (features, out)
        return out.expand(value.shape)

    def pool(self, x, value):
        """Spatial pooling of (B, C, H, W): needs one id per channel."""
        channels = self.ids.per_index(x, 1)
        return channels.view(1, -1, *[1] * (value.dim() - 2)).expand(value.shape)

    def reduce(self, x, args, kwargs, value):
        dims = kwargs.get('dim', args[1] if len(args) > 1 else None)
        dims = [dims] if isinstance(dims, int) else list(dims or range(x.dim()))
        dims = [d % x.dim() for d in dims]
        if any(_varies(x, d) for d in dims):                   # a sum across channels mixes
            return self.barrier([x], value)
        keep = kwargs.get('keepdim', args[2] if len(args) > 2 else False)
        for d in sorted(dims, reverse=True):
            x = x.narrow(d, 0, 1) if keep else x.select(d, 0)
        return x

    def reshape(self, node, out):
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
                self.ids.fix(out)
        return out

    def split(self, id_args, id_kwargs, value):
        """chunk / split into equal parts: the positions the parts pair are merged, so that
        a pruned net splits its fewer channels at the same places."""
        x, size = id_args[0], id_args[1]
        dim = id_kwargs.get('dim', id_args[2] if len(id_args) > 2 else 0) % x.dim()
        parts = [p.shape[dim] for p in value]
        if isinstance(size, (list, tuple)) or len(set(parts)) > 1:
            return self.barrier([x], value)                    # sizes written into the code
        if len(parts) > 1:
            pairs = x.movedim(dim, 0).reshape(len(parts), parts[0], -1)
            self.ids.union(pairs[:1], pairs)
        return tuple(p.movedim(0, dim) for p in x.movedim(dim, 0).split(parts[0]))

    def getitem(self, id_args):
        x, index = id_args
        if not isinstance(x, torch.Tensor):
            return x[index]
        out = x[index]
        if set(torch.unique(out).tolist()) != set(torch.unique(x).tolist()):
            self.ids.fix(x)                                    # a slice of some channels
        return out


def _gate_groups(analysis):
    """The prunable channel groups (union-find roots) by gate module: {the layers that write
    them: [root, ...]}, in forward order. A gate module holds the groups the same layers
    write."""
    ids = analysis.ids
    roots = {}
    for i in range(len(ids.parent)):
        roots.setdefault(ids.find(i), []).append(i)
    fixed = {ids.find(i) for i in ids.fixed}
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
    """Where a conv, linear or BN module of a GatedNet reads and writes: the gate channel (a
    column of zfull) of each input and output channel; groups and kernel for the MACs."""

    def __init__(self, name, module, ins, outs):
        super().__init__()
        self.name = name
        self.groups = getattr(module, 'groups', 1)
        self.kernel = module.kernel_size[0] * module.kernel_size[1] \
            if isinstance(module, nn.Conv2d) else 1
        self.register_buffer('ins', ins, persistent=False)
        self.register_buffer('outs', outs, persistent=False)

    def extra_repr(self):
        return f'{self.name!r}, in={len(self.ins)}, out={len(self.outs)}, groups={self.groups}'


class GatedNet(nn.Module):
    """A traced CNN with StaticGates (3.2) on its prunable channel groups. forward(x) ->
    (logits, GateInfo): info.macs the conv and linear MACs per sample of the network without
    the off channels (FLOPs(Z), 3.4), info.max_macs those of the dense network at x's size.
    gates: the StaticGate modules, in GateInfo order; sources: the layers each one gates."""

    def __init__(self, net, gates, sources, layers, norms, input_shape):
        super().__init__()
        self.input_shape = input_shape              # (C, H, W) of the traced example
        self.net = net                              # fx.GraphModule: forward(x, zfull)
        self.gates = nn.ModuleList(gates)
        self.sources = sources
        self.layers = nn.ModuleList(layers)         # convs and linears: FLOPs(Z), pruning
        self.norms = nn.ModuleList(norms)           # BNs: pruning
        self._sizes = {}                            # input shape -> (positions, MaxFLOPs)

    def extra_repr(self):
        return f'gates={len(self.gates)}, channels={sum(g.channels for g in self.gates)}'

    def decisions(self, x):
        """[(z, p)] per gate, and zfull (B, channels + 1): every decision, then a 1 (the
        column of the channels no gate decides)."""
        zp = [g(x) for g in self.gates]
        ones = torch.ones(x.shape[0], 1, device=x.device)
        return zp, torch.cat([z for z, _ in zp] + [ones], 1)

    def sizes(self, x):
        """Output positions of every conv and linear layer at x's size, and MaxFLOPs: one
        evaluation-mode pass per input size, cached."""
        key = tuple(x.shape[1:])
        if key not in self._sizes:
            positions, hooks = {}, []
            for layer in self.layers:
                def hook(m, inputs, out, name=layer.name):                  # (1, C, H, W)
                    positions[name] = out[0, ..., 0].numel() if isinstance(m, nn.Linear) \
                        else out[0, 0].numel()
                hooks.append(self.net.get_submodule(layer.name).register_forward_hook(hook))
            training = self.net.training
            ones = torch.ones(1, sum(g.channels for g in self.gates) + 1, device=x.device)
            try:
                with torch.no_grad():
                    self.net.eval()(x[:1], ones)
            finally:
                self.net.train(training)
                for h in hooks:
                    h.remove()
            self._sizes[key] = positions, int(any_macs(self.layers, positions, ones.double()))
        return self._sizes[key]

    def forward(self, x):
        zp, zfull = self.decisions(x)
        positions, max_macs = self.sizes(x)
        logits = self.net(x, zfull)
        macs = any_macs(self.layers, positions, zfull.double())
        return logits, gc.GateInfo([z for z, _ in zp], [p for _, p in zp], macs, max_macs)

    @torch.no_grad()
    def pruned(self):
        """Physical pruning (3.1, 3.3): a plain module (fx.GraphModule) without the off
        channels of threshold inference (each gate's tau), in evaluation mode, computing
        what this network computes in evaluation mode; this network is left as it was."""
        keep = [g.keep(gc.gate_probability(g.logits)) for g in self.gates]
        keep = torch.cat(keep + [torch.ones(1, dtype=torch.bool, device=self.layers[0].ins.device)])
        x = torch.zeros(1, *self.input_shape, device=keep.device)
        return _prune(self.net, self.layers, self.norms, keep, x)


def any_macs(layers, positions, zfull):
    """FLOPs(Z) (3.4) of a GatedNet's conv and linear layers, per sample: for each, output
    positions x kernel x n_in x n_out, n the channels on (a grouped conv's group is one
    decision: a x b MACs per position for each group on). zfull (B, channels + 1) float64.
    -> (B,) float64."""
    total = 0
    for layer in layers:
        if layer.groups == 1:
            pairs = zfull[:, layer.ins].sum(1) * zfull[:, layer.outs].sum(1)
        else:
            a, b = len(layer.ins) // layer.groups, len(layer.outs) // layer.groups
            pairs = a * b * zfull[:, layer.outs[::b]].sum(1)
        total = total + positions[layer.name] * layer.kernel * pairs
    return total


def gate_any(model, example_input, gating='static', init_p=gc.INIT_P, ignore=None):
    """The paper's static gates (3.2) on every prunable channel group of any torch.fx-traceable
    CNN (the module docstring says how channels are grouped). `ignore`: names of conv or
    linear modules whose output channels stay ungated. `model` is left as it was (the gated
    net is a copy). Returns a GatedNet: forward -> (logits, GateInfo), so the losses, BN
    recalibration and threshold inference of gumbel_channels work unchanged."""
    if gating != 'static':
        raise ValueError("gate_any gives static gates (gating='static'); dynamic gates: "
                         'gumbel_channels.gate_resnet, for ResNets')
    if gc.gates(model):
        raise ValueError('model has gates already')
    model = copy.deepcopy(model)
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:
        raise ValueError(f'gate_any needs a model torch.fx can trace ({type(e).__name__}: '
                         f'{str(e).splitlines()[0][:160]})') from None
    training = gm.training
    with torch.no_grad():
        analysis = _Analysis(gm.eval(), example_input[:1], ignore)
    gm.train(training)
    found, column, gates, sources = analysis.ids, {}, [], []
    device = example_input.device
    for srcs, roots in _gate_groups(analysis).items():
        start = len(column)
        column.update((root, start + k) for k, root in enumerate(roots))
        gates.append(gc.StaticGate(len(roots), init_p).to(device))
        sources.append(list(srcs))

    def columns(ids):                       # each id's column of zfull (the last: no gate)
        return torch.tensor([column.get(found.find(i), len(column)) for i in ids.tolist()],
                            dtype=torch.long, device=device)
    layers = [_Layer(name, gm.get_submodule(name), columns(ins), columns(outs))
              for name, (ins, outs) in analysis.convs.items()]
    norms = [_Layer(name, gm.get_submodule(name), columns(ch), columns(ch))
             for name, ch in analysis.bns.items()]
    _insert_masks(gm, layers)
    gated = GatedNet(gm, gates, sources, layers, norms, tuple(example_input.shape[1:]))
    gated.sizes(example_input)          # cached now: a compiled forward at this size is one graph
    return gated


def _insert_masks(gm, layers):
    """zfull becomes the graph's second input; each conv and linear reads its input times
    the decisions of the channels it carries."""
    graph, by_name = gm.graph, {layer.name: layer for layer in layers}
    x = next(n for n in graph.nodes if n.op == 'placeholder')
    with graph.inserting_after(x):
        zfull = graph.placeholder('zfull')
    sites = [n for n in graph.nodes if n.op == 'call_module' and n.target in by_name]
    for k, node in enumerate(sites):
        layer = by_name[node.target]
        gm.add_submodule(f'gate_mask{k}', _Mask(layer.ins, isinstance(
            gm.get_submodule(node.target), nn.Linear)))
        with graph.inserting_before(node):
            masked = graph.call_module(f'gate_mask{k}', (node.args[0], zfull))
        node.args = (masked, *node.args[1:])
    graph.lint()
    gm.recompile()


class _Constant(nn.Module):
    """What a conv or linear layer with no input channel left computes: its bias (or 0) at
    every output position, for out_channels channels (a conv keeps its output size)."""

    def __init__(self, layer, bias, out_channels):
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv:
            self.geometry = (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        self.register_buffer('bias', torch.zeros(out_channels) if bias is None else bias.clone())

    def forward(self, x):
        if not self.conv:                       # contiguous: later ops may work in place
            return self.bias.to(x.dtype).expand(*x.shape[:-1], len(self.bias)).contiguous()
        k, s, p, d = self.geometry
        hw = [(x.shape[2 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]
        return self.bias.to(x.dtype).view(1, -1, 1, 1).expand(x.shape[0], -1, *hw).contiguous()


def _sliced(layer, keep_in, keep_out, groups):
    """A conv or linear layer with only the kept input and output channels."""
    if isinstance(layer, nn.Linear):
        w = layer.weight[keep_out][:, keep_in]
        bias = None if layer.bias is None else layer.bias[keep_out]
        if w.shape[1] == 0 or w.shape[0] == 0:
            return _Constant(layer, bias, w.shape[0])
        new = nn.Linear(w.shape[1], w.shape[0], bias is not None).to(w)
    else:
        if groups == 1:
            w = layer.weight[keep_out][:, keep_in]
        else:
            w = layer.weight[keep_out]                     # whole groups: inputs per group kept
            groups = int(keep_out.view(groups, -1)[:, 0].sum())
        bias = None if layer.bias is None else layer.bias[keep_out]
        if w.shape[0] == 0 or (groups == 1 and w.shape[1] == 0):
            return _Constant(layer, bias, w.shape[0])
        new = nn.Conv2d(w.shape[1] * groups, w.shape[0], layer.kernel_size, layer.stride,
                        layer.padding, layer.dilation, groups, bias is not None,
                        layer.padding_mode).to(w)
    new.weight.copy_(w)
    if bias is not None:
        new.bias.copy_(bias)
    return new


def _sliced_bn(bn, keep):
    if not keep.any():
        return nn.Identity()                               # a tensor with no channel left
    new = type(bn)(int(keep.sum()), bn.eps, bn.momentum, bn.affine,
                   bn.track_running_stats).to(bn.running_mean if bn.running_mean is not None
                                              else bn.weight)
    for name in ('running_mean', 'running_var', 'weight', 'bias'):
        if getattr(bn, name) is not None:
            getattr(new, name).copy_(getattr(bn, name)[keep])
    return new


def _prune(net, layers, norms, keep, x):
    """A copy of the traced net without its masks and zfull input, each conv, linear and BN
    sliced to the channels `keep` (per column of zfull) keeps; ops that cannot take a tensor
    left with no channel (a pool after a conv whose outputs are all off) are made to."""
    gm = copy.deepcopy(net).eval()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == 'call_module' and node.target.startswith('gate_mask'):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            delattr(gm, node.target)
    graph.erase_node(next(n for n in graph.nodes if n.op == 'placeholder' and n.target == 'zfull'))
    for layer in layers:
        gm.set_submodule(layer.name, _sliced(gm.get_submodule(layer.name), keep[layer.ins],
                                             keep[layer.outs], layer.groups))
    for norm in norms:
        gm.set_submodule(norm.name, _sliced_bn(gm.get_submodule(norm.name), keep[norm.ins]))
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


class _OnEmpty(nn.Module):
    """A module that takes a tensor with no channel through _on_empty."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, *args, **kwargs):
        return _on_empty(self.module, x, *args, **kwargs)


class _EmptySafe(fx.Interpreter):
    """Runs the pruned graph once; a node that fails on a channel-less input is rewritten to
    go through _on_empty."""

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
        elif n.op == 'call_function':
            n.target, n.args = _on_empty, (n.target, *n.args)
        else:
            raise RuntimeError(f'{n.target} cannot take a tensor with no channel')
        return super().run_node(n)
