"""Small real images for a CPU: scikit-learn's handwritten digits (1,797 real 8 x 8 images, ten
classes), written where the scripts read them.

    python docs/digits.py data/digits                   # for train_cifar.py --data-dir data/digits
    python docs/digits.py data/digits_if --imagefolder  # for train_imagenet.py (JPEGs)

Needs scikit-learn (and pillow for --imagefolder): `pip install scikit-learn pillow`. One fixed
permutation (numpy's generator seeded with 0) puts 297 images in the test (val) set and 1,500
in the training set.
- CIFAR-10's format: each image upscaled to 32 x 32 (bilinear), its grey level x on three
  channels as (x, 1 - x, x / 2 + 1/4); five data_batch files of 300 images and a test_batch,
  dicts with the keys b'data' (uint8, N x 3072) and b'labels', as train_cifar.py reads them.
- --imagefolder: DIR/train/digitK/*.jpg and DIR/val/digitK/*.jpg, 80 x 80 RGB JPEGs (bilinear,
  quality 92), as train_imagenet.py reads them (e.g. --crop-size 32 or 64).
The README's and NOTES.md's digits tables were measured on exactly these files.
"""
import pickle
import sys
from pathlib import Path

import numpy as np

TEST = 297


def digits():
    """(images float in [0, 1], (N, 8, 8); labels (N,)) in the fixed order."""
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    return d.images[order] / 16.0, d.target[order], order


def as_cifar(root):
    import torch
    import torch.nn.functional as F
    images, labels, _ = digits()
    x = torch.tensor(images, dtype=torch.float32)[:, None]                  # (N, 1, 8, 8)
    x = F.interpolate(x, size=32, mode='bilinear', align_corners=False).clamp(0, 1).numpy()
    channels = np.concatenate([x, 1 - x, x * 0.5 + 0.25], 1)                # (N, 3, 32, 32)
    data = (channels * 255).round().astype(np.uint8).reshape(len(x), 3072)
    folder = Path(root) / 'cifar-10-batches-py'
    folder.mkdir(parents=True, exist_ok=True)
    train = np.arange(TEST, len(labels))
    for k, part in enumerate(np.array_split(train, 5), 1):
        batch = {b'data': data[part], b'labels': [int(v) for v in labels[part]]}
        (folder / f'data_batch_{k}').write_bytes(pickle.dumps(batch, protocol=2))
    test = {b'data': data[:TEST], b'labels': [int(v) for v in labels[:TEST]]}
    (folder / 'test_batch').write_bytes(pickle.dumps(test, protocol=2))
    return folder


def as_imagefolder(root):
    from PIL import Image
    images, labels, order = digits()
    for k, (image, label, index) in enumerate(zip(images, labels, order)):
        folder = Path(root) / ('val' if k < TEST else 'train') / f'digit{label}'
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((image * 255).astype(np.uint8)).resize((80, 80), Image.BILINEAR)
        grey.convert('RGB').save(folder / f'{index}.jpg', quality=92)
    return Path(root)


if __name__ == '__main__':
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] != '--imagefolder'):
        raise SystemExit(__doc__)
    print((as_imagefolder if len(sys.argv) == 3 else as_cifar)(sys.argv[1]))
