"""
Sample a text-to-image model: `python sample.py --ckpt runs/text/ckpt.pt --prompt "a small red triangle top left"`
(sample.py hands text checkpoints and --prompt to this program; `python sample_text.py ...` is the same).

The model (train_text.py) is a rectified flow (Liu et al. 2022, arXiv:2209.03003; diffusion.py's 'flow'
parameterisation, x_t = (1 - t) x0 + t noise) whose network reads a caption: textenc.TextConditioned around an
MM-DiT (mmdit.py), a DiT with cross-attention (dit.py) or a U-Net with cross-attention (unet.py). Sampling is
Euler on the flow ODE (samplers.sample_euler in the sigma frame, which for this linear path is exactly Euler in t),
on the time grid t_i = shift(1 - i / n) of SD3 (Esser et al. 2024, arXiv:2403.03206, Sec. 5.3.2, mmdit.time_shift),
with classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598, Eq. 6, written for the denoiser):
    D_w(x) = D(x, empty caption) + w (D(x, caption) - D(x, empty caption))       (w = 1: no guidance)

Checkpoint config (task 'text'), everything needed to rebuild the model and its tokenizer:
    model        'mmdit' | 'dit' | 'unet';  config_name: its named configuration;  net: the backbone's kwargs
    text         textenc.TextEncoder kwargs (vocab_size, max_len, width, depth, heads, mlp_ratio, frozen)
    tokenizer    captions.Tokenizer kwargs (vocab, max_len)
    diffusion    {prediction: 'flow', logit_mean, logit_std, shift}: training t = shift(sigmoid(m + s z))
    data         checkpoints.data_config(...) and captions: the source of the training captions
"""
import argparse
import math
import os
import sys

import torch

import captions
import checkpoints
import runs
import textenc
from diffusion import Diffusion, FlowSchedule
from dit import DIT_CONFIGS, DiT
from mmdit import MMDIT_CONFIGS, MMDiT, time_shift
from samplers import sample_euler
from unet import UNET_CONFIGS, UNet

BACKBONES = {'mmdit': (MMDiT, MMDIT_CONFIGS), 'dit': (DiT, DIT_CONFIGS), 'unet': (UNet, UNET_CONFIGS)}
DEFAULT_CONFIG = {'mmdit': 'MMDiT-tiny/2', 'dit': 'DiT-tiny/2', 'unet': 'micro'}


# ----------------------------------------------------------------------------------------------------
# The model and its training process, rebuilt from a config

class ShiftedFlowSchedule(FlowSchedule):
    """diffusion.FlowSchedule with SD3's resolution-dependent shift (Sec. 5.3.2) applied to the logit-normal t:
    t -> shift t / (1 + (shift - 1) t), which is sigma -> shift * sigma (mmdit.py). shift = 1: no change."""

    def __init__(self, shift=1.0, **kw):
        super().__init__(**kw)
        self.shift = shift
        self.sigma_min, self.sigma_max = shift * self.sigma_min, shift * self.sigma_max

    def sigma(self, u):
        return self.shift * super().sigma(u)


def backbone_config(model, name, resolution, channels, context_dim, pooled_dim):
    """The constructor kwargs of the image network for these images, reading `context_dim`-wide caption tokens."""
    cls, configs = BACKBONES[model]
    if name not in configs:
        raise SystemExit(f"error: --config {name!r} is not a {model} configuration; choose from {', '.join(configs)}")
    if model == 'mmdit':
        net = dict(configs[name], input_size=resolution, in_channels=channels, context_dim=context_dim,
                   pooled_dim=pooled_dim)
    elif model == 'dit':
        net = dict(configs[name], input_size=resolution, in_channels=channels, num_classes=0, context_dim=context_dim)
    else:
        net = dict(configs[name], in_channels=channels, image_size=resolution, num_classes=0, context_dim=context_dim)
    return net


def build_model(config):
    """TextConditioned(TextEncoder, backbone) from a config (fresh weights)."""
    cls, _ = BACKBONES[config['model']]
    return textenc.TextConditioned(textenc.TextEncoder(**config['text']), cls(**config['net']))


def build_diffusion(config):
    d = config['diffusion']
    return Diffusion(ShiftedFlowSchedule(d['shift'], logit_mean=d['logit_mean'], logit_std=d['logit_std']),
                     prediction='flow', t_sampler='uniform')


def check_text_config(config, path):
    """The keys this program reads, each checked: a damaged or foreign file is a message, not a KeyError."""
    problems = []
    if config.get('task') != 'text' or config.get('model') not in BACKBONES:
        problems.append(f"task/model are {config.get('task')!r}/{config.get('model')!r}, "
                        f"not 'text'/one of {list(BACKBONES)}")
    for key in ('net', 'text', 'tokenizer', 'diffusion', 'data'):
        if not isinstance(config.get(key), dict):
            problems.append(f'config.{key} is missing or not a dict')
    d = config.get('diffusion') if isinstance(config.get('diffusion'), dict) else {}
    for key in ('logit_mean', 'logit_std', 'shift'):
        if not (isinstance(d.get(key), (int, float)) and math.isfinite(d[key])):
            problems.append(f'config.diffusion.{key} is {d.get(key)!r}, not a finite number')
    if not problems and (d['shift'] <= 0 or d['logit_std'] <= 0):
        problems.append('config.diffusion.shift and logit_std must be > 0')
    if problems:
        raise SystemExit(f'error: {path!r} is not a usable text-to-image checkpoint: ' + '; '.join(problems))


def load_text_model(path, device='cpu'):
    """(model with EMA weights, eval; Diffusion; Tokenizer; config) of a train_text.py checkpoint."""
    ckpt = checkpoints.load_checkpoint(path, device, expect='text')
    config = ckpt['config']
    check_text_config(config, path)
    try:
        model = build_model(config)
        model.load_state_dict(ckpt['ema'])
        tokenizer = captions.Tokenizer(**config['tokenizer'])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise SystemExit(f'error: {path!r}: cannot rebuild its model: {str(e).splitlines()[0][:300]}') from None
    return model.to(device).eval(), build_diffusion(config), tokenizer, config


def is_text_checkpoint(path):
    """Whether path holds a train_text.py checkpoint (sample.py's hook asks)."""
    if not (isinstance(path, str) and os.path.isfile(path)):
        return False
    config = checkpoints.load_checkpoint(path).get('config', {})
    return isinstance(config, dict) and config.get('task') == 'text'


def is_text_argv(argv):
    """sample.py hands a command line to this program when it has --prompt or its --ckpt is a text model."""
    if any(a == '--prompt' or a.startswith('--prompt=') for a in argv):
        return True
    for i, a in enumerate(argv):
        path = argv[i + 1] if a == '--ckpt' and i + 1 < len(argv) else a[len('--ckpt='):] if a.startswith('--ckpt=') else None
        if path is not None:
            return is_text_checkpoint(path)
    return False


# ----------------------------------------------------------------------------------------------------
# Sampling

def flow_sigmas(steps, shift=1.0, t_max=1 - 1e-3):
    """The sigmas of `steps` Euler steps: t_i = shift(t_max (1 - i / steps)) (SD3 Sec. 5.3.2), sigma = t / (1 - t),
    ending in 0. t_max < 1 keeps the first sigma finite (the flow's t = 1 is pure noise, sigma = inf)."""
    t = time_shift(torch.linspace(t_max, 0, steps + 1, dtype=torch.float64), shift)
    return (t / (1 - t)).float()


def guided_denoiser(model, diffusion, ids, mask, guidance):
    """D_w(x, sigma) = D(x, "") + w (D(x, caption) - D(x, "")): both halves in one batch (w = 1: one pass)."""
    empty = textenc.empty_caption(len(ids), ids.shape[1], ids.device)
    def denoise(x, sigma, **unused):
        if guidance == 1:
            return diffusion.denoise_with(model, x, sigma, ids=ids, mask=mask)
        both = diffusion.denoise_with(model, torch.cat([x, x]), torch.as_tensor(sigma).expand(len(x)).repeat(2),
                                      ids=torch.cat([ids, empty]), mask=torch.cat([mask, empty != textenc.PAD]))
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)
    return denoise


@torch.no_grad()
def generate(model, diffusion, tokenizer, prompts, image_shape, steps=20, guidance=3.0, shift=None, seed=0, device='cpu'):
    """One image per prompt, (N, C, H, W) in [-1, 1]: Euler on the flow ODE from noise drawn from `seed`."""
    ids, mask = (t.to(device) for t in tokenizer.encode(prompts))
    sigmas = flow_sigmas(steps, diffusion.schedule.shift if shift is None else shift)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((len(prompts), *image_shape), generator=g) * sigmas[0]).to(device)
    x = sample_euler(guided_denoiser(model, diffusion, ids, mask, guidance), x, sigmas.to(device))
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Sample a text-to-image model (train_text.py) from prompts.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', required=True, help='checkpoint of train_text.py (python train.py --captions ...)')
    p.add_argument('--prompt', action='append', default=[], help='a caption (repeatable); "" is the unconditional model')
    p.add_argument('--num', type=int, default=8, help='samples per prompt (one row each)')
    p.add_argument('--steps', type=int, default=20, help='Euler steps')
    p.add_argument('--guidance', type=float, default=3.0, help='classifier-free guidance weight w (1 = none)')
    p.add_argument('--shift', type=float, default=None, help="SD3's timestep shift alpha for sampling (default: the training one)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='samples_text.png', help='PNG grid: one row per prompt')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --out')
    p.add_argument('--device', default='cpu')
    return p.parse_args(argv)


def main(args):
    problems = [m for ok, m in ((args.prompt, '--prompt is needed (one or more captions)'),
                                (args.num >= 1, f'--num must be at least 1 (got {args.num})'),
                                (args.steps >= 1, f'--steps must be at least 1 (got {args.steps})'),
                                (math.isfinite(args.guidance), f'--guidance must be finite (got {args.guidance})'),
                                (args.shift is None or (math.isfinite(args.shift) and args.shift > 0),
                                 f'--shift must be > 0 (got {args.shift})')) if not ok]
    if problems:
        raise SystemExit('error: ' + '\n       '.join(problems))
    try:
        runs.check_output_path(args.out, ('.png',), '--out', args.overwrite)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    model, diffusion, tokenizer, config = load_text_model(args.ckpt, args.device)
    # Every word must be one the model was trained on: an unknown word would be read as <unk>, silently.
    unknown = sorted({w for p in args.prompt for w in tokenizer.unknown_words(p)})
    if unknown:
        raise SystemExit(f"error: {', '.join(map(repr, unknown))} not in the model's vocabulary; it knows: "
                         + ' '.join(tokenizer.vocab[len(captions.SPECIALS):]))
    d = config['data']
    prompts = [p for p in args.prompt for _ in range(args.num)]
    images = generate(model, diffusion, tokenizer, prompts, (d['channels'], d['resolution'], d['resolution']),
                      args.steps, args.guidance, args.shift, args.seed, args.device)
    from sample import save_grid                       # the one PNG-grid writer
    save_grid(images, args.out, nrow=args.num)                 # written through runs.atomic_write
    print(f'wrote {args.out}: {len(args.prompt)} prompt(s) x {args.num} samples, {args.steps} Euler steps, '
          f'guidance {args.guidance}, shift {diffusion.schedule.shift if args.shift is None else args.shift}')


if __name__ == '__main__':
    main(parse_args(sys.argv[1:]))
