"""EDM2 (edm2.py, edm2_recipe.py): magnitude-preserving ops keep unit magnitude, forced weight normalisation holds the
weight norms through optimizer steps, the learned uncertainty drives every noise level's weighted loss to 1, the
paper's sizes, the schedules; and train.py --recipe edm2 end to end (checkpoint, sample.py, post-hoc EMA, resume)."""
import math
import os
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import diffusion
import edm2
import edm2_recipe
import posthoc_ema
import sample
from programs import check_program, run_program, weights

rms = lambda t: t.pow(2).mean().sqrt().item()      # noqa: E731


def test_each_magnitude_preserving_op_keeps_unit_magnitude():
    """Unit-rms inputs in, unit-rms outputs out (measured on 32k samples, tolerance 0.03): mp_silu (Eq. 81), mp_sum
    (Eq. 88) of independent inputs at t = 0.3, mp_cat (Eq. 103) of unequal widths at t = 0.7, MPConv (Eq. 47) as a
    linear and a 3x3 layer whatever the scale of its stored weights, the Fourier features (Eq. 75), the pixel norm.
    (Planted, each fails: silu / 0.5; mp_sum without its division; mp_cat as a lerp-style concatenation without the
    width factors (0.54); MPConv without 1/sqrt(fan_in).)"""
    torch.manual_seed(0)
    a, b = torch.randn(32768, 64), torch.randn(32768, 16)
    assert rms(edm2.mp_silu(a)) == pytest.approx(1, abs=0.03)
    assert rms(edm2.mp_sum(a, torch.randn(32768, 64), t=0.3)) == pytest.approx(1, abs=0.03)
    assert rms(edm2.mp_cat(a, b, t=0.7)) == pytest.approx(1, abs=0.03)
    # b's share of the squared magnitude is t^2 / ((1 - t)^2 + t^2) (Eq. 103: the balance holds whatever the widths)
    out = edm2.mp_cat(a, b, t=0.7)
    assert out[:, 64:].pow(2).sum() / out.pow(2).sum() == pytest.approx(0.49 / 0.58, abs=0.01)
    linear, conv = edm2.MPConv(64, 48, []), edm2.MPConv(16, 24, [3, 3])
    with torch.no_grad():
        linear.weight.mul_(37.0)                           # any stored scale: the forward normalises it
    assert rms(linear(a)) == pytest.approx(1, abs=0.03)
    assert rms(conv(torch.randn(64, 16, 16, 16))[..., 1:-1, 1:-1]) == pytest.approx(1, abs=0.03)   # zero padding aside
    assert rms(edm2.MPFourier(256)(torch.randn(512))) == pytest.approx(1, abs=0.03)
    x = torch.randn(8, 32, 4, 4) * 5
    assert edm2.normalize(x, dim=1).pow(2).mean(1).sqrt().sub(1).abs().max() < 1e-3   # pixel norm: each pixel's rms


def test_forced_weight_normalisation_keeps_weight_norms_fixed_through_optimizer_steps():
    """With edm2_recipe.setup's post-step hook every MPConv weight row keeps norm sqrt(fan_in) through Adam steps at a
    large learning rate, even when no training-mode forward re-normalises them (eval-mode loss); without it they
    grow (the control below). (Planted: the hook not registered -> fails.)"""
    torch.manual_seed(0)
    net = edm2.EDM2UNet(in_channels=1, image_size=8, num_classes=0, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                        channels_per_head=8)
    net.normalize_weights_()
    convs = [m for m in net.modules() if isinstance(m, edm2.MPConv)]
    row_norms = lambda: torch.cat([m.weight.flatten(1).norm(dim=1) / math.sqrt(m.weight[0].numel()) for m in convs])

    def steps(register):
        opt = torch.optim.Adam(net.parameters(), lr=0.2, betas=edm2.ADAM_BETAS)
        if register:
            edm2_recipe.setup(SimpleNamespace(net=net, optimizer=opt, extras={}),
                              SimpleNamespace(model='edm2-cpu', ema_snapshots=None))
        net.eval()                                          # no forward-time normalisation: only the hook acts
        for _ in range(5):
            net.out_gain.data.fill_(1.0)
            loss = net(torch.randn(4, 1, 8, 8), torch.randn(4)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return row_norms()

    assert (steps(register=True) - 1).abs().max() < 1e-3
    assert (steps(register=False) - 1).abs().max() > 0.05      # control: Adam's updates grow the weights


def test_uncertainty_weighting_drives_each_noise_levels_weighted_loss_to_one():
    """Data N(0, 1.5^2) and the untrained network (F = 0, so D = c_skip x) make the EDM-weighted loss range from 1 at
    low sigma to (1.5 / 0.5)^2 = 9 at high sigma. Training only u(sigma) on Eq. 21 (through edm2_recipe.objective,
    the loss train.py uses) brings loss / exp(u) to 1 in every sigma bin (within 0.12), from a spread of several
    before. (Planted, each fails: '+ logvar' dropped from uncertainty_weighted_loss; the division by exp(u) dropped.)"""
    torch.manual_seed(0)
    net = edm2.EDM2UNet(in_channels=1, image_size=8, num_classes=0, model_channels=4, channel_mult=(1,), num_blocks=1,
                        channels_per_head=4)
    diff = diffusion.Diffusion(diffusion.EDMSchedule(-0.8, 1.6), 'edm', 'uniform', 0.5)
    run, args = SimpleNamespace(net=net, diffusion=diff), SimpleNamespace(recipe='edm2')
    opt = torch.optim.Adam(net.logvar_linear.parameters(), lr=0.05, betas=edm2.ADAM_BETAS)
    g = torch.Generator().manual_seed(0)

    def batch(n=512):
        # The untrained network's F is 0 (out_gain starts at 0), so ||F - target||^2 = ||target||^2: no forward needed.
        x0, noise = 1.5 * torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)
        sigma = diff.sample_sigma(n, g)[0]
        return diffusion.training_target(x0, noise, sigma, 'edm', 0.5).pow(2).flatten(1).mean(1), sigma

    def ratios():
        per_sample, sigma = batch(8192)
        with torch.no_grad():
            r = per_sample / net.logvar(sigma.log() / 4).exp()
        bins = torch.quantile(sigma.log(), torch.linspace(0, 1, 6))
        return [r[(sigma.log() >= lo) & (sigma.log() <= hi)].mean().item() for lo, hi in zip(bins[:-1], bins[1:])]

    before = ratios()
    assert max(before) / min(before) > 3
    for _ in range(300):
        per_sample, sigma = batch()
        loss = edm2_recipe.objective(run, per_sample, sigma, args)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = ratios()
    assert all(abs(r - 1) < 0.12 for r in after), after


def test_paper_sizes_have_the_papers_parameter_counts():
    """XS/S/M at ImageNet-512 (4x64x64 latents, 1000 classes) have 125/280/498 M parameters (EDM2 Table 2), counted on
    the meta device. (Planted: the decoder with num_blocks blocks per level instead of num_blocks + 1 -> fails.)"""
    for name, mparams in edm2.EDM2_PAPER_MPARAMS.items():
        net = dict(edm2.EDM2_CONFIGS[name], in_channels=4, image_size=64, num_classes=1000)
        assert checkpoints.parameter_count(edm2.EDM2UNet, net) / 1e6 == pytest.approx(mparams, abs=0.5), name


def test_preconditioning_and_schedules_follow_the_closed_forms():
    """EDM2's Precond equals diffusion.py's EDM row and c_noise = ln(sigma)/4; the learning rate ramps up linearly,
    holds alpha_ref until t_ref and is alpha_ref / 2 at 4 t_ref (alpha_ref / sqrt(t / t_ref)); sigma's log has the
    asked mean and std. (Planted: 1/(t/t_ref) instead of its square root -> 0.0025 at 4 t_ref -> fails.)"""
    sigma = torch.logspace(-2, 1.5, 9)
    c_skip, c_out, c_in, c_noise = edm2.preconditioning(sigma)
    for mine, theirs in zip((c_skip, c_out, c_in), diffusion.preconditioning(sigma, 'edm', 0.5)):
        torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(c_noise, diffusion.EDMSchedule().noise_level(sigma))
    assert edm2.learning_rate(49, 0.01, 1000, rampup=100) == pytest.approx(0.005)
    assert edm2.learning_rate(999, 0.01, 1000, rampup=100) == pytest.approx(0.01)
    assert edm2.learning_rate(4000, 0.01, 1000, rampup=100) == pytest.approx(0.005)
    log_sigma = edm2.sample_sigma(200000, -0.8, 1.6, torch.Generator().manual_seed(0)).log()
    assert (log_sigma.mean().item(), log_sigma.std().item()) == (pytest.approx(-0.8, abs=0.02), pytest.approx(1.6, abs=0.02))


TINY = ['--model', 'edm2-cpu', '--recipe', 'edm2', '--resolution', '16', '--batch-size', '8', '--log-every', '2',
        '--val-every', '0', '--sample-every', '0', '--sample-steps', '3', '--warmup', '2', '--lr-ref-steps', '3',
        '--snapshot-every', '2', '--no-progress', '--bpd-images', '0', '--ckpt-every', '100']


def test_train_edm2_recipe_checkpoint_samples_and_resumes_exactly(tmp_path):
    """train.py --recipe edm2 writes a checkpoint sample.py samples from and snapshots that posthoc_ema.py turns into a
    checkpoint sample.py samples from; and 3 steps + resume for 3 == 6 straight (weights, EMA, the post-hoc EMAs and
    their snapshots). (Planted: the post-hoc tracker not in run.extras -> its state restarts on resume -> fails.)"""
    run_program('train.py', TINY + ['--steps', '6', '--out', tmp_path / 'straight'])
    run_program('train.py', TINY + ['--steps', '3', '--out', tmp_path / 'resumed'])
    run_program('train.py', TINY + ['--steps', '6', '--resume', 'auto', '--out', tmp_path / 'resumed'])
    straight, resumed = (str(tmp_path / n / 'ckpt.pt') for n in ('straight', 'resumed'))
    for a, b in zip(weights(straight, 'model') + weights(straight), weights(resumed, 'model') + weights(resumed)):
        assert torch.equal(a, b)
    a, b = (torch.load(p, weights_only=True) for p in (straight, resumed))
    assert a['posthoc_ema']['t'] == b['posthoc_ema']['t'] == 6
    for ea, eb in zip(a['posthoc_ema']['emas'], b['posthoc_ema']['emas']):
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert a['config']['model'] == 'edm2' and a['config']['config_name'] == 'edm2-cpu'
    assert (a['config']['diffusion']['P_mean'], a['config']['diffusion']['P_std']) == (-0.8, 1.6)
    assert [os.path.basename(p) for p in posthoc_ema.list_snapshots(str(tmp_path / 'resumed'))] == \
        ['snapshot-0000002.pt', 'snapshot-0000004.pt', 'snapshot-0000006.pt']
    # sample.py reads the EDM2 checkpoint unchanged, and the post-hoc reconstruction written by posthoc_ema.py
    phema = str(tmp_path / 'phema.pt')
    posthoc_ema.main(posthoc_ema.parse_args([str(tmp_path / 'straight'), '--sigma-rels', '0.08', '--out', phema]))
    for ckpt in (straight, phema):
        png = str(tmp_path / (os.path.basename(ckpt) + '.png'))
        sample.main(sample.parse_args(['--ckpt', ckpt, '-n', '3', '--steps', '3', '--out', png]))
        assert os.path.getsize(png) > 0
    net, _, _ = checkpoints.load_model(phema)
    assert isinstance(net, edm2.EDM2UNet)


def test_edm2_flags_are_checked_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match='--recipe edm2 trains the learned uncertainty'):
        check_program('train.py', ['--recipe', 'edm2'])
    with pytest.raises(SystemExit, match='--latent-norm applies to latent diffusion'):
        check_program('train.py', ['--latent-norm', 'channel'])
    with pytest.raises(SystemExit, match='takes no augmentation labels'):
        check_program('train.py', ['--model', 'edm2-cpu', '--aug-p', '0.2'])
    # the recipe's defaults, and a flag given on the command line wins over them
    args = check_program('train.py', ['--model', 'edm2-cpu', '--recipe', 'edm2', '--grad-clip', '0.5'])
    assert (args.lr, args.grad_clip, args.sigma_rels, args.P_mean) == (0.01, 0.5, [0.05, 0.1], -0.8)
    assert check_program('train.py', ['--model', 'edm2-cpu']).lr == 2e-3      # the EDM recipe keeps its own


def test_the_default_sigma_distribution_is_edm2s_on_pixels_and_edms_on_latents(tmp_path):
    """The default training noise levels: EDM2's pixel preset N(-0.8, 1.6^2) for pixel EDM runs (U-Net and DiT),
    EDM's N(-1.2, 1.2^2) (recorded as absent) for latents; other parameterisations have none; a flag given wins. An
    older checkpoint, which recorded nothing for EDM's values, resumes with EDM's flags and is refused with the
    defaults (checkpoints.config_mismatch). (Planted: the pixel default not set -> fails; checkpoints.IMPLIED empty
    -> the old run mismatches even with EDM's flags -> fails.)"""
    levels = lambda flags: (lambda a: (a.P_mean, a.P_std))(check_program('train.py', flags))
    assert levels([]) == levels(['--model', 'dit']) == (-0.8, 1.6)
    assert levels(['--P-mean', '-1.2', '--P-std', '1.2']) == (-1.2, 1.2)
    assert levels(['--prediction', 'eps']) == (None, None)
    (tmp_path / 'ae.pt').write_bytes(b'')               # only its existence is checked before the run starts
    assert levels(['--autoencoder', str(tmp_path / 'ae.pt')]) == (None, None)
    old = {'diffusion': {'prediction': 'edm', 'schedule': 'edm', 'sigma_data': 0.5}}
    edm = {'diffusion': dict(old['diffusion'], P_mean=-1.2, P_std=1.2)}
    assert checkpoints.config_mismatch(old, edm) == []
    assert checkpoints.config_mismatch(old, {'diffusion': dict(old['diffusion'], P_mean=-0.8, P_std=1.6)}) == [
        'diffusion.P_mean: checkpoint has -1.2, this run has -0.8', 'diffusion.P_std: checkpoint has 1.2, this run has 1.6']


def test_the_dit_has_its_own_run_defaults_and_a_flag_given_wins():
    """--model dit: --steps 4500 --batch-size 32 --lr 4e-3 unless given (train.DIT_RUN_DEFAULTS); the U-Net keeps the
    flags' own 2000 / 64 / 2e-3. (Planted: the DiT's defaults not applied -> fails; applied over given flags -> fails.)"""
    run = lambda flags: (lambda a: (a.steps, a.batch_size, a.lr))(check_program('train.py', flags))
    assert run([]) == (2000, 64, 2e-3)
    assert run(['--model', 'dit']) == (4500, 32, 4e-3)
    assert run(['--model', 'dit', '--lr', '1e-3', '--steps', '7']) == (7, 32, 1e-3)
    assert run(['--model', 'dit', '--batch-size', '64']) == (4500, 64, 4e-3)


def test_latent_norm_channel_gives_each_latent_channel_mean_0_and_std_sigma_data():
    """--latent-norm channel (edm2_recipe.normalise_latents, as train.py's encode_dataset calls it): EDM2's per-channel
    normalisation of the autoencoder's latents to std sigma_data, stored in the autoencoder config that the latent
    record (and sample.py's decoder) reads. (Planted: per_channel=False, one shared scale -> fails.)"""
    import data
    import vae
    torch.manual_seed(0)
    ae = vae.create_autoencoder('kl-f4').eval()
    with torch.no_grad():                                       # channels of very different scales, as trained ones
        ae.quant_conv.weight.mul_(torch.tensor([1.0, 5.0, 0.2, 1.0, 1.0, 1.0])[:, None, None, None])
    dataset = data.load_dataset('shapes', resolution=16)
    args = SimpleNamespace(latent_norm='channel', sigma_data=0.5)
    edm2_recipe.normalise_latents(args, ae, dataset, 'cpu', max_images=256)
    assert len(ae.config['scale_factor']) == len(ae.config['shift_factor']) == 3
    index = torch.linspace(0, len(dataset) - 1, 256).long()
    z = ae.encode(dataset.batch(index)[0])
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3), unbiased=False), torch.full((3,), 0.5), atol=1e-3, rtol=0)
