"""
Train a diffusion model: `python train.py` on a laptop CPU, `torchrun --nproc_per_node=8 train.py ...` on GPUs.

The loop is the one every paper uses (Ho et al. 2020, Alg. 1; Karras et al. 2022, Sec. 5): draw images x0, noise
levels sigma and noise, and regress the network onto the target of its parameterisation (diffusion.Diffusion.loss).
Around it, what makes a run usable:
  - EMA of the weights with a warm-up: decay_t = min(decay, (1 + t) / (10 + t)), so early samples are not an
    average dominated by the random initialisation (the schedule of Tensorflow's ExponentialMovingAverage with
    num_updates, as used by DDPM's code)
  - CUDA mixed precision: bf16 where the GPU supports it, otherwise fp16 with a gradient scaler; fp32 weights
  - label dropout (p_uncond = 0.1) so one network is both conditional and unconditional (Ho & Salimans 2021)
  - DDP through torchrun (NCCL on GPUs, gloo on CPU); gradient accumulation; gradient clipping
  - atomic checkpoints and exact resume: each step's batch, noise and label dropout come from a generator seeded
    by (seed, step, rank), so a resumed run draws exactly what an uninterrupted one would have
  - a JSON-lines log with the loss per noise-level bucket and a held-out validation loss; PNG sample grids

Layout as in DiT's train.py: parse_args() -> main(args); nanoGPT-style get_lr; a five-line update_ema.
"""
import argparse
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
from diffusion import SCHEDULES, Diffusion
from guidance import ClassifierFreeGuidance
from dit import DIT_CONFIGS, DiT
from samplers import SAMPLERS, STOCHASTIC, karras_sigmas
from unet import UNET_CONFIGS, UNet


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train a diffusion model.', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='shapes', help="shapes | mnist | fashion-mnist | cifar10 | emoji | folder:PATH")
    g.add_argument('--data-dir', default='data', help='where dataset files are read from (and downloaded to)')
    g.add_argument('--split', default='train', help="which split to train on (the shared MNIST files hold only 'test')")
    g.add_argument('--resolution', type=int, default=None, help='image size; default: the dataset\'s own')
    g.add_argument('--aug-p', type=float, default=0.0, help='probability of each augmentation; labels go to the network as aug_cond (Karras et al. 2022, App. C.4)')
    g.add_argument('--unconditional', action='store_true', help='ignore class labels')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='unet', choices=['unet', 'dit'])
    g.add_argument('--config', default=None, help=f"named configuration; unet: {', '.join(UNET_CONFIGS)}; dit: {', '.join(DIT_CONFIGS)}")
    g.add_argument('--dropout', type=float, default=None, help='override the configuration\'s dropout (U-Net)')
    g.add_argument('--model-channels', type=int, default=None, help='override the U-Net\'s width (model_channels)')
    g = p.add_argument_group('diffusion')
    g.add_argument('--prediction', default='edm', choices=['eps', 'x0', 'v', 'edm', 'flow'], help='parameterisation of the network output')
    g.add_argument('--schedule', default=None, choices=list(SCHEDULES), help='training noise levels and c_noise; default: the natural one for --prediction')
    g.add_argument('--t-sampler', default='low_discrepancy', choices=['uniform', 'low_discrepancy', 'importance'], help='how the batch\'s noise levels are drawn')
    g.add_argument('--sigma-data', type=float, default=0.5, help='data standard deviation for EDM preconditioning')
    g = p.add_argument_group('optimisation')
    g.add_argument('--steps', type=int, default=1000, help='optimizer steps (1000: about 10 minutes on a 2-core CPU)')
    g.add_argument('--batch-size', type=int, default=64, help='global batch size (split over processes and accumulation)')
    g.add_argument('--grad-accum', type=int, default=1, help='micro-batches per optimizer step')
    g.add_argument('--lr', type=float, default=2e-3, help='peak learning rate (Adam)')
    g.add_argument('--warmup', type=int, default=200, help='linear warm-up steps')
    g.add_argument('--lr-decay', default='cosine', choices=['cosine', 'constant'], help='after warm-up')
    g.add_argument('--weight-decay', type=float, default=0.0)
    g.add_argument('--grad-clip', type=float, default=1.0, help='max gradient norm (0 = off)')
    g.add_argument('--ema-decay', type=float, default=0.999, help='EMA decay after warm-up')
    g.add_argument('--p-uncond', type=float, default=0.1, help='label dropout for classifier-free guidance')
    g.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'none'], help='CUDA mixed precision (CPU always fp32)')
    g.add_argument('--overfit-batch', action='store_true', help='train on one fixed batch with fixed noise: the loss must go to ~0')
    g = p.add_argument_group('output')
    g.add_argument('--out', default='runs/default', help='run folder: checkpoints, samples, log')
    g.add_argument('--resume', default=None, help="checkpoint to continue from, or 'auto' for OUT/ckpt.pt if it exists")
    g.add_argument('--log-every', type=int, default=50)
    g.add_argument('--val-every', type=int, default=500, help='held-out loss every N steps (0 = off)')
    g.add_argument('--sample-every', type=int, default=1000, help='sample grid every N steps (0 = only at the end)')
    g.add_argument('--ckpt-every', type=int, default=1000, help='checkpoint every N steps (and at the end)')
    g.add_argument('--save-early', type=int, default=0, help='also keep the checkpoint of this step (a "bad" model for autoguidance)')
    g.add_argument('--sampler', default='heun', choices=list(SAMPLERS), help='sampler for the grids')
    g.add_argument('--sample-steps', type=int, default=18, help='noise levels of the sampling schedule')
    g.add_argument('--guidance', type=float, default=2.0, help='CFG weight of class-conditional grids (1 = none)')
    g = p.add_argument_group('evaluation (evaluate.py)')
    g.add_argument('--eval-every', type=int, default=0, help='KID and Frechet distance of EMA samples every N steps (0 = off)')
    g.add_argument('--eval-samples', type=int, default=2000, help='samples per evaluation (2,000: KID is reliable, FD a trend; 50,000 for a headline FID)')
    g.add_argument('--eval-network', default='lenet', choices=['lenet', 'inception'],
                   help='features: a LeNet trained on this dataset (offline, scores named FD_lenet/KD_lenet) or the FID Inception')
    g.add_argument('--inception-weights', default=None, help='pt_inception-2015-12-05-6726825d.pth (see evaluate.py)')
    g = p.add_argument_group('misc')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    g.add_argument('--no-progress', action='store_true', help='no tqdm bar (for logs)')
    return p.parse_args(argv)


DEFAULT_SCHEDULE = {'eps': 'cosine', 'x0': 'cosine', 'v': 'cosine', 'edm': 'edm', 'flow': 'flow'}


# ----------------------------------------------------------------------------------------------------
# Small pieces: learning rate, EMA, checkpoints.

def get_lr(step, args):
    """Linear warm-up, then constant or cosine decay to 10% (nanoGPT's get_lr)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_decay == 'constant':
        return args.lr
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay ema + (1 - decay) model, over parameters and buffers."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(m, 1 - decay)


def ema_decay(step, max_decay):
    """EMA warm-up: the effective averaging window grows with the step count instead of starting at 1/(1-decay)."""
    return min(max_decay, (1 + step) / (10 + step))


def save_checkpoint(path, state):
    """Write to a temporary file and rename: a crash never leaves a half-written checkpoint (rename is atomic)."""
    tmp = path + '.tmp'
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device='cpu'):
    """Load with weights_only=True: a checkpoint cannot run code. Clear errors for missing or damaged files."""
    if not os.path.isfile(path):
        raise SystemExit(f'error: checkpoint {path!r} does not exist')
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:                                       # truncated, not a checkpoint, or unsafe content
        raise SystemExit(f'error: cannot read checkpoint {path!r} ({type(e).__name__}: {e}). '
                         'Is it a file written by train.py, and complete?') from None


def build_network(config):
    """Rebuild a network from the config stored in a checkpoint."""
    return (UNet if config['model'] == 'unet' else DiT)(**config['net'])


def build_diffusion(config):
    d = config['diffusion']
    return Diffusion(SCHEDULES[d['schedule']](), d['prediction'], d.get('t_sampler', 'uniform'), d['sigma_data'])


def make_config(args, dataset):
    """Everything needed to rebuild the model and sample it as trained; stored in every checkpoint."""
    num_classes = 0 if args.unconditional else dataset.num_classes
    aug_dim = data.AUG_DIM if args.aug_p > 0 else 0
    if args.model == 'unet':
        name = args.config or 'micro'
        net = dict(UNET_CONFIGS[name], in_channels=dataset.channels, image_size=dataset.resolution,
                   num_classes=num_classes, aug_dim=aug_dim)
        if args.dropout is not None:
            net['dropout'] = args.dropout
        if args.model_channels is not None:
            net['model_channels'] = args.model_channels
        net = UNet(**net).config
    else:
        name = args.config or 'DiT-S/4'
        net = DiT(**dict(DIT_CONFIGS[name], input_size=dataset.resolution, in_channels=dataset.channels,
                         num_classes=num_classes, aug_dim=aug_dim)).config
    return {'model': args.model, 'config_name': name, 'net': net,
            'diffusion': {'prediction': args.prediction, 'schedule': args.schedule or DEFAULT_SCHEDULE[args.prediction],
                          't_sampler': args.t_sampler, 'sigma_data': args.sigma_data},
            'data': {'dataset': args.dataset, 'resolution': dataset.resolution, 'channels': dataset.channels,
                     'num_classes': num_classes, 'class_names': list(getattr(dataset, 'class_names', None) or []),
                     'frames': getattr(dataset, 'frames', 0)}}


def config_mismatch(a, b, prefix=''):
    """Keys where two nested configs differ, as readable strings."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_mismatch(va, vb, f'{prefix}{k}.')
        elif va != vb and k != 'class_names':
            out.append(f'{prefix}{k}: checkpoint has {va!r}, this run has {vb!r}')
    return out


# ----------------------------------------------------------------------------------------------------
# Sampling grids (also used by sample.py).

@torch.no_grad()
def generate(net, diffusion, n, shape, device, labels=None, num_classes=0, sampler='heun', steps=18, guidance=1.0,
             seed=0, progress=False, aug_dim=0):
    """Sample n images with the EMA network: class-conditional with classifier-free guidance when labels are given."""
    g = torch.Generator(device='cpu').manual_seed(seed)
    denoiser = diffusion.denoiser(net)
    cond = {}
    if aug_dim:
        cond['aug_cond'] = torch.zeros(n, aug_dim, device=device)          # "no augmentation" at sampling time
    if num_classes:
        y = labels.to(device) if labels is not None else torch.full((n,), num_classes, device=device)
        if guidance != 1.0 and labels is not None:
            denoiser = ClassifierFreeGuidance(denoiser, w=guidance, null_class=num_classes)   # one batched call
        cond['y'] = y
    sigmas = karras_sigmas(steps, diffusion.sigma_min, diffusion.sigma_max).to(device)
    x = sigmas[0] * torch.randn((n,) + tuple(shape), generator=g).to(device)
    opts = {'generator': g} if sampler in STOCHASTIC else {}
    return SAMPLERS[sampler](denoiser, x, sigmas, progress=progress, **opts, **cond).clamp(-1, 1)


def save_grid(images, path, nrow=None):
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid (videos: (N, C, F, H, W) become rows of frames)."""
    from PIL import Image
    if images.ndim == 5:
        nrow = images.shape[2]
        images = images.transpose(1, 2).flatten(0, 1)
    n, c, h, w = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = torch.ones(c, ncol * (h + 2) + 2, nrow * (w + 2) + 2)
    for i, img in enumerate(images.float().cpu()):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = img
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr[:, :, 0] if c == 1 else arr).save(path)


def sample_grid(net, diffusion, config, args, path, device):
    """A grid of EMA samples: one row per class (up to 10) when conditional, else a square."""
    num_classes, d = config['data']['num_classes'], config['data']
    shape = (d['channels'],) + ((d['frames'],) if d.get('frames') else ()) + (d['resolution'], d['resolution'])
    n_rows = min(num_classes, 10) if num_classes else 8
    labels = torch.arange(n_rows).repeat_interleave(8) if num_classes else None
    n = 8 * n_rows
    if d.get('frames'):                                         # videos: one row of frames each, up to 4
        labels = labels[::8][:4] if labels is not None else None
        n = len(labels) if labels is not None else 4
    images = generate(net, diffusion, n, shape, device, labels, num_classes, args.sampler,
                      args.sample_steps, args.guidance, seed=args.seed, aug_dim=config['net'].get('aug_dim', 0))
    save_grid(images, path, nrow=8)


def setup_evaluation(args, dataset, train_index, config, device):
    """Feature network and reference statistics of the training images, for KID/FD during training (evaluate.py)."""
    import evaluate
    x, y = get_batch(dataset, train_index[:10000])
    if args.eval_network == 'lenet':
        if not config['data']['num_classes']:
            raise SystemExit('error: --eval-network lenet trains a classifier on the labels; this dataset has none. '
                             'Use --eval-network inception.')
        model = evaluate.train_classifier((x + 1) / 2, y, config['data']['num_classes'], steps=300, seed=args.seed)
    else:
        model = evaluate.load_inception(args.inception_weights, device)
    feats = evaluate.extract_features((x + 1) / 2, model.to(device), device=device, progress=False)
    return model, evaluate.compute_statistics(feats, network=model.name), y


def run_evaluation(args, ema, diffusion, config, eval_state, step, device):
    """KID and FD of args.eval_samples EMA samples, labels drawn from the data's own label distribution."""
    import evaluate
    model, ref, train_labels = eval_state
    d = config['data']
    g = torch.Generator().manual_seed(args.seed)
    labels = train_labels[torch.randint(len(train_labels), (args.eval_samples,), generator=g)] if d['num_classes'] else None
    shape = (d['channels'], d['resolution'], d['resolution'])
    batches = iter(range(0, args.eval_samples, 250))
    def make(n):
        start = next(batches)
        return generate(ema, diffusion, n, shape, device, None if labels is None else labels[start:start + n],
                        d['num_classes'], args.sampler, args.sample_steps, args.guidance, seed=args.seed + 1 + start,
                        aug_dim=config['net'].get('aug_dim', 0))
    results = evaluate.evaluate_generator(make, ref, model, args.eval_samples, batch_size=250, device=device)
    print(evaluate.format_results(results, args.eval_samples, int(ref['num_images']), 'clean', 'training images',
                                  'labels drawn from the data' if labels is not None else None))
    return {'step': step, 'eval': {k: float(v) for k, v in results.items()}, 'eval_samples': args.eval_samples,
            'eval_network': model.name, 'guidance': args.guidance}


# ----------------------------------------------------------------------------------------------------
# The training loop.

def setup_distributed(args):
    """One process, or one per GPU/CPU slot under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE)."""
    if 'RANK' not in os.environ:
        device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        return 0, 1, device
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
    if device.type != 'cuda' or args.amp == 'none':
        return None, False
    if args.amp == 'bf16' or (args.amp == 'auto' and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def step_generator(args, step, rank, micro=0):
    """The generator of one micro-batch: a pure function of (seed, step, rank), so resuming is exact."""
    return torch.Generator().manual_seed(((args.seed * 1_000_003 + step) * 4099 + rank) * 131 + micro)


def get_batch(dataset, indices):
    """(x0, y) for a tensor of indices: in-memory datasets slice one tensor, others go item by item."""
    if hasattr(dataset, 'batch'):
        return dataset.batch(indices)
    items = [dataset[i] for i in indices.tolist()]
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])


def main(args):
    rank, world, device = setup_distributed(args)
    is_main = rank == 0
    torch.manual_seed(args.seed + rank)                          # dropout noise; saved and restored on resume
    if args.batch_size % (world * args.grad_accum):
        raise SystemExit(f'error: --batch-size {args.batch_size} must be divisible by processes x --grad-accum = {world * args.grad_accum}')
    micro_batch = args.batch_size // (world * args.grad_accum)

    dataset = data.load_dataset(args.dataset, data_dir=args.data_dir, split=args.split, resolution=args.resolution, seed=args.seed)
    # Hold out a fixed 5% (at most 1000 images) for the validation loss: rising while the training loss falls is
    # the sign of memorisation on a small dataset.
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
    n_val = min(1000, len(dataset) // 20)
    train_index, val_index = order[n_val:], order[:n_val]
    config = make_config(args, dataset)
    net = build_network(config).to(device)
    ema = build_network(config).to(device).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    diffusion = build_diffusion(config)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    amp_dtype, use_scaler = amp_settings(args, device)
    scaler = torch.amp.GradScaler('cuda', enabled=use_scaler)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, 'ckpt.pt')

    step = 0
    resume = ckpt_path if args.resume == 'auto' and os.path.exists(ckpt_path) else (None if args.resume == 'auto' else args.resume)
    if resume:
        ckpt = load_checkpoint(resume, device)
        diff = config_mismatch(ckpt['config'], config)
        if diff:
            raise SystemExit(f'error: {resume} was trained with another configuration:\n  ' + '\n  '.join(diff) +
                             '\nUse the same flags as that run, or a new --out.')
        net.load_state_dict(ckpt['model'])
        ema.load_state_dict(ckpt['ema'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        if diffusion.importance is not None and 'importance' in ckpt:
            diffusion.importance.losses = ckpt['importance']['losses'].numpy()
            diffusion.importance.counts = ckpt['importance']['counts'].numpy()
        step = ckpt['step']
        rng = ckpt['rng'][rank % len(ckpt['rng'])]              # this rank's dropout RNG (CPU and CUDA)
        torch.set_rng_state(rng['cpu'].cpu())
        if 'cuda' in rng and device.type == 'cuda':
            torch.cuda.set_rng_state(rng['cuda'].cpu(), device)
        if is_main:
            print(f'resumed from {resume} at step {step}')
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net

    if is_main:
        n_params = sum(p.numel() for p in net.parameters())
        print(f"{config['model']} '{config['config_name']}' {n_params / 1e6:.2f}M parameters; {args.dataset}: "
              f"{len(train_index)} training + {n_val} held-out images {dataset.channels}x{dataset.resolution}x{dataset.resolution}, "
              f"{config['data']['num_classes']} classes; {config['diffusion']}; device {device}, {world} process(es), "
              f"AMP {amp_dtype or 'off'}")
    log = open(os.path.join(args.out, 'log.jsonl'), 'a') if is_main else None
    # A fixed held-out batch with fixed noise levels and noise: its loss is comparable from one evaluation to the next.
    g_val = torch.Generator().manual_seed(12345)
    val_x, val_y = get_batch(dataset, val_index[:256])
    n_v = len(val_y)
    val_sigma = diffusion.schedule.sigma(torch.linspace(0.01, 0.99, n_v, dtype=torch.float64)[torch.randperm(n_v, generator=g_val)]).float()
    val_noise = torch.randn(val_x.shape, generator=g_val)
    augment_pipe = data.AugmentPipe(p=args.aug_p) if args.aug_p > 0 else None
    overfit = None
    if args.overfit_batch:
        g = step_generator(args, 0, rank)
        overfit = get_batch(dataset, train_index[torch.randint(len(train_index), (micro_batch,), generator=g)])
        overfit += (diffusion.sample_sigma(micro_batch, g)[0], torch.randn(overfit[0].shape, generator=g))

    eval_state = setup_evaluation(args, dataset, train_index, config, device) if args.eval_every and is_main else None
    n_buckets = 8                                               # loss per noise-level bucket, in log sigma
    log_lo, log_hi = math.log(diffusion.sigma_min), math.log(diffusion.sigma_max)
    stats = torch.zeros(3, n_buckets + 1, dtype=torch.float64)  # sums: count, loss; [:, -1] the total
    bad_steps, t_last, images_seen = 0, time.time(), 0
    bar = tqdm(total=args.steps, initial=step, disable=not is_main or args.no_progress, desc='train', dynamic_ncols=True)
    while step < args.steps:
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group['lr'] = lr
        step_loss = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            g = step_generator(args, step, rank, micro)
            if overfit is not None:
                x0, y, sigma, noise = overfit
            else:
                x0, y = get_batch(dataset, train_index[torch.randint(len(train_index), (micro_batch,), generator=g)])
                sigma, noise = None, None
            cond = {}
            if args.aug_p > 0:
                x0, aug_cond = augment_pipe(x0, generator=g)
                cond['aug_cond'] = aug_cond.to(device)
            if config['data']['num_classes']:
                drop = torch.rand(len(y), generator=g) < args.p_uncond     # label dropout (Ho & Salimans 2021)
                cond['y'] = torch.where(drop, torch.full_like(y, config['data']['num_classes']), y).to(device)
            if sigma is None:
                sigma, weight, t_index = diffusion.sample_sigma(micro_batch, g)
                noise = torch.randn(x0.shape, generator=g)
            sync = nullcontext() if (world == 1 or micro == args.grad_accum - 1) else model.no_sync()
            with sync, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, _ = diffusion.loss(model, x0.to(device), sigma.to(device), noise.to(device), **cond)
                if diffusion.importance is not None and overfit is None:
                    diffusion.importance.update(t_index, loss)        # the history before reweighting
                    loss = loss * weight.to(device)
                scaler.scale(loss.mean() / args.grad_accum).backward()
            step_loss += loss.detach().mean() / args.grad_accum
            bucket = ((sigma.double().log() - log_lo) / (log_hi - log_lo) * n_buckets).long().clamp(0, n_buckets - 1)
            stats[0].index_add_(0, bucket, torch.ones(len(bucket), dtype=torch.float64))
            stats[1].index_add_(0, bucket, loss.detach().double().cpu())
            images_seen += micro_batch * world

        if world > 1:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        if not torch.isfinite(step_loss):
            # Skip the update (fp16 overflow or a bad batch); stop if it keeps happening.
            optimizer.zero_grad(set_to_none=True)
            if use_scaler:
                scaler.update(scaler.get_scale() / 2)
            bad_steps += 1
            warnings.warn(f'step {step}: non-finite loss, update skipped ({bad_steps} in a row)')
            if bad_steps >= 10:
                raise SystemExit('error: the loss was not finite for 10 steps in a row. Lower --lr, use --amp bf16 '
                                 'or none, or check the data for NaNs.')
            step += 1
            continue
        bad_steps = 0
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float('inf'))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, net, ema_decay(step, args.ema_decay))
        step += 1
        stats[2, -1] += step_loss.item()
        stats[0, -1] += 1
        bar.update(1)

        if is_main and (step % args.log_every == 0 or step == args.steps):
            elapsed = time.time() - t_last
            record = {'step': step, 'loss': stats[2, -1].item() / max(stats[0, -1].item(), 1), 'lr': lr,
                      'grad_norm': grad_norm.item(), 'img_per_s': images_seen / elapsed,
                      'loss_by_sigma': {f'{math.exp(log_lo + (b + 0.5) * (log_hi - log_lo) / n_buckets):.3g}':
                                        round(stats[1, b].item() / stats[0, b].item(), 5)
                                        for b in range(n_buckets) if stats[0, b] > 0}}
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f'{lr:.1e}', img_s=f"{record['img_per_s']:.0f}")
            log.write(json.dumps(record) + '\n')
            log.flush()
            stats.zero_()
            t_last, images_seen = time.time(), 0
        if is_main and args.val_every and (step % args.val_every == 0 or step == args.steps):
            val_cond = {'y': torch.full((len(val_y),), config['data']['num_classes'], device=device)} if config['data']['num_classes'] else {}
            if config['net'].get('aug_dim'):
                val_cond['aug_cond'] = torch.zeros(len(val_y), config['net']['aug_dim'], device=device)
            with torch.no_grad():
                val_loss = diffusion.loss(ema, val_x.to(device), val_sigma.to(device), val_noise.to(device), **val_cond)[0].mean().item()
            log.write(json.dumps({'step': step, 'val_loss': val_loss}) + '\n')
            log.flush()
        if step % args.ckpt_every == 0 or step == args.steps or step == args.save_early:
            rng = [{'cpu': torch.get_rng_state()}]
            if device.type == 'cuda':
                rng[0]['cuda'] = torch.cuda.get_rng_state(device)
            if world > 1:                                       # every rank's dropout RNG, for an exact resume
                mine, rng = rng[0], [None] * world
                dist.all_gather_object(rng, mine)
            if is_main:
                state = {'config': config, 'model': net.state_dict(), 'ema': ema.state_dict(),
                         'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(), 'step': step,
                         'args': vars(args), 'rng': rng}
                if diffusion.importance is not None:
                    state['importance'] = {'losses': torch.from_numpy(diffusion.importance.losses),
                                           'counts': torch.from_numpy(diffusion.importance.counts)}
                save_checkpoint(ckpt_path, state)
                if step == args.save_early:
                    save_checkpoint(os.path.join(args.out, f'ckpt_{step:07d}.pt'), state)
        if eval_state is not None and (step % args.eval_every == 0 or step == args.steps):
            ema.eval()
            log.write(json.dumps(run_evaluation(args, ema, diffusion, config, eval_state, step, device)) + '\n')
            log.flush()
        if is_main and ((args.sample_every and step % args.sample_every == 0) or step == args.steps):
            path = os.path.join(args.out, f'samples_{step:07d}.png')
            ema.eval()
            sample_grid(ema, diffusion, config, args, path, device)
            bar.write(f'step {step}: wrote {path}')
    bar.close()
    if world > 1:
        # DDP keeps the replicas identical by averaging gradients; check it, since a silent divergence (a buffer
        # updated on one rank only, a rank-dependent branch) ruins a run without any error.
        checksum = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum().cpu()
        sums = [None] * world
        dist.all_gather_object(sums, checksum.item())
        if is_main:
            log.write(json.dumps({'step': step, 'ddp_param_checksums': sums}) + '\n')
            if max(sums) - min(sums) > 1e-6 * (1 + abs(sums[0])):
                warnings.warn(f'DDP replicas diverged: parameter checksums {sums}')
        dist.barrier()
        dist.destroy_process_group()
    if log:
        log.close()
    return net, ema


if __name__ == '__main__':
    try:
        main(parse_args())
    except (data.DatasetNotFoundError, ValueError) as e:     # a missing dataset, a bad flag value: the message only
        raise SystemExit(f'error: {e}')
