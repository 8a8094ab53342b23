"""
MNIST 16 -> 32 cascade: does noise conditioning augmentation make the SR stage robust to the base model's artefacts?

Ho et al. 2021 (CDM, arXiv:2106.15282) and Saharia et al. 2022 (Imagen, arXiv:2205.11487, Sec. 2.4) report that an
SR stage trained on clean low-resolution images degrades on the base model's samples, and that corrupting the
conditioning image during training (with the level given to the network) fixes it. This script measures that on
MNIST with tiny models on a CPU:

  1. a base model of 16x16 MNIST (area-downsampled), and two SR stages 16 -> 32 of the same U-Net: one trained on
     clean low-res images (aug_dim = 0), one with noise conditioning augmentation, t ~ U[0, max_level];
  2. for a sweep of sampling-time levels t, SR from REAL low-res images (held-out test digits, downsampled) and SR
     from GENERATED low-res images (the base model's samples); FD_lenet / KD_lenet of the 32x32 results against
     held-out real 32x32 digits (evaluate.py; a LeNet trained on the training split provides the features);
  3. a picture (docs/cascade.png): generated 16x16 digits, then their SR by each stage at a few levels.

Baselines in the table: real 32x32 digits (the floor at this sample count), bicubic upsampling of real and of
generated 16x16 images. Data: MNIST test split from ../shared/data/mnist (10,000 digits): the first 8,000 train
every model and the LeNet, the last 2,000 are the held-out reference.

Usage (about 10-20 min on 2 busy CPU cores):
    OMP_NUM_THREADS=2 python benchmarks/cascade.py --data-dir ../shared/data/mnist --out docs/cascade.png
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cascade    # noqa: E402
import data       # noqa: E402
import diffusion  # noqa: E402
import evaluate   # noqa: E402
import samplers   # noqa: E402
import unet       # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default='../shared/data/mnist', help='folder with the MNIST test files')
    p.add_argument('--base-steps', type=int, default=600, help='training steps of the 16x16 base model')
    p.add_argument('--sr-steps', type=int, default=800, help='training steps of each SR stage')
    p.add_argument('--base-width', type=int, default=16, help='channels of the base U-Net\'s first level')
    p.add_argument('--sr-width', type=int, default=8, help='channels of the SR U-Nets\' first level')
    p.add_argument('--batch', type=int, default=32, help='training batch size')
    p.add_argument('--max-level', type=float, default=0.5, help='training augmentation levels t ~ U[0, max-level]')
    p.add_argument('--levels', default='0,0.1,0.2,0.3,0.5', help='sampling-time levels of the augmented stage')
    p.add_argument('--n-eval', type=int, default=300, help='images per table entry')
    p.add_argument('--steps', type=int, default=8, help='Heun steps of every stage (2 * steps - 1 evaluations)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='docs/cascade.png', help='picture of generated digits and their SR')
    return p.parse_args()


# ----------------------------------------------------------------------------------------------------
# Models and training

def make_unet(resolution, width, sr=False, aug_dim=0):
    """A small U-Net, no attention: width -> 2 width channels over two levels (width 16: about 0.18M parameters)."""
    return unet.UNet(in_channels=1, model_channels=width, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(), image_size=resolution, norm_groups=min(8, width // 2),
                     cond_channels=1 if sr else 0, aug_dim=aug_dim)


def train(net, images, steps, batch, seed, condition=None, label=''):
    """EDM preconditioning and loss (diffusion.py), Adam 2e-3, EMA 0.999 with warm-up; condition(x, g) -> keywords."""
    diff = diffusion.Diffusion(schedule='edm', prediction='edm')
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        cond = condition(x, g) if condition else {}
        loss, _ = diff.loss(net, x, generator=g, **cond)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))         # EMA warm-up as in train.py: short runs forget the init
        with torch.no_grad():
            for k, v in net.state_dict().items():
                ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        if step % 250 == 0 or step == steps - 1:
            print(f'  {label} step {step:5d}  loss {loss.mean().item():.4f}  {time.time() - start:6.0f} s', flush=True)
    net.load_state_dict(ema)
    return diff.denoiser(net.eval())


# ----------------------------------------------------------------------------------------------------
# Scoring and the picture

def score(images, lenet, ref_stats):
    feats = evaluate.extract_features(data.to_uint8(images), lenet, batch_size=250, progress=False)
    # KID on subsets of half the samples: the results page's KD_lenet column was measured so (before the KID fix of
    # issue 22 a subset as large as the set was silently halved; it now means the whole set, with std 0).
    m = evaluate.compute_metrics(feats, ref_stats, metrics=('fid', 'kid'), network='lenet',
                                 kid_subset_size=len(feats) // 2, resize='clean')
    return m['FD_lenet'], m['KD_lenet']


def save_rows(rows, names, path, scale=2):
    """Rows of images (each (n, 1, H, W) in [-1, 1], resized to the largest size) with a label in front."""
    size = max(r.shape[-1] for r in rows) * scale
    n, label_w = rows[0].shape[0], 150
    canvas = Image.new('L', (label_w + n * (size + 2), len(rows) * (size + 2)), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (row, name) in enumerate(zip(rows, names)):
        draw.text((4, i * (size + 2) + size // 2 - 5), name, fill=0)
        for j, img in enumerate(data.to_uint8(row)[:, 0].numpy()):
            tile = Image.fromarray(img).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (size + 2), i * (size + 2)))
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    canvas.save(path)


# ----------------------------------------------------------------------------------------------------

def main(args):
    torch.manual_seed(args.seed)
    levels = [float(v) for v in args.levels.split(',')]
    ds = data.load_dataset('mnist', data_dir=args.data_dir, split='test', resolution=32)
    x32 = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])
    train32, held32 = x32[:8000], x32[8000:]
    train16 = cascade.downsample(train32, 16)
    print(f'MNIST: {len(train32)} training, {len(held32)} held-out digits at 32x32')

    # Feature network and reference statistics: LeNet trained on the training split; reference = held-out 1500.
    lenet = evaluate.train_classifier(data.to_uint8(train32), labels[:8000], steps=500, seed=args.seed)
    ref_real, probe_real = held32[:1500], held32[1500:1500 + args.n_eval]
    ref_stats = evaluate.compute_statistics(evaluate.extract_features(data.to_uint8(ref_real), lenet, progress=False),
                                            network='lenet', resize='clean')

    t0 = time.time()
    base = train(make_unet(16, args.base_width), train16, args.base_steps, args.batch, args.seed, label='base 16x16')
    sr_plain = train(make_unet(32, args.sr_width, sr=True), train32, args.sr_steps, args.batch, args.seed + 1,
                     lambda x, g: cascade.training_condition(x, 16, generator=g), label='SR, no aug')
    sr_aug = train(make_unet(32, args.sr_width, sr=True, aug_dim=8), train32, args.sr_steps, args.batch, args.seed + 1,
                   lambda x, g: cascade.training_condition(x, 16, args.max_level, 8, generator=g), label='SR, aug')
    print(f'training: {time.time() - t0:.0f} s')

    sig = samplers.karras_sigmas(args.steps, 0.002, 80.0)
    heun = samplers.sample_heun
    with torch.no_grad():
        base_stage = cascade.Stage(base, (1, 16, 16), heun, sig)
        generated16 = cascade.sample_stage(base_stage, args.n_eval, torch.Generator().manual_seed(args.seed))
        generated16 = generated16.clamp(-1, 1)
        real16 = cascade.downsample(probe_real, 16)
        rows = [('real 32x32 (floor)', probe_real),
                ('bicubic of real 16x16', cascade.upsample(real16, 32).clamp(-1, 1)),
                ('bicubic of generated 16x16', cascade.upsample(generated16, 32).clamp(-1, 1))]
        table, picture = [], {}
        for name, line in rows:
            table.append((name, '-', '-', *score(line, lenet, ref_stats)))
        configs = [('no aug', sr_plain, 0, 0.0)] + [('aug', sr_aug, 8, t) for t in levels]
        for name, denoiser, aug_dim, t in configs:
            stage = cascade.Stage(denoiser, (1, 32, 32), heun, sig, aug_level=t, aug_dim=aug_dim)
            for source, z in (('real', real16), ('generated', generated16)):
                start = time.time()
                out = cascade.super_resolve(stage, z, torch.Generator().manual_seed(args.seed + 7)).clamp(-1, 1)
                fd, kd = score(out, lenet, ref_stats)
                table.append((f'SR {name}', f'{t:g}', source, fd, kd))
                print(f'  SR {name:6s} t={t:<4g} from {source:9s}: FD_lenet {fd:8.2f}  KD_lenet {kd:.4f} '
                      f'({time.time() - start:.0f} s)', flush=True)
                if source == 'generated':
                    picture[(name, t)] = out[:12]

    print(f'\n| stage 2 | level t | low-res from | FD_lenet | KD_lenet |\n|---|---|---|---|---|')
    for name, t, source, fd, kd in table:
        print(f'| {name} | {t} | {source} | {fd:.2f} | {kd:.4f} |')

    shown = [('no aug', 0.0)] + [('aug', t) for t in levels if t in (0.0, 0.2, 0.5)]
    save_rows([generated16[:12]] + [picture[k] for k in shown if k in picture],
              ['generated 16x16'] + [f'SR {n}, t={t:g}' for n, t in shown if (n, t) in picture], args.out)
    print(f'picture: {args.out}')


if __name__ == '__main__':
    main(parse_args())
