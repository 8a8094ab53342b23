"""
C3D, the 3-D convolutional network behind the video Inception Score of TGAN, and its UCF-101 weight files.

Papers:
  C3D       Tran, Bourdev, Fergus, Torresani, Paluri 2015, "Learning Spatiotemporal Features with 3D Convolutional
            Networks", arXiv:1412.0767. Eight 3x3x3 convolutions (stride 1, padding 1) and five max pools, the first
            1x2x2 (keeps time early), the others 2x2x2; two 4096-d fully connected layers; input 16 frames of
            112 x 112 (Sec. 3.2-3.3, Fig. 3). Trained on Sports-1M (487 classes) and fine-tuned on UCF-101 (101).
  Video IS  Saito, Matsumoto, Saito 2017, "Temporal Generative Adversarial Nets with Singular Value Clipping" (TGAN,
            arXiv:1611.06624), and Saito, Saito, Koyama, Kobayashi 2020, "Train Sparsely, Generate Densely" (TGANv2,
            IJCV; arXiv:1811.09245): the Inception Score (Salimans et al. 2016, Sec. 4)
                IS = exp( E_x KL(p(y|x) || p(y)) ),  p(y|x) = softmax of C3D's 101 UCF-101 logits (fc8)
            over generated 16-frame clips. Bounds: 1 (every clip gets the same prediction) to 101 (confident and
            evenly spread). TGANv2's protocol (scripts/compute_inception_score.py, conf/dset/ucf101.yml): 2048 clips
            per score, one split, repeated on 10 sets of fresh samples; mean and std of the 10 scores
            (metrics.VIDEO_IS_SET_SIZE). TGANv2 reports 25.07 +- 0.47 for itself and 11.85 +- 0.07 for TGAN.
  C3D FD    TGANv2 also reports a Frechet distance of these networks' fc7 features (4096-d, after the ReLU)
            between generated and UCF-101 clips (its compute_fid.py, called FID there). Here it is FD_c3d (KD_c3d),
            never FVD: FVD is the I3D feature distance of i3d.py.

What the module computes (TGANv2's C3DVersion1UCF101, tgan2/models/c3d/c3d_ucf101.py, done inside forward):
  1. input: float videos in [0, 1], shape (N, C, 16, H, W), C = 3 (grey is copied to R, G, B). TGANv2 feeds
     generator outputs x in [-1, 1]; here x = 2 u - 1 for u in [0, 1]. Fewer than 16 frames are stretched to 16
     by repeating frames (nearest in time, as i3d.py does; `stretched` says so); more than 16 are refused;
  2. each frame resized to 112 x 112 bilinearly with align_corners=True (chainer's F.resize_images default:
     source x = x_out (in - 1) / (out - 1), the corner pixels map to the corner pixels);
  3. Caffe's input convention: RGB -> BGR and 128 (x + 1) = 256 u (TGANv2's `pre`, a 1x1x1 convolution with
     weight 128 on the swapped channels), minus the UCF-101 mean clip cropped to [8:120, 8:120] (its `mean` Bias
     of 128 - mean); the mean clip comes from a second file, mean2.npz (key 'mean', 16 frames);
  4. conv1a - pool1 - conv2a - pool2 - conv3a, conv3b - pool3 - conv4a, conv4b - pool4 - conv5a, conv5b - pool5
     - fc6 - fc7 - fc8, ReLU after every convolution and after fc6, fc7; dropout is the identity at evaluation.
     Chainer's max_pooling_nd pools with cover_all=True (a last, partial window), PyTorch's ceil_mode=True: pool5
     takes the 2 x 7 x 7 map to 1 x 4 x 4, so fc6 reads 512 * 4 * 4 = 8192 values (Caffe's C3D does the same).
  forward(x) gives fc7 (N, 4096), the FD/KD features; forward(x, return_logits=True) also gives fc8 (N, 101),
  the IS logits; `endpoints` returns every stage.

Weights: the UCF-101 C3D of TGAN/TGANv2 (the Caffe C3D's c3d_ucf101_finetune_whole_iter_20000, converted to
chainer), published with TGANv2's code as two GitHub release files, C3D_WEIGHTS_URL and C3D_MEAN_URL (no size or
checksum is published: this file finds them locally and names them offline; the sha256 of the weights used
is recorded with every score by evaluate.py). Their keys are chainer's: 'conv1a/W', 'conv1a/b', ...,
'fc8/W', 'fc8/b' (conv W (out, in, 3, 3, 3), linear W (out, in): PyTorch's layouts), read here as
conv1a.weight, conv1a.bias, ... Sports-1M ports (DavideA/c3d-pytorch's c3d.pickle: conv1 ... fc8 with 487
classes, pool5 padded (0, 1, 1)) are another layout and are refused.

Usage: model = load_c3d(device='cuda');  fc7, logits = model(videos, return_logits=True)   # (N, 3, 16, H, W)
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

C3D_WEIGHTS_NAME = 'conv3d_deepnetA_ucf.npz'
C3D_MEAN_NAME = 'mean2.npz'
_RELEASE = 'https://github.com/mitmul/tgan2/releases/download/untagged-d2d4900c6c1bb09d9f5a/'  # TGANv2 README
C3D_WEIGHTS_URL = _RELEASE + C3D_WEIGHTS_NAME
C3D_MEAN_URL = _RELEASE + C3D_MEAN_NAME
C3D_WEIGHTS_ENV = 'C3D_WEIGHTS'   # environment variables naming the two files
C3D_MEAN_ENV = 'C3D_MEAN'
FRAMES = 16                       # the clip length C3D and the mean clip are made for
SIZE = 112                        # frame side after the resize
MEAN_CROP = slice(8, 8 + SIZE)    # TGANv2 crops the mean clip to [8:120, 8:120]

# (name, input channels, output channels) of the eight convolutions, in order; the pools have no weights.
CONVS = (('conv1a', 3, 64), ('conv2a', 64, 128), ('conv3a', 128, 256), ('conv3b', 256, 256),
         ('conv4a', 256, 512), ('conv4b', 512, 512), ('conv5a', 512, 512), ('conv5b', 512, 512))
POOL_AFTER = {'conv1a': (1, 2, 2), 'conv2a': (2, 2, 2), 'conv3b': (2, 2, 2), 'conv4b': (2, 2, 2), 'conv5b': (2, 2, 2)}


# ----------------------------------------------------------------------------------------------------
# The network (Tran et al. 2015, Fig. 3), module names as in the UCF-101 weight file

class C3D(nn.Module):
    """C3D on UCF-101: videos (N, C, F, H, W) in [0, 1] -> fc7 features (N, 4096) [and fc8 logits (N, 101)].

    The TGANv2 preprocessing (stretch to 16 frames, resize to 112 x 112 with aligned corners, BGR, 256 u minus the
    mean clip) happens in forward; see the module docstring. Interface of evaluate.extract_features: name, resize,
    input_ndim, forward(x, return_logits=False).
    """

    name, resize, input_ndim = 'c3d', 'bilinear-aligned', 5

    def __init__(self, num_classes=101,    # UCF-101
                 chunk=8):                 # clips per forward pass (a 16 x 112 x 112 clip takes ~0.1 GB of activations)
        super().__init__()
        self.chunk = chunk
        self.stretched = False  # set by forward when the last input had fewer than 16 frames
        for name, cin, cout in CONVS:
            self.add_module(name, nn.Conv3d(cin, cout, kernel_size=3, stride=1, padding=1))
        self.fc6 = nn.Linear(512 * 4 * 4, 4096)   # pool5 output: 512 x 1 x 4 x 4 (cover_all / ceil_mode pooling)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, num_classes)
        # The UCF-101 mean clip (BGR, Caffe's 0-255 units), cropped: 128 - mean is TGANv2's Bias (set by load_c3d).
        self.register_buffer('mean', torch.zeros(3, FRAMES, SIZE, SIZE))

    def preprocess(self, x):
        """(N, C, F, H, W) in [0, 1] -> (N, 3, 16, 112, 112): BGR, 256 u - mean (Caffe's input units)."""
        if x.dim() != 5 or x.shape[1] not in (1, 3):
            raise ValueError(f'C3D takes videos (N, 3 or 1, F, H, W) in [0, 1], got shape {tuple(x.shape)}')
        if x.shape[2] > FRAMES:
            raise ValueError(f'C3D scores clips of {FRAMES} frames (its mean clip has 16); got {x.shape[2]}: '
                             f'keep the first {FRAMES} (evaluate.py --frames {FRAMES})')
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1, -1)        # grey: the same frame in R, G and B
        N, C, frames, H, W = x.shape
        self.stretched = frames < FRAMES
        if self.stretched:                         # nearest neighbour in time: frame floor(i * F / 16)
            x = x[:, :, torch.arange(FRAMES, device=x.device) * frames // FRAMES]
        if (H, W) != (SIZE, SIZE):                 # chainer resize_images: bilinear, align_corners=True
            flat = x.transpose(1, 2).reshape(N * FRAMES, C, H, W)
            flat = F.interpolate(flat, size=(SIZE, SIZE), mode='bilinear', align_corners=True)
            x = flat.reshape(N, FRAMES, C, SIZE, SIZE).transpose(1, 2)
        x = x.flip(1)                              # RGB -> BGR (TGANv2's pre: W[[0, 1, 2], [2, 1, 0]])
        return 128 * (2 * x - 1) + 128 - self.mean  # 128 (x + 1) - mean, x in [-1, 1] (pre, then the mean Bias)

    def endpoints(self, x):
        """Every stage's output for a preprocessed input: a dict name -> tensor (conv/pool maps, fc6, fc7, fc8)."""
        out = {}
        for name, _, _ in CONVS:
            x = out[name] = F.relu(getattr(self, name)(x))
            if name in POOL_AFTER:                 # chainer cover_all=True == PyTorch ceil_mode=True
                kernel = POOL_AFTER[name]
                x = out['pool' + name[4]] = F.max_pool3d(x, kernel, kernel, ceil_mode=True)
        x = out['fc6'] = F.relu(self.fc6(x.flatten(1)))      # (N, 8192) in (C, T, H, W) order, as chainer's Linear
        x = out['fc7'] = F.relu(self.fc7(x))                 # the FD features (TGANv2's get_feature)
        out['fc8'] = self.fc8(x)                             # the 101 UCF-101 logits (IS)
        return out

    def forward(self, x, return_logits=False):
        feats, logits = [], []
        for part in x.split(self.chunk):
            out = self.endpoints(self.preprocess(part))
            feats.append(out['fc7'])
            logits.append(out['fc8'])
        return (torch.cat(feats), torch.cat(logits)) if return_logits else torch.cat(feats)


@torch.no_grad()
def he_init_(model, seed=0):
    """Random weights that keep activations at unit scale (He et al. 2015, arXiv:1502.01852, Eq. 10:
    Var[w] = 2 / fan_in), small random biases: for tests and the demo without the weight file."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv3d, nn.Linear)):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / m.weight[0].numel()))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


# ----------------------------------------------------------------------------------------------------
# Finding and loading the two files (argument > environment variable > torch hub cache); no download

def default_cache_dir():
    """torch.hub's checkpoint folder (where i3d.py and inception.py look too)."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints')


def files_help(searched):
    return (f"C3D (UCF-101) files not found (looked in: {', '.join(searched)}).\n"
            f"Download {C3D_WEIGHTS_URL}\nand {C3D_MEAN_URL}\n"
            f"(TGANv2's release files; no checksum is published, the sha256 of the weights is recorded with every "
            f"score) and pass their paths (--c3d-weights, --c3d-mean), set {C3D_WEIGHTS_ENV} and {C3D_MEAN_ENV}, or "
            f"put both in {default_cache_dir()}/.")


def find_c3d_file(path, env, name, cache_dir=None):
    """Path of one file: the argument (must exist) > $env > the cache folder; else a FileNotFoundError naming both."""
    cache_dir = cache_dir or default_cache_dir()
    candidates = [os.fspath(p) for p in (path, os.environ.get(env)) if p] + [os.path.join(cache_dir, name)]
    if path and not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist.\n' + files_help(candidates))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(files_help(candidates))


def read_npz(path):
    """The arrays of an .npz (never unpickled), with the file named in the error."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as e:  # not a zip, a truncated download, an HTML page saved as .npz, a pickled object array
        raise ValueError(f'could not read {path} as an .npz of arrays ({e}).') from e


def chainer_to_torch(arrays, model, source):
    """chainer keys ('conv1a/W', 'conv1a/b') -> PyTorch's (conv1a.weight, conv1a.bias), checked against the model."""
    state = {}
    for key, value in arrays.items():
        link, _, param = key.lstrip('/').rpartition('/')
        state[f'{link}.{ {"W": "weight", "b": "bias"}.get(param, param)}'] = torch.from_numpy(np.array(value))
    expected = {k: v.shape for k, v in model.state_dict().items() if k != 'mean'}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        lines = [f'{source} is not the UCF-101 C3D weight file {C3D_WEIGHTS_NAME} (chainer keys conv1a/W ... fc8/b):']
        for label, keys in (('missing keys', missing), ('unexpected keys', unexpected)):
            if keys:
                lines.append(f'  {len(keys)} {label}, e.g. {keys[:3]}')
        for k in wrong[:3]:
            lines.append(f'  {k}: shape {tuple(state[k].shape)} in file, {tuple(expected[k])} expected')
        lines.append(f'Get the right file from {C3D_WEIGHTS_URL}')
        raise ValueError('\n'.join(lines))
    return {k: v.float() for k, v in state.items()}


def mean_clip(arrays, source):
    """The mean clip (3, 16, >= 120, >= 120) of mean2.npz, cropped to [8:120, 8:120] as TGANv2 does."""
    mean = arrays.get('mean')
    if mean is None or mean.ndim != 4 or mean.shape[:2] != (3, FRAMES) or min(mean.shape[2:]) < MEAN_CROP.stop:
        raise ValueError(f'{source} has no mean clip "mean" of shape (3, 16, H >= 120, W >= 120) '
                         f'(got {None if mean is None else mean.shape}); get {C3D_MEAN_URL}')
    return torch.from_numpy(np.array(mean[:, :, MEAN_CROP, MEAN_CROP], dtype=np.float32))


def load_c3d(path=None, mean_path=None, device='cpu'):
    """The UCF-101 C3D in eval mode: videos (N, 3, F <= 16, H, W) in [0, 1] -> fc7 (N, 4096) [, fc8 logits]."""
    path = find_c3d_file(path, C3D_WEIGHTS_ENV, C3D_WEIGHTS_NAME)
    mean_path = find_c3d_file(mean_path, C3D_MEAN_ENV, C3D_MEAN_NAME)
    with torch.device('meta'):  # shapes only: skip a 78M-parameter random init that would be overwritten
        model = C3D()
    state = chainer_to_torch(read_npz(path), model, path)
    state['mean'] = mean_clip(read_npz(mean_path), mean_path)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------------
# Demo: the feature-map sizes of Fig. 3 and that frame order matters (random weights, zero mean clip)

if __name__ == '__main__':
    import time
    model = he_init_(C3D().eval())           # random weights: the real ones are TGANv2's release files
    clip = torch.rand(1, 3, 16, 64, 64)
    with torch.no_grad():
        t0 = time.perf_counter()
        maps = model.endpoints(model.preprocess(clip))
        print(f'one clip of 16 frames at 112 x 112 in {time.perf_counter() - t0:.1f} s; shape per stage:')
        for name, v in maps.items():
            print(f'  {name:7s} {tuple(v.shape[1:])}')
        a, b = maps['fc8'], model(clip.flip(2), return_logits=True)[1]     # the same frames, played backwards
        model(torch.rand(1, 3, 8, 64, 64))
    print('logits', tuple(a.shape), '| change when the clip is reversed:', f'{(a - b).norm() / a.norm():.3f}')
    print(f'an 8-frame clip is stretched to {FRAMES} frames: stretched={model.stretched}')
    print(f'parameters: {sum(p.numel() for p in model.parameters()):,}')
