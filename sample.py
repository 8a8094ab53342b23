"""
Sample a trained model: `python sample.py --ckpt runs/default/ckpt.pt`.

This file is the one place that turns a model into pictures. The training programs (grids, through
reports.py), evaluate.py and the benchmarks import it; it never imports a training program. What it builds on:
checkpoints.py rebuilds the model from the checkpoint's config (as nanoGPT's and DiT's sample.py rebuild it and
import only the model file), knobs.py turns the sampling flags (shared with evaluate.py) into sigmas and guided
denoisers, runs.atomic_write writes every file, video.extend_video continues clips, cascade.py runs SR stages.

    load_model(path, device, use_ema=True) -> (network in eval mode, Diffusion, config)     (checkpoints.py)
    generate(net, diffusion, n, shape, device, labels, num_classes, sampler, steps, guidance, seed, ...)
        -> (n, *shape) images in [-1, 1] on the CPU: THE seeded, batched, labelled sampling routine
    save_grid(images, path), save_gif(videos, path)

Sampling integrates the probability-flow ODE or reverse SDE of the trained denoiser D(x, sigma) from
x_N = sigma_max * n, n ~ N(0, I), down to sigma = 0 (Karras et al. 2022, arXiv:2206.00364, Alg. 1/2) on the
Karras noise levels sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
(their Eq. 5). Class-conditional models are guided by D_w = D(x|y) + (w - 1) (D(x|y) - D(x|null)) (Ho & Salimans
2022, arXiv:2207.12598, Eq. 6, written with w = 1 meaning no guidance).

The checkpoint carries the model configuration and the flags it was trained with (parameterisation, schedule,
image size, classes), so a model is never sampled with settings that do not match its training; sampler, steps,
guidance, class and seed are yours to choose. Writes a PNG grid (videos: one row of frames per sample, and a GIF)
and optionally an .npz of uint8 samples. No existing file is replaced without --overwrite (every file a call
writes is checked before sampling); without --out the grid goes next to the checkpoint as samples.png, or
samples_1.png, samples_2.png, ... when taken. Ctrl-C writes the batches already finished. With --inverse METHOD it instead solves an inverse problem on an image
(inpainting or super-resolution, inverse.py) and writes a strip: measurement, reconstruction, original.

    python sample.py --ckpt runs/mnist/ckpt.pt --sampler dpmpp_3m --steps 20 --class 3 --guidance 2
    python sample.py --ckpt runs/mnist/ckpt.pt --sampler ddim --sampler-opt eta=0.5
    python sample.py --ckpt runs/mnist/ckpt.pt --inverse dps --operator sr --image digit.png
"""
import argparse
import json
import math
import os
import tempfile

import numpy as np
import torch

import cascade
import data
import iddpm
import pretrained
import samplers
from checkpoints import latent_decoder, load_model, sample_shape
# Re-exported for code written against the old sample.py; the checkpoint format is checkpoints.py's.
from checkpoints import build_diffusion, build_network, load_autoencoder, load_checkpoint  # noqa: F401
from guidance import ClassifierFreeGuidance, sample_with_rejection
# The sampling flags shared with evaluate.py (knobs.py), re-exported for code written against the old sample.py.
from knobs import (add_sampling_flags, check_sampler_options, check_sampling_flags, describe_sampling,  # noqa: F401
                   make_sigmas, option_range_problem, parse_sampler_options, sampler_options_from_args,
                   sampling_setup)
from runs import atomic_write, check_output_path
from video import extend_video

# ----------------------------------------------------------------------------------------------------
# Generation: the one routine that draws n samples in seeded, labelled batches. Solver options are checked by
# knobs.check_sampler_options; the network's conditioning travels separately in `cond`.

# Only stochastic samplers take generator= (CONTRACTS.md): passing it to a deterministic one is a TypeError.
def run_sampler(name, denoiser, x, sigmas, options, cond, generator=None, progress=False, callback=None):
    """Call SAMPLERS[name] with its own options, the network's conditioning dict, and the generator only when the
    sampler draws fresh noise with these options (deterministic samplers do not accept one)."""
    options = dict(options, generator=generator) if samplers.is_stochastic(name, options) else dict(options)
    return samplers.SAMPLERS[name](denoiser, x, sigmas, cond=cond, callback=callback, progress=progress, **options)


@torch.no_grad()
def generate(net, diffusion, n, shape, device, labels=None, num_classes=0, sampler='heun', steps=18, guidance=1.0,
             seed=0, progress=False, aug_dim=0, sampler_options=None, batch_size=None, sigmas=None, cond=None,
             guide=None, callback=None, decode=None):
    """n samples (n, *shape) in [-1, 1] on the CPU.

    labels: (n,) class indices (guided with weight `guidance` when != 1), or None for unconditional samples of a
    class-conditional model (the "no class" index num_classes). Batches of batch_size (default: all n) start from
    the noise of torch.Generator().manual_seed(seed + start), start = the batch's first index, so a sample depends
    on (seed, batch_size, its index) only. sampler_options: the solver's own keyword options (checked here, so a
    misspelt one fails before any sampling). sigmas: an explicit noise-level schedule (default: Karras, `steps`).
    cond: extra per-sample conditioning {name: (n, ...) tensor} for the network (x_cond, context, ...).
    guide: denoiser -> denoiser, applied after classifier-free guidance (other guidance methods).
    decode: latents -> images (latent diffusion: latent_decoder(config)), applied before the clamp to [-1, 1].
    """
    # Every argument is checked before the first network call: a typo must not cost a batch of sampling.
    options = check_sampler_options(sampler, sampler_options)
    # n and the batch size must be positive: range(0, n, 0) would loop forever, n = 0 would return nothing.
    if n < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f'need at least one sample and a batch size of at least 1, got n={n}, batch_size={batch_size}')
    if not callable(guidance) and not math.isfinite(guidance):          # a number, or a schedule of sigma
        raise ValueError(f'guidance weight must be a finite number, got {guidance}')
    if sigmas is None:
        sigmas = samplers.karras_sigmas(steps, diffusion.sigma_min, diffusion.sigma_max)
    # One schedule for every batch; a batch of all n when no batch size is given.
    sigmas, batch_size = sigmas.to(device), batch_size or n
    out = []
    try:
        return _generate_batches(out, net, diffusion, n, shape, device, labels, num_classes, sampler, guidance, seed,
                                 progress, aug_dim, options, batch_size, sigmas, cond, guide, callback, decode)
    except KeyboardInterrupt:
        # Ctrl-C: the finished batches travel with the interrupt, so the caller can still write them.
        raise SamplingInterrupted(torch.cat(out) if out else None) from None


class SamplingInterrupted(KeyboardInterrupt):
    """Ctrl-C inside generate(): .samples holds the batches finished before it (in order), or None."""

    def __init__(self, samples):
        super().__init__()
        self.samples = samples


def _generate_batches(out, net, diffusion, n, shape, device, labels, num_classes, sampler, guidance, seed, progress,
                      aug_dim, options, batch_size, sigmas, cond, guide, callback, decode):
    """generate()'s loop; each finished batch is appended to `out` at once (what Ctrl-C keeps)."""
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        # The batch's own generator: its initial noise and, for stochastic samplers, every noise draw inside it.
        g = torch.Generator(device='cpu').manual_seed(seed + start)
        # The network's conditioning for this batch: extra inputs, "no augmentation", and the class.
        batch_cond = {k: v[start:start + b].to(device) for k, v in (cond or {}).items()}
        if aug_dim:
            batch_cond['aug_cond'] = torch.zeros(b, aug_dim, device=device)         # "no augmentation" (EDM App. C.4)
        # Classifier-free guidance needs labels: without them the samples are unconditional (the null class).
        denoiser = diffusion.denoiser(net)
        if num_classes:
            y = labels[start:start + b].to(device) if labels is not None else torch.full((b,), num_classes, device=device)
            if (callable(guidance) or guidance != 1.0) and labels is not None:
                denoiser = ClassifierFreeGuidance(denoiser, w=guidance, null_class=num_classes)   # one batched call
            batch_cond['y'] = y
        if guide is not None:
            denoiser = guide(denoiser)
        # The initial noise is drawn on the CPU from the batch's generator, so the same seed gives the same
        # samples on a CPU and on a GPU (CUDA generators draw other numbers).
        x = sigmas[0] * torch.randn((b,) + tuple(shape), generator=g).to(device)   # x_N = sigma_max n
        # A learned-variance model's ddpm uses its variance (iddpm.py), unless a fixed variance= is asked for.
        solve = iddpm.learned_sampler(diffusion, net, sampler, options) or run_sampler
        x = solve(sampler, denoiser, x, sigmas, options, batch_cond, g, progress, callback)
        # A NaN image clamps to NaN and would be written as black: stop here with the reason instead.
        if not torch.isfinite(x).all():
            raise FloatingPointError(f'sampling produced non-finite values (batch at {start}): the model or the '
                                     f'sampler settings ({sampler}, {len(sigmas) - 1} steps, guidance {guidance}) diverge')
        if decode is not None:                                        # latent models: latents -> images first
            x = decode(x)
        # The clamp to the data range happens once, at the end (clipping inside the sampler is --threshold's job).
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------
# Writing pictures and arrays. Output paths are checked before sampling (check_outputs), files are written
# to a temporary name and renamed (runs.atomic_write), so an interrupted write never leaves half a file under the
# final name.

# Every file sample.py writes goes through here before the first sample is drawn.
def check_outputs(*paths, overwrite=False):
    """runs.check_output_path for each (path, extensions, flag); a problem is the command line's error message.
    An existing file is refused unless overwrite (--overwrite): a grid, a dataset .npz or a run's log.png is
    never replaced by accident."""
    try:
        for path, extensions, flag in paths:
            check_output_path(path, extensions, flag, overwrite=overwrite)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None


def planned_outputs(args, out, config):
    """[(path, extensions, flag)] of every file this call will write: the grid, a video's GIF beside it, --npz,
    and --save-stages' OUT_stageK.png."""
    stem = os.path.splitext(out)[0]
    paths = [(out, ('.png',), '--out')]
    if not args.inverse and config['data'].get('frames'):
        paths.append((stem + '.gif', ('.gif',), "--out's .gif"))
    if args.npz and not args.inverse:
        paths.append((args.npz, ('.npz',), '--npz'))
    if args.save_stages:
        paths += [(f'{stem}_stage{k}.png', ('.png',), '--save-stages') for k in range(len(args.cascade_stages))]
    return paths


def resolve_outputs(args, config):
    """The --out path, with every file the call writes checked (existing ones refused without --overwrite). Without
    --out: samples.png (inverse_METHOD_OP.png) next to the checkpoint, or the first of NAME_1.png, NAME_2.png, ...
    whose files are all free: a default name never replaces an earlier result."""
    if args.out:
        check_outputs(*planned_outputs(args, args.out, config), overwrite=args.overwrite)
        return args.out
    folder = '.' if args.pretrained else os.path.dirname(args.ckpt) or '.'
    name = (f'inverse_{args.inverse}_{args.operator}' if args.inverse else
            f'samples_{args.pretrained}' if args.pretrained else 'samples')
    for k in range(100_000):
        out = os.path.join(folder, f"{name}{f'_{k}' if k else ''}.png")
        planned = [p for p in planned_outputs(args, out, config) if p[2] != '--npz']
        if not any(os.path.exists(path) for path, _, _ in planned):
            break
    if k:
        print(f'{os.path.join(folder, name)}.png exists: writing to {out} (--out names the file)')
    check_outputs(*planned_outputs(args, out, config), overwrite=args.overwrite)
    return out


# Grids are for looking at; numbers for metrics go through save_npz (uint8, exactly what a PNG would hold).
def save_grid(images, path, nrow=None):
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid (videos: (N, C, F, H, W) become rows of frames)."""
    from PIL import Image
    # Videos: one row of frames per sample, frames in time order from left to right.
    if images.ndim == 5:
        nrow = images.shape[2]
        images = images.transpose(1, 2).flatten(0, 1)
    # nrow images per row, ceil(n / nrow) rows, each image framed by 2 white pixels.
    n, c, h, w = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = torch.ones(c, ncol * (h + 2) + 2, nrow * (w + 2) + 2)                # white 2-pixel borders
    for i, img in enumerate(images.float().cpu()):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = img
    arr = data.to_uint8(grid).permute(1, 2, 0).numpy()
    atomic_write(path, lambda tmp: Image.fromarray(arr[:, :, 0] if c == 1 else arr).save(tmp, format='PNG'))


def save_gif(videos, path):
    """(N, C, F, H, W) in [-1, 1] -> an animated GIF with the N videos side by side."""
    from PIL import Image
    # The N videos side by side in each GIF frame, 150 ms per frame, looping.
    strip = torch.cat(list(data.to_uint8(videos.cpu())), dim=-1)               # (C, F, H, N*W)
    pics = [Image.fromarray(f.permute(1, 2, 0).squeeze(-1).numpy()) for f in strip.transpose(0, 1)]
    atomic_write(path, lambda tmp: pics[0].save(tmp, format='GIF', save_all=True, append_images=pics[1:],
                                                duration=150, loop=0))


# evaluate.py reads this format directly (samples + labels), so sampled metrics need no PNG round trip.
def save_npz(images, labels, path):
    """uint8 (N, H, W, C) samples (videos (N, F, H, W, C)) and their labels (empty: unconditional), for evaluate.py."""
    # Channels last, as image files and evaluate.py's readers expect.
    arr = data.to_uint8(images).movedim(1, -1).numpy()
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, samples=arr,
                                                       labels=labels.numpy() if labels is not None else np.zeros(0)))


# ----------------------------------------------------------------------------------------------------
# The command line: flags, their checks (all before loading or sampling), and the two modes.

# Flags: the sampling groups are shared with evaluate.py (add_sampling_flags); the modes add their own groups.
def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Sample a trained diffusion model.', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', default=None, help='checkpoint written by train.py (or --pretrained NAME)')
    p.add_argument('--out', default=None, help='PNG path; default: next to the checkpoint')
    p.add_argument('--npz', default=None, help='also save the samples as uint8 (N, H, W, C) in this .npz')
    p.add_argument('--overwrite', action='store_true', help='replace existing output files (else they are refused)')
    p.add_argument('-n', '--num', type=int, default=64, help='number of samples')
    p.add_argument('--batch', type=int, default=256, help='samples per batch')
    p.add_argument('--class', dest='label', default=None, help="class index or name; default: cycle through all classes ('none': unconditional)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--raw', action='store_true', help='use the raw weights instead of the EMA')
    # Sampler and guidance settings default to those the run used for its grids (stored in the checkpoint's args).
    add_sampling_flags(p)
    p.add_argument('--device', default=None, help='default: cuda if available')
    # --inverse replaces generation by one inverse problem; a new sample.py mode adds its own group and a branch in main.
    g = p.add_argument_group('inverse problems (inverse.py)')
    g.add_argument('--inverse', default=None, help='method: replacement, pocs, ilvr, ccdf, mcg, reconstruction_guidance, dps')
    g.add_argument('--operator', default='sr', help='sr | inpaint_box | inpaint_random')
    g.add_argument('--factor', type=int, default=4, help='super-resolution factor')
    g.add_argument('--noise-std', type=float, default=0.0, help='measurement noise')
    g.add_argument('--image', default=None, help='image file to measure and reconstruct; default: a held-out dataset image')
    g.add_argument('--inverse-opt', action='append', default=[], metavar='KEY=VALUE',
                   help="the method's own options (repeatable): its step size zeta=4 (dps, mcg), w_r=2 "
                        "(reconstruction guidance), step=1 (pocs), sigma_stop=0.5 (ilvr), eta=0.5 (all); the "
                        "schedule flags apply too (--sigma-max 2 starts CCDF's solve at sigma 2)")
    g = p.add_argument_group('public pretrained models (pretrained.py)')
    g.add_argument('--pretrained', default=None, metavar='NAME',
                   help=f"sample a published model instead of --ckpt: {', '.join(pretrained.PRETRAINED)}")
    g.add_argument('--weights-dir', default=None,
                   help=f'folder with its weight files (else ${pretrained.PRETRAINED_ENV}, then the torch hub folder)')
    g.add_argument('--no-download', action='store_true', help='never download: say which files to put where instead')
    # --cascade runs super-resolution stages (train.py --task superres) after the --ckpt base model (cascade.py).
    g = p.add_argument_group('cascade (cascade.py)')
    g.add_argument('--cascade', default=None, metavar='JSON',
                   help='super-resolution stages after --ckpt: a .json file or an inline JSON list, one object per stage: '
                        '{"ckpt": PATH, "sampler": .., "steps": .., "guidance": .., "sampler_opt": {..}, "aug_level": t in [0, 1], '
                        '"truncated": false}; unset keys: that run\'s grid settings, aug_level 0 (see cascade.py)')
    g.add_argument('--save-stages', action='store_true', help='with --cascade: also write every stage\'s output as OUT_stageK.png')
    g = p.add_argument_group('video extension (Ho et al. 2022, arXiv:2204.03458, Sec. 3.1)')
    g.add_argument('--extend', nargs='?', const='data', default=None, metavar='CLIP',
                   help="continue a clip (GIF, folder of frames, or sample.py .npz; no value: a clip of the training "
                        "data): its first --context frames are given, the next ones generated by reconstruction guidance")
    g.add_argument('--context', type=int, default=None, help='given frames the model conditions on (default: half its window)')
    g.add_argument('--new-frames', type=int, default=None, help='frames to generate (default: the rest of one window)')
    g.add_argument('--w-r', type=float, default=2.0, help='reconstruction guidance weight w_r (Ho et al. Eq. 7)')
    g.add_argument('--continuations', type=int, default=4, help='continuations of the clip, each from its own noise')
    return p.parse_args(argv)


# Run first in main: every problem that can be found from the flags alone is reported together, at once.
def check_args(args):
    """Range checks of the flags that do not need the checkpoint: a clear message before anything is loaded."""
    # All problems at once, so a user fixes them in one go; checkpoint-dependent checks come after loading.
    problems = []
    if args.num < 1:
        problems.append(f'-n must be at least 1 (got {args.num})')
    if args.batch < 1:
        problems.append(f'--batch must be at least 1 (got {args.batch})')
    if args.steps is not None and args.steps < 1:
        problems.append(f'--steps must be at least 1 (got {args.steps})')
    if args.guidance is not None and not math.isfinite(args.guidance):
        problems.append(f'--guidance must be a finite number (got {args.guidance})')
    problems += check_sampling_flags(args)
    if args.noise_std < 0 or not math.isfinite(args.noise_std):
        problems.append(f'--noise-std must be a finite number >= 0 (got {args.noise_std})')
    # Inverse-problem flags: a wrong operator or a missing image is known before the model is loaded.
    if args.inverse and args.operator not in ('sr', 'inpaint_box', 'inpaint_random'):
        problems.append(f"--operator must be sr, inpaint_box or inpaint_random (got {args.operator!r})")
    if args.inverse and args.image and not os.path.isfile(args.image):
        problems.append(f'--image {args.image!r} does not exist')
    if args.cascade:
        try:
            args.cascade_stages = parse_cascade(args.cascade)
        except ValueError as e:
            problems.append(str(e))
    problems += check_pretrained_args(args)
    problems += mode_flag_problems(args)
    try:
        torch.device(args.device) if args.device else None
    except RuntimeError:
        problems.append(f'--device {args.device!r} is not a device (cpu, cuda, cuda:1, mps)')
    if problems:
        raise SystemExit('error: ' + '\n       '.join(problems))
    try:
        args.sampler_options = parse_sampler_options(args.sampler_opt)
        for key, value in args.sampler_options.items():          # S_churn=x or eta=-1: before the model loads
            if option_range_problem(key, value):
                raise ValueError(f'--sampler-opt {key} {option_range_problem(key, value)}')
        if args.sampler:
            check_sampler_options(args.sampler, args.sampler_options)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    # An explicit --out / --npz that exists is refused before the model is loaded (resolve_outputs checks them all).
    check_outputs(*[(path, ext, flag) for path, ext, flag in ((args.out, ('.png',), '--out'), (args.npz, ('.npz',), '--npz'))
                    if path and not (flag == '--npz' and args.inverse)], overwrite=args.overwrite)


# Flags each mode reads; any other flag given with it would be ignored without a word, so it is refused by name.
MODE_FLAGS = {'inverse': ('operator', 'factor', 'noise_std', 'image', 'inverse_opt'),
              'extend': ('context', 'new_frames', 'w_r', 'continuations'), 'cascade': ('save_stages',),
              'pretrained': ('weights_dir', 'no_download')}
# Sampling flags a mode does not read (its own solver, schedule or conditioning).
UNUSED = {'inverse': ('sampler', 'sampler_opt', 'eta', 's_churn', 's_tmin', 's_tmax', 's_noise', 'snr', 'n_corrector',
                      'guidance', 'guidance_schedule', 'threshold', 'autoguidance', 'classifier', 'classifier_scale',
                      'reject', 'npz', 'num', 'batch', 'label', 'cascade', 'extend'),
          'extend': ('schedule', 'rho', 'sigma_min', 'sigma_max', 'flow_shift', 'guidance_schedule', 'threshold',
                     'autoguidance', 'classifier', 'classifier_scale', 'reject', 'num', 'batch', 'cascade'),
          'cascade': ('schedule', 'rho', 'sigma_min', 'sigma_max', 'flow_shift', 'guidance_schedule', 'threshold',
                      'autoguidance', 'classifier', 'classifier_scale', 'reject')}


def mode_flag_problems(args):
    """'--X applies to --MODE' for a mode's own flag given without the mode, and '--X does not apply to --MODE' for a
    flag the chosen mode never reads. A flag counts as given when it differs from the parser's default."""
    defaults = vars(parse_args([]))
    given = {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    name = lambda k: {'num': '-n', 'label': '--class'}.get(k, '--' + k.replace('_', '-'))
    mode = next((m for m in ('inverse', 'extend', 'cascade') if m in given), None)
    problems = [f'{name(k)} applies to --{owner}' for owner, flags in MODE_FLAGS.items() if owner not in given
                for k in flags if k in given]
    hint = {('inverse', 'num'): ' (it reconstructs one image)', ('extend', 'num'): ' (--continuations sets how many)'}
    problems += [f'{name(k)} does not apply to --{mode}{hint.get((mode, k), "")}' for k in UNUSED.get(mode, ()) if k in given]
    return problems


# Class names come from the checkpoint (folder names, shape names), so --class circle works without an index.
def resolve_label(label, config, n):
    """--class as an index or a class name -> (n,) labels, or None for unconditional / cycling."""
    # Without --class the samples cycle through the classes (0, 1, ..., C-1, 0, ...), a balanced grid.
    num_classes, names = config['data']['num_classes'], config['data'].get('class_names') or []
    if not num_classes:
        if label not in (None, 'none'):
            raise SystemExit('error: this model was trained without classes; drop --class')
        return None
    if label is None:
        return torch.arange(n) % num_classes
    if label == 'none':
        return torch.full((n,), num_classes)
    if label in names:
        return torch.full((n,), names.index(label))
    if not label.lstrip('-').isdigit() or not 0 <= int(label) < num_classes:
        raise SystemExit(f'error: --class must be 0..{num_classes - 1}, a class name ({", ".join(names) or "none stored"}) or none')
    return torch.full((n,), int(label))


# --image must look to the model like its training data did: same crop, same compositing, same range.
def read_image(path, channels, resolution):
    """An image file -> (1, C, R, R) in [-1, 1], prepared exactly as training prepares folder images (data.load_image:
    transparency composited on white, shorter side resized, centre crop; never a stretch)."""
    try:
        rgb = data.load_image(path, resolution)                                   # uint8 (3, R, R)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    # One-channel models get the luma of the composited RGB, as training on grayscale data would see it.
    if channels == 1:                                   # ITU-R 601-2 luma, as PIL's convert('L')
        rgb = (rgb.double() * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)[:, None, None]).sum(0, keepdim=True).round().to(torch.uint8)
    return data.to_float(rgb)[None]


# One image in, one strip out: the measurement y = A x0 (+ noise), the solver's reconstruction and the
# original, with the PSNR and the measurement residual |A x - y| that shows consistency.
def inverse_options(method, items):
    """--inverse-opt KEY=VALUE -> the method's keyword options, checked against its signature (an unknown one is
    an error naming the method's options, never silently dropped)."""
    import inspect
    import inverse
    try:
        options = parse_sampler_options(items)
    except ValueError as e:
        raise SystemExit(f"error: {str(e).replace('--sampler-opt', '--inverse-opt')}") from None
    params = inspect.signature(inverse.INVERSE_METHODS[method]).parameters
    known = [k for k, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY and k not in ('generator', 'cond', 'callback')]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SystemExit(f"error: --inverse {method} has no option {', '.join(map(repr, unknown))}; its options: "
                         + ', '.join(f'{k}={params[k].default!r}' for k in known))
    return options


def run_inverse(args, net, diffusion, config, device, out):
    """Measure one image, reconstruct it with the chosen method, save measurement | reconstruction | original."""
    import inverse
    c, r = config['data']['channels'], config['data']['resolution']
    # The solvers' operators act on images; videos are extended with --extend instead.
    if config['data'].get('frames'):
        raise SystemExit('error: --inverse works on image models; this checkpoint is a video model')
    if args.inverse not in inverse.INVERSE_METHODS:
        raise SystemExit(f"error: unknown --inverse {args.inverse!r}; choose from {', '.join(inverse.INVERSE_METHODS)}")
    if args.operator == 'sr' and (args.factor < 2 or r % args.factor):
        raise SystemExit(f'error: --factor must be at least 2 and divide the model resolution {r} (got {args.factor})')
    if args.image:
        x0 = read_image(args.image, c, r)
    else:
        ds = data.load_dataset(config['data']['dataset'], data_dir=config['args'].get('data_dir'),
                               split=config['args'].get('split', 'train'), resolution=r)
        x0 = ds[0][0][None]
    x0 = x0.to(device)
    # One generator for the random mask, the measurement noise and the solver: one seed fixes the whole strip.
    g = torch.Generator().manual_seed(args.seed)
    op = inverse.make_operator(args.operator, tuple(x0.shape[1:]), generator=g, noise_std=args.noise_std, factor=args.factor)
    y = op.measure(x0, generator=g)
    # The schedule flags (--schedule, --sigma-max, ...) give the solver's noise levels, 50 by default.
    sigmas = make_sigmas(args.schedule, args.steps or 50, diffusion, args.rho, args.sigma_min, args.sigma_max,
                         args.flow_shift).to(device)
    options = inverse_options(args.inverse, args.inverse_opt)
    # The model's conditioning: unconditional class, no augmentation; passed as the solver's cond dict.
    cond = {}
    if config['data']['num_classes']:
        cond['y'] = torch.full((1,), config['data']['num_classes'], device=device)
    if config['net'].get('aug_dim'):
        cond['aug_cond'] = torch.zeros(1, config['net']['aug_dim'], device=device)
    x = sigmas[0] * torch.randn(x0.shape, generator=g).to(device)
    recon = inverse.INVERSE_METHODS[args.inverse](diffusion.denoiser(net), x, sigmas, op, y, generator=g,
                                                  cond=cond, **options).clamp(-1, 1)
    shown = op.pinv(y).clamp(-1, 1)
    save_grid(torch.cat([shown, recon, x0]).detach(), out, nrow=3)
    psnr = cascade.psnr(recon, x0).mean().item()                  # the project's one PSNR (range 2 of [-1, 1])
    print(f'wrote {out} (measurement | reconstruction | original); PSNR {psnr:.2f} dB, '
          f'|A x - y| = {(op.forward(recon) - y).abs().max().item():.3g}')


def check_pretrained_args(args):
    """--pretrained NAME replaces --ckpt: exactly one of them, a known name, and no checkpoint-only mode."""
    problems = []
    if (args.ckpt is None) == (args.pretrained is None):
        problems.append('give either --ckpt (a train.py checkpoint) or --pretrained NAME '
                        f"({', '.join(pretrained.PRETRAINED)})")
    if args.pretrained is not None and args.pretrained not in pretrained.PRETRAINED:
        problems.append(f"--pretrained must be one of {', '.join(pretrained.PRETRAINED)} (got {args.pretrained!r})")
    # Published models come without EMA/raw pairs, early checkpoints or SR stages of ours.
    checkpoint_only = [flag for flag in ('inverse', 'raw', 'cascade', 'autoguidance') if getattr(args, flag, None)]
    if args.pretrained is not None and checkpoint_only:
        problems.append('--inverse, --raw, --cascade and --autoguidance work on train.py checkpoints (--ckpt) only')
    return problems


# Published weights come through pretrained.py, which finds or downloads them and checks their hashes.
def load_pretrained_model(args, device):
    """(net, diffusion, config, decode) of a published model (pretrained.py: files found, downloaded, or asked
    for by name and folder). It has no training run: the sampling defaults are sampling_setup's (Heun, 18 steps,
    no guidance), and every sampler and guidance flag applies. A latent model (DiT) samples latents, which decode
    turns into images through the autoencoder it was trained with (the SD VAE) before the clamp to [-1, 1]."""
    try:
        net, diffusion, config, autoencoder = pretrained.load_pretrained(args.pretrained, device, args.weights_dir,
                                                                         download=not args.no_download)
    except (FileNotFoundError, ValueError) as e:     # missing files (what to put where) or a different file
        raise SystemExit(f'error: {e}') from None
    # No training flags: every sampling default falls back to sampling_setup's own.
    config['args'] = {}
    decode = None
    if autoencoder is not None:
        def decode(z):
            return autoencoder.decode(z.to(device))
    return net, diffusion, config, decode


# Called once all sampling is done: from here on, losing the samples would waste the whole run.
def write_samples(images, labels, out, npz):
    """The arrays first (they are the data), then the pictures. If a write fails anyway, the samples are kept in
    a file in the temporary folder, so an hour of sampling is not lost to a full disk or a vanished folder."""
    try:
        if npz:
            save_npz(images, labels, npz)
        save_grid(images, out)
        if images.ndim == 5:
            save_gif(images[:8], os.path.splitext(out)[0] + '.gif')
    except (OSError, RuntimeError) as e:            # torch.save at a size limit raises RuntimeError ('unexpected pos')
        # The temporary folder is usually on another file system than the output: the best place left to try.
        # A fresh unique name (mkstemp): a predictable name in a shared folder could be someone else's file.
        fd, rescue = tempfile.mkstemp(prefix='samples_rescued_', suffix='.pt')
        os.close(fd)
        try:
            torch.save({'samples': images, 'labels': labels}, rescue)
            kept = f'the samples are kept in {rescue} (torch.load it)'
        except (OSError, RuntimeError):
            os.remove(rescue)                          # half a file would only keep the disk full
            kept = f'the rescue copy in {tempfile.gettempdir()} failed too (full as well?), so they are lost'
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
        hint = '' if 'disk full' in reason else '; a full disk or a file-size limit?'
        raise SystemExit(f'error: writing the samples failed ({reason}{hint}); {kept}') from None


# ----------------------------------------------------------------------------------------------------
# Cascades (cascade.py): the --ckpt model samples small images, then every --cascade stage (a train.py --task
# superres checkpoint) upsamples the previous output with its own sampler, steps, guidance and augmentation level.

# A stage's settings are a small JSON object; any other key is a typo and is refused by name.
CASCADE_KEYS = ('ckpt', 'sampler', 'steps', 'guidance', 'sampler_opt', 'aug_level', 'truncated')


def parse_cascade(spec):
    """--cascade (a .json file, or the JSON itself) -> list of stage dicts, each checked; ValueError naming the problem."""
    # One flag for both: a file for long cascades, inline JSON for a quick try.
    text = open(spec).read() if spec.endswith('.json') and os.path.isfile(spec) else spec
    try:
        stages = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f'--cascade is neither a .json file nor JSON ({e.msg}); give a list of stages, e.g. '
                         '\'[{"ckpt": "runs/sr/ckpt.pt", "aug_level": 0.1}]\'') from None
    # A single object is a one-stage cascade.
    stages = [stages] if isinstance(stages, dict) else stages
    if not isinstance(stages, list) or not stages or not all(isinstance(st, dict) for st in stages):
        raise ValueError('--cascade must be a non-empty JSON list of objects, one per super-resolution stage')
    for k, st in enumerate(stages, start=1):
        where = f'--cascade stage {k}'
        unknown = sorted(set(st) - set(CASCADE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(CASCADE_KEYS)}")
        if not isinstance(st.get('ckpt'), str) or not os.path.isfile(st['ckpt']):
            raise ValueError(f"{where}: 'ckpt' must name an existing train.py --task superres checkpoint (got {st.get('ckpt')!r})")
        t = st.get('aug_level', 0.0)
        if not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise ValueError(f'{where}: aug_level is a diffusion time in [0, 1] (0 = no augmentation), got {t!r}')
        if st.get('truncated') and not 0 < t < 1:
            raise ValueError(f'{where}: truncated stops the previous stage at aug_level, which must then be in (0, 1), got {t!r}')
        if 'steps' in st and (not isinstance(st['steps'], int) or st['steps'] < 1):
            raise ValueError(f"{where}: steps must be an integer >= 1, got {st['steps']!r}")
        if 'guidance' in st and (not isinstance(st['guidance'], (int, float)) or not math.isfinite(st['guidance'])):
            raise ValueError(f"{where}: guidance must be a finite number, got {st['guidance']!r}")
        if 'sampler' in st:
            check_sampler_options(st['sampler'], st.get('sampler_opt'))
    return stages


def cascade_stage(net, diffusion, config, settings, n, labels, device):
    """A cascade.Stage for n samples of a loaded model: its denoiser (classifier-free guided when labels are given and
    guidance != 1), Karras sigmas of its own range, its solver options and its noise-augmentation level."""
    # Each stage is its own model: its own denoiser, noise range, sampler options and conditioning.
    options = check_sampler_options(settings['sampler'], settings.get('sampler_opt'))
    num_classes, sr = config['data']['num_classes'], config.get('superres')
    denoiser, cond = diffusion.denoiser(net), {}
    if num_classes:
        cond['y'] = labels.to(device) if labels is not None else torch.full((n,), num_classes, device=device)
        if settings['guidance'] != 1.0 and labels is not None:
            denoiser = ClassifierFreeGuidance(denoiser, w=settings['guidance'], null_class=num_classes)
    if not sr and config['net'].get('aug_dim'):
        cond['aug_cond'] = torch.zeros(n, config['net']['aug_dim'], device=device)   # EDM labels: "no augmentation"
    sigmas = samplers.karras_sigmas(settings['steps'], diffusion.sigma_min, diffusion.sigma_max)
    return cascade.Stage(denoiser, sample_shape(config), samplers.SAMPLERS[settings['sampler']], sigmas, options,
                         samplers.is_stochastic(settings['sampler'], options), settings.get('aug_level', 0.0),
                         sr['aug_dim'] if sr else 0, settings.get('truncated', False),
                         sr['upsample'] if sr else 'bicubic', cond)


def load_cascade(args, net, diffusion, config, device):
    """[(net, diffusion, config, settings)] of the base model and every --cascade stage, checked to fit together."""
    if config.get('task') == 'superres':
        raise SystemExit(f'error: {args.ckpt} is a super-resolution stage (train.py --task superres): it upsamples a '
                         'low-res image. Sample a base model with --ckpt BASE and give this checkpoint in --cascade.')
    if config.get('autoencoder') or config['data'].get('frames'):
        raise SystemExit('error: --cascade needs a pixel-space image model as the base (not latents, not video)')
    trained = config.get('args', {})                             # a --pretrained base has no training flags
    base = {'sampler': args.sampler or trained.get('sampler', 'heun'), 'steps': args.steps or trained.get('sample_steps', 18),
            'guidance': args.guidance if args.guidance is not None else trained.get('guidance', 1.0),
            'sampler_opt': None}
    try:                                                      # --sampler-opt and --eta, --s-churn, ... for the base
        base['sampler_opt'] = sampler_options_from_args(args, base['sampler'])
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    # Every stage must take the previous stage's output: same channels, its resolution as the low-res input.
    models = [(net, diffusion, config, base)]
    for k, spec in enumerate(args.cascade_stages, start=1):
        m_net, m_diffusion, m_config = load_model(spec['ckpt'], device, use_ema=not args.raw)
        sr, prev = m_config.get('superres'), models[-1][2]['data']
        if m_config.get('task') != 'superres':
            raise SystemExit(f"error: --cascade stage {k} ({spec['ckpt']}) is not a super-resolution stage (train.py --task superres)")
        if sr['low_res'] != prev['resolution'] or m_config['data']['channels'] != prev['channels']:
            raise SystemExit(f"error: --cascade stage {k} upsamples {m_config['data']['channels']}x{sr['low_res']}px images, "
                             f"but the stage before it makes {prev['channels']}x{prev['resolution']}px ones")
        if spec.get('aug_level', 0) > 0 and not sr['aug_dim']:
            raise SystemExit(f'error: --cascade stage {k} was trained without noise conditioning augmentation '
                             '(--noise-aug-max 0), so its aug_level must be 0')
        n_classes = m_config['data']['num_classes']
        if n_classes and config['data']['num_classes'] and n_classes != config['data']['num_classes']:
            raise SystemExit(f"error: --cascade stage {k} has {n_classes} classes, the base model {config['data']['num_classes']}")
        ran = m_config['args']
        # The stage's own training defaults, overridden by what its --cascade entry says.
        settings = {'sampler': ran.get('sampler', 'heun'), 'steps': ran.get('sample_steps', 18),
                    'guidance': ran.get('guidance', 1.0), **spec}
        models.append((m_net, m_diffusion, m_config, settings))
    return models


@torch.no_grad()
def run_cascade(args, net, diffusion, config, device, out):
    """Sample the whole cascade in batches (batch at index k: seed + k, as generate) and write the final images."""
    models = load_cascade(args, net, diffusion, config, device)     # an SR checkpoint alone: stops with its message
    labels = resolve_label(args.label, config, args.num)
    # Batches seeded seed + start as in generate, so a cascade sample is reproducible from (seed, batch size, index).
    outputs = [[] for _ in models]
    try:
        # Stages are rebuilt per batch: their conditioning tensors (labels, aug_cond) have the batch's size.
        for start in range(0, args.num, args.batch):
            n = min(args.batch, args.num - start)
            y = labels[start:start + n] if labels is not None else None
            stages = [cascade_stage(m, d, c, s, n, y if c['data']['num_classes'] else None, device) for m, d, c, s in models]
            batch = [x.cpu() for x in cascade.run_cascade(stages, n, seed=args.seed + start, device=device, progress=True)]
            for k, x in enumerate(batch):                 # a batch counts once every stage has finished it
                outputs[k].append(x)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    except KeyboardInterrupt:                             # Ctrl-C: the finished batches' final images are written
        done = torch.cat(outputs[-1]).clamp(-1, 1) if outputs[-1] else None
        keep_interrupted(done, labels, out, args.npz, args.num)
    # Every stage's output is kept: --save-stages writes the intermediate resolutions too.
    images = [torch.cat(o) for o in outputs]
    if not torch.isfinite(images[-1]).all():
        raise SystemExit('error: the cascade produced non-finite values: a stage or its sampler settings diverge')
    write_samples(images[-1].clamp(-1, 1), labels, out, args.npz)
    if args.save_stages:
        for k, x in enumerate(images[:-1]):
            save_grid(x.clamp(-1, 1), f'{os.path.splitext(out)[0]}_stage{k}.png')
    print(f'wrote {out}: {args.num} samples; ' + ' -> '.join(
        f"{c['data']['resolution']}px ({s['sampler']}, {s['steps']} steps, guidance {s['guidance']}"
        + (f", aug_level {s.get('aug_level', 0)}{' truncated' if s.get('truncated') else ''}" if k else '') + ')'
        for k, (_, _, c, s) in enumerate(models)))


# ----------------------------------------------------------------------------------------------------
# Extending a video (Ho et al. 2022, Sec. 3.1): video.extend_video, the paper's algorithm, on a clip read here.

def read_clip(source, config):
    """--extend's clip -> (1, C, F, R, R) in [-1, 1]: a clip of the training data, a sample.py .npz (its first video),
    or a GIF / folder of frames (data.load_clip), in the model's channels and resolution."""
    d, args = config['data'], config['args']
    # The default is a clip of the run's own training data, read as training read it.
    if source == 'data':
        ds = data.load_dataset(d['dataset'], data_dir=args.get('data_dir'), split=args.get('split', 'train'),
                               resolution=d['resolution'])
        return ds[0][0][None]
    if source.endswith('.npz'):
        with np.load(source, allow_pickle=False) as z:
            video = torch.from_numpy(z['samples'][:1]).movedim(-1, 1)       # (1, F, H, W, C) -> (1, C, F, H, W)
    else:
        try:
            video = data.load_clip(source, args.get('context') or 1, d['resolution'])[None]
        except (ValueError, FileNotFoundError) as e:
            # data.py's advice is train.py's (--frames); here the number of given frames is --context.
            raise SystemExit(f"error: {str(e).replace('lower --frames or remove the clip', 'give a clip with more frames or a lower --context')}") from None
    # Channel count follows the model: grey averages RGB, RGB repeats grey.
    if video.shape[1] != d['channels']:                                     # RGB <-> grey to match the model
        video = video.float().mean(1, keepdim=True).round().byte() if d['channels'] == 1 else video.expand(-1, 3, -1, -1, -1)
    return data.to_float(video)


def run_extend(args, net, diffusion, config, device, out):
    """--extend: continue one clip --continuations times; writes the frames (given | generated) as a grid and a GIF."""
    d = config['data']
    if not d.get('frames'):
        raise SystemExit('error: --extend continues videos; this checkpoint is an image model')
    # The model samples windows of its training length; each round keeps `context` frames and adds the rest.
    window = d['frames']
    context = args.context or window // 2
    num_new = args.new_frames or window - context
    if not 0 < context < window or num_new < 1 or args.continuations < 1 or not math.isfinite(args.w_r):
        raise SystemExit(f'error: --context must be in [1, {window - 1}], --new-frames and --continuations at least 1, '
                         f'--w-r finite (got {context}, {num_new}, {args.continuations}, {args.w_r})')
    given = read_clip(args.extend, dict(config, args=dict(config['args'], context=context)))
    if given.shape[2] < context:
        raise SystemExit(f'error: the clip has {given.shape[2]} frames; --context {context} needs at least that many')
    # The same given frames for every continuation: the spread between them shows the model's uncertainty.
    given = given[:, :, :context].expand(args.continuations, -1, -1, -1, -1).to(device)
    cond, denoiser = {}, diffusion.denoiser(net)
    labels = resolve_label(args.label, config, args.continuations) if args.label is not None else None
    if d['num_classes']:
        cond['y'] = (labels if labels is not None else torch.full((args.continuations,), d['num_classes'])).to(device)
        if labels is not None and args.guidance not in (None, 1.0):
            denoiser = ClassifierFreeGuidance(denoiser, w=args.guidance, null_class=d['num_classes'])
    if config['net'].get('aug_dim'):
        cond['aug_cond'] = torch.zeros(args.continuations, config['net']['aug_dim'], device=device)
    # Reconstruction guidance needs a sampler that re-noises (Ho et al. 2022 use ancestral sampling): the default.
    sampler = args.sampler or 'euler_ancestral'
    sigmas = samplers.karras_sigmas(args.steps or 50, diffusion.sigma_min, diffusion.sigma_max).to(device)
    # The inverse method runs an ordinary sampler inside; its options (--sampler-opt, --eta, ...) pass through.
    try:
        sampler_options = sampler_options_from_args(args, sampler)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    options = dict(w_r=args.w_r, sampler=sampler, sampler_options=sampler_options)
    g = torch.Generator().manual_seed(args.seed)
    try:
        video = extend_video(denoiser, given, window, num_new, sigmas, context, method_options=options, generator=g,
                             cond=cond).clamp(-1, 1).cpu()
    except (ValueError, TypeError) as e:
        raise SystemExit(f'error: {e}') from None
    # The videos as write_samples writes them: --npz (readable by --extend again), the grid, the GIF.
    write_samples(video, labels, out, args.npz)
    print(f"wrote {out} and its .gif{f' and {args.npz}' if args.npz else ''}: {args.continuations} continuations, "
          f'each {context} given frames then {num_new} generated ({sampler}, {len(sigmas) - 1} steps, reconstruction guidance w_r={args.w_r})')
    return video


# main reads as the steps of a sampling session: check, locate outputs, load, pick a mode, sample, write.
def main(args):
    check_args(args)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'error: --device {args.device} but this machine has no CUDA GPU; use --device cpu')
    # The model: a published one (pretrained.py) or a train.py checkpoint; latent models come with their decoder.
    if args.pretrained:
        net, diffusion, config, decode = load_pretrained_model(args, device)
    else:
        net, diffusion, config = load_model(args.ckpt, device, use_ema=not args.raw)
        decode = latent_decoder(config, device)
    # Every file this call writes (a video's GIF, --save-stages' files too), checked before any sampling.
    out = resolve_outputs(args, config)
    check_memory(args, config)
    if args.inverse and config.get('autoencoder'):
        raise SystemExit('error: --inverse needs a pixel-space model: its operators act on pixels, and this model '
                         'samples latents of an autoencoder (a solver through the decoder is not implemented)')
    # The other modes, each one function: inverse problems, video extension, cascades. Plain generation follows.
    if args.inverse:
        return run_inverse(args, net, diffusion, config, device, out)
    if args.extend is not None:
        return run_extend(args, net, diffusion, config, device, out)
    if args.cascade or config.get('task') == 'superres':
        return run_cascade(args, net, diffusion, config, device, out)
    # Sampler, schedule and guidance: the command line's, else those the run used for its own grids.
    try:
        setup = sampling_setup(args, config, diffusion, device)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    # Classifier guidance can make an unconditional model class-conditional: the classes are the classifier's.
    classes = config['data']['num_classes'] or setup['classifier_classes'] or 0
    labels = resolve_label(args.label, {'data': dict(config['data'], num_classes=classes)}, args.num)
    extra = {'y': labels} if labels is not None and not config['data']['num_classes'] else None
    # --class none draws unconditional samples: classifier-free guidance has no class to guide toward.
    if args.label == 'none' and setup['weight'] != 1 and not args.autoguidance:
        if args.guidance not in (None, 1.0):
            raise SystemExit(f'error: --guidance {args.guidance:g} applies to class-conditional samples; --class none '
                             'draws unconditional ones (no class to guide toward)')
        setup = dict(setup, guidance=1.0, weight=1.0)              # the run's grid weight: not applied, not printed

    # One closure for plain sampling and for rejection sampling's repeated rounds (each with its own seed).
    def make(seed):
        return generate(net, diffusion, args.num, sample_shape(config), device, labels, config['data']['num_classes'],
                        setup['sampler'], setup['steps'], setup['guidance'], seed=seed, progress=True,
                        aug_dim=config['net'].get('aug_dim', 0), sampler_options=setup['sampler_options'],
                        batch_size=args.batch, sigmas=setup['sigmas'], cond=extra, guide=setup['guide'],
                        decode=decode)
    try:
        if args.reject is None:
            images = make(args.seed)
        else:
            images, labels, rate = reject_samples(args, make, labels, setup['clean_log_prob'])
    except (ValueError, FloatingPointError, RuntimeError) as e:
        raise SystemExit(f'error: {e}') from None
    except SamplingInterrupted as e:                # Ctrl-C: the finished batches are written, then one line
        keep_interrupted(e.samples if args.reject is None else None, labels, out, args.npz, args.num)
    # Written only now, once every sample exists; the paths were checked at the start.
    write_samples(images, labels, out, args.npz)
    print(f"wrote {out}: {args.num} samples, {describe_sampling(args, setup)}"
          + (f', class {args.label}' if args.label is not None else '')
          + (f'; rejection sampling accepted {rate:.1%} of the samples drawn' if args.reject is not None else ''))


def check_memory(args, config):
    """-n samples are held in memory (float32) until written: more than the machine has is refused naming -n."""
    n = args.continuations if args.extend is not None else 1 if args.inverse else args.num
    need = n * math.prod(sample_shape(config)) * 4 * (2 if config.get('autoencoder') else 1)
    try:
        have = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):              # not every system reports its memory
        return
    if need > have:
        raise SystemExit(f"error: {n} samples of {'x'.join(map(str, sample_shape(config)))} need {need / 1e9:.1f} GB "
                         f'in memory, more than this machine has ({have / 1e9:.1f} GB); lower -n and sample the rest '
                         'in another call with another --seed')


def keep_interrupted(samples, labels, out, npz, n):
    """After Ctrl-C: write the finished samples (the first len(samples) of n) to the requested files, then exit with
    one line saying how many were kept."""
    if samples is None or not len(samples):
        raise SystemExit('interrupted (Ctrl-C) before a batch was finished: nothing written')
    k = len(samples)
    write_samples(samples, labels[:k] if labels is not None else None, out, npz)
    raise SystemExit(f"interrupted (Ctrl-C): wrote the {k} finished samples of {n} to {out}{f' and {npz}' if npz else ''}")


def reject_samples(args, make, labels, clean_log_prob):
    """Rejection sampling (guidance.sample_with_rejection): rounds of args.num samples, each round from its own
    seeds (seed + round * num), until args.num are accepted by the classifier. Returns (images, labels, rate)."""
    if labels is None:
        raise ValueError('--reject keeps samples of the requested class; this model and classifier have no classes')
    # Round r uses seeds seed + r * num: rounds never repeat noise, and the whole run is reproducible.
    rounds = iter(range(1_000_000))
    top = None if args.reject == -1 else args.reject
    x, y, rate = sample_with_rejection(lambda: (make(args.seed + next(rounds) * args.num), labels), clean_log_prob,
                                       args.num, top_fraction=top)
    return x, y, rate

if __name__ == '__main__':
    import sys
    import sample_discrete                 # a train_discrete.py checkpoint: sampled by its own program (discrete.py)
    import sample_text                     # --prompt, or a train_text.py checkpoint: text-to-image (sample_text.py)
    try:
        if sample_discrete.is_discrete_argv(sys.argv[1:]):
            sample_discrete.main(sample_discrete.parse_args(sys.argv[1:]))
        elif sample_text.is_text_argv(sys.argv[1:]):
            sample_text.main(sample_text.parse_args(sys.argv[1:]))
        else:
            main(parse_args())
    except KeyboardInterrupt:                    # Ctrl-C outside the sampling loop (loading, writing): one line
        raise SystemExit('interrupted (Ctrl-C): no samples were written') from None
