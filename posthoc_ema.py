"""
Post-hoc EMA: choose the EMA length after training (Karras et al. 2024, EDM2, arXiv:2312.02696, Sec. 3 and App. C).

A power-function EMA averages the training trajectory theta(tau) with weights proportional to tau^gamma up to now,

    theta_hat_gamma(t) = (gamma + 1) / t^(gamma + 1) * integral_0^t tau^gamma theta(tau) dtau,

tracked step by step with beta_t = (1 - 1/t)^(gamma + 1)  (App. C, Eq. 127; t = optimizer updates so far, so the
first update copies the weights). Its width relative to the training length is constant:

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))                   (Eq. 123)
    gamma     = the largest real root of g^3 + 7 g^2 + (16 - sigma_rel^-2) g + (12 - sigma_rel^-2)   (Eq. 126, Alg. 2)

Training keeps two such averages (sigma_rel 0.05 and 0.10) and saves them every N steps ("snapshots"). Afterwards
any other profile p_out (any sigma_rel, at any snapshot time) is approximated by a weighted sum of the snapshots'
profiles p_i, the weights x solving the least-squares problem min || p_out - sum_i x_i p_i ||_2 over tau:

    A x = b,   A_ij = <p_i, p_j>,  b_i = <p_i, p_out>,
    <p_a, p_b> = (g_a + 1)(g_b + 1) / (g_a + g_b + 1) * (t_a / t_b)^g_b / t_b     for t_a <= t_b   (Eq. 151, Alg. 3)

(normalised to sum to 1, as EDM2's reconstruct_phema.py does), and because the EMA is linear in the weights the same
x applied to the snapshot weights gives the reconstructed average: theta_out = sum_i x_i theta_hat_i.

    python train.py --model edm2-cpu --recipe edm2 --out runs/e2       # also writes runs/e2/posthoc/snapshot-*.pt
    python posthoc_ema.py runs/e2 --sigma-rels 0.03,0.05,0.08,0.12,0.18 \\
        --eval-args "REF.npz --network lenet --lenet-weights W.pt --num-gen 1000" --plot sweep.png --out runs/e2/phema.pt
    python sample.py --ckpt runs/e2/phema.pt                           # the chosen reconstruction samples as usual
"""
import argparse
import glob
import json
import os
import re
import shlex
import sys
import tempfile

import numpy as np
import torch

import checkpoints
import runs

SNAPSHOT_DIR = 'posthoc'                     # inside the run folder
SNAPSHOT_NAME = re.compile(r'snapshot-(\d{7})\.pt')


# ----------------------------------------------------------------------------------------------------
# The power-function profile (App. C.1 - C.3).

def sigma_rel_of_gamma(gamma):
    """Relative standard deviation of the power-function profile tau^gamma on [0, t], divided by t (Eq. 123)."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of_sigma_rel(sigma_rel):
    """The exponent gamma whose profile has this relative width: Eq. 123 solved for gamma (Eq. 126, Alg. 2)."""
    if not 0 < sigma_rel < sigma_rel_of_gamma(0):                  # gamma = 0 (a plain mean) is the widest: 0.2887
        raise ValueError(f'sigma_rel must be in (0, {sigma_rel_of_gamma(0):.4f}) (gamma >= 0); got {sigma_rel}')
    s = np.float64(sigma_rel) ** -2
    return float(np.roots([1, 7, 16 - s, 12 - s]).real.max())


def ema_beta(t, gamma):
    """The decay of update t (t = 1, 2, ...) that tracks the power-function EMA exactly: (1 - 1/t)^(gamma + 1)
    (Eq. 127). Unrolled, update tau gets the weight (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1): the profile's
    integral over (tau - 1, tau]."""
    return (1 - 1 / t) ** (gamma + 1)


def profile_inner_product(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> = integral of the two normalised profiles p(tau) = (g + 1) tau^g / t^(g + 1) on [0, t] (Eq. 151):
    the integral runs to min(t_a, t_b), giving (g_a+1)(g_b+1)/(g_a+g_b+1) * (t_min/t_max)^(g of t_max) / t_max."""
    t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    ratio_exp = np.where(t_a < t_b, g_b, -g_a)                     # (t_a/t_b)^g_b, or (t_b/t_a)^g_a = (t_a/t_b)^-g_a
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** ratio_exp / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(times, gammas, t_out, gamma_out):
    """Least-squares weights x (len(times),) with sum_i x_i p_(t_i, gamma_i) ~ p_(t_out, gamma_out) (Alg. 3)."""
    times, gammas = np.float64(times), np.float64(gammas)
    A = profile_inner_product(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    b = profile_inner_product(times, gammas, np.float64(t_out), np.float64(gamma_out))
    x = np.linalg.lstsq(A, b, rcond=None)[0]                        # A can be near-singular with many snapshots
    return x / x.sum()                                              # an average: the weights sum to 1


# ----------------------------------------------------------------------------------------------------
# During training: the two averages, saved as snapshots.

class PowerFunctionEMA:
    """Power-function EMAs of a network's state for several sigma_rel, with their update count t (a state owner of
    runs.Trainee: state_dict / load_state_dict make resume exact)."""

    def __init__(self, net, sigma_rels=(0.05, 0.10)):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [gamma_of_sigma_rel(s) for s in self.sigma_rels]
        self.t = 0                                                  # updates absorbed
        self.emas = [{k: v.detach().clone() for k, v in net.state_dict().items()} for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net):
        """Absorb the network's current weights: update t + 1 with beta_t of each gamma (Eq. 127)."""
        self.t += 1
        state = net.state_dict()
        for gamma, ema in zip(self.gammas, self.emas):
            beta = ema_beta(self.t, gamma)
            for k, v in state.items():
                if v.is_floating_point():
                    ema[k].lerp_(v, 1 - beta)
                else:
                    ema[k].copy_(v)

    def state_dict(self):
        return {'sigma_rels': list(self.sigma_rels), 't': self.t, 'emas': self.emas}

    def load_state_dict(self, state):
        if [float(s) for s in state['sigma_rels']] != self.sigma_rels:
            raise SystemExit(f"error: the checkpoint's post-hoc EMA tracks sigma_rel {state['sigma_rels']}, this run "
                             f'{self.sigma_rels}; resume with the same --ema-snapshots')
        self.t = int(state['t'])
        self.emas = [{k: v.clone() for k, v in ema.items()} for ema in state['emas']]


def snapshot_path(out, step):
    return os.path.join(out, SNAPSHOT_DIR, f'snapshot-{step:07d}.pt')


def write_snapshot(tracker, out, step, config):
    """OUT/posthoc/snapshot-STEP.pt: the averages at this step, written atomically and never over an existing file."""
    path = snapshot_path(out, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        raise SystemExit(f'error: {path} exists; post-hoc EMA snapshots are never overwritten')
    state = dict(tracker.state_dict(), step=step, config=config)
    runs.atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def set_aside_snapshots(out, after_step=-1):
    """Move snapshots of a previous run (or, on resume, those past the resumed step: the interrupted run's future)
    into OUT/posthoc/previous_XXXX, deleting nothing, so a new snapshot never meets an old file."""
    folder = os.path.join(out, SNAPSHOT_DIR)
    names = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if SNAPSHOT_NAME.fullmatch(n) and int(SNAPSHOT_NAME.fullmatch(n).group(1)) > after_step)
    if not names:
        return None
    aside = tempfile.mkdtemp(prefix='previous_', dir=folder)
    for name in names:
        os.replace(os.path.join(folder, name), os.path.join(aside, name))
    print(f'{len(names)} post-hoc EMA snapshot(s) of a previous run moved to {aside}')
    return aside


# ----------------------------------------------------------------------------------------------------
# After training: reconstruction.

def list_snapshots(run_dir):
    paths = sorted(glob.glob(os.path.join(run_dir, SNAPSHOT_DIR, 'snapshot-*.pt')))
    paths = [p for p in paths if SNAPSHOT_NAME.fullmatch(os.path.basename(p))]
    if not paths:
        raise SystemExit(f'error: no post-hoc EMA snapshots in {os.path.join(run_dir, SNAPSHOT_DIR)} (train with '
                         '--recipe edm2, or --ema-snapshots, and a --snapshot-every that fires)')
    return paths


def reconstruct(snapshots, sigma_rels, t_out=None):
    """{sigma_rel: state_dict} reconstructed at update t_out (default: the last snapshot's) from snapshot dicts
    (or paths, read one at a time) as write_snapshot saves them; also returns the solved weights."""
    load = lambda s: torch.load(s, map_location='cpu', weights_only=True) if isinstance(s, str) else s
    meta = []                                                       # (snapshot, ema index, t, gamma) per profile
    for i, s in enumerate(snapshots):
        d = load(s)
        meta += [(i, j, d['t'], gamma_of_sigma_rel(r)) for j, r in enumerate(d['sigma_rels'])]
    t_out = t_out or max(m[2] for m in meta)
    times, gammas = [m[2] for m in meta], [m[3] for m in meta]
    weights = {r: solve_coefficients(times, gammas, t_out, gamma_of_sigma_rel(r)) for r in sigma_rels}
    out = {r: None for r in sigma_rels}
    for i, s in enumerate(snapshots):                              # one pass over the files, all outputs at once
        d = load(s)
        for k, (si, j, _, _) in enumerate(meta):
            if si != i:
                continue
            for r in sigma_rels:
                w = float(weights[r][k])
                if out[r] is None:
                    out[r] = {n: (v.double() * w if v.is_floating_point() else v.clone()) for n, v in d['emas'][j].items()}
                else:
                    for n, v in d['emas'][j].items():
                        if v.is_floating_point():
                            out[r][n] += v.double() * w
    dtypes = {n: v.dtype for n, v in load(snapshots[-1])['emas'][0].items()}
    return {r: {n: v.to(dtypes[n]) for n, v in sd.items()} for r, sd in out.items()}, weights


def phema_checkpoint(run_dir, state, sigma_rel, snapshots):
    """A sampling checkpoint: the run's ckpt.pt config and raw weights, 'ema' = the reconstruction (not resumable:
    no optimizer state)."""
    ckpt = checkpoints.load_checkpoint(os.path.join(run_dir, 'ckpt.pt'), expect='diffusion')
    return {'config': ckpt['config'], 'model': ckpt['model'], 'ema': state, 'step': ckpt['step'],
            'args': ckpt.get('args', {}), 'posthoc_ema': {'sigma_rel': sigma_rel, 'snapshots': list(snapshots)}}


# ----------------------------------------------------------------------------------------------------
# The command: sweep sigma_rel, score each reconstruction with evaluate.py, plot, write the best one.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('run', help='run folder of train.py with post-hoc EMA snapshots (OUT/posthoc) and ckpt.pt')
    p.add_argument('--sigma-rels', default='0.03,0.05,0.08,0.12,0.18', help='comma-separated EMA widths to reconstruct')
    p.add_argument('--eval-args', default=None, help='evaluate.py arguments after the checkpoint (REFERENCE and flags): '
                   'each reconstruction is scored by its first Frechet distance; without it the first width is written')
    p.add_argument('--plot', default=None, help='PNG of the score against sigma_rel')
    p.add_argument('--json', default=None, help='the scores as .json')
    p.add_argument('--out', required=True, help='checkpoint of the best (or only) reconstruction, for sample.py')
    p.add_argument('--overwrite', action='store_true', help='replace existing --out/--plot/--json files')
    return p.parse_args(argv)


def main(args):
    try:
        sigma_rels = [float(s) for s in args.sigma_rels.split(',')]
        [gamma_of_sigma_rel(s) for s in sigma_rels]
    except ValueError as e:
        raise SystemExit(f'error: --sigma-rels {args.sigma_rels!r}: {e}') from None
    for flag, path, ext in (('--out', args.out, ('.pt',)), ('--plot', args.plot, ('.png',)), ('--json', args.json, ('.json',))):
        if path:
            runs.check_output_path(path, ext, flag, overwrite=args.overwrite)
    snapshots = list_snapshots(args.run)
    states, weights = reconstruct(snapshots, sigma_rels)
    print(f'{len(snapshots)} snapshots; weights of the {len(weights[sigma_rels[0]])} stored profiles per sigma_rel:')
    for r in sigma_rels:
        print(f'  sigma_rel {r:.3f} (gamma {gamma_of_sigma_rel(r):.2f}): ' + ' '.join(f'{w:+.2f}' for w in weights[r]))
    scores = {}
    if args.eval_args:
        import evaluate
        with tempfile.TemporaryDirectory() as tmp:
            for r in sigma_rels:
                path = os.path.join(tmp, f'phema-{r:.3f}.pt')
                torch.save(phema_checkpoint(args.run, states[r], r, snapshots), path)
                results = evaluate.main(evaluate.parse_args([path] + shlex.split(args.eval_args)))
                name = next(k for k in results if k.startswith(('FD', 'FID', 'frame-FD', 'clean-FID')))
                scores[r] = float(results[name])
                print(f'sigma_rel {r:.3f}: {name} {scores[r]:.4g}')
        best = min(scores, key=scores.get)
    else:
        best = sigma_rels[0]
    if args.plot and scores:
        import plots
        runs.atomic_write(args.plot, lambda tmp: plots.line_chart({name: (list(scores), list(scores.values()))}, tmp,
                                                                  title=f'{name} against EMA width sigma_rel'))
        print(f'plot of {name} against sigma_rel written to {args.plot}')
    if args.json:
        text = json.dumps({'scores': {f'{r:.4f}': s for r, s in scores.items()}, 'best': best, 'run': args.run,
                           'eval_args': args.eval_args, 'snapshots': snapshots}, indent=1)
        runs.atomic_write(args.json, lambda tmp: open(tmp, 'w').write(text))
    state = phema_checkpoint(args.run, states[best], best, snapshots)
    runs.write_checkpoint(args.out, state)
    print(f'wrote the sigma_rel {best:.3f} reconstruction to {args.out} (python sample.py --ckpt {args.out})')
    return scores, best


if __name__ == '__main__':
    try:
        main(parse_args())
    except (ValueError, OSError) as e:
        sys.exit(f'error: {e}')
