"""
Fit the sampling schedule of a solver to YOUR trained model: `python fit_schedule.py --ckpt CKPT --nfe 10 --out F.json`.

At 5-10 network evaluations (NFE) where the noise levels lie matters as much as the solver. This command fits them
to the checkpoint's own probability-flow ODE (schedule_search.fit_schedule: a few dozen of the model's own noise
draws, the target a converged reference solution of the same ODE, Powell on the log-sigma increments; in the
spirit of Align Your Steps, Sabour et al. 2024, arXiv:2404.14507, see schedule_search.py for how it differs) and
writes a small JSON file: the sigmas, the solver, the number of levels and NFE, the sigma range, the guidance weight
and the checkpoint's sha256. sample.py and evaluate.py then sample with it, with this solver or any other:

    python fit_schedule.py --ckpt runs/mnist/ckpt.pt --sampler eps_abm --nfe 10 --out runs/mnist/fitted_10.json
    python sample.py --ckpt runs/mnist/ckpt.pt --schedule fitted --schedule-file runs/mnist/fitted_10.json

A file fitted for another checkpoint (other weights: resumed, retrained) or another number of steps is refused
before anything is sampled. A class-conditional model is fitted on noise draws cycling through its classes, with the
guidance weight it will be sampled with (--guidance; default: the run's), since guidance changes the ODE.
"""
import argparse
import json
import math
import time

import torch

import samplers
from checkpoints import load_model, sample_shape, sha256_of
from guidance import ClassifierFreeGuidance
from runs import atomic_write, check_output_path
from schedule_search import fit_schedule


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True, help='checkpoint written by train.py (a diffusion model)')
    p.add_argument('--out', required=True, help='the JSON file to write (sample.py --schedule-file)')
    p.add_argument('--sampler', default='eps_abm', help='the deterministic solver to fit for (samplers.py)')
    p.add_argument('--nfe', type=int, default=10, help='network evaluations per sample; the number of noise levels '
                   'is samplers.steps_for_nfe(sampler, nfe) (= NFE for the multistep solvers)')
    p.add_argument('--guidance', type=float, default=None, help="classifier-free guidance weight of the ODE (default: "
                   "the run's; 1 = none)")
    p.add_argument('--paths', type=int, default=48, help='noise draws fitted on (on the shapes run at guidance 2, '
                   '10 NFE: held-out error 0.79x that of 24 draws, for 2x the CPU, about 5 CPU minutes in all)')
    p.add_argument('--seed', type=int, default=0, help='seed of those noise draws')
    p.add_argument('--max-evals', type=int, default=100, help='sampler runs the optimiser may spend')
    p.add_argument('--ref-steps', type=int, default=128, help='reference solution: Heun with this many levels and '
                   'DEIS tAB3 with twice as many')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --out')
    p.add_argument('--device', default='cpu')
    return p.parse_args(argv)


def check_args(args):
    """Every problem the flags alone show, before the model is loaded."""
    problems = []
    if args.sampler not in samplers.SAMPLERS:
        problems.append(f"--sampler {args.sampler!r} is not a solver; choose from {', '.join(samplers.SAMPLERS)}")
    elif samplers.is_stochastic(args.sampler):
        problems.append(f'--sampler {args.sampler} draws fresh noise; a schedule is fitted for a deterministic solver')
    elif samplers.steps_for_nfe(args.sampler, args.nfe) < 3:
        problems.append(f'--nfe {args.nfe} gives {args.sampler} fewer than 3 noise levels (2 are fixed ends)')
    for flag, value, low in (('--paths', args.paths, 2), ('--max-evals', args.max_evals, 1), ('--ref-steps', args.ref_steps, 8)):
        if value < low:
            problems.append(f'{flag} must be at least {low} (got {value})')
    if args.guidance is not None and not math.isfinite(args.guidance):
        problems.append(f'--guidance must be a finite number (got {args.guidance})')
    try:
        check_output_path(args.out, ('.json',), '--out', overwrite=args.overwrite)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise SystemExit('error: ' + '\n       '.join(problems))


def model_ode(ckpt, guidance, n_paths, device='cpu'):
    """(denoiser, cond, w, diffusion, config): the probability-flow ODE that sample.generate integrates for n_paths
    samples of this checkpoint: its classes cycled (0, 1, ..., as sample.py's grid), classifier-free guidance with
    weight w (None: the run's own; 1 for an unconditional model), no augmentation conditioning."""
    net, diffusion, config = load_model(ckpt, device)
    if config['data'].get('frames') or config.get('task', 'diffusion') != 'diffusion' or config.get('superres'):
        raise SystemExit('error: a schedule is fitted for an image diffusion model (not a video, SR stage or classifier)')
    denoiser, cond, classes = diffusion.denoiser(net), {}, config['data']['num_classes']
    w = guidance if guidance is not None else config.get('args', {}).get('guidance', 1.0)
    if classes:
        cond['y'] = (torch.arange(n_paths) % classes).to(device)
        if w != 1:
            denoiser = ClassifierFreeGuidance(denoiser, w=w, null_class=classes)
    else:
        w = 1.0
    if config['net'].get('aug_dim'):
        cond['aug_cond'] = torch.zeros(n_paths, config['net']['aug_dim'], device=device)
    return denoiser, cond, w, diffusion, config


def main(args):
    check_args(args)
    denoiser, cond, w, diffusion, config = model_ode(args.ckpt, args.guidance, args.paths, args.device)
    n = samplers.steps_for_nfe(args.sampler, args.nfe)
    print(f'fitting {n} noise levels of {args.sampler} ({args.nfe} NFE) to {args.ckpt}, guidance {w:g}, '
          f'{args.paths} noise draws (seed {args.seed}), sigma {diffusion.sigma_max:g} -> {diffusion.sigma_min:g}')
    t0 = time.time()
    sigmas, info = fit_schedule(denoiser, sample_shape(config), n, args.sampler, cond=cond or None,
                                sigma_min=diffusion.sigma_min, sigma_max=diffusion.sigma_max, seed=args.seed,
                                n_paths=args.paths, max_evals=args.max_evals, ref_steps=args.ref_steps,
                                device=args.device, progress=True, return_info=True)
    record = dict(checkpoint=args.ckpt, checkpoint_sha256=sha256_of(args.ckpt), sampler=args.sampler, sampler_options={},
                  steps=n, nfe=args.nfe, sigma_min=diffusion.sigma_min, sigma_max=diffusion.sigma_max, guidance=w,
                  sigmas=[float(s) for s in sigmas], paths=args.paths, seed=args.seed, fit=info)
    text = json.dumps(record, indent=1)

    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(args.out, write)
    print(f"RMS distance to the reference ODE solution on the {args.paths} fitted draws: Karras {info['karras_error']:.4g}"
          f" -> fitted {info['fitted_error']:.4g} (reference floor {info['floor']:.2g}); {info['sampler_runs']} sampler "
          f"runs, {info['cpu_seconds']:.0f} CPU s, {time.time() - t0:.0f} s wall\nsigmas: "
          + ' '.join(f'{s:.4g}' for s in record['sigmas']) + f'\nwrote {args.out}')


if __name__ == '__main__':
    main(parse_args())
