"""
What each sampling knob does on one trained class-conditional model: class accuracy and a Frechet distance.

For each setting, N samples (the same number per class, the same seeds for every setting) are drawn through
sample.py's own construction (sample.sampling_setup, the code behind its flags), then scored by a LeNet trained on
the model's real training images (evaluate.train_classifier): the share classified as the requested class, and
FD_lenet / KD_lenet against the real images (LeNet features: not comparable with FID; FD at a few hundred samples
is biased upwards and is a ranking, KD is unbiased). Settings: samplers x steps without guidance; then guidance at
matched strength (mean weight 2 over the steps: constant 2, increasing 1 -> 3, oscillating 3/1, classifier guidance
with s = 1, which equals CFG with w = 2 for an exact classifier; autoguidance with w = 2), thresholding at w = 4.

    python benchmarks/knobs.py --ckpt runs/mnist/ckpt.pt --early runs/mnist/ckpt_0000200.pt \
        --classifier runs/mnist_clf/ckpt.pt --n-per-class 20
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data                                                   # noqa: E402
import evaluate                                               # noqa: E402
import checkpoints  # noqa: E402
import sample                                                 # noqa: E402

SOLVERS = [('euler', 10), ('euler', 20), ('heun', 5), ('heun', 10), ('dpmpp_2m', 10), ('dpmpp_2m', 20),
           ('dpmpp_3m', 10), ('unipc_bh2', 10), ('eps_abm', 10)]
GUIDANCE = [('none (w = 1)', ['--guidance', '1']),
            ('CFG constant w = 2', ['--guidance', '2']),
            ('CFG increasing 1 -> 3', ['--guidance', '3', '--guidance-schedule', 'increasing']),
            ('CFG oscillating 3 / 1', ['--guidance', '3', '--guidance-schedule', 'oscillating']),
            ('CFG interval w = 3, sigma in (0.28, 5.42]', ['--guidance', '3', '--guidance-schedule', 'interval']),
            ('autoguidance w = 2 (early checkpoint)', ['--guidance', '2', '--autoguidance', '{early}']),
            ('classifier guidance s = 1', ['--guidance', '1', '--classifier', '{classifier}', '--classifier-scale', '1']),
            ('classifier guidance s = 3', ['--guidance', '1', '--classifier', '{classifier}', '--classifier-scale', '3']),
            ('CFG w = 4', ['--guidance', '4']),
            ('CFG w = 4, static thresholding', ['--guidance', '4', '--threshold', 'static']),
            ('CFG w = 4, dynamic thresholding', ['--guidance', '4', '--threshold', 'dynamic'])]


def flags(extra, sampler='heun', steps=10):
    """sample.py's parsed flags for one setting (the same parser and checks as the command line)."""
    args = sample.parse_args(['--ckpt', 'unused', '--sampler', sampler, '--steps', str(steps)] + extra)
    problems = sample.check_sampling_flags(args)
    if problems:
        raise SystemExit('error: ' + '; '.join(problems))
    return args


def score(images, labels, lenet, ref_feats, ref_stats):
    with torch.no_grad():
        feats, logits = lenet((images + 1) / 2, return_logits=True)
    acc = (logits.argmax(1) == labels).float().mean().item()
    fd = evaluate.frechet_distance(*evaluate.feature_statistics(feats.double().numpy()), *ref_stats)
    kd = evaluate.kid(feats.double().numpy(), ref_feats, num_subsets=50, subset_size=min(len(feats), len(ref_feats)) // 2)
    return acc, fd, kd[0] if isinstance(kd, tuple) else kd


def main(args):
    torch.manual_seed(0)
    net, diffusion, config = checkpoints.load_model(args.ckpt)
    d, trained = config['data'], config['args']
    dataset = data.load_dataset(d['dataset'], data_dir=args.data_dir or trained.get('data_dir'),
                                split=trained.get('split', 'train'), resolution=d['resolution'])
    x, y = dataset.batch(torch.arange(len(dataset)))
    t0 = time.time()
    lenet = evaluate.train_classifier((x + 1) / 2, y, d['num_classes'], steps=args.lenet_steps)
    ref = (x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:args.n_ref]] + 1) / 2
    with torch.no_grad():
        ref_feats = lenet(ref).double().numpy()
    ref_stats = evaluate.feature_statistics(ref_feats)
    print(f'LeNet trained on {len(x)} real images in {time.time() - t0:.0f}s; {args.n_ref} reference images')
    labels = torch.arange(d['num_classes']).repeat_interleave(args.n_per_class)

    def run(name, extra, sampler='heun', steps=10):
        a = flags([e.format(early=args.early, classifier=args.classifier) for e in extra], sampler, steps)
        t = time.time()
        setup = sample.sampling_setup(a, config, diffusion, 'cpu')
        images = sample.generate(net, diffusion, len(labels), checkpoints.sample_shape(config), 'cpu', labels,
                                 d['num_classes'], setup['sampler'], setup['steps'], setup['guidance'], seed=args.seed,
                                 sampler_options=setup['sampler_options'], batch_size=args.batch, sigmas=setup['sigmas'],
                                 guide=setup['guide'])
        acc, fd, kd = score(images, labels, lenet, ref_feats, ref_stats)
        print(f'| {name} | {acc:.3f} | {fd:.1f} | {kd:.4f} | {time.time() - t:.0f} |', flush=True)

    print(f'\n{len(labels)} samples per row ({args.n_per_class} per class), seed {args.seed}; chance {1 / d["num_classes"]:.3f}')
    if args.nfe_sweep:                     # issue 14: the multistep solvers at equal NFE (1 evaluation per step)
        print('\n| solver, NFE (no guidance) | class accuracy | FD_lenet | KD_lenet | seconds |\n| --- | --- | --- | --- | --- |')
        for sampler in ('dpmpp_2m', 'dpmpp_3m', 'ipndm', 'deis_tab', 'unipc_bh2', 'eps_abm'):
            for nfe in args.nfe_sweep:
                run(f'{sampler}, {nfe}', ['--guidance', '1'], sampler, nfe)
        return
    print('\n| sampler, steps (no guidance) | class accuracy | FD_lenet | KD_lenet | seconds |\n| --- | --- | --- | --- | --- |')
    for sampler, steps in SOLVERS:
        run(f'{sampler}, {steps} steps', ['--guidance', '1'], sampler, steps)
    print('\n| guidance (heun, 10 steps) | class accuracy | FD_lenet | KD_lenet | seconds |\n| --- | --- | --- | --- | --- |')
    for name, extra in GUIDANCE:
        if ('{early}' in ' '.join(extra) and not args.early) or ('{classifier}' in ' '.join(extra) and not args.classifier):
            continue
        run(name, extra)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True, help='class-conditional train.py checkpoint')
    p.add_argument('--early', default=None, help='early checkpoint of the same run (train.py --save-early), for autoguidance')
    p.add_argument('--classifier', default=None, help='train.py --task classifier checkpoint, for classifier guidance')
    p.add_argument('--data-dir', default=None, help="default: the run's --data-dir")
    p.add_argument('--n-per-class', type=int, default=20)
    p.add_argument('--n-ref', type=int, default=2000)
    p.add_argument('--batch', type=int, default=100)
    p.add_argument('--lenet-steps', type=int, default=500)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--nfe-sweep', type=int, nargs='*', default=None, metavar='NFE',
                   help='only race the multistep solvers (one evaluation per step) at these NFE, e.g. 5 10 20')
    main(p.parse_args())
