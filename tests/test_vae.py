"""Tests for vae.py: the KL term, the VQ quantiser (straight-through, EMA, restarts, absorbed into the decoder),
VQGAN's adaptive weight, the latent scale and checkpoints. (The Stable Diffusion VAE loaders are pretrained.py's,
tested in test_pretrained.py; LPIPS is lpips.py's.)"""
import math

import pytest
import torch
import torch.nn.functional as F

import vae
from vae import (AutoencoderLoss, DiagonalGaussian, VectorQuantizer, adaptive_weight, compute_latent_scale,
                 create_autoencoder, hinge_d_loss)


pytestmark = pytest.mark.usefixtures('one_thread')


def images(n=4, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------
# KL term (Kingma & Welling App. B)

def test_kl_matches_closed_form_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g) * 0.5
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    # closed form per element, written from the Gaussian densities: log(s_p/s_q) + (s_q^2 + mu^2) / (2 s_p^2) - 1/2
    var = logvar.exp()
    closed = (-0.5 * logvar + (var + mean ** 2) / 2 - 0.5).flatten(1).sum(1)
    assert torch.allclose(posterior.kl(), closed, atol=1e-5)
    # Monte Carlo: KL = E_q[log q(z) - log p(z)], p = N(0, I)
    n = 40000
    big = DiagonalGaussian(torch.cat([mean, logvar], dim=1).repeat(n, 1, 1, 1))
    z = big.sample(torch.Generator().manual_seed(1))
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    estimate = (big.log_prob(z) - log_p).view(n, 2).mean(0)
    stderr = (big.log_prob(z) - log_p).view(n, 2).std(0) / math.sqrt(n)
    assert torch.all((estimate - posterior.kl()).abs() < 4 * stderr), (estimate, posterior.kl(), stderr)


def test_posterior_sample_has_the_posterior_moments():
    mean, logvar = torch.full((1, 1, 1, 1), 0.7), torch.full((1, 1, 1, 1), math.log(0.09))
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1).repeat(20000, 1, 1, 1))
    z = posterior.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 0.7) < 0.01 and abs(z.std().item() - 0.3) < 0.01


# ----------------------------------------------------------------------------
# Vector quantiser

def test_straight_through_gradient_is_the_identity_and_reaches_the_encoder():
    quantizer = VectorQuantizer(8, 2, codebook='loss').eval()
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    z_q, _, info = quantizer(z)
    codes = quantizer.codes()[info['indices']].permute(0, 3, 1, 2)
    assert torch.allclose(z_q, codes, atol=1e-6)                     # the forward value is the code (z + (e - z))
    weights = torch.randn_like(z)
    (z_q * weights).sum().backward()
    assert torch.allclose(z.grad, weights)                           # dL/dz := dL/dz_q (VQ-VAE Sec. 3.2)
    # through the whole model: the reconstruction loss alone moves the encoder
    ae = create_autoencoder('tiny-vq')
    x = images()
    x_hat, vq_loss, _ = ae(x)
    (x_hat - x).abs().mean().backward()
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0


def test_vq_loss_terms():
    """codebook='loss': ||sg[z] - e||^2 + beta ||z - sg[e]||^2; 'ema': only the commitment term (Eq. 3)."""
    for codebook in ('loss', 'ema'):
        z = torch.randn(1, 2, 2, 2, requires_grad=True)
        quantizer = VectorQuantizer(4, 2, beta=0.3, codebook=codebook).eval()
        z_q, loss, info = quantizer(z)
        mse = ((z - z_q) ** 2).mean()
        expected = 1.3 * mse if codebook == 'loss' else 0.3 * mse
        assert torch.allclose(loss, expected, atol=1e-6)
        # the value cannot tell the terms apart, the gradients can: beta pulls z, 1 pulls the codes
        loss.backward()
        codes = quantizer.codes()[info['indices']].permute(0, 3, 1, 2).detach()
        assert torch.allclose(z.grad, 0.3 * 2 * (z - codes).detach() / z.numel(), atol=1e-6)
        if codebook == 'loss':
            used = info['indices'].flatten()
            expected_grad = torch.zeros(4, 2).index_add_(0, used, 2 * (codes - z).detach().permute(0, 2, 3, 1).reshape(-1, 2) / z.numel())
            assert torch.allclose(quantizer.embedding.grad, expected_grad, atol=1e-6)


def test_ema_codes_move_to_the_mean_of_their_vectors():
    """With decay 0 (one EMA step), Eq. 8 gives e_k = mean of the z assigned to code k."""
    quantizer = VectorQuantizer(2, 2, codebook='ema', ema_decay=0.0, restart_threshold=0.0)
    with torch.no_grad():
        quantizer.embedding.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    left, right = torch.tensor([[-2.0, 0.5], [-1.0, 0.1], [-0.5, -0.3]]), torch.tensor([[2.0, 1.0], [0.5, 0.0]])
    z = torch.cat([left, right]).T.reshape(1, 2, 1, 5)
    quantizer.train()(z)
    assert torch.allclose(quantizer.embedding[0], left.mean(0), atol=1e-4)
    assert torch.allclose(quantizer.embedding[1], right.mean(0), atol=1e-4)


def test_dead_code_is_restarted_onto_the_data_and_live_codes_stay():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(4, 2, codebook='loss', ema_decay=0.5, restart_threshold=1.0)
    with torch.no_grad():
        quantizer.embedding.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 1.0], [100.0, 100.0]]))
    z = torch.randn(1, 2, 8, 8) * 0.3
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    live = quantizer.embedding[0].clone()
    for _ in range(3):
        quantizer.train()(z)
    dead = quantizer.embedding[3]
    assert (z_flat - dead).norm(dim=1).min() < 1e-2                 # moved onto an encoder output of the batch
    assert torch.equal(quantizer.embedding[0], live)                 # the most used code was not touched


@pytest.mark.parametrize('codebook', ['loss', 'ema'])
def test_a_step_quantises_with_the_codebook_from_before_its_update(codebook):
    """A vector whose code is restarted in the same step still reaches the decoder as that (nearest) code, as
    Jukebox (dequantise before update_k) and Sonnet's VectorQuantizerEMA do; with EMA the live codes move in the
    step too, and the batch still sees the codes it was matched to. (Planted bug caught: reading the codes after
    update_codebook, which hands the vector near [5, 5] a random encoder output of the batch instead.)"""
    torch.manual_seed(0)
    quantizer = VectorQuantizer(3, 2, codebook=codebook, ema_decay=0.5, restart_threshold=2.0)
    with torch.no_grad():
        quantizer.embedding.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
        if codebook == 'ema':
            quantizer.ema_sum.copy_(quantizer.embedding)
    g = torch.Generator().manual_seed(0)
    z_flat = torch.cat([0.1 * torch.randn(8, 2, generator=g), 1 + 0.1 * torch.randn(7, 2, generator=g),
                        torch.tensor([[5.2, 4.9]])])                  # code 2 is picked once: usage 1.5 < 2, restarted
    z = z_flat.T.reshape(1, 2, 1, 16)
    before = quantizer.codes().detach().clone()
    z_q, loss, info = quantizer.train()(z)
    assert info['indices'].flatten()[-1] == 2
    assert (quantizer.embedding[2] - before[2]).norm() > 1.0        # the code was restarted in this step ...
    assert torch.allclose(z_q[0, :, 0, -1], before[2])               # ... yet its vector was decoded as [5, 5]
    assert torch.allclose(z_q, before[info['indices']].permute(0, 3, 1, 2), atol=1e-6)
    weight = 0.25 if codebook == 'ema' else 1.25                     # the VQ loss compares z with the same codes
    assert torch.allclose(loss, weight * ((z - z_q) ** 2).mean(), atol=1e-6)


def test_codebook_gradient_uses_the_codes_of_the_step_when_one_is_restarted():
    """codebook='loss' with the l2-normalised lookup: the codebook loss ||sg[z] - e/|e|||^2 differentiates through
    normalize(), which keeps its input for backward; a restart rewrites the embedding in place later in the same
    forward, and the gradient must still be that of the codes the step used. (Planted bug caught: codes() without
    the clone, which gives the restarted row the gradient at its new value.)"""
    torch.manual_seed(0)
    quantizer = VectorQuantizer(3, 2, codebook='loss', l2_normalize=True, ema_decay=0.5, restart_threshold=2.0)
    with torch.no_grad():
        quantizer.embedding.copy_(torch.tensor([[2.0, 0.1], [0.1, 3.0], [-1.0, -0.5]]))
    g = torch.Generator().manual_seed(0)
    z_flat = torch.cat([torch.tensor([[1.0, 0.0]]) + 0.2 * torch.randn(8, 2, generator=g),
                        torch.tensor([[0.0, 1.0]]) + 0.2 * torch.randn(7, 2, generator=g), torch.tensor([[-1.0, -0.8]])])
    before = quantizer.embedding.detach().clone().requires_grad_(True)
    _, loss, info = quantizer.train()(z_flat.T.reshape(1, 2, 1, 16))
    assert info['indices'].flatten()[-1] == 2 and not torch.allclose(quantizer.embedding[2], before[2])  # restarted
    loss.backward()
    # the same loss written out on the codes from before the step
    unit_z, indices = F.normalize(z_flat, dim=1), info['indices'].flatten()
    codes = F.normalize(before, dim=1)[indices]
    reference = ((codes - unit_z) ** 2).mean() + 0.25 * ((unit_z - codes.detach()) ** 2).mean()
    expected, = torch.autograd.grad(reference, before)
    assert expected[2].abs().sum() > 0 and torch.allclose(quantizer.embedding.grad, expected, atol=1e-6)


def test_perplexity_and_usage():
    quantizer = VectorQuantizer(4, 2, codebook='loss').eval()
    with torch.no_grad():
        quantizer.embedding.copy_(torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]]))
    uniform = quantizer.embedding.clone().T.reshape(1, 2, 1, 4)
    _, _, info = quantizer(uniform)
    assert abs(info['perplexity'].item() - 4.0) < 1e-4 and info['usage'].item() == 1.0
    _, _, info = quantizer(uniform[..., :1].expand(1, 2, 1, 4))
    assert abs(info['perplexity'].item() - 1.0) < 1e-4 and info['usage'].item() == 0.25


def test_l2_normalised_lookup_picks_the_closest_direction():
    quantizer = VectorQuantizer(3, 2, codebook='loss', l2_normalize=True).eval()
    with torch.no_grad():
        quantizer.embedding.copy_(torch.tensor([[10.0, 0.0], [0.0, 0.1], [-1.0, -1.0]]))
    z = torch.tensor([[0.1, 5.0], [3.0, 0.2]]).T.reshape(1, 2, 1, 2)   # short vector along x, long along y
    z_q, loss, info = quantizer(z)
    assert info['indices'].flatten().tolist() == [1, 0]                 # direction decides, not length
    assert torch.allclose(z_q.norm(dim=1), torch.ones(1, 2))
    # the loss compares unit vectors: (1 + beta) * mean ||z/|z| - e/|e|||^2
    unit_z = z / z.norm(dim=1, keepdim=True)
    assert torch.allclose(loss, 1.25 * ((unit_z - z_q) ** 2).mean(), atol=1e-6)


def test_vq_decoder_absorbs_the_quantiser():
    """decode() quantises: latents that round to the same codes decode to the same image (LDM's VQ-reg.)."""
    ae = create_autoencoder('tiny-vq').eval()
    z = ae.encode(images())
    _, _, info = ae.quantizer(z)
    codes = ae.quantizer.codes()[info['indices']].permute(0, 3, 1, 2)
    assert not torch.allclose(z, codes)                               # diffusion sees continuous latents
    assert torch.allclose(ae.decode(z), ae.decoder(ae.post_quant_conv(codes)), atol=1e-5)
    assert torch.allclose(ae.decode(z), ae.decode(codes), atol=1e-5)


# ----------------------------------------------------------------------------
# Adversarial training

def test_hinge_loss_closed_form():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1
    assert abs(hinge_d_loss(real, fake).item() - 0.5 * (2.5 / 3 + 3 / 3)) < 1e-6


def test_adaptive_weight_is_tamings_with_delta_and_clamp():
    """taming's calculate_adaptive_weight: ||grad L_rec|| / (||grad L_G|| + 1e-4), clamped to [0, 1e4], detached.
    Linear last layer x_hat = W h and linear critic D(x) = a.x: both gradients at W are known in closed form; the
    critic is weak (||grad L_G|| ~ 1e-3), so delta 1e-6 instead of 1e-4 moves lambda by about 10%."""
    g = torch.Generator().manual_seed(0)
    h, x, a = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g), 1e-3 * torch.randn(3, generator=g)
    W = torch.randn(3, 4, generator=g, requires_grad=True)
    x_hat = h @ W.T
    rec, g_loss = (x_hat - x).abs().mean(), -(x_hat @ a).mean()
    rec_grad = torch.sign(x_hat - x).T @ h / x.numel()               # d mean|x_hat - x| / dW
    g_grad = -a[:, None] * h.mean(0)[None]                           # d(-mean a.W h) / dW
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    weight = adaptive_weight(rec, g_loss, W)
    assert torch.allclose(weight, expected.detach(), rtol=1e-5) and not weight.requires_grad
    # a critic without gradient: ||grad 10 L_rec|| / 1e-4 > 1e4, clamped to 1e4
    assert 10 * rec_grad.norm() / 1e-4 > 1e4 and adaptive_weight(10 * rec, 0 * g_loss, W).item() == 1e4


def discriminator_without_gradient(loss_fn):
    with torch.no_grad():                                            # a constant critic: grad L_G = 0
        loss_fn.discriminator.main[-1].weight.zero_()
    return loss_fn


@pytest.mark.parametrize('kind', ['kl', 'vq'])
def test_generator_loss_uses_the_adaptive_weight_from_disc_start(kind):
    """Eq. 7 by hand at the decoder's last layer. KL (LDM's contperceptual.py): lambda of the loss summed over the
    C*H*W elements, clamped there, then divided by C*H*W; VQ (taming's vqperceptual.py): of the mean loss."""
    ae = create_autoencoder(f'tiny-{kind}')
    loss_fn = AutoencoderLoss(kind, disc_weight=0.5, disc_start=10, disc_channels=8, disc_layers=2)
    x = images(size=32)
    x_hat, reg_loss, _ = ae(x)
    reg_weight, elements = (1e-6, x[0].numel()) if kind == 'kl' else (1.0, 1)
    reg = reg_weight * (reg_loss.mean() / x[0].numel() if kind == 'kl' else reg_loss)
    loss, logs = loss_fn.generator_loss(x, x_hat, reg_loss, step=9, last_layer=ae.last_layer())
    assert 'gan_weight' not in logs                                  # before disc_start: L1 + KL only
    assert torch.allclose(loss, (x - x_hat).abs().mean() + reg)
    loss, logs = loss_fn.generator_loss(x, x_hat, reg_loss, step=10, last_layer=ae.last_layer())
    rec = (x - x_hat).abs().mean()
    g_loss = -loss_fn.discriminator(x_hat).mean()
    grad_rec, = torch.autograd.grad(rec, ae.last_layer(), retain_graph=True)
    grad_g, = torch.autograd.grad(g_loss, ae.last_layer(), retain_graph=True)
    weight = 0.5 * (elements * grad_rec.norm() / (grad_g.norm() + 1e-4)).clamp(0, 1e4) / elements
    assert abs(logs['gan_weight'] - weight.item()) < 1e-5 * weight.item()
    assert torch.allclose(loss, rec + reg + weight * g_loss, rtol=1e-5)
    # the generator loss leaves the discriminator's weights without gradient
    loss.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())
    d_loss, _ = loss_fn.discriminator_loss(x, x_hat, step=10)
    d_loss.backward()
    assert ae.encoder.conv_in.weight.grad is not None and loss_fn.discriminator.main[0].weight.grad is not None
    # a critic without gradient: lambda = ||grad L_rec|| / 1e-4, where the reference code measures it; for KL the
    # clamp at 1e4 binds on LDM's summed loss (the weight is then 0.5e4 / (C*H*W), not 0.5e4 as on the mean loss)
    x_hat, reg_loss, _ = ae(x)
    grad_rec, = torch.autograd.grad((x - x_hat).abs().mean(), ae.last_layer(), retain_graph=True)
    _, logs = discriminator_without_gradient(loss_fn).generator_loss(x, x_hat, reg_loss, 10, ae.last_layer())
    weight = 0.5 * min(elements * grad_rec.norm().item() / 1e-4, 1e4) / elements
    assert abs(logs['gan_weight'] - weight) < 1e-5 * weight
    assert kind == 'vq' or elements * grad_rec.norm().item() / 1e-4 > 1e4


@pytest.mark.parametrize('name', ['tiny-kl', 'tiny-vq'])
def test_adaptive_weight_is_measured_at_the_decoders_last_layer(name):
    """VQGAN Eq. 7 compares gradients at "the last layer of the decoder": the layer that outputs the image, so the
    image is affine in its weight and the encoder does not see it. (Planted bug caught: last_layer() returning
    the decoder's first layer, conv_in, after which GroupNorm and SiLU make the image non-linear in it.)"""
    ae = create_autoencoder(name).eval()
    W = ae.last_layer()
    assert W.shape[0] == ae.config['in_channels']                   # it makes the image channels
    x, z = images(), torch.randn(2, ae.config['latent_channels'], 8, 8, generator=torch.Generator().manual_seed(3))
    step = 0.3 * W.detach().abs().mean() * torch.randn(W.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out, latents = [], []
        for k in range(3):                                           # W, W + step, W + 2 step
            out.append(ae.decode_raw(z))
            latents.append(ae.encode_raw(x))
            W.add_(step)
        W.sub_(3 * step)
    change = out[1] - out[0]
    assert change.abs().max() > 1e-3                                 # it moves the image ...
    assert torch.allclose(out[2] - out[0], 2 * change, atol=1e-5)    # ... affinely: nothing non-linear after it
    assert torch.equal(latents[1], latents[0])                       # a decoder layer


# ----------------------------------------------------------------------------
# Latent scale and checkpoints

@pytest.mark.parametrize('per_channel', [False, True])
def test_scale_factor_gives_unit_variance_latents(per_channel):
    ae = create_autoencoder('tiny-kl').eval()
    batches = [images(8, seed=s) for s in range(3)]
    ae.set_latent_scale(**compute_latent_scale(ae, batches, per_channel=per_channel))
    z = torch.cat([ae.encode(x) for x in batches])
    if per_channel:
        assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(2), atol=1e-4)
        assert torch.allclose(z.std((0, 2, 3), unbiased=False), torch.ones(2), atol=1e-4)
    else:
        assert abs(z.std(unbiased=False).item() - 1) < 1e-4 and ae.config['shift_factor'] == 0.0
    # decode() undoes the scaling: it sees the raw latent the decoder was trained on
    assert torch.allclose(ae.decode(z[:8]), ae.decode_raw(ae.encode_raw(batches[0])), atol=1e-5)


def test_sd_config_has_the_published_scale():
    assert vae.autoencoder_config('sd-kl-f8')['scale_factor'] == 0.18215


@pytest.mark.parametrize('name', ['tiny-kl', 'tiny-vq'])
def test_checkpoint_round_trip(tmp_path, name):
    ae = create_autoencoder(name)
    x = images()
    ae.train()(x)                                                    # moves VQ codes / usage buffers
    ae.eval().set_latent_scale(**compute_latent_scale(ae, [x], per_channel=True))
    path = tmp_path / 'ae.pt'
    torch.save(dict(autoencoder_config=ae.config, model=ae.state_dict()), path)
    loaded = vae.autoencoder_from_checkpoint(torch.load(path, weights_only=True))
    assert loaded.config == ae.config
    assert torch.equal(loaded.encode(x), ae.encode(x))
    assert torch.equal(loaded.decode(ae.encode(x)), ae.decode(ae.encode(x)))


def test_unknown_config_options_are_refused():
    with pytest.raises(TypeError, match='latent_chanels'):
        create_autoencoder('tiny-kl', latent_chanels=3)
    with pytest.raises(ValueError, match='sd-kl-f8'):
        create_autoencoder('kl-f16')
