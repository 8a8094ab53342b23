"""
The I3D network that Frechet Video Distance (FVD) measures videos with, and its Kinetics-400 weight file.

Papers:
  I3D   Carreira & Zisserman 2017, "Quo Vadis, Action Recognition? A New Model and the Kinetics Dataset",
        arXiv:1705.07750. Inception-v1 (Szegedy et al. 2014, arXiv:1409.4842) "inflated" to 3-D: every
        N x N kernel becomes N x N x N (Sec. 2.4, Fig. 3), trained on the 400 Kinetics actions.
  FVD   Unterthiner et al. 2019, "FVD: A new Metric for Video Generation" (arXiv:1812.01717, Eq. 1): the
        Frechet distance between Gaussians fitted to the I3D features of real (r) and generated (g) videos,
            FVD = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})
        (the FID formula of Heusel et al. 2017, Eq. 6, on video features; evaluate.frechet_distance).

What the module computes (the preprocessing FVD prescribes, done inside forward so callers cannot forget it):
  1. input: float videos in [0, 1], shape (N, C, F, H, W), C = 3 (or 1: grey is copied into R, G and B);
  2. each frame resized to 224 x 224 with F.interpolate(mode='bilinear', align_corners=False), no antialiasing:
     half-pixel centres, source x = (x_out + 0.5) in / out - 0.5. This is the PyTorch FVD code that descends from
     VideoGPT's (Yan et al. 2021) and loads this weight file: TATS's tats/fvd/fvd.py `preprocess` (Ge et al. 2022;
     copied into later papers' evaluation code) resizes every frame to (224, 224) this way and maps to 2 x - 1.
     It is NOT the original TF FVD code's resize: TF 1.x tf.image.resize_bilinear, with its defaults
     align_corners=False and half_pixel_centers=False, samples source x = x_out in / out (a shift of up to half a
     source pixel; 0.12 mean absolute difference in [0, 1] units on a 64 -> 224 frame of uniform noise, 0.006 on a
     ramp). (VideoGPT's own videogpt/fvd/fvd.py instead scales the shorter side to 224, centre-crops and feeds
     [-0.5, 0.5]; for square frames the resize is the same.) So FVDs from here compare with the PyTorch FVD codes
     above, not exactly with numbers from the TF implementation;
  3. scaled from [0, 1] to [-1, 1] (x -> 2x - 1), the range the Kinetics network was trained on;
  4. the network up to its "Logits" layer: a 2 x 7 x 7 average pool over the last feature map, a 1x1x1
     convolution to 400 logits per remaining time step, then the mean over time: (N, 400) logits (pytorch-i3d's
     forward returns the per-step logits; VideoGPT's and TATS's copies add this mean, logits.mean(dim=2)).
  These 400 time-averaged logits are the features FVD (and KVD, the KID over the same features) uses.

The network needs at least 9 frames (its strides shrink time 8-fold before the 2-frame pool). Shorter clips
are stretched to 16 frames by repeating frames (nearest neighbour in time, i.e. a slowed-down clip) and this
is said in the module's `stretched` attribute: an FVD of such clips is comparable only with itself.

Weights: the public Kinetics-400 file `i3d_pretrained_400.pt` (VideoGPT's, Yan et al. 2021; 50,939,526
bytes), in the module names of piergiaj/pytorch-i3d, which this file reproduces (Conv3d_1a_7x7.conv3d.weight,
Mixed_3b.b1b.bn.running_var, ..., logits.conv3d.bias). Convolutions pad like TensorFlow's 'SAME'. BatchNorm
uses eps = 1e-5 as the PyTorch FVD code does (pytorch-i3d and the TF original use 1e-3; pass bn_eps=1e-3).

Usage: model = load_i3d(device='cuda');  logits = model(videos)          # (N, 3, F, H, W) in [0, 1] -> (N, 400)
"""
import hashlib
import math
import os
import shutil
import sys
import tempfile
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F

I3D_WEIGHTS_NAME = 'i3d_pretrained_400.pt'
# A fixed revision of a public copy (Open-Sora-Plan v1.0.0 ships VideoGPT's file for its FVD evaluation).
I3D_WEIGHTS_URL = ('https://huggingface.co/spaces/LanguageBind/Open-Sora-Plan-v1.0.0/resolve/'
                   '810fa8c4bdb3a4c8eec9bd57375c29bde6fb46de/opensora/eval/fvd/videogpt/' + I3D_WEIGHTS_NAME)
I3D_WEIGHTS_SHA256 = '55095f049e706479d48e221adcdb145b2b9dc930ba28b081ed72367ffaa32343'  # its git-lfs oid
I3D_WEIGHTS_SIZE = 50939526  # bytes
I3D_WEIGHTS_ENV = 'I3D_WEIGHTS'  # environment variable naming the weight file
MIN_FRAMES = 9                   # fewest frames that leave one time step for the 2-frame average pool
STRETCH_FRAMES = 16              # what shorter clips are stretched to (the usual FVD clip length)


# ----------------------------------------------------------------------------------------------------
# Layers: a convolution with TensorFlow 'SAME' padding, BatchNorm and ReLU; max pooling with the same padding

def same_padding(size, kernel, stride):
    """TF 'SAME' padding for one axis: output ceil(size / stride); the odd extra pixel goes at the end."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def pad_same(x, kernel, stride):
    """Zero-pad (N, C, T, H, W) so a kernel/stride window gives the 'SAME' output size on every axis."""
    pads = [same_padding(s, k, st) for s, k, st in zip(x.shape[2:], kernel, stride)]   # [(t0,t1),(h0,h1),(w0,w1)]
    return F.pad(x, [p for pair in reversed(pads) for p in pair])                       # F.pad wants w first


def max_pool_same(x, kernel, stride):
    # Zero padding is harmless here: every pooled tensor comes out of a ReLU, so it is >= 0 already.
    return F.max_pool3d(pad_same(x, kernel, stride), kernel, stride)


class Unit3D(nn.Module):
    """Conv3d (no bias) -> BatchNorm3d -> ReLU, pytorch-i3d's unit; the logits layer has a bias and neither."""

    def __init__(self, in_channels, out_channels,
                 kernel=(1, 1, 1),    # (time, height, width)
                 stride=(1, 1, 1),    # (time, height, width)
                 batch_norm=True,     # False only for the logits layer
                 relu=True,           # False only for the logits layer
                 bn_eps=1e-5):        # BatchNorm epsilon (see the module docstring)
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=not batch_norm)
        self.bn = nn.BatchNorm3d(out_channels, eps=bn_eps) if batch_norm else None

    def forward(self, x):
        x = self.conv3d(pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class InceptionModule(nn.Module):
    """Inception block (Szegedy et al. 2014, Fig. 2b) inflated to 3-D; I3D uses 3x3x3 in both wide branches.

    channels = (b0, b1a, b1b, b2a, b2b, b3b): 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | 3x3 max pool -> 1x1.
    """

    def __init__(self, in_channels, channels, bn_eps=1e-5):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = channels
        self.b0 = Unit3D(in_channels, c0, bn_eps=bn_eps)
        self.b1a = Unit3D(in_channels, c1a, bn_eps=bn_eps)
        self.b1b = Unit3D(c1a, c1b, kernel=(3, 3, 3), bn_eps=bn_eps)
        self.b2a = Unit3D(in_channels, c2a, bn_eps=bn_eps)
        self.b2b = Unit3D(c2a, c2b, kernel=(3, 3, 3), bn_eps=bn_eps)
        self.b3b = Unit3D(in_channels, c3b, bn_eps=bn_eps)       # after a parameter-free pool ("b3a")
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x):
        pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], dim=1)


# ----------------------------------------------------------------------------------------------------
# The network (Carreira & Zisserman 2017, Fig. 3), endpoint names as in the TF original and pytorch-i3d

# (name, input channels, branch channels); the pools between them have no weights.
INCEPTION_BLOCKS = (
    ('Mixed_3b', 192, (64, 96, 128, 16, 32, 32)),           # -> 256 channels at 28 x 28
    ('Mixed_3c', 256, (128, 128, 192, 32, 96, 64)),         # -> 480
    ('Mixed_4b', 480, (192, 96, 208, 16, 48, 64)),          # -> 512 at 14 x 14, after a 3x3x3 stride-2 pool
    ('Mixed_4c', 512, (160, 112, 224, 24, 64, 64)),         # -> 512
    ('Mixed_4d', 512, (128, 128, 256, 24, 64, 64)),         # -> 512
    ('Mixed_4e', 512, (112, 144, 288, 32, 64, 64)),         # -> 528
    ('Mixed_4f', 528, (256, 160, 320, 32, 128, 128)),       # -> 832
    ('Mixed_5b', 832, (256, 160, 320, 32, 128, 128)),       # -> 832 at 7 x 7, after a 2x2x2 stride-2 pool
    ('Mixed_5c', 832, (384, 192, 384, 48, 128, 128)),       # -> 1024
)


class InceptionI3d(nn.Module):
    """RGB I3D: videos (N, C, F, H, W) in [0, 1] -> (N, num_classes) logits averaged over time.

    The FVD preprocessing (resize to 224 x 224 bilinear, scale to [-1, 1], stretch clips under 9 frames)
    happens in forward; see the module docstring. `endpoints(x)` returns every intermediate feature map.
    """

    def __init__(self, num_classes=400,     # Kinetics-400
                 in_channels=3,             # RGB
                 size=224,                  # frames are resized to size x size (the network's training size)
                 bn_eps=1e-5):              # 1e-5: the PyTorch FVD code; 1e-3: TF original / pytorch-i3d
        super().__init__()
        self.size = size
        self.stretched = False  # set by forward when the last input had fewer than MIN_FRAMES frames
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2), bn_eps=bn_eps)    # 224 -> 112, F -> F/2
        self.Conv3d_2b_1x1 = Unit3D(64, 64, bn_eps=bn_eps)                                    # after a 1x3x3 pool: 56
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), bn_eps=bn_eps)
        for name, cin, channels in INCEPTION_BLOCKS:
            self.add_module(name, InceptionModule(cin, channels, bn_eps=bn_eps))
        self.logits = Unit3D(1024, num_classes, batch_norm=False, relu=False)

    def preprocess(self, x):
        """(N, C, F, H, W) in [0, 1] -> (N, 3, F', size, size) in [-1, 1], F' >= MIN_FRAMES."""
        if x.dim() != 5 or x.shape[1] not in (1, 3):
            raise ValueError(f'I3D takes videos (N, 3 or 1, F, H, W) in [0, 1], got shape {tuple(x.shape)}')
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1, -1)        # grey (moving MNIST): the same frame in R, G and B
        N, C, frames, H, W = x.shape
        self.stretched = frames < MIN_FRAMES
        if self.stretched:                         # nearest neighbour in time: frame floor(i * F / 16)
            index = torch.arange(STRETCH_FRAMES, device=x.device) * frames // STRETCH_FRAMES
            x, frames = x[:, :, index], STRETCH_FRAMES
        if (H, W) != (self.size, self.size):       # resize every frame on its own (frames into the batch)
            flat = x.transpose(1, 2).reshape(N * frames, C, H, W)
            flat = F.interpolate(flat, size=(self.size, self.size), mode='bilinear', align_corners=False)
            x = flat.reshape(N, frames, C, self.size, self.size).transpose(1, 2)
        return 2 * x - 1                           # [0, 1] -> [-1, 1]

    def endpoints(self, x):
        """Feature maps after every named stage, for a preprocessed input; a dict name -> (N, C, T, H, W)."""
        out = {}
        x = out['Conv3d_1a_7x7'] = self.Conv3d_1a_7x7(x)
        x = out['MaxPool3d_2a_3x3'] = max_pool_same(x, (1, 3, 3), (1, 2, 2))    # space only: time kept early
        x = out['Conv3d_2b_1x1'] = self.Conv3d_2b_1x1(x)
        x = out['Conv3d_2c_3x3'] = self.Conv3d_2c_3x3(x)
        x = out['MaxPool3d_3a_3x3'] = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        for name, _, _ in INCEPTION_BLOCKS:
            if name == 'Mixed_4b':
                x = out['MaxPool3d_4a_3x3'] = max_pool_same(x, (3, 3, 3), (2, 2, 2))
            if name == 'Mixed_5b':
                x = out['MaxPool3d_5a_2x2'] = max_pool_same(x, (2, 2, 2), (2, 2, 2))
            x = out[name] = getattr(self, name)(x)
        # "Logits": a VALID 2x7x7 average pool (dropout before the 1x1x1 conv is the identity in eval).
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)                      # (N, 1024, T'-1, 1, 1)
        out['Logits'] = self.logits(x)                                            # (N, 400, T'-1, 1, 1)
        return out

    def forward(self, x):
        logits = self.endpoints(self.preprocess(x))['Logits']
        return logits.mean(dim=(2, 3, 4))          # average over time (and the 1 x 1 space): (N, 400)


@torch.no_grad()
def he_init_(model, seed=0):
    """Random weights that keep activations at unit scale (He et al. 2015, arXiv:1502.01852, Eq. 10:
    Var[w] = 2 / fan_in for ReLU), for tests and demos without the weight file. PyTorch's default init
    shrinks the signal about 3x per layer, so 20 layers later the logits would be the bias alone."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / fan_in))
            if m.bias is not None:
                m.bias.zero_()
    return model


@torch.no_grad()
def extract_video_features(videos, model, batch_size=16, device='cpu'):
    """I3D logits (N, 400) float64 of videos (N, C, F, H, W) in [0, 1] (uint8 in [0, 255] accepted), batched."""
    feats = []
    for i in range(0, len(videos), batch_size):
        v = videos[i:i + batch_size].to(device)
        v = v.float() / 255 if v.dtype == torch.uint8 else v
        feats.append(model(v).double().cpu())
    return torch.cat(feats)


# ----------------------------------------------------------------------------------------------------
# Finding, downloading and loading the weight file (local path > $I3D_WEIGHTS > cache > download)

def sha256_of(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def default_cache_dir():
    """torch.hub's checkpoint folder (where the FID Inception weights are cached too)."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints')


def weights_help(searched):
    return (f"I3D weights for FVD not found (looked in: {', '.join(searched)}).\n"
            f"Download {I3D_WEIGHTS_URL}\n"
            f"({I3D_WEIGHTS_SIZE:,} bytes, sha256 {I3D_WEIGHTS_SHA256}) and either pass its path "
            f"(--i3d-weights PATH), set {I3D_WEIGHTS_ENV}=PATH, or put it in {default_cache_dir()}/.")


def find_i3d_weights(path=None, download=True, cache_dir=None):
    """Path of the weight file: argument > $I3D_WEIGHTS > cache folder > download (size and sha256 checked)."""
    cache_dir = cache_dir or default_cache_dir()
    candidates = [os.fspath(p) for p in (path, os.environ.get(I3D_WEIGHTS_ENV)) if p]
    candidates.append(os.path.join(cache_dir, I3D_WEIGHTS_NAME))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    if path:  # an explicit path that does not exist is a mistake, not a reason to download
        raise FileNotFoundError(f'I3D weight file {path} does not exist.\n' + weights_help(candidates))
    if not download:
        raise FileNotFoundError(weights_help(candidates))
    target = candidates[-1]
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix='.part')  # renamed only once complete and verified
    try:
        with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(I3D_WEIGHTS_URL, timeout=30) as response:
            print(f'downloading {I3D_WEIGHTS_URL} to {target}', file=sys.stderr)
            shutil.copyfileobj(response, out)
        size, digest = os.path.getsize(tmp), sha256_of(tmp)
        if size != I3D_WEIGHTS_SIZE or digest != I3D_WEIGHTS_SHA256:
            raise RuntimeError(f'downloaded file has {size} bytes and sha256 {digest}, expected {I3D_WEIGHTS_SIZE} '
                               f'and {I3D_WEIGHTS_SHA256} (corrupted or replaced download); nothing was saved.\n'
                               + weights_help(candidates))
        os.replace(tmp, target)
        return target
    except OSError as e:  # offline (URLError is an OSError) or disk trouble
        raise FileNotFoundError(f'could not download the I3D weights ({e}).\n' + weights_help(candidates)) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_state_dict(state, model, source):
    """Same keys and shapes as the model, or a ValueError naming the differences (BatchNorm counters optional)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f'{source} is not a state dict of tensors; expected the I3D weight file '
                         f'{I3D_WEIGHTS_NAME} ({I3D_WEIGHTS_URL}).')
    expected = {k: v.shape for k, v in model.state_dict().items()}
    optional = {k for k in expected if k.endswith('num_batches_tracked')}  # unused in eval; old files lack them
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k])
    if missing or unexpected or wrong_shape:
        lines = [f'{source} is not the I3D weight file {I3D_WEIGHTS_NAME} (pytorch-i3d layout, 400 classes):']
        for label, keys in (('missing keys', missing), ('unexpected keys', unexpected)):
            if keys:
                lines.append(f'  {len(keys)} {label}, e.g. {keys[:3]}')
        for k in wrong_shape[:3]:
            lines.append(f'  {k}: shape {tuple(state[k].shape)} in file, {tuple(expected[k])} expected')
        lines.append(f'Get the right file from {I3D_WEIGHTS_URL}')
        raise ValueError('\n'.join(lines))


def load_i3d(path=None, device='cpu', download=True, bn_eps=1e-5):
    """The Kinetics-400 I3D in eval mode on `device`: videos (N, 3, F, H, W) in [0, 1] -> (N, 400) logits."""
    path = find_i3d_weights(path, download=download)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated download, an HTML error page saved as .pt, a pickle of code
        raise ValueError(f'could not read {path} as a PyTorch weight file ({e}).\n'
                         f'Download it again from {I3D_WEIGHTS_URL}') from e
    if isinstance(state, dict) and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}  # saved from nn.DataParallel
    with torch.device('meta'):  # shapes only: skip a 12M-parameter random init that would be overwritten
        model = InceptionI3d(bn_eps=bn_eps)
    check_state_dict(state, model, path)
    for key in model.state_dict():
        state.setdefault(key, torch.zeros((), dtype=torch.long))  # the optional BatchNorm counters
    model.load_state_dict(state, assign=True)  # take the file's tensors as the module's parameters
    return model.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------------
# Demo: the feature-map sizes of Fig. 3 for a 16-frame clip, and that frame order matters (random weights)

if __name__ == '__main__':
    import time
    torch.manual_seed(0)
    model = he_init_(InceptionI3d().eval())    # random weights: the real ones need a 51 MB download
    clip = torch.rand(1, 3, 16, 64, 64)
    with torch.no_grad():
        t0 = time.perf_counter()
        maps = model.endpoints(model.preprocess(clip))
        print(f'one clip of 16 frames at 224 x 224 in {time.perf_counter() - t0:.1f} s; (C, T, H, W) per stage:')
        for name, v in maps.items():
            print(f'  {name:18s} {tuple(v.shape[1:])}')
        a, b = model(clip), model(clip.flip(2))                   # the same frames, played backwards
        c = model(torch.rand(1, 3, 8, 64, 64))
    print('logits', tuple(a.shape), '| change when the clip is reversed:', f'{(a - b).norm() / a.norm():.3f}')
    print(f'an 8-frame clip is stretched to {STRETCH_FRAMES} frames: stretched={model.stretched}, logits {tuple(c.shape)}')
    print(f'parameters: {sum(p.numel() for p in model.parameters()):,}')
