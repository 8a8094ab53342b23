"""schedule_search.fit_schedule (issue 25): a solver's noise levels fitted to ANY denoiser's own probability-flow ODE,
and the fitted file through fit_schedule.py, sample.py and evaluate.py.

On a class-conditional Gaussian mixture the exact PF-ODE solution is known (exact_ode_endpoints, scipy DOP853), so
the fit is judged against the truth on noise it never saw. The mixture is wrapped in a plain function, as a trained
network is: no dimension attribute, nothing but denoiser(x, sigma, **cond)."""
import json

import numpy as np
import pytest
import torch

import data
import sample
from checkpoints import sha256_of
from diffusion import GaussianMixture
from programs import run_program
from samplers import SAMPLERS, karras_sigmas
from schedule_search import draw_noise, exact_ode_endpoints, fit_schedule, reference_solutions

pytestmark = pytest.mark.usefixtures('one_thread')

PATHS, N = 32, 6


def conditional_mixture():
    """Six components in two classes; denoiser(x, sigma, y=labels) is the class's exact denoiser."""
    gm = GaussianMixture.random(K=6, D=2, num_classes=2, seed=0)
    return gm, (lambda x, sigma, **cond: gm(x, sigma, **cond))      # a function: no .D, like a network


def error(denoiser, x, target, sigmas, cond):
    return ((SAMPLERS['eps_abm'](denoiser, x.clone(), sigmas, cond=cond) - target) ** 2).mean().sqrt().item()


@pytest.fixture(scope='module')
def fitted():
    gm, denoiser = conditional_mixture()
    y = torch.arange(PATHS) % 2
    sigmas, info = fit_schedule(denoiser, (2,), N, 'eps_abm', cond={'y': y}, sigma_min=0.002, sigma_max=80.0, seed=0,
                                n_paths=PATHS, max_evals=120, ref_steps=128, dtype=torch.float64, return_info=True)
    return gm, denoiser, y, sigmas, info


def test_fit_schedule_beats_karras_on_held_out_noise_of_the_conditional_ode(fitted):
    """The contract (n levels from sigma_max to sigma_min, then 0, descending), the fit's own noise is draw_noise(seed)
    with the condition passed (its reported error is that of the returned schedule there, against the exact
    conditional ODE), and on other noise (seed 1, disjoint from the fit's) it beats Karras's schedule at equal NFE.
    Fails if fit_schedule drops `cond` (its reported error is then that of the unconditional ODE: 2-3x off), fits
    on other noise than draw_noise(seed), or if the check below is run on the fit's own noise. The last level is
    fitted: here about 10x sigma_min (fails with family_fit=False, whose Powell never leaves u = 0, a flat point of
    sigma_min * exp(u^2), and returns 1.07 sigma_min)."""
    gm, denoiser, y, sigmas, info = fitted
    assert len(sigmas) == N + 1 and sigmas[0] == 80.0 and 0.002 <= sigmas[-2] <= 8.0 and sigmas[-1] == 0
    assert sigmas[-2] > 3 * 0.002, sigmas
    assert (sigmas[1:] < sigmas[:-1]).all()
    exact = lambda x, labels: exact_ode_endpoints(lambda z, s: gm(z, s, y=labels), x, 80.0, 0.002, tol=1e-9)
    x_own = draw_noise((2,), PATHS, 0, 80.0, torch.float64)
    own = error(denoiser, x_own, exact(x_own, y), sigmas, {'y': y})
    assert own == pytest.approx(info['fitted_error'], rel=0.02), (own, info)        # the reference is converged
    unconditional = error(denoiser, x_own, exact(x_own, None), sigmas, {})
    assert abs(unconditional - own) > 0.2 * own                                       # the condition matters here
    x_test = draw_noise((2,), 64, 1, 80.0, torch.float64)
    assert not (x_test[:, None] == x_own[None]).all(-1).any()                          # held out: no shared draw
    y_test = torch.arange(64) % 2
    target = exact(x_test, y_test)
    karras = error(denoiser, x_test, target, karras_sigmas(N, 0.002, 80.0).double(), {'y': y_test})
    held_out = error(denoiser, x_test, target, sigmas, {'y': y_test})
    assert held_out < 0.7 * karras, (held_out, karras)


def test_reference_floor_is_the_distance_of_two_converged_solvers():
    """reference_solutions' target is within its floor's order of the exact ODE solution, and the floor shrinks when
    the reference takes more steps (a floor computed from one solver against itself would be 0 and fail this)."""
    gm, denoiser = conditional_mixture()
    x = draw_noise((2,), 16, 2, 80.0, torch.float64)
    exact = exact_ode_endpoints(gm, x, 80.0, 0.002, tol=1e-10)
    target, floor = reference_solutions(denoiser, x, 0.002, 80.0, steps=64)
    _, fine_floor = reference_solutions(denoiser, x, 0.002, 80.0, steps=256)
    true = ((target - exact) ** 2).mean().sqrt().item()
    assert 0 < true < 2 * floor and fine_floor < floor / 4, (true, floor, fine_floor)


def test_fit_schedule_checks_its_inputs():
    _, denoiser = conditional_mixture()
    with pytest.raises(ValueError, match='one per noise draw'):
        fit_schedule(denoiser, (2,), 5, cond={'y': torch.zeros(3, dtype=torch.long)}, n_paths=8)
    with pytest.raises(ValueError, match='deterministic'):
        fit_schedule(denoiser, (2,), 2)
    with pytest.raises(ValueError, match='unknown sampler'):
        fit_schedule(denoiser, (2,), 5, sampler='nope')


# ----------------------------------------------------------------------------------------------------
# The fitted file: fit_schedule.py writes it, sample.py and evaluate.py read it, for this checkpoint only.

COMMON = ['--dataset', 'shapes', '--resolution', '16', '--steps', '2', '--batch-size', '8', '--log-every', '1',
          '--sample-every', '0', '--val-every', '0', '--bpd-images', '0', '--no-progress', '--workers', '0']


def perturbed(path, seed, scale=0.05):
    """A copy of a checkpoint with its weights moved by scale * N(0, 1), so the outputs depend on the schedule."""
    ckpt = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(seed)
    for key in ('model', 'ema'):
        for v in ckpt[key].values():
            if v.is_floating_point():
                v.add_(scale * torch.randn(v.shape, generator=g))
    out = str(path).replace('.pt', f'_perturbed{seed}.pt')
    torch.save(ckpt, out)
    return out


@pytest.fixture(scope='module')
def fitted_file(tmp_path_factory):
    root = tmp_path_factory.mktemp('fitted')
    run_program('train.py', COMMON + ['--out', str(root / 'model')])
    ckpt, other = perturbed(root / 'model' / 'ckpt.pt', 0), perturbed(root / 'model' / 'ckpt.pt', 1)
    out = root / 'fit.json'
    result = run_program('fit_schedule.py', ['--ckpt', ckpt, '--nfe', '4', '--paths', '4', '--max-evals', '20',
                                             '--ref-steps', '8', '--out', out])
    assert 'wrote' in result.stdout and 'CPU s' in result.stdout
    return ckpt, other, out, root


@pytest.mark.parametrize('solver', [None, 'dpmpp_2m'])
def test_sample_py_with_the_fitted_file_gives_the_librarys_samples(fitted_file, solver):
    """sample.py --schedule fitted --schedule-file F (its solver by default, or any other) samples exactly what
    sample.generate gives with the sigmas in F; F records what it was fitted for."""
    ckpt, _, path, root = fitted_file
    record = json.loads(path.read_text())
    assert record['sampler'] == 'eps_abm' and record['steps'] == record['nfe'] == 4 and len(record['sigmas']) == 5
    assert record['checkpoint_sha256'] == sha256_of(ckpt)
    npz = root / f'cli_{solver}.npz'
    run_program('sample.py', ['--ckpt', ckpt, '-n', '6', '--batch', '6', '--class', '2', '--seed', '3', '--guidance', '1',
                              '--schedule', 'fitted', '--schedule-file', path, '--out', root / f'cli_{solver}.png',
                              '--npz', npz, '--overwrite'] + (['--sampler', solver] if solver else []))
    net, diffusion, config = sample.load_model(ckpt)
    sigmas = torch.tensor(record['sigmas'], dtype=torch.float32)
    assert not torch.allclose(sigmas, karras_sigmas(4, diffusion.sigma_min, diffusion.sigma_max))
    lib = sample.generate(net, diffusion, 6, sample.sample_shape(config), 'cpu', torch.full((6,), 2),
                          config['data']['num_classes'], solver or 'eps_abm', 4, 1.0, seed=3, batch_size=6, sigmas=sigmas)
    np.testing.assert_array_equal(np.load(npz)['samples'], data.to_uint8(lib).movedim(1, -1).numpy())


def test_a_file_fitted_for_another_checkpoint_or_steps_is_refused(fitted_file, capsys):
    """Before anything is sampled: another checkpoint's weights (sha256), another --steps, a missing file; the same
    for evaluate.py, which samples a checkpoint with sample.py's flags."""
    ckpt, other, path, root = fitted_file
    refused = lambda *flags: sample.check_args(sample.parse_args([str(f) for f in flags] + ['--out', str(root / 'x.png')]))
    with pytest.raises(SystemExit, match='fitted to another checkpoint'):
        refused('--ckpt', other, '--schedule', 'fitted', '--schedule-file', path)
    with pytest.raises(SystemExit, match='fitted for 4 noise levels'):
        refused('--ckpt', ckpt, '--steps', '8', '--schedule', 'fitted', '--schedule-file', path)
    with pytest.raises(SystemExit, match='needs --schedule-file'):
        refused('--ckpt', ckpt, '--schedule', 'fitted')
    with pytest.raises(SystemExit, match='applies to --schedule fitted'):
        refused('--ckpt', ckpt, '--schedule-file', path)
    with pytest.raises(SystemExit, match='not a readable JSON'):
        refused('--ckpt', ckpt, '--schedule', 'fitted', '--schedule-file', root / 'missing.json')
    import evaluate
    with pytest.raises(SystemExit):
        evaluate.parse_args([other, str(root / 'ref.npz'), '--schedule', 'fitted', '--schedule-file', str(path)])
    assert 'fitted to another checkpoint' in capsys.readouterr().err
