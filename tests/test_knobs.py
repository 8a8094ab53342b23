"""Every sampling knob from the command line gives what the library gives when called directly (issue 13).

Two tiny runs are trained once: a class-conditional discrete-VP model (x0 prediction, linear schedule with T = 50,
an early checkpoint for autoguidance) and a noise-conditional classifier (train.py --task classifier). Three training
steps leave the zero-initialised layers at ~0, where every class and every guidance weight give the same samples;
so the weights are then perturbed (and saved as checkpoints), which makes the outputs depend on the class and the
knobs, and keeps them inside [-1, 1] where uint8 samples can tell them apart. Each test
runs sample.py with some flags and compares its uint8 samples with sample.generate called with the objects the
flags name, built here by hand from samplers.py and guidance.py, from the same seed. A flag that was ignored,
mapped to the wrong option or the wrong schedule changes the samples and fails the comparison.
"""
import json

import numpy as np
import pytest
import torch

import classifier
import data
import sample
import samplers
import reports
from programs import run_program
from guidance import (Autoguidance, ClassifierGuidance, IntervalSchedule, LinearSchedule, OscillatingSchedule,
                      Thresholded)

T = 50
COMMON = ['--dataset', 'shapes', '--resolution', '16', '--steps', '3', '--batch-size', '8', '--log-every', '1',
          '--sample-every', '0', '--val-every', '2', '--sample-steps', '2', '--bpd-images', '2', '--no-progress',
          '--prediction', 'x0', '--schedule', 'linear', '--T', str(T), '--workers', '0']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('knobs')
    run_program('train.py', COMMON + ['--out', str(root / 'model'), '--save-early', '2'])
    # The classifier is its own program (train.py --task classifier runs it): no grids, no bits/dim.
    grid_flags = ('--sample-every', '--sample-steps', '--bpd-images')
    clf_flags = [a for i, a in enumerate(COMMON) if a not in grid_flags and COMMON[i - 1] not in grid_flags]
    run_program('train.py', clf_flags + ['--out', str(root / 'clf'), '--task', 'classifier'])
    return {'model': perturbed(root / 'model' / 'ckpt.pt', 0), 'early': perturbed(root / 'model' / 'ckpt_0000002.pt', 1),
            'clf': str(root / 'clf' / 'ckpt.pt'), 'root': root}


def perturbed(path, seed, scale=0.05):
    """A copy of a checkpoint with every float weight moved by scale * N(0, 1): see the module docstring."""
    ckpt = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(seed)
    for key in ('model', 'ema'):
        for v in ckpt[key].values():
            if v.is_floating_point():
                v.add_(scale * torch.randn(v.shape, generator=g))
    out = str(path).replace('.pt', '_perturbed.pt')
    torch.save(ckpt, out)
    return out


def run_cli(runs, tmp_path, *flags):
    """sample.py with 6 samples of class 2 from seed 3; returns its uint8 (N, H, W, C) samples."""
    npz = tmp_path / 'cli.npz'
    sample.main(sample.parse_args(['--ckpt', runs['model'], '-n', '6', '--batch', '6', '--class', '2', '--seed', '3',
                                   '--out', str(tmp_path / 'cli.png'), '--npz', str(npz), *flags]))
    return np.load(npz)['samples']


def run_library(runs, sigmas, guidance=1.0, sampler='euler', options=None, guide=None):
    """The same samples through sample.generate with explicit library objects."""
    net, diffusion, config = sample.load_model(runs['model'])
    x = sample.generate(net, diffusion, 6, sample.sample_shape(config), 'cpu', torch.full((6,), 2),
                        config['data']['num_classes'], sampler, len(sigmas) - 1, guidance, seed=3,
                        sampler_options=options or {}, batch_size=6, sigmas=sigmas, guide=guide)
    return data.to_uint8(x).movedim(1, -1).numpy()


def model_diffusion(runs):
    return sample.load_model(runs['model'])[1]


# ----------------------------------------------------------------------------------------------------
# Schedules and sampler options

@pytest.mark.parametrize('flags, make', [
    (['--rho', '5'], lambda d: samplers.karras_sigmas(8, d.sigma_min, d.sigma_max, 5.0)),
    (['--schedule', 'loglinear'], lambda d: samplers.loglinear_sigmas(8, d.sigma_min, d.sigma_max)),
    (['--schedule', 'vp-trailing'], lambda d: samplers.vp_sigmas(d.schedule.sigmas, 8, 'trailing')),
    (['--schedule', 'vp-leading'], lambda d: samplers.vp_sigmas(d.schedule.sigmas, 8, 'leading')),
    (['--schedule', 'flow', '--flow-shift', '3'], lambda d: samplers.flow_sigmas(8, shift=3.0)),
    (['--sigma-max', '5'], lambda d: samplers.karras_sigmas(8, d.sigma_min, 5.0)),
])
def test_schedule_flags_match_the_library(runs, tmp_path, flags, make):
    cli = run_cli(runs, tmp_path, '--sampler', 'euler', '--steps', '8', '--guidance', '1', *flags)
    lib = run_library(runs, make(model_diffusion(runs)))
    np.testing.assert_array_equal(cli, lib)


def test_ddpm_on_the_models_own_steps_is_the_trained_markov_chain(runs, tmp_path):
    # --schedule vp-trailing --steps T visits every one of the T trained noise levels, highest first.
    diffusion = model_diffusion(runs)
    sigmas = sample.make_sigmas('vp-trailing', T, diffusion)
    assert diffusion.schedule.T == T
    torch.testing.assert_close(sigmas[:-1].double(), diffusion.schedule.sigmas.flip(0).double(), rtol=1e-6, atol=0)
    cli = run_cli(runs, tmp_path, '--sampler', 'ddpm', '--schedule', 'vp-trailing', '--steps', str(T), '--guidance', '1')
    np.testing.assert_array_equal(cli, run_library(runs, sigmas, sampler='ddpm'))


@pytest.mark.parametrize('sampler, flags, options', [
    ('ddim', ['--eta', '0.5'], {'eta': 0.5}),
    ('heun', ['--s-churn', '10', '--s-noise', '1.01', '--s-tmin', '0.1', '--s-tmax', '5'],
     {'S_churn': 10.0, 'S_noise': 1.01, 'S_tmin': 0.1, 'S_tmax': 5.0}),
    ('euler_ancestral', ['--eta', '0.7', '--s-noise', '0.9'], {'eta': 0.7, 's_noise': 0.9}),
    ('pc', ['--snr', '0.2', '--n-corrector', '2'], {'snr': 0.2, 'n_corrector': 2}),
    ('dpmpp_2m_sde', ['--sampler-opt', 'eta=0.5'], {'eta': 0.5}),
])
def test_sampler_option_flags_reach_the_sampler(runs, tmp_path, sampler, flags, options):
    cli = run_cli(runs, tmp_path, '--sampler', sampler, '--steps', '6', '--guidance', '1', *flags)
    d = model_diffusion(runs)
    lib = run_library(runs, samplers.karras_sigmas(6, d.sigma_min, d.sigma_max), sampler=sampler, options=options)
    np.testing.assert_array_equal(cli, lib)
    default = run_library(runs, samplers.karras_sigmas(6, d.sigma_min, d.sigma_max), sampler=sampler)
    assert not np.array_equal(cli, default), 'the option changed nothing: the test could not catch a dropped flag'


# ----------------------------------------------------------------------------------------------------
# Guidance

@pytest.mark.parametrize('flags, weight', [
    (['--guidance-schedule', 'increasing', '--guidance-start', '1.5'], lambda s: LinearSchedule(s, 3.0, 1.5)),
    (['--guidance-schedule', 'oscillating', '--guidance-num-high', '2'], lambda s: OscillatingSchedule(s, 3.0, 1.0, 2)),
    (['--guidance-schedule', 'interval', '--guidance-interval', '0.5', '10'], lambda s: IntervalSchedule(3.0, 0.5, 10.0)),
])
def test_guidance_schedules_match_the_library(runs, tmp_path, flags, weight):
    cli = run_cli(runs, tmp_path, '--sampler', 'euler', '--steps', '8', '--guidance', '3', *flags)
    d = model_diffusion(runs)
    sigmas = samplers.karras_sigmas(8, d.sigma_min, d.sigma_max)
    np.testing.assert_array_equal(cli, run_library(runs, sigmas, guidance=weight(sigmas)))
    assert not np.array_equal(cli, run_library(runs, sigmas, guidance=3.0))


@pytest.mark.parametrize('flags, guide', [
    (['--threshold', 'static'], lambda d: Thresholded(d, 'static')),
    (['--threshold', 'dynamic', '--threshold-percentile', '0.9'], lambda d: Thresholded(d, 'dynamic', 0.9)),
])
def test_thresholding_matches_the_library(runs, tmp_path, flags, guide):
    cli = run_cli(runs, tmp_path, '--sampler', 'euler', '--steps', '8', '--guidance', '6', *flags)
    d = model_diffusion(runs)
    np.testing.assert_array_equal(cli, run_library(runs, samplers.karras_sigmas(8, d.sigma_min, d.sigma_max),
                                                   guidance=6.0, guide=guide))


def test_autoguidance_uses_the_bad_checkpoint_instead_of_cfg(runs, tmp_path):
    cli = run_cli(runs, tmp_path, '--sampler', 'euler', '--steps', '8', '--guidance', '2.5', '--autoguidance', runs['early'])
    bad_net, bad_diffusion, _ = sample.load_model(runs['early'])
    d = model_diffusion(runs)
    lib = run_library(runs, samplers.karras_sigmas(8, d.sigma_min, d.sigma_max),
                      guide=lambda den: Autoguidance(den, bad_diffusion.denoiser(bad_net), w=2.5))
    np.testing.assert_array_equal(cli, lib)


def test_classifier_guidance_uses_the_trained_classifier(runs, tmp_path):
    cli = run_cli(runs, tmp_path, '--sampler', 'euler', '--steps', '8', '--guidance', '1', '--classifier', runs['clf'],
                  '--classifier-scale', '4')
    clf_net, clf_diffusion, config = sample.load_model(runs['clf'], expect='classifier')
    assert config['task'] == 'classifier'
    log_prob = classifier.classifier_log_prob(clf_net, clf_diffusion)
    d = model_diffusion(runs)
    lib = run_library(runs, samplers.karras_sigmas(8, d.sigma_min, d.sigma_max),
                      guide=lambda den: ClassifierGuidance(den, log_prob, scale=4.0, pass_y=True))
    np.testing.assert_array_equal(cli, lib)


def test_rejection_keeps_what_the_classifier_accepts_and_reports_the_rate(runs, tmp_path, capsys):
    cli = run_cli(runs, tmp_path, '--sampler', 'euler', '--steps', '4', '--guidance', '1', '--classifier', runs['clf'],
                  '--reject', '0.5')
    assert 'rejection sampling accepted 50.0%' in capsys.readouterr().out      # top half of each class: exactly 50%
    assert cli.shape[0] == 6


def test_sampling_flag_mistakes_are_messages(runs, tmp_path):
    for flags, message in ((['--reject'], 'need --classifier'), (['--sampler', 'euler', '--eta', '1'], "no option 'eta'"),
                           (['--schedule', 'vp-trailing', '--steps', str(T + 1)], 'discrete noise levels'),
                           (['--classifier', runs['model'], '--classifier-scale', '1'], 'not a classifier'),
                           (['--guidance-interval', '3', '1'], 'SIGMA_LO < SIGMA_HI')):
        with pytest.raises(SystemExit, match=message):
            run_cli(runs, tmp_path, *flags)


# ----------------------------------------------------------------------------------------------------
# What train.py now records: T, bits/dim, the comparable held-out and training-batch losses, log.png

def test_the_run_records_T_bits_per_dim_and_comparable_losses(runs):
    net, diffusion, config = sample.load_model(runs['model'])
    assert config['diffusion']['T'] == T and len(diffusion.schedule.sigmas) == T
    records = [json.loads(line) for line in open(runs['root'] / 'model' / 'log.jsonl')]
    bpd = [r['bits_per_dim'] for r in records if 'bits_per_dim' in r]
    assert len(bpd) == 1 and 0 < bpd[0] < float("inf")              # an untrained model: large but finite
    held = [r for r in records if 'val_loss' in r]
    assert held and all('train_loss_fixed' in r for r in held)
    assert (runs['root'] / 'model' / 'log.png').exists()
    clf_records = [json.loads(line) for line in open(runs['root'] / 'clf' / 'log.jsonl')]
    assert any('val_accuracy_by_sigma' in r for r in clf_records)


def test_watcher_warns_when_held_out_loss_rises_while_training_loss_falls():
    w = reports.Watcher(window=4)
    for v, t in zip([1.0, 0.9, 0.8, 0.7], [1.0, 0.9, 0.8, 0.7]):      # both fall: learning
        assert w.losses(v, t) is None
    messages = [w.losses(v, t) for v, t in zip([0.72, 0.75, 0.8, 0.85], [0.6, 0.5, 0.4, 0.3])]  # held-out up, train down
    assert messages[:2] == [None, None] and 'memorisation' in messages[2] and messages[3] is None   # said once
    w = reports.Watcher(window=4)
    for v, t in zip([0.7, 0.72, 0.75, 0.8], [0.7, 0.72, 0.75, 0.8]):  # both rise: diverging, not memorising
        assert w.losses(v, t) is None


def test_watcher_stops_after_patience_evaluations_without_improvement():
    w = reports.Watcher(patience=2, margin=0.1)
    assert [w.metric(v) for v in (10.0, 8.0, 7.5, 7.4, 7.3)] == [False, False, False, True, True]
    assert not any(reports.Watcher(patience=0).metric(v) for v in (1.0, 1.0, 1.0))


@pytest.mark.parametrize('mode', ['fixed', 'uniform', 'data', 'real'])
def test_evaluate_samples_a_checkpoint_with_every_condition_mode_and_the_sampling_flags(runs, tmp_path, mode):
    import evaluate
    reference = tmp_path / 'reference.npz'
    ref_labels = np.array([0, 0, 0, 1, 5, 5], dtype=np.int64)
    np.savez(reference, samples=np.zeros((6, 16, 16, 3), np.uint8), labels=ref_labels)
    args = evaluate.parse_args([runs['model'], str(reference), '--conditions', mode, '--class', '4', '--num-gen', '6',
                                '--batch-size', '4', '--seed', '5', '--sampler', 'heun', '--steps', '5', '--guidance', '2',
                                '--guidance-schedule', 'increasing', '--threshold', 'static', '--device', 'cpu'])
    images, labels = evaluate.sample_checkpoint(args)
    expected = evaluate.choose_conditions(mode, 6, 6, ref_labels, fixed_class=4, seed=5)
    np.testing.assert_array_equal(labels.numpy(), expected)
    if mode == 'real':
        assert sorted(labels.tolist()) == sorted(ref_labels.tolist())            # exactly the reference's classes
    net, diffusion, config = sample.load_model(runs['model'])
    sigmas = samplers.karras_sigmas(5, diffusion.sigma_min, diffusion.sigma_max)
    x = sample.generate(net, diffusion, 6, sample.sample_shape(config), 'cpu', torch.from_numpy(expected), 6, 'heun', 5,
                        LinearSchedule(sigmas, 2.0, 1.0), seed=5, batch_size=4, sigmas=sigmas,
                        guide=lambda d: Thresholded(d, 'static'))
    np.testing.assert_array_equal(images.numpy(), data.to_uint8(x).numpy())


def test_small_datasets_end_with_the_memorisation_report(tmp_path):
    """Under --memorization-below images, the run ends with evaluate.py's nearest-neighbour report and its PNG."""
    from PIL import Image
    folder = tmp_path / 'imgs'
    folder.mkdir()
    g = np.random.RandomState(0)
    for i in range(24):
        Image.fromarray(g.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    out = tmp_path / 'run'
    run_program('train.py', ['--dataset', f'folder:{folder}', '--steps', '2', '--batch-size', '8', '--sample-steps', '2',
                             '--model-channels', '8', '--no-progress', '--workers', '0', '--out', str(out)])
    records = [json.loads(line) for line in open(out / 'log.jsonl')]
    report = [r for r in records if 'near_copies' in r]
    assert len(report) == 1 and 0 <= report[0]['near_copies'] <= 1 and report[0]['memorisation_samples'] == 64
    assert Image.open(out / 'nearest_pairs.png').size[0] > 0


def test_inverse_step_size_and_start_level_flags_match_the_library(runs, tmp_path):
    """--inverse-opt sets the method's own options (DPS's step size zeta) and the schedule flags its noise levels
    (--sigma-max: the start of a CCDF-style shortened solve); an unknown option names the method's options."""
    import inverse
    from PIL import Image
    cli_png = tmp_path / 'cli.png'
    sample.main(sample.parse_args(['--ckpt', runs['model'], '--inverse', 'dps', '--operator', 'sr', '--factor', '2',
                                   '--inverse-opt', 'zeta=2', '--sigma-max', '5', '--steps', '6', '--seed', '1',
                                   '--out', str(cli_png)]))
    net, diffusion, config = sample.load_model(runs['model'])
    ds = data.load_dataset('shapes', split=config['args'].get('split', 'train'), resolution=16)
    x0 = ds[0][0][None]
    g = torch.Generator().manual_seed(1)
    op = inverse.make_operator('sr', tuple(x0.shape[1:]), generator=g, noise_std=0.0, factor=2)
    y = op.measure(x0, generator=g)
    sigmas = samplers.karras_sigmas(6, diffusion.sigma_min, 5.0)
    x = sigmas[0] * torch.randn(x0.shape, generator=g)
    recon = inverse.sample_dps(diffusion.denoiser(net), x, sigmas, op, y, zeta=2.0, generator=g,
                               cond={'y': torch.full((1,), config['data']['num_classes'])}).clamp(-1, 1)
    sample.save_grid(torch.cat([op.pinv(y).clamp(-1, 1), recon, x0]).detach(), str(tmp_path / 'lib.png'), nrow=3)
    np.testing.assert_array_equal(np.asarray(Image.open(cli_png)), np.asarray(Image.open(tmp_path / 'lib.png')))
    with pytest.raises(SystemExit, match="options: zeta=0.5"):
        sample.main(sample.parse_args(['--ckpt', runs['model'], '--inverse', 'dps', '--inverse-opt', 'w_r=1',
                                       '--out', str(tmp_path / 'unknown_option.png')]))
