"""CIFAR-10 for train_cifar.py: its python batches read without the general unpickler and
checked, or a learnable offline stand-in (stripes). Images stay uint8 (N, 3, 32, 32)."""
import math
import pickle
import sys
from pathlib import Path

import torch

from train_common import UsageError


class ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and nothing that can run
    code (CIFAR-10's batches need no other class): the data files of a download or a
    colleague are never read with the general unpickler."""
    ALLOWED = {('numpy._core.multiarray', '_reconstruct'), ('numpy._core.numeric', '_frombuffer'),
               ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}

    def find_class(self, module, name):
        module = module.replace('numpy.core.', 'numpy._core.')  # numpy 1.x names
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
        return super().find_class(module, name)


def read_batch(path):
    """One CIFAR-10 python batch -> uint8 (N, 3, 32, 32), int64 (N,); any fault is one line."""
    try:
        with open(path, 'rb') as f:
            batch = ArraysOnly(f, encoding='bytes').load()
        x, labels = batch[b'data'], torch.tensor(batch[b'labels'])
        y = labels.to(torch.int64)
    except Exception as e:                                  # corrupt, truncated, not CIFAR
        raise UsageError(f'{path}: not a CIFAR-10 python batch ({type(e).__name__}: '
                         f'{str(e)[:120]})') from None
    if getattr(x, 'dtype', None) != 'uint8' or x.ndim != 2 or x.shape[1] != 3072 \
            or y.shape != (len(x),):
        raise UsageError(f'{path}: expected uint8 data (N, 3072) with N labels')
    if not torch.equal(labels, y.to(labels.dtype)):            # 3.7 is not a class
        raise UsageError(f'{path}: labels must be whole numbers 0..9')
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise UsageError(f'{path}: labels must lie in 0..9')
    return torch.from_numpy(x.copy()).view(-1, 3, 32, 32), y


def read_cifar(folder):
    """CIFAR-10's python batches data_batch_1..5 (those present) and test_batch, and no
    other file -> uint8 (N, 3, 32, 32), int64 (N,) for train, then for test."""
    folder = Path(folder)
    train_files = [folder / f'data_batch_{k}' for k in range(1, 6)
                   if (folder / f'data_batch_{k}').is_file()]
    if not train_files or not (folder / 'test_batch').is_file():
        raise FileNotFoundError(folder)
    if len(train_files) < 5:
        print(f'warning: {folder}: training on {", ".join(f.name for f in train_files)} only '
              '(the other data_batch files are missing)', file=sys.stderr)
    train = [read_batch(f) for f in train_files]
    x_test, y_test = read_batch(folder / 'test_batch')
    return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), x_test, y_test


def stripes(n, seed):
    """A learnable offline stand-in for CIFAR-10: (uint8 (n, 3, 32, 32), int64 (n,)). Class k
    is a sinusoidal grating with unsigned orientation 22.5 * (k % 5) degrees (mirrored at
    random, so horizontal flips keep the class) and period 4 or 8 px (k < 5 or not), with
    random phase, contrast and colour under Gaussian noise: a few channels suffice."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    mirror = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    theta = mirror * (y % 5) * math.pi / 8
    period = 4 + 4 * (y // 5) + torch.rand(n, generator=g) - 0.5
    phase = 2 * math.pi * torch.rand(n, generator=g)
    r = torch.arange(32.0)
    cos, sin = torch.cos(theta).view(n, 1, 1), torch.sin(theta).view(n, 1, 1)
    proj = r.view(1, 32, 1) * cos + r.view(1, 1, 32) * sin
    wave = torch.sin(2 * math.pi * proj / period.view(n, 1, 1) + phase.view(n, 1, 1))  # (n, 32, 32)
    sign = torch.sign(torch.randn(n, 3, 1, 1, generator=g))
    colour = (20 + 60 * torch.rand(n, 3, 1, 1, generator=g)) * sign
    x = 128 + colour * wave[:, None] + 30 * torch.randn(n, 3, 32, 32, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8), y


def load(data_dir, synthetic, device):
    """(x_train, y_train, x_test, y_test) on `device`, images uint8: CIFAR-10 from data_dir
    (downloaded there when absent), or the synthetic stripes."""
    if synthetic:
        return [d.to(device) for d in (*stripes(5_000, seed=1234), *stripes(1_000, seed=4321))]
    folder = Path(data_dir) / 'cifar-10-batches-py'
    if not folder.is_dir():
        try:
            import torchvision
            torchvision.datasets.CIFAR10(data_dir, download=True)
        except Exception as e:                                   # offline, or no permission
            raise UsageError(f'CIFAR-10 is not in {folder} and could not be downloaded '
                             f'({type(e).__name__}). Put the python version '
                             '(cifar-10-python.tar.gz, extracted) there, or pass --synthetic'
                             ) from None
    try:
        return [d.to(device) for d in read_cifar(folder)]
    except FileNotFoundError:
        raise UsageError(f'{folder} holds no data_batch_1..5 and test_batch files') from None
