"""Tests for vae.py: the KL term, the VQ quantiser (straight-through, EMA, restarts, absorbed into the decoder),
VQGAN's adaptive weight, the latent scale, checkpoints, and the Stable Diffusion VAE loaders."""
import math

import pytest
import torch
import torch.nn as nn

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


def test_adaptive_weight_against_closed_form_gradients():
    """Linear last layer x_hat = W h and linear critic D(x) = a.x: both gradients at W are known in closed form."""
    g = torch.Generator().manual_seed(0)
    h, x, a = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g), torch.randn(3, generator=g)
    W = torch.randn(3, 4, generator=g, requires_grad=True)
    x_hat = h @ W.T
    rec, g_loss = (x_hat - x).abs().mean(), -(x_hat @ a).mean()
    rec_grad = torch.sign(x_hat - x).T @ h / x.numel()               # d mean|x_hat - x| / dW
    g_grad = -a[:, None] * h.mean(0)[None]                           # d(-mean a.W h) / dW
    expected = rec_grad.norm() / (g_grad.norm() + 1e-6)
    assert torch.allclose(adaptive_weight(rec, g_loss, W), expected.detach(), rtol=1e-5)


def test_generator_loss_uses_the_adaptive_weight_from_disc_start():
    ae = create_autoencoder('tiny-kl')
    loss_fn = AutoencoderLoss('kl', disc_weight=0.5, disc_start=10, disc_channels=8, disc_layers=2)
    x = images(size=32)
    x_hat, kl, _ = ae(x)
    loss, logs = loss_fn.generator_loss(x, x_hat, kl, step=9, last_layer=ae.last_layer())
    assert 'gan_weight' not in logs                                  # before disc_start: L1 + KL only
    assert torch.allclose(loss, (x - x_hat).abs().mean() + 1e-6 * kl.mean() / x[0].numel())
    loss, logs = loss_fn.generator_loss(x, x_hat, kl, step=10, last_layer=ae.last_layer())
    rec = (x - x_hat).abs().mean()
    g_loss = -loss_fn.discriminator(x_hat).mean()
    # Eq. 7 by hand: gradient norms of the two losses at the decoder's last layer
    grad_rec, = torch.autograd.grad(rec, ae.last_layer(), retain_graph=True)
    grad_g, = torch.autograd.grad(g_loss, ae.last_layer(), retain_graph=True)
    weight = 0.5 * grad_rec.norm() / (grad_g.norm() + 1e-6)
    assert abs(logs['gan_weight'] - weight.item()) < 1e-5 * weight.item()
    assert torch.allclose(loss, rec + 1e-6 * kl.mean() / x[0].numel() + weight * g_loss, rtol=1e-5)
    # the generator loss leaves the discriminator's weights without gradient
    loss.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())
    d_loss, _ = loss_fn.discriminator_loss(x, x_hat, step=10)
    d_loss.backward()
    assert ae.encoder.conv_in.weight.grad is not None and loss_fn.discriminator.main[0].weight.grad is not None


def test_lpips_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv(vae.LPIPS_ENV, str(tmp_path))
    monkeypatch.setattr(vae, 'default_cache_dir', lambda: str(tmp_path / 'cache'))
    with pytest.raises(FileNotFoundError) as error:
        vae.find_lpips_weights(download=False)
    message = str(error.value)
    assert 'vgg16-397923af.pth' in message and 'vgg.pth' in message and 'L1 + GAN' in message


def test_lpips_loads_weight_files_and_is_a_distance(tmp_path):
    """Random weights saved under torchvision's and LPIPS's key names: d(x, x) = 0, d(x, y) > 0, symmetric."""
    reference = vae.LPIPS()
    vgg = {f'features.{i}.{p}': reference.features[i].state_dict()[p] for i in vae.VGG_CONV_INDICES
           for p in ('weight', 'bias')}
    vgg['classifier.0.weight'] = torch.zeros(2, 2)                    # torchvision's file also holds the classifier
    torch.save(vgg, tmp_path / 'vgg16-397923af.pth')
    torch.save({f'lin{k}.model.1.weight': torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))},
               tmp_path / 'vgg.pth')
    lpips = vae.load_lpips(str(tmp_path))
    x, y = images(2, 32), images(2, 32, seed=1)
    assert torch.all(lpips(x, x) == 0) and torch.all(lpips(x, y) > 0)
    assert torch.allclose(lpips(x, y), lpips(y, x))


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


# ----------------------------------------------------------------------------
# Stable Diffusion VAE loaders. The official layouts are written out here independently of vae.official_key,
# from the diffusers AutoencoderKL and LDM (ldm/modules/diffusionmodules/model.py) module trees.

def resnet_keys(prefix, cin, cout, shortcut_name):
    keys = {f'{prefix}.norm1.weight': (cin,), f'{prefix}.norm1.bias': (cin,),
            f'{prefix}.conv1.weight': (cout, cin, 3, 3), f'{prefix}.conv1.bias': (cout,),
            f'{prefix}.norm2.weight': (cout,), f'{prefix}.norm2.bias': (cout,),
            f'{prefix}.conv2.weight': (cout, cout, 3, 3), f'{prefix}.conv2.bias': (cout,)}
    if cin != cout:
        keys.update({f'{prefix}.{shortcut_name}.weight': (cout, cin, 1, 1), f'{prefix}.{shortcut_name}.bias': (cout,)})
    return keys


def diffusers_layout(ch, mult, nres, z, old_attention=False):
    widths, keys = [ch * m for m in mult], {}
    q, k, v, o = ('query', 'key', 'value', 'proj_attn') if old_attention else ('to_q', 'to_k', 'to_v', 'to_out.0')

    def mid(prefix, c):
        keys.update(resnet_keys(f'{prefix}.mid_block.resnets.0', c, c, 'conv_shortcut'))
        keys.update(resnet_keys(f'{prefix}.mid_block.resnets.1', c, c, 'conv_shortcut'))
        keys.update({f'{prefix}.mid_block.attentions.0.group_norm.weight': (c,),
                     f'{prefix}.mid_block.attentions.0.group_norm.bias': (c,)})
        for name in (q, k, v, o):
            keys.update({f'{prefix}.mid_block.attentions.0.{name}.weight': (c, c),
                         f'{prefix}.mid_block.attentions.0.{name}.bias': (c,)})

    keys.update({'encoder.conv_in.weight': (ch, 3, 3, 3), 'encoder.conv_in.bias': (ch,)})
    cin = ch
    for i, w in enumerate(widths):
        for j in range(nres):
            keys.update(resnet_keys(f'encoder.down_blocks.{i}.resnets.{j}', cin, w, 'conv_shortcut'))
            cin = w
        if i < len(widths) - 1:
            keys.update({f'encoder.down_blocks.{i}.downsamplers.0.conv.weight': (w, w, 3, 3),
                         f'encoder.down_blocks.{i}.downsamplers.0.conv.bias': (w,)})
    mid('encoder', widths[-1])
    keys.update({'encoder.conv_norm_out.weight': (widths[-1],), 'encoder.conv_norm_out.bias': (widths[-1],),
                 'encoder.conv_out.weight': (2 * z, widths[-1], 3, 3), 'encoder.conv_out.bias': (2 * z,),
                 'quant_conv.weight': (2 * z, 2 * z, 1, 1), 'quant_conv.bias': (2 * z,),
                 'post_quant_conv.weight': (z, z, 1, 1), 'post_quant_conv.bias': (z,),
                 'decoder.conv_in.weight': (widths[-1], z, 3, 3), 'decoder.conv_in.bias': (widths[-1],)})
    mid('decoder', widths[-1])
    cin = widths[-1]
    for i, w in enumerate(widths[::-1]):                              # up_blocks.0 is the deepest level
        for j in range(nres + 1):
            keys.update(resnet_keys(f'decoder.up_blocks.{i}.resnets.{j}', cin, w, 'conv_shortcut'))
            cin = w
        if i < len(widths) - 1:
            keys.update({f'decoder.up_blocks.{i}.upsamplers.0.conv.weight': (w, w, 3, 3),
                         f'decoder.up_blocks.{i}.upsamplers.0.conv.bias': (w,)})
    keys.update({'decoder.conv_norm_out.weight': (ch,), 'decoder.conv_norm_out.bias': (ch,),
                 'decoder.conv_out.weight': (3, ch, 3, 3), 'decoder.conv_out.bias': (3,)})
    return keys


def ldm_layout(ch, mult, nres, z):
    widths, keys = [ch * m for m in mult], {}

    def mid(prefix, c):
        keys.update(resnet_keys(f'{prefix}.mid.block_1', c, c, 'nin_shortcut'))
        keys.update(resnet_keys(f'{prefix}.mid.block_2', c, c, 'nin_shortcut'))
        keys.update({f'{prefix}.mid.attn_1.norm.weight': (c,), f'{prefix}.mid.attn_1.norm.bias': (c,)})
        for name in ('q', 'k', 'v', 'proj_out'):                      # 1x1 convs in LDM
            keys.update({f'{prefix}.mid.attn_1.{name}.weight': (c, c, 1, 1), f'{prefix}.mid.attn_1.{name}.bias': (c,)})

    keys.update({'encoder.conv_in.weight': (ch, 3, 3, 3), 'encoder.conv_in.bias': (ch,)})
    cin = ch
    for i, w in enumerate(widths):
        for j in range(nres):
            keys.update(resnet_keys(f'encoder.down.{i}.block.{j}', cin, w, 'nin_shortcut'))
            cin = w
        if i < len(widths) - 1:
            keys.update({f'encoder.down.{i}.downsample.conv.weight': (w, w, 3, 3),
                         f'encoder.down.{i}.downsample.conv.bias': (w,)})
    mid('encoder', widths[-1])
    keys.update({'encoder.norm_out.weight': (widths[-1],), 'encoder.norm_out.bias': (widths[-1],),
                 'encoder.conv_out.weight': (2 * z, widths[-1], 3, 3), 'encoder.conv_out.bias': (2 * z,),
                 'quant_conv.weight': (2 * z, 2 * z, 1, 1), 'quant_conv.bias': (2 * z,),
                 'post_quant_conv.weight': (z, z, 1, 1), 'post_quant_conv.bias': (z,),
                 'decoder.conv_in.weight': (widths[-1], z, 3, 3), 'decoder.conv_in.bias': (widths[-1],)})
    mid('decoder', widths[-1])
    cin = widths[-1]
    for i in reversed(range(len(widths))):                           # LDM: decoder.up.0 is the shallowest level
        w = widths[i]
        for j in range(nres + 1):
            keys.update(resnet_keys(f'decoder.up.{i}.block.{j}', cin, w, 'nin_shortcut'))
            cin = w
        if i > 0:
            keys.update({f'decoder.up.{i}.upsample.conv.weight': (w, w, 3, 3),
                         f'decoder.up.{i}.upsample.conv.bias': (w,)})
    keys.update({'decoder.norm_out.weight': (ch,), 'decoder.norm_out.bias': (ch,),
                 'decoder.conv_out.weight': (3, ch, 3, 3), 'decoder.conv_out.bias': (3,)})
    return keys


SMALL_SD = dict(channels=8, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4, norm_groups=4)


def random_state(layout_keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in layout_keys.items()}


@pytest.mark.parametrize('layout', ['diffusers', 'diffusers-old', 'ldm'])
def test_sd_loader_maps_every_official_key_of_the_full_config(layout):
    """The real sd-kl-f8 shapes (meta tensors: no memory): every key is used, none is missing."""
    args = (128, (1, 2, 4, 4), 2, 4)
    keys = ldm_layout(*args) if layout == 'ldm' else diffusers_layout(*args, old_attention=layout == 'diffusers-old')
    state = {k: torch.empty(shape, device='meta') for k, shape in keys.items()}
    with torch.device('meta'):
        model = create_autoencoder('sd-kl-f8')
    converted = vae.convert_official_state_dict(state, model)
    assert len(converted) == len(keys) == len(model.state_dict())
    assert sum(math.prod(s) for s in keys.values()) == 83_653_863   # diffusers AutoencoderKL's count for this config


def test_sd_loaders_agree_and_place_each_tensor():
    """The same numbers under diffusers names and LDM names give the same model; spot-check where tensors land."""
    diffusers_state = random_state(diffusers_layout(8, (1, 2, 4, 4), 2, 4))
    # the LDM dict holds the same numbers, renamed by hand for a few tensors whose placement is easy to get wrong
    ldm_keys = ldm_layout(8, (1, 2, 4, 4), 2, 4)
    ldm_state = random_state(ldm_keys, seed=1)
    pairs = {'decoder.up.3.block.0.conv1.weight': 'decoder.up_blocks.0.resnets.0.conv1.weight',   # deepest level
             'decoder.up.0.block.2.conv2.weight': 'decoder.up_blocks.3.resnets.2.conv2.weight',   # shallowest
             'decoder.up.1.block.0.nin_shortcut.weight': 'decoder.up_blocks.2.resnets.0.conv_shortcut.weight',
             'encoder.down.1.downsample.conv.weight': 'encoder.down_blocks.1.downsamplers.0.conv.weight',
             'encoder.mid.attn_1.proj_out.bias': 'encoder.mid_block.attentions.0.to_out.0.bias'}
    for ldm_key, diffusers_key in pairs.items():
        ldm_state[ldm_key] = diffusers_state[diffusers_key].clone()
    ldm_state['decoder.mid.attn_1.q.weight'] = diffusers_state['decoder.mid_block.attentions.0.to_q.weight'][:, :, None, None]
    from_diffusers = vae.load_sd_vae(diffusers_state, config=vae.autoencoder_config('sd-kl-f8', **SMALL_SD))
    from_ldm = vae.load_sd_vae({'first_stage_model.' + k: v for k, v in ldm_state.items()},
                               config=vae.autoencoder_config('sd-kl-f8', **SMALL_SD))
    assert torch.equal(from_diffusers.decoder.up[0].res[0].conv1.weight,
                       diffusers_state['decoder.up_blocks.0.resnets.0.conv1.weight'])
    for ldm_key, diffusers_key in pairs.items():
        assert torch.equal(from_ldm.state_dict()[_our_name(from_ldm, ldm_key, ldm_state)],
                           from_diffusers.state_dict()[_our_name(from_diffusers, diffusers_key, diffusers_state)])
    assert torch.equal(from_ldm.decoder.mid.attn.q.weight, from_diffusers.decoder.mid.attn.q.weight)
    assert from_ldm.config['scale_factor'] == 0.18215


def _our_name(model, official, state):
    """Which of our parameters holds the tensor stored under `official` (found by identity of values)."""
    matches = [k for k, v in model.state_dict().items() if v.shape == state[official].shape and torch.equal(v, state[official])]
    assert len(matches) == 1, (official, matches)
    return matches[0]


@pytest.mark.parametrize('damage', ['rename', 'drop', 'shape', 'extra'])
def test_sd_loader_rejects_wrong_state_dicts_clearly(damage):
    state = random_state(diffusers_layout(8, (1, 2, 4, 4), 2, 4))
    key = 'decoder.up_blocks.1.resnets.2.conv1.weight'
    if damage == 'rename':
        state['decoder.up_blocks.1.resnets.2.conv_1.weight'] = state.pop(key)
    elif damage == 'drop':
        del state[key]
    elif damage == 'shape':
        state[key] = state[key][:, :, :1, :1]
    else:
        state['decoder.extra.weight'] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        vae.load_sd_vae(state, config=vae.autoencoder_config('sd-kl-f8', **SMALL_SD))
    message = str(error.value)
    expected = {'rename': ('unexpected keys', 'conv_1'), 'drop': ('missing keys', key),
                'shape': ('wrong shapes', key), 'extra': ('unexpected keys', 'decoder.extra.weight')}[damage]
    assert all(part in message for part in expected), message


def test_safetensors_reader(tmp_path):
    """The file format: 8-byte little-endian header length, JSON header with dtype/shape/offsets, raw data."""
    import json
    import struct
    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor([1.5, -2.0], dtype=torch.float16)
    header = {'a': dict(dtype='F32', shape=[2, 3], data_offsets=[0, 24]),
              'b': dict(dtype='F16', shape=[2], data_offsets=[24, 28]), '__metadata__': {'format': 'pt'}}
    raw = json.dumps(header).encode()
    path = tmp_path / 'x.safetensors'
    path.write_bytes(struct.pack('<Q', len(raw)) + raw + a.numpy().tobytes() + b.numpy().tobytes())
    state = vae.read_safetensors(str(path))
    assert torch.equal(state['a'], a) and torch.equal(state['b'], b) and state['b'].dtype == torch.float16


def test_unknown_config_options_are_refused():
    with pytest.raises(TypeError, match='latent_chanels'):
        create_autoencoder('tiny-kl', latent_chanels=3)
    with pytest.raises(ValueError, match='sd-kl-f8'):
        create_autoencoder('kl-f16')
