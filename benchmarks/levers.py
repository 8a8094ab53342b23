"""
Quality per CPU-second of the default runs (issue 32): train with some flags, then judge the samples.

The judge never saw the diffusion model's training images:
  - MNIST (the shared file is the 10,000 test images): train.py trains on data.holdout_split's training part (9,500
    images for seed 0) and holds out 500 (one in 20, fixed by --seed). The judging LeNet (lenet.train_classifier,
    the network of evaluate.py --train-lenet / FD_lenet) is trained on those 500 held-out images only, with random
    affine jitter (shift, rotation, scale); its accuracy is measured on the 9,500 others (real digits it never saw), and the FD
    reference statistics are its features of the 500 held-out images.
  - shapes: labels are procedural, so fresh draws (split 'test', seeds 1000 and 1001: streams train.py never uses)
    are held out by construction: 10,000 to train the judge, 2,000 to test it and as the FD reference.
Scores, for each guidance weight: the share of samples the judge assigns to the requested class, and FD_lenet (the
Frechet distance of metrics.py, as evaluate.py --network lenet computes it, in the judge's features; not FID). The
samples use the run's own grid sampler and steps (or --sampler/--steps), the same seed in every row.

    python benchmarks/levers.py --ckpt runs/default/ckpt.pt                       # score one run
    python benchmarks/levers.py --train runs/lev_lr --n 300 -- --lr 1e-3 --steps 400  # train (1 thread), then score
    python benchmarks/levers.py --table runs/levers.jsonl                          # the lever table (markdown)

--train runs `python train.py FLAGS --out DIR --no-progress` with OMP_NUM_THREADS=1 and records its process CPU
seconds (user + system of the child, so a shared machine does not distort it); every result is appended to
--jsonl as one line with the command that made it.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data                                                   # noqa: E402
import knobs                                                  # noqa: E402
import metrics                                                # noqa: E402
from checkpoints import load_model, sample_shape              # noqa: E402
from lenet import LeNetFeatures, lenet_from_state_dict, resize_clean       # noqa: E402
from sample import generate                                   # noqa: E402


def jittered(x, g, shift=0.1, angle=0.2, scale=0.1):
    """Each image under a random affine map (shift up to 10% of the side, rotation up to 0.2 rad, scale 1 +- 10%),
    bilinear, the border filled with the background -1: augmentation for a judge trained on few images."""
    n = len(x)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)
    a, s = u(-angle, angle), u(1 - scale, 1 + scale)
    tx, ty = u(-2 * shift, 2 * shift), u(-2 * shift, 2 * shift)
    theta = torch.stack([torch.stack([a.cos() / s, -a.sin() / s, tx], 1), torch.stack([a.sin() / s, a.cos() / s, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode='zeros') - 1


def train_judge(x, y, num_classes, steps=2000, batch=64, seed=0, widths=(16, 32)):
    """lenet.train_classifier's network (2x its widths) and optimiser, with random affine jitter (few images: 500
    for MNIST), the learning rate decayed linearly to 0. Images are resized to the LeNet's 28 px once, up front."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LeNetFeatures(x.shape[1], num_classes, 28, widths=widths)
    x = resize_clean((x + 1) / 2, 28) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        _, logits = model((jittered(x[idx], g) + 1) / 2, return_logits=True)
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model, x, y):
    return (model((x + 1) / 2, return_logits=True)[1].argmax(1) == y).float().mean().item()


def judge_for(config, data_dir, cache_dir='runs/levers_judges'):
    """(judge LeNet, reference FD statistics, description) for this run's dataset and holdout seed (cached)."""
    d, trained = config['data'], config['args']
    seed = trained.get('seed', 0)
    key = f"{d['dataset']}_{d['resolution']}_seed{seed if d['dataset'] == 'mnist' else 'fresh'}"
    path = os.path.join(cache_dir, key + '.pt')
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        return lenet_from_state_dict(saved['state']), (saved['mu'].numpy(), saved['cov'].numpy()), saved['what']
    if d['dataset'] == 'mnist':
        ds = data.load_dataset('mnist', data_dir=data_dir or trained.get('data_dir'), split=trained.get('split', 'test'),
                               resolution=d['resolution'])
        x, y = ds.batch(torch.arange(len(ds)))
        train_index, val_index = data.holdout_split(len(ds), seed)       # exactly train.py's split (runs.load_training_data)
        judge = train_judge(x[val_index], y[val_index].long(), 10)
        test_x, test_y, ref_x = x[train_index], y[train_index].long(), x[val_index]
        what = (f'LeNet on the {len(val_index)} images train.py holds out (seed {seed}), affine jitter; '
                f'accuracy on the {len(train_index)} others')
    elif d['dataset'] == 'shapes':
        fit = data.load_dataset('shapes', split='test', seed=1000, resolution=d['resolution'], num_images=10000)
        test = data.load_dataset('shapes', split='test', seed=1001, resolution=d['resolution'])
        x, y = fit.batch(torch.arange(len(fit)))
        judge = train_judge(x, y.long(), d['num_classes'])
        test_x, test_y = test.batch(torch.arange(len(test)))
        test_y, ref_x = test_y.long(), test_x
        what = 'LeNet on 10,000 freshly drawn shapes (seed 1000), affine jitter; accuracy on 2,000 others (seed 1001)'
    else:
        raise SystemExit(f"error: no held-out judge for {d['dataset']} (mnist and shapes only)")
    acc = accuracy(judge, test_x, test_y)
    what += f': {acc:.4f}'
    with torch.no_grad():
        mu, cov = metrics.feature_statistics(judge((ref_x + 1) / 2).double())
    os.makedirs(cache_dir, exist_ok=True)
    torch.save({'state': judge.state_dict(), 'mu': torch.as_tensor(mu), 'cov': torch.as_tensor(cov), 'what': what}, path)
    print(f'judge: {what}')
    return judge, (mu, cov), what


def score(ckpt, n, guidance, data_dir=None, sampler=None, steps=None, seed=0):
    """{'acc_w': ..., 'fd_w': ...} for each guidance weight w: share classified as requested, FD_lenet."""
    net, diffusion, config = load_model(ckpt)
    d, trained = config['data'], config['args']
    judge, (mu_ref, cov_ref), what = judge_for(config, data_dir)
    labels = torch.arange(n) % d['num_classes']
    sampler, steps = sampler or trained.get('sampler', 'heun'), steps or trained.get('sample_steps', 18)
    options = knobs.parse_sampler_options(trained.get('sampler_opt'))      # as train.py read them for its grids
    out = {'judge': what, 'samples': n, 'sampler': f'{sampler} {steps}'}
    for w in guidance:
        t0 = time.process_time()
        x = generate(net, diffusion, n, sample_shape(config), 'cpu', labels, d['num_classes'], sampler, steps, w,
                     seed=seed, sampler_options=options or None, batch_size=250)
        with torch.no_grad():
            feats, logits = judge((x + 1) / 2, return_logits=True)
        mu, cov = metrics.feature_statistics(feats.double())
        out[f'acc_{w:g}'] = (logits.argmax(1) == labels).float().mean().item()
        out[f'fd_{w:g}'] = float(metrics.frechet_distance(mu, cov, mu_ref, cov_ref))
        out[f'sample_cpu_{w:g}'] = time.process_time() - t0
        print(f"guidance {w:g}: class accuracy {out[f'acc_{w:g}']:.3f}, FD_lenet {out[f'fd_{w:g}']:.2f} ({n} samples, "
              f"{sampler} {steps} steps, {out[f'sample_cpu_{w:g}']:.0f} CPU-s)", flush=True)
    return out


def train(out, flags):
    """Run train.py FLAGS --out OUT on one thread; its process CPU seconds (user + system)."""
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *flags, '--out', out, '--no-progress']
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(out.rstrip('/') + '.txt', 'w') as log:
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=log, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f'trained {out}: {cpu:.0f} CPU-s ({time.time() - t0:.0f} s wall)', flush=True)
    return cpu


def table(path):
    rows = [json.loads(line) for line in open(path)]
    print('| run | flags (beyond the dataset\'s README command) | train CPU-s | acc w=1 | acc w=2 | FD_lenet w=1 | FD_lenet w=2 |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for r in rows:
        print(f"| {r['name']} | `{' '.join(r.get('flags', []))}` | {r.get('train_cpu', float('nan')):.0f} | "
              f"{r.get('acc_1', float('nan')):.3f} | {r.get('acc_2', float('nan')):.3f} | "
              f"{r.get('fd_1', float('nan')):.1f} | {r.get('fd_2', float('nan')):.1f} |")


def main():
    argv = sys.argv[1:]
    flags = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', help='score this checkpoint')
    p.add_argument('--train', metavar='OUT', help='train with the flags after -- into OUT, then score OUT/ckpt.pt')
    p.add_argument('--table', metavar='JSONL', help='print the lever table of these results')
    p.add_argument('--n', type=int, default=500, help='samples per guidance weight (classes in turn)')
    p.add_argument('--guidance', type=float, nargs='+', default=[1.0, 2.0])
    p.add_argument('--sampler', default=None)
    p.add_argument('--steps', type=int, default=None)
    p.add_argument('--data-dir', default=None)
    p.add_argument('--jsonl', default='runs/levers.jsonl')
    p.add_argument('--name', default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.table:
        return table(args.table)
    record = {'name': args.name or os.path.basename((args.train or args.ckpt).rstrip('/')), 'flags': flags}
    if args.train:
        record['train_cpu'] = train(args.train, flags)
        args.ckpt = os.path.join(args.train, 'ckpt.pt')
    if not args.ckpt:
        p.error('give --ckpt, --train OUT -- FLAGS, or --table')
    record.update(score(args.ckpt, args.n, args.guidance, args.data_dir, args.sampler, args.steps))
    record['command'] = ' '.join(['python', 'benchmarks/levers.py'] + argv + (['--'] + flags if flags else []))
    with open(args.jsonl, 'a') as f:
        f.write(json.dumps(record) + '\n')


if __name__ == '__main__':
    main()
