"""The paper's training loop (4.1), one fit() for every phase: a dense baseline, the gated
fine-tuning with the gate loss, and plain fine-tuning of a pruned net.

    model, last = fit(model, data, args, epochs=100, batch_size=256, weight_decay=5e-4,
                      milestones=[50, 75], gen=gen, gate_loss=gate_loss(args), ...)

Each epoch: the training batches through the compiled (or eager) step, the lr schedule,
the test set, one fixed-width row and, with a run folder, a checkpoint and a metrics line
(train_common: resume continues from the last one exactly).
"""
import torch

import gumbel_channels as gc
import train_common as common


@torch.no_grad()
def evaluate(model, data, autocast):
    """Accuracy % on data's test set and (rate, MACs %, polarized) under the model's current
    inference strategy; the test predictions ride along as evaluate.predictions."""
    model.eval()
    correct, stats, batches, predictions = 0, 0, 0, []
    for xb, yb in data.test_batches():
        with autocast():
            out = model(xb)
        logits, info = gc.split_output(out)
        predictions.append(logits.argmax(1))
        correct += (predictions[-1] == yb).sum()
        if info is not None:
            stats, batches = stats + common.gate_stats(info), batches + 1
    evaluate.predictions = torch.cat(predictions)
    return 100 * correct.item() / len(data.x_test), *common.averages(stats, batches)


def fit(model, data, args, *, epochs, batch_size, weight_decay, milestones, gen, gate_loss,
        autocast, mode=None, warmup=False, run_dir=None, phase='train', test_each_epoch=True):
    """Train `model` on data (cifar_data.Images) for `epochs`: SGD (train_common.optimizer: lr
    and the gate recipe from args) with the lr / 10 at each milestone, the data in the order
    `gen` draws, loss = CE + gate_loss(info, progress) for a gated net. With run_dir: args.json,
    a checkpoint and a metrics line per epoch, and a resume from run_dir/last.pt when it is
    there. test_each_epoch=False tests after the last epoch only. -> (model, the last row)."""
    opt, sched = common.optimizer(model, args, weight_decay=weight_decay, milestones=milestones,
                                  warmup=warmup)
    start, best, last = 0, -1.0, None
    if run_dir is not None and (run_dir / 'last.pt').exists():
        start, best, last = common.resume(run_dir, model, opt, sched, gen=gen)
        print(f'{phase}: resumed from {run_dir / "last.pt"} after epoch {start}')
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        common.save_atomic(common.to_json(vars(args), indent=1), run_dir / 'args.json')
    step = common.TrainStep(model, opt, gate_loss, autocast, mode=mode)
    print(f'{phase}: {epochs} epochs, batch {batch_size}, lr {args.lr} / 10 at {milestones}'
          + (f', run dir {run_dir}' if run_dir is not None else ''))
    print(common.ROW.format(*common.HEADER))
    steps = len(data.x_train) // batch_size
    for epoch in range(start, epochs):
        m = common.train_epoch(step, data.train_batches(batch_size, gen),
                               progress=lambda i: common.progress(epoch, i, epochs, steps),
                               epoch=epoch + 1, steps=steps)
        lr = opt.param_groups[0]['lr']
        sched.step()
        test_acc = test_macs = test_rate = None
        if test_each_epoch or epoch + 1 == epochs:
            test_acc, test_rate, test_macs, _ = evaluate(model, data, autocast)
        last = dict(phase=phase, epoch=epoch + 1, lr=lr, **m, test_acc=test_acc,
                    test_rate=test_rate, test_macs=test_macs,
                    images_per_s=m['images'] / m['seconds'])
        common.print_row(epoch + 1, lr, m, test_acc, test_macs, last['images_per_s'])
        if run_dir is not None:
            improved = test_acc is not None and test_acc > best
            ckpt = common.checkpoint(model, opt, sched, epoch=epoch + 1,
                                     best=max(best, test_acc) if improved else best,
                                     args=args, metrics=last, gen=gen)
            common.record_epoch(run_dir, ckpt, last, improved=improved)
            best = ckpt['best_acc']
    return model, last
