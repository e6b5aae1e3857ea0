"""Real photographs as JPEGs at ImageNet's sizes, in ImageNet's folder layout (issue 20).

    python docs/photos_as_imagefolder.py DIR [--per-class 100]

The two photographs that scikit-learn ships (427x640 each) cut into random crops, resized
so that the short side is 333-500 px (ImageNet's training images are mostly 500x375 or
375x500) and saved at JPEG quality 90 under DIR/train/classK and DIR/val/classK. The classes
mean nothing: this folder measures the input pipeline (`python benchmark.py --loader DIR`),
where decoding and resizing real JPEGs of these sizes is the work. Needs scikit-learn and
pillow (not project dependencies).
"""
import argparse
from pathlib import Path

import numpy as np


def main():
    from PIL import Image
    from sklearn.datasets import load_sample_images
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('out')
    ap.add_argument('--per-class', type=int, default=100, help='training images per class')
    ap.add_argument('--classes', type=int, default=10)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    for split, n in (('train', args.per_class), ('val', max(1, args.per_class // 5))):
        for k in range(args.classes):
            folder = Path(args.out) / split / f'class{k}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                photo = photos[rng.integers(len(photos))]
                h, w = rng.integers(200, 427), rng.integers(250, 640)
                top, left = rng.integers(0, 428 - h), rng.integers(0, 641 - w)
                crop = Image.fromarray(photo[top:top + h, left:left + w])
                short = int(rng.integers(333, 501))
                scale = short / min(h, w)
                crop = crop.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                crop.save(folder / f'{i:05d}.jpg', quality=90)
    print(f'wrote {args.classes * (args.per_class + max(1, args.per_class // 5))} JPEGs under '
          f'{args.out}')


if __name__ == '__main__':
    main()
