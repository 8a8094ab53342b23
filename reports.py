"""
What a training run reports besides its loss: the pictures and numbers that tell whether the model is any good
while it trains, and when to stop.

  - LossByNoiseLevel: the mean loss in bins of log sigma. Training loss varies over orders of magnitude with sigma,
    so the total alone hides where a model improves (Karras et al. 2022, arXiv:2206.00364, Fig. 5a shows the same
    per-sigma view)
  - held_out_batch / held_out_loss: a fixed batch (images, noise levels, noise) of held-out images and one of
    training images; the same network on both, so a rising gap between the two losses is memorisation (Watcher)
  - Watcher: warns when the held-out loss rises while the training-batch loss falls, and stops a run whose
    in-training KID/FD has not improved for N evaluations (--until-converged)
  - sample_grid / superres_grid: PNG grids of EMA samples through sample.generate
  - setup_evaluation / evaluate_and_watch: KID and Frechet distance of EMA samples during training (evaluate.py's
    feature networks, metrics.py's scores): a LeNet trained on the data (FD_lenet), the FID Inception, or I3D
  - final_reports: bits/dim of the variational bound of discrete VP models (Ho et al. 2020, arXiv:2006.11239,
    Table 2's NLL) and, for small datasets, the memorisation report (nearest training image of each sample)
  - log_losses / redraw_log_picture: the log line of the loss and log.png (plots.py)

Imports sample.py (generation, grids), runs.py (batches), cascade.py, plots.py; evaluate.py and metrics.py only
inside the functions that evaluate, so a run without --eval-every never loads a feature network.
"""
import math
import os
import time
import warnings

import torch

import cascade
import iddpm
import metrics
import sample
import vdm
from checkpoints import latent_decoder, sample_shape
from plots import plot_training_log
from runs import load_batch


# ----------------------------------------------------------------------------------------------------
# The loss, per noise level, and the log line that shows it.

class LossByNoiseLevel:
    """Mean loss in equal bins of log sigma between sigma_min and sigma_max, and the mean step loss, since the last
    log line."""

    def __init__(self, sigma_min, sigma_max, n_buckets=8):
        self.lo, self.hi, self.n = math.log(sigma_min), math.log(sigma_max), n_buckets
        self.reset()

    # float64 sums: thousands of small losses added in float32 would lose their last digits.
    def reset(self):
        self.count = torch.zeros(self.n, dtype=torch.float64)          # samples per bucket
        self.total = torch.zeros(self.n, dtype=torch.float64)          # summed loss per bucket
        self.steps, self.step_loss, self.started = 0, 0.0, time.time()

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


def log_losses(log, bar, tracker, run, lr, args, key='loss_by_sigma'):
    """One log line: mean loss since the last line, the tracker's breakdown (per noise level, or an autoencoder's
    loss parts), learning rate, gradient norm and throughput; then log.png is redrawn."""
    loss, parts = tracker.summary()
    record = {'step': run.step, 'loss': loss, 'lr': lr, 'grad_norm': float(run.grad_norm),
              'img_per_s': tracker.steps * args.batch_size / (time.time() - tracker.started), key: parts}
    bar.set_postfix(loss=f'{loss:.4f}', lr=f'{lr:.1e}', img_s=f"{record['img_per_s']:.0f}")
    log.write(record)
    redraw_log_picture(log.path)
    tracker.reset()


def redraw_log_picture(log_path):
    """log.png next to log.jsonl (plots.py); a picture that cannot be drawn never stops a run."""
    try:
        plot_training_log(log_path)
    except (OSError, ValueError) as e:
        warnings.warn(f'could not draw {log_path} as a picture: {e}')


# ----------------------------------------------------------------------------------------------------
# The held-out loss and the memorisation watcher.

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
        batch['cond']['aug_cond'] = torch.zeros(n, config['net']['aug_dim'])   # "no augmentation" / level 0
    if config.get('superres'):                       # an SR stage: the clean conditioning image of these images
        sr = config['superres']
        batch['cond']['x_cond'] = cascade.upsample(cascade.downsample(x, sr['low_res']), x.shape[-2:], sr['upsample'])
    return batch


@torch.no_grad()
def held_out_loss(run, batch, device, net=None):
    """The EMA network's (or net's) diffusion loss on a fixed batch (held_out_batch)."""
    return fixed_batch_loss(net or run.ema, run.diffusion, batch, device).mean().item()


@torch.no_grad()
def fixed_batch_loss(net, diffusion, batch, device):
    """Per-sample diffusion loss of net on a fixed batch: its sigma and noise given, so nothing is drawn."""
    to = lambda v: v.to(device)
    cond = {k: to(v) for k, v in batch['cond'].items()}
    return diffusion.loss(net, to(batch['x0']), to(batch['sigma']), to(batch['noise']), **cond)[0]


class Watcher:
    """Tells the user when a run has converged or started to memorise, from what the log already records.

    Memorisation: the held-out loss rises (least-squares slope over the last `window` evaluations, as
    metrics.loss_gap_report computes it) while the loss on a fixed batch of training images falls: the network
    improves only on what it has seen. Convergence (--until-converged N): the in-training KID/FD has not improved
    by a relative margin for N evaluations in a row."""

    def __init__(self, patience=0, margin=0.02, window=5):
        self.patience, self.margin, self.window = patience, margin, window
        self.val, self.train, self.best, self.stale, self.warned = [], [], math.inf, 0, False

    def losses(self, val_loss, train_loss):
        """Record both fixed-batch losses; returns a warning string the first time memorisation shows."""
        self.val.append(val_loss)
        self.train.append(train_loss)
        if self.warned or len(self.val) < self.window:
            return None
        gap = metrics.loss_gap_report(self.train, self.val, self.window)
        train_slope = metrics.loss_gap_report(self.val, self.train, self.window)['val_slope']
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


def held_out_record(run, held_out, train_probe, watcher, device, bar):
    """The log record of the fixed held-out and training batches (the same network, noise and labels); warns once
    when the two losses start to diverge (memorisation)."""
    record = {'step': run.step, 'val_loss': held_out_loss(run, held_out, device)}
    if train_probe is not None:
        record['train_loss_fixed'] = held_out_loss(run, train_probe, device)
        warning = watcher.losses(record['val_loss'], record['train_loss_fixed'])
        if warning:
            bar.write(f'step {run.step}: {warning}')
            record['memorisation_warning'] = warning
    return record


# ----------------------------------------------------------------------------------------------------
# Sample grids, through sample.generate.

def sample_grid(ema, diffusion, config, args, path, device):
    """A grid of EMA samples: one row per class (up to 10) when conditional, else a square; videos one row each."""
    num_classes, d = config['data']['num_classes'], config['data']
    # Classes in rows, 8 samples each, always from the same seed: successive grids show the same noise maturing.
    n_rows = min(num_classes, 10) if num_classes else 8
    labels = torch.arange(n_rows).repeat_interleave(8) if num_classes else None
    n = 8 * n_rows
    if d.get('frames'):                                         # videos: one row of frames each, up to 4
        labels = labels[::8][:4] if labels is not None else None
        n = len(labels) if labels is not None else 4
    images = sample.generate(ema, diffusion, n, sample_shape(config), device, labels, num_classes, args.sampler,
                             args.sample_steps, args.guidance, seed=args.seed, aug_dim=config['net'].get('aug_dim', 0),
                             sampler_options=args.sampler_options, decode=latent_decoder(config, device))
    sample.save_grid(images, path, nrow=8)


@torch.no_grad()
def superres_grid(ema, diffusion, config, args, probe, path, device):
    """An SR stage: three rows, the low-res inputs (nearest-upsampled), the EMA stage's SR of them (level 0), the
    real images. probe: (x, y) of 8 fixed held-out images."""
    # Level 0 at sampling: the grid shows the stage on clean low-res inputs (cascades choose their own level).
    sr, (x, y) = config['superres'], probe
    z = cascade.downsample(x, sr['low_res'])
    num_classes = config['data']['num_classes']
    images = sample.generate(ema, diffusion, len(x), tuple(x.shape[1:]), device, y if num_classes else None,
                             num_classes, args.sampler, args.sample_steps, args.guidance, seed=args.seed,
                             aug_dim=sr['aug_dim'], sampler_options=args.sampler_options,
                             cond={'x_cond': cascade.upsample(z, x.shape[-2:], sr['upsample'])})
    sample.save_grid(torch.cat([cascade.upsample(z, x.shape[-2:], 'nearest'), images, x]), path, nrow=len(x))


# ----------------------------------------------------------------------------------------------------
# In-training evaluation: KID and FD of EMA samples against the training images.

def setup_evaluation(args, dataset, train_index, config, device):
    """(feature network, reference statistics of the training images, their labels), for KID/FD during training."""
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
        model = evaluate.load_inception(args.inception_weights, device, fast=True)   # BN folded: evaluate.py's default
    feats = evaluate.extract_features((x + 1) / 2, model.to(device), device=device, progress=False)
    return model, metrics.compute_statistics(feats, network=model.name), y


def video_eval_network(args, x, y, config, device):
    """The feature network for evaluating a video model on videos x (N, C, F, H, W): I3D (scores FVD, KVD), or an
    image network on every frame (frame-FID, frame-FD_lenet; the LeNet trained on the frames, labelled by video)."""
    import evaluate
    if x.ndim != 5:
        raise SystemExit('error: --eval-network i3d scores videos; this dataset holds images')
    if args.eval_network == 'i3d':
        return evaluate.VideoFeatures(evaluate.load_i3d(args.i3d_weights, device))
    if args.eval_network == 'inception':
        return evaluate.FrameFeatures(evaluate.load_inception(args.inception_weights, device, fast=True))
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
    decode = latent_decoder(config, device)                    # latent models: scored as decoded images

    def make(n):                                                # batch k: seed + 1 + its first index, as sample.py
        start = next(starts)
        return sample.generate(ema, diffusion, n, sample_shape(config), device,
                               None if labels is None else labels[start:start + n], d['num_classes'], args.sampler,
                               args.sample_steps, args.guidance, seed=args.seed + 1 + start,
                               aug_dim=config['net'].get('aug_dim', 0), sampler_options=args.sampler_options,
                               decode=decode)
    results = evaluate.evaluate_generator(make, ref, model, args.eval_samples, batch_size=250, device=device)
    print(metrics.format_results(results, args.eval_samples, int(ref['num_images']), getattr(model, 'resize', 'legacy'),
                                 'training images', 'labels drawn from the data' if labels is not None else None))
    return {'step': step, 'eval': {k: float(v) for k, v in results.items()}, 'eval_samples': args.eval_samples,
            'eval_network': model.name, 'guidance': args.guidance}


def primary_score(record):
    """The score --until-converged watches: KID-type if present (reliable at 2,000 samples), else the first FD."""
    # KID's estimate is unbiased at any sample count, FD's is not: KID is the better stopping signal.
    scores = record.get('eval', {})
    for key in sorted(scores, key=lambda k: ('K' not in k.split('_')[0], k)):
        return scores[key]
    return math.inf


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


# ----------------------------------------------------------------------------------------------------
# At the end of a run.

@torch.no_grad()
def final_reports(args, run, config, dataset, train_index, val_index, log, device):
    """bits/dim of discrete VP models (Ho et al. 2020, Table 2's NLL); for small image datasets, the memorisation
    report (nearest training image of each sample, evaluate.save_nearest_pairs). Pixel diffusion models only."""
    import evaluate
    from diffusion import bits_per_dim
    if config['task'] != 'diffusion' or config.get('autoencoder'):
        return
    # Held-out images when there are any; tiny datasets fall back to training images.
    held = val_index if len(val_index) else train_index
    # Discrete VP models: the T-step bound (iddpm.py's with a learned variance); continuous VP models and VDMs: the
    # continuous-time bound (vdm.py), both in bits/dim
    vp = config['diffusion'].get('schedule') == 'vdm' or (config['diffusion'].get('schedule') == 'vp' and config['diffusion']['prediction'] in ('eps', 'x0', 'v'))
    if (config['diffusion'].get('T') or vp) and args.bpd_images:
        # The full bound, T calls per image, on held-out images; unconditional (the null class) like DDPM's number.
        x0 = load_batch(dataset, held[:args.bpd_images])[0].to(device)
        cond = {'y': torch.full((len(x0),), config['data']['num_classes'], device=device)} if config['data']['num_classes'] else {}
        if config['net'].get('aug_dim'):
            cond['aug_cond'] = torch.zeros(len(x0), config['net']['aug_dim'], device=device)
        g = torch.Generator().manual_seed(0)
        if vp:
            bpd = vdm.diffusion_bits_per_dim(run.diffusion, run.ema, x0, generator=g, **cond).mean().item()
        elif isinstance(run.diffusion, iddpm.LearnedVarianceDiffusion):
            bpd = iddpm.bits_per_dim(run.diffusion, run.ema, x0, generator=g, **cond).mean().item()
        else:
            bpd = bits_per_dim(run.diffusion.denoiser(run.ema), x0, run.diffusion.schedule, generator=g, **cond).mean().item()
        log.write({'step': run.step, 'bits_per_dim': bpd, 'bpd_images': len(x0)})
        print(f"bits/dim (variational bound, {len(x0)} held-out images, "
              f"{'continuous time' if vp else f'T = {run.diffusion.schedule.T}'}): {bpd:.3f}")
    if len(dataset) < args.memorization_below and not config['data'].get('frames'):
        # Samples next to their nearest training images: a ratio d1/d2 < 1/3 marks a near-copy (metrics.py).
        n = 64
        labels = torch.arange(n) % config['data']['num_classes'] if config['data']['num_classes'] else None
        samples = sample.generate(run.ema, run.diffusion, n, sample_shape(config), device, labels,
                                  config['data']['num_classes'], args.sampler, args.sample_steps, args.guidance,
                                  seed=args.seed + 7, aug_dim=config['net'].get('aug_dim', 0),
                                  sampler_options=args.sampler_options)
        train_x = load_batch(dataset, train_index[:5000])[0]
        report = metrics.memorization_check((samples + 1) / 2, (train_x + 1) / 2)['pixel']
        path = os.path.join(args.out, 'nearest_pairs.png')
        evaluate.save_nearest_pairs((samples + 1) / 2, (train_x + 1) / 2, report['nearest'], report['ratio'], path)
        log.write({'step': run.step, 'near_copies': report['share'], 'memorisation_samples': n})
        print(f"memorisation: {report['share']:.1%} of {n} samples are near-copies of a training image "
              f"(nearest/second-nearest distance < 1/3; pairs, closest first, in {path})")
