"""The command line of every script, the bottom of the training side (it imports nothing of
the project): the one-line errors and their exit statuses (run_cli), the parser with its four
flag groups, and the checked argument types.
"""
import argparse
import math
import os
import shlex
import sys

import torch


# ----------------------------------------------------------------------------- errors

class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, nothing overwritten."""


class RunError(Exception):
    """A run that cannot go on (a diverged loss, a failed write): one line, exit status 1;
    the last good checkpoint is kept and nothing is exported."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with where it came and what is saved (for run_cli's one line)."""

    def __init__(self, now, saved):
        super().__init__(now)
        self.now = now
        self.saved = saved


def run_cli(main, argv=None, resume='--resume'):
    """Run main(argv); bad input (exit status 2), a run that cannot go on and a failed read
    or write (exit status 1) are reported as one line on stderr, without a traceback; Ctrl-C
    as one line with the command that continues the run (exit status 130): the same one with
    the script's `resume` flag (None: a script that continues by itself, as compare.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        main(argv)
    except (UsageError, RunError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except OSError as e:                                    # disk full, permissions, I/O
        where = f' ({e.filename})' if e.filename else ''
        print(f'error: {e.strerror or e}{where}', file=sys.stderr)
        return 1
    except RuntimeError as e:                               # CUDA's or the CPU's OOM
        if not out_of_memory(e):
            raise
        print('error: out of memory: lower --batch-size (or --dense-batch-size); the last '
              'checkpoint is kept', file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        now, saved = getattr(e, 'now', 'before training'), getattr(e, 'saved', 'nothing saved yet')
        more = [resume] if resume and resume not in argv else []
        again = ' '.join(shlex.quote(a) for a in argv + more)
        print(f'\ninterrupted {now} ({saved}); continue with: python '
              f'{os.path.basename(main.__code__.co_filename)} {again}', file=sys.stderr)
        return 130
    return 0


def out_of_memory(error):
    """Whether an exception says memory ran out: CUDA's OutOfMemoryError, or the RuntimeError
    of the CPU allocator (which is not one)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("can't allocate memory" in str(error)
                                             or 'DefaultCPUAllocator' in str(error)))


# ----------------------------------------------------------------------------- the command line

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default once: none for flags that default to nothing or off, or whose
    help already says its default."""

    def _get_help_string(self, action):
        text = action.help or ''
        if action.default in (None, False, [], argparse.SUPPRESS) or 'default' in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input as UsageError: one line, no usage dump. Flags are
    taken whole, never abbreviated: a command keeps its meaning when flags are added, and
    settings_of_run can tell from argv which flags a command gives. Every flag belongs to one
    of four groups, and what a run folder keeps follows from them:
        structure   what is trained: each combination is a run folder (its name)
        training    how: a resume must train with the same
        evaluation  what --evaluate may change after training
        machine     where and how it runs: never part of a run"""
    GROUPS = {'structure': 'what is trained: each combination is a run folder of its own',
              'training': 'how it is trained: a resume keeps these',
              'evaluation': 'what --evaluate may change after training',
              'machine': 'where and how it runs: never part of a run'}

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=HelpFormatter, **kwargs)
        self.group = {name: self.add_argument_group(name, text)
                      for name, text in self.GROUPS.items()}

    def dests(self, *groups):
        """The flags (argparse dests) of these groups, in the order they were added."""
        return [a.dest for g in groups for a in self.group[g]._group_actions]

    def error(self, message):
        raise UsageError(message)


def checked(kind, test, what):
    """An argparse type= that parses `kind` and refuses a value failing `test`, one line."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be a number, got {text!r}') from None
        if not test(value):
            raise argparse.ArgumentTypeError(f'must be {what}, got {text}')
        return value
    return parse


COUNT = checked(int, lambda v: v >= 1, '>= 1')
WHOLE = checked(int, lambda v: v >= 0, '>= 0')
POSITIVE = checked(float, lambda v: v > 0 and math.isfinite(v), '> 0')
NON_NEGATIVE = checked(float, lambda v: v >= 0 and math.isfinite(v), '>= 0')
OPEN_UNIT = checked(float, lambda v: 0 < v < 1, 'in (0, 1)')
UNIT = checked(float, lambda v: 0 <= v <= 1, 'in [0, 1]')
RATE = checked(float, lambda v: 0 < v <= 1, 'in (0, 1]')


PROGRESS_SECONDS = 20     # seconds between status lines (an epoch, BN recalibration)


def clock(seconds):
    """h:mm:ss."""
    seconds = int(seconds)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
