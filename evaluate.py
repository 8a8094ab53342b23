"""Evaluating generative models: FID, KID, IS, precision/recall and memorization, from scratch.

Papers (equations quoted below):
  Inception V3     Szegedy et al. 2016, "Rethinking the Inception Architecture", arXiv:1512.00567
  FID              Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule", arXiv:1706.08500
  IS               Salimans et al. 2016, "Improved Techniques for Training GANs", arXiv:1606.03498
  KID              Binkowski et al. 2018, "Demystifying MMD GANs", arXiv:1801.01401
  Precision/recall Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric", arXiv:1904.06991
  Clean resizing   Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
                   Evaluation" (clean-fid), arXiv:2104.11222
  Memorization     Gu et al. 2023, "On Memorization in Diffusion Models", arXiv:2310.02664
                   (a sample is a copy when d(x, NN1) < d(x, NN2) / 3)

Key equations, for features f of real (r) and generated (g) images:
  FID   = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})               (Heusel Eq. 6)
  KID   = unbiased MMD^2 (Gretton et al. 2012) with k(x, y) = (x.y / d + 1)^3  (Binkowski, KID section)
  IS    = exp( E_x KL(p(y|x) || p(y)) )                                       (Salimans Sec. 4)
  prec. = share of generated f inside the k-NN ball of some real feature     (Kynkaanniemi Eq. 1-2)

Conventions: images are float tensors in [0, 1] (or uint8 in [0, 255]), shape (N, C, H, W), C = 1 or 3,
any size; features are (N, D) arrays; statistics are float64 numpy. The FID network is the TensorFlow
FID graph as ported to PyTorch by pytorch-fid; its weights are the standard file
`pt_inception-2015-12-05-6726825d.pth`, which this file loads under its own key names.

Usage:  python sample.py --ckpt runs/x/ckpt.pt -n 2000 --npz samples.npz   # samples of a checkpoint
        python evaluate.py samples.npz reference_folder/ --metrics fid,kid,is,pr
        python evaluate.py samples.npz ref_stats.npz      # cached statistics (--save-stats makes them)
        python evaluate.py --demo          # closed-form checks that need no weights
"""
import argparse
import glob
import hashlib
import math
import os
import shutil
import sys
import tempfile
import urllib.request

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

FID_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + FID_WEIGHTS_NAME
FID_WEIGHTS_SHA256_PREFIX = '6726825d'  # torch.hub convention: the name carries the sha256 prefix
FID_WEIGHTS_ENV = 'FID_INCEPTION_WEIGHTS'  # environment variable naming the weight file
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')


# ----------------------------------------------------------------------------------------------------
# Resizing to the network's input size: "clean" (PIL-style antialiased) or "legacy" (pytorch-fid)

def resize_images(x, size, mode='clean'):
    """Resize float images (N, C, H, W) in [0, 1] to size x size.

    'clean'  : bicubic with an antialiasing filter whose support grows with the downscale factor, as
               PIL's Image.resize(BICUBIC) does per channel in float mode; Parmar et al. 2022 show that
               the aliasing of naive resizes moves FID by several points. torch's antialias=True kernel
               is a port of PIL's (a = -0.5); computed in float64, as PIL accumulates, it agrees
               with PIL to ~1e-7 (float32 rounding; in float32 the gap grows to ~1e-5).
    'legacy' : bilinear without antialiasing (align_corners=False), exactly what pytorch-fid does, to
               compare with numbers in papers computed with pytorch-fid.
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
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF's default) -> ReLU."""

    def __init__(self, in_channels, out_channels, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)  # in place: one activation buffer less per layer


def avg_pool_3x3(x):
    # TF semantics: the mean over the in-image cells only (difference 2 in the list above).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


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
        return torch.cat([b3, b3d, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


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
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


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
        pooled = avg_pool_3x3(x) if self.pool == 'avg' else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
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

    def __init__(self, resize='clean', channels_last=False):
        super().__init__()
        self.resize = resize  # 'clean' (PIL bicubic, antialiased) or 'legacy' (pytorch-fid bilinear)
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
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        features = x.mean(dim=(2, 3))  # global average pool ("pool_3"), (N, 2048)
        if not return_logits:
            return features
        return features, features @ self.fc.weight.T  # (N, 1008), no bias: see the class docstring


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


def load_inception(path=None, device='cpu', resize='clean', download=True, channels_last=False):
    """The FID Inception network in eval mode on `device`, weights from `path` (see find_inception_weights).

    model(x) maps (N, 3, H, W) floats in [0, 1] to (N, 2048); model(x, return_logits=True) adds the
    1008 logits. resize='legacy' reproduces pytorch-fid's bilinear resize (for comparison with papers).
    The default layout gives pytorch-fid's features bit for bit; channels_last=True is ~1.4x faster
    on CPU and differs by float32 rounding in the convolutions (benchmarks/inception_parity.py).
    """
    path = find_inception_weights(path, download=download)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated download, an HTML error page saved as .pth, a pickle of code
        raise ValueError(f'could not read {path} as a PyTorch weight file ({e}).\n'
                         f'Download it again from {FID_WEIGHTS_URL}') from e
    with torch.device('meta'):  # shapes only: skip a 24M-parameter random init that would be overwritten
        model = FIDInceptionV3(resize=resize, channels_last=channels_last)
    check_state_dict(state, model, path)
    for key in model.state_dict():
        state.setdefault(key, torch.zeros((), dtype=torch.long))  # the optional BatchNorm counters
    model.load_state_dict(state, assign=True)  # take the file's tensors as the module's parameters
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return model.eval().requires_grad_(False).to(device, memory_format=memory_format)


# ----------------------------------------------------------------------------------------------------
# A small classifier as feature network (MNIST-like data, offline machines): FD_lenet, not FID

class LeNetFeatures(nn.Module):
    """LeNet-5-style CNN (LeCun et al. 1998) trained on the dataset itself; features = penultimate layer.

    Fréchet distances in its feature space are reported as FD_lenet: they are not comparable with FID.
    """

    name = 'lenet'

    def __init__(self, in_channels=1, num_classes=10, image_size=28, feature_dim=128, widths=(8, 16)):
        super().__init__()
        self.in_channels = in_channels  # 1 for MNIST; colour inputs are averaged to gray if 1
        self.image_size = image_size  # inputs are resized to this (antialiased)
        self.feature_dim = feature_dim  # width of the penultimate layer = dimension of the features
        self.conv1 = nn.Conv2d(in_channels, widths[0], 5, padding=2)  # LeNet-5 widths are (6, 16)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 5, padding=2)
        self.fc1 = nn.Linear(widths[1] * (image_size // 4) ** 2, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def forward(self, x, return_logits=False):
        x = x.float()
        if x.shape[1] != self.in_channels:  # gray <-> colour, so any sampler output can be scored
            x = x.mean(1, keepdim=True).expand(-1, self.in_channels, -1, -1)
        x = resize_images(x, self.image_size, 'clean')
        x = 2 * x - 1
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        features = F.relu(self.fc1(x.flatten(1)))
        return (features, self.fc2(features)) if return_logits else features


def train_classifier(images, labels, num_classes=10, steps=500, batch_size=128, lr=1e-3, seed=0):
    """Train LeNetFeatures on (N, C, H, W) images in [0, 1] (or uint8) and integer labels."""
    images, labels = to_unit_float(torch.as_tensor(images)), torch.as_tensor(labels).long()
    generator = torch.Generator().manual_seed(seed)
    model = LeNetFeatures(images.shape[1], num_classes, images.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        _, logits = model(images[idx], return_logits=True)
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# Images in, features out

def to_unit_float(x):
    """uint8 [0, 255] -> float [0, 1]; floats are taken to be in [0, 1] already."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def load_images(path, limit=None):
    """A folder of image files or an .npz (first array; NHWC or NCHW) -> uint8 tensor (N, C, H, W)."""
    if path.endswith('.npz'):
        with np.load(path) as data:
            key = next((k for k in ('images', 'samples', 'x', 'arr_0') if k in data), data.files[0])
            x = data[key][:limit]
        if x.ndim == 3:
            x = x[:, None]  # (N, H, W) gray
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)  # NHWC (the guided-diffusion reference batches) -> NCHW
        if x.dtype != np.uint8:  # floats: in [0, 1] or [-1, 1] (the data.py convention)
            x = (x + 1) / 2 if x.min() < 0 else x
            x = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(x))
    files = sorted(f for f in glob.glob(os.path.join(path, '**', '*'), recursive=True)
                   if f.lower().endswith(IMAGE_EXTENSIONS))[:limit]
    if not files:
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) found under {path}')
    arrays = [np.asarray(Image.open(f).convert('RGB')) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_labels(path):
    """Class labels stored beside the images in an .npz ('labels' or 'y'), else None.

    sample.py writes an empty 'labels' array for unconditional samples: that counts as no labels.
    """
    if not path.endswith('.npz'):
        return None
    with np.load(path) as data:
        key = next((k for k in ('labels', 'y') if k in data), None)
        return None if key is None or data[key].size == 0 else data[key].astype(np.int64)


def is_statistics_file(path):
    if not path.endswith('.npz'):
        return False
    with np.load(path) as data:
        return 'mu' in data and 'sigma' in data


@torch.no_grad()
def extract_features(images, model, batch_size=50, device='cpu', return_logits=False, progress=True):
    """Run `model` over images (tensor/array (N, C, H, W), uint8 or [0, 1]) in batches -> numpy (N, D)."""
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f'images must be (N, C, H, W), got shape {tuple(images.shape)}')
    feats, logits = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=f'{model.name} features', disable=not progress):
        x = to_unit_float(images[start:start + batch_size]).to(device)
        out = model(x, return_logits=return_logits)
        f, l = out if return_logits else (out, None)
        feats.append(f.double().cpu())
        if l is not None:
            logits.append(l.double().cpu())
    feats = torch.cat(feats).numpy()
    return (feats, torch.cat(logits).numpy()) if return_logits else feats


# ----------------------------------------------------------------------------------------------------
# Fréchet distance (Heusel et al. 2017, Eq. 6)

def feature_statistics(features):
    """mu (D,) and the unbiased covariance S (D, D) of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def clip_rounding_noise(eigvals):
    """Zero the eigenvalues below the rounding floor D * eps * max|w|: they are 0 up to float error.

    Without this, the ~1e-16 eigenvalues of a singular covariance become ~1e-8 after the square root
    and, summed over hundreds of null directions, bias FD(x, x) away from 0.
    """
    floor = len(eigvals) * np.finfo(np.float64).eps * np.abs(eigvals).max(initial=0.0)
    return np.where(eigvals > floor, eigvals, 0.0)


def trace_sqrt_product(sigma1, sigma2, method='eigh', eps=1e-6):
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2.

    'eigh' (default): S1 S2 is similar to the symmetric PSD matrix M = S1^{1/2} S2 S1^{1/2}
    (M = S1^{1/2} (S1 S2) S1^{-1/2}), so the trace is sum(sqrt(eig(M))), computed with symmetric
    eigensolvers only. Tiny negative eigenvalues from rounding are clipped to 0, which makes the
    result real and stable even for singular covariances (fewer samples than dimensions).
    'sqrtm': scipy's general matrix square root of S1 S2, as pytorch-fid and the TF code do; when
    the result is not finite, eps is added to both diagonals; imaginary parts from rounding are
    discarded after checking that they are small.
    """
    if method == 'eigh':
        w, V = scipy.linalg.eigh(sigma1)
        sqrt_sigma1 = (V * np.sqrt(clip_rounding_noise(w))) @ V.T  # S1^{1/2}, symmetric
        M = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
        eigvals = scipy.linalg.eigvalsh((M + M.T) / 2)  # symmetrize away rounding asymmetry
        return np.sqrt(clip_rounding_noise(eigvals)).sum()
    if method == 'sqrtm':
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():  # singular product: regularize (pytorch-fid's fallback)
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            imag = np.abs(np.diagonal(covmean).imag).max()
            if imag > 1e-3:  # a large imaginary part means the inputs are not covariances
                raise ValueError(f'matrix square root has imaginary component {imag:.3g}; '
                                 'are sigma1 and sigma2 symmetric positive semi-definite?')
            covmean = covmean.real
        return np.trace(covmean)
    raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")


def frechet_distance(mu1, sigma1, mu2, sigma2, method='eigh'):
    """d^2((mu1, S1), (mu2, S2)) = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})  (Eq. 6).

    The Fréchet (2-Wasserstein) distance between two Gaussians; FID when the statistics are of
    Inception pool features.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, '
                         f'mu2 {mu2.shape}, sigma2 {sigma2.shape}; expected (D,) and (D, D)')
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2, method)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------------
# Kernel Inception Distance (Binkowski et al. 2018)

def polynomial_kernel(X, Y, degree=3, coef0=1.0):
    """k(x, y) = (x.y / d + coef0)^degree, the kernel of the KID paper (d = feature dimension)."""
    return (X @ Y.T / X.shape[1] + coef0) ** degree


def mmd2_unbiased(X, Y, degree=3, coef0=1.0):
    """Unbiased MMD^2_u (Gretton et al. 2012, "A Kernel Two-Sample Test"): diagonals k(x_i, x_i) left out.

    MMD^2_u = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(n(n-1)) - 2 sum_{i,j} k(x_i,y_j)/(mn)
    X, Y: (m, d) and (n, d) arrays or tensors; computed in float64 with torch (whose matmul respects
    torch.set_num_threads, so it behaves on a busy machine).
    """
    X, Y = torch.as_tensor(np.asarray(X), dtype=torch.float64), torch.as_tensor(np.asarray(Y), dtype=torch.float64)
    m, n = len(X), len(Y)
    K_xx, K_yy, K_xy = (polynomial_kernel(A, B, degree, coef0) for A, B in ((X, X), (Y, Y), (X, Y)))
    mmd2 = ((K_xx.sum() - K_xx.diagonal().sum()) / (m * (m - 1))
            + (K_yy.sum() - K_yy.diagonal().sum()) / (n * (n - 1)) - 2 * K_xy.mean())
    return mmd2.item()


def kid(feats_a, feats_b, num_subsets=100, subset_size=1000, degree=3, coef0=1.0, seed=0):
    """KID: mean and standard deviation of MMD^2_u over random subsets (drawn without replacement).

    Unbiased, so its expectation is 0 for identical distributions whatever the sample size: this is
    why KID, unlike FID, can be compared across sample counts and is reliable at 1-2k samples.
    """
    feats_a = torch.as_tensor(np.asarray(feats_a), dtype=torch.float64)
    feats_b = torch.as_tensor(np.asarray(feats_b), dtype=torch.float64)
    m = min(subset_size, len(feats_a), len(feats_b))
    if m < 2:
        raise ValueError(f'KID needs at least 2 samples per set, got {len(feats_a)} and {len(feats_b)}')
    g = torch.Generator().manual_seed(seed)
    values = [mmd2_unbiased(feats_a[torch.randperm(len(feats_a), generator=g)[:m]],
                            feats_b[torch.randperm(len(feats_b), generator=g)[:m]], degree, coef0)
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------------------------------
# Inception Score (Salimans et al. 2016)

def inception_score(logits, splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction within each split; mean and std.

    Feed it the 1008 logits of FIDInceptionV3 (return_logits=True). Bounds: 1 (every prediction is the
    same) to the number of classes (confident and evenly spread predictions).
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    scores = []
    for part in torch.chunk(logits, splits):
        log_p_yx = F.log_softmax(part, dim=1)  # log p(y|x), (n, K)
        log_p_y = torch.logsumexp(log_p_yx, dim=0) - math.log(len(part))  # log of the marginal p(y), (K,)
        kl = (log_p_yx.exp() * (log_p_yx - log_p_y)).sum(1)  # KL(p(y|x) || p(y)) per image
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019)

def pairwise_distances(A, B, chunk=1024):
    """Euclidean distances (len(A), len(B)) in chunks, float64 for exact ties in the tests."""
    A, B = torch.as_tensor(np.asarray(A), dtype=torch.float64), torch.as_tensor(np.asarray(B), dtype=torch.float64)
    return torch.cat([torch.cdist(A[i:i + chunk], B) for i in range(0, len(A), chunk)])


def knn_radii(features, k=3):
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    d = pairwise_distances(features, features)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself at distance 0


def manifold_coverage(queries, support, k=3):
    """Share of queries inside the union of balls B(s, r_k(s)) around support points (Eq. 1-2)."""
    radii = knn_radii(support, k)  # (S,)
    inside = pairwise_distances(queries, support) <= radii[None, :]  # (Q, S)
    return inside.any(1).double().mean().item()


def precision_recall(real_features, fake_features, k=3):
    """Precision: generated samples on the real manifold; recall: real samples on the generated one."""
    return {'precision': manifold_coverage(fake_features, real_features, k),
            'recall': manifold_coverage(real_features, fake_features, k)}


# ----------------------------------------------------------------------------------------------------
# Memorization (small datasets overfit): nearest training neighbours of each sample

def nearest_neighbours(queries, reference, k=2):
    """Distances and indices of the k nearest reference rows for each query row (flattened)."""
    q = torch.as_tensor(np.asarray(queries)).flatten(1)
    r = torch.as_tensor(np.asarray(reference)).flatten(1)
    d = pairwise_distances(q, r)
    dist, idx = d.topk(k, dim=1, largest=False)
    return dist.numpy(), idx.numpy()


def memorization_check(samples, train, ratio=1 / 3, sample_features=None, train_features=None):
    """Flag samples whose nearest training neighbour is `ratio` times closer than the second (Gu et al.).

    Checked in pixel space and, if features are given, in feature space. Returns per space the share
    flagged, the flags, the distance ratios and the nearest index of each sample.
    """
    samples, train = to_unit_float(torch.as_tensor(samples)), to_unit_float(torch.as_tensor(train))
    if samples.shape[1:] != train.shape[1:]:
        raise ValueError(f'samples {tuple(samples.shape[1:])} and training images {tuple(train.shape[1:])} '
                         'must have the same (C, H, W) to be compared in pixel space; resize one of them first')
    spaces = {'pixel': (samples, train)}
    if sample_features is not None:
        spaces['feature'] = (sample_features, train_features)
    report = {}
    for space, (q, r) in spaces.items():
        dist, idx = nearest_neighbours(q, r, k=2)
        nn_ratio = dist[:, 0] / np.maximum(dist[:, 1], 1e-12)  # d(x, NN1) / d(x, NN2)
        flags = nn_ratio < ratio
        report[space] = {'share': float(flags.mean()), 'flags': flags, 'ratio': nn_ratio, 'nearest': idx[:, 0]}
    return report


def save_nearest_pairs(samples, train, nearest, ratio, path, num_pairs=16):
    """PNG grid of the closest (sample | nearest training image) pairs, closest first."""
    order = np.argsort(ratio)[:num_pairs]
    samples, train = to_unit_float(torch.as_tensor(samples)), to_unit_float(torch.as_tensor(train))
    pairs = [torch.cat([samples[i], train[nearest[i]]], dim=2) for i in order]  # side by side, (C, H, 2W)
    grid = torch.cat([F.pad(p, (2, 2, 2, 2), value=1.0) for p in pairs], dim=1)  # stacked vertically
    grid = grid.expand(3, -1, -1) if grid.shape[0] == 1 else grid
    Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()).save(path)


def loss_gap_report(train_losses, val_losses, window=5):
    """Training vs validation loss: a rising validation loss is a necessary sign of memorization.

    Returns the last gap (val - train) and the least-squares slope of the last `window` validation
    losses; 'val_rising' is True when that slope is positive.
    """
    val = np.asarray(val_losses[-window:], np.float64)
    slope = float(np.polyfit(np.arange(len(val)), val, 1)[0]) if len(val) > 1 else 0.0
    return {'gap': float(val_losses[-1] - train_losses[-1]), 'val_slope': slope, 'val_rising': slope > 0}


# ----------------------------------------------------------------------------------------------------
# Conditional models: the choice of conditions is part of the metric

CONDITION_MODES = ('fixed', 'uniform', 'data', 'real')


def choose_conditions(mode, n, num_classes=None, labels=None, fixed_class=0, seed=0):
    """Class labels for n generated samples.

    fixed   : every sample gets `fixed_class`;
    uniform : i.i.d. uniform over the classes;
    data    : i.i.d. from the class frequencies of `labels` (the data's label distribution);
    real    : the reference images' own labels, shuffled and repeated to n, so the class counts
              match the reference set exactly (no multinomial noise).
    """
    if mode not in CONDITION_MODES:
        raise ValueError(f'condition mode must be one of {CONDITION_MODES}, got {mode!r}')
    rng = np.random.RandomState(seed)
    if mode == 'fixed':
        return np.full(n, fixed_class, dtype=np.int64)
    if mode == 'uniform':
        return rng.randint(num_classes, size=n).astype(np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if mode == 'data':
        freq = np.bincount(labels, minlength=num_classes or 0) / len(labels)
        return rng.choice(len(freq), size=n, p=freq).astype(np.int64)
    return np.resize(rng.permutation(labels), n)  # 'real'


def per_class_fd(fake_feats, fake_labels, real_feats, real_labels):
    """Fréchet distance within each class present in both sets (noisy at few samples per class)."""
    scores = {}
    for c in np.intersect1d(np.unique(fake_labels), np.unique(real_labels)):
        f, r = fake_feats[fake_labels == c], real_feats[real_labels == c]
        if len(f) > 1 and len(r) > 1:
            scores[int(c)] = frechet_distance(*feature_statistics(f), *feature_statistics(r))
    return scores


# ----------------------------------------------------------------------------------------------------
# Reference statistics, computed once and cached

def statistics_cache_path(cache_dir, dataset, resolution, num_images, network='inception', resize='clean'):
    """One file per (dataset, resolution, sample count, network, resize mode)."""
    return os.path.join(cache_dir, f'{dataset}_{resolution}px_n{num_images}_{network}_{resize}.npz')


def compute_statistics(features, kid_features=10000, seed=0, network='inception', resize='clean'):
    """mu, sigma and a random subset of the features (float32) for KID and precision/recall.

    The network and resize mode are stored too: statistics are only comparable with features made
    the same way, and the command line refuses a mismatch.
    """
    mu, sigma = feature_statistics(features)
    keep = np.random.RandomState(seed).permutation(len(features))[:kid_features]
    return {'mu': mu, 'sigma': sigma, 'features': np.asarray(features, np.float32)[np.sort(keep)],
            'num_images': np.int64(len(features)), 'network': np.array(network), 'resize': np.array(resize)}


def check_statistics_match(stats, network, resize, source):
    for key, wanted in (('network', network), ('resize', resize)):
        if key in stats and str(stats[key]) != wanted:
            raise ValueError(f'{source} was computed with {key}={stats[key]}, but this run uses {key}={wanted}; '
                             f'scores across the two are not comparable. Use --{key} {stats[key]} or recompute.')


def save_statistics(path, stats):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp.npz'
    np.savez(tmp, **stats)
    os.replace(tmp, path)  # never leave a half-written cache file


def load_statistics(path):
    with np.load(path) as data:
        if 'mu' not in data or 'sigma' not in data:
            raise ValueError(f'{path} has no mu/sigma arrays (keys: {data.files}); it is not a statistics file')
        return {k: data[k] for k in data.files}


def cached_statistics(path, compute_features, **meta):
    """Load the statistics at `path`, or compute them with compute_features() once and save them.

    meta (network=, resize=) is recorded in a new file and checked against an existing one.
    """
    if os.path.isfile(path):
        stats = load_statistics(path)
        check_statistics_match(stats, meta.get('network', 'inception'), meta.get('resize', 'clean'), path)
        return stats
    stats = compute_statistics(compute_features(), **meta)
    save_statistics(path, stats)
    return stats


# ----------------------------------------------------------------------------------------------------
# Putting the metrics together, with the context printed next to every number

def compute_metrics(fake_feats, ref_stats, fake_logits=None, metrics=('fid', 'kid', 'is', 'pr'),
                    network='inception', kid_subset_size=1000):
    """The requested metrics of generated features against reference statistics (compute_statistics).

    Names follow the network: FID/KID for Inception, FD_<name>/KD_<name> for any other feature
    network, so a Frechet distance in LeNet features is never mistaken for FID. IS needs the logits.
    """
    fd_name = 'FID' if network == 'inception' else f'FD_{network}'
    results = {}
    if 'fid' in metrics:
        results[fd_name] = frechet_distance(*feature_statistics(fake_feats), ref_stats['mu'], ref_stats['sigma'])
    ref_feats = ref_stats.get('features')
    if 'kid' in metrics and ref_feats is not None:
        mean, std = kid(fake_feats, ref_feats, subset_size=kid_subset_size)
        results['KID' if network == 'inception' else f'KD_{network}'] = mean
        results['KID_std' if network == 'inception' else f'KD_{network}_std'] = std
    if 'is' in metrics and fake_logits is not None and network == 'inception':
        results['IS'], results['IS_std'] = inception_score(fake_logits)
    if 'pr' in metrics and ref_feats is not None:
        n = min(len(fake_feats), len(ref_feats), 10000)  # O(n^2) distances: cap the sample count
        results.update(precision_recall(ref_feats[:n], fake_feats[:n]))
    return results


@torch.no_grad()
def evaluate_generator(generate, ref_stats, model, num_samples=2000, batch_size=50, device='cpu',
                       metrics=('fid', 'kid'), progress=False):
    """Metrics of a sampler during training: generate(n) -> n images in [-1, 1] (data.py's range).

    Samples are quantized to 8 bits, as they would be when saved to PNG, so the score during training
    equals the one of the saved images. 2,000 samples make KID reliable and FID a trend; use 50,000
    for a headline FID. train.py calls this every N steps (see format_results for the labelling).
    """
    feats, logits = [], []
    want_logits = 'is' in metrics and model.name == 'inception'
    for start in range(0, num_samples, batch_size):
        x = generate(min(batch_size, num_samples - start))
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 255  # [-1, 1] -> 8-bit levels in [0, 1]
        out = extract_features(x, model, batch_size, device, return_logits=want_logits, progress=progress)
        feats.append(out[0] if want_logits else out)
        if want_logits:
            logits.append(out[1])
    fake_logits = np.concatenate(logits) if want_logits else None
    return compute_metrics(np.concatenate(feats), ref_stats, fake_logits, metrics, model.name)


def format_results(results, num_generated, num_reference, resize, reference_split, conditions=None,
                   headline_count=50000):
    """One line per metric with its context; FID on fewer than 50k samples is labelled as a trend."""
    context = (f'[resize={resize}, generated={num_generated}, reference={num_reference} '
               f'({reference_split})' + (f', conditions={conditions}' if conditions else '') + ']')
    lines = []
    for name, value in results.items():
        if name.endswith('_std'):
            continue
        text = f'{name:>10s} {value:.6g}'
        if name + '_std' in results:
            text += f' +- {results[name + "_std"]:.3g}'
        if name.startswith('F') and num_generated < headline_count:
            text += f'  (trend only: FD is biased upward at n={num_generated} < {headline_count})'
        lines.append(f'{text}  {context}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line

def demo():
    """Closed-form checks that need no weights: prints computed vs exact values."""
    rng = np.random.RandomState(0)
    d = 8
    s1, s2 = rng.rand(d) + 0.5, rng.rand(d) + 0.5
    mu1, mu2 = rng.randn(d), rng.randn(d)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()  # diagonal covariances
    print(f'FD of diagonal Gaussians: {frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)):.10f} '
          f'exact {exact:.10f}')
    a, b = rng.randn(2000, 16), rng.randn(2000, 16)
    print('KID of two samples of one Gaussian (expect ~0): %.2e +- %.1e' % kid(a, b, 20, 500))
    print('KID after shifting one by 1 in every dim (linear kernel, expect 1.0): %.3f'
          % kid(a, b + 1, 20, 500, degree=1)[0])
    print('IS of uniform logits (expect 1): %.4f; of one-hot logits over 10 classes (expect 10): %.4f'
          % (inception_score(np.zeros((100, 10)), 1)[0], inception_score(100 * np.eye(10)[np.arange(100) % 10], 1)[0]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='FID / KID / IS / precision-recall of generated images.')
    p.add_argument('generated', nargs='?', help='folder of images, .npz of generated samples, or a train.py checkpoint (.pt)')
    p.add_argument('reference', nargs='?', help='folder/.npz of reference images, or a statistics .npz')
    g = p.add_argument_group('feature network')
    g.add_argument('--network', default='inception', choices=['inception', 'lenet'],
                   help='inception (FID) or a small classifier trained on the data (FD_lenet)')
    g.add_argument('--inception-weights', default=None, help=f'path of {FID_WEIGHTS_NAME} '
                   f'(else ${FID_WEIGHTS_ENV}, else the torch hub cache, else download)')
    g.add_argument('--lenet-weights', default=None, help='state dict of a LeNetFeatures (for --network lenet)')
    g.add_argument('--resize', default='clean', choices=['clean', 'legacy'],
                   help='clean: PIL bicubic antialiased (new numbers); legacy: pytorch-fid bilinear (papers)')
    g.add_argument('--channels-last', action='store_true',
                   help='NHWC Inception: ~1.4x faster on CPU, equal to pytorch-fid up to float32 rounding')
    g.add_argument('--batch-size', type=int, default=50, help='images per forward pass')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    m = p.add_argument_group('metrics')
    m.add_argument('--metrics', default='fid,kid,is,pr', help='comma-separated subset of fid,kid,is,pr')
    m.add_argument('--num-gen', type=int, default=None, help='use at most this many generated images')
    m.add_argument('--num-ref', type=int, default=None, help='use at most this many reference images')
    m.add_argument('--reference-split', default=None, help='name of the reference split, printed with scores')
    m.add_argument('--conditions', default=None, choices=CONDITION_MODES,
                   help='how the classes of the generated samples were chosen (printed with the scores); '
                        'per-class scores are added when both .npz files hold labels')
    m.add_argument('--save-stats', default=None, help='write the reference statistics to this .npz')
    m.add_argument('--stats-cache', default=None, metavar='DIR',
                   help='cache reference statistics here, keyed by dataset, resolution, count, network, resize')
    m.add_argument('--memorization', default=None, help='folder/.npz of training images: nearest-neighbour check')
    m.add_argument('--pairs-png', default='nearest_pairs.png', help='where the memorization check saves pairs')
    s = p.add_argument_group('sampling a checkpoint (when GENERATED is a .pt file)')
    s.add_argument('--sampler', default='heun', help='a name in samplers.SAMPLERS')
    s.add_argument('--steps', type=int, default=18, help='noise levels of the Karras schedule')
    s.add_argument('--guidance', type=float, default=1.0, help='classifier-free guidance weight (1 = none)')
    s.add_argument('--class', dest='fixed_class', type=int, default=0, help='the class of --conditions fixed')
    p.add_argument('--demo', action='store_true', help='print closed-form checks (no weights needed)')
    p.add_argument('--train-lenet', default=None, metavar='NPZ',
                   help='train the FD_lenet classifier on an .npz of images and labels, save it to --lenet-weights')
    p.add_argument('--lenet-steps', type=int, default=2000, help='training steps for --train-lenet')
    args = p.parse_args(argv)
    if args.train_lenet and not args.lenet_weights:
        p.error('--train-lenet needs --lenet-weights (where to save the classifier)')
    if not (args.demo or args.train_lenet) and (args.generated is None or args.reference is None):
        p.error('give GENERATED and REFERENCE (or --demo, or --train-lenet)')
    return args


def build_network(args):
    if args.network == 'inception':
        return load_inception(args.inception_weights, args.device, resize=args.resize,
                              channels_last=args.channels_last)
    if args.lenet_weights is None:
        raise SystemExit('--network lenet needs --lenet-weights (train one with evaluate.train_classifier)')
    state = torch.load(args.lenet_weights, map_location='cpu', weights_only=True)
    # rebuild the architecture from the weight shapes, so a state dict is all that needs saving
    widths = (state['conv1.weight'].shape[0], state['conv2.weight'].shape[0])
    image_size = int(math.sqrt(state['fc1.weight'].shape[1] / widths[1])) * 4
    model = LeNetFeatures(state['conv1.weight'].shape[1], state['fc2.weight'].shape[0], image_size,
                          state['fc1.weight'].shape[0], widths)
    model.load_state_dict(state)
    return model.eval().to(args.device)


def train_lenet_command(args):
    """Train the small classifier on 90% of the labelled images, report accuracy on the rest, save it."""
    images, labels = load_images(args.train_lenet), load_labels(args.train_lenet)
    if labels is None:
        raise SystemExit(f'{args.train_lenet} has no labels array (key "labels" or "y")')
    n_train = int(0.9 * len(images))
    model = train_classifier(images[:n_train], labels[:n_train], int(labels.max()) + 1, steps=args.lenet_steps)
    with torch.no_grad():
        predictions = model(to_unit_float(images[n_train:]), return_logits=True)[1].argmax(1).numpy()
    print(f'held-out accuracy {np.mean(predictions == labels[n_train:]):.4f} on {len(images) - n_train} images')
    torch.save(model.state_dict(), args.lenet_weights)
    print(f'saved to {args.lenet_weights}')


def sample_checkpoint(args):
    """Generate --num-gen images (2,000 by default) from a train.py checkpoint: (images in [0, 1], labels or None).
    Conditions: fixed (--class) or uniform; 'data' and 'real' need the reference labels, so sample with sample.py."""
    from sample import load_model        # the command line may import the checkpoint loader (STYLE.md); the
    from train import generate           # metric code above stays a leaf
    net, diffusion, config = load_model(args.generated, args.device)
    d, n = config['data'], args.num_gen or 2000
    labels = None
    if d['num_classes']:
        mode = args.conditions or 'uniform'
        if mode not in ('fixed', 'uniform'):
            raise ValueError(f"--conditions {mode} needs the reference labels: write samples with sample.py --npz")
        args.conditions = mode
        labels = torch.from_numpy(choose_conditions(mode, n, d['num_classes'], fixed_class=args.fixed_class))
    images = [generate(net, diffusion, len(idx), (d['channels'], d['resolution'], d['resolution']), args.device,
                       None if labels is None else labels[idx], d['num_classes'], args.sampler, args.steps,
                       args.guidance, seed=int(idx[0]), aug_dim=config['net'].get('aug_dim', 0)).cpu()
              for idx in tqdm(torch.arange(n).split(args.batch_size), desc='sampling')]
    print(f'sampled {n} images from {args.generated} ({args.sampler}, {args.steps} steps, guidance {args.guidance})')
    return (torch.cat(images) + 1) / 2, labels


def main(args):
    if args.demo:
        return demo()
    if args.train_lenet:
        return train_lenet_command(args)
    metrics = tuple(args.metrics.split(','))
    net = build_network(args)
    want_logits = 'is' in metrics and net.name == 'inception'
    if args.generated.endswith('.pt'):
        fake, _ = sample_checkpoint(args)
    else:
        fake = load_images(args.generated, args.num_gen)
    out = extract_features(fake, net, args.batch_size, args.device, return_logits=want_logits)
    fake_feats, fake_logits = out if want_logits else (out, None)
    real_feats = None
    if is_statistics_file(args.reference):  # cached statistics: no reference image is read
        ref_stats = load_statistics(args.reference)
        check_statistics_match(ref_stats, net.name, args.resize, args.reference)
        num_ref = int(ref_stats.get('num_images', -1))
    elif args.stats_cache:  # computed once per (dataset, resolution, count, network, resize), then reused
        real = load_images(args.reference, args.num_ref)
        name = os.path.splitext(os.path.basename(os.path.normpath(args.reference)))[0]
        path = statistics_cache_path(args.stats_cache, name, real.shape[-1], len(real), net.name, args.resize)
        cached = os.path.isfile(path)
        ref_stats = cached_statistics(path, lambda: extract_features(real, net, args.batch_size, args.device),
                                      network=net.name, resize=args.resize)
        num_ref = len(real)
        print(f'reference statistics {"read from" if cached else "computed and saved to"} {path}')
    else:
        real = load_images(args.reference, args.num_ref)
        real_feats = extract_features(real, net, args.batch_size, args.device)
        ref_stats = compute_statistics(real_feats, network=net.name, resize=args.resize)
        num_ref = len(real)
        if args.save_stats:
            save_statistics(args.save_stats, ref_stats)
    results = compute_metrics(fake_feats, ref_stats, fake_logits, metrics, net.name)
    split = args.reference_split or os.path.basename(os.path.normpath(args.reference))
    print(format_results(results, len(fake_feats), num_ref, args.resize, split, args.conditions))
    fake_labels = None if args.generated.endswith('.pt') else load_labels(args.generated)
    real_labels = load_labels(args.reference)
    if (real_feats is not None and fake_labels is not None and real_labels is not None
            and len(fake_labels) >= len(fake_feats) and len(real_labels) >= num_ref):
        fd_name = 'FID' if net.name == 'inception' else f'FD_{net.name}'
        per_class = per_class_fd(fake_feats, fake_labels[:len(fake_feats)], real_feats, real_labels[:num_ref])
        results['per_class'] = per_class
        print(f'per-class {fd_name} (noisy: few samples per class): '
              + ', '.join(f'{c}: {v:.4g}' for c, v in per_class.items()))
    if args.memorization:
        train = load_images(args.memorization)
        train_feats = extract_features(train, net, args.batch_size, args.device)
        report = memorization_check(fake, train, sample_features=fake_feats, train_features=train_feats)
        for space, r in report.items():
            print(f'memorization ({space} space): {100 * r["share"]:.2f}% of samples have '
                  f'd(NN1) < d(NN2)/3 against {len(train)} training images')
        save_nearest_pairs(fake, train, report['pixel']['nearest'], report['pixel']['ratio'], args.pairs_png)
        print(f'closest pairs (sample | training image) saved to {args.pairs_png}')
    return results


if __name__ == '__main__':
    try:
        main(parse_args())
    except (FileNotFoundError, ValueError) as e:  # missing/wrong weights, bad inputs: the message, no traceback
        raise SystemExit(f'error: {e}')
