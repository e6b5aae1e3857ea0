"""The scripts' models, apart from their run folders: torchvision's classifiers built as the
scripts train them, any other model gated through gumbel_any with one-line refusals, and a
finished gated net written as its files (final.pt; for static gates pruned.pt, .pt2, .onnx).
train_cifar.py and train_imagenet.py share it."""
import copy
import json
import sys
import warnings

import torch

import gumbel_channels as gc
import gumbel_export as ge
import run_folder as rf
from cli import UsageError


# ----------------------------------------------------------------------------- the models asked for

# torchvision's classifiers with auxiliary heads in training: built without them (their
# training output is a tuple; gate_any needs the same layers in training and evaluation)
AUX_HEADS = ('googlenet', 'inception_v3')


def torchvision_model(arch, **kw):
    """torchvision's classifier `arch` as the scripts train it (no auxiliary heads)."""
    import torchvision
    fresh = arch in AUX_HEADS and kw.get('weights') is None
    model = torchvision.models.get_model(arch, **kw, **({'init_weights': True} if fresh else {}))
    if arch == 'googlenet':
        model.aux_logits, model.aux1, model.aux2 = False, None, None
    elif arch == 'inception_v3':
        model.aux_logits, model.AuxLogits = False, None
    return model


def gate_model(model, example, init_p):
    """gumbel_any.gate_any for the scripts: conv and linear work it does not see (a
    transformer's attention) is a fixed cost, said in a warning line; a refusal is one line."""
    import gumbel_any
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        try:
            gated = gumbel_any.gate_any(model, example, init_p=init_p, uncovered='fixed')
        except ValueError as e:
            raise UsageError(str(e)) from None
    for w in seen:
        print(f'warning: {w.message}', file=sys.stderr)
    return gated


def check_model(model, example, gated, what):
    """Before any folder is made: `model` runs on `example` (its input size), and gate_any
    can gate it; else one line naming `what` (the flags that chose it)."""
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as e:
        raise UsageError(f'{what} cannot run on inputs of size {tuple(example.shape[1:])} '
                         f'({type(e).__name__}: {str(e).splitlines()[0][:120]}): choose another '
                         'model or input size') from None
    if gated:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            try:
                import gumbel_any
                gumbel_any.gate_any(model, example, uncovered='fixed')
            except ValueError as e:
                raise UsageError(f'{what}: {e}') from None


def save_exports(model, baseline, x, run_dir, row, tag=''):
    """The final gated weights (final.pt) and, for static gates, gumbel_export.export_files
    (pruned.pt, pruned.pt2, pruned.onnx), all on the CPU; the pruned net's FlopCounterMode
    MACs % of the dense net goes into row, and row['normalization'] (normalization()) into
    the .pt2 and ONNX metadata as 'normalization'. Returns the pruned net (CPU), or None."""
    rf.save_atomic({k: v.cpu() for k, v in model.state_dict().items()}, run_dir / f'final{tag}.pt')
    if not all(isinstance(g, gc.StaticGate) for g in gc.gates(model)):
        return None
    pruned, files = ge.export_files(model, x, metadata=dict(normalization=json.dumps(
        row['normalization'])) if 'normalization' in row else None)
    x1 = x[:1].cpu()
    row['pruned_macs_percent'] = 100 * ge.counted_macs(pruned, x1) / ge.counted_macs(
        copy.deepcopy(baseline).cpu().eval(), x1)
    if 'pruned.onnx' not in files:
        print(f'note: pruned{tag}.onnx not written: the onnx package is not installed '
              '(pip install onnx)')
    rf.save_files(files, run_dir, tag)
    return pruned
