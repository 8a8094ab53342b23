"""
Train a diffusion model: `python train.py` on a laptop CPU, `torchrun --nproc_per_node=8 train.py ...` on GPUs.

The loop is the one every paper uses (Ho et al. 2020, arXiv:2006.11239, Alg. 1; Karras et al. 2022,
arXiv:2206.00364, Sec. 5), in `train_step`:
    x0 ~ data,  sigma ~ p_train(sigma),  noise ~ N(0, I)
    gradient step on  E || F(c_in (x0 + sigma noise), c_noise(sigma)) - target(x0, noise, sigma) ||^2
(diffusion.Diffusion.loss: each parameterisation's own target; Karras et al. 2022, Eq. 8), then an EMA of the
weights with a warm-up. Around it: label dropout (p_uncond = 0.1) so one network is both conditional and
unconditional (Ho & Salimans 2022, arXiv:2207.12598); augmentation whose labels go to the network (Karras et al.
2022, App. C.4); two kinds of diffusion with a condition: a super-resolution stage of a cascade (--task superres:
the low-res image in x_cond, cascade.py) and latent diffusion (--autoencoder CKPT: the latents of a trained
autoencoder, vae.py); and joint video-image training for video models (--image-share, video.py).

Where things are. This file: the flags, Algorithm 1 (train_step), the loop (main) and the batches that feed it.
  runs.py         a run you can trust: run folder, atomic writes, resume and RNG state, checkpoints that are never
                  replaced by a blown-up model, the JSON-lines log, DDP and AMP, the gradient-update skeleton
  checkpoints.py  the checkpoint format (the config every checkpoint carries), written and read in one place
  reports.py      what a run reports besides its loss: grids, held-out loss, KID/FD, memorisation, bits/dim
  video.py        the video paper's joint video-image batches
  edm2_recipe.py  --recipe edm2 / --model edm2-*: EDM2's loss, lr, Adam, post-hoc EMA snapshots (edm2.py, posthoc_ema.py)
Other objectives are their own short programs over the same harness, as guided-diffusion's image_train.py /
classifier_train.py share train_util.py: train_autoencoder.py (the first stage of latent diffusion) and
train_classifier.py (the noise-conditional classifier of classifier guidance). `python train.py --task
autoencoder|classifier ...` runs them. Nothing imports this file.
"""
import argparse
import math
import os
import runpy
import sys

import torch
from tqdm import tqdm

import cascade
import checkpoints
import data
import edm2_recipe
import knobs
import reports
import runs
import video
from augment import AUG_DIM, AugmentPipe
from dit import DIT_CONFIGS
from edm2 import EDM2_CONFIGS
from samplers import SAMPLERS
from unet import UNET_CONFIGS

TASKS = ('diffusion', 'superres', 'autoencoder', 'classifier', 'discrete')   # the last three: train_<task>.py
# A DiT trains best on the CPU with a smaller batch, a higher learning rate and more (cheaper) steps than the U-Net's
# defaults: at ~1000 process-CPU s on MNIST 0.683 / 0.953 class accuracy (unguided / guidance 2) against 0.320 / 0.593
# at the U-Net's 2000 x 64, lr 2e-3 (docs/RESULTS.md, "DiT on the CPU").
DIT_RUN_DEFAULTS = {'steps': 4500, 'batch_size': 32, 'lr': 4e-3}
# Flags that change what an uninterrupted run would have done: a resume with other values is not exact.
RESUME_FLAGS = runs.RESUME_FLAGS + ('p_uncond', 'aug_p', 'overfit_batch') + edm2_recipe.RESUME_FLAGS


# ----------------------------------------------------------------------------------------------------
# Algorithm 1.

def train_step(run, micro_batches, args):
    """One optimizer step of Ho et al. 2020, Alg. 1 (in the sigma frame of Karras et al. 2022, Sec. 5).

    micro_batches: one dict per gradient-accumulation step with x0 (on the device), cond (the network's
    conditioning), generator (for sigma and noise) and, in --overfit-batch mode, fixed sigma and noise.
    Returns the per-sample (loss, sigma) of every micro-batch, or None when the step was skipped."""
    def loss(b):
        # sigma ~ p_train, noise ~ N(0, I), loss = ||F - target||^2 per sample (Alg. 1 lines 2-5); reweighted by
        # the importance sampler inside Diffusion.loss when --t-sampler importance.
        per_sample, sigma = run.diffusion.loss(run.model, b['x0'], b.get('sigma'), b.get('noise'),
                                               generator=b['generator'], **b['cond'])
        # The mean loss, or under --recipe edm2 EDM2's Eq. 21: weighted by the learned uncertainty u(sigma).
        return edm2_recipe.objective(run, per_sample, sigma, args), per_sample, sigma.detach()
    # Accumulate over micro-batches, skip a non-finite step, clip, Adam, EMA (Alg. 1 line 5): runs.gradient_step,
    # the one update every training program shares.
    return runs.gradient_step(run, micro_batches, args, loss)


# ----------------------------------------------------------------------------------------------------
# The main function, phase by phase (as DiT's train.py).

def main(args):
    # Setup: every flag checked before anything slow; processes and device; the run folder (refused if it holds
    # another run); the dropout RNG seeded seed + rank (its state is saved with every checkpoint).
    check_args(args)
    setup = runs.start_run(args)
    device, is_main = setup.device, setup.is_main

    # Setup data: the training set (streamed from disk when large) and a held-out split whose loss shows
    # memorisation. Latent diffusion encodes every image once, here, and trains on the cached latents.
    dataset, train_index, val_index = runs.load_training_data(args)
    pixels, latents = dataset, (encode_dataset(args, dataset, device) if args.autoencoder else None)

    # Setup model: the config is everything sample.py needs to rebuild the model (checkpoints.py). Network, EMA,
    # Diffusion, Adam and the AMP scaler; a resume restores each of them exactly, or refuses.
    config = make_config(args, dataset, latents)
    dataset = latents[0] if latents else dataset
    run = runs.make_trainee(args, checkpoints.build_network(config), checkpoints.build_network(config), setup,
                            checkpoints.build_diffusion(config), betas=edm2_recipe.adam_betas(args))
    if getattr(run.diffusion, 'parameters', None) and run.diffusion.parameters():   # VDM's learned schedule (vdm.py)
        run.optimizer.add_param_group({'params': run.diffusion.to(setup.device).parameters()})
    # EDM2 (edm2_recipe.py): weights re-normalised after each step; the post-hoc EMAs, a state the resume restores.
    posthoc = edm2_recipe.setup(run, args)
    if setup.resume:
        runs.resume_run(run, config, args, setup, RESUME_FLAGS)
    edm2_recipe.set_aside_stale_snapshots(args, setup, run.step)
    last_good = runs.saved_step(run, setup)     # the step ckpt.pt holds (0: none yet): a blow-up never replaces it
    log = runs.open_log(run, setup, args)
    if is_main:
        describe_run(args, config, run, dataset, train_index, val_index, setup)

    # Setup batches: each step's images from the (seed, step, rank) generators, streamed by the loader, so a
    # resumed run reads exactly the images an uninterrupted one would have.
    batches = training_batches(args, dataset, train_index, setup, run)
    augment_pipe = AugmentPipe(p=args.aug_p) if args.aug_p > 0 else None

    # Setup reports (rank 0): fixed held-out and training batches (their loss gap is memorisation), the watcher,
    # in-training KID/FD against the training images, an SR stage's probe images, the loss per noise level.
    held_out = train_probe = eval_state = probe = None
    if is_main and args.val_every:
        held_out = reports.held_out_batch(dataset, val_index, run.diffusion, config)
        if held_out is not None:
            train_probe = reports.held_out_batch(dataset, train_index, run.diffusion, config, quiet=True)
    watcher = reports.Watcher(args.until_converged, args.converge_margin)
    if is_main and args.eval_every:
        eval_state = reports.setup_evaluation(args, pixels, train_index, config, device)
    if is_main and args.task == 'superres':
        probe = runs.load_batch(dataset, (val_index if len(val_index) else train_index)[:8])
    tracker = reports.LossByNoiseLevel(run.diffusion.sigma_min, run.diffusion.sigma_max)
    # Every rank checks, before each checkpoint, that the weights still give a finite loss on 16 fixed images.
    fixed = reports.held_out_batch(dataset, train_index[:16], run.diffusion, config, quiet=True)
    probe_loss = lambda net: reports.fixed_batch_loss(net, run.diffusion, fixed, device)
    bar = tqdm(total=args.steps, initial=run.step, disable=not is_main or args.no_progress, desc='train', dynamic_ncols=True)

    while run.step < args.steps:
        # Train: set the learning rate (warm-up, then cosine), then one step of Algorithm 1 on this step's
        # micro-batches. A step whose loss is not finite is skipped (no update) and counted.
        lr = edm2_recipe.get_lr(run.step, args)        # --recipe edm2: inverse-sqrt decay after a ramp-up
        runs.set_lr([run.optimizer], lr)
        losses = train_step(run, micro_batches(args, config, batches, run.step, setup.rank, augment_pipe, device), args)
        run.step += 1
        bar.update(1)
        if losses is not None:
            tracker.add(losses)
            edm2_recipe.after_step(run, args, setup, config, posthoc)   # post-hoc EMA update and snapshots
        done = run.step == args.steps

        # Log: mean loss, loss per noise level, throughput; the held-out loss and the memorisation watcher;
        # KID/FD when asked (--until-converged may end the run here: args.steps becomes this step).
        if is_main and (run.step % args.log_every == 0 or done) and tracker.steps:
            reports.log_losses(log, bar, tracker, run, lr, args)
        if held_out is not None and (run.step % args.val_every == 0 or done):
            log.write(reports.held_out_record(run, held_out, train_probe, watcher, device, bar))
        if eval_state is not None and (run.step % args.eval_every == 0 or done):
            done = reports.evaluate_and_watch(args, run, config, eval_state, watcher, log, bar, device) or done

        # Save checkpoint: only weights known to be good replace the previous checkpoint (runs.save_checkpoint
        # refuses non-finite or exploded weights, weights that no longer compute, and saving while steps are
        # being skipped; it says which step ckpt.pt still holds).
        if run.step % args.ckpt_every == 0 or done or run.step == args.save_early:
            last_good = runs.save_checkpoint(run, config, args, setup, last_good, probe_loss)

        # Sample grid: a picture of the EMA model now, always from the same seed, so successive grids show the
        # same noise maturing.
        if is_main and ((args.sample_every and run.step % args.sample_every == 0) or done):
            write_grid(run, config, args, probe, run.step, device, bar)
    bar.close()

    # Finish: the final grid if a kill interrupted it after the last checkpoint; bits/dim and the memorisation
    # report; the DDP replica check; a run that ended on skipped (non-finite) steps fails loudly.
    if is_main and not os.path.exists(os.path.join(args.out, f'samples_{run.step:07d}.png')):
        write_grid(run, config, args, probe, run.step, device, bar)
    if is_main:
        reports.final_reports(args, run, config, dataset, train_index, val_index, log, device)
    runs.finish_run(run, setup, log, last_good)
    return run.net, run.ema


def write_grid(run, config, args, probe, step, device, bar):
    """samples_STEP.png of the EMA model: class rows of samples, or an SR stage's upsampling of the probe images."""
    path = os.path.join(args.out, f'samples_{step:07d}.png')
    if config['task'] == 'superres':
        reports.superres_grid(run.ema.eval(), run.diffusion, config, args, probe, path, device)
    else:
        reports.sample_grid(run.ema.eval(), run.diffusion, config, args, path, device)
    bar.write(f'step {step}: wrote {path}')


def describe_run(args, config, run, dataset, train_index, val_index, setup):
    """One line at the start: model, size, data, diffusion settings, device, processes, precision."""
    print(f"{config['model']} '{config['config_name']}' {sum(p.numel() for p in run.net.parameters()) / 1e6:.2f}M "
          f"parameters; {args.dataset}: {len(train_index)} training + {len(val_index)} held-out images "
          f"{dataset.channels}x{dataset.resolution}x{dataset.resolution}, {config['data']['num_classes']} classes; "
          f"{config['diffusion']}; device {setup.device}, {setup.world} process(es), AMP {run.amp_dtype or 'off'}")


# ----------------------------------------------------------------------------------------------------
# The batches: which images, then what the network is told about them.

def training_batches(args, dataset, train_index, setup, run):
    """Iterator over the micro-batches from run.step on: (x0, y) from the loader, or --overfit-batch's fixed dict.
    Joint video-image training loads, after each batch's videos, the clips its images come from (video.py)."""
    if args.overfit_batch:
        return overfit_batches(args, dataset, train_index, run.diffusion, setup.micro_batch, setup.rank)
    k = video.joint_image_count(args.image_share, getattr(dataset, 'frames', 0))
    conditional = bool(dataset.num_classes) and not args.unconditional
    more = (lambda index, g: video.image_sources(dataset.labels if conditional else None, train_index, index, k, g,
                                                 conditional)) if k else None
    return runs.training_batches(args, dataset, train_index, setup.rank, setup.micro_batch, run.step, more)


def overfit_batches(args, dataset, train_index, diffusion, micro_batch, rank):
    """--overfit-batch: the same images, noise levels and noise at every step, so the loss must go to ~0."""
    # Drawn once, from the step-0 generators, so the overfit batch is the same on every resume.
    g = runs.step_generator(args, 0, rank, stream=0)
    x0, y = runs.load_batch(dataset, train_index[torch.randint(len(train_index), (micro_batch,), generator=g)])
    sigma = diffusion.sample_sigma(micro_batch, g)[0]
    fixed = {'x0': x0, 'y': y, 'sigma': sigma, 'noise': torch.randn(x0.shape, generator=g)}
    while True:
        yield fixed


def micro_batches(args, config, batches, step, rank, augment_pipe, device):
    """The dicts train_step consumes for one step: images, conditioning and the generator of each micro-batch."""
    out = []
    for micro in range(args.grad_accum):
        # The loader gives (x0, y); the overfit mode gives a dict that also fixes sigma and noise.
        b = next(batches)
        fixed = b if isinstance(b, dict) else {'x0': b[0], 'y': b[1]}
        video_frames = None
        if args.image_share:    # joint video-image batch; the frames picked by a generator of its own (not stream 1)
            k = video.joint_image_count(args.image_share, config['data']['frames'])
            g_frames = torch.Generator().manual_seed(runs.step_generator(args, step, rank, micro).initial_seed() + 2 ** 62)
            fixed['x0'], fixed['y'], video_frames = video.joint_video_image_batch(fixed['x0'], fixed['y'], k, g_frames)
        # Stream 1 of the same (seed, step, rank, micro): augmentation, label dropout, sigma and noise.
        g = runs.step_generator(args, step, rank, micro, stream=1)
        x0, cond = condition_batch(args, config, fixed['x0'], fixed['y'], g, augment_pipe, device)
        if video_frames is not None:
            cond['num_video_frames'] = video_frames                   # the temporal attention mask (unet.py)
        out.append({'x0': x0, 'cond': cond, 'generator': g})
        if 'sigma' in fixed:
            out[-1].update(sigma=fixed['sigma'].to(device), noise=fixed['noise'].to(device))
    return out


def condition_batch(args, config, x0, y, g, augment_pipe, device):
    """The network's conditioning for one micro-batch: augmentation labels, an SR stage's low-res image, class
    labels with dropout. The generator g is this micro-batch's stream 1: the same draws on every resume."""
    cond = {}
    if augment_pipe is not None:
        x0, aug_cond = augment_pipe(x0, generator=g)                 # ADA-style, labels to the net (EDM App. C.4)
        cond['aug_cond'] = aug_cond.to(device)
    if config.get('superres'):
        # cascade.py: x0 area-downsampled to --low-res and upsampled into x_cond; with --noise-aug-max > 0 it is
        # first corrupted at a random level t ~ U[0, max] that the network also sees (aug_cond).
        sr = config['superres']
        sr_cond = cascade.training_condition(x0, sr['low_res'], sr['noise_aug_max'], sr['aug_dim'], generator=g,
                                             mode=sr['upsample'])
        cond.update({k: v.to(device) for k, v in sr_cond.items()})
    if config['data']['num_classes']:
        # label dropout (Ho & Salimans 2022): the "no class" index num_classes with probability p_uncond
        drop = torch.rand(len(y), generator=g) < args.p_uncond
        cond['y'] = torch.where(drop, torch.full_like(y, config['data']['num_classes']), y).to(device)
    return x0.to(device), cond


# ----------------------------------------------------------------------------------------------------
# The model's config, and the latents of latent diffusion (the autoencoder of --autoencoder, encoded once).

def make_config(args, dataset, latents=None):
    """The config stored in every checkpoint (checkpoints.py): the U-Net/DiT sized for the images (or the latents),
    an SR stage's conditioning, the latent record, the diffusion settings, the data."""
    num_classes = 0 if args.unconditional else dataset.num_classes
    extra = {'autoencoder': latents[1]} if latents else {}
    if args.task == 'superres':                   # cascade.py: the low-res image in x_cond, its noise level in aug_cond
        name, net, extra['superres'] = checkpoints.superres_config(args, dataset, num_classes)
    else:
        name, net = checkpoints.network_config(args, latents[0] if latents else dataset, num_classes,
                                               AUG_DIM if args.aug_p > 0 else 0)
    # --objective hybrid/vlb: 2C outputs (eps and iDDPM's v); --vdm-fourier: Fourier features as x_cond channels
    diffusion = checkpoints.diffusion_config(args)
    net = checkpoints.objective_network(net, args.model, dataset.channels, diffusion)
    data = dict(checkpoints.data_config(args.dataset, dataset), num_classes=num_classes)   # 0 with --unconditional
    model = 'edm2' if args.model in EDM2_CONFIGS else args.model      # the class; the EDM2 size is the config name
    return checkpoints.make_config(args.task, model, name, net, data, diffusion, **extra)


class LatentDataset:
    """The training images replaced by their scaled latents (float), with the same labels and batch() interface."""
    streaming = False

    def __init__(self, latents, labels, class_names):
        self.latents, self.labels = latents, labels                   # (N, c, h, w) float, (N,) long
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.channels, self.resolution = latents.shape[1], latents.shape[-1]

    def __len__(self):
        return len(self.latents)

    def batch(self, index):
        return self.latents[index], self.labels[index]


@torch.no_grad()
def encode_dataset(args, dataset, device, chunk=256):
    """(LatentDataset, config['autoencoder'] record): every image through the frozen autoencoder of --autoencoder,
    once, before training (the posterior mean, scaled by its recorded latent scale; LDM Sec. 4.3.2). The encoder
    then costs nothing per step, and every step of a resumed run sees the same latents."""
    ae = checkpoints.load_autoencoder(args.autoencoder, device)
    edm2_recipe.normalise_latents(args, ae, dataset, device)     # --latent-norm channel: EDM2's per-channel scale
    if dataset.channels != ae.config['in_channels'] or dataset.resolution % ae.downsample_factor:
        raise SystemExit(f"error: --autoencoder {args.autoencoder} takes {ae.config['in_channels']}-channel images "
                         f'with sides divisible by {ae.downsample_factor}; {args.dataset} has {dataset.channels} '
                         f'channels at {dataset.resolution}x{dataset.resolution}')
    # Chunks bound the memory of the encoder's activations; the latents themselves are small (f^2 fewer pixels).
    latents, labels = [], []
    for start in range(0, len(dataset), chunk):
        x, y = runs.load_batch(dataset, torch.arange(start, min(start + chunk, len(dataset))))
        latents.append(ae.encode(x.to(device)).cpu())
        labels.append(torch.as_tensor(y))
    latents = torch.cat(latents)
    print(f'--autoencoder: {len(latents)} images encoded once to latents {tuple(latents.shape[1:])} '
          f'(mean {latents.mean():.3f}, std {latents.std():.3f} after the recorded scale)')
    return (LatentDataset(latents, torch.cat(labels), getattr(dataset, 'class_names', ())),
            checkpoints.latent_record(args.autoencoder, ae, latents.shape[1:]))


# ----------------------------------------------------------------------------------------------------
# Command line: flags in groups (runs.py owns the ones every training program shares), then one function that
# checks every value before any long work.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train a diffusion model. --task autoencoder / classifier run '
                                'train_autoencoder.py / train_classifier.py (see their --help).',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = runs.add_run_flags(p)
    # This program's own flags join the shared groups; a new flag group (a condition's options) gets a group
    # here and its checks in check_args, so a bad value fails before the dataset is read.
    g = groups['data']
    g.add_argument('--aug-p', type=float, default=0.0, help='probability of each augmentation; labels go to the network as aug_cond (Karras et al. 2022, App. C.4)')
    g.add_argument('--unconditional', action='store_true', help='ignore class labels')
    # --p-uncond, --guidance, --upsample default to None (the documented value is set by check_args): a value given
    # where it does nothing is refused instead of ignored.
    g = groups['optimisation']
    g.add_argument('--p-uncond', type=float, default=None, help='label dropout for classifier-free guidance (default 0.1)')
    g.add_argument('--overfit-batch', action='store_true', help='train on one fixed batch with fixed noise: the loss must go to ~0')
    groups['output'].add_argument('--save-early', type=int, default=0, help='also keep the checkpoint of this step (a "bad" model for autoguidance)')
    g = p.add_argument_group('model')
    g.add_argument('--task', default='diffusion', choices=TASKS, help='what the network learns')
    g.add_argument('--model', default='unet', choices=['unet', 'dit'] + list(EDM2_CONFIGS),
                   help='edm2-*: the magnitude-preserving U-Net of EDM2 (edm2.py; its size is in the name); dit has its '
                        'own defaults for --steps, --batch-size and --lr: ' + ' '.join(f'--{k.replace("_", "-")} {v}'
                                                                                    for k, v in DIT_RUN_DEFAULTS.items()))
    g.add_argument('--config', default=None, help=f"named configuration; unet: {', '.join(UNET_CONFIGS)}; dit: {', '.join(DIT_CONFIGS)}")
    g.add_argument('--dropout', type=float, default=None, help='override the configuration\'s dropout (U-Net)')
    g.add_argument('--model-channels', type=int, default=None, help='override the U-Net\'s width (model_channels)')
    runs.add_diffusion_flags(p)
    g = p.add_argument_group('learned variances and schedules (iddpm.py, vdm.py)')
    g.add_argument('--objective', default='simple', choices=['simple', 'hybrid', 'vlb', 'vdm'],
                   help='simple: each parameterisation\'s MSE; hybrid: L_simple + 0.001 L_vlb with learned variances (Nichol & '
                        'Dhariwal 2021; --prediction eps, a discrete schedule); vlb: L_vlb alone (use --t-sampler importance); '
                        'vdm: the continuous-time bound of Kingma et al. 2021 (--prediction eps; its own schedule, --vdm-schedule)')
    g.add_argument('--vdm-schedule', default=None, choices=['linear', 'learned'], help='--objective vdm: the fixed linear log-SNR '
                   'or the monotone network trained to minimise the variance of the bound (default learned)')
    g.add_argument('--vdm-fixed-endpoints', action='store_true', help='--vdm-schedule learned: keep gamma_0, gamma_1 at -13.3, 5')
    g.add_argument('--vdm-fourier', action='store_true', help='--objective vdm: Fourier features of z_t as extra input channels')
    # Grids and in-training evaluation sample through sample.generate with these settings.
    g = p.add_argument_group('sample grids (sample.py)')
    g.add_argument('--sampler', default='heun', choices=list(SAMPLERS), help='sampler for the grids')
    g.add_argument('--sample-steps', type=int, default=18, help='noise levels of the sampling schedule')
    g.add_argument('--sampler-opt', action='append', default=[], metavar='KEY=VALUE', help="the sampler's own options, e.g. S_churn=40 (repeatable)")
    g.add_argument('--guidance', type=float, default=None, help='CFG weight of class-conditional grids (1 = none; default 2)')
    g = p.add_argument_group('evaluation (reports.py, evaluate.py)')
    g.add_argument('--until-converged', type=int, default=0, metavar='N',
                   help='stop when the in-training KID (or FD) has not improved by --converge-margin for N evaluations (needs --eval-every)')
    g.add_argument('--converge-margin', type=float, default=0.02, help='relative improvement that counts for --until-converged')
    g.add_argument('--bpd-images', type=int, default=16, help='VP models: bits/dim of the variational bound on this many '
                   'held-out images at the end of the run (linear/cosine: T network calls each; vp and --objective vdm: the '
                   'continuous-time bound, 64 calls each; 0 = off)')
    g.add_argument('--memorization-below', type=int, default=5000, help='datasets with fewer images get the memorisation '
                   'report at the end (nearest training images of samples; 0 = never)')
    g.add_argument('--eval-every', type=int, default=0, help='KID and Frechet distance of EMA samples every N steps (0 = off)')
    g.add_argument('--eval-samples', type=int, default=2000, help='samples per evaluation (2,000: KID is reliable, FD a trend; 50,000 for a headline FID)')
    g.add_argument('--eval-network', default='lenet', choices=['lenet', 'inception', 'i3d'],
                   help='features: a LeNet trained on this dataset (offline, scores named FD_lenet/KD_lenet) or the FID Inception '
                        '(videos: both frame by frame, frame-FD_lenet/frame-FID) or I3D (videos only: FVD/KVD)')
    g.add_argument('--inception-weights', default=None, help='pt_inception-2015-12-05-6726825d.pth (see evaluate.py)')
    g.add_argument('--i3d-weights', default=None, help='i3d_pretrained_400.pt for --eval-network i3d (see i3d.py)')
    g = p.add_argument_group('video (Ho et al. 2022, arXiv:2204.03458; video.py)')
    g.add_argument('--image-share', type=float, default=0.0,
                   help='joint video-image training: this share of each sample\'s frames are independent images appended '
                        'to its video (round(share F / (1 - share)) images per F-frame video), the temporal attention masked '
                        'so they stay independent; 0 = video only. Needs a video dataset and a U-Net with temporal attention')
    # Super-resolution stage of a cascade (cascade.py): the network sees the upsampled low-res image as x_cond.
    g = p.add_argument_group('super-resolution stage (--task superres, cascade.py)')
    g.add_argument('--low-res', type=int, default=None, help='size of the low-resolution conditioning image, made on the fly by area downsampling')
    g.add_argument('--noise-aug-max', type=float, default=0.0, help='noise conditioning augmentation: levels t ~ U[0, this] in [0, 1], given to the network (0 = off; see cascade.py)')
    g.add_argument('--noise-aug-dim', type=int, default=8, help='width of the level embedding (aug_cond) when --noise-aug-max > 0')
    g.add_argument('--upsample', default=None, choices=['bicubic', 'bilinear', 'nearest'], help='how the low-res image is upsampled to x_cond (default bicubic)')
    g = p.add_argument_group('latent diffusion (vae.py; train the autoencoder with train_autoencoder.py)')
    g.add_argument('--autoencoder', default=None, metavar='CKPT', help='train diffusion on the latents of this autoencoder checkpoint (encoded once, cached in memory); grids and sample.py decode them')
    edm2_recipe.add_flags(p)
    # The default run fills 8-9 minutes of a 2-core CPU (docs/RESULTS.md, "The default run").
    p.set_defaults(steps=2000)
    if p.parse_known_args(argv)[0].model == 'dit':   # the DiT's own defaults; a flag given still wins
        p.set_defaults(**DIT_RUN_DEFAULTS)
    return edm2_recipe.parse_args(p, argv)           # --recipe edm2 brings its own defaults (--lr, --grad-clip, ...)


def check_args(args):
    """Every flag's range, the model/config pairing, the sampler options and the conditions' flags, with one
    message listing all problems (runs.check_flags; runs.check_run_args checks the shared flags)."""
    runs.check_flags(args, check_diffusion_args, check_superres_args, edm2_recipe.check_args, check_objective_args)


def check_objective_args(args, need):
    """--objective: iDDPM's learned variances need eps and a discrete schedule; VDM brings its own schedule."""
    if args.objective == 'simple':
        need(args.vdm_schedule is None and not args.vdm_fixed_endpoints and not args.vdm_fourier,
             '--vdm-schedule, --vdm-fixed-endpoints and --vdm-fourier apply to --objective vdm')
        return
    need(args.prediction == 'eps', f'--objective {args.objective} trains an eps-predicting network; add --prediction eps')
    need(not edm2_recipe.is_edm2(args) and args.recipe == 'edm', f'--objective {args.objective} trains a U-Net or DiT '
                                                                  'under the EDM recipe (not an EDM2 network or --recipe edm2)')
    need(not args.autoencoder and args.task != 'superres', f'--objective {args.objective}: the bound\'s decoder is for '
                                                           '8-bit pixels of a base model (no --autoencoder, --task superres)')
    if args.objective in ('hybrid', 'vlb'):
        need(args.vdm_schedule is None and not args.vdm_fixed_endpoints and not args.vdm_fourier,
             '--vdm-schedule, --vdm-fixed-endpoints and --vdm-fourier apply to --objective vdm')
        need(args.schedule in (None, 'linear', 'cosine'), f'--objective {args.objective} interpolates the betas of a '
                                                          f'discrete schedule: --schedule linear or cosine, not {args.schedule}')
        need(not (args.objective == 'hybrid' and args.t_sampler == 'importance'), '--t-sampler importance is for '
             '--objective vlb (Nichol & Dhariwal 2021, Sec. 3.3: importance sampling of L_vlb alone)')
        return
    need(args.schedule is None, '--objective vdm has its own schedule (--vdm-schedule linear|learned); drop --schedule')
    need(args.t_sampler != 'importance', '--objective vdm draws t uniformly (--t-sampler uniform or low_discrepancy)')
    need(not (args.vdm_fixed_endpoints and args.vdm_schedule == 'linear'), '--vdm-fixed-endpoints applies to '
                                                                          '--vdm-schedule learned (linear is fixed)')
    args.vdm_schedule = args.vdm_schedule or 'learned'
    # The learned schedule's parameters live outside the DDP-wrapped network: their gradients are not all-reduced.
    need(args.vdm_schedule == 'linear' or int(os.environ.get('WORLD_SIZE', '1')) == 1, '--vdm-schedule learned '
         'trains in one process (its gradients are not averaged across ranks); use --vdm-schedule linear under torchrun')


def check_diffusion_args(args, need):
    finite = lambda v: v is not None and math.isfinite(v)
    check_applies(args, need)                   # first: it also sets the defaults of the flags that default to None
    if args.task in ('autoencoder', 'classifier'):
        need(False, f'--task {args.task} is train_{args.task}.py: run it as python train.py --task {args.task} ... '
                    f'or python train_{args.task}.py ...')
    for flag in ('sample_steps', 'eval_samples'):
        need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    for flag in ('eval_every', 'save_early', 'until_converged', 'bpd_images', 'memorization_below'):
        need(getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be 0 or more (got {getattr(args, flag)})")
    need(not args.until_converged or args.eval_every, '--until-converged needs --eval-every N (it watches the evaluation scores)')
    need(finite(args.converge_margin) and 0 <= args.converge_margin < 1, f'--converge-margin must be in [0, 1) (got {args.converge_margin})')
    for flag in ('aug_p', 'p_uncond'):
        need(finite(getattr(args, flag)) and 0 <= getattr(args, flag) <= 1, f"--{flag.replace('_', '-')} is a probability in [0, 1] (got {getattr(args, flag)})")
    need(args.dropout is None or (finite(args.dropout) and 0 <= args.dropout < 1), f'--dropout must be in [0, 1) (got {args.dropout})')
    need(args.guidance is None or finite(args.guidance), f'--guidance must be a finite number (got {args.guidance})')
    need(args.model_channels is None or args.model_channels >= 1, f'--model-channels must be at least 1 (got {args.model_channels})')
    # The named configuration must belong to the chosen network (a U-Net name with --model dit was a KeyError).
    configs = UNET_CONFIGS if args.model == 'unet' else DIT_CONFIGS if args.model == 'dit' else {}
    need(args.config is None or args.config in configs or args.model in EDM2_CONFIGS, f"--config {args.config!r} is not a {args.model} configuration; "
                                                        f"choose from {', '.join(configs)}")
    if args.resolution and args.resolution >= 1 and (args.config is None or args.config in configs):
        problem = checkpoints.resolution_problem(args.model, args.config, args.resolution)
        need(problem is None, f'--{problem}')
    need(finite(args.image_share) and 0 <= args.image_share < 1, f'--image-share must be in [0, 1) (got {args.image_share})')
    need(not (args.image_share and args.overfit_batch), '--image-share and --overfit-batch exclude each other (the overfit '
                                                         'batch holds videos only)')
    need(not (args.image_share and args.model != 'unet'), '--image-share needs --model unet (the DiT has no frame mask)')
    if args.autoencoder:
        need(os.path.isfile(args.autoencoder), f'--autoencoder {args.autoencoder!r} does not exist')
        need(args.aug_p == 0, '--aug-p augments pixels; latent diffusion (--autoencoder) cannot use it')
    # Sampler options of the grids: an unknown one is reported now, not after the whole run at the first grid.
    try:
        args.sampler_options = knobs.check_sampler_options(args.sampler, knobs.parse_sampler_options(args.sampler_opt))
    except ValueError as e:
        need(False, str(e))


def check_applies(args, need):
    """A flag that would do nothing in this run is refused with what it applies to (it was silently ignored),
    then the defaults of the flags whose default is None (so that 'given' can be told from 'default')."""
    name = args.config or checkpoints.DEFAULT_CONFIG.get(args.model, args.model)
    unet = UNET_CONFIGS.get(name, {}) if args.model == 'unet' else {}
    # The DiT's width and depth are its named configuration, and it has no dropout.
    for flag in ('dropout', 'model_channels'):
        need(getattr(args, flag) is None or args.model == 'unet', f"--{flag.replace('_', '-')} applies to the U-Net "
                                                                 f"(--model unet); the DiT's size is its --config")
    # Every GroupNorm of the U-Net splits the width into norm_groups groups (unet.py).
    groups = unet.get('norm_groups', 32)
    need(not unet or not args.model_channels or args.model_channels % groups == 0,
         f'--model-channels must be a multiple of {groups}, the GroupNorm groups of the U-Net (got {args.model_channels})')
    # Label dropout and guidance act on class labels; an unconditional model has none.
    for flag in ('p_uncond', 'guidance'):
        need(getattr(args, flag) is None or not args.unconditional,
             f"--{flag.replace('_', '-')} applies to class-conditional training; --unconditional has no classes")
    need(not args.i3d_weights or args.eval_network == 'i3d', '--i3d-weights applies to --eval-network i3d')
    # Augmenting the fixed batch would change it every step: the loss could not go to ~0.
    need(not (args.overfit_batch and args.aug_p > 0), '--aug-p applies to normal training; --overfit-batch needs the '
                                                      'same images at every step (the loss must go to ~0)')
    need(args.save_early <= args.steps, f'--save-early {args.save_early} is beyond --steps {args.steps}: it would never be saved')
    # Video data needs a network with temporal attention (a video configuration): an image net would take each video
    # for one image. Known from the dataset's name, before it is read.
    video = data.is_video_dataset(args.dataset)
    need(not args.image_share or video, f'--image-share applies to video data; {args.dataset} holds images')
    need(not video or unet.get('temporal_attention'), f"{args.dataset} holds videos: it needs a U-Net with temporal "
         f"attention (--config {', '.join(n for n, c in UNET_CONFIGS.items() if c.get('temporal_attention'))}); "
         f"{args.model} '{name}' has none")
    # The documented defaults, now that a given value can be told from none.
    args.p_uncond = 0.1 if args.p_uncond is None else args.p_uncond
    args.guidance = 2.0 if args.guidance is None else args.guidance


def check_superres_args(args, need):
    """The super-resolution flags: --low-res belongs to --task superres and needs a size; the level range."""
    if args.task != 'superres':
        need(args.low_res is None and args.noise_aug_max == 0 and args.upsample is None,
             '--low-res, --noise-aug-max and --upsample apply to --task superres')
        return
    # --upsample defaults to None so that, given without --task superres, it is refused above; bicubic otherwise.
    args.upsample = args.upsample or 'bicubic'
    need(args.low_res is not None and args.low_res >= 1, '--task superres needs --low-res, the size of the conditioning image (e.g. 16)')
    need(math.isfinite(args.noise_aug_max) and 0 <= args.noise_aug_max <= 1, f'--noise-aug-max is a diffusion time in [0, 1] (got {args.noise_aug_max})')
    need(args.noise_aug_dim >= 2 and args.noise_aug_dim % 2 == 0, f'--noise-aug-dim must be an even number >= 2 (got {args.noise_aug_dim})')
    # aug_cond carries either EDM's augmentation labels or the noise-augmentation level, not both.
    need(args.aug_p == 0, '--aug-p gives the network augmentation labels through aug_cond, which --task superres uses for the noise level')
    need(not args.autoencoder, '--task superres works on pixels; it cannot be combined with --autoencoder')
    need(args.eval_every == 0, '--eval-every samples unconditionally; for an SR stage measure with benchmarks/cascade.py instead')


def other_program(argv):
    """`--task autoencoder|classifier|discrete` in argv: (path of train_<task>.py, argv without the --task flag), else None.
    `--captions`: text-to-image training, train_text.py (captions.py, textenc.py, mmdit.py)."""
    if '--captions' in argv:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_text.py'), [a for a in argv if a != '--captions']
    for i, a in enumerate(argv):
        task = argv[i + 1] if a == '--task' and i + 1 < len(argv) else a[len('--task='):] if a.startswith('--task=') else None
        if task in ('autoencoder', 'classifier', 'discrete'):
            rest = argv[:i] + argv[i + (2 if a == '--task' else 1):]
            return os.path.join(os.path.dirname(os.path.abspath(__file__)), f'train_{task}.py'), rest
    return None


if __name__ == '__main__':
    # A thin dispatcher: the other objectives are programs of their own, run (not imported) as __main__.
    program = other_program(sys.argv[1:])
    if program:
        sys.argv = [program[0]] + program[1]
        runpy.run_path(program[0], run_name='__main__')
    else:
        runs.run_command(main, parse_args)
