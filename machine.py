"""Where and how a run runs, safe to skip on a first reading: the one device rule, the
precision (autocast, GradScaler), CPU threads, the compile mode of the training step, each
process's seed and RNG state. The training loop that uses them (and watches for a
non-finite loss) is train_loop.py.
"""
import os
from pathlib import Path

import torch

import cli
from cli import UsageError

# ----------------------------------------------------------------------------- device and precision

def device_for(name, env=None, gpus=None):
    """The one device rule of both scripts: --device cpu, cuda or cuda:N -> a torch.device with
    an index for CUDA. 'cuda' is cuda:LOCAL_RANK under torchrun (env), else cuda:0; an explicit
    cuda:N under torchrun with several processes is refused (they would share one GPU), and
    so is a device this machine does not have (gpus: its GPU count)."""
    env = os.environ if env is None else env
    gpus = torch.cuda.device_count() if gpus is None else gpus
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f'--device {name!r} is not a device (cpu, cuda, cuda:1, ...)') from None
    if device.type != 'cuda':
        return device
    if gpus == 0:
        raise UsageError(f'--device {name}: no CUDA GPU is available here (use --device cpu)')
    if device.index is not None and int(env.get('WORLD_SIZE', 1)) > 1:
        raise UsageError(f'--device {name}: under torchrun pass --device cuda (each process '
                         'takes cuda:LOCAL_RANK)')
    index = int(env.get('LOCAL_RANK', 0)) if device.index is None else device.index
    if index >= gpus:
        raise UsageError(f'--device {name}: this machine has {gpus} GPU(s), not cuda:{index}')
    return torch.device('cuda', index)


def autocast_for(device, amp='bf16'):
    """The precision context: autocast on CUDA in bf16 (no loss scaling needed) or fp16 (the
    caller scales the loss: grad_scaler_for), float32 with amp 'off' and on the CPU."""
    if device.type == 'cuda' and amp != 'off':
        dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
        return lambda: torch.autocast('cuda', dtype)
    return lambda: torch.autocast(device.type, enabled=False)


def grad_scaler_for(device, amp):
    """A GradScaler for fp16 on CUDA, else None (bf16 and float32 need no loss scaling)."""
    return torch.amp.GradScaler('cuda') if device.type == 'cuda' and amp == 'fp16' else None


# ----------------------------------------------------------------------------- threads and compile

COMPILE_MODES = ('auto', 'off', 'default', 'reduce-overhead', 'max-autotune')


def add_machine_args(group):
    """The flags for where and how a script runs (a parser's machine group): --device,
    --threads, --compile."""
    a = group.add_argument
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
      help='cuda (under torchrun: cuda:LOCAL_RANK), cuda:N or cpu')
    a('--threads', type=cli.COUNT, help='CPU threads (default: the CPUs this process may use, '
      'its affinity and container quota, at most 8)')
    a('--compile', nargs='?', const='default', default='auto', choices=COMPILE_MODES,
      help="torch.compile the training step: auto = reduce-overhead (CUDA graphs) on CUDA, off "
           "on the CPU; off runs it eagerly (docs/deployment.md: the GPU path)")


def usable_cpus():
    """CPUs this process may really use: its affinity mask, and a container's (cgroup v2)
    CPU quota when one is set."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    try:
        quota, period = Path('/sys/fs/cgroup/cpu.max').read_text().split()
        if quota != 'max':
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n or 1)


def use_machine(args, device, log=print):
    """torch's CPU threads from --threads, else usable_cpus() up to 8, said in the log; on
    CUDA cuDNN's autotuner (each phase's shapes are fixed, so it tunes once)."""
    threads = args.threads or min(8, usable_cpus())
    torch.set_num_threads(threads)
    if torch.device(device).type == 'cpu':
        log(f'CPU threads: {threads} (--threads to change)')
    else:
        torch.backends.cudnn.benchmark = True


def compile_mode(flag, device):
    """--compile -> the torch.compile mode of the training step, or None (eager). True and
    False are the flag's values in the args.json of older runs."""
    if flag is True:
        return 'default'
    if flag in (False, None, 'off'):
        return None
    if flag == 'auto':
        return 'reduce-overhead' if torch.device(device).type == 'cuda' else None
    return flag


# ------------------------------------------------------------------------ seeds, a diverging loss

def rank_seed(seed, rank):
    """The torch seed of process `rank` under torchrun (rank 0: seed itself), so that each
    process draws its own Gumbel noise (its weights come from seed, before)."""
    return seed + 1_000_003 * rank


def rng_state():
    """The torch RNG states a step draws from (CPU, and the CUDA device's when initialized)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and \
        torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state):
    """Puts back what rng_state() took."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])
