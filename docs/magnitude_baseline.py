"""Learned gates beside magnitude pruning, from the same dense net (issue 21, NOTES.md "Any CNN").

    python docs/magnitude_baseline.py runs/mobilenet_v2-static-channel-flops-t0.5-s0 \
        runs/dense-mobilenet_v2-s0/last.pt

Reads a finished gated run of train_cifar.py (its args.json and final.json), prunes the
same dense net with Torch-Pruning's GroupMagnitudeImportance (L2, uniform over layers, the
classifier kept) step by step until it runs no more MACs than the gated run's pruned net,
fine-tunes it with the gated run's recipe (epochs, batch, lr, milestones, weight decay,
data order; cross-entropy only) and prints both rows. Not part of the project's
dependencies: pip install torch-pruning.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cifar_data  # noqa: E402
import gumbel_export as ge  # noqa: E402
import train_cifar  # noqa: E402
import train_common as common  # noqa: E402


def main(run_dir, dense_path):
    import torch_pruning as tp
    run_dir = Path(run_dir)
    args = json.loads((run_dir / 'args.json').read_text())
    final = json.loads((run_dir / 'final.json').read_text())
    torch.manual_seed(args['seed'])
    data = cifar_data.load(args['data_dir'], False, torch.device('cpu'))
    model = torchvision.models.get_model(args['arch'], num_classes=10)
    model.load_state_dict(common.load_checkpoint(dense_path)['model'])
    model.eval()
    x = train_cifar.prepare(data[2][:1])
    dense_macs = ge.counted_macs(model, x)
    target = final['pruned_macs_percent'] / 100 * dense_macs
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, x, tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.95, iterative_steps=95,
                                  ignored_layers=[classifier])
    macs = dense_macs
    while macs > target:
        pruner.step()
        macs = ge.counted_macs(model, x)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args['lr'], momentum=0.9,
                          weight_decay=args['weight_decay'])
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args['milestones'], 0.1)
    gen = torch.Generator().manual_seed(args['seed'] + 1)
    autocast = common.autocast_for(torch.device('cpu'))
    for epoch in range(args['epochs']):
        model.train()
        for xb, yb in train_cifar.train_batches(data[0], data[1], args['batch_size'], gen):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    acc = train_cifar.evaluate(model, data[2], data[3], autocast)[0]
    print(f"{'method':32} {'MACs %':>7} {'polarized':>9} {'accuracy':>8}   (dense "
          f"{final['baseline_acc']:.2f}%, {args['epochs']} fine-tuning epochs)")
    print(f"{'learned gates (this project)':32} {final['pruned_macs_percent']:7.2f} "
          f"{final['polarized']:9.2f} {final['pruned_acc']:8.2f}")
    print(f"{'magnitude (Torch-Pruning, L2)':32} {100 * macs / dense_macs:7.2f} {'':>9} "
          f"{acc:8.2f}")


if __name__ == '__main__':
    main(*sys.argv[1:3])
