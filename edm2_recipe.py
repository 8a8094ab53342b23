"""
The EDM2 training recipe over train.py's harness (Karras et al. 2024, arXiv:2312.02696): what `--recipe edm2`
changes in the loop, each called from one line of train.py.

    --recipe edm2   the loss of Eq. 21 (learned uncertainty u(sigma) weighs each noise level; edm2.py), the
                    inverse square root learning rate alpha_ref / sqrt(max(t / t_ref, 1)) after a linear ramp-up
                    (--lr = alpha_ref, --lr-ref-steps = t_ref, --warmup = the ramp-up), Adam betas (0.9, 0.99),
                    no gradient clipping, ln(sigma) ~ N(P_mean, P_std^2) with the paper's values (ImageNet-64 pixels
                    (-0.8, 1.6), ImageNet-512 latents (-0.4, 1.0)), and post-hoc EMA snapshots (posthoc_ema.py) of
                    sigma_rel 0.05 and 0.10 every --snapshot-every steps. Needs an EDM2 network (--model edm2-*).
    --model edm2-*  the magnitude-preserving U-Net (edm2.py); its weights are re-normalised after every optimizer
                    step (forced weight normalisation, Eq. 66) under any recipe.
    --latent-norm channel   latent diffusion on EDM2's per-channel normalised latents (vae.compute_latent_scale with
                    per_channel=True, std sigma_data), recorded in the checkpoint so sample.py decodes with it.
The default recipe (`--recipe edm`) is train.py's EDM training (Karras et al. 2022), except that on pixels its noise
levels default to EDM2's ImageNet-64 preset (-0.8, 1.6), which trained better in this codebase's short runs
(docs/RESULTS.md); --P-mean -1.2 --P-std 1.2 gives EDM's own.
"""
import os

import torch

import edm2
import posthoc_ema
import runs
import vae

# Flags that change what an uninterrupted run would have done (train.RESUME_FLAGS adds them).
RESUME_FLAGS = ('recipe', 'lr_ref_steps', 'ema_snapshots', 'snapshot_every', 'latent_norm')
# The recipe's defaults for flags shared with the EDM recipe; any flag given on the command line wins.
RECIPE_DEFAULTS = {'edm2': dict(lr=0.01,             # alpha_ref: EDM2-S's 0.0100 (XS 0.0120, M 0.0090)
                                grad_clip=0.0,       # EDM2 clips nothing (it only zeroes non-finite gradients)
                                lr_ref_steps=70000,  # t_ref of ImageNet-512 (35,000 at ImageNet-64)
                                ema_snapshots='0.05,0.10', snapshot_every=100)}
P_DEFAULTS = {'pixels': (-0.8, 1.6), 'latents': (-0.4, 1.0)}   # EDM2 presets: ImageNet-64, ImageNet-512 (latents)


def add_flags(p):
    g = p.add_argument_group('EDM2 recipe (edm2.py, posthoc_ema.py, edm2_recipe.py)')
    g.add_argument('--recipe', default='edm', choices=['edm', 'edm2'], help='edm: the default training (EDM\'s loss; on pixels '
                   'EDM2\'s sigma distribution, see --P-mean); edm2: EDM2\'s '
                   'uncertainty-weighted loss, inverse-sqrt lr, Adam (0.9, 0.99), no clipping, its sigma distribution '
                   'and post-hoc EMA snapshots (needs --model edm2-*; defaults: --lr 0.01 --grad-clip 0)')
    g.add_argument('--lr-ref-steps', type=int, default=None, help='t_ref of the inverse-sqrt decay (--recipe edm2; default 70000)')
    g.add_argument('--P-mean', dest='P_mean', type=float, default=None, help='mean of ln(sigma) in training (default: -0.8 on '
                   'pixels, EDM2\'s ImageNet-64 value; latents: EDM\'s -1.2, or -0.4 under --recipe edm2)')
    g.add_argument('--P-std', dest='P_std', type=float, default=None, help='std of ln(sigma) (default: 1.6 on pixels; '
                   'latents: EDM\'s 1.2, or 1.0 under --recipe edm2)')
    g.add_argument('--ema-snapshots', default=None, help='post-hoc EMA: comma-separated sigma_rel of the power-function '
                   'EMAs saved as snapshots (--recipe edm2: 0.05,0.10)')
    g.add_argument('--snapshot-every', type=int, default=None, help='write OUT/posthoc/snapshot-STEP.pt every N steps '
                   '(--recipe edm2: 100)')
    g.add_argument('--latent-norm', default=None, choices=['recorded', 'channel'], help="latent diffusion: the "
                   "autoencoder's recorded scale (default) or EDM2's per-channel mean/std to std sigma_data")
    return g


def parse_args(p, argv=None):
    """p.parse_args(argv), with the recipe's defaults in place of the shared ones when --recipe edm2 is given."""
    recipe = p.parse_known_args(argv)[0].recipe
    if recipe in RECIPE_DEFAULTS:
        p.set_defaults(**RECIPE_DEFAULTS[recipe])
    return p.parse_args(argv)


def is_edm2(args):
    return args.model in edm2.EDM2_CONFIGS


def check_args(args, need):
    """The EDM2 flags: where each applies, their ranges; then the recipe's sigma distribution defaults."""
    edm2_net, recipe = is_edm2(args), args.recipe == 'edm2'
    need(not recipe or edm2_net, f'--recipe edm2 trains the learned uncertainty u(sigma) of an EDM2 network: give '
                                 f"--model {' or '.join(edm2.EDM2_CONFIGS)} (got --model {args.model})")
    need(not recipe or (args.prediction == 'edm' and args.schedule in (None, 'edm')),
         '--recipe edm2 uses the EDM preconditioning and c_noise = ln(sigma)/4: --prediction edm, --schedule edm')
    if edm2_net:
        need(args.config is None, f'--model {args.model} is a named EDM2 configuration; --config does not apply')
        need(args.task == 'diffusion', f'--model {args.model} takes no x_cond: --task superres needs --model unet or dit')
        need(args.aug_p == 0, f'--model {args.model} takes no augmentation labels (aug_cond): --aug-p must be 0')
    need(args.lr_ref_steps is None or recipe, '--lr-ref-steps applies to --recipe edm2 (its learning rate schedule)')
    need(args.lr_ref_steps is None or args.lr_ref_steps >= 1, f'--lr-ref-steps must be at least 1 (got {args.lr_ref_steps})')
    need((args.ema_snapshots is None) == (args.snapshot_every is None) or recipe,
         '--ema-snapshots and --snapshot-every go together (post-hoc EMA snapshots)')
    need(args.snapshot_every is None or args.snapshot_every >= 1, f'--snapshot-every must be at least 1 (got {args.snapshot_every})')
    if args.ema_snapshots is not None:
        try:
            args.sigma_rels = [float(s) for s in args.ema_snapshots.split(',')]
            [posthoc_ema.gamma_of_sigma_rel(s) for s in args.sigma_rels]
        except ValueError as e:
            need(False, f'--ema-snapshots {args.ema_snapshots!r}: {e}')
    for flag in ('P_mean', 'P_std'):
        need(getattr(args, flag) is None or (args.prediction == 'edm' and args.schedule in (None, 'edm')),
             f'--{flag.replace("_", "-")} applies to the EDM log-normal schedule (--prediction edm)')
    need(args.P_std is None or args.P_std > 0, f'--P-std must be > 0 (got {args.P_std})')
    need((args.P_mean is None) == (args.P_std is None) or recipe, '--P-mean and --P-std go together (without --recipe edm2)')
    need(args.latent_norm is None or args.autoencoder, '--latent-norm applies to latent diffusion (--autoencoder)')
    # The default on pixels is EDM2's pixel preset under either recipe: for the short runs of this codebase it beat
    # EDM's N(-1.2, 1.2^2) on MNIST and shapes (docs/RESULTS.md, "The default run"); --P-mean -1.2 --P-std 1.2
    # trains with EDM's. Latents keep EDM's values under --recipe edm (EDM2's latent preset was not measured there).
    edm_levels = args.prediction == 'edm' and args.schedule in (None, 'edm')
    if (recipe or not args.autoencoder) and edm_levels and args.P_mean is None and args.P_std is None:
        args.P_mean, args.P_std = P_DEFAULTS['latents' if args.autoencoder else 'pixels']


# ----------------------------------------------------------------------------------------------------
# In the loop.

def adam_betas(args):
    return edm2.ADAM_BETAS if args.recipe == 'edm2' else (0.9, 0.999)


def setup(run, args):
    """Before a resume: forced weight normalisation after every optimizer step (EDM2 networks), the post-hoc EMA
    tracker as a state owner of the run (saved in ckpt.pt, restored by resume), and snapshot folder hygiene."""
    if is_edm2(args):
        run.optimizer.register_step_post_hook(lambda *_: run.net.normalize_weights_())   # Eq. 66, after each step
    if args.ema_snapshots is None:
        return None
    run.extras['posthoc_ema'] = posthoc_ema.PowerFunctionEMA(run.net, args.sigma_rels)
    return run.extras['posthoc_ema']


def set_aside_stale_snapshots(args, setup, step):
    """After a resume (step) or at a fresh start (0): snapshots past `step` are another run's; moved aside."""
    if args.ema_snapshots is not None and setup.is_main:
        posthoc_ema.set_aside_snapshots(args.out, after_step=step)


def get_lr(step, args):
    """EDM2's inverse-sqrt schedule with ramp-up (edm2.learning_rate), or the default warm-up + cosine."""
    if args.recipe == 'edm2':
        return edm2.learning_rate(step, args.lr, args.lr_ref_steps, args.warmup)
    return runs.get_lr(step, args)


def objective(run, per_sample, sigma, args):
    """What is minimised: the mean EDM loss, or under --recipe edm2 Eq. 21 with the network's u(sigma)."""
    if args.recipe != 'edm2':
        return per_sample.mean()
    logvar = run.net.logvar(run.diffusion.schedule.noise_level(sigma))   # u(sigma) from c_noise = ln(sigma)/4
    return edm2.uncertainty_weighted_loss(per_sample, logvar).mean()


def after_step(run, args, setup, config, tracker):
    """Update the power-function EMAs with this step's weights, and save a snapshot when one is due (rank 0)."""
    if tracker is None:
        return
    tracker.update(run.net)
    if setup.is_main and run.step % args.snapshot_every == 0:
        posthoc_ema.write_snapshot(tracker, args.out, run.step, config)


@torch.no_grad()
def normalise_latents(args, ae, dataset, device, max_images=4096):
    """--latent-norm channel: EDM2's per-channel latent mean/std (vae.compute_latent_scale, per_channel=True) to
    std sigma_data, measured on evenly spaced images, set on the autoencoder (so latent_record stores it)."""
    if args.latent_norm != 'channel':
        return
    index = torch.linspace(0, len(dataset) - 1, min(len(dataset), max_images)).long()
    batches = (runs.load_batch(dataset, index[i:i + 256])[0].to(device) for i in range(0, len(index), 256))
    ae.set_latent_scale(**vae.compute_latent_scale(ae, batches, per_channel=True, target_std=args.sigma_data))
    print(f"--latent-norm channel: per-channel shift {ae.config['shift_factor']} scale {ae.config['scale_factor']}")
