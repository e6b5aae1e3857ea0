"""compare.py's table: per arm the mean and spread over paired seeds, the paired difference to
the gates with its 95% interval (Student's t), McNemar's exact test on the test predictions
per seed and pooled, and the warnings that say when not to trust it."""
import math
import statistics
import sys

# t quantiles (0.975) by degrees of freedom, for the paired intervals
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t_interval(diffs):
    """The mean of paired differences and its 95% half-width (Student's t); None for one."""
    n = len(diffs)
    if n < 2:
        return statistics.fmean(diffs), None
    q = T975[max(k for k in T975 if k <= n - 1)]
    return statistics.fmean(diffs), q * statistics.stdev(diffs) / math.sqrt(n)


def discordant(a_right, b_right):
    """(b, c): the images a gets right and b wrong, and the reverse (bool tensors)."""
    return int((a_right & ~b_right).sum()), int((~a_right & b_right).sum())


def mcnemar_p(b, c):
    """McNemar's exact two-sided p for discordant counts b and c: 2 P(X <= min(b, c)) for
    X ~ Binomial(b + c, 1/2), at most 1."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n) if n else 1.0


def summary(rows, arms, right):
    """Per t and arm (in the order of `arms`, then any other): mean and std of accuracy and
    MACs over seeds, the paired difference to the gates (95% interval), McNemar's test per
    seed and pooled over seeds. right(row) -> the (N,) bool tensor of its right predictions."""
    table = []
    for t in sorted({r['t'] for r in rows}):
        gates = {r['seed']: r for r in rows if r['t'] == t and r['arm'] == 'gates'}
        for arm in tuple(arms) + tuple(dict.fromkeys(r['arm'] for r in rows
                                                  if r['arm'] not in arms)):
            got = sorted((r for r in rows if r['t'] == t and r['arm'] == arm),
                         key=lambda r: r['seed'])
            if not got:
                continue
            accs, macs = [r['acc'] for r in got], [r['macs_percent'] for r in got]
            entry = dict(t=t, arm=arm, seeds=len(got), acc=statistics.fmean(accs),
                         acc_std=statistics.stdev(accs) if len(got) > 1 else None,
                         macs_percent=statistics.fmean(macs),
                         train_acc=_mean([r['train_acc'] for r in got]))
            paired = [r for r in got if r['seed'] in gates]
            if arm != 'gates' and paired:
                diff, half = t_interval([r['acc'] - gates[r['seed']]['acc'] for r in paired])
                counts = [discordant(right(gates[r['seed']]), right(r)) for r in paired]
                b, c = sum(n for n, _ in counts), sum(n for _, n in counts)
                # per seed: each test image once, as McNemar's test assumes; pooled over
                # seeds an image counts once per seed, as if the seeds' images were others
                entry.update(diff=diff, diff_half=half, mcnemar_b=b, mcnemar_c=c,
                             mcnemar_p_seeds=[mcnemar_p(n, m) for n, m in counts],
                             mcnemar_p_pooled=mcnemar_p(b, c))
            table.append(entry)
    return table


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def warnings_for(table, dense_acc):
    """When not to trust the table, in lines: a dense start below every arm (not converged:
    the arms then measure more training, not pruning), and paired intervals over too few
    seeds to mean much."""
    lines = []
    if table and dense_acc < min(e['acc'] for e in table):
        lines.append(f'the dense start ({dense_acc:.2f}%) is below every arm: it is not '
                     'converged, so the arms differ by training more, not by what they prune; '
                     'train it longer (--dense-epochs)')
    seeds = min((e['seeds'] for e in table if 'diff' in e), default=None)
    if seeds is not None and seeds < 3:
        width = 'absent' if seeds < 2 else 'wide (t = 12.7)'
        lines.append(f'{seeds} paired seed(s): the 95% intervals are {width}; use --seeds 3 or '
                     'more before reading a difference')
    return lines


def print_table(table, dense_acc):
    """The table; McNemar's p per seed (each test image once), then pooled over the seeds
    (an image counted once per seed: tighter than it should be)."""
    print(f"\n{'t':>5} {'arm':22} {'seeds':>5} {'MACs %':>7} {'acc %':>7} {'std':>5} "
          f"{'train %':>7} {'vs gates':>9} {'95% interval':>17} {'McNemar p per seed':>20} "
          f"{'pooled':>8}   (dense start {dense_acc:.2f}%)")
    for e in table:
        vs = f"{e['diff']:+9.2f}" if 'diff' in e else f"{'':9}"
        half = e.get('diff_half')
        ci = f"[{e['diff'] - half:+6.2f}, {e['diff'] + half:+6.2f}]" if half is not None \
            else f"{'':17}"
        seeds = ' '.join(f'{q:.2g}' for q in e['mcnemar_p_seeds']) if 'diff' in e else ''
        pooled = f"{e['mcnemar_p_pooled']:8.2g}" if 'diff' in e else f"{'':8}"
        std = f"{e['acc_std']:5.2f}" if e['acc_std'] is not None else f"{'':5}"
        train = f"{e['train_acc']:7.2f}" if e['train_acc'] is not None else f"{'':7}"
        print(f"{e['t']:5.2f} {e['arm']:22} {e['seeds']:5} {e['macs_percent']:7.2f} "
              f"{e['acc']:7.2f} {std} {train} {vs} {ci:>17} {seeds:>20} {pooled}")
    for line in warnings_for(table, dense_acc):
        print(f'warning: {line}', file=sys.stderr)
