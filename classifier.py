"""
A noise-conditional classifier p_phi(y | x, sigma), for classifier guidance and rejection sampling.

Paper: Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", arXiv:2105.05233, Sec. 4 and
App. C-D. The classifier is the downsampling half of the diffusion U-Net (the "encoder"), with the same residual
blocks, attention and timestep embedding, and an attention pooling at the lowest resolution that turns the
feature map into logits. It is trained with cross-entropy on *noised* images, drawn with the same noise
distribution as the diffusion model, so that at sampling time it can judge every intermediate x:

    L(phi) = E_{x0, y, sigma, noise} [ -log p_phi(y | c_in(sigma) (x0 + sigma noise), c_noise(sigma)) ]

Classifier guidance then shifts the denoiser by the gradient of its log-probability (ADM Alg. 1-2, written in
the sigma frame in guidance.ClassifierGuidance):

    D_s(x, sigma) = D(x, sigma) + s sigma^2 grad_x log p_phi(y | x, sigma)

The classifier sees exactly what the diffusion network sees: the input c_in(sigma) x and the noise level
c_noise(sigma) of the model's own parameterisation (diffusion.Diffusion), so one checkpoint of each fits
together. Attention pooling (ADM's AttentionPool2d, after CLIP, Radford et al. 2021, arXiv:2103.00020, Sec. 2.4):
the mean of the H*W feature vectors is prepended as a query token, a learned position embedding is added, one
multi-head attention layer runs, and the output at the query token is projected to the logits.

Tensor conventions: x (N, C, H, W) in the sigma frame; sigma (N,); logits (N, num_classes).
Usage:  clf = NoiseConditionalClassifier(3, 10); loss, sigma = classifier_loss(clf, diffusion, x0, y)
        guided = guidance.ClassifierGuidance(denoiser, classifier_log_prob(clf, diffusion), scale=2.0)
This file imports the U-Net's building blocks from unet.py (the classifier *is* its encoder half).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import Downsample, ResBlock, SpatialSelfAttention, feature_dtype, timestep_embedding


# ----------------------------------------------------------------------------------------------------
# Attention pooling: (N, C, H, W) -> (N, out_dim)

class AttentionPool2d(nn.Module):
    """Pool a feature map with one attention layer whose query is the mean token (CLIP Sec. 2.4; ADM's 'attention'
    pooling). Unlike global average pooling it can weight the pixels that matter for the class."""

    def __init__(self,
                 spatial_size,            # H = W of the feature map it pools
                 channels,                # C of the feature map
                 head_channels,           # channels per attention head
                 out_dim):                # width of the output (the number of classes)
        super().__init__()
        # A learned position per token (H*W pixels + the mean token), scaled like CLIP's initialisation.
        self.position = nn.Parameter(torch.randn(spatial_size ** 2 + 1, channels) / math.sqrt(channels))
        self.heads = max(channels // head_channels, 1)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, x):
        N, C, H, W = x.shape
        if H * W + 1 != self.position.shape[0]:
            raise ValueError(f'AttentionPool2d was built for {int(math.sqrt(self.position.shape[0] - 1))}^2 '
                             f'pixels, got {H}x{W}: build the classifier with the image size it will see')
        tokens = x.flatten(2).transpose(1, 2)                                  # (N, HW, C)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)      # (N, 1 + HW, C): the query first
        tokens = tokens + self.position.to(tokens.dtype)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))   # (N, heads, L, d)
        h = F.scaled_dot_product_attention(q[:, :, :1], k, v)                 # (N, heads, 1, d): only the query
        return self.proj(h.transpose(1, 2).flatten(2)[:, 0])                  # (N, out_dim)


# ----------------------------------------------------------------------------------------------------
# The classifier: the U-Net encoder half plus attention pooling (ADM's EncoderUNetModel)

class NoiseConditionalClassifier(nn.Module):
    """logits = Pool(Encoder(x; emb(noise_level))): p_phi(y | x, sigma) for classifier guidance (ADM Sec. 4)."""

    def __init__(self,
                 in_channels=3,               # channels of x
                 num_classes=10,              # classes it predicts
                 model_channels=32,           # channels at the first level (ADM's ImageNet classifier: 128)
                 channel_mult=(1, 2, 2),      # channels per level = model_channels * mult (ADM 64x64: 1,2,3,4)
                 num_res_blocks=1,            # residual blocks per level (ADM classifier: 2 at 64x64, 4 at 128)
                 attention_resolutions=(8,),  # resolutions with self-attention (ADM classifier: 32, 16, 8)
                 image_size=32,               # input size; fixes the pooling's position table
                 head_channels=32,            # channels per attention head (ADM: 64)
                 norm_groups=8,               # GroupNorm groups
                 dropout=0.0):                # dropout in the residual blocks
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, model_channels=model_channels,
                           channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                           attention_resolutions=tuple(attention_resolutions), image_size=image_size,
                           head_channels=head_channels, norm_groups=norm_groups, dropout=dropout)
        emb_dim = 4 * model_channels
        self.time_mlp = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        layers, ch, resolution = [], model_channels, image_size
        for level, mult in enumerate(channel_mult):                            # the U-Net's encoder, as in unet.py
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, mult * model_channels, emb_dim, dropout, True, norm_groups))
                ch = mult * model_channels
                if resolution in attention_resolutions:
                    layers.append(SpatialSelfAttention(ch, head_channels, norm_groups))
            if level != len(channel_mult) - 1:
                layers.append(Downsample(ch))
                resolution //= 2
        # The U-Net's bottleneck (ResBlock, attention, ResBlock), then pooling to the logits.
        layers += [ResBlock(ch, ch, emb_dim, dropout, True, norm_groups),
                   SpatialSelfAttention(ch, head_channels, norm_groups), ResBlock(ch, ch, emb_dim, dropout, True, norm_groups)]
        self.layers = nn.ModuleList(layers)
        self.out_norm = nn.GroupNorm(norm_groups, ch, eps=1e-6)
        self.pool = AttentionPool2d(resolution, ch, head_channels, num_classes)

    def forward(self, x, noise_level):
        """x: (N, C, H, W) network input (c_in x); noise_level: (N,) c_noise. Returns logits (N, num_classes)."""
        noise_level = torch.as_tensor(noise_level, device=x.device).expand(x.shape[0])
        dtype = self.time_mlp[0].weight.dtype                                # the network's own dtype
        features = timestep_embedding(noise_level, self.time_mlp[0].in_features, dtype=feature_dtype(dtype))
        emb = F.silu(self.time_mlp(features.to(dtype)))
        cond = dict(emb=emb)
        h = self.input_conv(x)
        for layer in self.layers:
            h = layer(h, cond)
        return self.pool(F.silu(self.out_norm(h)))


CLASSIFIER_CONFIGS = {
    # ~0.3M parameters: trains in minutes on a CPU at 28-32 px (MNIST, shapes)
    'micro': dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,)),
    # ADM's 64x64 ImageNet classifier, scaled to a 32 px input (ADM Table 11: width 128, depth 4 at 128 px)
    'adm-32': dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16, 8),
                   head_channels=64, norm_groups=32),
}


# ----------------------------------------------------------------------------------------------------
# Training on noised images and use as log p(y | x, sigma)

def classifier_inputs(diffusion, x, sigma):
    """What the diffusion network would see at (x, sigma): (c_in x, c_noise) of its parameterisation."""
    c_in = diffusion.preconditioning(sigma)[2]
    return c_in.reshape(-1, *([1] * (x.ndim - 1))) * x, diffusion.schedule.noise_level(sigma)


def classifier_loss(classifier, diffusion, x0, y, sigma=None, noise=None, generator=None):
    """Per-sample cross-entropy on noised images (ADM Sec. 4): x = x0 + sigma noise with sigma drawn from the
    diffusion's own training distribution, so the classifier is trained where the sampler will query it.
    Returns (loss (N,), sigma (N,))."""
    if sigma is None:
        sigma = diffusion.sample_sigma(x0.shape[0], generator)[0].to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x = x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * noise              # the sigma frame
    logits = classifier(*classifier_inputs(diffusion, x, sigma))
    return F.cross_entropy(logits.float(), y, reduction='none'), sigma


def classifier_log_prob(classifier, diffusion):
    """log p_phi(y | x, sigma) as a function (x, sigma) -> (N, num_classes): the interface of
    guidance.ClassifierGuidance. Gradients flow to x (the guidance takes grad_x of it)."""
    def log_prob(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        return F.log_softmax(classifier(*classifier_inputs(diffusion, x, sigma)).float(), dim=1)
    return log_prob


def clean_log_prob(classifier, diffusion):
    """log p_phi(y | x) of (nearly) clean samples, at the smallest noise level the diffusion model knows:
    the interface of guidance.rejection_sample, which re-estimates the condition of finished samples."""
    noisy = classifier_log_prob(classifier, diffusion)
    return lambda x: noisy(x, torch.full((x.shape[0],), float(diffusion.sigma_min), dtype=x.dtype, device=x.device))


@torch.no_grad()
def accuracy_by_noise_level(classifier, diffusion, x0, y, sigma_edges, generator=None):
    """Accuracy of the classifier on x0 noised at sigmas spread evenly in log sigma inside each bucket
    [sigma_edges[i], sigma_edges[i+1]]: the check that it beats chance where guidance will use it.
    Returns a list of (sigma_lo, sigma_hi, accuracy)."""
    out = []
    for lo, hi in zip(sigma_edges[:-1], sigma_edges[1:]):
        u = torch.rand(x0.shape[0], generator=generator)
        sigma = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x = x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * noise
        pred = classifier(*classifier_inputs(diffusion, x, sigma)).argmax(1)
        out.append((lo, hi, (pred == y).float().mean().item()))
    return out


if __name__ == '__main__':
    # Demo: two classes of 8x8 images (a bright left half or a bright right half) in [-1, 1]. A few hundred
    # steps of training on noised copies give a classifier that is near-perfect at low noise and falls to
    # chance (0.5) only at noise levels far above the signal, as the table shows.
    from diffusion import Diffusion
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    diffusion = Diffusion('edm', 'edm')

    def batch(n):
        y = torch.randint(2, (n,), generator=g)
        x0 = -torch.ones(n, 1, 8, 8)
        x0[y == 0, :, :, :4], x0[y == 1, :, :, 4:] = 1.0, 1.0
        return x0, y

    clf = NoiseConditionalClassifier(1, 2, model_channels=16, channel_mult=(1, 2), attention_resolutions=(),
                                     image_size=8, head_channels=16, norm_groups=4)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for step in range(200):
        x0, y = batch(64)
        loss = classifier_loss(clf, diffusion, x0, y, generator=g)[0].mean()
        opt.zero_grad(), loss.backward(), opt.step()
    x0, y = batch(512)
    print('sigma range       accuracy (chance 0.5)')
    for lo, hi, acc in accuracy_by_noise_level(clf, diffusion, x0, y, [0.002, 0.1, 1, 4, 16, 80], g):
        print(f'{lo:6.3f} - {hi:5.1f}    {acc:.3f}')
