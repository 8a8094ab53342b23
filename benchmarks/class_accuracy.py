"""
Are a class-conditional model's samples recognisably of the class they were asked for?

Trains a small classifier (evaluate.LeNetFeatures) on the model's own training data, checks it on held-out real
images, then samples N images per class from the checkpoint and reports the share that the classifier assigns to
the requested class, for each guidance weight (1 = no guidance). Chance is 1 / num_classes.

    python benchmarks/class_accuracy.py --ckpt runs/default/ckpt.pt --guidance 1 2 3
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data                                                   # noqa: E402
import evaluate                                               # noqa: E402
from sample import generate, load_model, sample_shape        # noqa: E402


def main(args):
    torch.manual_seed(0)
    net, diffusion, config = load_model(args.ckpt)
    d = config['data']
    if not d['num_classes']:
        raise SystemExit('error: the model is unconditional; class accuracy needs a class-conditional model')
    if d.get('frames'):
        raise SystemExit('error: this is a video model; class accuracy is measured on image models only')
    trained = config['args']
    dataset = data.load_dataset(d['dataset'], data_dir=args.data_dir or trained.get('data_dir'),
                                split=trained.get('split', 'train'), resolution=d['resolution'])
    x, y = dataset.batch(torch.arange(len(dataset)))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    n_test = min(2000, len(x) // 5)
    test, train = order[:n_test], order[n_test:]
    t0 = time.time()
    clf = evaluate.train_classifier((x[train] + 1) / 2, y[train], d['num_classes'], steps=args.classifier_steps)
    with torch.no_grad():
        real_acc = (clf((x[test] + 1) / 2, return_logits=True)[1].argmax(1) == y[test]).float().mean().item()
    print(f"classifier: LeNet trained on {len(train)} real images in {time.time() - t0:.0f}s; "
          f"accuracy on {n_test} held-out real images {real_acc:.3f} (chance {1 / d['num_classes']:.3f})")
    labels = torch.arange(d['num_classes']).repeat_interleave(args.n_per_class)
    sampler = args.sampler or trained.get('sampler', 'heun')
    steps = args.steps or trained.get('sample_steps', 18)
    for w in args.guidance:
        t0 = time.time()
        images = generate(net, diffusion, len(labels), sample_shape(config), 'cpu', labels, d['num_classes'], sampler,
                          steps, w, seed=args.seed, aug_dim=config['net'].get('aug_dim', 0), batch_size=args.batch)
        with torch.no_grad():
            pred = clf((images + 1) / 2, return_logits=True)[1].argmax(1)
        per_class = [(pred[labels == c] == c).float().mean().item() for c in range(d['num_classes'])]
        print(f'guidance {w:g}: {(pred == labels).float().mean().item():.3f} of {len(labels)} samples classified as '
              f'requested ({sampler}, {steps} steps, {time.time() - t0:.0f}s); per class ' +
              ' '.join(f'{a:.2f}' for a in per_class))


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True)
    p.add_argument('--data-dir', default=None, help="default: the run's --data-dir")
    p.add_argument('--n-per-class', type=int, default=50)
    p.add_argument('--batch', type=int, default=100)
    p.add_argument('--guidance', type=float, nargs='+', default=[1.0, 2.0])
    p.add_argument('--sampler', default=None)
    p.add_argument('--steps', type=int, default=None)
    p.add_argument('--classifier-steps', type=int, default=500)
    p.add_argument('--seed', type=int, default=0)
    main(p.parse_args())
