"""
Learned variances (iDDPM, Nichol & Dhariwal 2021) and learned schedules (VDM, Kingma et al. 2021) on one dataset at
equal steps: bits/dim of L_simple vs L_hybrid vs L_vlb + importance sampling, and of VDM's fixed vs learned schedule;
then sample quality of the L_hybrid model at 25/50/100 ddpm steps with its learned variance vs the fixed posterior
variance (beta tilde): Frechet distance in LeNet features (FD_lenet, evaluate.py) to held-out real images and the
share of samples a LeNet classifier (trained on the real training images, as benchmarks/class_accuracy.py does)
puts in the requested class.

Each model is one `python train.py ...` subprocess run one after the other (OMP_NUM_THREADS=1); its process CPU
seconds (user + system, from getrusage of the children) are printed. bits/dim is what train.py reports at the end of
the run (--bpd-images held-out images: the T-step bound for discrete models, with the learned variance for
hybrid/vlb; the continuous-time bound for VDM).

    python benchmarks/learned.py --out runs/learned                    # train all five, then measure
    python benchmarks/learned.py --out runs/learned --skip-train       # measure existing runs again
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data                                                   # noqa: E402
import evaluate                                               # noqa: E402
import lenet                                                  # noqa: E402
import metrics                                                # noqa: E402
import vdm                                                    # noqa: E402
from knobs import make_sigmas                                 # noqa: E402
from sample import generate, load_model, sample_shape         # noqa: E402

# name -> (what, train.py flags). Every run: eps prediction, the same data, network, steps, batch and seed.
RUNS = {
    'simple': ('L_simple (DDPM, cosine T=1000, fixed variance)', ['--objective', 'simple', '--schedule', 'cosine']),
    'hybrid': ('L_hybrid (learned variance)', ['--objective', 'hybrid']),
    'vlb': ('L_vlb + importance sampling (learned variance)', ['--objective', 'vlb', '--t-sampler', 'importance']),
    'vdm_linear': ('VDM bound, fixed linear log-SNR', ['--objective', 'vdm', '--vdm-schedule', 'linear']),
    'vdm_learned': ('VDM bound, learned log-SNR (variance-minimising)', ['--objective', 'vdm', '--vdm-schedule', 'learned']),
}


def train(args, name, flags):
    """One training run in a subprocess; its CPU seconds (user + system of the child)."""
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--dataset', args.dataset, '--split', args.split,
           '--steps', str(args.steps), '--batch-size', str(args.batch_size), '--lr', str(args.lr), '--warmup', '20',
           '--prediction', 'eps', '--bpd-images', str(args.bpd_images), '--sample-every', '0', '--no-progress',
           '--memorization-below', '0', '--out', os.path.join(args.out, name), '--overwrite', *flags]
    if args.data_dir:
        cmd += ['--data-dir', args.data_dir]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS='1'), cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def continuous_bpd(args, run_dir, n_t=64):
    """The continuous-time bound (vdm.diffusion_bits_per_dim: VDM's decoder and prior, L_inf at n_t points) of any of
    the five models, on the same held-out images train.py's bits/dim used (the first --bpd-images of the held-out split)."""
    if not os.path.isfile(os.path.join(run_dir, 'ckpt.pt')):
        return float('nan')
    net, diffusion, config = load_model(os.path.join(run_dir, 'ckpt.pt'))
    dataset = data.load_dataset(config['data']['dataset'], data_dir=args.data_dir, split=args.split,
                                resolution=config['data']['resolution'])
    _, held_out = data.holdout_split(len(dataset), 0)                       # train.py's split (seed 0)
    x0 = dataset.batch(held_out[:args.bpd_images])[0]
    cond = {'y': torch.full((len(x0),), config['data']['num_classes'])} if config['data']['num_classes'] else {}
    return vdm.diffusion_bits_per_dim(diffusion, net, x0, n_t, torch.Generator().manual_seed(0), **cond).mean().item()


def final_bpd(run_dir):
    if not os.path.isfile(os.path.join(run_dir, 'log.jsonl')):
        return float('nan')
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    return next((r['bits_per_dim'] for r in reversed(records) if 'bits_per_dim' in r), float('nan'))


VARIANCES = (('learned (Eq. 15)', {}), ('fixed beta~ (posterior)', {'variance': 'posterior'}),
             ('fixed beta', {'variance': 'beta'}))


def quality_table(args):
    """FD_lenet and class accuracy of the hybrid model at 25/50/100 ddpm steps, learned vs fixed variances."""
    net, diffusion, config = load_model(os.path.join(args.out, 'hybrid', 'ckpt.pt'))
    d = config['data']
    dataset = data.load_dataset(d['dataset'], data_dir=args.data_dir, split=args.split, resolution=d['resolution'])
    x, y = dataset.batch(torch.arange(len(dataset)))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    test, train_idx = order[:2000], order[2000:]
    clf = lenet.train_classifier((x[train_idx] + 1) / 2, y[train_idx], d['num_classes'], steps=args.classifier_steps)
    real = evaluate.extract_features((x[test] + 1) / 2, clf, progress=False)      # numpy (N, D)
    mu_r, cov_r = real.mean(0), np.cov(real, rowvar=False)
    labels = torch.arange(d['num_classes']).repeat_interleave(args.n_per_class)
    print(f'\nSample quality of the L_hybrid model: {len(labels)} samples ({args.n_per_class} per class, no guidance), '
          f'ddpm on vp-linspace steps; FD_lenet to {len(test)} held-out real images; class accuracy by a LeNet trained '
          f'on the other real images')
    print(f"{'steps':>5} | {'variance':<22} | {'FD_lenet':>8} | {'class acc':>9} | {'CPU s':>6}")
    for steps in args.steps_list:
        sigmas = make_sigmas('vp-linspace', steps, diffusion)
        for variance, options in VARIANCES[:args.variances]:
            t0 = time.process_time()
            images = generate(net, diffusion, len(labels), sample_shape(config), 'cpu', labels, d['num_classes'], 'ddpm',
                              steps, 1.0, seed=args.seed, sampler_options=options, sigmas=sigmas, batch_size=200)
            feats, logits = evaluate.extract_features((images + 1) / 2, clf, progress=False, return_logits=True)
            fd = metrics.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_r, cov_r)
            acc = float((logits.argmax(1) == labels.numpy()).mean())
            print(f'{steps:>5} | {variance:<22} | {float(fd):>8.2f} | {acc:>9.3f} | {time.process_time() - t0:>6.0f}')


def main(args):
    os.makedirs(args.out, exist_ok=True)
    cpu = {}
    for name, (_, flags) in RUNS.items():
        if not args.skip_train:
            cpu[name] = train(args, name, flags)
    print(f'\n{args.dataset} ({args.split} split), U-Net micro, eps prediction, {args.steps} steps of batch '
          f'{args.batch_size}, lr {args.lr}; bits/dim of the bound on {args.bpd_images} held-out images')
    print('bits/dim: the T-step bound (discrete models) or the continuous one (VDM) that train.py reports at the end, and the '
          'continuous-time bound of every model (VDM decoder and prior, 64 t-points) on the same images')
    print(f"{'objective':<50} | {'bits/dim':>8} | {'continuous':>10} | {'train CPU s':>11}")
    for name, (what, _) in RUNS.items():
        run_dir = os.path.join(args.out, name)
        print(f"{what:<50} | {final_bpd(run_dir):>8.3f} | {continuous_bpd(args, run_dir):>10.3f} | "
              f"{cpu.get(name, float('nan')):>11.0f}")
    if not args.skip_quality:
        quality_table(args)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='runs/learned', help='folder of the five runs')
    p.add_argument('--dataset', default='mnist')
    p.add_argument('--data-dir', default=os.path.join(ROOT, '..', 'shared', 'data', 'mnist'))
    p.add_argument('--split', default='test')
    p.add_argument('--steps', type=int, default=400, help='training steps of every run')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--bpd-images', type=int, default=16)
    p.add_argument('--steps-list', type=int, nargs='+', default=[25, 50, 100], help='sampling steps of the quality table')
    p.add_argument('--n-per-class', type=int, default=20)
    p.add_argument('--classifier-steps', type=int, default=500)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--variances', type=int, default=3, choices=[2, 3], help='2: learned and beta~ only; 3: also beta')
    p.add_argument('--skip-train', action='store_true', help='measure the runs already in --out')
    p.add_argument('--skip-quality', action='store_true', help='only the bits/dim table')
    main(p.parse_args())
