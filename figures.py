"""The paper's figures, drawn from our own runs (run folders of train_cifar.py / train_imagenet.py).

    python figures.py runs/resnet56-static-channel-flops-t0.5-s0 runs/... --out figures

  fig3_ARCH.png            top-1 accuracy against MACs % of the dense baseline, for every run
                           given, beside the paper's published points for the same network
                           (Tables 1-3), the dense baseline marked (Fig. 3)
  fig4_RUN.png             per-class activation of each gate of a dynamic run (Fig. 4)
  polarization_RUN.png     histogram of the gate probabilities of a static run (3.1)

matplotlib is needed here only (pip install matplotlib); the rest of the project does without it.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import torch

import gumbel_channels as gc

# The paper's points: (label, MACs % of the baseline, top-1 %). ImageNet GFLOPs are divided by
# the paper's 4.028 baseline; Table 2 gives reductions, shown here as 100 - reduction.
PAPER = {
    'resnet56': [('Ours ind t=.5 (Table 3)', 50, 93.31), ('AMC (Table 3)', 50, 91.9)],
    'resnet110': [('Ours dep t=.6 (Table 3)', 65, 94.36), ('AIG-110 t=.8 (Table 3)', 82, 94.24)],
    'resnet50': [
        ('Ours dep t=.5 (Table 1)', 100 * 2.21 / 4.028, 76.30),
        ('Ours dep t=.4 (Table 1)', 100 * 1.67 / 4.028, 75.19),
        ('Ours dep t=.3 (Table 1)', 100 * 1.94 / 4.028, 76.04),
        ('AIG t=.5 (Table 1)', 100 * 2.91 / 4.028, 75.58),
        ('AIG t=.7 (Table 1)', 100 * 3.26 / 4.028, 76.18),
        ('Ours ind t=.5 (Table 2)', 100 - 37.68, 76.20),
        ('Ours ind t=.4 (Table 2)', 100 - 43.39, 76.14),
        ('Ours ind t=.3 (Table 2)', 100 - 51.3, 75.56),
    ],
    'resnet18': [
        ('Ours ind (Table 2)', 100 - 43.9, 68.88),
        ('Geom mix 30% (Table 2)', 100 - 41.8, 68.41),
    ],
    'resnet34': [
        ('Ours ind (Table 2)', 100 - 51.1, 72.78),
        ('Geom mix 30% (Table 2)', 100 - 41.1, 72.63),
    ],
}


class BadInput(Exception):
    """A run folder or file these figures cannot use: one line, exit status 2."""


def read_run(folder):
    folder = Path(folder)
    try:
        row = json.loads((folder / 'final.json').read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f'{folder} holds no readable final.json ({type(e).__name__})') from None
    if not isinstance(row, dict) or 'arch' not in row:
        raise BadInput(f'{folder}/final.json is not the final row of a run')
    row['accuracy'], row['baseline'] = row.get('gated_acc'), row.get('baseline_acc')
    if row['baseline'] is None:
        raise BadInput(f'{folder}/final.json has no baseline accuracy')
    for key in ('baseline_acc', 'gated_acc', 'macs_percent', 't', 'tau'):
        if row.get(key) is not None and (isinstance(row[key], bool)
                                          or not isinstance(row[key], (int, float))):
            raise BadInput(f'{folder}/final.json: {key} must be a number, got {row[key]!r}')
    row['synthetic'] = folder.name.startswith('synthetic-')
    row['data'] = data_of(folder, row)
    return folder, row


PAPER_DATA = {'resnet56': ('CIFAR-10', 10_000), 'resnet110': ('CIFAR-10', 10_000),
              'resnet18': ('ImageNet', 50_000), 'resnet34': ('ImageNet', 50_000),
              'resnet50': ('ImageNet', 50_000)}      # the paper's data set and its test images


def data_of(folder, row):
    """The data a run used, in words, from its args.json (and its final row's test count)."""
    try:
        args = json.loads((folder / 'args.json').read_text())
    except (OSError, ValueError):
        args = {}
    if args.get('synthetic') or row['synthetic']:
        return 'synthetic data'
    name = 'an ImageFolder' if 'crop_size' in args else args.get('dataset', 'cifar10')
    count = f", {row['test_images']:,} test images" if row.get('test_images') else ''
    return f"{name} from {args.get('data_dir', '?')}{count}"


def paper_beside(arch, runs):
    """The paper's data set when every run used it (name and test-set size), else None."""
    name, images = PAPER_DATA.get(arch, (None, None))
    same = name and all(r.get('test_images') == images and not r['synthetic'] and
                        (name == 'ImageNet') == r['data'].startswith('an ImageFolder')
                        for _, r in runs)
    return name if same else None


def fig3(plt, arch, runs, out):
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=100)
    markers = 'xP^vsD<>'
    paper = paper_beside(arch, runs)                # the paper's points beside its data only
    for k, (label, macs, acc) in enumerate(PAPER.get(arch, []) if paper else []):
        ax.scatter(macs, acc, marker=markers[k % len(markers)], color='gray',
                   label=f'paper: {label}')
    series = {}                                     # one frontier per configuration, over its t
    for folder, row in runs:
        if row.get('macs_percent') is None or row['accuracy'] is None:
            continue                                # a dense baseline's folder: the star only
        key = ' '.join(str(row.get(k)) for k in ('gating', 'granularity', 'loss') if row.get(k))
        key += ' (synthetic data)' if row['synthetic'] else ''    # not the paper's data set
        series.setdefault(key, []).append(row)
    for key, rows in series.items():
        rows.sort(key=lambda r: r['macs_percent'])
        (line,) = ax.plot(
            [r['macs_percent'] for r in rows], [r['accuracy'] for r in rows], 'o-', label=key
        )
        for r in rows:
            if r.get('t') is not None:
                ax.annotate(f"t={r['t']:g}", (r['macs_percent'], r['accuracy']), fontsize=7,
                            color=line.get_color(), xytext=(3, -10), textcoords='offset points')
    baseline = max(row['baseline'] for _, row in runs)
    ax.scatter(
        100, baseline, marker='*', s=150, color='black', label=f'dense baseline ({baseline:.2f})'
    )
    data = '; '.join(sorted({row['data'] for _, row in runs}))
    ax.set(xlabel='MACs, % of the dense baseline', ylabel='top-1 accuracy (%)')
    ax.set_title(f'{arch} on {data}' + (f'\nbeside the paper ({paper})' if paper else ''),
                 fontsize=9)
    ax.margins(x=0.08, y=0.15)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1))   # beside the data
    fig.tight_layout()
    return save(plt, fig, out / f'fig3_{arch}.png')


def save(plt, fig, path):
    fig.savefig(path)
    plt.close(fig)
    return path


def fig4(plt, folder, out):
    try:
        with open(folder / 'gate_classes.csv') as f:
            rows = list(csv.reader(f))
        gates, classes = rows[0][1:], [r[0] for r in rows[1:]]
        rates = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]])
        assert rates.ndim == 2 and rates.numel() and rates.shape[1] == len(gates)
    except Exception as e:
        raise BadInput(f'{folder}/gate_classes.csv is not a class-by-gate table '
                       f'({type(e).__name__})') from None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(gates) + 3), max(3.5, 0.3 * len(classes)
                                                                           + 2.5)), dpi=100)
    image = ax.imshow(rates.numpy(), aspect='auto', cmap='viridis', vmin=0, vmax=1)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xticks(range(len(gates)), gates, rotation=90, fontsize=6)
    ax.set(xlabel='gate module', ylabel='class')
    ax.set_title(f'{short(folder)}:\nactivation rate per class (Fig. 4)', fontsize=9)
    fig.colorbar(image, ax=ax, label='activation rate (mean Z)')
    fig.tight_layout()
    return save(plt, fig, out / f'fig4_{folder.name}.png')


def short(folder):
    """A run folder's name without the parts every run shares (seed 0, L_FLOPs)."""
    return folder.name.replace('-flops', '').replace('-s0', '')


def polarization(plt, folder, out, tau=0.5):
    try:
        state = torch.load(folder / 'final.pt', map_location='cpu', weights_only=True)
        logits = [v for k, v in state.items() if k.endswith('.logits')]       # static gates: (C, 2)
        p = gc.gate_probability(torch.cat(logits))
    except Exception as e:
        raise BadInput(f'{folder}/final.pt holds no static gate logits ({type(e).__name__})') \
            from None
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    ax.hist(p.numpy(), bins=50, range=(0, 1))                  # counts on a linear axis from 0
    ax.axvline(tau, color='black', linestyle='--', label=f'threshold tau = {tau:g}: on iff p > tau')
    polar = gc.polarized(p).float().mean().item()
    off, on = int((p < gc.POLAR).sum()), int((p > 1 - gc.POLAR).sum())
    ax.set(xlabel='on-probability p', ylabel='gates')
    ax.set_title(f'{short(folder)}:\n{polar:.1%} of {p.numel()} gates polarized (p < '
                 f'{gc.POLAR:g}: {off}, p > {1 - gc.POLAR:g}: {on})', fontsize=9)
    ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14))   # below the axes
    fig.tight_layout()
    return save(plt, fig, out / f'polarization_{folder.name}.png')


# ----------------------------------------------------------------------------- Fig. 4's data

@torch.no_grad()
def per_class_rates(model, batches, num_classes):
    """Fig. 4: activation rate of every gate module (mean of Z over its channels) per class,
    (num_classes, modules), over (images, labels) batches, in evaluation mode (restored after)."""
    sums, counts = 0, torch.zeros(num_classes, 1)
    with gc.evaluation(model):
        for x, y in batches:
            z = torch.stack([z.float().mean(1) for z in model(x)[1].z], 1).cpu()  # (B, modules)
            y = torch.nn.functional.one_hot(y.cpu(), num_classes).float()          # (B, classes)
            sums, counts = sums + y.T @ z, counts + y.sum(0)[:, None]
    return sums / counts.clamp(min=1)


def gate_names(model):
    """Each gate module's name in the network (layer1.0.gate1, ...), in GateInfo order."""
    found = {id(g) for g in gc.gates(model)}
    return [name for name, m in model.named_modules() if id(m) in found]


def class_rate_files(rates, names, gates):
    """Fig. 4's files: per-class activation rates (classes, gate modules named `gates`) as
    gate_classes.csv, and per gate the classes it runs on most and least and its
    specialization (the standard deviation of its per-class rates around its mean) as
    gate_classes.txt. -> {file name: text}."""
    header = 'class,' + ','.join(gates)
    rows = [f'{name},' + ','.join(f'{r:.4f}' for r in row)
            for name, row in zip(names, rates.tolist())]
    lines = []
    for gate, col in zip(gates, rates.T):
        hi, lo = col.argmax().item(), col.argmin().item()
        lines.append(f'{gate}: mean {col.mean():.3f}, specialization '
                     f'{col.std(unbiased=False):.3f}, most {names[hi]} ({col[hi]:.2f}), '
                     f'least {names[lo]} ({col[lo]:.2f})')
    return {'gate_classes.csv': '\n'.join([header, *rows]) + '\n',
            'gate_classes.txt': '\n'.join(lines) + '\n'}


# ----------------------------------------------------------------------------- compare.py

def comparison(result, path):
    """compare.py's figure: accuracy against MACs % of the dense start, every seed of every arm
    a point, arms in colours, one panel per t; the dense start a dashed line. Needs
    matplotlib (ImportError without it)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ts = sorted({r['t'] for r in result['rows']})
    arms = list(dict.fromkeys(r['arm'] for r in result['rows']))
    colours = {arm: plt.get_cmap('tab10')(k % 10) for k, arm in enumerate(arms)}
    fig, axes = plt.subplots(1, len(ts), figsize=(5.5 * len(ts) + 2, 4.5), dpi=100,
                             squeeze=False)
    for ax, t in zip(axes[0], ts):
        for arm in arms:
            rows = [r for r in result['rows'] if r['t'] == t and r['arm'] == arm]
            ax.scatter([r['macs_percent'] for r in rows], [r['acc'] for r in rows],
                       color=colours[arm], label=arm, s=24, alpha=0.8)
        ax.axhline(result['dense_acc'], color='black', linestyle='--', linewidth=0.8,
                   label=f"dense start {result['dense_acc']:.2f}%")
        ax.set(xlabel='MACs % of the dense start', ylabel='test accuracy % (final epoch)')
        data = 'synthetic stripes' if result['settings']['synthetic'] \
            else result['settings']['dataset']
        ax.set_title(f"{result['settings']['arch']} on {data}, t = {t:g}: every seed a point",
                     fontsize=9)
        ax.margins(x=0.15, y=0.15)
    axes[0][-1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return save(plt, fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('runs', nargs='+', help='run folders holding final.json')
    ap.add_argument('--out', default='figures')
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('error: figures.py needs matplotlib: pip install matplotlib', file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        runs = [read_run(f) for f in args.runs]
        written = [fig3(plt, arch, [r for r in runs if r[1]['arch'] == arch], out)
                   for arch in sorted({row['arch'] for _, row in runs})]
        for folder, row in runs:
            if (folder / 'gate_classes.csv').exists():
                written.append(fig4(plt, folder, out))
            if row.get('gating') == 'static' and (folder / 'final.pt').exists():
                written.append(polarization(plt, folder, out, row.get('tau') or 0.5))
    except BadInput as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except OSError as e:                            # --out a file, a full disk
        print(f'error: {e.strerror or e}' + (f' ({e.filename})' if e.filename else ''),
              file=sys.stderr)
        return 1
    print('\n'.join(f'wrote {path}' for path in written))
    return 0


if __name__ == '__main__':
    sys.exit(main())
