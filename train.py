"""
Train a diffusion model: `python train.py` on a laptop CPU, `torchrun --nproc_per_node=8 train.py ...` on GPUs.

The loop is the one every paper uses (Ho et al. 2020, arXiv:2006.11239, Alg. 1; Karras et al. 2022,
arXiv:2206.00364, Sec. 5), in `train_step`:
    x0 ~ data,  sigma ~ p_train(sigma),  noise ~ N(0, I)
    gradient step on  E || F(c_in (x0 + sigma noise), c_noise(sigma)) - target(x0, noise, sigma) ||^2
(diffusion.Diffusion.loss: each parameterisation's own target; Karras et al. 2022, Eq. 8), then an EMA of the
weights. Around it, what makes a run usable:
  - EMA with a warm-up: decay_t = min(decay, (1 + t) / (10 + t)), so early samples are not an average dominated
    by the random initialisation (Tensorflow's ExponentialMovingAverage with num_updates, as DDPM's code uses)
  - CUDA mixed precision: bf16 where the GPU supports it, otherwise fp16 with a gradient scaler; fp32 weights
  - label dropout (p_uncond = 0.1) so one network is both conditional and unconditional (Ho & Salimans 2022)
  - DDP through torchrun (NCCL on GPUs, gloo on CPU); gradient accumulation; gradient clipping
  - exact resume: each micro-batch's images, augmentation, label dropout, noise levels and noise come from
    generators seeded by (seed, step, rank, micro-batch), and every other piece of state (weights, EMA,
    optimizer, scaler, importance-sampling history, dropout RNG) from its owner's state_dict(); large image
    folders stream from disk through a DataLoader with workers fed those same indices
  - nothing lost: a run folder is never silently reused, checkpoints are written to a temp file and renamed,
    non-finite or exploded weights never replace the last good checkpoint, a full disk is reported as such
  - a JSON-lines log (loss per noise-level bucket, held-out loss, KID/FD) and PNG sample grids (sample.py)

Layout as in DiT's train.py: parse_args() -> main(args), phase by phase; nanoGPT's get_lr; a five-line
update_ema. Where things go: a new --task adds its model in `make_config`/`build_trainee` and its step next to
`train_step`; sampling and checkpoint reading live in sample.py, which this file imports (never the reverse).
"""
import argparse
import errno
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import cascade
import data
import pretrained
import sample
from augment import AUG_DIM, AugmentPipe
from diffusion import NOISE_SCHEDULES
from dit import DIT_CONFIGS, DiT
from samplers import SAMPLERS
# generate and load_checkpoint are re-exported for code written against the old train.py (evaluate.py until
# it moves to sample.py); new code imports them from sample.py.
from sample import build_diffusion, build_network, generate, load_checkpoint  # noqa: F401
from unet import UNET_CONFIGS, UNet
import vae
from classifier import CLASSIFIER_CONFIGS, NoiseConditionalClassifier, accuracy_by_noise_level, classifier_loss
from plots import plot_training_log

TASKS = ('diffusion', 'autoencoder', 'superres', 'classifier')                       # --task: what the network learns (make_config, build_trainee)
# Flags that change what an uninterrupted run would have done: a resume with other values is not exact.
RESUME_FLAGS = ('split', 'seed', 'batch_size', 'grad_accum', 'lr', 'warmup', 'lr_decay', 'weight_decay',
                'grad_clip', 'ema_decay', 'p_uncond', 'aug_p', 'overfit_batch', 'amp')
MAX_WEIGHT = 1e4                               # |weight| above this: the run has blown up (trained nets: |w| < 10)


# ----------------------------------------------------------------------------------------------------
# Command line: flags in groups, then one function that checks every value before any long work.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train a diffusion model.', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Flags come in the groups --help shows. New flag groups (a task's own options) go in their own group here,
    # with their checks in check_args, so a bad value fails before the dataset is read.
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='shapes', help="shapes | mnist | fashion-mnist | cifar10 | emoji | folder:PATH")
    g.add_argument('--data-dir', default='data', help='where dataset files are read from (and downloaded to)')
    g.add_argument('--split', default='train', help="which split to train on (the shared MNIST files hold only 'test')")
    g.add_argument('--resolution', type=int, default=None, help='image size; default: the dataset\'s own')
    g.add_argument('--aug-p', type=float, default=0.0, help='probability of each augmentation; labels go to the network as aug_cond (Karras et al. 2022, App. C.4)')
    g.add_argument('--unconditional', action='store_true', help='ignore class labels')
    g.add_argument('--workers', type=int, default=2, help='DataLoader workers for image folders streamed from disk')
    g.add_argument('--memory-budget', type=float, default=4.0, help='GB: image folders larger than this decoded are streamed from disk')
    g = p.add_argument_group('model')
    g.add_argument('--task', default='diffusion', choices=TASKS, help='what the network learns')
    g.add_argument('--model', default='unet', choices=['unet', 'dit'])
    g.add_argument('--config', default=None, help=f"named configuration; unet: {', '.join(UNET_CONFIGS)}; dit: {', '.join(DIT_CONFIGS)}")
    g.add_argument('--dropout', type=float, default=None, help='override the configuration\'s dropout (U-Net)')
    g.add_argument('--model-channels', type=int, default=None, help='override the U-Net\'s width (model_channels)')
    # What the network predicts and which noise levels it trains on (diffusion.py); stored in the config.
    g = p.add_argument_group('diffusion')
    g.add_argument('--prediction', default='edm', choices=['eps', 'x0', 'v', 'edm', 'flow'], help='parameterisation of the network output')
    g.add_argument('--schedule', default=None, choices=list(NOISE_SCHEDULES), help='training noise levels and c_noise; default: the natural one for --prediction')
    g.add_argument('--t-sampler', default='low_discrepancy', choices=['uniform', 'low_discrepancy', 'importance'], help='how the batch\'s noise levels are drawn')
    g.add_argument('--sigma-data', type=float, default=0.5, help='data standard deviation for EDM preconditioning')
    g.add_argument('--T', type=int, default=1000, help='steps of the discrete schedules linear and cosine (DDPM: 1000)')
    # Optimisation: the flags RESUME_FLAGS guards, since changing them mid-run changes the result.
    g = p.add_argument_group('optimisation')
    g.add_argument('--steps', type=int, default=1000, help='optimizer steps (1000: about 10 minutes on a 2-core CPU)')
    g.add_argument('--batch-size', type=int, default=64, help='global batch size (split over processes and accumulation)')
    g.add_argument('--grad-accum', type=int, default=1, help='micro-batches per optimizer step')
    g.add_argument('--lr', type=float, default=2e-3, help='peak learning rate (Adam)')
    g.add_argument('--warmup', type=int, default=200, help='linear warm-up steps')
    g.add_argument('--lr-decay', default='cosine', choices=['cosine', 'constant'], help='after warm-up')
    g.add_argument('--weight-decay', type=float, default=0.0)
    g.add_argument('--grad-clip', type=float, default=1.0, help='max gradient norm (0 = off)')
    g.add_argument('--ema-decay', type=float, default=0.999, help='EMA decay after warm-up, in [0, 1)')
    g.add_argument('--p-uncond', type=float, default=0.1, help='label dropout for classifier-free guidance')
    g.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'none'], help='CUDA mixed precision (CPU always fp32)')
    g.add_argument('--overfit-batch', action='store_true', help='train on one fixed batch with fixed noise: the loss must go to ~0')
    # The run folder and how often it is written to; --resume / --overwrite decide what happens to an existing one.
    g = p.add_argument_group('output')
    g.add_argument('--out', default='runs/default', help='run folder: checkpoints, samples, log')
    g.add_argument('--resume', default=None, help="checkpoint to continue from, or 'auto' for OUT/ckpt.pt if it exists")
    g.add_argument('--overwrite', action='store_true', help='start afresh in an --out that already holds a run (its checkpoint and log are replaced)')
    g.add_argument('--allow-changes', action='store_true', help='resume although --seed/--lr/--batch-size/... differ from the run (no longer exact)')
    g.add_argument('--log-every', type=int, default=50)
    g.add_argument('--val-every', type=int, default=500, help='held-out loss every N steps (0 = off)')
    g.add_argument('--sample-every', type=int, default=1000, help='sample grid every N steps (0 = only at the end)')
    g.add_argument('--ckpt-every', type=int, default=1000, help='checkpoint every N steps (and at the end)')
    g.add_argument('--save-early', type=int, default=0, help='also keep the checkpoint of this step (a "bad" model for autoguidance)')
    # Grids and in-training evaluation sample through sample.generate with these settings.
    g = p.add_argument_group('sample grids (sample.py)')
    g.add_argument('--sampler', default='heun', choices=list(SAMPLERS), help='sampler for the grids')
    g.add_argument('--sample-steps', type=int, default=18, help='noise levels of the sampling schedule')
    g.add_argument('--sampler-opt', action='append', default=[], metavar='KEY=VALUE', help="the sampler's own options, e.g. S_churn=40 (repeatable)")
    g.add_argument('--guidance', type=float, default=2.0, help='CFG weight of class-conditional grids (1 = none)')
    g = p.add_argument_group('evaluation (evaluate.py)')
    g.add_argument('--until-converged', type=int, default=0, metavar='N',
                   help='stop when the in-training KID (or FD) has not improved by --converge-margin for N evaluations (needs --eval-every)')
    g.add_argument('--converge-margin', type=float, default=0.02, help='relative improvement that counts for --until-converged')
    g.add_argument('--bpd-images', type=int, default=16, help='discrete VP models (linear/cosine): bits/dim of the variational '
                   'bound on this many held-out images at the end of the run (T network calls each; 0 = off)')
    g.add_argument('--memorization-below', type=int, default=5000, help='datasets with fewer images get the memorisation '
                   'report of evaluate.py at the end (nearest training images of samples; 0 = never)')
    g.add_argument('--eval-every', type=int, default=0, help='KID and Frechet distance of EMA samples every N steps (0 = off)')
    g.add_argument('--eval-samples', type=int, default=2000, help='samples per evaluation (2,000: KID is reliable, FD a trend; 50,000 for a headline FID)')
    g.add_argument('--eval-network', default='lenet', choices=['lenet', 'inception', 'i3d'],
                   help='features: a LeNet trained on this dataset (offline, scores named FD_lenet/KD_lenet) or the FID Inception '
                        '(videos: both frame by frame, frame-FD_lenet/frame-FID) or I3D (videos only: FVD/KVD)')
    g.add_argument('--inception-weights', default=None, help='pt_inception-2015-12-05-6726825d.pth (see evaluate.py)')
    g.add_argument('--i3d-weights', default=None, help='i3d_pretrained_400.pt for --eval-network i3d (see i3d.py)')
    g = p.add_argument_group('video (Ho et al. 2022, arXiv:2204.03458)')
    g.add_argument('--image-share', type=float, default=0.0,
                   help='joint video-image training: this share of each sample\'s frames are independent images appended '
                        'to its video (round(share F / (1 - share)) images per F-frame video), the temporal attention masked '
                        'so they stay independent; 0 = video only. Needs a video dataset and a U-Net with temporal attention')
    # Super-resolution stage of a cascade (cascade.py): the network sees the upsampled low-res image as x_cond.
    g = p.add_argument_group('super-resolution stage (--task superres, cascade.py)')
    g.add_argument('--low-res', type=int, default=None, help='size of the low-resolution conditioning image, made on the fly by area downsampling')
    g.add_argument('--noise-aug-max', type=float, default=0.0, help='noise conditioning augmentation: levels t ~ U[0, this] in [0, 1], given to the network (0 = off; see cascade.py)')
    g.add_argument('--noise-aug-dim', type=int, default=8, help='width of the level embedding (aug_cond) when --noise-aug-max > 0')
    g.add_argument('--upsample', default='bicubic', choices=['bicubic', 'bilinear', 'nearest'], help='how the low-res image is upsampled to x_cond')
    # Autoencoders (vae.py): train one (--task autoencoder), or train diffusion on one's latents (--autoencoder).
    g = p.add_argument_group('autoencoder (vae.py)')
    g.add_argument('--autoencoder', default=None, metavar='CKPT', help='train diffusion on the latents of this --task autoencoder checkpoint (encoded once, cached in memory); grids and sample.py decode them')
    g.add_argument('--vae-config', default=None, help=f"--task autoencoder configuration: {', '.join(vae.AUTOENCODER_CONFIGS)} (default kl-f4, vq-f4 with --vq)")
    g.add_argument('--vq', action='store_true', help='VQ regularisation (VQGAN codebook) instead of the KL term')
    g.add_argument('--kl-weight', type=float, default=1e-6, help='KL weight (LDM: 1e-6)')
    g.add_argument('--codebook-weight', type=float, default=1.0, help='VQ loss weight (VQGAN: 1)')
    g.add_argument('--disc-weight', type=float, default=0.5, help='scale of the adaptive GAN weight, VQGAN Eq. 7 (0 = no GAN)')
    g.add_argument('--gan-start', type=int, default=None, help='first step with the GAN loss (default: half of --steps)')
    g.add_argument('--lpips', default='auto', help="LPIPS weights folder, 'auto' (use them if on this machine) or 'off'")
    g = p.add_argument_group('misc')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    g.add_argument('--no-progress', action='store_true', help='no tqdm bar (for logs)')
    return p.parse_args(argv)


def check_args(args):
    """Every flag's range, the model/config pairing and the sampler options, with one message listing all problems.
    Runs before the dataset is read, so a typo costs seconds, not the run."""
    bad = []
    def need(ok, message):
        if not ok:
            bad.append(message)
    finite = lambda v: v is not None and math.isfinite(v)
    # Counts and intervals: 0 or negative values used to crash after the first step (step % 0) or train nothing.
    for flag in ('steps', 'batch_size', 'grad_accum', 'log_every', 'ckpt_every', 'sample_steps', 'eval_samples'):
        need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    need(args.T > 20, f'--T must be more than 20 (got {args.T})')
    need(not args.until_converged or args.eval_every, '--until-converged needs --eval-every N (it watches the evaluation scores)')
    need(finite(args.converge_margin) and 0 <= args.converge_margin < 1, f'--converge-margin must be in [0, 1) (got {args.converge_margin})')
    for flag in ('warmup', 'val_every', 'sample_every', 'eval_every', 'save_early', 'workers', 'until_converged',
                 'bpd_images', 'memorization_below'):
        need(getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be 0 or more (got {getattr(args, flag)})")
    # Rates and probabilities: NaN compares False with everything, so each check asks for a finite value first.
    need(finite(args.lr) and args.lr > 0, f'--lr must be a finite number > 0 (got {args.lr})')
    need(finite(args.ema_decay) and 0 <= args.ema_decay < 1, f'--ema-decay must be in [0, 1) (got {args.ema_decay}; 1 never moves, > 1 or < 0 extrapolates)')
    for flag in ('aug_p', 'p_uncond'):
        need(finite(getattr(args, flag)) and 0 <= getattr(args, flag) <= 1, f"--{flag.replace('_', '-')} is a probability in [0, 1] (got {getattr(args, flag)})")
    need(args.dropout is None or (finite(args.dropout) and 0 <= args.dropout < 1), f'--dropout must be in [0, 1) (got {args.dropout})')
    for flag in ('weight_decay', 'grad_clip', 'memory_budget'):
        need(finite(getattr(args, flag)) and getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be a finite number >= 0 (got {getattr(args, flag)})")
    need(finite(args.sigma_data) and args.sigma_data > 0, f'--sigma-data must be > 0 (got {args.sigma_data})')
    need(finite(args.guidance), f'--guidance must be a finite number (got {args.guidance})')
    need(args.model_channels is None or args.model_channels >= 1, f'--model-channels must be at least 1 (got {args.model_channels})')
    # The named configuration must belong to the chosen network (a U-Net name with --model dit was a KeyError).
    configs = UNET_CONFIGS if args.model == 'unet' else DIT_CONFIGS
    need(args.config is None or args.config in configs, f"--config {args.config!r} is not a {args.model} configuration; "
                                                        f"choose from {', '.join(configs)}")
    need(args.resolution is None or args.resolution >= 1, f'--resolution must be a positive size (got {args.resolution})')
    if args.resolution and args.resolution >= 1 and (args.config is None or args.config in configs):
        need(resolution_problem(args, args.resolution) is None, f'--{resolution_problem(args, args.resolution)}')
    need(args.split in ('train', 'test'), f"--split must be 'train' or 'test' (got {args.split!r})")
    need(finite(args.image_share) and 0 <= args.image_share < 1, f'--image-share must be in [0, 1) (got {args.image_share})')
    need(not (args.image_share and args.overfit_batch), '--image-share and --overfit-batch exclude each other (the overfit '
                                                         'batch holds videos only)')
    need(not (args.image_share and args.model != 'unet'), '--image-share needs --model unet (the DiT has no frame mask)')
    # A device string torch cannot parse; whether CUDA exists is checked in setup_distributed.
    try:
        args.device_obj = torch.device(args.device) if args.device else None
    except RuntimeError:
        bad.append(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, mps)")
    # Sampler options of the grids: an unknown one is reported now, not after the whole run at the first grid.
    try:
        args.sampler_options = sample.check_sampler_options(args.sampler, sample.parse_sampler_options(args.sampler_opt))
    except ValueError as e:
        bad.append(str(e))
    check_autoencoder_args(args, need, finite)
    check_superres_args(args, need, finite)
    if bad:
        raise SystemExit('error: ' + '\n       '.join(bad))


def check_autoencoder_args(args, need, finite):
    """The autoencoder flags: the task's incompatibilities and the ranges of its weights."""
    for flag in ('kl_weight', 'codebook_weight', 'disc_weight'):
        need(finite(getattr(args, flag)) and getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be a finite number >= 0 (got {getattr(args, flag)})")
    need(args.vae_config is None or args.vae_config in vae.AUTOENCODER_CONFIGS,
         f"--vae-config {args.vae_config!r} is not a vae.py configuration; choose from {', '.join(vae.AUTOENCODER_CONFIGS)}")
    args.gan_start = args.steps // 2 if args.gan_start is None else args.gan_start
    need(args.gan_start >= 0, f'--gan-start must be 0 or more (got {args.gan_start})')
    if args.task == 'autoencoder':
        need(not args.autoencoder, '--autoencoder trains diffusion on latents; it cannot be used with --task autoencoder')
        for flag, off in (('aug_p', 0), ('eval_every', 0), ('overfit_batch', False)):
            need(getattr(args, flag) == off, f"--{flag.replace('_', '-')} is for diffusion, not --task autoencoder")
    if args.autoencoder:
        need(os.path.isfile(args.autoencoder), f'--autoencoder {args.autoencoder!r} does not exist')
        need(args.aug_p == 0, '--aug-p augments pixels; latent diffusion (--autoencoder) cannot use it')


def check_superres_args(args, need, finite):
    """The super-resolution flags: --low-res belongs to --task superres and needs a size; the level range."""
    if args.task != 'superres':
        need(args.low_res is None and args.noise_aug_max == 0, '--low-res and --noise-aug-max belong to --task superres')
        return
    need(args.low_res is not None and args.low_res >= 1, '--task superres needs --low-res, the size of the conditioning image (e.g. 16)')
    need(finite(args.noise_aug_max) and 0 <= args.noise_aug_max <= 1, f'--noise-aug-max is a diffusion time in [0, 1] (got {args.noise_aug_max})')
    need(args.noise_aug_dim >= 2 and args.noise_aug_dim % 2 == 0, f'--noise-aug-dim must be an even number >= 2 (got {args.noise_aug_dim})')
    # aug_cond carries either EDM's augmentation labels or the noise-augmentation level, not both.
    need(args.aug_p == 0, '--aug-p gives the network augmentation labels through aug_cond, which --task superres uses for the noise level')
    need(not args.autoencoder, '--task superres works on pixels; it cannot be combined with --autoencoder')
    need(args.eval_every == 0, '--eval-every samples unconditionally; for an SR stage measure with benchmarks/cascade.py instead')


# ----------------------------------------------------------------------------------------------------
# Small pieces: learning rate and EMA.

# nanoGPT's schedule: warm-up protects Adam's early, badly estimated second moments; the cosine tail lets the
# weights settle. It depends on --steps, so extending a run changes the tail (resume keeps --steps free).
def get_lr(step, args):
    """Linear warm-up, then constant or cosine decay to 10% (nanoGPT's get_lr)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_decay == 'constant':
        return args.lr
    # Cosine from the peak to 10% of it over the steps after warm-up (never to 0: the last steps still learn).
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay ema + (1 - decay) model, over parameters and buffers."""
    # lerp_(m, 1 - decay) is decay * e + (1 - decay) * m in place; integer buffers (counters) are left alone.
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(m, 1 - decay)


def ema_decay(step, max_decay):
    """EMA warm-up: the effective averaging window grows with the step count instead of starting at 1/(1-decay)."""
    return min(max_decay, (1 + step) / (10 + step))


# ----------------------------------------------------------------------------------------------------
# The model each task trains. The config is everything sample.py needs to rebuild it; it is stored in every
# checkpoint. A new --task adds a branch to make_config (its network and settings) and to build_trainee.

DEFAULT_SCHEDULE = {'eps': 'cosine', 'x0': 'cosine', 'v': 'cosine', 'edm': 'edm', 'flow': 'flow'}


def resolution_problem(args, r):
    """Why image size r does not suit the chosen network, or None. The U-Net halves the image once per level and
    the DiT cuts it into patches: checked before building, so the message names the constraint instead of a
    shape error from deep inside the network."""
    if args.model == 'unet':
        name = args.config or 'micro'
        levels = len(UNET_CONFIGS[name]['channel_mult'])
        factor = 2 ** (levels - 1)                                      # one halving per level below the first
        if r % factor:
            return (f"resolution {r} does not suit U-Net '{name}': its {levels} levels halve the image {levels - 1} "
                    f'times, so it needs a multiple of {factor}')
        return None
    name = args.config or 'DiT-S/4'
    patch = DIT_CONFIGS[name]['patch_size']
    if r % patch:
        return f"resolution {r} does not suit DiT '{name}': it needs a multiple of its patch size {patch}"
    return None


def network_config(args, dataset, num_classes, aug_dim):
    """Constructor arguments of the U-Net or DiT for this dataset (its image size checked first)."""
    r = dataset.resolution
    problem = resolution_problem(args, r)
    if problem:
        raise SystemExit(f'error: {problem}')
    if args.model == 'unet':
        name = args.config or 'micro'
        net = dict(UNET_CONFIGS[name], in_channels=dataset.channels, image_size=r, num_classes=num_classes, aug_dim=aug_dim)
        if args.dropout is not None:
            net['dropout'] = args.dropout
        if args.model_channels is not None:
            net['model_channels'] = args.model_channels
        return name, UNet(**net).config
    name = args.config or 'DiT-S/4'
    return name, DiT(**dict(DIT_CONFIGS[name], input_size=r, in_channels=dataset.channels, num_classes=num_classes,
                            aug_dim=aug_dim)).config


def classifier_config(args, dataset):
    """--task classifier: the noise-conditional classifier (ADM's U-Net encoder half), sized for the images."""
    name = args.config or 'micro'
    if name not in CLASSIFIER_CONFIGS:
        raise ValueError(f"--config {name!r} is not a classifier configuration; choose from {', '.join(CLASSIFIER_CONFIGS)}")
    if not dataset.num_classes or args.unconditional:
        raise ValueError('--task classifier needs a dataset with class labels (and no --unconditional)')
    if getattr(dataset, 'frames', 0):
        raise ValueError('--task classifier trains on images; this dataset holds videos')
    net = NoiseConditionalClassifier(dataset.channels, dataset.num_classes, image_size=dataset.resolution,
                                     **CLASSIFIER_CONFIGS[name])
    return name, net.config


def make_config(args, dataset, latents=None):
    """Everything needed to rebuild the model and sample it as trained; stored in every checkpoint.
    latents: (LatentDataset, record) with --autoencoder: the network is sized for the latents, 'data' stays the
    images', and config['autoencoder'] records the decoder (see encode_dataset)."""
    num_classes = 0 if args.unconditional else dataset.num_classes
    if args.task == 'autoencoder':                  # vae.py's config in place of a network's; no diffusion
        name, net = autoencoder_config(args, dataset)
    elif args.task == 'superres':                   # cascade.py: the low-res image in x_cond, its noise level in aug_cond
        name, net, superres = superres_config(args, dataset, num_classes)
    elif args.task == 'classifier':                 # classifier.py: p(y | x, sigma) for classifier guidance
        name, net = classifier_config(args, dataset)
    else:
        name, net = network_config(args, latents[0] if latents else dataset, num_classes, AUG_DIM if args.aug_p > 0 else 0)
    # 'task' tells sample.py what the checkpoint is; 'net' holds the constructor arguments (build_network).
    return {'task': args.task, 'model': args.task if args.task in ('autoencoder', 'classifier') else args.model,
            'config_name': name, 'net': net, **({'autoencoder': latents[1]} if latents else {}),
            **({'superres': superres} if args.task == 'superres' else {}),
            'diffusion': {} if args.task == 'autoencoder' else {
                'prediction': args.prediction, 'schedule': args.schedule or DEFAULT_SCHEDULE[args.prediction],
                't_sampler': args.t_sampler, 'sigma_data': args.sigma_data,
                **({'T': args.T} if (args.schedule or DEFAULT_SCHEDULE[args.prediction]) in ('linear', 'cosine') else {})},
            'data': {'dataset': args.dataset, 'resolution': dataset.resolution, 'channels': dataset.channels,
                     'num_classes': num_classes, 'class_names': list(getattr(dataset, 'class_names', None) or []),
                     'frames': getattr(dataset, 'frames', 0)}}


@dataclass
class Trainee:
    """What a run trains and everything an exact resume must restore, each piece owned by one object that has
    its own state_dict(): the network, its EMA, the Diffusion (importance-sampling history), the optimizer and
    the gradient scaler. `model` is the network as the loss sees it (DDP-wrapped when there are several ranks)."""
    net: torch.nn.Module                        # the weights being trained
    ema: torch.nn.Module                        # their exponential moving average: what is sampled
    diffusion: object                           # diffusion.Diffusion: parameterisation, schedule, t-sampler
    optimizer: torch.optim.Optimizer            # Adam
    scaler: torch.amp.GradScaler                # fp16 loss scaling (disabled otherwise)
    model: torch.nn.Module = None               # net, or DDP(net)
    amp_dtype: torch.dtype = None               # autocast dtype on CUDA, None = fp32
    step: int = 0                               # optimizer steps done
    skipped: int = 0                            # consecutive steps skipped for a non-finite loss
    grad_norm: float = 0.0                      # gradient norm of the last update (before clipping)
    gan: object = None                          # --task autoencoder: vae.AutoencoderLoss (holds the discriminator)
    gan_optimizer: torch.optim.Optimizer = None  # --task autoencoder: the discriminator's Adam

    # The checkpoint is this dict plus config, args and rng: sample.py reads 'ema' and 'config' only.
    def state_dict(self):
        state = {'model': self.net.state_dict(), 'ema': self.ema.state_dict(), 'optimizer': self.optimizer.state_dict(),
                 'scaler': self.scaler.state_dict(), 'step': self.step,
                 'diffusion': self.diffusion.state_dict() if self.diffusion is not None else {}}
        if self.gan is not None:                # the discriminator only: LPIPS weights are frozen files
            state.update(discriminator=self.gan.discriminator.state_dict(), gan_optimizer=self.gan_optimizer.state_dict())
        return state

    def load_state_dict(self, state):
        self.net.load_state_dict(state['model'])
        self.ema.load_state_dict(state['ema'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scaler.load_state_dict(state['scaler'])
        if self.diffusion is not None:
            self.diffusion.load_state_dict(state.get('diffusion', {}))    # importance-sampling history
        if self.gan is not None:
            self.gan.discriminator.load_state_dict(state['discriminator'])
            self.gan_optimizer.load_state_dict(state['gan_optimizer'])
        self.step = state['step']


def build_trainee(args, config, device, world):
    """Network, EMA copy (starting equal), Diffusion, Adam and the AMP scaler for the run's task."""
    if config['task'] == 'autoencoder':
        return build_autoencoder_trainee(args, config, device, world)
    # The EMA starts as an exact copy; it is what grids, evaluation and sample.py use.
    net = build_network(config).to(device)
    ema = build_network(config).to(device).eval().requires_grad_(False)    # eval: no dropout, no RNG drawn
    ema.load_state_dict(net.state_dict())
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    amp_dtype, use_scaler = amp_settings(args, device)
    # DDP wraps the network for the loss only: the optimizer, EMA and checkpoints use the bare net.
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    return Trainee(net, ema, build_diffusion(config), optimizer, torch.amp.GradScaler('cuda', enabled=use_scaler),
                   model, amp_dtype)


# ----------------------------------------------------------------------------------------------------
# Algorithm 1. Everything else in this file exists to feed this function and to keep what it produces.

def train_step(run, micro_batches, args):
    """One optimizer step of Ho et al. 2020, Alg. 1 (in the sigma frame of Karras et al. 2022, Sec. 5).

    micro_batches: one dict per gradient-accumulation step with x0 (on the device), cond (the network's
    conditioning), generator (for sigma and noise) and, in --overfit-batch mode, fixed sigma and noise.
    Returns the per-sample (loss, sigma) of every micro-batch, or None when the step was skipped."""
    # Gradients of all micro-batches add up in .grad; each loss is divided by their number, so the sum is the
    # gradient of the mean over the whole batch, the same as one big batch would give.
    losses = []
    for i, b in enumerate(micro_batches):
        # In DDP the gradients need syncing only on the last micro-batch (nanoGPT): the others accumulate locally.
        last = i == len(micro_batches) - 1
        sync = run.model.no_sync() if run.model is not run.net and not last else nullcontext()
        with sync, torch.autocast(b['x0'].device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            # sigma ~ p_train, noise ~ N(0, I), loss = ||F - target||^2 per sample (Alg. 1 lines 2-5); reweighted
            # by the importance sampler inside Diffusion.loss when --t-sampler importance.
            loss, sigma = task_loss(run, b)
            run.scaler.scale(loss.mean() / len(micro_batches)).backward()
        losses.append((loss.detach(), sigma.detach()))
    # Every rank must take the same decision about skipping, so the loss is averaged over ranks first.
    step_loss = torch.stack([l.mean() for l, _ in losses]).mean()
    if dist.is_initialized():
        dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
    if not torch.isfinite(step_loss):
        skip_step(run)
        return None
    apply_update(run, args)
    return losses


def apply_update(run, args, extra_optimizer=None):
    """The gradient step every task shares (Alg. 1 line 5): undo fp16 loss scaling so that clipping sees the true
    gradients (a no-op when the scaler is off), clip, step, clear the gradients, update the EMA. extra_optimizer is
    stepped with the same scaler (the autoencoder's discriminator once its GAN loss is on)."""
    run.skipped = 0
    run.scaler.unscale_(run.optimizer)
    run.grad_norm = torch.nn.utils.clip_grad_norm_(run.net.parameters(), args.grad_clip if args.grad_clip > 0 else float('inf'))
    run.scaler.step(run.optimizer)
    if extra_optimizer is not None:
        run.scaler.step(extra_optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    update_ema(run.ema, run.net, ema_decay(run.step, args.ema_decay))


def task_loss(run, b):
    """Per-sample loss and sigma of one micro-batch: the diffusion loss, or for --task classifier the
    cross-entropy of the noise-conditional classifier on noised images (classifier.py, ADM Sec. 4)."""
    if isinstance(run.net, NoiseConditionalClassifier):
        return classifier_loss(run.model, run.diffusion, b['x0'], b['cond']['y'], b.get('sigma'), b.get('noise'),
                               b['generator'])
    return run.diffusion.loss(run.model, b['x0'], b.get('sigma'), b.get('noise'), generator=b['generator'], **b['cond'])


def skip_step(run):
    """A non-finite loss (fp16 overflow, a bad batch, a blown-up run): no update; stop after 10 in a row."""
    # The gradients of the bad step are dropped; with fp16 the loss scale halves, as GradScaler would.
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler.is_enabled():
        run.scaler.update(run.scaler.get_scale() / 2)
    run.skipped += 1
    warnings.warn(f'step {run.step}: non-finite loss, update skipped ({run.skipped} in a row)')
    if run.skipped >= 10:
        raise SystemExit(f'error: the loss was not finite for 10 steps in a row (steps {run.step - 9}..{run.step}). '
                         'The weights were not updated by those steps. Lower --lr, use --amp bf16 or none, or check '
                         'the data for NaNs; then --resume auto continues from the last checkpoint.')


def condition_batch(args, config, x0, y, g, augment_pipe, device):
    """The network's conditioning for one micro-batch: augmentation labels and class labels with dropout."""
    # The generator g is this micro-batch's stream 1: the same draws on every resume and on every machine.
    cond = {}
    if augment_pipe is not None:
        x0, aug_cond = augment_pipe(x0, generator=g)                 # ADA-style, labels to the net (EDM App. C.4)
        cond['aug_cond'] = aug_cond.to(device)
    if config['task'] == 'superres':                               # x_cond (+ level) made from x0 itself
        cond.update(superres_condition(config, x0, g, device))
    if config['data']['num_classes']:
        # label dropout (Ho & Salimans 2022); a classifier learns the true labels (the draw keeps the RNG stream)
        drop = (torch.rand(len(y), generator=g) < args.p_uncond) & (config['task'] != 'classifier')
        cond['y'] = torch.where(drop, torch.full_like(y, config['data']['num_classes']), y).to(device)
    return x0.to(device), cond


# ----------------------------------------------------------------------------------------------------
# Data: the training set (streamed when large), the held-out split, and the batches of every step.

def load_training_data(args):
    """The dataset; image folders bigger than --memory-budget GB decoded are streamed from disk (data.py)."""
    return data.load_dataset(args.dataset, data_dir=args.data_dir, split=args.split, resolution=args.resolution,
                             seed=args.seed, memory_budget=int(args.memory_budget * 2 ** 30))


def step_generator(args, step, rank, micro=0, stream=0):
    """The generator of one micro-batch: a pure function of (seed, step, rank), so resuming is exact.
    stream 0 draws the image indices (consumed by the loader), stream 1 the rest (augment, dropout, sigma, noise)."""
    return torch.Generator().manual_seed((((args.seed * 1_000_003 + step) * 4099 + rank) * 131 + micro) * 2 + stream)


def training_batches(args, dataset, train_index, rank, micro_batch, start_step):
    """Iterator of (x0, y) for every micro-batch from start_step on. The indices come from the (seed, step, rank,
    micro) generators, so a resumed run reads exactly the images an uninterrupted one would have."""
    # A generator, not a list: the DataLoader's workers prefetch from it, and each entry is a pure function of
    # (seed, step, rank, micro), so prefetching ahead never changes what a step trains on.
    k = joint_image_count(args, getattr(dataset, 'frames', 0))      # --image-share: clips to take images from
    def indices():
        for step in range(start_step, args.steps):
            for micro in range(args.grad_accum):
                g = step_generator(args, step, rank, micro, stream=0)
                videos = train_index[torch.randint(len(train_index), (micro_batch,), generator=g)]
                # Joint training draws its image sources after the videos, so the videos are those of a video-only run.
                yield torch.cat([videos, image_sources(args, dataset, train_index, videos, k, g)]) if k else videos
    return data.make_loader(dataset, indices(), args.workers)


# Joint video-image training (Ho et al. 2022, arXiv:2204.03458, Sec. 3): "concatenate random independent image frames
# to the end of each video ... and mask the attention in the temporal attention blocks", so one network learns videos
# and images at once; unet.py's num_video_frames builds that mask. The images are single frames of other training
# clips (of the video's class when there are classes, since the label conditions the whole sample).

def joint_image_count(args, frames):
    """Images appended to each F-frame video so they are a share s of its frames: round(s F / (1 - s))."""
    return round(args.image_share * frames / (1 - args.image_share)) if args.image_share and frames else 0


def image_sources(args, dataset, train_index, videos, k, g):
    """k random training clips per video (the same class as the video when the model is class-conditional)."""
    if args.unconditional or not dataset.num_classes:
        return train_index[torch.randint(len(train_index), (len(videos) * k,), generator=g)]
    labels = dataset.labels[train_index]
    order = torch.argsort(labels, stable=True)                       # training items grouped by class
    counts = torch.bincount(labels, minlength=dataset.num_classes)
    first = torch.cumsum(counts, 0) - counts                          # where each class starts in `order`
    c = dataset.labels[videos].repeat_interleave(k)                   # (B*k,) the class of each image's video
    r = (torch.rand(len(c), generator=g) * counts[c]).long()          # uniform within that class
    return train_index[order[first[c] + r]]


def joint_video_image_batch(x0, y, k, g):
    """B*(1+k) loaded clips -> (B videos with k independent images appended along the frame axis, their labels,
    num_video_frames F): frames [0, F) of each sample are its video, frames [F, F+k) one random frame each of its k
    source clips. With num_video_frames = F the U-Net's temporal attention keeps every image to itself."""
    B = len(x0) // (1 + k)
    videos, sources = x0[:B], x0[B:]                                  # (B, C, F, H, W), (B*k, C, F, H, W)
    frames = videos.shape[2]
    pick = torch.randint(frames, (B * k,), generator=g)               # one random frame per source clip
    images = sources[torch.arange(B * k), :, pick]                    # (B*k, C, H, W)
    images = images.reshape(B, k, *images.shape[1:]).transpose(1, 2)  # (B, C, k, H, W)
    return torch.cat([videos, images], dim=2), y[:B], frames


def load_batch(dataset, indices):
    """(x, y) of the given indices, streamed or in memory."""
    return next(iter(data.make_loader(dataset, [indices])))


def overfit_batches(args, dataset, train_index, diffusion, micro_batch, rank):
    """--overfit-batch: the same images, noise levels and noise at every step, so the loss must go to ~0."""
    # Drawn once, from the step-0 generators, so the overfit batch is the same on every resume.
    g = step_generator(args, 0, rank, stream=0)
    x0, y = load_batch(dataset, train_index[torch.randint(len(train_index), (micro_batch,), generator=g)])
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
            k = joint_image_count(args, config['data']['frames'])
            g_frames = torch.Generator().manual_seed(step_generator(args, step, rank, micro).initial_seed() + 2 ** 62)
            fixed['x0'], fixed['y'], video_frames = joint_video_image_batch(fixed['x0'], fixed['y'], k, g_frames)
        # Stream 1 of the same (seed, step, rank, micro): augmentation, label dropout, sigma and noise.
        g = step_generator(args, step, rank, micro, stream=1)
        x0, cond = condition_batch(args, config, fixed['x0'], fixed['y'], g, augment_pipe, device)
        if video_frames is not None:
            cond['num_video_frames'] = video_frames                   # the temporal attention mask (unet.py)
        out.append({'x0': x0, 'cond': cond, 'generator': g})
        if 'sigma' in fixed:
            out[-1].update(sigma=fixed['sigma'].to(device), noise=fixed['noise'].to(device))
    return out


# ----------------------------------------------------------------------------------------------------
# Bookkeeping: loss per noise level, the held-out loss, the log file.

class LossByNoiseLevel:
    """Mean loss in equal bins of log sigma between sigma_min and sigma_max, and the mean step loss, since the last
    log line. Training loss varies over orders of magnitude with sigma, so the total alone hides where a model
    improves (Karras et al. 2022, Fig. 5a shows the same per-sigma view)."""

    def __init__(self, sigma_min, sigma_max, n_buckets=8):
        self.lo, self.hi, self.n = math.log(sigma_min), math.log(sigma_max), n_buckets
        self.reset()

    # float64 sums: thousands of small losses added in float32 would lose their last digits.
    def reset(self):
        self.count = torch.zeros(self.n, dtype=torch.float64)          # samples per bucket
        self.total = torch.zeros(self.n, dtype=torch.float64)          # summed loss per bucket
        self.steps, self.step_loss = 0, 0.0

    def add(self, losses):
        """losses: the list of (per-sample loss, sigma) that train_step returns."""
        for loss, sigma in losses:
            # bucket index of each sample from its log sigma, clamped so sigma_min and sigma_max fall inside
            b = ((sigma.double().log().cpu() - self.lo) / (self.hi - self.lo) * self.n).long().clamp(0, self.n - 1)
            self.count.index_add_(0, b, torch.ones(len(b), dtype=torch.float64))
            self.total.index_add_(0, b, loss.double().cpu())
        self.steps += 1
        self.step_loss += torch.stack([l.mean() for l, _ in losses]).mean().item()

    def summary(self):
        """(mean step loss, {bucket centre sigma: mean loss}) since the last reset."""
        centre = lambda b: f'{math.exp(self.lo + (b + 0.5) * (self.hi - self.lo) / self.n):.3g}'
        by_sigma = {centre(b): round((self.total[b] / self.count[b]).item(), 5) for b in range(self.n) if self.count[b] > 0}
        return self.step_loss / max(self.steps, 1), by_sigma


def held_out_batch(dataset, val_index, diffusion, config, quiet=False):
    """A fixed batch with fixed noise levels and noise, so its loss is comparable from one evaluation to the next:
    the images' own labels (no label dropout), no augmentation, noise levels spread over the training
    distribution. Made once from held-out images and once from training images: the same network on both, so the
    two losses differ only by what the network has seen (a rising gap is the sign of memorisation).
    None when the dataset is too small to hold images out."""
    if len(val_index) == 0:
        if not quiet:
            print(f'{len(dataset)} images: too few to hold any out (20 needed), so no held-out loss is logged')
        return None
    g = torch.Generator().manual_seed(12345)
    x, y = load_batch(dataset, val_index[:256])
    n = len(x)
    # Evenly spread noise levels (quantiles 1%..99% of the training distribution), shuffled over the images.
    u = torch.linspace(0.01, 0.99, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    batch = {'x0': x, 'sigma': diffusion.schedule.sigma(u).float(), 'noise': torch.randn(x.shape, generator=g), 'cond': {}}
    if config['data']['num_classes']:
        batch['cond']['y'] = y.long()
    if config['net'].get('aug_dim'):
        batch['cond']['aug_cond'] = torch.zeros(n, config['net']['aug_dim'])
    if config['task'] == 'superres':                 # the clean conditioning image (level 0: aug_cond = 0 above)
        sr = config['superres']
        batch['cond']['x_cond'] = cascade.upsample(cascade.downsample(x, sr['low_res']), x.shape[-2:], sr['upsample'])
    return batch


@torch.no_grad()
def held_out_loss(run, batch, device):
    """The EMA network's loss on a fixed batch (held_out_batch); a classifier's is its cross-entropy."""
    to = lambda v: v.to(device)
    cond = {k: to(v) for k, v in batch['cond'].items()}
    if isinstance(run.ema, NoiseConditionalClassifier):
        return classifier_loss(run.ema, run.diffusion, to(batch['x0']), cond['y'], to(batch['sigma']),
                               to(batch['noise']))[0].mean().item()
    return run.diffusion.loss(run.ema, to(batch['x0']), to(batch['sigma']), to(batch['noise']), **cond)[0].mean().item()


@torch.no_grad()
def classifier_accuracy(run, batch, device):
    """--task classifier: held-out accuracy in 4 bands of log sigma (chance = 1 / classes), the check that the
    classifier knows the class where guidance will ask it (ADM Sec. 4)."""
    edges = torch.logspace(math.log10(run.diffusion.sigma_min), math.log10(run.diffusion.sigma_max), 5).tolist()
    rows = accuracy_by_noise_level(run.ema, run.diffusion, batch['x0'].to(device), batch['cond']['y'].to(device),
                                   edges, generator=torch.Generator().manual_seed(0))
    return {f'{lo:.3g}-{hi:.3g}': round(acc, 4) for lo, hi, acc in rows}


class Watcher:
    """Tells the user when a run has converged or started to memorise, from what the log already records.

    Memorisation: the held-out loss rises (least-squares slope over the last `window` evaluations, as
    evaluate.loss_gap_report computes it) while the loss on a fixed batch of training images falls: the network
    improves only on what it has seen. Convergence (--until-converged N): the in-training KID/FD has not improved
    by a relative margin for N evaluations in a row."""

    def __init__(self, patience=0, margin=0.02, window=5):
        self.patience, self.margin, self.window = patience, margin, window
        self.val, self.train, self.best, self.stale, self.warned = [], [], math.inf, 0, False

    def losses(self, val_loss, train_loss):
        """Record both fixed-batch losses; returns a warning string the first time memorisation shows."""
        import evaluate
        self.val.append(val_loss)
        self.train.append(train_loss)
        if self.warned or len(self.val) < self.window:
            return None
        gap = evaluate.loss_gap_report(self.train, self.val, self.window)
        train_slope = evaluate.loss_gap_report(self.val, self.train, self.window)['val_slope']
        if gap['val_rising'] and train_slope < 0:
            self.warned = True
            return (f"memorisation: the held-out loss rose over the last {self.window} evaluations (slope "
                    f"{gap['val_slope']:+.2e}) while the training-batch loss fell (gap {gap['gap']:+.4f}); "
                    'more data, augmentation (--aug-p) or an earlier checkpoint')
        return None

    def metric(self, value):
        """Record an evaluation score (lower is better); True when the run should stop (--until-converged)."""
        if value < self.best * (1 - self.margin):
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        return bool(self.patience) and self.stale >= self.patience


def parse_record(line):
    """A log line as a dict; a line torn by a kill mid-write reads as {} (dropped on resume)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return {}


class RunLog:
    """log.jsonl: one JSON record per line. On resume from step K, records after K (written by the interrupted
    run after its last checkpoint) are dropped first, so every step appears once."""

    def __init__(self, path, step):
        self.path = path
        # Keep the records up to the step we restart from; an interrupted run may have logged beyond it.
        if os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and parse_record(line).get('step', math.inf) <= step]
            write_text(path, ''.join(keep))
        self.file = open(path, 'a')

    # Flushed per record: a killed run loses at most the line being written.
    def write(self, record):
        try:
            self.file.write(json.dumps(record) + '\n')
            self.file.flush()
        except OSError as e:
            raise disk_full(self.path, e) if e.errno == errno.ENOSPC else e

    def close(self):
        self.file.close()


# ----------------------------------------------------------------------------------------------------
# The run folder: never reuse one silently, checkpoints that are always loadable, and exact resume.

# A full disk is the common failure of long runs; its message says what survived and how to continue.
def disk_full(path, e, keep=''):
    return SystemExit(f'error: disk full while writing {path} ({e.strerror}); the partial file was removed{keep}. '
                      'Free space, then rerun with --resume auto.')


# Used to rewrite log.jsonl on resume: a crash while rewriting must not lose the old records.
def write_text(path, text):
    """Atomic text write (temp file + rename)."""
    # Written next to the target so the rename stays within one file system.
    tmp = path + '.tmp'
    try:
        with open(tmp, 'w') as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise disk_full(path, e) if e.errno == errno.ENOSPC else e


def save_checkpoint(path, state):
    """Write to a temporary file and rename: a crash never leaves a half-written checkpoint (rename is atomic), and
    a full disk removes the temporary file and leaves the previous checkpoint as it was."""
    # Same folder as the target, so os.replace is a rename within one file system (atomic on POSIX and Windows).
    tmp = path + '.tmp'
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if e.errno == errno.ENOSPC:
            raise disk_full(path, e, f'; {path} still holds the previous checkpoint' if os.path.exists(path) else '') from None
        raise SystemExit(f'error: cannot write checkpoint {path}: {e}') from None


def weights_problem(run):
    """Why the weights must not be saved (non-finite, or exploded past MAX_WEIGHT), or None; raw and EMA."""
    # Both the raw weights (resumed from) and the EMA (sampled): either one broken makes the checkpoint useless.
    for name, module in (('weights', run.net), ('EMA weights', run.ema)):
        for key, p in module.state_dict().items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                return f'the {name} are not finite ({key})'
            if p.is_floating_point() and p.numel() and p.abs().max() > MAX_WEIGHT:
                return f'the {name} exploded (max |{key}| = {p.abs().max().item():.3g} > {MAX_WEIGHT:g})'
    return None


def prepare_run_folder(args):
    """Create --out, refusing a folder that holds another run unless told what to do with it; returns
    (checkpoint path, checkpoint to resume from or None)."""
    # Checked before any data is read: a wrong --out must fail in a second, not after the dataset loads.
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f'error: --out {args.out!r} is a file; give a folder for the run')
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, '.write_test')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f'error: cannot write to --out {args.out!r}: {e.strerror or e}') from None
    # --resume auto means: this folder's checkpoint if there is one, else a fresh start in this folder.
    ckpt_path = os.path.join(args.out, 'ckpt.pt')
    resume = ckpt_path if args.resume == 'auto' and os.path.exists(ckpt_path) else (None if args.resume == 'auto' else args.resume)
    has_run = os.path.exists(ckpt_path) or os.path.exists(os.path.join(args.out, 'log.jsonl'))
    continues_it = resume is not None and os.path.abspath(resume) == os.path.abspath(ckpt_path)
    # A folder with a checkpoint or a log holds someone's run: a new run there would replace its checkpoint
    # and mix two runs in one log. Only an explicit --overwrite (or continuing it) may touch it.
    if has_run and not continues_it and args.resume != 'auto':
        if not args.overwrite:
            raise SystemExit(f'error: {args.out} already holds a run (ckpt.pt / log.jsonl). Use --resume auto to continue '
                             f'it, a new --out for a new run, or --overwrite to replace it.')
        for name in os.listdir(args.out):                               # --overwrite: the old run's own files go
            if name in ('ckpt.pt', 'log.jsonl') or (name.endswith(('.png', '.pt')) and name.startswith(('samples_', 'ckpt_'))):
                os.remove(os.path.join(args.out, name))
        print(f'--overwrite: removed the previous run in {args.out}')
    return ckpt_path, resume


# Class names may be re-spelt (a renamed folder) without changing what was learnt, so they are not compared.
def config_mismatch(a, b, prefix=''):
    """Keys where two nested configs differ, as readable strings."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_mismatch(va, vb, f'{prefix}{k}.')
        elif va != vb and k not in ('class_names', 'scale_factor', 'shift_factor'):   # latent scale: measured at the end
            out.append(f'{prefix}{k}: checkpoint has {va!r}, this run has {vb!r}')
    return out


def resume_run(run, path, config, args, world, device):
    """Restore every owner's state from a checkpoint of the same configuration. Flags that change what an
    uninterrupted run would do (RESUME_FLAGS, the number of processes) must match unless --allow-changes."""
    ckpt = load_checkpoint(path, device)
    diff = config_mismatch(ckpt['config'], config)
    if diff:
        raise SystemExit(f'error: {path} was trained with another configuration:\n  ' + '\n  '.join(diff) +
                         '\nUse the same flags as that run, or a new --out.')
    # The config (network, diffusion, data) must match exactly; the optimisation flags may change only knowingly.
    old = ckpt.get('args', {})
    # Flags missing from an old checkpoint's args are not compared (older runs stored fewer).
    changed = [f"--{k.replace('_', '-')}: run had {old[k]!r}, now {getattr(args, k)!r}" for k in RESUME_FLAGS
               if k in old and old[k] != getattr(args, k)]
    if len(ckpt.get('rng', [])) not in (0, world):
        changed.append(f"processes: run had {len(ckpt['rng'])}, now {world}")
    if changed and not args.allow_changes:
        raise SystemExit(f'error: resuming {path} with other settings than the run used:\n  ' + '\n  '.join(changed) +
                         '\nUse the run\'s values, or --allow-changes to continue with these (no longer identical '
                         'to an uninterrupted run).')
    if changed:
        print('resuming with changed settings (the result is no longer that of an uninterrupted run):\n  ' + '\n  '.join(changed))
    # A checkpoint stripped to weights (for sharing) samples fine but cannot continue a run exactly.
    missing = [k for k in ('optimizer', 'scaler', 'step', 'rng') if k not in ckpt]
    if missing:
        raise SystemExit(f'error: {path} cannot be resumed: it lacks {", ".join(missing)} (a sampling-only checkpoint?)')
    # Each owner restores its own state; this rank's dropout RNG comes last, as the run saved it.
    run.load_state_dict(ckpt)
    set_rng_state(ckpt['rng'][dist.get_rank() % len(ckpt['rng']) if dist.is_initialized() else 0], device)
    return ckpt['step']


# Dropout draws from the global torch RNG (not from the step generators), so its state is part of the
# checkpoint; each rank has its own, seeded seed + rank.
def rng_states(device, world):
    """Every rank's dropout RNG (CPU and CUDA), gathered to rank 0 for an exact resume."""
    rng = {'cpu': torch.get_rng_state()}
    if device.type == 'cuda':
        rng['cuda'] = torch.cuda.get_rng_state(device)
    if world == 1:
        return [rng]
    states = [None] * world
    dist.all_gather_object(states, rng)
    return states


def set_rng_state(rng, device):
    torch.set_rng_state(rng['cpu'].cpu())
    if 'cuda' in rng and device.type == 'cuda':
        torch.cuda.set_rng_state(rng['cuda'].cpu(), device)


def checkpoint(run, config, args, path, world, device, is_main, last_good):
    """Save the run, unless its weights are not finite or exploded: then the last good checkpoint stays and the
    run stops with the reason (every rank checks, so all stop together)."""
    # Checked on every rank before any collective, so all ranks stop together instead of hanging.
    problem = weights_problem(run)
    if problem:
        raise SystemExit(f'error: step {run.step}: {problem}. Not saved: {path} still holds step {last_good}. '
                         'Lower --lr (or --warmup longer), then --resume auto --allow-changes.')
    # The RNG of every rank is gathered (a collective: all ranks call it), then rank 0 writes the file.
    rng = rng_states(device, world)
    if is_main:
        state = dict(run.state_dict(), config=config, args={k: v for k, v in vars(args).items() if k != 'device_obj'}, rng=rng)
        save_checkpoint(path, state)
        if run.step == args.save_early:                              # a kept early model (autoguidance)
            save_checkpoint(os.path.join(args.out, f'ckpt_{run.step:07d}.pt'), state)
    return run.step


# ----------------------------------------------------------------------------------------------------
# Sample grids and in-training evaluation, both through sample.generate.

def sample_grid(ema, diffusion, config, args, path, device, probe=None):
    """A grid of EMA samples: one row per class (up to 10) when conditional, else a square."""
    if config['task'] == 'superres':                 # an SR stage needs low-res inputs: those of the probe images
        return superres_grid(ema, diffusion, config, args, probe, path, device)
    num_classes, d = config['data']['num_classes'], config['data']
    # Classes in rows, 8 samples each, always from the same seed: successive grids show the same noise maturing.
    n_rows = min(num_classes, 10) if num_classes else 8
    labels = torch.arange(n_rows).repeat_interleave(8) if num_classes else None
    n = 8 * n_rows
    if d.get('frames'):                                         # videos: one row of frames each, up to 4
        labels = labels[::8][:4] if labels is not None else None
        n = len(labels) if labels is not None else 4
    images = generate(ema, diffusion, n, sample.sample_shape(config), device, labels, num_classes, args.sampler,
                      args.sample_steps, args.guidance, seed=args.seed, aug_dim=config['net'].get('aug_dim', 0),
                      sampler_options=args.sampler_options, decode=sample.latent_decoder(config, device))
    sample.save_grid(images, path, nrow=8)


def setup_evaluation(args, dataset, train_index, config, device):
    """Feature network and reference statistics of the training images, for KID/FD during training (evaluate.py)."""
    import evaluate
    # Reference statistics from (up to) 10,000 training images, computed once per run.
    x, y = load_batch(dataset, train_index[:2000 if getattr(dataset, 'frames', 0) else 10000])
    if x.ndim == 5 or args.eval_network == 'i3d':                  # videos: I3D, or an image network on every frame
        model = video_eval_network(args, x, y, config, device)
    elif args.eval_network == 'lenet':
        if not config['data']['num_classes']:
            raise SystemExit('error: --eval-network lenet trains a classifier on the labels; this dataset has none. '
                             'Use --eval-network inception.')
        model = evaluate.train_classifier((x + 1) / 2, y, config['data']['num_classes'], steps=300, seed=args.seed)
    else:
        model = evaluate.load_inception(args.inception_weights, device)
    feats = evaluate.extract_features((x + 1) / 2, model.to(device), device=device, progress=False)
    return model, evaluate.compute_statistics(feats, network=model.name), y


def video_eval_network(args, x, y, config, device):
    """The feature network for evaluating a video model on videos x (N, C, F, H, W): I3D (scores FVD, KVD), or an
    image network on every frame (frame-FID, frame-FD_lenet; the LeNet trained on the frames, labelled by video)."""
    import evaluate
    if x.ndim != 5:
        raise SystemExit('error: --eval-network i3d scores videos; this dataset holds images')
    if args.eval_network == 'i3d':
        return evaluate.VideoFeatures(evaluate.load_i3d(args.i3d_weights, device))
    if args.eval_network == 'inception':
        return evaluate.FrameFeatures(evaluate.load_inception(args.inception_weights, device))
    if not config['data']['num_classes']:
        raise SystemExit('error: --eval-network lenet trains a classifier on the labels; this dataset has none. '
                         'Use --eval-network inception or i3d.')
    frames = x.transpose(1, 2).flatten(0, 1)                        # (N*F, C, H, W), each frame with its video's class
    lenet = evaluate.train_classifier((frames + 1) / 2, y.repeat_interleave(x.shape[2]), config['data']['num_classes'],
                                      steps=300, seed=args.seed)
    return evaluate.FrameFeatures(lenet)


def run_evaluation(args, ema, diffusion, config, eval_state, step, device):
    """KID and FD of args.eval_samples EMA samples, labels drawn from the data's own label distribution."""
    import evaluate
    model, ref, train_labels = eval_state
    d = config['data']
    g = torch.Generator().manual_seed(args.seed)
    # Labels drawn from the data's own label frequencies, fixed by the seed, so evaluations compare over steps.
    labels = train_labels[torch.randint(len(train_labels), (args.eval_samples,), generator=g)] if d['num_classes'] else None
    starts = iter(range(0, args.eval_samples, 250))
    decode = sample.latent_decoder(config, device)             # latent models: scored as decoded images

    def make(n):                                                # batch k: seed + 1 + its first index, as sample.py
        start = next(starts)
        return generate(ema, diffusion, n, sample.sample_shape(config), device,
                        None if labels is None else labels[start:start + n], d['num_classes'], args.sampler,
                        args.sample_steps, args.guidance, seed=args.seed + 1 + start,
                        aug_dim=config['net'].get('aug_dim', 0), sampler_options=args.sampler_options, decode=decode)
    results = evaluate.evaluate_generator(make, ref, model, args.eval_samples, batch_size=250, device=device)
    print(evaluate.format_results(results, args.eval_samples, int(ref['num_images']), getattr(model, 'resize', 'legacy'), 'training images',
                                  'labels drawn from the data' if labels is not None else None))
    return {'step': step, 'eval': {k: float(v) for k, v in results.items()}, 'eval_samples': args.eval_samples,
            'eval_network': model.name, 'guidance': args.guidance}


# ----------------------------------------------------------------------------------------------------
# Super-resolution stages of a cascade (cascade.py). --task superres trains D(x, sigma | z) with z the image
# area-downsampled to --low-res on the fly and upsampled into x_cond; with --noise-aug-max > 0 z is first corrupted
# at a random level t ~ U[0, max] that the network also sees, through aug_cond (noise conditioning augmentation).
# sample.py --cascade runs the stage after a base model.

def superres_config(args, dataset, num_classes):
    """The network of an SR stage (x_cond channels, level embedding) and config['superres'] for sample.py."""
    if getattr(dataset, 'frames', 0):
        raise SystemExit('error: --task superres works on images; this dataset holds videos')
    if args.low_res >= dataset.resolution:
        raise SystemExit(f'error: --low-res {args.low_res} must be smaller than the training resolution {dataset.resolution}')
    # Without noise augmentation the network gets no level input at all (aug_dim 0), as the papers' plain SR stage.
    aug_dim = args.noise_aug_dim if args.noise_aug_max > 0 else 0
    name, net = network_config(args, dataset, num_classes, aug_dim)
    net = dict(net, cond_channels=dataset.channels)             # x_cond: the upsampled low-res image
    return name, net, {'low_res': args.low_res, 'noise_aug_max': args.noise_aug_max, 'aug_dim': aug_dim,
                       'upsample': args.upsample}


def superres_condition(config, x0, generator, device):
    """x_cond (and aug_cond at a random level) for one training micro-batch of high-resolution images x0."""
    # The low-res image is made from the batch itself, so any dataset trains an SR stage; the generator makes the
    # random augmentation levels part of the exact-resume stream.
    sr = config['superres']
    cond = cascade.training_condition(x0, sr['low_res'], sr['noise_aug_max'], sr['aug_dim'], generator=generator,
                                      mode=sr['upsample'])
    return {k: v.to(device) for k, v in cond.items()}


def superres_probe(dataset, val_index, train_index):
    """8 fixed held-out images (training images when none are held out) whose SR the grids show."""
    return load_batch(dataset, (val_index if len(val_index) else train_index)[:8])


@torch.no_grad()
def superres_grid(ema, diffusion, config, args, probe, path, device):
    """Three rows: the low-res inputs (nearest-upsampled), the EMA stage's SR of them (level 0), the real images."""
    # Level 0 at sampling: the grid shows the stage on clean low-res inputs (cascades choose their own level).
    sr, (x, y) = config['superres'], probe
    z = cascade.downsample(x, sr['low_res'])
    num_classes = config['data']['num_classes']
    images = generate(ema, diffusion, len(x), tuple(x.shape[1:]), device, y if num_classes else None, num_classes,
                      args.sampler, args.sample_steps, args.guidance, seed=args.seed, aug_dim=sr['aug_dim'],
                      sampler_options=args.sampler_options,
                      cond={'x_cond': cascade.upsample(z, x.shape[-2:], sr['upsample'])})
    sample.save_grid(torch.cat([cascade.upsample(z, x.shape[-2:], 'nearest'), images, x]), path, nrow=len(x))


# ----------------------------------------------------------------------------------------------------
# Autoencoders (vae.py). --task autoencoder trains one with the same machinery (AMP, EMA, DDP, exact resume);
# --autoencoder CKPT trains diffusion in its latent space. Latents are encoded ONCE, before training (the
# posterior mean, scaled by the latent scale recorded in CKPT) and cached in memory: the encoder then costs
# nothing per step and every step of a resumed run sees the same latents. Grids and evaluation decode through it.

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
    """(LatentDataset, record for the config): every image through the frozen autoencoder of --autoencoder."""
    ae = sample.load_autoencoder(args.autoencoder, device)
    if dataset.channels != ae.config['in_channels'] or dataset.resolution % ae.downsample_factor:
        raise SystemExit(f"error: --autoencoder {args.autoencoder} takes {ae.config['in_channels']}-channel images "
                         f'with sides divisible by {ae.downsample_factor}; {args.dataset} has {dataset.channels} '
                         f'channels at {dataset.resolution}x{dataset.resolution}')
    # Chunks bound the memory of the encoder's activations; the latents themselves are small (f^2 fewer pixels).
    latents, labels = [], []
    for start in range(0, len(dataset), chunk):
        x, y = load_batch(dataset, torch.arange(start, min(start + chunk, len(dataset))))
        latents.append(ae.encode(x.to(device)).cpu())
        labels.append(torch.as_tensor(y))
    latents = torch.cat(latents)
    # Recorded in the config so sample.py finds the decoder, and checks it is the very file trained on.
    record = {'path': os.path.abspath(args.autoencoder), 'sha256': pretrained.sha256_of(args.autoencoder),
              'config': ae.config, 'latent_shape': list(latents.shape[1:])}
    print(f'--autoencoder: {len(latents)} images encoded once to latents {tuple(latents.shape[1:])} '
          f'(mean {latents.mean():.3f}, std {latents.std():.3f} after the recorded scale)')
    return LatentDataset(latents, torch.cat(labels), getattr(dataset, 'class_names', ())), record


def autoencoder_config(args, dataset):
    """The vae.py configuration (--vae-config, --vq) for this dataset's channels, checked against its size."""
    name = args.vae_config or ('vq-f4' if args.vq else 'kl-f4')
    ae = vae.autoencoder_config(name, in_channels=dataset.channels, **({'kind': 'vq'} if args.vq else {}))
    factor = 2 ** (len(ae['channel_mult']) - 1)
    if dataset.resolution % factor:
        raise SystemExit(f"error: resolution {dataset.resolution} does not suit autoencoder '{name}': it needs a "
                         f'multiple of its downsampling factor {factor}')
    return name, ae


def build_autoencoder_loss(args, config, device):
    """vae.AutoencoderLoss: L1 (+ LPIPS when its weights are here) + KL / VQ loss + PatchGAN from --gan-start."""
    perceptual = None
    if args.lpips != 'off':
        try:   # 'auto': use the weights if they are on this machine, never download; a folder must hold them
            perceptual = vae.load_lpips(None if args.lpips == 'auto' else args.lpips, device, download=False)
        except FileNotFoundError as e:
            if args.lpips != 'auto':
                raise SystemExit(f'error: {e}') from None
            print('LPIPS weights not found: training with L1 + GAN (see vae.find_lpips_weights to add them)')
    # KL models weigh their KL term, VQ models their codebook loss: one weight flag each.
    kind = config['net']['kind']
    # PatchGAN depth: 3 strided layers (70x70 patches) from 32x32 up; fewer on smaller images, which they would
    # shrink below the 4x4 kernels
    layers = max(1, min(3, int(math.log2(config['data']['resolution'])) - 2))
    return vae.AutoencoderLoss(kind, args.kl_weight if kind == 'kl' else args.codebook_weight, args.disc_weight,
                               args.gan_start, perceptual, in_channels=config['net']['in_channels'],
                               disc_layers=layers).to(device)


def train_step_autoencoder(run, micro_batches, args):
    """One step of the first-stage objective (vae.AutoencoderLoss; LDM App. G, VQGAN Sec. 3): the autoencoder on
    L1 (+ LPIPS) + KL or VQ loss + VQGAN's adaptively weighted GAN loss, then the PatchGAN on the hinge loss.
    Returns [(loss, logs)] per micro-batch, or None when the step was skipped."""
    out = []
    for i, b in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = run.model.no_sync() if run.model is not run.net and not last else nullcontext()
        with sync, torch.autocast(b['x0'].device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            x_hat, reg, info = run.model(b['x0'])
            loss, logs = run.gan.generator_loss(b['x0'], x_hat, reg, run.step, run.net.last_layer())
            run.scaler.scale(loss / len(micro_batches)).backward()
            # The discriminator learns from the same reconstructions, detached (its own optimizer, below).
            d_loss, d_logs = run.gan.discriminator_loss(b['x0'], x_hat, run.step)
            if d_loss is not None:
                run.scaler.scale(d_loss / len(micro_batches)).backward()
        logs.update(d_logs, **{k: float(v) for k, v in info.items() if k in ('perplexity', 'usage')})
        out.append((loss.detach().reshape(1), logs))
    # As in train_step: every rank decides to skip (or not) on the same averaged loss.
    step_loss = torch.stack([l for l, _ in out]).mean()
    if dist.is_initialized():
        dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        for p in run.gan.discriminator.parameters():      # the discriminator is not DDP-wrapped: average by hand
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    if not torch.isfinite(step_loss):
        run.gan_optimizer.zero_grad(set_to_none=True)
        skip_step(run)
        return None
    # The discriminator steps only once the GAN loss is on (--gan-start): before that its gradients are zero.
    apply_update(run, args, run.gan_optimizer if run.gan.gan_active(run.step) else None)
    run.gan_optimizer.zero_grad(set_to_none=True)
    return out


class AutoencoderTracker:
    """Means of the loss parts (rec, reg, g_loss, d_loss, gan_weight, perplexity, usage) since the last log line;
    the same add/summary/reset/steps interface as LossByNoiseLevel."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.counts, self.steps, self.step_loss = {}, {}, 0, 0.0

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
    """PSNR (dB) of the EMA autoencoder's reconstructions of held-out images in [-1, 1]: 10 log10(2^2 / MSE)."""
    x = images.to(device)
    # Raw (unscaled) latents: the reconstruction does not depend on the latent scale.
    x_hat = ema.decode_raw(ema.encode_raw(x)).clamp(-1, 1)
    return (10 * torch.log10(4.0 / ((x - x_hat) ** 2).flatten(1).mean(1))).mean().item()


@torch.no_grad()
def reconstruction_grid(ema, images, path, device):
    """Originals and their reconstructions in alternate rows (8 per row)."""
    x = images[:32].to(device)
    x_hat = ema.decode_raw(ema.encode_raw(x)).clamp(-1, 1)
    rows = [t for i in range(0, len(x), 8) for t in (x[i:i + 8], x_hat[i:i + 8])]
    sample.save_grid(torch.cat(rows).cpu(), path, nrow=8)


@torch.no_grad()
def measure_latent_scale(run, config, dataset, train_index, device):
    """After training: the latent scale (1 / std of the EMA model's latents on up to 1024 training images, LDM
    Sec. 4.3.2) goes into the EMA and raw models and into config['net'], so the final checkpoint carries it."""
    # 1024 images estimate a standard deviation to about 2%, plenty for a scale factor.
    index = train_index[:1024]
    batches = (load_batch(dataset, index[i:i + 256])[0].to(device) for i in range(0, len(index), 256))
    scale = vae.compute_latent_scale(run.ema, batches)
    for model in (run.ema, run.net):
        model.set_latent_scale(**scale)
    config['net'] = dict(run.ema.config)
    return scale['scale_factor']


def build_autoencoder_trainee(args, config, device, world):
    """--task autoencoder: the autoencoder, its EMA, Adam (betas 0.5, 0.9 as LDM/VQGAN), and the loss module with
    the PatchGAN discriminator and its own Adam; no Diffusion."""
    net = vae.Autoencoder(**config['net']).to(device)
    ema = vae.Autoencoder(**config['net']).to(device).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    # beta1 = 0.5: the GAN literature's choice, since momentum fights the discriminator's moving target.
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=args.weight_decay)
    gan = build_autoencoder_loss(args, config, device)
    gan_optimizer = torch.optim.Adam(gan.discriminator.parameters(), lr=args.lr, betas=(0.5, 0.9))
    amp_dtype, use_scaler = amp_settings(args, device)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    return Trainee(net, ema, None, optimizer, torch.amp.GradScaler('cuda', enabled=use_scaler), model, amp_dtype,
                   gan=gan, gan_optimizer=gan_optimizer)


# ----------------------------------------------------------------------------------------------------
# Processes and devices.

def setup_distributed(args):
    """One process, or one per GPU/CPU slot under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE)."""
    # Without torchrun: one process on the requested (or best available) device.
    if 'RANK' not in os.environ:
        device = args.device_obj or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise SystemExit(f'error: --device {args.device} but this machine has no CUDA GPU; use --device cpu')
        return 0, 1, device
    # NCCL between GPUs; gloo lets the same script run several CPU processes (and the DDP test).
    backend = 'nccl' if torch.cuda.is_available() and args.device != 'cpu' else 'gloo'
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == 'nccl':
        torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
    else:
        device = torch.device('cpu')
    return rank, world, device


def amp_settings(args, device):
    """(autocast dtype or None, use a gradient scaler?): bf16 if the GPU has it, fp16 + scaler otherwise."""
    # CPU autocast (bf16) is slower than fp32 on most CPUs, so CPU always trains in fp32.
    if device.type != 'cuda' or args.amp == 'none':
        return None, False
    # bf16 has fp32's exponent range, so it needs no loss scaling; fp16 does (GradScaler).
    if args.amp == 'bf16' or (args.amp == 'auto' and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def check_replicas(run, world, log, is_main):
    """DDP keeps the replicas identical by averaging gradients; check it, since a silent divergence (a buffer
    updated on one rank only, a rank-dependent branch) ruins a run without any error."""
    # One float64 sum per replica is enough to see a divergence, and cheap to gather.
    checksum = torch.stack([p.detach().double().sum() for p in run.net.parameters()]).sum().cpu()
    sums = [None] * world
    dist.all_gather_object(sums, checksum.item())
    if is_main:
        log.write({'step': run.step, 'ddp_param_checksums': sums})
        if max(sums) - min(sums) > 1e-6 * (1 + abs(sums[0])):
            warnings.warn(f'DDP replicas diverged: parameter checksums {sums}')


# ----------------------------------------------------------------------------------------------------
# The main function, phase by phase.

def held_out_record(run, held_out, train_probe, watcher, device, bar):
    """The log record of the fixed held-out and training batches (the same network, noise and labels), plus the
    classifier's accuracy by noise level; warns once when the two losses start to diverge (memorisation)."""
    # Same noise, same network, same labels on both batches: their gap is memorisation, not noise.
    record = {'step': run.step, 'val_loss': held_out_loss(run, held_out, device)}
    if train_probe is not None:
        record['train_loss_fixed'] = held_out_loss(run, train_probe, device)
        warning = watcher.losses(record['val_loss'], record['train_loss_fixed'])
        if warning:
            bar.write(f'step {run.step}: {warning}')
            record['memorisation_warning'] = warning
    if isinstance(run.ema, NoiseConditionalClassifier):
        record['val_accuracy_by_sigma'] = classifier_accuracy(run, held_out, device)
    return record


def primary_score(record):
    """The score --until-converged watches: KID-type if present (reliable at 2,000 samples), else the first FD."""
    # KID's estimate is unbiased at any sample count, FD's is not: KID is the better stopping signal.
    scores = record.get('eval', {})
    for key in sorted(scores, key=lambda k: ('K' not in k.split('_')[0], k)):
        return scores[key]
    return math.inf


def redraw_log_picture(log_path):
    """log.png next to log.jsonl (plots.py); a picture that cannot be drawn never stops a run."""
    try:
        plot_training_log(log_path)
    except (OSError, ValueError) as e:
        warnings.warn(f'could not draw {log_path} as a picture: {e}')


@torch.no_grad()
def final_reports(args, run, config, dataset, train_index, val_index, log, device):
    """End of run: a classifier's accuracy by noise level; bits/dim of discrete VP models (Ho et al. 2020, Table 2's
    NLL); for small image datasets, evaluate.py's memorisation report (nearest training image of each sample)."""
    import evaluate
    from diffusion import bits_per_dim
    # Held-out images when there are any; tiny datasets fall back to training images (and say so in the log).
    held = val_index if len(val_index) else train_index
    if config['task'] == 'classifier':
        batch = held_out_batch(dataset, held, run.diffusion, config, quiet=True)
        acc = classifier_accuracy(run, batch, device)
        log.write({'step': run.step, 'val_accuracy_by_sigma': acc})
        print(f"held-out accuracy by sigma band (chance {1 / config['data']['num_classes']:.3f}): "
              + ', '.join(f'{k}: {v:.3f}' for k, v in acc.items()))
        return
    if config['task'] != 'diffusion' or config.get('autoencoder'):
        return
    if config['diffusion'].get('T') and args.bpd_images:
        # The full bound, T calls per image, on held-out images; unconditional (the null class) like DDPM's number.
        x0 = load_batch(dataset, held[:args.bpd_images])[0].to(device)
        cond = {'y': torch.full((len(x0),), config['data']['num_classes'], device=device)} if config['data']['num_classes'] else {}
        if config['net'].get('aug_dim'):
            cond['aug_cond'] = torch.zeros(len(x0), config['net']['aug_dim'], device=device)
        bpd = bits_per_dim(run.diffusion.denoiser(run.ema), x0, run.diffusion.schedule,
                           generator=torch.Generator().manual_seed(0), **cond).mean().item()
        log.write({'step': run.step, 'bits_per_dim': bpd, 'bpd_images': len(x0)})
        print(f'bits/dim (variational bound, {len(x0)} held-out images, T = {run.diffusion.schedule.T}): {bpd:.3f}')
    if len(dataset) < args.memorization_below and not config['data'].get('frames'):
        # Samples next to their nearest training images: a ratio d1/d2 < 1/3 marks a near-copy (evaluate.py).
        n = 64
        labels = torch.arange(n) % config['data']['num_classes'] if config['data']['num_classes'] else None
        samples = generate(run.ema, run.diffusion, n, sample.sample_shape(config), device, labels,
                           config['data']['num_classes'], args.sampler, args.sample_steps, args.guidance,
                           seed=args.seed + 7, aug_dim=config['net'].get('aug_dim', 0), sampler_options=args.sampler_options)
        train_x = load_batch(dataset, train_index[:5000])[0]
        report = evaluate.memorization_check((samples + 1) / 2, (train_x + 1) / 2)['pixel']
        path = os.path.join(args.out, 'nearest_pairs.png')
        evaluate.save_nearest_pairs((samples + 1) / 2, (train_x + 1) / 2, report['nearest'], report['ratio'], path)
        log.write({'step': run.step, 'near_copies': report['share'], 'memorisation_samples': n})
        print(f"memorisation: {report['share']:.1%} of {n} samples are near-copies of a training image "
              f"(nearest/second-nearest distance < 1/3; pairs, closest first, in {path})")


def describe_run(args, config, run, dataset, train_index, val_index, device, world):
    """One line at the start: model, size, data, diffusion settings, device, processes, precision."""
    print(f"{config['model']} '{config['config_name']}' {sum(p.numel() for p in run.net.parameters()) / 1e6:.2f}M "
          f"parameters; {args.dataset}: {len(train_index)} training + {len(val_index)} held-out images "
          f"{dataset.channels}x{dataset.resolution}x{dataset.resolution}, {config['data']['num_classes']} classes; "
          f"{config['diffusion']}; device {device}, {world} process(es), AMP {run.amp_dtype or 'off'}")


def evaluate_and_watch(args, run, config, eval_state, watcher, log, bar, device):
    """KID/FD of the EMA model into the log; True when --until-converged sees no more progress (this step is the
    last: args.steps is set to it, so the final checkpoint and grid follow)."""
    record = run_evaluation(args, run.ema.eval(), run.diffusion, config, eval_state, run.step, device)
    log.write(record)
    if watcher.metric(primary_score(record)) and run.step < args.steps:
        bar.write(f'step {run.step}: converged: the evaluation score has not improved by '
                  f'{args.converge_margin:.0%} for {args.until_converged} evaluations; stopping here')
        args.steps = run.step
        return True
    return False


def held_out_batches(args, config, dataset, train_index, val_index, run):
    """(held-out batch, training probe): an autoencoder's held-out images (PSNR, reconstruction grids); for diffusion
    the fixed held-out batch and the same kind of batch made of training images, whose losses side by side show
    memorisation. (None, None) when --val-every 0."""
    if config['task'] == 'autoencoder':
        return load_batch(dataset, val_index[:256] if len(val_index) else train_index[:32])[0], None
    held_out = held_out_batch(dataset, val_index, run.diffusion, config) if args.val_every else None
    if held_out is None:
        return None, None
    return held_out, held_out_batch(dataset, train_index, run.diffusion, config, quiet=True)


def report_latent_scale(run, config, dataset, train_index, device, bar):
    """--task autoencoder, last step: measure the latent scale (into the final checkpoint) and say it."""
    scale = measure_latent_scale(run, config, dataset, train_index, device)
    if bar is not None:
        bar.write(f'step {run.step}: latent scale factor {scale:.5g} (1 / std of the latents)')


def write_grid(run, config, args, held_out, probe, path, device):
    """The picture of the EMA model at this step: an autoencoder's reconstructions, else samples (an SR stage's
    upsampling of the probe images when it is one)."""
    if config['task'] == 'autoencoder':
        reconstruction_grid(run.ema, held_out, path, device)
    else:
        sample_grid(run.ema.eval(), run.diffusion, config, args, path, device, probe)


def main(args):
    # Setup: every flag checked before anything slow; processes, device, the dropout RNG (saved on resume).
    check_args(args)
    rank, world, device = setup_distributed(args)
    is_main = rank == 0
    torch.manual_seed(args.seed + rank)
    # The global batch splits evenly over processes and accumulation steps, or the effective batch would differ.
    if args.batch_size % (world * args.grad_accum):
        raise SystemExit(f'error: --batch-size {args.batch_size} must be divisible by processes x --grad-accum = {world * args.grad_accum}')
    micro_batch = args.batch_size // (world * args.grad_accum)
    ckpt_path, resume = prepare_run_folder(args) if is_main else (os.path.join(args.out, 'ckpt.pt'), None)
    # Rank 0 alone looks at the run folder (one process decides); the others learn its decision.
    if world > 1:                                    # every rank resumes from what rank 0 decided
        resume = [resume]
        dist.broadcast_object_list(resume)
        resume = resume[0]

    # Setup data: the training set, and a held-out split whose loss shows memorisation.
    dataset = load_training_data(args)
    train_index, val_index = data.holdout_split(len(dataset), args.seed)
    pixels, latents = dataset, None             # evaluation compares images with images
    if args.autoencoder:                        # latent diffusion: train on the cached latents of the same images
        latents = encode_dataset(args, dataset, device)

    # Setup model: network, EMA, diffusion, optimizer for the task; then resume restores all of them exactly.
    config = make_config(args, dataset, latents)
    dataset = latents[0] if latents else dataset
    run = build_trainee(args, config, device, world)
    if resume:
        resume_run(run, resume, config, args, world, device)
        if is_main:
            print(f'resumed from {resume} at step {run.step}')
    last_good = run.step
    log = RunLog(os.path.join(args.out, 'log.jsonl'), run.step) if is_main else None
    if is_main:
        describe_run(args, config, run, dataset, train_index, val_index, device, world)

    # Setup batches: the step's images from the (seed, step, rank) generators, streamed by the loader.
    if args.overfit_batch:
        batches = overfit_batches(args, dataset, train_index, run.diffusion, micro_batch, rank)
    else:
        batches = iter(training_batches(args, dataset, train_index, rank, micro_batch, run.step))
    augment_pipe = AugmentPipe(p=args.aug_p) if args.aug_p > 0 else None
    autoencoder = config['task'] == 'autoencoder'
    held_out, train_probe = held_out_batches(args, config, dataset, train_index, val_index, run) if is_main else (None, None)
    watcher = Watcher(args.until_converged, args.converge_margin)
    eval_state = setup_evaluation(args, pixels, train_index, config, device) if args.eval_every and is_main else None
    probe = superres_probe(dataset, val_index, train_index) if config['task'] == 'superres' and is_main else None
    tracker = AutoencoderTracker() if autoencoder else LossByNoiseLevel(run.diffusion.sigma_min, run.diffusion.sigma_max)
    bar = tqdm(total=args.steps, initial=run.step, disable=not is_main or args.no_progress, desc='train', dynamic_ncols=True)
    t_last = time.time()

    while run.step < args.steps:
        # Train: set the learning rate, then one step of Algorithm 1 (skipped when the loss is not finite).
        lr = get_lr(run.step, args)
        for group in run.optimizer.param_groups:
            group['lr'] = lr
        step_fn = train_step_autoencoder if autoencoder else train_step
        losses = step_fn(run, micro_batches(args, config, batches, run.step, rank, augment_pipe, device), args)
        run.step += 1
        bar.update(1)
        if losses is not None:
            tracker.add(losses)
        done = run.step == args.steps

        # Log: mean loss, loss per noise level, throughput; the held-out loss; KID/FD when asked.
        if is_main and (run.step % args.log_every == 0 or done) and tracker.steps:
            loss, by_sigma = tracker.summary()
            record = {'step': run.step, 'loss': loss, 'lr': lr, 'grad_norm': float(run.grad_norm),
                      'img_per_s': tracker.steps * args.batch_size / (time.time() - t_last), ('loss_parts' if autoencoder else 'loss_by_sigma'): by_sigma}
            bar.set_postfix(loss=f'{loss:.4f}', lr=f'{lr:.1e}', img_s=f"{record['img_per_s']:.0f}")
            log.write(record)
            redraw_log_picture(log.path)
            tracker.reset()
            t_last = time.time()
        if held_out is not None and (run.step % args.val_every == 0 or done):
            log.write({'step': run.step, 'val_psnr': held_out_psnr(run.ema, held_out, device)} if autoencoder else
                      held_out_record(run, held_out, train_probe, watcher, device, bar))
        if eval_state is not None and (run.step % args.eval_every == 0 or done):
            done = evaluate_and_watch(args, run, config, eval_state, watcher, log, bar, device) or done

        # Save checkpoint: only weights known to be good replace the previous checkpoint.
        if done and autoencoder:                 # the latent scale goes into the final checkpoint's config
            report_latent_scale(run, config, dataset, train_index, device, bar if is_main else None)
        if run.step % args.ckpt_every == 0 or done or run.step == args.save_early:
            last_good = checkpoint(run, config, args, ckpt_path, world, device, is_main, last_good)

        # Sample grid: a picture of the EMA model now (the final one is also redone at the end if missing).
        if is_main and ((args.sample_every and run.step % args.sample_every == 0) or done) and config['task'] != 'classifier':
            path = os.path.join(args.out, f'samples_{run.step:07d}.png')
            write_grid(run, config, args, held_out, probe, path, device)
            bar.write(f'step {run.step}: wrote {path}')
    bar.close()

    # Finish: the final grid if a kill interrupted it; DDP replica check; a run that ended on non-finite steps fails.
    final_grid = os.path.join(args.out, f'samples_{run.step:07d}.png')
    if is_main and not os.path.exists(final_grid) and config['task'] != 'classifier':
        write_grid(run, config, args, held_out, probe, final_grid, device)
        print(f'step {run.step}: wrote {final_grid}')
    if is_main:                                      # bits/dim, memorisation, classifier accuracy
        final_reports(args, run, config, dataset, train_index, val_index, log, device)
    if world > 1:
        check_replicas(run, world, log, is_main)
        dist.barrier()
        dist.destroy_process_group()
    if log:
        log.close()
    if run.skipped:
        raise SystemExit(f'error: the last {run.skipped} step(s) had a non-finite loss and were skipped; the checkpoint '
                         f'holds the weights from before them (step {run.step - run.skipped} of training). Lower --lr '
                         'or check the data.')
    return run.net, run.ema


if __name__ == '__main__':
    try:
        main(parse_args())
    except (data.DatasetNotFoundError, ValueError) as e:     # a missing dataset, a bad flag value: the message only
        raise SystemExit(f'error: {e}')
    except OSError as e:                                     # a full disk while writing a grid or the log
        if e.errno != errno.ENOSPC:
            raise
        raise SystemExit(f'error: disk full ({e}); the last checkpoint is intact. Free space, then --resume auto.')
