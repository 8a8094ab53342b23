"""LPIPS, the learned perceptual distance (VGG variant), and its two weight files, from scratch.

Paper:
  Zhang, Isola, Efros, Shechtman & Wang 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
  Metric", arXiv:1801.03924 (LPIPS v0.1; the reference code is the `lpips` package, richzhang/PerceptualSimilarity)
  Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale Image Recognition", arXiv:1409.1556
  (VGG16, configuration D)

The distance (Zhang et al. Eq. 1), with y^l the VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3:

    y_hat^l_hw = y^l_hw / ||y^l_hw||_2          unit length ALONG CHANNELS, at each position h, w  (Sec. 3, Fig. 3)
    d(x, x0)   = sum_l 1/(H_l W_l) sum_hw || w_l * (y_hat^l_hw - y_hat0^l_hw) ||_2^2                (Eq. 1)

w_l >= 0 is one learned weight per channel (a 1x1 conv to one output, "lin" in the reference code). Before VGG the
reference's ScalingLayer maps [-1, 1] inputs to ImageNet-normalised ones, (x - shift) / scale. The latent
diffusion autoencoders (VQGAN, LDM) add this distance to their L1 reconstruction loss; vae.AutoencoderLoss takes
the module made here as its `perceptual` argument.

Weights: torchvision's VGG16 file (vgg16-397923af.pth, its name carries the sha256 prefix) and the LPIPS v0.1
linear heads (vgg.pth, the copy VQGAN's training code downloads; md5 checked). Found as: the folder given >
$LPIPS_WEIGHTS_DIR > torch hub's checkpoint folder > a verified download; offline, the error says what to fetch.

Conventions: images (N, C, H, W) float in [-1, 1] (the reference's default, normalize=False), C = 1 (repeated to
RGB) or 3, H and W at least 16; output (N,) distances.
Usage:  lpips = load_lpips()                     # or load_lpips('folder/with/both/files', 'cuda')
        d = lpips(x, x_hat)                      # (N,)
        python lpips.py                          # demo: a distance on random weights if the files are absent
"""
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request

import torch
import torch.nn as nn

LPIPS_FILES = {
    'vgg16-397923af.pth': dict(url='https://download.pytorch.org/models/vgg16-397923af.pth',
                               hash='sha256', prefix='397923af', size='528 MB'),
    'vgg.pth': dict(url='https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1',
                    hash='md5', prefix='d507d7349b931f0638a25a48a722f98a', size='7 KB'),
}
LPIPS_ENV = 'LPIPS_WEIGHTS_DIR'                                         # environment variable naming the folder
VGG16_CFG = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512]  # config D
VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)      # torchvision vgg16.features conv layers
VGG_TAPS = (3, 8, 15, 22, 29)                                          # relu1_2 ... relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)


# ----------------------------------------------------------------------------
# The network

def normalize_channels(h, eps=1e-10):
    """y_hat = y / ||y||_2 over the channel axis, at each position (the reference's normalize_tensor)."""
    return h / (h.pow(2).sum(1, keepdim=True).sqrt() + eps)             # (N, C, H, W) / (N, 1, H, W)


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1: a frozen network, inputs in [-1, 1], output (N,) distances (Eq. 1)."""

    def __init__(self):
        super().__init__()
        layers, width = [], 3
        for v in VGG16_CFG:                 # the layer indices match torchvision's vgg16.features keys
            if v == 'M':
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(width, v, 3, padding=1), nn.ReLU(inplace=False)]
                width = v
        self.features = nn.Sequential(*layers)
        # w_l of Eq. 1: one weight per channel, a 1x1 conv without bias (the reference's NetLinLayer)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        # The reference's ScalingLayer: [-1, 1] inputs to ImageNet-normalised ones
        self.register_buffer('shift', torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer('scale', torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)

    def taps(self, x):
        """The unit-normalised activations y_hat^l at the five taps, a list of (N, C_l, H_l, W_l)."""
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG_TAPS:
                out.append(normalize_channels(h))
        return out

    def forward(self, x, x_hat):
        if x.shape[1] == 1:
            x, x_hat = x.expand(-1, 3, -1, -1), x_hat.expand(-1, 3, -1, -1)
        # Eq. 1: the weighted squared difference summed over channels (the 1x1 conv), averaged over positions
        return sum(lin((a - b) ** 2).mean((1, 2, 3)) for lin, a, b in zip(self.lins, self.taps(x), self.taps(x_hat)))


# ----------------------------------------------------------------------------
# The weight files: find, download, verify, load

def file_digest(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def default_cache_dir():
    """torch.hub's checkpoint folder, where torchvision also caches vgg16-397923af.pth."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints')


def lpips_help(searched):
    lines = [f"LPIPS weights not found (looked in: {', '.join(searched)}). Download"]
    lines += [f"  {info['url']}  ->  {name}  ({info['size']}, {info['hash']} starts with {info['prefix']})"
              for name, info in LPIPS_FILES.items()]
    lines.append(f'into one folder and pass it (--lpips DIR), set {LPIPS_ENV}=DIR, or use {default_cache_dir()}/; '
                 'or train without the perceptual term (L1 + GAN).')
    return '\n'.join(lines)


def find_lpips_weights(weights_dir=None, download=True):
    """Folder holding both LPIPS files: argument > $LPIPS_WEIGHTS_DIR > torch hub cache > download (checked)."""
    candidates = [d for d in (weights_dir, os.environ.get(LPIPS_ENV)) if d] + [default_cache_dir()]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, name)) for name in LPIPS_FILES):
            return folder
    if weights_dir or not download:  # an explicit folder that lacks the files is a mistake, not a reason to download
        raise FileNotFoundError(lpips_help(candidates))
    folder = candidates[-1]
    os.makedirs(folder, exist_ok=True)
    for name, info in LPIPS_FILES.items():
        target = os.path.join(folder, name)
        if os.path.isfile(target):
            continue
        fd, tmp = tempfile.mkstemp(dir=folder, suffix='.part')  # renamed only once complete and verified
        try:
            with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(info['url'], timeout=30) as response:
                print(f"downloading {info['url']} to {target}", file=sys.stderr)
                shutil.copyfileobj(response, out)
            digest = file_digest(tmp, info['hash'])
            if not digest.startswith(info['prefix']):
                raise RuntimeError(f"downloaded {name} has {info['hash']} {digest}, expected {info['prefix']}...; "
                                   'nothing was saved.\n' + lpips_help(candidates))
            os.replace(tmp, target)
        except OSError as e:  # offline (URLError is an OSError) or disk trouble
            raise FileNotFoundError(f'could not download {name} ({e}).\n' + lpips_help(candidates)) from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return folder


def load_lpips(weights_dir=None, device='cpu', download=True):
    """The frozen LPIPS-VGG network with both weight files checked key by key."""
    folder = find_lpips_weights(weights_dir, download)
    model = LPIPS()
    vgg = torch.load(os.path.join(folder, 'vgg16-397923af.pth'), map_location='cpu', weights_only=True)
    lin = torch.load(os.path.join(folder, 'vgg.pth'), map_location='cpu', weights_only=True)
    state = {f'features.{i}.{p}': vgg[f'features.{i}.{p}'] for i in VGG_CONV_INDICES for p in ('weight', 'bias')
             if f'features.{i}.{p}' in vgg}
    state.update({f'lins.{k}.weight': lin[f'lin{k}.model.1.weight'] for k in range(5) if f'lin{k}.model.1.weight' in lin})
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ValueError(f'LPIPS weight files in {folder} lack {sorted(missing)[:3]}...\n' + lpips_help([folder]))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------
# Demo: the distance grows with the noise added to an image (real weights if present, else random ones)

if __name__ == '__main__':
    torch.manual_seed(0)
    try:
        model, source = load_lpips(download=False), 'the LPIPS weight files'
    except FileNotFoundError:
        model, source = LPIPS().eval().requires_grad_(False), 'random weights (no weight files found)'
        for lin in model.lins:              # the published w_l are >= 0; random ones are made so too
            lin.weight.data.abs_()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    print(f'LPIPS-VGG with {source}: {sum(p.numel() for p in model.parameters()):,} parameters')
    with torch.no_grad():
        print(f'd(x, x) = {model(x, x).tolist()} (exactly 0); d(x, y) = d(y, x): '
              f'{torch.allclose(model(x, x.flip(0)), model(x.flip(0), x))}')
        for noise in (0.03, 0.1, 0.3, 1.0):
            y = (x + noise * torch.randn_like(x)).clamp(-1, 1)
            print(f'noise std {noise:4.2f}: d = {model(x, y).mean().item():.4f}')
    h = normalize_channels(torch.randn(1, 8, 4, 4))
    unit = torch.allclose(h.norm(dim=1), torch.ones(1, 4, 4))
    print(f'normalised activations have unit length along channels at every position: {unit}')
