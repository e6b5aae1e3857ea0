"""ImageNet for train_imagenet.py: ImageFolder train/ and val/ (or FakeData with
--synthetic) read by DataLoader workers that decode, crop and flip only, and yield uint8
(N, 3, H, W); on_device converts and normalizes on the training device: a worker then
delivers about 20% more images, and a quarter of the bytes (docs/deployment.md: the GPU path)."""
import functools
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

from cli import RunError, UsageError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)      # torchvision's, on 0..1


@functools.lru_cache
def _moments(device):
    """MEAN and STD scaled to 0..255, (1, 3, 1, 1) on `device`, made once (no copy per batch)."""
    return [255 * torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (MEAN, STD)]


def on_device(x, device):
    """A loader batch (uint8) -> float32 on `device`, channels_last, normalized as
    torchvision's recipe does: (x / 255 - MEAN) / STD."""
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    mean, std = _moments(torch.device(device))
    return (x.float() - mean) / std


class Tolerant(torchvision.datasets.ImageFolder):
    """ImageFolder that yields None for an image it cannot read (corrupt, truncated, empty),
    so that one bad file costs one image, not the run; an empty class folder is an error."""

    def __init__(self, root, transform):
        try:
            super().__init__(root, transform)
        except (FileNotFoundError, OSError) as e:          # no class folder, or an empty one
            raise UsageError(f'{root}: {str(e).splitlines()[0][:160]}') from None

    def __getitem__(self, i):
        try:
            return super().__getitem__(i)
        except Exception:                                   # PIL raises several kinds
            return None


def collate_readable(batch):
    """Stacks the readable images -> (images, labels, unreadable count)."""
    good = [b for b in batch if b is not None]
    if not good:
        raise RunError('a whole batch of images was unreadable: check --data-dir')
    x, y = torch.utils.data.default_collate(good)
    return x, y, len(batch) - len(good)


def loaders(args, world, rank):
    """ImageFolder train/val loaders; each process reads its own shard."""
    root = Path(args.data_dir)
    for split in () if args.synthetic else ('train', 'val'):
        if not (root / split).is_dir():
            raise UsageError(f'{root / split} is missing: --data-dir must hold train/ and val/ '
                             '(ImageFolder layout)')
    augment = transforms.Compose([                          # uint8 out: on_device normalizes
        transforms.RandomResizedCrop(args.crop_size), transforms.RandomHorizontalFlip(),
        transforms.PILToTensor()])
    center = transforms.Compose([
        transforms.Resize(args.crop_size * 8 // 7), transforms.CenterCrop(args.crop_size),
        transforms.PILToTensor()])
    if args.synthetic:
        size = (3, args.crop_size * 8 // 7, args.crop_size * 8 // 7)
        train = torchvision.datasets.FakeData(1024, size, 10, augment, random_offset=0)
        val = torchvision.datasets.FakeData(256, size, 10, center, random_offset=1024)
        train.classes = val.classes = [f'class{k}' for k in range(10)]
    else:
        train, val = Tolerant(root / 'train', augment), Tolerant(root / 'val', center)
    if train.classes != val.classes:
        differ = sorted(set(train.classes) ^ set(val.classes))[:3]
        raise UsageError(f'train/ and val/ must have the same class folders ({len(train.classes)}'
                         f' and {len(val.classes)}; in one only: {", ".join(differ)})')
    if args.batch_size < world or args.batch_size % world:
        raise UsageError(f'--batch-size {args.batch_size} must divide over {world} processes')
    if args.gating == 'dynamic' and args.batch_size // world < 2:
        raise UsageError('--gating dynamic: its gates normalize over the batch (BatchNorm), so '
                         'each process needs at least 2 images a batch (--batch-size)')
    if len(train) // world < args.batch_size // world:
        raise UsageError(f'train/ has {len(train)} images, fewer than one batch of '
                         f'{args.batch_size // world} for each of {world} process(es)')
    sampler = torch.utils.data.DistributedSampler(train, world, rank, seed=args.seed,
                                                  drop_last=True)
    kw = dict(num_workers=args.workers, pin_memory=args.device.startswith('cuda'),
              collate_fn=collate_readable)
    # Workers start afresh each epoch with seeds drawn from this generator, which
    # seed_epoch sets from (seed, epoch, rank): an epoch's crops and flips do not depend on
    # the epochs before it, so a resumed run draws what the uninterrupted one drew.
    train_loader = torch.utils.data.DataLoader(train, args.batch_size // world, sampler=sampler,
                                               drop_last=True, generator=torch.Generator(),
                                               **kw)
    val_shard = torch.utils.data.Subset(val, range(rank, len(val), world))  # exact, no padding
    val_loader = torch.utils.data.DataLoader(val_shard, 100, **kw)
    return train_loader, val_loader, train.classes


def seed_epoch(loader, seed, epoch, rank):
    """Before each epoch: the sampler's order and the workers' random crops and flips follow
    from (seed, epoch, rank) alone (with no workers they come from torch's generator, which
    checkpoints keep)."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(((seed * 1_000_003) + epoch) * 1_009 + rank)
