"""
Train a text-to-image rectified flow: `python train.py --captions --dataset shapes --model mmdit --out runs/text`
(train.py hands `--captions` to this program; `python train_text.py ...` is the same). Then
`python sample.py --ckpt runs/text/ckpt.pt --prompt "a small red triangle top left"`.

The SD3 recipe in miniature (Esser et al. 2024, arXiv:2403.03206):
  data       every image with its caption (captions.py: drawn attributes for shapes, labels for MNIST, NAME.txt
             for folder:PATH), tokenized once with a word vocabulary the checkpoint keeps
  objective  rectified flow, x_t = (1 - t) x0 + t noise, the network predicting the velocity noise - x0
             (diffusion.py's 'flow'), t logit-normal (Eq. 19) then shifted by SD3's resolution shift (Sec. 5.3.2,
             sample_text.ShiftedFlowSchedule; alpha = sqrt(m / n) = R / --shift-base by default)
  network    textenc.TextConditioned: a text encoder trained jointly (or frozen at its random initialisation,
             --freeze-text) whose tokens reach an MM-DiT's text stream (--model mmdit), or the cross-attention of a
             DiT or U-Net (--model dit / unet), with captions dropped at rate --p-uncond for classifier-free guidance
The loop is train.py's Algorithm 1 over runs.py's harness (run folder, exact resume, AMP, DDP, the gradient-update
skeleton, checkpoints that a blown-up model never replaces). Imports no training program.
"""
import argparse
import math
import os

import torch
from tqdm import tqdm

import captions
import checkpoints
import data
import runs
import sample_text
import textenc

RESUME_FLAGS = runs.RESUME_FLAGS + ('p_uncond',)


def train_step(run, micro_batches, args):
    """Algorithm 1 on one step's micro-batches: sigma ~ p_train (shifted logit-normal), noise, velocity MSE."""
    def loss(b):
        per_sample, _ = run.diffusion.loss(run.model, b['x0'], generator=b['generator'], ids=b['ids'])
        return per_sample.mean(), per_sample, {}
    return runs.gradient_step(run, micro_batches, args, loss)


def main(args):
    # Setup: flags, processes, run folder; the images and one caption each, tokenized once.
    check_args(args)
    setup = runs.start_run(args)
    device, is_main = setup.device, setup.is_main
    dataset, train_index, val_index = runs.load_training_data(args)
    if getattr(dataset, 'frames', 0):
        raise SystemExit(f'error: {args.dataset} holds videos; the text-to-image models here take images '
                         '(captions.py captions the clips, but no network here reads them yet)')
    try:
        texts = captions.dataset_captions(dataset)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}') from None
    tokenizer = captions.Tokenizer.build(texts)
    ids, _ = tokenizer.encode(texts)                                             # (N, L)
    if args.exclude:              # combinations never seen in training (e.g. 'red triangle'), to test generalisation
        unseen = lambda text: any(set(captions.words(e)) <= set(captions.words(text)) for e in args.exclude)
        train_index = torch.tensor([i for i in train_index.tolist() if not unseen(texts[i])], dtype=torch.long)
        if not len(train_index):
            raise SystemExit(f'error: --exclude {args.exclude} leaves no training images')
    config = make_config(args, dataset, tokenizer)

    # Setup model: the text encoder and the image network as one module, so the harness trains, EMAs and saves both.
    run = runs.make_trainee(args, sample_text.build_model(config), sample_text.build_model(config), setup,
                            sample_text.build_diffusion(config))
    if setup.resume:
        runs.resume_run(run, config, args, setup, RESUME_FLAGS)
    last_good, log = runs.saved_step(run, setup), runs.open_log(run, setup, args)
    if is_main:
        n_text = sum(p.numel() for p in run.net.encoder.parameters())
        print(f"text-to-image {args.model} '{config['config_name']}' "
              f'{sum(p.numel() for p in run.net.parameters()) / 1e6:.2f}M parameters (text encoder {n_text / 1e6:.2f}M, '
              f"{'frozen' if args.freeze_text else 'trained'}); {args.dataset}: {len(train_index)} captioned images, "
              f'vocabulary {len(tokenizer.vocab)} words, e.g. {texts[int(train_index[0])]!r}; '
              f"flow shift {config['diffusion']['shift']:.3g}; device {device}")
    bar = tqdm(total=args.steps, initial=run.step, disable=not is_main or args.no_progress, desc='train', dynamic_ncols=True)
    total, count = 0.0, 0

    while run.step < args.steps:
        # Train: images and captions of this step (a pure function of seed and step), captions dropped at
        # --p-uncond, then one step of Algorithm 1.
        lr = runs.get_lr(run.step, args)
        runs.set_lr([run.optimizer], lr)
        micro = [micro_batch(args, dataset, ids, train_index, run.step, setup, m) for m in range(args.grad_accum)]
        losses = train_step(run, micro, args)
        run.step += 1
        bar.update(1)
        if losses is not None:
            total += torch.stack([l.mean() for l, _ in losses]).mean().item()
            count += 1
        done = run.step == args.steps

        # Log: the mean training loss; the EMA model's held-out loss with fixed t and noise.
        if is_main and (run.step % args.log_every == 0 or done) and count:
            log.write({'step': run.step, 'loss': round(total / count, 6), 'lr': lr, 'grad_norm': float(run.grad_norm)})
            bar.set_postfix(loss=f'{total / count:.4f}')
            total, count = 0.0, 0
        if is_main and args.val_every and len(val_index) and (run.step % args.val_every == 0 or done):
            log.write({'step': run.step, 'val_loss': held_out_loss(run, dataset, ids, val_index, device)})

        # Save checkpoint (only good weights replace the last one); the grid: held-out captions as prompts.
        if run.step % args.ckpt_every == 0 or done:
            last_good = runs.save_checkpoint(run, config, args, setup, last_good)
        if is_main and ((args.sample_every and run.step % args.sample_every == 0) or done):
            write_grid(run, config, tokenizer, texts, val_index if len(val_index) else train_index, args, device)
    bar.close()
    runs.finish_run(run, setup, log)
    return run.net, run.ema


def micro_batch(args, dataset, ids, train_index, step, setup, m):
    """Images x0 (B, C, H, W), their caption ids with dropout, and the stream-1 generator of (seed, step, m)."""
    g = runs.step_generator(args, step, setup.rank, m, stream=0)
    index = train_index[torch.randint(len(train_index), (setup.micro_batch,), generator=g)]
    x0, _ = runs.load_batch(dataset, index)
    g = runs.step_generator(args, step, setup.rank, m, stream=1)
    return {'x0': x0.to(setup.device), 'ids': textenc.caption_dropout(ids[index], args.p_uncond, g).to(setup.device),
            'generator': g}


@torch.no_grad()
def held_out_loss(run, dataset, ids, val_index, device):
    """The EMA model's flow loss on up to 256 held-out images with their captions, fixed t and noise."""
    index = val_index[:256]
    x0, _ = runs.load_batch(dataset, index)
    loss, _ = run.diffusion.loss(run.ema, x0.to(device), generator=torch.Generator().manual_seed(1234),
                                 ids=ids[index].to(device))
    return round(loss.mean().item(), 6)


def write_grid(run, config, tokenizer, texts, index, args, device):
    """OUT/samples_STEP.png: 8 held-out captions as prompts (rows), 4 samples each, guidance --guidance."""
    prompts = list(dict.fromkeys(texts[int(i)] for i in index))[:8]
    images = sample_text.generate(run.ema.eval(), run.diffusion, tokenizer, [p for p in prompts for _ in range(4)],
                                  (config['data']['channels'], config['data']['resolution'], config['data']['resolution']),
                                  args.sample_steps, args.guidance, seed=0, device=device)
    from sample import save_grid
    path = os.path.join(args.out, f'samples_{run.step:07d}.png')
    save_grid(images, path, nrow=4)
    runs.atomic_write(path[:-4] + '.txt', lambda tmp: open(tmp, 'w').write('\n'.join(prompts) + '\n'))


def make_config(args, dataset, tokenizer):
    """The checkpoint config (schema: sample_text.py's docstring)."""
    name = args.config or sample_text.DEFAULT_CONFIG[args.model]
    text = textenc.TextEncoder(len(tokenizer.vocab), tokenizer.max_len, frozen=args.freeze_text,
                               **textenc.TEXT_CONFIGS[args.text_config]).config
    net = sample_text.backbone_config(args.model, name, dataset.resolution, dataset.channels, text['width'], text['width'])
    shift = args.shift if args.shift is not None else dataset.resolution / args.shift_base   # sqrt(m / n), m = R^2
    diffusion = {'prediction': 'flow', 'logit_mean': args.logit_mean, 'logit_std': args.logit_std, 'shift': shift}
    data_config = dict(checkpoints.data_config(args.dataset, dataset), captions=args.dataset, excluded=list(args.exclude))
    return checkpoints.make_config('text', args.model, name, net, data_config, diffusion, text=text,
                                   tokenizer=tokenizer.config())


# ----------------------------------------------------------------------------------------------------
# Command line: runs.py's shared flags plus the text model's.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train a text-to-image rectified flow on captioned images.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    runs.add_run_flags(p)
    g = p.add_argument_group('text-to-image model (mmdit.py, textenc.py, captions.py)')
    g.add_argument('--model', default='mmdit', choices=list(sample_text.BACKBONES),
                   help='MM-DiT (joint attention) or a DiT / U-Net reading the caption by cross-attention')
    g.add_argument('--config', default=None, help='named configuration of --model (default: '
                   + ', '.join(f'{m} {c}' for m, c in sample_text.DEFAULT_CONFIG.items()) + ')')
    g.add_argument('--text-config', default='tiny', choices=list(textenc.TEXT_CONFIGS), help='text encoder size')
    g.add_argument('--freeze-text', action='store_true', help='keep the text encoder at its random initialisation')
    g.add_argument('--exclude', action='append', default=[], metavar='WORDS',
                   help='leave out training images whose caption has every word of WORDS (repeatable), e.g. "red triangle"')
    g.add_argument('--p-uncond', type=float, default=0.1, help='caption dropout, for classifier-free guidance')
    g.add_argument('--logit-mean', type=float, default=0.0, help='m of the logit-normal t (SD3 Eq. 19)')
    g.add_argument('--logit-std', type=float, default=1.0, help='s of the logit-normal t')
    g.add_argument('--shift', type=float, default=None, help='SD3 timestep shift alpha (default: resolution / --shift-base)')
    g.add_argument('--shift-base', type=int, default=32, help='the base resolution n of alpha = sqrt(m / n) (pixels per side)')
    g = p.add_argument_group('grids')
    g.add_argument('--sample-steps', type=int, default=20, help='Euler steps of the grids')
    g.add_argument('--guidance', type=float, default=3.0, help='classifier-free guidance weight of the grids')
    return p.parse_args(argv)


def check_args(args):
    """Every flag checked before the dataset is read: one message listing all problems (runs.check_flags)."""
    runs.check_flags(args, check_text_args)


def check_text_args(args, need):
    finite = lambda v: v is not None and math.isfinite(v)
    need(finite(args.p_uncond) and 0 <= args.p_uncond < 1, f'--p-uncond must be in [0, 1) (got {args.p_uncond})')
    need(finite(args.logit_mean), f'--logit-mean must be finite (got {args.logit_mean})')
    need(finite(args.logit_std) and args.logit_std > 0, f'--logit-std must be > 0 (got {args.logit_std})')
    need(args.shift is None or (finite(args.shift) and args.shift > 0), f'--shift must be > 0 (got {args.shift})')
    need(args.shift_base >= 1, f'--shift-base must be at least 1 (got {args.shift_base})')
    need(args.sample_steps >= 1, f'--sample-steps must be at least 1 (got {args.sample_steps})')
    need(finite(args.guidance), f'--guidance must be a finite number (got {args.guidance})')
    configs = sample_text.BACKBONES[args.model][1]
    need(args.config is None or args.config in configs,
         f"--config {args.config!r} is not a {args.model} configuration; choose from {', '.join(configs)}")
    need(not data.is_video_dataset(args.dataset), f'{args.dataset} holds videos; the text-to-image models here take images')


if __name__ == '__main__':
    runs.run_command(main, parse_args)
