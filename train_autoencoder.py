"""
Train the first stage of latent diffusion, an autoencoder: `python train_autoencoder.py --dataset emoji --out runs/ae`
(also `python train.py --task autoencoder ...`). Then `python train.py --autoencoder runs/ae/ckpt.pt` trains
diffusion on its latents, and sample.py decodes them.

The objective is LDM's (Rombach et al. 2022, arXiv:2112.10752, App. G) on VQGAN's (Esser et al. 2021,
arXiv:2012.09841, Sec. 3) GAN recipe, all in vae.AutoencoderLoss:
    L_AE = |x - x_hat|_1 (+ LPIPS(x, x_hat)) + kl_weight KL(q(z|x) || N(0, I))   (or the VQ codebook loss)
           + lambda L_GAN,  lambda = |grad L_rec| / (|grad L_GAN| + 1e-4)      (VQGAN Eq. 7, adaptive weight)
    L_D  = hinge loss of a PatchGAN discriminator on x (real) and x_hat (fake), from --gan-start on.
At the end the latent scale 1 / std(z) is measured on training images (LDM Sec. 4.3.2) and stored in the final
checkpoint's config, so latent diffusion trains on latents of unit variance.

The harness is runs.py's (run folder, exact resume with the discriminator and its optimizer, AMP, DDP, the
gradient-update skeleton); the checkpoint format checkpoints.py's. Imports no training program.
"""
import argparse
import math
import os
import time

import torch
from tqdm import tqdm

import cascade
import checkpoints
import data
import reports
import runs
import sample
import vae

# The loss weights change what an uninterrupted run would do, like the optimisation flags.
RESUME_FLAGS = runs.RESUME_FLAGS + ('kl_weight', 'codebook_weight', 'disc_weight', 'gan_start')


def train_step(run, gan, micro_batches, args):
    """One step of the first-stage objective: the autoencoder on L_AE, the discriminator on L_D from the same
    reconstructions (detached inside vae.AutoencoderLoss), both through runs.gradient_step. The discriminator's
    optimizer steps only once the GAN loss is on (--gan-start): before that its gradients are zero.
    Returns [(loss, logs)] per micro-batch, or None when the step was skipped."""
    def loss(b):
        x_hat, reg, info = run.model(b['x0'])
        g_loss, logs = gan.generator_loss(b['x0'], x_hat, reg, run.step, run.net.last_layer())
        d_loss, d_logs = gan.discriminator_loss(b['x0'], x_hat, run.step)
        logs.update(d_logs, **{k: float(v) for k, v in info.items() if k in ('perplexity', 'usage')})
        # One backward of the sum: the discriminator's loss sees only detached reconstructions.
        return g_loss + (d_loss if d_loss is not None else 0), g_loss.reshape(1), logs
    gan_optimizer = run.extras['gan_optimizer']
    return runs.gradient_step(run, micro_batches, args, loss, gan_optimizer, step_extra=gan.gan_active(run.step))


def main(args):
    # Setup: flags, processes, run folder; the data and its held-out images (PSNR, reconstruction grids).
    runs.check_flags(args, check_autoencoder_args)
    setup = runs.start_run(args)
    device, is_main = setup.device, setup.is_main
    dataset, train_index, val_index = runs.load_training_data(args)
    name, net = checkpoints.autoencoder_config(args, dataset)
    config = checkpoints.make_config('autoencoder', 'autoencoder', name, net, checkpoints.data_config(args.dataset, dataset))

    # Setup model: the autoencoder and its EMA, Adam with betas (0.5, 0.9) as LDM/VQGAN (momentum fights the
    # discriminator's moving target), and the loss module holding the PatchGAN discriminator with its own Adam.
    gan = build_loss(args, config, device)
    gan_optimizer = torch.optim.Adam(gan.discriminator.parameters(), lr=args.lr, betas=(0.5, 0.9))
    run = runs.make_trainee(args, vae.Autoencoder(**net), vae.Autoencoder(**net), setup, betas=(0.5, 0.9),
                            extras={'discriminator': gan.discriminator, 'gan_optimizer': gan_optimizer})
    if setup.resume:
        runs.resume_run(run, config, args, setup, RESUME_FLAGS)
    last_good, log = runs.saved_step(run, setup), runs.open_log(run, setup, args)
    if is_main:
        print(f"autoencoder '{name}' {sum(p.numel() for p in run.net.parameters()) / 1e6:.2f}M parameters, "
              f'downsampling {run.net.downsample_factor}; {args.dataset}: {len(train_index)} training images; '
              f'device {device}, {setup.world} process(es), AMP {run.amp_dtype or "off"}')

    batches = runs.training_batches(args, dataset, train_index, setup.rank, setup.micro_batch, run.step)
    held_out = runs.load_batch(dataset, val_index[:256] if len(val_index) else train_index[:32])[0] if is_main else None
    tracker = LossParts()
    bar = tqdm(total=args.steps, initial=run.step, disable=not is_main or args.no_progress, desc='train', dynamic_ncols=True)

    while run.step < args.steps:
        # Train: one step of both objectives, on micro-batches of images (the labels are not used).
        lr = runs.get_lr(run.step, args)
        runs.set_lr([run.optimizer], lr)                        # the discriminator keeps --lr throughout
        micro = [{'x0': next(batches)[0].to(device)} for _ in range(args.grad_accum)]
        losses = train_step(run, gan, micro, args)
        run.step += 1
        bar.update(1)
        if losses is not None:
            tracker.add(losses)
        done = run.step == args.steps

        # Log: the loss parts (rec, reg, g_loss, d_loss, gan_weight, VQ perplexity/usage), the held-out PSNR.
        if is_main and (run.step % args.log_every == 0 or done) and tracker.steps:
            reports.log_losses(log, bar, tracker, run, lr, args, key='loss_parts')
        if is_main and args.val_every and (run.step % args.val_every == 0 or done):
            log.write({'step': run.step, 'val_psnr': held_out_psnr(run.ema, held_out, device)})

        # Save checkpoint: the last one carries the latent scale, measured now on the EMA model.
        if done:
            scale = measure_latent_scale(run, config, dataset, train_index, device)
            bar.write(f'step {run.step}: latent scale factor {scale:.5g} (1 / std of the latents)')
        if run.step % args.ckpt_every == 0 or done:
            last_good = runs.save_checkpoint(run, config, args, setup, last_good)

        # Reconstruction grid: originals and their EMA reconstructions in alternate rows.
        if is_main and ((args.sample_every and run.step % args.sample_every == 0) or done):
            reconstruction_grid(run.ema, held_out, os.path.join(args.out, f'samples_{run.step:07d}.png'), device)
    bar.close()
    final = os.path.join(args.out, f'samples_{run.step:07d}.png')
    if is_main and not os.path.exists(final):                       # a kill after the last checkpoint
        reconstruction_grid(run.ema, held_out, final, device)
    runs.finish_run(run, setup, log)
    return run.net, run.ema


def build_loss(args, config, device):
    """vae.AutoencoderLoss: L1 (+ LPIPS when its weights are here) + KL / VQ loss + PatchGAN from --gan-start."""
    import lpips                                   # the perceptual loss network (LPIPS-VGG) with its weights
    perceptual = None
    if args.lpips != 'off':
        try:   # 'auto': use the weights if they are on this machine, never download; a folder must hold them
            perceptual = lpips.load_lpips(None if args.lpips == 'auto' else args.lpips, device, download=False)
        except FileNotFoundError as e:
            if args.lpips != 'auto':
                raise SystemExit(f'error: {e}') from None
            print('LPIPS weights not found: training with L1 + GAN (see lpips.find_lpips_weights to add them)')
    # KL models weigh their KL term, VQ models their codebook loss: one weight flag each.
    kind = config['net']['kind']
    # PatchGAN depth: 3 strided layers (70x70 patches) from 32x32 up; fewer on smaller images, which they would
    # shrink below the 4x4 kernels
    layers = max(1, min(3, int(math.log2(config['data']['resolution'])) - 2))
    return vae.AutoencoderLoss(kind, args.kl_weight if kind == 'kl' else args.codebook_weight, args.disc_weight,
                               args.gan_start, perceptual, in_channels=config['net']['in_channels'],
                               disc_layers=layers).to(device)


class LossParts:
    """Means of the loss parts since the last log line; the add/summary/reset/steps interface of
    reports.LossByNoiseLevel."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.counts, self.steps, self.step_loss, self.started = {}, {}, 0, 0.0, time.time()

    def add(self, losses):
        for loss, logs in losses:
            for k, v in logs.items():
                self.sums[k], self.counts[k] = self.sums.get(k, 0.0) + v, self.counts.get(k, 0) + 1
        self.steps += 1
        self.step_loss += torch.stack([l.mean() for l, _ in losses]).mean().item()

    def summary(self):
        return self.step_loss / max(self.steps, 1), {k: round(self.sums[k] / self.counts[k], 5) for k in self.sums}


@torch.no_grad()
def held_out_psnr(ema, images, device):
    """PSNR (dB) of the EMA autoencoder's reconstructions of held-out images (cascade.psnr, range 2 of [-1, 1])."""
    x = images.to(device)
    # Raw (unscaled) latents: the reconstruction does not depend on the latent scale.
    x_hat = ema.decode_raw(ema.encode_raw(x)).clamp(-1, 1)
    return cascade.psnr(x_hat, x).mean().item()


@torch.no_grad()
def reconstruction_grid(ema, images, path, device):
    """Originals and their reconstructions in alternate rows (8 per row)."""
    x = images[:32].to(device)
    x_hat = ema.decode_raw(ema.encode_raw(x)).clamp(-1, 1)
    rows = [t for i in range(0, len(x), 8) for t in (x[i:i + 8], x_hat[i:i + 8])]
    sample.save_grid(torch.cat(rows).cpu(), path, nrow=8)


@torch.no_grad()
def measure_latent_scale(run, config, dataset, train_index, device):
    """The latent scale (1 / std of the EMA model's latents on up to 1024 training images, LDM Sec. 4.3.2), set in
    the EMA and raw models and in config['net'], so the final checkpoint carries it."""
    # 1024 images estimate a standard deviation to about 2%, plenty for a scale factor.
    index = train_index[:1024]
    batches = (runs.load_batch(dataset, index[i:i + 256])[0].to(device) for i in range(0, len(index), 256))
    scale = vae.compute_latent_scale(run.ema, batches)
    for model in (run.ema, run.net):
        model.set_latent_scale(**scale)
    config['net'] = dict(run.ema.config)
    return scale['scale_factor']


# ----------------------------------------------------------------------------------------------------
# Command line: runs.py's shared flags plus the autoencoder's.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train an autoencoder (the first stage of latent diffusion).',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    runs.add_run_flags(p)
    g = p.add_argument_group('autoencoder (vae.py)')
    g.add_argument('--vae-config', default=None, help=f"configuration: {', '.join(vae.AUTOENCODER_CONFIGS)} (default kl-f4, vq-f4 with --vq)")
    g.add_argument('--vq', action='store_true', help='VQ regularisation (VQGAN codebook) instead of the KL term')
    # None = not given: a weight given for the other regulariser is refused (check_autoencoder_args sets the defaults).
    g.add_argument('--kl-weight', type=float, default=None, help='KL weight of a KL autoencoder (LDM: 1e-6, the default)')
    g.add_argument('--codebook-weight', type=float, default=None, help='VQ loss weight of a VQ autoencoder (VQGAN: 1, the default)')
    g.add_argument('--disc-weight', type=float, default=0.5, help='scale of the adaptive GAN weight, VQGAN Eq. 7 (0 = no GAN)')
    g.add_argument('--gan-start', type=int, default=None, help='first step with the GAN loss (default: half of --steps)')
    g.add_argument('--lpips', default='auto', help="LPIPS weights folder, 'auto' (use them if on this machine) or 'off'")
    return p.parse_args(argv)


def check_autoencoder_args(args, need):
    """The autoencoder's flags: the ranges of its weights, a known configuration, the GAN's start."""
    finite = lambda v: v is not None and math.isfinite(v)
    for flag in ('kl_weight', 'codebook_weight', 'disc_weight'):
        value = getattr(args, flag)
        need(value is None or (finite(value) and value >= 0), f"--{flag.replace('_', '-')} must be a finite number >= 0 (got {value})")
    need(args.vae_config is None or args.vae_config in vae.AUTOENCODER_CONFIGS,
         f"--vae-config {args.vae_config!r} is not a vae.py configuration; choose from {', '.join(vae.AUTOENCODER_CONFIGS)}")
    # The regulariser is the configuration's kind (KL or VQ); a flag of the other kind would do nothing.
    kind = vae.AUTOENCODER_CONFIGS.get(args.vae_config, {}).get('kind', 'vq' if args.vq else 'kl')
    need(not (args.vq and kind == 'kl'), f'--vq asks for a VQ autoencoder but --vae-config {args.vae_config} is a KL one; '
                                         'give a vq configuration, or drop --vq')
    kind = 'vq' if args.vq else kind
    need(args.kl_weight is None or kind == 'kl', '--kl-weight applies to a KL autoencoder; this one is VQ (--codebook-weight)')
    need(args.codebook_weight is None or kind == 'vq', '--codebook-weight applies to a VQ autoencoder (--vq); this one is KL (--kl-weight)')
    args.kl_weight = 1e-6 if args.kl_weight is None else args.kl_weight
    args.codebook_weight = 1.0 if args.codebook_weight is None else args.codebook_weight
    # The GAN loss starts at --gan-start (vae.AutoencoderLoss.gan_active: step >= start): it needs a GAN and a step
    # the run reaches.
    if args.gan_start is not None:
        need(args.gan_start >= 0, f'--gan-start must be 0 or more (got {args.gan_start})')
        need(args.disc_weight != 0, '--gan-start applies to the GAN loss; --disc-weight 0 turns it off')
        need(args.gan_start < args.steps, f'--gan-start {args.gan_start} is not below --steps {args.steps}: the GAN would never start')
    args.gan_start = args.steps // 2 if args.gan_start is None else args.gan_start
    # The autoencoder is a 2-D network: videos would reach its first convolution as 5-D tensors.
    need(not data.is_video_dataset(args.dataset), f'{args.dataset} holds videos; the autoencoder trains on images')


if __name__ == '__main__':
    runs.run_command(main, parse_args)
