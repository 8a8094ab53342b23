"""The FID Inception network (the TF 2015 graph as pytorch-fid ports it) and its weight file, from scratch.

Papers:
  Inception V3   Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision", arXiv:1512.00567
  FID            Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule", arXiv:1706.08500
                 (FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2}) of these 2048-d pool features, Eq. 6)
  IS             Salimans et al. 2016, "Improved Techniques for Training GANs", arXiv:1606.03498 (the 1008 logits)
  Clean resizing Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation"
                 (clean-fid), arXiv:2104.11222

The network is a feature extractor:  f = pool3(Inception(2 * resize_299(x) - 1)),  x in [0, 1]  ->  f in R^2048.
Every FID depends on resize_299, so its protocol is part of the score's name:
  'legacy' (default)  bilinear, no antialiasing: bit-identical to pytorch-fid's InceptionV3([3],
                      resize_input=True, normalize_input=True); the FIDs of DDPM, ADM, EDM and DiT use it  -> "FID"
  'clean'             PIL bicubic with antialiasing (Parmar et al. 2022)                                      -> "clean-FID"

Weights: the standard file pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release; the name carries its
sha256 prefix), loaded under its own key names. Found as: the path given > $FID_INCEPTION_WEIGHTS > torch hub's
checkpoint folder > a verified download; offline, the error says what to fetch and where to put it.

Speed: the default path does pytorch-fid's arithmetic bit for bit (on CPU its pooling runs channels-last: the same
numbers, ~1.1x faster). load_inception(fast=True), evaluate.py's default, adds NHWC convolutions with the batch norms
folded into them: ~1.5x pytorch-fid's speed on CPU, features within 1e-4 of its on features of scale ~1 (float32
rounding only: pytorch-fid run in NHWC differs from itself as much; benchmarks/speed.py, benchmarks/inception_parity.py).

Conventions: images (N, C, H, W) float in [0, 1], any size, C = 1 (repeated to RGB) or 3; features (N, 2048).
Usage:  model = load_inception()                           # or load_inception('path/to/file.pth', 'cuda')
        model = load_inception(fast=True)                  # NHWC, batch norm folded: ~1.5x faster, within 1e-4
        features = model(images)                           # (N, 2048); model(x, return_logits=True) adds (N, 1008)
        python inception.py                                # demo: resizing protocols, shapes, speed (no weights needed)
"""
import hashlib
import os
import pickle
import shutil
import sys
import tempfile
import time
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F

FID_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + FID_WEIGHTS_NAME
FID_WEIGHTS_SHA256_PREFIX = '6726825d'  # torch.hub convention: the name carries the sha256 prefix
FID_WEIGHTS_ENV = 'FID_INCEPTION_WEIGHTS'  # environment variable naming the weight file


# ----------------------------------------------------------------------------------------------------
# Resizing to the network's input size: "legacy" (pytorch-fid, the default) or "clean" (PIL-style antialiased)

def resize_images(x, size, mode='legacy'):
    """Resize float images (N, C, H, W) in [0, 1] to size x size.

    'legacy' : bilinear without antialiasing (align_corners=False), exactly what pytorch-fid does and
               what the TF FID code's resize amounts to: the protocol of the FIDs in papers (DDPM, ADM,
               EDM, DiT), and the default, so our FID can be compared with theirs.
    'clean'  : bicubic with an antialiasing filter whose support grows with the downscale factor, as
               PIL's Image.resize(BICUBIC) does per channel in float mode; Parmar et al. 2022 show that
               the aliasing of naive resizes moves FID by several points. torch's antialias=True kernel
               is a port of PIL's (a = -0.5); computed in float64, as PIL accumulates, it agrees
               with PIL to ~1e-7 (float32 rounding; in float32 the gap grows to ~1e-5). Scores made
               this way are clean-FID (Parmar et al.), NOT comparable with the FIDs of papers: at 32x32
               the features differ from pytorch-fid's by up to ~1 (of scale ~2.5).
    """
    if x.shape[-2:] == (size, size):
        return x  # both modes are the identity at the native size
    if mode == 'clean':
        y = F.interpolate(x.double(), size=(size, size), mode='bicubic', align_corners=False, antialias=True)
        return y.clamp(0, 1).to(x.dtype)  # bicubic overshoots at edges; keep the valid range (as clean-fid)
    if mode == 'legacy':
        return F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    raise ValueError(f"resize mode must be 'clean' or 'legacy', got {mode!r}")


# ----------------------------------------------------------------------------------------------------
# Inception V3, FID variant. It differs from the ImageNet classifier (torchvision's inception_v3) in:
#  1. 1008 output classes (the 2015 TF graph kept 8 unused ones), read only for the Inception Score;
#  2. the average-pool branch of blocks A, C and E_1 ignores the zero padding (TF's avg_pool does not
#     count padded cells: count_include_pad=False);
#  3. the last block (Mixed_7c, "E_2") pools its pool branch with max, not average, pooling;
#  4. input scaled to [-1, 1] (x * 2 - 1), no ImageNet mean/std normalization.
# Module names match the weight file's keys (e.g. 'Mixed_6b.branch7x7_2.conv.weight').

class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF's default) -> ReLU; after fold_batch_norm(), Conv (with bias) -> ReLU."""

    def __init__(self, in_channels, out_channels, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:  # None once folded into the convolution
            x = self.bn(x)
        return F.relu(x, inplace=True)  # in place: one activation buffer less per layer

    @torch.no_grad()
    def fold_batch_norm(self):
        """Fold the eval-mode BatchNorm into the convolution: one pass over the activations less per layer.

        BN(z) = gamma (z - mu) / sqrt(var + eps) + beta = s z + (beta - s mu), s = gamma / sqrt(var + eps),
        and z = W * x is linear in W, so BN(W * x) = (s W) * x + (beta - s mu) (Ioffe & Szegedy 2015,
        arXiv:1502.03167, Alg. 2 at inference). s, W and the bias are computed in float64 and rounded once, so
        the folded layer differs from the unfolded one by float32 rounding only. No longer a BatchNorm: the
        weights under the file's key names are gone from state_dict() (conv.bias appears instead).
        """
        bn = self.bn
        s = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        folded = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size, self.conv.stride,
                           self.conv.padding, bias=True, device=self.conv.weight.device)
        folded.weight.copy_(self.conv.weight.double() * s[:, None, None, None])
        folded.bias.copy_(bn.bias.double() - s * bn.running_mean.double())
        self.conv, self.bn = folded.requires_grad_(False), None


def pool_nhwc(pool, x, **kwargs):
    """Run a pooling function on x in channels-last layout and give the result back in x's layout.

    The numbers are the same in either layout (each output is the max, or the sum in the same order divided by
    the same count, of the same cells), but PyTorch's CPU kernels for NCHW pooling are not vectorised across
    channels: at 299x299 they take ~20% of the network's time, the NHWC ones ~2%. On CPU only (elsewhere the
    two copies would cost more than they save).
    """
    if x.device.type != 'cpu' or x.is_contiguous(memory_format=torch.channels_last):
        return pool(x, **kwargs)
    return pool(x.contiguous(memory_format=torch.channels_last), **kwargs).contiguous()


def avg_pool_3x3(x):
    # TF semantics: the mean over the in-image cells only (difference 2 in the list above).
    return pool_nhwc(F.avg_pool2d, x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def max_pool(x, kernel_size=3, stride=2, padding=0):
    return pool_nhwc(F.max_pool2d, x, kernel_size=kernel_size, stride=stride, padding=padding)


class InceptionA(nn.Module):
    """35x35 block (Szegedy Fig. 5): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Szegedy Fig. 10): strided 3x3 | 1x1->3x3->strided 3x3 | maxpool."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, b3d, max_pool(x)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorized 7x7 convolutions, 1x7 then 7x1 (Szegedy Fig. 6)."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1->strided 3x3 | 1x1->1x7->7x1->strided 3x3 | maxpool."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([b3, b7, max_pool(x)], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks, 1x3 and 3x1 side by side (Szegedy Fig. 7).

    pool='avg' for Mixed_7b (E_1), pool='max' for Mixed_7c (E_2), difference 3 of the FID network.
    """

    def __init__(self, in_channels, pool='avg'):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = avg_pool_3x3(x) if self.pool == 'avg' else max_pool(x, stride=1, padding=1)
        return torch.cat([b1, b3, b3d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception network: images in [0, 1] of any size -> 2048-d pool features (and logits).

    forward(x) returns the (N, 2048) features; forward(x, return_logits=True) returns
    (features, logits) with the (N, 1008) logits for the Inception Score, computed as the original IS
    code (and guided-diffusion's evaluator) does: pool features times the softmax layer's weight
    matrix, without its bias. The bias is in self.fc.bias for anyone who needs the full layer.
    """

    name = 'inception'  # metric names derive from this: FID for inception, FD_<name> otherwise
    feature_dim = 2048

    def __init__(self, resize='legacy', channels_last=False):
        super().__init__()
        self.resize = resize  # 'legacy' (pytorch-fid bilinear: the FID of papers) or 'clean' (clean-FID)
        self.channels_last = channels_last  # NHWC activations: faster, equal up to float32 rounding
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)  # 299 -> 149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)  # -> 147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)  # max pool -> 73
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)  # -> 71, max pool -> 35
        self.Mixed_5b = InceptionA(192, pool_features=32)  # -> 256 channels
        self.Mixed_5c = InceptionA(256, pool_features=64)  # -> 288
        self.Mixed_5d = InceptionA(288, pool_features=64)  # -> 288
        self.Mixed_6a = InceptionB(288)  # -> 768 channels at 17x17
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)  # -> 1280 channels at 8x8
        self.Mixed_7b = InceptionE(1280, pool='avg')  # -> 2048
        self.Mixed_7c = InceptionE(2048, pool='max')  # -> 2048
        self.fc = nn.Linear(2048, 1008)  # softmax layer of the TF graph, used only by the IS

    def forward(self, x, return_logits=False):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale (MNIST): the same image in R, G and B
        x = resize_images(x.float(), 299, self.resize)
        x = 2 * x - 1  # [0, 1] -> [-1, 1], the range the TF graph was trained on
        if self.channels_last:  # NHWC: oneDNN's fast CPU convolutions want it (~1.4x faster here),
            x = x.contiguous(memory_format=torch.channels_last)  # at the price of float32 rounding
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = max_pool(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        features = x.mean(dim=(2, 3))  # global average pool ("pool_3"), (N, 2048)
        if not return_logits:
            return features
        return features, features @ self.fc.weight.T  # (N, 1008), no bias: see the class docstring

    def fold_batch_norm(self):
        """Fold every BatchNorm into its convolution (BasicConv2d.fold_batch_norm); eval mode only."""
        for module in self.modules():
            if isinstance(module, BasicConv2d) and module.bn is not None:
                module.fold_batch_norm()
        return self


# ----------------------------------------------------------------------------------------------------
# Finding, downloading and loading the weight file

def sha256_of(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def default_cache_dir():
    """torch.hub's checkpoint folder, where pytorch-fid also caches this file (so it is reused)."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints')


def weights_help(searched):
    return (f"FID Inception weights not found (looked in: {', '.join(searched)}).\n"
            f"Download {FID_WEIGHTS_URL}\n"
            f"(about 91 MB, sha256 starts with {FID_WEIGHTS_SHA256_PREFIX}) and either pass "
            f"--inception-weights PATH, set {FID_WEIGHTS_ENV}=PATH, or put it in {default_cache_dir()}/.")


def find_inception_weights(path=None, download=True, cache_dir=None):
    """Return the path of the weight file: argument > $FID_INCEPTION_WEIGHTS > cache > download."""
    cache_dir = cache_dir or default_cache_dir()
    candidates = [p for p in (path, os.environ.get(FID_WEIGHTS_ENV)) if p]
    candidates.append(os.path.join(cache_dir, FID_WEIGHTS_NAME))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    if path:  # an explicit path that does not exist is a mistake, not a reason to download
        raise FileNotFoundError(f'--inception-weights {path} does not exist.\n' + weights_help(candidates))
    if not download:
        raise FileNotFoundError(weights_help(candidates))
    target = candidates[-1]
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix='.part')  # renamed only once complete and verified
    try:
        with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(FID_WEIGHTS_URL, timeout=30) as response:
            print(f'downloading {FID_WEIGHTS_URL} to {target}', file=sys.stderr)
            shutil.copyfileobj(response, out)
        digest = sha256_of(tmp)
        if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
            raise RuntimeError(f'downloaded file has sha256 {digest}, expected prefix {FID_WEIGHTS_SHA256_PREFIX} '
                               '(corrupted or replaced download); nothing was saved.\n' + weights_help(candidates))
        os.replace(tmp, target)
        return target
    except OSError as e:  # offline (URLError is an OSError) or disk trouble
        raise FileNotFoundError(f'could not download the weights ({e}).\n' + weights_help(candidates)) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_state_dict(state, model, source):
    """Compare a loaded state dict with the model's: same keys, same shapes, or a clear error.

    BatchNorm's num_batches_tracked counters are optional (unused in eval mode; files written by old
    PyTorch versions lack them).
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f'{source} is not a state dict of tensors; expected the FID Inception weight file '
                         f'{FID_WEIGHTS_NAME} ({FID_WEIGHTS_URL}).')
    expected = {k: v.shape for k, v in model.state_dict().items()}
    optional = {k for k in expected if k.endswith('num_batches_tracked')}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k])
    if missing or unexpected or wrong_shape:
        lines = [f'{source} is not the FID Inception weight file {FID_WEIGHTS_NAME}:']
        for label, keys in (('missing keys', missing), ('unexpected keys', unexpected)):
            if keys:
                lines.append(f'  {len(keys)} {label}, e.g. {keys[:3]}')
        for k in wrong_shape[:3]:
            lines.append(f'  {k}: shape {tuple(state[k].shape)} in file, {tuple(expected[k])} expected')
        lines.append(f'Get the right file from {FID_WEIGHTS_URL}')
        raise ValueError('\n'.join(lines))


def load_inception(path=None, device='cpu', resize='legacy', download=True, channels_last=False, fast=False):
    """The FID Inception network in eval mode on `device`, weights from `path` (see find_inception_weights).

    model(x) maps (N, 3, H, W) floats in [0, 1] to (N, 2048); model(x, return_logits=True) adds the
    1008 logits. resize='legacy' (default) is pytorch-fid's bilinear resize, the protocol of published
    FIDs; resize='clean' gives clean-FID features (antialiased bicubic, Parmar et al. 2022).
    The default gives pytorch-fid's features bit for bit. fast=True (what evaluate.py uses) is channels_last
    plus every BatchNorm folded into its convolution: ~1.5x faster on CPU, features within 1e-4 (relative to
    their scale) of pytorch-fid's (float32 rounding; tests/test_inception.py, benchmarks/speed.py). channels_last=True alone
    is ~1.35x. Measured and left out: torch.compile (+4% on CPU after a ~3-minute compile).
    """
    channels_last = channels_last or fast
    path = find_inception_weights(path, download=download)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated download, an HTML error page saved as .pth, a pickle of code
        reason = ('not tensors written by torch.save' if isinstance(e, pickle.UnpicklingError)  # torch's own text
                  else f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')  # suggests weights_only=False
        raise ValueError(f'could not read {path} as a PyTorch weight file ({reason}); it is truncated or another '
                         f'kind of file.\nDownload it again from {FID_WEIGHTS_URL}') from None
    with torch.device('meta'):  # shapes only: skip a 24M-parameter random init that would be overwritten
        model = FIDInceptionV3(resize=resize, channels_last=channels_last)
    check_state_dict(state, model, path)
    for key in model.state_dict():
        state.setdefault(key, torch.zeros((), dtype=torch.long))  # the optional BatchNorm counters
    model.load_state_dict(state, assign=True)  # take the file's tensors as the module's parameters
    if fast:
        model.fold_batch_norm()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return model.eval().requires_grad_(False).to(device, memory_format=memory_format)


# ----------------------------------------------------------------------------------------------------

if __name__ == '__main__':
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)  # two CIFAR-sized images in [0, 1]
    # 1. The two protocols: legacy is pytorch-fid's bilinear resize exactly; clean differs from it visibly.
    legacy, clean = resize_images(x, 299), resize_images(x, 299, 'clean')
    bilinear = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    print(f'default resize == pytorch-fid bilinear: {torch.equal(legacy, bilinear)}; '
          f'max |clean - legacy| = {(clean - legacy).abs().max():.3f} (inputs in [0, 1])')
    # 2. The network: real weights if they are on this machine (no download here), else random ones.
    try:
        model, source = load_inception(download=False), 'the FID weight file'
    except FileNotFoundError:
        model, source = FIDInceptionV3().eval().requires_grad_(False), 'random weights (no weight file found)'
    t0 = time.perf_counter()
    with torch.no_grad():
        features, logits = model(x, return_logits=True)
    print(f'{source}: features {tuple(features.shape)}, logits {tuple(logits.shape)}, '
          f'{(time.perf_counter() - t0) / len(x):.2f} s per image on {torch.get_num_threads()} CPU thread(s)')
    print(f'features are means of ReLU outputs, so >= 0: {bool((features >= 0).all())}')
