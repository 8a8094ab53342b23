"""
Sample a trained model: `python sample.py --ckpt runs/default/ckpt.pt`.

The checkpoint carries the model configuration and the settings it was trained with (parameterisation, schedule,
image size, classes), so a model is never sampled with settings that do not match its training; sampler, steps,
guidance, class and seed are yours to choose. Writes a PNG grid (videos: one row of frames per sample, and a GIF)
and optionally an .npz of uint8 samples. With --inverse METHOD it instead solves an inverse problem on an image
(inpainting or super-resolution, inverse.py) and writes a strip: measurement, reconstruction, original.

    python sample.py --ckpt runs/mnist/ckpt.pt --sampler dpmpp_3m --steps 20 --class 3 --guidance 2
    python sample.py --ckpt runs/mnist/ckpt.pt --inverse dps --operator sr --image digit.png
"""
import argparse
import os

import numpy as np
import torch

from samplers import SAMPLERS
from train import build_diffusion, build_network, generate, load_checkpoint, save_grid


def load_model(path, device='cpu', use_ema=True):
    """(network in eval mode, Diffusion, config) from a train.py checkpoint; config['args'] holds the run's flags."""
    ckpt = load_checkpoint(path, device)
    config = dict(ckpt['config'], args=ckpt.get('args', {}))
    net = build_network(config).to(device)
    net.load_state_dict(ckpt['ema' if use_ema else 'model'])
    return net.eval().requires_grad_(False), build_diffusion(config), config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Sample a trained diffusion model.', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', required=True, help='checkpoint written by train.py')
    p.add_argument('--out', default=None, help='PNG path; default: next to the checkpoint')
    p.add_argument('--npz', default=None, help='also save the samples as uint8 (N, H, W, C) in this .npz')
    p.add_argument('-n', '--num', type=int, default=64, help='number of samples')
    p.add_argument('--batch', type=int, default=256, help='samples per batch')
    p.add_argument('--sampler', default=None, choices=list(SAMPLERS), help="default: the training run's --sampler")
    p.add_argument('--steps', type=int, default=None, help="noise levels of the Karras schedule; default: the run's --sample-steps")
    p.add_argument('--guidance', type=float, default=None, help="classifier-free guidance weight (1 = none); default: the run's")
    p.add_argument('--class', dest='label', default=None, help="class index or name; default: cycle through all classes ('none': unconditional)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--raw', action='store_true', help='use the raw weights instead of the EMA')
    p.add_argument('--device', default=None, help='default: cuda if available')
    g = p.add_argument_group('inverse problems (inverse.py)')
    g.add_argument('--inverse', default=None, help='method: replacement, pocs, ilvr, ccdf, mcg, reconstruction_guidance, dps')
    g.add_argument('--operator', default='sr', help='sr | inpaint_box | inpaint_random')
    g.add_argument('--factor', type=int, default=4, help='super-resolution factor')
    g.add_argument('--noise-std', type=float, default=0.0, help='measurement noise')
    g.add_argument('--image', default=None, help='image file to measure and reconstruct; default: a held-out dataset image')
    return p.parse_args(argv)


def resolve_label(label, config, n):
    """--class as an index or a class name -> (n,) labels, or None for unconditional / cycling."""
    num_classes, names = config['data']['num_classes'], config['data'].get('class_names') or []
    if not num_classes:
        if label not in (None, 'none'):
            raise SystemExit('error: this model was trained without classes; drop --class')
        return None
    if label is None:
        return torch.arange(n) % num_classes
    if label == 'none':
        return torch.full((n,), num_classes)
    if label in names:
        return torch.full((n,), names.index(label))
    if not label.lstrip('-').isdigit() or not 0 <= int(label) < num_classes:
        raise SystemExit(f'error: --class must be 0..{num_classes - 1}, a class name ({", ".join(names) or "none stored"}) or none')
    return torch.full((n,), int(label))


def save_gif(videos, path):
    """(N, C, F, H, W) in [-1, 1] -> an animated GIF with the N videos side by side."""
    from PIL import Image
    frames = ((videos.clamp(-1, 1) + 1) * 127.5).round().byte()         # (N, C, F, H, W)
    strip = torch.cat(list(frames), dim=-1)                              # (C, F, H, N*W)
    pics = [Image.fromarray(f.permute(1, 2, 0).squeeze(-1).numpy()) for f in strip.transpose(0, 1)]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=150, loop=0)


def run_inverse(args, net, diffusion, config, device):
    """Measure one image, reconstruct it with the chosen method, save measurement | reconstruction | original."""
    import inverse
    from PIL import Image
    if args.inverse not in inverse.INVERSE_METHODS:
        raise SystemExit(f"error: unknown --inverse {args.inverse!r}; choose from {', '.join(inverse.INVERSE_METHODS)}")
    c, r = config['data']['channels'], config['data']['resolution']
    if args.image:
        try:
            img = Image.open(args.image).convert('L' if c == 1 else 'RGB').resize((r, r), Image.BICUBIC)
        except OSError as e:
            raise SystemExit(f'error: cannot read image {args.image!r}: {e}') from None
        x0 = torch.from_numpy(np.asarray(img, dtype=np.float32).reshape(r, r, c)).permute(2, 0, 1)[None] / 127.5 - 1
    else:
        import data
        ds = data.load_dataset(config['data']['dataset'], data_dir=config['args'].get('data_dir'),
                               split=config['args'].get('split', 'train'), resolution=r)
        x0 = ds[0][0][None]
    x0 = x0.to(device)
    g = torch.Generator().manual_seed(args.seed)
    op = inverse.make_operator(args.operator, tuple(x0.shape[1:]), generator=g, noise_std=args.noise_std, factor=args.factor)
    y = op.measure(x0, generator=g)
    from samplers import karras_sigmas
    sigmas = karras_sigmas(args.steps or 50, diffusion.sigma_min, diffusion.sigma_max).to(device)
    cond = {}
    if config['data']['num_classes']:
        cond['y'] = torch.full((1,), config['data']['num_classes'], device=device)      # unconditional
    if config['net'].get('aug_dim'):
        cond['aug_cond'] = torch.zeros(1, config['net']['aug_dim'], device=device)
    denoiser = diffusion.denoiser(net)
    den = (lambda x, sigma, **kw: denoiser(x, sigma, **cond, **kw)) if cond else denoiser
    x = sigmas[0] * torch.randn(x0.shape, generator=g).to(device)
    recon = inverse.INVERSE_METHODS[args.inverse](den, x, sigmas, op, y, generator=g).clamp(-1, 1)
    shown = op.pinv(y).clamp(-1, 1)
    out = args.out or os.path.join(os.path.dirname(args.ckpt), f'inverse_{args.inverse}_{args.operator}.png')
    save_grid(torch.cat([shown, recon, x0]).detach(), out, nrow=3)
    psnr = 10 * torch.log10(4 / ((recon - x0) ** 2).mean()).item()
    print(f'wrote {out} (measurement | reconstruction | original); PSNR {psnr:.2f} dB, '
          f'|A x - y| = {(op.forward(recon) - y).abs().max().item():.3g}')


def main(args):
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    net, diffusion, config = load_model(args.ckpt, device, use_ema=not args.raw)
    trained = config['args']
    if args.inverse:
        return run_inverse(args, net, diffusion, config, device)
    sampler = args.sampler or trained.get('sampler', 'heun')
    steps = args.steps or trained.get('sample_steps', 18)
    guidance = args.guidance if args.guidance is not None else trained.get('guidance', 1.0)
    d = config['data']
    shape = (d['channels'],) + ((d['frames'],) if d.get('frames') else ()) + (d['resolution'], d['resolution'])
    labels = resolve_label(args.label, config, args.num)
    chunks = []
    for start in range(0, args.num, args.batch):
        n = min(args.batch, args.num - start)
        chunks.append(generate(net, diffusion, n, shape, device, None if labels is None else labels[start:start + n],
                               d['num_classes'], sampler, steps, guidance, seed=args.seed + start, progress=True,
                               aug_dim=config['net'].get('aug_dim', 0)).cpu())
    images = torch.cat(chunks)
    out = args.out or os.path.join(os.path.dirname(args.ckpt) or '.', 'samples.png')
    save_grid(images, out, nrow=None if images.ndim == 4 else None)
    if images.ndim == 5:
        save_gif(images[:8], os.path.splitext(out)[0] + '.gif')
    if args.npz:
        arr = ((images + 1) * 127.5).round().byte()
        np.savez_compressed(args.npz, samples=arr.movedim(1, -1).numpy(),
                            labels=(labels.numpy() if labels is not None else np.zeros(0)))
    print(f"wrote {out}: {args.num} samples, {sampler}, {steps} steps, guidance {guidance}"
          + (f', class {args.label}' if args.label is not None else ''))


if __name__ == '__main__':
    main(parse_args())
