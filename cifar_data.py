"""Small image sets for train_cifar.py and compare.py, as uint8 (N, 3, 32, 32) on the device:
CIFAR-10 and CIFAR-100 (their python batches read without the general unpickler and
checked), MNIST, Fashion-MNIST (28 x 28 grey, padded to 32 and repeated on 3 channels) and
SVHN, each downloaded by torchvision where the machine can or read from a folder in
torchvision's own layout; or a learnable offline stand-in (stripes). Crops, flips and
normalization happen on the device, per batch."""
import math
import pickle
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cli import UsageError


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


def read_batch(path, labels_key=b'labels', classes=10):
    """One CIFAR python batch -> uint8 (N, 3, 32, 32), int64 (N,); any fault is one line."""
    try:
        with open(path, 'rb') as f:
            batch = ArraysOnly(f, encoding='bytes').load()
        batch = {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
        x, labels = batch[b'data'], torch.tensor(batch[labels_key])
        y = labels.to(torch.int64)
    except Exception as e:                                  # corrupt, truncated, not CIFAR
        raise UsageError(f'{path}: not a CIFAR python batch ({type(e).__name__}: '
                         f'{str(e)[:120]})') from None
    if getattr(x, 'dtype', None) != 'uint8' or x.ndim != 2 or x.shape[1] != 3072 \
            or y.shape != (len(x),):
        raise UsageError(f'{path}: expected uint8 data (N, 3072) with N labels')
    if not torch.equal(labels, y.to(labels.dtype)):            # 3.7 is not a class
        raise UsageError(f'{path}: labels must be whole numbers 0..{classes - 1}')
    if len(y) and (y.min() < 0 or y.max() > classes - 1):
        raise UsageError(f'{path}: labels must lie in 0..{classes - 1}')
    return torch.from_numpy(x.copy()).view(-1, 3, 32, 32), y


def read_cifar(folder):
    """CIFAR-10's python batches data_batch_1..5 (those present) and test_batch, and no
    other file -> uint8 (N, 3, 32, 32), int64 (N,) for train, then for test."""
    folder = Path(folder)
    train_files = [folder / f'data_batch_{k}' for k in range(1, 6)
                   if (folder / f'data_batch_{k}').is_file()]
    if not train_files or not (folder / 'test_batch').is_file():
        raise UsageError(f'{folder} holds no data_batch_1..5 and test_batch files')
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


# ----------------------------------------------------------------------------- the sets

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')
FASHION_CLASSES = ('t-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
                   'sneaker', 'bag', 'ankle boot')
DIGITS = tuple(str(d) for d in range(10))
# name -> (torchvision class, its folder under --data-dir, class names, whether a horizontal
# flip keeps the class: not for digits)
DATASETS = {
    'cifar10': ('CIFAR10', 'cifar-10-batches-py', CIFAR10_CLASSES, True),
    'cifar100': ('CIFAR100', 'cifar-100-python', tuple(f'class{k}' for k in range(100)), True),
    'mnist': ('MNIST', 'MNIST/raw', DIGITS, False),
    'fashion-mnist': ('FashionMNIST', 'FashionMNIST/raw', FASHION_CLASSES, True),
    'svhn': ('SVHN', '', DIGITS, False),
}
CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1) * 255
CIFAR10_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1) * 255


class Images(NamedTuple):
    """A data set on the device: uint8 (N, 3, 32, 32) images and int64 labels; the
    normalization, whether flips keep the class, and the class names."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: torch.Tensor          # (1, 3, 1, 1) float32 on the images' device, 0..255 scale
    std: torch.Tensor
    flip: bool
    classes: tuple

    def prepare(self, x):
        """uint8 (B, 3, 32, 32) -> normalized float, channels_last."""
        x = (x.float() - self.mean) / self.std          # both on x's device (load)
        return x.contiguous(memory_format=torch.channels_last)

    def generator(self, seed):
        """The generator of the data order and augmentation, on the data's device: drawing
        there, a training step never waits for the GPU (on the CPU the same numbers)."""
        return torch.Generator(device=self.x_train.device).manual_seed(seed)

    def train_batches(self, batch_size, gen):
        """One epoch of augmented, prepared training batches in the order gen (from
        generator()) draws; the last partial batch is dropped."""
        perm = torch.randperm(len(self.x_train), generator=gen, device=gen.device)
        for i in range(0, len(self.x_train) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield self.prepare(augment(self.x_train[idx], gen, self.flip)), self.y_train[idx]

    def test_batches(self, size=1000):
        """(prepared images, labels) of the test set in chunks, as every evaluation reads it."""
        for i in range(0, len(self.x_test), size):
            yield self.prepare(self.x_test[i:i + size]), self.y_test[i:i + size]

    def subset(self, n, seed=0):
        """The same set with n training images, drawn at random (a fixed seed); more than
        it has is refused (--train-size)."""
        if n is not None and n > len(self.x_train):
            raise UsageError(f'--train-size {n}: the training set has {len(self.x_train)} images')
        if n is None or n == len(self.x_train):
            return self
        keep = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(seed))
        keep = keep[:n].to(self.x_train.device)
        return self._replace(x_train=self.x_train[keep], y_train=self.y_train[keep])


def augment(x, gen, flip=True):
    """Random crop (zero padding 4) and horizontal flip of uint8 (B, 3, 32, 32), on x's device."""
    b = x.shape[0]
    shift = torch.randint(0, 9, (2, b, 1), generator=gen, device=gen.device).to(x.device)
    flips = (torch.rand(b, generator=gen, device=gen.device) < 0.5).to(x.device)
    padded = F.pad(x, (4, 4, 4, 4))
    rows = (shift[0] + torch.arange(32, device=x.device))[:, :, None]        # (B, 32, 1)
    cols = (shift[1] + torch.arange(32, device=x.device))[:, None, :]        # (B, 1, 32)
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # (B, 32, 32, 3)
    out = out.permute(0, 3, 1, 2)
    return torch.where(flips[:, None, None, None], out.flip(3), out) if flip else out


def read_idx(path):
    """An uncompressed idx file (MNIST's format) of unsigned bytes -> uint8 tensor."""
    raw = Path(path).read_bytes()
    if len(raw) < 4 or raw[:3] != b'\x00\x00\x08':
        raise UsageError(f'{path}: not an idx file of unsigned bytes')
    dims = raw[3]
    shape = np.frombuffer(raw, '>u4', dims, 4)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise UsageError(f'{path}: holds {data.size} values, its header says {shape.tolist()}')
    return torch.from_numpy(data.reshape(shape.tolist()).copy())


def _grey32(x):
    """uint8 (N, 28, 28) -> (N, 3, 32, 32): zero-padded by 2, the grey level on 3 channels."""
    return F.pad(x, (2, 2, 2, 2))[:, None].expand(-1, 3, -1, -1).contiguous()


def _read(name, folder):
    """(x_train, y_train, x_test, y_test) of a set in torchvision's layout under folder."""
    if name == 'cifar10':
        return read_cifar(folder)
    if name == 'cifar100':
        x, y = read_batch(folder / 'train', b'fine_labels', 100)
        return (x, y, *read_batch(folder / 'test', b'fine_labels', 100))
    if name in ('mnist', 'fashion-mnist'):
        parts = [read_idx(folder / f'{split}-{kind}-idx{3 if kind == "images" else 1}-ubyte')
                 for split in ('train', 't10k') for kind in ('images', 'labels')]
        return _grey32(parts[0]), parts[1].long(), _grey32(parts[2]), parts[3].long()
    try:
        from scipy.io import loadmat                           # SVHN's .mat files
    except ImportError:
        raise UsageError('SVHN is stored as .mat files: pip install scipy to read them') from None
    mats = [loadmat(folder / f'{split}_32x32.mat') for split in ('train', 'test')]
    return [t for m in mats for t in (torch.from_numpy(m['X']).permute(3, 2, 0, 1).contiguous(),
                                      torch.from_numpy(m['y'].reshape(-1) % 10).long())]


def load(data_dir, synthetic, device, dataset='cifar10'):
    """An Images set on `device`: `dataset` from data_dir in torchvision's layout (downloaded
    there when absent), or the synthetic stripes."""
    if synthetic:
        if dataset != 'cifar10':
            raise UsageError(f'--synthetic replaces the data set: it takes no --dataset {dataset}')
        parts = [d.to(device) for d in (*stripes(5_000, seed=1234), *stripes(1_000, seed=4321))]
        return Images(*parts, CIFAR10_MEAN.to(device), CIFAR10_STD.to(device), True,
                      CIFAR10_CLASSES)
    kind, sub, classes, flip = DATASETS[dataset]
    folder = Path(data_dir) / sub
    needed = {'cifar10': 'test_batch', 'cifar100': 'test', 'mnist': 't10k-labels-idx1-ubyte',
              'fashion-mnist': 't10k-labels-idx1-ubyte', 'svhn': 'test_32x32.mat'}[dataset]
    if not (folder.is_dir() if sub else (folder / needed).is_file()):
        try:
            import torchvision
            cls = getattr(torchvision.datasets, kind)
            for split in (('train', 'test') if dataset == 'svhn' else (True, False)):
                cls(data_dir, **({'split': split} if dataset == 'svhn' else {'train': split}),
                    download=True)
        except Exception as e:                                   # offline, or no permission
            raise UsageError(f'{dataset} is not in {folder} and could not be downloaded '
                             f'({type(e).__name__}). Put it there in torchvision\'s layout '
                             f'(torchvision.datasets.{kind}(DIR, download=True) writes it), or '
                             'pass --synthetic') from None
    try:
        parts = [d.to(device) for d in _read(dataset, folder)]
    except FileNotFoundError as e:
        raise UsageError(f'{folder} lacks the {dataset} file {Path(e.filename).name}') from None
    if dataset == 'cifar10':
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:                                                        # of the training images
        x = parts[0].float()
        mean = x.mean((0, 2, 3)).view(1, 3, 1, 1)
        std = x.std((0, 2, 3)).clamp_min(1).view(1, 3, 1, 1)
    return Images(*parts, mean.to(device), std.to(device), flip, classes)
