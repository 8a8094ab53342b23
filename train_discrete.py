"""
Train discrete diffusion on the tokens of a VQ autoencoder: `python train_discrete.py --autoencoder runs/ae/ckpt.pt
--dataset mnist --data-dir DIR --split test --out runs/discrete` (also `python train.py --task discrete ...`); then
`python sample_discrete.py --ckpt runs/discrete/ckpt.pt --decoder maskgit` decodes samples through the same VQ model.

The data are the code indices of every training image, x0 = (N, h * w) in 0..K-1 (sample_discrete.encode_tokens),
encoded once and cached beside the autoencoder (named by its sha256, the dataset, split and resolution). The
network (discrete.TokenTransformer) predicts p(x0 | x_t) at every position; the objective is
    absorbing:  L = -alpha'(t) / (1 - alpha(t)) sum_{masked l} -log p(x0^l | x_t),  t ~ U(0, 1]
                (the masked-diffusion ELBO, MD4 Sec. 4 / MDLM Eq. 10: discrete.masked_diffusion_loss)
    uniform:    D3PM's hybrid loss L_vb + lambda CE with --T steps (D3PM Eq. 5: discrete.d3pm_hybrid_loss)
and the log reports the ELBO in bits per token, held-out too. Classes are dropped with probability --p-uncond
(the "no class" label), so sampling can use classifier-free guidance.

The harness is runs.py's (run folder, exact resume, AMP, DDP, the gradient-update skeleton); the checkpoint
format checkpoints.py's, with the config keys of sample_discrete.py's docstring. Imports no training program.
"""
import argparse
import math
import os
import re

import torch
from tqdm import tqdm

import checkpoints
import discrete
import runs
import sample
import sample_discrete

# The objective's settings change what an uninterrupted run would do, like the optimisation flags.
RESUME_FLAGS = runs.RESUME_FLAGS + ('p_uncond', 'hybrid_lambda')


def train_step(run, process, micro_batches, args):
    """One optimizer step on the discrete ELBO of each micro-batch; [(loss, bits per token)] or None if skipped."""
    def loss(b):
        if process.kind == 'absorbing':
            nats, _ = discrete.masked_diffusion_loss(run.model, process, b['x0'], generator=b['generator'], y=b['y'])
            objective = nats
        else:
            objective, nats = discrete.d3pm_hybrid_loss(run.model, process, b['x0'], args.T, args.hybrid_lambda,
                                                        generator=b['generator'], y=b['y'])
        return objective.mean(), nats.detach(), {}
    return runs.gradient_step(run, micro_batches, args, loss)


def main(args):
    # Setup: flags, processes, run folder; the VQ autoencoder and the tokens of every image (cached once).
    runs.check_flags(args, check_discrete_args)
    setup = runs.start_run(args)
    device, is_main = setup.device, setup.is_main
    dataset, train_index, val_index = runs.load_training_data(args)
    ae = checkpoints.load_autoencoder(args.autoencoder, device)
    if ae.config['kind'] != 'vq':
        raise SystemExit(f'error: {args.autoencoder} is a KL autoencoder; discrete diffusion needs a VQ one (--vq)')
    tokens, labels = cached_tokens(args, ae, dataset, device)                    # (M, h, w), (M,)
    config = make_config(args, dataset, ae, tokens.shape[1:])
    process = discrete.DiscreteProcess(args.process, ae.config['codebook_size'], args.schedule)
    run = runs.make_trainee(args, discrete.TokenTransformer(**config['net']),
                            discrete.TokenTransformer(**config['net']), setup)
    if setup.resume:
        runs.resume_run(run, config, args, setup, RESUME_FLAGS)
    last_good, log = run.step, runs.open_log(run, setup, args)
    tokens, labels = tokens.flatten(1), labels if config['net']['num_classes'] else torch.zeros_like(labels)
    if is_main:
        print(f"discrete diffusion ({args.process}, {args.schedule}) '{config['config_name']}' "
              f'{sum(p.numel() for p in run.net.parameters()) / 1e6:.2f}M parameters on '
              f'{tuple(config["autoencoder"]["latent_shape"])} '
              f"tokens of {process.K} codes; {len(train_index)} training + {len(val_index)} held-out images; device {device}")
    bar = tqdm(total=args.steps, initial=run.step, disable=not is_main or args.no_progress, desc='train', dynamic_ncols=True)
    sums, count = [0.0, 0.0], 0

    while run.step < args.steps:
        # Train: a micro-batch of token grids (indices: a pure function of seed and step, as runs.training_batches),
        # classes dropped with --p-uncond, t and the corruption from the step's stream-1 generator.
        lr = runs.get_lr(run.step, args)
        runs.set_lr([run.optimizer], lr)
        micro = [micro_batch(args, tokens, labels, train_index, run.step, setup, m, config) for m in range(args.grad_accum)]
        losses = train_step(run, process, micro, args)
        run.step += 1
        bar.update(1)
        if losses is not None:
            sums[0] += torch.stack([l.mean() for l, _ in losses]).mean().item()
            count += 1
        done = run.step == args.steps

        # Log: the training ELBO in bits per token; the EMA model's held-out ELBO.
        if is_main and (run.step % args.log_every == 0 or done) and count:
            bpt = discrete.bits_per_token(sums[0] / count, tokens.shape[1])
            log.write({'step': run.step, 'bits_per_token': round(bpt, 5), 'lr': lr, 'grad_norm': float(run.grad_norm)})
            bar.set_postfix(bpt=f'{bpt:.4f}')
            sums, count = [0.0, 0.0], 0
        if is_main and args.val_every and len(val_index) and (run.step % args.val_every == 0 or done):
            bits = held_out_bits(run, process, tokens, labels, val_index, args, device)
            log.write({'step': run.step, 'val_bits_per_token': bits})

        # Save checkpoint: only weights known to be good replace the previous one.
        if run.step % args.ckpt_every == 0 or done:
            last_good = runs.save_checkpoint(run, config, args, setup, last_good)
        # Sample grid: the EMA model through the run's decoder, decoded by the VQ model.
        if is_main and ((args.sample_every and run.step % args.sample_every == 0) or done):
            write_grid(run, process, config, ae, args, device)
    bar.close()
    runs.finish_run(run, setup, log)
    return run.net, run.ema


def micro_batch(args, tokens, labels, train_index, step, setup, m, config):
    """Token grids x0 (B, L), labels with the "no class" index at rate --p-uncond, and the stream-1 generator."""
    g = runs.step_generator(args, step, setup.rank, m, stream=0)
    index = train_index[torch.randint(len(train_index), (setup.micro_batch,), generator=g)]
    g = runs.step_generator(args, step, setup.rank, m, stream=1)
    y = labels[index].clone()
    num_classes = config['net']['num_classes']
    if num_classes:
        y[torch.rand(len(y), generator=g) < args.p_uncond] = num_classes
    return {'x0': tokens[index].to(setup.device), 'y': y.to(setup.device) if num_classes else None, 'generator': g}


@torch.no_grad()
def held_out_bits(run, process, tokens, labels, val_index, args, device):
    """The EMA model's ELBO (bits per token) on up to 500 held-out images, with fixed t and corruption."""
    index = val_index[:500]
    g = torch.Generator().manual_seed(1234)
    x0, y = tokens[index].to(device), labels[index].to(device) if run.ema.config['num_classes'] else None
    if process.kind == 'absorbing':
        nats, _ = discrete.masked_diffusion_loss(run.ema, process, x0, generator=g, y=y)
    else:
        _, nats = discrete.d3pm_hybrid_loss(run.ema, process, x0, args.T, args.hybrid_lambda, generator=g, y=y)
    return round(discrete.bits_per_token(nats.mean().item(), tokens.shape[1]), 5)


def write_grid(run, process, config, ae, args, device):
    """64 samples of the EMA model (classes cycling) through --sample-decoder, decoded: OUT/samples_STEP.png."""
    labels = sample_discrete.default_labels(config, 64)
    h, w = config['autoencoder']['latent_shape']
    images = sample_discrete.generate(run.ema, process, lambda t: sample_discrete.decode_tokens(ae, t.reshape(-1, h, w)),
                                      64, labels, decoder=args.sample_decoder, steps=args.sample_steps,
                                      guidance=args.guidance, seed=0, device=device)
    sample.save_grid(images, os.path.join(args.out, f'samples_{run.step:07d}.png'), nrow=8)


# ----------------------------------------------------------------------------------------------------
# The data: tokens of every image, encoded once

def cached_tokens(args, ae, dataset, device, chunk=256):
    """(tokens (M, h, w) long, labels (M,)) of the whole dataset, read from the cache beside the autoencoder when
    it exists (named by the autoencoder's sha256, dataset, split and resolution), else encoded and cached."""
    sha = checkpoints.sha256_of(args.autoencoder)
    name = re.sub(r'[^A-Za-z0-9_.-]+', '_', f'{args.dataset}_{args.split}_{dataset.resolution}')
    path = os.path.join(os.path.dirname(os.path.abspath(args.autoencoder)), f'tokens_{name}_{sha[:16]}.pt')
    if os.path.isfile(path):
        cache = torch.load(path, weights_only=True)
        if cache.get('sha256') == sha and len(cache['tokens']) == len(dataset):
            print(f'tokens: read from {path}')
            return cache['tokens'], cache['labels']
    parts, labels = [], []
    for start in tqdm(range(0, len(dataset), chunk), desc='encoding tokens', disable=args.no_progress):
        x, y = runs.load_batch(dataset, torch.arange(start, min(start + chunk, len(dataset))))
        parts.append(sample_discrete.encode_tokens(ae, x.to(device)).cpu())
        labels.append(y)
    tokens, labels = torch.cat(parts), torch.cat(labels)
    runs.atomic_write(path, lambda tmp: torch.save({'sha256': sha, 'tokens': tokens, 'labels': labels}, tmp))
    used = torch.unique(tokens).numel()
    print(f'tokens: {tuple(tokens.shape)} from {len(dataset)} images, {used} of {ae.config["codebook_size"]} codes '
          f'used; cached in {path}')
    return tokens, labels


def make_config(args, dataset, ae, grid):
    """The checkpoint config (schema: sample_discrete.py's docstring)."""
    num_classes = 0 if args.unconditional else dataset.num_classes
    net = dict(discrete.DISCRETE_CONFIGS[args.config], vocab_size=ae.config['codebook_size'],
               seq_len=int(grid[0] * grid[1]), num_classes=num_classes)
    net = discrete.TokenTransformer(**net).config
    diffusion = {'process': args.process, 'schedule': args.schedule, 'T': args.T, 'hybrid_lambda': args.hybrid_lambda}
    data = checkpoints.data_config(args.dataset, dataset)
    if args.unconditional:                      # the classes exist but the model does not see them
        data.update(num_classes=0, class_names=[])
    return checkpoints.make_config('discrete', 'token_transformer', args.config, net, data, diffusion,
                                   autoencoder=checkpoints.latent_record(args.autoencoder, ae, list(grid)))


# ----------------------------------------------------------------------------------------------------
# Command line: runs.py's shared flags plus discrete diffusion's.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train discrete diffusion on the tokens of a VQ autoencoder.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    runs.add_run_flags(p)
    g = p.add_argument_group('discrete diffusion (discrete.py)')
    g.add_argument('--autoencoder', required=True, help='VQ autoencoder checkpoint (train.py --task autoencoder --vq)')
    g.add_argument('--process', default='absorbing', choices=['absorbing', 'uniform'],
                   help='corruption: masking or uniform resampling (D3PM)')
    g.add_argument('--schedule', default='cosine', choices=list(discrete.SCHEDULES), help='alpha(t), the share of clean tokens')
    g.add_argument('--config', default='S', choices=list(discrete.DISCRETE_CONFIGS), help='transformer size')
    g.add_argument('--T', type=int, default=1000, help='uniform process: steps of the D3PM ELBO (hybrid loss)')
    g.add_argument('--hybrid-lambda', type=float, default=0.01, help="uniform process: lambda of D3PM's hybrid loss (Eq. 5)")
    g.add_argument('--p-uncond', type=float, default=0.1, help='class dropout, for classifier-free guidance')
    g.add_argument('--unconditional', action='store_true', help='ignore the class labels')
    g = p.add_argument_group('grids')
    g.add_argument('--sample-decoder', default='maskgit', choices=sample_discrete.DECODERS,
                   help='decoder of the grids (the default of sample_discrete.py)')
    g.add_argument('--sample-steps', type=int, default=12, help='decoding steps of the grids')
    g.add_argument('--guidance', type=float, default=1.0, help='classifier-free guidance scale of the grids')
    return p.parse_args(argv)


def check_discrete_args(args, need):
    finite = lambda v: v is not None and math.isfinite(v)
    need(os.path.isfile(args.autoencoder), f'--autoencoder {args.autoencoder!r} does not exist')
    need(args.T >= 1, f'--T must be at least 1 (got {args.T})')
    need(finite(args.hybrid_lambda) and args.hybrid_lambda >= 0, f'--hybrid-lambda must be >= 0 (got {args.hybrid_lambda})')
    need(finite(args.p_uncond) and 0 <= args.p_uncond < 1, f'--p-uncond must be in [0, 1) (got {args.p_uncond})')
    need(args.sample_steps >= 1, f'--sample-steps must be at least 1 (got {args.sample_steps})')
    need(finite(args.guidance), f'--guidance must be a finite number (got {args.guidance})')
    need(not (args.process == 'uniform' and args.sample_decoder == 'maskgit'),
         'MaskGIT decodes masked tokens: with --process uniform use --sample-decoder ancestral')


if __name__ == '__main__':
    runs.run_command(main, parse_args)
