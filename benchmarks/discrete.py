"""
Discrete diffusion on VQ tokens: sample quality against decoding steps, for ancestral and MaskGIT decoding.

For a train_discrete.py checkpoint: trains evaluate.py's LeNet on most of the model's own dataset and checks it on
held-out real images (as benchmarks/class_accuracy.py), then for each decoder and number of steps draws
--n-per-class samples of every class (the same seeds in every row) and reports
  - class accuracy: the share the LeNet assigns to the requested class (chance 1 / classes),
  - FD_lenet: the Frechet distance (evaluate.frechet_distance) between the LeNet features of the samples and of the
    held-out real images (evaluate.py's LeNet-feature Frechet distance; not FID, and biased upwards at few samples:
    compare rows, not papers),
  - images per CPU-second of this process (time.process_time: the decoder's network calls and the VQ decoder), with
    the thread count it runs with; CPU time rather than wall time, so other programs on the machine do not count.
Optionally (--latent CKPT) the same numbers for a continuous latent diffusion model of train.py (sample.generate,
its own sampler), e.g. on the same autoencoder's continuous latents, and (--vq-recon) for the VQ autoencoder's own
reconstructions of the held-out images (the ceiling any token model can reach).

    OMP_NUM_THREADS=1 python benchmarks/discrete.py --ckpt runs/discrete/ckpt.pt --steps 4 8 16 --png docs/discrete_mnist.png
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints                                            # noqa: E402
import data                                                   # noqa: E402
import evaluate                                               # noqa: E402
import sample                                                 # noqa: E402
import sample_discrete                                        # noqa: E402


def lenet_scores(images, labels, clf, real_stats):
    """(class accuracy, FD_lenet against real_stats) of images in [-1, 1]."""
    with torch.no_grad():
        feats, logits = clf((images + 1) / 2, return_logits=True)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    fd = evaluate.frechet_distance(*evaluate.feature_statistics(feats.double().numpy()), *real_stats)
    return accuracy, fd


def main(args):
    torch.manual_seed(0)
    net, process, config, decode = sample_discrete.load_discrete_model(args.ckpt)
    d, trained = config['data'], config['args']
    dataset = data.load_dataset(d['dataset'], data_dir=args.data_dir or trained.get('data_dir'),
                                split=trained.get('split', 'train'), resolution=d['resolution'])
    x, y = dataset.batch(torch.arange(len(dataset)))
    # The classifier's own held-out split (class_accuracy.py's): 2000 real images it never sees.
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    test, train = order[:2000], order[2000:]
    t0 = time.time()
    clf = evaluate.train_classifier((x[train] + 1) / 2, y[train], d['num_classes'], steps=args.classifier_steps)
    with torch.no_grad():
        real_feats, real_logits = clf((x[test] + 1) / 2, return_logits=True)
    real_acc = (real_logits.argmax(1) == y[test]).float().mean().item()
    real_stats = evaluate.feature_statistics(real_feats.double().numpy())
    print(f'LeNet trained on {len(train)} real images in {time.time() - t0:.0f}s: accuracy {real_acc:.3f} on '
          f'{len(test)} held-out real images (chance {1 / d["num_classes"]:.3f}); FD_lenet against those '
          f'{len(test)} images; threads {torch.get_num_threads()}')
    labels = torch.arange(d['num_classes']).repeat_interleave(args.n_per_class)
    rows, grid = [], []
    if args.vq_recon:
        ae = checkpoints.load_autoencoder(config['autoencoder']['path'])
        images = sample_discrete.decode_tokens(ae, sample_discrete.encode_tokens(ae, x[test][:len(labels)]))
        rows.append(('VQ reconstructions (held-out)', '-', *lenet_scores(images.clamp(-1, 1), y[test][:len(labels)],
                                                                        clf, real_stats), float('nan')))
    for decoder in args.decoders:
        for steps in args.steps:
            t0 = time.process_time()                  # CPU time of this process: robust to other load
            images = sample_discrete.generate(net, process, decode, len(labels), labels, args.batch, decoder=decoder,
                                              steps=steps, guidance=args.guidance, seed=args.seed,
                                              choice_temperature=args.choice_temperature)
            rate = len(labels) / (time.process_time() - t0)
            rows.append((f'discrete, {decoder}', steps, *lenet_scores(images, labels, clf, real_stats), rate))
            print(f'{rows[-1][0]:<28} steps {steps:>3}: class accuracy {rows[-1][2]:.3f}, FD_lenet {rows[-1][3]:.2f}, '
                  f'{rate:.1f} images per CPU-second', flush=True)
            if steps in args.grid_steps:
                grid.append(images.reshape(d['num_classes'], args.n_per_class, *images.shape[1:])[:, :args.grid_cols])
    if args.latent:
        lnet, diffusion, lconfig = sample.load_model(args.latent)
        ldecode = sample.latent_decoder(lconfig)
        for steps in args.latent_steps:
            t0 = time.process_time()
            images = sample.generate(lnet, diffusion, len(labels), sample.sample_shape(lconfig), 'cpu', labels,
                                     d['num_classes'], args.latent_sampler, steps, args.guidance, seed=args.seed,
                                     batch_size=args.batch, decode=ldecode).clamp(-1, 1)
            rate = len(labels) / (time.process_time() - t0)
            scores = lenet_scores(images, labels, clf, real_stats)
            rows.append((f'continuous latent, {args.latent_sampler}', steps, *scores, rate))
            print(f'{rows[-1][0]:<28} steps {steps:>3}: class accuracy {rows[-1][2]:.3f}, FD_lenet {rows[-1][3]:.2f}, '
                  f'{rate:.1f} images per CPU-second', flush=True)
    print(f'\n| model, decoder | steps | class accuracy | FD_lenet | images per CPU-second ({torch.get_num_threads()} thread) |')
    print('|---|---|---|---|---|')
    for name, steps, acc, fd, rate in rows:
        print(f'| {name} | {steps} | {acc:.3f} | {fd:.2f} | {rate:.1f} |')
    if args.png and grid:
        # One block per (decoder, steps) of --grid-steps: a row per class, --grid-cols samples each.
        sample.save_grid(torch.cat([g.transpose(0, 1).reshape(-1, *g.shape[2:]) for g in grid]), args.png,
                         nrow=d['num_classes'])
        print(f'wrote {args.png}: rows of {d["num_classes"]} classes, {args.grid_cols} rows per block, blocks '
              + ', '.join(f'{dec} {s} steps' for dec in args.decoders for s in args.steps if s in args.grid_steps))


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True, help='train_discrete.py checkpoint')
    p.add_argument('--data-dir', default=None, help="default: the run's --data-dir")
    p.add_argument('--decoders', nargs='+', default=['ancestral', 'maskgit'], choices=sample_discrete.DECODERS)
    p.add_argument('--steps', type=int, nargs='+', default=[4, 8, 16, 32])
    p.add_argument('--n-per-class', type=int, default=20)
    p.add_argument('--batch', type=int, default=200)
    p.add_argument('--guidance', type=float, default=1.0)
    p.add_argument('--choice-temperature', type=float, default=4.5)
    p.add_argument('--classifier-steps', type=int, default=500)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--vq-recon', action='store_true', help='also score the VQ reconstructions of held-out images')
    p.add_argument('--latent', default=None, help='a continuous latent diffusion checkpoint (train.py) to score beside')
    p.add_argument('--latent-sampler', default='heun')
    p.add_argument('--latent-steps', type=int, nargs='+', default=[8, 18])
    p.add_argument('--png', default=None, help='grid of the samples at --grid-steps')
    p.add_argument('--grid-steps', type=int, nargs='+', default=[8])
    p.add_argument('--grid-cols', type=int, default=4)
    main(p.parse_args())
