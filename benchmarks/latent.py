"""Latent diffusion experiments on the 64x64 Noto emoji: autoencoder reconstruction, and latent vs pixel step speed.

Part 'recon' trains four small f=4 autoencoders for the same number of steps (KL, KL + GAN, VQ, VQ + GAN; L1 +
regulariser [+ PatchGAN hinge loss with VQGAN's adaptive weight, from half-way]) and reports, on held-out emoji
(data.holdout_split: one image in 20), the PSNR of the reconstructions, the VQ codebook usage and perplexity, and
optionally (--fd) the Frechet distance of evaluate.py's LeNet features (FD_lenet; a LeNet trained on the emoji
categories, since the Inception weights are not available offline). No LPIPS: its weights are not available here.

Part 'speed' times one training step (diffusion.Diffusion.loss + backward + Adam) of the same U-Net ('micro')
on 64x64x3 pixels and on the 16x16x3 latents of an f=4 autoencoder, with the latents cached (what train.py
--autoencoder does) and encoded on the fly (the encoder's forward added), and prints images/s.

Part 'score' scores autoencoders trained by train.py --task autoencoder (their EMA weights) on the same held-out
emoji train.py held out (data.holdout_split, seed 0): PSNR, codebook usage and perplexity, and, with --lenet-weights
(a LeNet trained by evaluate.py --train-lenet on labelled emoji), the Frechet distance of its features between the
reconstructions and the originals (a reconstruction FD_lenet, the analogue of latent diffusion's rFID).

Part 'compare' draws the same classes from the same noise seed with a pixel and a latent diffusion checkpoint of
train.py (the latent one decoded through its autoencoder) and writes them side by side (--png): pixel samples left,
latent samples right. Their scores come from evaluate.py itself (see the README's commands).

Short CPU runs (defaults: 150 steps of batch 8 per autoencoder): the numbers rank the variants, they do not
reach the quality of a real training run. Example:
    OMP_NUM_THREADS=2 python benchmarks/latent.py --part recon --steps 150
    OMP_NUM_THREADS=2 python benchmarks/latent.py --part speed
    python benchmarks/latent.py --part score --ckpts runs/ae-kl/ckpt.pt runs/ae-vq/ckpt.pt --lenet-weights lenet.pt \
        --png docs/autoencoders.png
    python benchmarks/latent.py --part compare --ckpts runs/pixel/ckpt.pt runs/latent/ckpt.pt --num 20 \
        --png docs/latent_vs_pixel.png
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import vae  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'shared', 'data')


def psnr(x, x_hat):
    """Peak signal-to-noise ratio of images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE), mean over images."""
    mse = ((x - x_hat.clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse)).mean().item()


def train_autoencoder(kind, gan, train, steps, batch, lr, seed=0):
    torch.manual_seed(seed)
    ae = vae.create_autoencoder(f'{kind}-f4')
    loss_fn = vae.AutoencoderLoss(kind, disc_weight=0.5 if gan else 0.0, disc_start=steps // 2, disc_channels=32)
    opt = torch.optim.Adam(ae.parameters(), lr=lr, betas=(0.5, 0.9))                # LDM/VQGAN's betas
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        x, _ = train.batch(torch.randint(0, len(train), (batch,), generator=g))
        x_hat, reg, _ = ae(x)
        loss, logs = loss_fn.generator_loss(x, x_hat, reg, step, ae.last_layer())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        d_loss, _ = loss_fn.discriminator_loss(x, x_hat, step)
        if d_loss is not None:
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
    return ae.eval(), time.time() - start


@torch.no_grad()
def reconstruct(ae, images, batch=50):
    outs, indices = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        z = ae.encode_raw(x)
        if ae.config['kind'] == 'vq':
            _, _, info = ae.quantizer(z)
            indices.append(info['indices'].flatten())
        outs.append(ae.decode_raw(z).clamp(-1, 1))
    return torch.cat(outs), (torch.cat(indices) if indices else None)


def codebook_stats(indices, size):
    counts = torch.bincount(indices, minlength=size).double()
    p = counts / counts.sum()
    return (counts > 0).double().mean().item(), math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())


def lenet_statistics(images, fd_net):
    """Mean and covariance of evaluate.py's LeNet features of images in [-1, 1]."""
    import evaluate
    return evaluate.feature_statistics(evaluate.extract_features(images * 0.5 + 0.5, fd_net, progress=False))


def score(ae, held_out, fd_net=None, real=None):
    """(reconstructions, PSNR, codebook usage, perplexity, FD_lenet against `real`); None where it does not apply."""
    import evaluate
    x_hat, indices = reconstruct(ae, held_out)
    usage, perplexity = codebook_stats(indices, ae.config['codebook_size']) if indices is not None else (None, None)
    fd = evaluate.frechet_distance(*lenet_statistics(x_hat, fd_net), *real) if fd_net is not None else None
    return x_hat, psnr(held_out, x_hat), usage, perplexity, fd


def cell(value, spec):
    """A table cell: the value formatted, or '-' right-aligned to the same width when it does not apply."""
    return format(value, spec) if value is not None else format('-', '>' + spec.split('.')[0])


def part_recon(args):
    dataset = data.load_dataset('emoji', data_dir=args.data_dir, resolution=64)
    train_index, val_index = data.holdout_split(len(dataset))
    train = data.InMemoryDataset(dataset.images[train_index], dataset.labels[train_index], dataset.class_names)
    held_out, _ = dataset.batch(val_index[:args.held_out])
    fd_net, real = None, None
    if args.fd:
        import evaluate
        x_all, y_all = train.batch(torch.arange(len(train)))
        fd_net = evaluate.train_classifier(x_all * 0.5 + 0.5, y_all, num_classes=dataset.num_classes, steps=300)
        real = lenet_statistics(held_out, fd_net)
    print(f'emoji 64x64: {len(train)} training images, {len(held_out)} held out; {args.steps} steps of batch '
          f'{args.batch}, lr {args.lr}; GAN from step {args.steps // 2}')
    print(f"{'model':10s} {'params':>8s} {'train s':>8s} {'PSNR dB':>8s} {'usage':>6s} {'perplexity':>10s} "
          f"{'FD_lenet':>9s}")
    for kind in ('kl', 'vq'):
        for gan in (False, True):
            ae, seconds = train_autoencoder(kind, gan, train, args.steps, args.batch, args.lr)
            _, psnr_db, usage, perplexity, fd = score(ae, held_out, fd_net, real)
            name = kind + ('+gan' if gan else '')
            print(f"{name:10s} {sum(p.numel() for p in ae.parameters()):8d} {seconds:8.0f} {psnr_db:8.2f} "
                  f"{cell(usage, '6.2f')} {cell(perplexity, '10.1f')} {cell(fd, '9.2f')}", flush=True)


def part_score(args):
    import evaluate
    import checkpoints
    import sample
    dataset = data.load_dataset('emoji', data_dir=args.data_dir, resolution=64)
    _, val_index = data.holdout_split(len(dataset))                     # train.py's split (seed 0)
    held_out, _ = dataset.batch(val_index)
    fd_net, real = None, None
    if args.lenet_weights:
        state = torch.load(args.lenet_weights, map_location='cpu', weights_only=True)
        fd_net = evaluate.lenet_from_state_dict(state, args.lenet_weights)
        real = lenet_statistics(held_out, fd_net)
    print(f'{len(held_out)} held-out emoji 64x64 (data.holdout_split, seed 0)')
    rows = [held_out[:12]]                                              # the figure: originals, then each model's
    print(f"{'checkpoint':40s} {'kind':4s} {'GAN':>4s} {'steps':>6s} {'PSNR dB':>8s} {'usage':>6s} {'perplexity':>10s} "
          f"{'FD_lenet':>9s}")
    for path in args.ckpts:
        ckpt = checkpoints.load_checkpoint(path)                             # the run's flags and step
        ae = checkpoints.load_autoencoder(path)                              # its EMA autoencoder, checked
        x_hat, psnr_db, usage, perplexity, fd = score(ae, held_out, fd_net, real)
        rows.append(x_hat[:12])
        gan = 'yes' if ckpt['args'].get('disc_weight', 0) > 0 else 'no'
        print(f"{path:40s} {ae.config['kind']:4s} {gan:>4s} {ckpt['step']:6d} {psnr_db:8.2f} "
              f"{cell(usage, '6.2f')} {cell(perplexity, '10.1f')} {cell(fd, '9.2f')}", flush=True)
    if args.png:
        sample.save_grid(torch.cat(rows), args.png, nrow=12)
        print(f'wrote {args.png}: held-out originals (top row), then the reconstructions of each checkpoint in order')


def part_compare(args):
    import checkpoints
    import sample
    if len(args.ckpts) != 2 or not args.png:
        raise SystemExit('--part compare needs --ckpts PIXEL_CKPT LATENT_CKPT and --png')
    halves = []
    for path in args.ckpts:
        net, diffusion, config = checkpoints.load_model(path)
        labels = torch.arange(args.num) % config['data']['num_classes']              # every class in turn
        images = sample.generate(net, diffusion, args.num, checkpoints.sample_shape(config), 'cpu', labels=labels,
                                 num_classes=config['data']['num_classes'], sampler='dpmpp_2m', steps=args.sample_steps,
                                 guidance=args.guidance, seed=0, decode=checkpoints.latent_decoder(config))
        halves.append(images)
    rows = [torch.cat([a, torch.ones(1, *a.shape[1:]), b])                           # a white square between
            for a, b in zip(halves[0].split(10), halves[1].split(10))]
    sample.save_grid(torch.cat(rows), args.png, nrow=21)                             # 10 pixel | gap | 10 latent
    print(f'wrote {args.png}: {args.ckpts[0]} (left) and {args.ckpts[1]} (right), the same classes (one per column) '
          f'and seed, DPM-Solver++(2M) {args.sample_steps} steps, guidance {args.guidance}')


def time_steps(net, diffusion, make_batch, steps, batch):
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    for i in range(steps + 1):
        if i == 1:
            start = time.time()                                                  # step 0 warms up
        x0 = make_batch(batch)
        loss, _ = diffusion.loss(net, x0)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
    return steps * batch / (time.time() - start)


def part_speed(args):
    import diffusion as diffusion_module
    import unet
    dataset = data.load_dataset('emoji', data_dir=args.data_dir, resolution=64)
    ae = vae.create_autoencoder('kl-f4').eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    pick = lambda n: dataset.batch(torch.randint(0, len(dataset), (n,), generator=g))[0]  # noqa: E731
    cached = ae.encode(pick(256))
    diffusion = diffusion_module.Diffusion('edm', prediction='edm')
    rows = []
    for label, channels, size, make in (
            ('pixels 64x64x3', 3, 64, pick),
            ('latents 16x16x3, cached', 3, 16, lambda n: cached[torch.randint(0, len(cached), (n,), generator=g)]),
            ('latents 16x16x3, encoded each step', 3, 16, lambda n: ae.encode(pick(n)))):
        torch.manual_seed(0)
        net = unet.create_unet('micro', in_channels=channels, image_size=size)
        rows.append((label, time_steps(net, diffusion, make, args.speed_steps, args.batch)))
    print(f"U-Net 'micro' training step (EDM loss + backward + Adam), batch {args.batch}, "
          f'{args.speed_steps} timed steps, {torch.get_num_threads()} threads')
    for label, rate in rows:
        print(f'  {label:36s} {rate:8.1f} images/s   ({rate / rows[0][1]:.1f}x pixels)')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--part', choices=('recon', 'speed', 'score', 'compare', 'all'), default='all', help='which experiment')
    parser.add_argument('--data-dir', default=DATA_DIR, help='folder holding emoji/noto_emoji_64.npz')
    parser.add_argument('--steps', type=int, default=150, help='training steps per autoencoder')
    parser.add_argument('--batch', type=int, default=8, help='batch size')
    parser.add_argument('--lr', type=float, default=2e-4, help='Adam learning rate of autoencoder and discriminator')
    parser.add_argument('--held-out', type=int, default=100, help='held-out images scored')
    parser.add_argument('--fd', action='store_true', help="also FD_lenet (trains evaluate.py's LeNet on categories)")
    parser.add_argument('--speed-steps', type=int, default=5, help='timed diffusion training steps per setting')
    parser.add_argument('--ckpts', nargs='+', default=[], help="--part score: train.py autoencoder checkpoints")
    parser.add_argument('--lenet-weights', default=None, help='--part score: LeNet of evaluate.py --train-lenet')
    parser.add_argument('--png', default=None, help='--part score/compare: where the figure goes')
    parser.add_argument('--num', type=int, default=40, help='--part compare: samples per model (a multiple of 10)')
    parser.add_argument('--sample-steps', type=int, default=20, help='--part compare: DPM-Solver++(2M) steps')
    parser.add_argument('--guidance', type=float, default=2.0, help='--part compare: CFG weight')
    args = parser.parse_args()
    if args.part in ('score', 'compare'):
        (part_score if args.part == 'score' else part_compare)(args)
        return
    if args.part in ('recon', 'all'):
        part_recon(args)
    if args.part in ('speed', 'all'):
        part_speed(args)


if __name__ == '__main__':
    main()
