"""The paper's static gates in any CNN a user brings (MobileNet, EfficientNet, RegNet, ConvNeXt,
DenseNet, ShuffleNet, VGG, U-Nets, 1D and 3D CNNs, detection backbones, their own blocks):
gate, train toward t, prune physically.

    gated = gate_any(model, example_input)    # a StaticGate on every prunable channel group
    logits, info = gated(x)                   # info.macs: FLOPs(Z) per sample (3.4)
    pruned = gated.pruned()                   # or gumbel_export.prune(gated): a plain module

How channels are grouped: channel_groups.py (print channel_groups(model, x) before gating).

Where decisions act. Z multiplies the input of every conv (1D, 2D, 3D, transposed) and
linear layer, modules or F.conv*d / F.linear calls on module parameters, the only ops that mix
channels: an off channel reaches no mixing op, so the masked network computes what the network
without that channel computes (NOTES.md 21). FLOPs(Z) counts the conv and linear MACs of that
network exactly, per sample: n_in * n_out (per group for grouped convs) times kernel and
positions, summed over every call of a layer; a layer whose output only feeds layers whose
outputs are all off (constants that read only a shape) is skipped and not counted. Work
gate_any does not see (inside a module
named in `ignore`, or with uncovered='fixed' an op it does not know) is a fixed cost. Attention's
batched products (bmm, scaled dot product) are not conv or linear MACs and are not counted.

Every number is checked. gate_any compares FLOPs(Z) with every gate on against the conv and
linear MACs torch.utils.flop_counter counts in the model, module by module, and refuses to go
on when they differ; it warns when less than half of the MACs can be gated, naming the ops
that fixed the channels.
"""
import copy
import operator
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

try:                                                    # beside gumbel_channels, or in a package
    from . import channel_groups as cg
    from . import gumbel_channels as gc
    from . import gumbel_export as ge
except ImportError:
    import channel_groups as cg
    import gumbel_channels as gc
    import gumbel_export as ge

__all__ = ['gate_any', 'GatedNet', 'any_macs', 'decision_macs']

_OnEmpty = ge._OnEmpty      # where pruned.pt files written before issue 42 moved it look


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
        self.consumers = None       # the layers its output only feeds (_consumers), or None

    def dense_macs(self):
        """MACs per output position (per input position for a transposed conv), all on."""
        return self.kernel * len(self.ins) * len(self.outs) // self.groups

    def extra_repr(self):
        return f'{self.name!r}, {self.kind}, in={len(self.ins)}, out={len(self.outs)}, ' \
               f'groups={self.groups}'


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
            counted = ge.counted_macs(Shapes(self.net, graph=self.graph()).run, x[:1], ones)
        finally:
            self.net.train(training)
        return positions, counted

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
        gm = copy.deepcopy(fx.GraphModule(self.net, self.graph())).eval()
        for node in list(gm.graph.nodes):                # masks and zfull go: keep decides
            if node.op == 'call_module' and node.target.startswith('gate_mask'):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        gm.graph.erase_node(next(n for n in gm.graph.nodes
                                 if n.op == 'placeholder' and n.target == 'zfull'))
        alive = _alive(self.layers, keep[None].double())
        return ge.prune_graph(gm, self.layers, self.norms, keep, alive, x)


def any_macs(layers, positions, zfull):
    """FLOPs(Z) (3.4) of a GatedNet's conv and linear layers, per sample: for each, positions
    x kernel x n_in x n_out, n the channels on (a grouped conv's group is one decision: a x b
    MACs per position for each group on), times whether its output still feeds a layer that
    computes (_alive). zfull (B, channels + 1) float64. -> (B,) float64."""
    total, alive = 0, _alive(layers, zfull)
    for layer in layers:
        if layer.groups == 1:
            pairs = zfull[:, layer.ins].sum(1) * zfull[:, layer.outs].sum(1)
        else:
            a, b = len(layer.ins) // layer.groups, len(layer.outs) // layer.groups
            pairs = a * b * zfull[:, layer.outs[::b]].sum(1)
        total = total + positions[layer.name] * layer.kernel * pairs * alive[layer.name]
    return total


def _alive(layers, zfull):
    """{layer name: (B,) 1 where its output still matters, else 0}. A layer whose output only
    feeds other layers (through channel-wise ops: _consumers) matters where one of them has
    an output channel on and matters itself; one whose outputs are all off computes a
    constant (gumbel_export.Constant) that reads only its input's shape, so the work before
    it is skipped in the pruned net and not counted (issue 45.5: a U-Net's decoder)."""
    by_name, alive = {layer.name: layer for layer in layers}, {}

    def of(layer, visiting):
        if layer.consumers is None or layer.name in visiting:       # a cycle: one module
            return 1                                                # called again later
        if layer.name not in alive:
            on = [zfull[:, by_name[d].outs].amax(1) * of(by_name[d], visiting | {layer.name})
                  for d in layer.consumers if d in by_name]
            alive[layer.name] = torch.stack(on).amax(0) if on else 1
        return alive[layer.name]
    return {layer.name: of(layer, frozenset()) for layer in layers}


def _consumers(gm, graph, layers):
    """Sets each layer's .consumers: the layers its output reaches through channel-wise ops
    (BN, activations, masks, pools, adds, reshapes, concatenations), or None where it also
    reaches anything else (the network's output, any other op) or no layer at all (it is then
    counted and kept, as it runs in the gated net)."""
    by_name, found = {layer.name: layer for layer in layers}, {}
    for node in graph.nodes:
        name = ge.layer_called(node, by_name)
        if name is None:
            continue
        reached, stack, seen, other = set(), list(node.users), set(), False
        while stack and not other:
            user = stack.pop()
            if user in seen:
                continue
            seen.add(user)
            called = ge.layer_called(user, by_name)
            if called:
                reached.add(called)
            elif _channelwise(gm, user):
                stack.extend(user.users)
            else:
                other = True
        before = found.get(name, set())                        # a layer called at two sites
        found[name] = None if other or before is None else before | reached
    for layer in layers:
        layer.consumers = sorted(found[layer.name]) if found.get(layer.name) else None


def _channelwise(gm, node):
    """Whether node is an op the channel analysis knows whose output's shape is a function of
    its inputs' shapes alone (so that a value only its shape is read of needs no work)."""
    if node.op == 'call_module':
        m = gm.get_submodule(node.target)
        return isinstance(m, (_Mask, nn.Flatten) + cg.ELEMENTWISE_MODULES + cg.POOL_MODULES) \
            or cg.is_norm(m) or cg.per_channel(m)
    key = node.target if node.op == 'call_function' else str(node.target)
    return node.op in ('call_function', 'call_method') and key in _CHANNELWISE_CALLS


_CHANNELWISE_CALLS = (cg.UNARY | cg.BINARY | cg.POOL | cg.RESHAPE | cg.MOVE | cg.SPLIT
                      | {torch.cat, operator.getitem, F.pad})


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
    training = model.training
    model, graphs, same, analysis, ignore = cg.analyze(model, example_input, ignore)
    x = example_input[:1]
    found, device = analysis.ids, example_input.device
    column, gates, sources = {}, [], []
    for srcs, roots in cg.gate_groups(found).items():
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
    _consumers(net, (eval_net or net).graph, layers)
    gated = GatedNet(net, eval_net, dict(analysis.sites), gates, sources, layers, norms,
                     tuple(example_input.shape[1:])).train(training)
    _check_count(gated, model.eval(), x, ignore, uncovered, analysis)
    model.train(training)
    return gated


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
    sites = [(n, ge.layer_called(n, by_name)) for n in graph.nodes]
    for k, (node, layer) in enumerate((n, by_name[name]) for n, name in sites if name):
        gm.add_submodule(f'{prefix}{k}', _Mask(layer.ins, layer.kind == 'linear'))
        with graph.inserting_before(node):
            masked = graph.call_module(f'{prefix}{k}', (node.args[0], zfull))
        node.args = (masked, *node.args[1:])
    graph.lint()
    gm.recompile()


def _check_count(gated, model, x, ignore, uncovered, analysis):
    """FLOPs(Z) with every gate on against the conv and linear MACs FlopCounterMode counts in
    the model, module by module: a difference outside the modules in `ignore` is refused
    (or, uncovered='fixed', a fixed cost with a warning); a warning when less than half of
    the MACs can be gated, naming the ops that fixed the channels."""
    counted = ge.counted_macs(model, x, by_module=True)
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
    deepest = sorted((p for p in diff if not any(q != p and cg.inside(q, p) for q in diff)),
                     key=order.get)
    kinds = {p: type(model.get_submodule(p)).__name__ for p in deepest}
    modules = {n for node, (n, path) in gated.sites.items() if path == n}
    unseen = [p for p in deepest if not any(cg.inside(p, i) for i in ignore)]  # others: ignored
    wrong = [p for p in unseen if diff[p] < 0 or any(cg.inside(p, m) for m in modules)]
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
            kept = next((i for i in ignore if cg.inside(p, i)), None)
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
