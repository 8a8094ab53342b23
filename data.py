"""
Datasets for training diffusion models: tensors in [-1, 1], from memory or streamed from disk.

Sources (every one gives float tensors in [-1, 1]: images (C, H, W), videos (C, F, H, W), plus an int label):
  shapes         procedural coloured shapes, 6 classes, no files needed (the default: `python train.py` runs anywhere)
  video-shapes   procedural shapes moving at constant velocity over F frames, for the video model
  moving-mnist   Srivastava et al. 2015, arXiv:1502.04681: MNIST digits bouncing in the frame (built from t10k)
  clips:<path>   a folder of video clips: sub-folders of frame images or animated GIFs
  mnist          LeCun, Bottou, Bengio & Haffner 1998, "Gradient-Based Learning Applied to Document Recognition"
  fashion-mnist  Xiao, Rasul & Vollgraf 2017, "Fashion-MNIST", arXiv:1708.07747
  cifar10        Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images" (tech. report)
  emoji          Google Noto Color Emoji (Apache 2.0), packed as noto_emoji_{32,64}.npz (see ../shared/data/README.md)
  folder:<path>  any folder of images; one sub-folder per class, or none (unlabelled)

Large folders: when the decoded images (N x 3 x R x R bytes) exceed `memory_budget`, a folder dataset streams,
decoding each file when asked; `make_loader` then reads batches through a torch DataLoader with worker processes,
in the order of the index tensors the caller gives (train.py draws them from a (seed, step, rank) generator, so a
resumed run sees the same batches whether the data streams or not). Small datasets stay in memory as uint8.

One conversion each way, used by every file: to_float (uint8 -> [-1, 1]) and to_uint8 ([-1, 1] -> uint8, rounded);
one list of file types, IMAGE_EXTENSIONS. Augmentation with labels (ADA, EDM App. C.4) lives in augment.py.

Usage: ds = load_dataset('shapes'); x, y = ds[0]            # x: (3, 32, 32) in [-1, 1], y in 0..5
       ds = load_dataset('folder:photos', resolution=64, memory_budget=1 << 30)
       for x, y in make_loader(ds, index_tensors, num_workers=4): ...
"""
import gzip
import hashlib
import http.client
import os
import pickle
import struct
import tarfile
import time
import urllib.request

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')


# ----------------------------------------------------------------------------------------------------
# Small helpers: uint8 <-> [-1, 1], resizing, the error raised when files are missing

def to_float(images):
    """uint8 in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1, so 0 -> -1 and 255 -> +1 exactly)."""
    return images.float() / 127.5 - 1.0


def to_uint8(x):
    """float in [-1, 1] -> uint8 in [0, 255] (rounded, clipped): the inverse of to_float for saving PNGs."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def resize_uint8(images, resolution, chunk=1024):
    """Resize uint8 images (N, C, H, W) to resolution x resolution (bicubic; antialiased when shrinking)."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    out = []
    for start in range(0, len(images), chunk):   # chunks bound the float32 copy's memory
        x = images[start:start + chunk].float()
        x = F.interpolate(x, size=(resolution, resolution), mode='bicubic', align_corners=False,
                          antialias=True)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], resolution, resolution))


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing (offline or download=False). The message says which files and where."""


def md5_of(path, chunk=1 << 20):
    """md5 hex digest of a file (the checksum MNIST, Fashion-MNIST and CIFAR-10 publish)."""
    digest = hashlib.md5()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def download_file(url, path, md5, timeout=30):
    """Fetch url to path via a temp file; keep it only when its md5 matches (a crash leaves no half file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.part'
    print(f'downloading {url} -> {path}')
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, 'wb') as f:
            total = int(response.headers.get('Content-Length') or 0) or None
            with tqdm(total=total, unit='B', unit_scale=True, leave=False) as bar:
                for block in iter(lambda: response.read(1 << 20), b''):
                    f.write(block)
                    bar.update(len(block))
    except BaseException:   # a dropped connection or Ctrl-C: leave no partial file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    got = md5_of(tmp)
    if got != md5:
        os.remove(tmp)
        raise OSError(f'{url}: md5 {got} does not match the published {md5}')
    os.replace(tmp, path)


def find_files(name, files, data_dir, mirrors=(), download=True, hint=''):
    """Return the folder holding all `files` ({filename: md5}), downloading into data_dir if allowed.

    Looks in data_dir and data_dir/<name>; `hint` ends the error message (other layouts, where to get the
    files). Every file is checked against its published md5, so a truncated or wrong file is reported here
    by name instead of failing later inside a parser.
    """
    candidates = [data_dir, os.path.join(data_dir, name)]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, f)) for f in files):
            break
    else:
        folder = data_dir
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        reasons = []
        if download and mirrors:
            for f in missing:
                for mirror in mirrors:
                    try:
                        download_file(mirror + f, os.path.join(folder, f), files[f])
                        break
                    except (OSError, ValueError, http.client.HTTPException) as e:   # URLError, timeout, md5: next
                        reasons.append(f'{mirror + f}: {e}')
                else:   # no mirror had this file (offline?): don't wait for the rest to time out as well
                    break
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            where = ' or '.join(os.path.abspath(c) for c in candidates)
            urls = '\n'.join(f'  {mirrors[0] + f}  (md5 {files[f]})' for f in missing) if mirrors else ''
            why = ('download failed:\n  ' + '\n  '.join(reasons)) if reasons else \
                ('download=False' if mirrors else 'these files cannot be downloaded automatically')
            raise DatasetNotFoundError(
                f'{name}: missing {", ".join(missing)} in {where} ({why}).\n'
                f'Put the files in {os.path.abspath(data_dir)} (pass it as --data-dir)'
                + (f', e.g. from\n{urls}\nor run once with download enabled on a machine that is online.'
                   if urls else '.') + (f'\n{hint}' if hint else ''))
    for f, md5 in files.items():
        path = os.path.join(folder, f)
        if md5 is not None and md5_of(path) != md5:
            raise DatasetNotFoundError(f'{path}: md5 {md5_of(path)} is not the published {md5}; the file is '
                                       'damaged or a different version. Delete it and download it again.')
    return folder


# ----------------------------------------------------------------------------------------------------
# The in-memory dataset every source below fills: one uint8 tensor, indexed directly or via a DataLoader

class InMemoryDataset(torch.utils.data.Dataset):
    """Images (N, C, H, W) or videos (N, C, F, H, W) held as one uint8 tensor; item -> (x in [-1, 1], label).

    Unlabelled data has num_classes = 0 and every label 0, i.e. the index num_classes that DESIGN.md's
    networks read as "no class". train.py may skip the DataLoader and call `ds.batch(indices)`.
    """

    def __init__(self, images, labels=None, class_names=None):
        assert images.dtype == torch.uint8 and images.dim() in (4, 5), 'uint8 (N, C, [F,] H, W) expected'
        self.images = images                                    # (N, C, [F,] H, W) uint8
        self.class_names = tuple(class_names) if class_names is not None else ()
        self.num_classes = len(self.class_names)                # 0 = unlabelled
        if labels is None:
            labels = torch.zeros(len(images), dtype=torch.long)  # label num_classes (= 0) = "no class"
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        assert len(self.labels) == len(images)
        self.channels = images.shape[1]
        self.resolution = images.shape[-1]
        if images.dim() == 5:
            self.frames = images.shape[2]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return to_float(self.images[index]), int(self.labels[index])

    def batch(self, index):
        """(x, y) for a tensor of indices: x float in [-1, 1] (B, C, [F,] H, W), y long (B,)."""
        return to_float(self.images[index]), self.labels[index]


# ----------------------------------------------------------------------------------------------------
# Procedural shapes: signed distance functions, rendered with an analytic 1-pixel antialiasing ramp

SHAPE_CLASSES = ('circle', 'square', 'triangle', 'diamond', 'ring', 'cross')
# Chosen so that area / r^2 alone tells the classes apart (a check that labels mean what they say):
# triangle 1.73, diamond 2, ring 2.36, cross 2.56, circle 3.14, square 4.
RING_INNER = 0.5        # inner radius of the ring, as a fraction of its outer radius r
CROSS_HALF_WIDTH = 0.4  # half-width of a cross arm, as a fraction of the arm's half-length r


def shape_area(kind, r):
    """Exact area of shape `kind` of half-size r (the test checks rendered coverage against this)."""
    w = CROSS_HALF_WIDTH * r
    return {'circle': np.pi * r ** 2, 'square': 4 * r ** 2, 'triangle': np.sqrt(3) * r ** 2,
            'diamond': 2 * r ** 2, 'ring': np.pi * r ** 2 * (1 - RING_INNER ** 2),
            'cross': 8 * r * w - 4 * w ** 2}[kind]


def shape_sdf(kind, dx, dy, r):
    """Signed distance (pixels, < 0 inside) from the shape centred at 0 with half-size r; dx, dy broadcast.

    Every shape fits the box [-r, r]^2 (the triangle's height is sqrt(3) r, centred vertically). max() of
    half-plane distances is exact inside and near edges, which is all the antialiasing ramp below needs.
    """
    if kind == 'circle':
        return np.hypot(dx, dy) - r
    if kind == 'square':
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    if kind == 'diamond':
        return (np.abs(dx) + np.abs(dy) - r) / np.sqrt(2)
    if kind == 'triangle':   # equilateral, side 2r, apex up: base edge and two slanted edges (unit normals)
        h = np.sqrt(3) * r
        return np.maximum(dy - h / 2, np.sqrt(3) / 2 * np.abs(dx) - (dy + h / 2) / 2)
    if kind == 'ring':
        return np.abs(np.hypot(dx, dy) - (1 + RING_INNER) / 2 * r) - (1 - RING_INNER) / 2 * r
    if kind == 'cross':      # union of a horizontal and a vertical bar = min of their distances
        w = CROSS_HALF_WIDTH * r
        return np.minimum(np.maximum(np.abs(dx) - r, np.abs(dy) - w), np.maximum(np.abs(dx) - w, np.abs(dy) - r))
    raise ValueError(f'unknown shape {kind!r}; choose from {SHAPE_CLASSES}')


def render_shapes(labels, centres, radii, fg, bg, resolution, chunk=2048):
    """Draw one shape per image: uint8 (N, 3, R, R). centres (N, 2) as (x, y) in pixels, radii (N,), colours (N, 3).

    Coverage alpha = clip(0.5 - sdf, 0, 1) is the area of a pixel inside a straight edge through it, so edges
    are antialiased without supersampling and the summed alpha equals the shape's exact area (shape_area).
    """
    n = len(labels)
    out = np.empty((n, 3, resolution, resolution), np.uint8)
    coords = np.arange(resolution, dtype=np.float32) + 0.5   # pixel centres
    for k, kind in enumerate(SHAPE_CLASSES):
        members = np.nonzero(labels == k)[0]
        for start in range(0, len(members), chunk):
            i = members[start:start + chunk]
            dx = coords[None, None, :] - centres[i, 0, None, None]        # (n, 1, W)
            dy = coords[None, :, None] - centres[i, 1, None, None]        # (n, H, 1)
            alpha = np.clip(0.5 - shape_sdf(kind, dx, dy, radii[i, None, None]), 0, 1)  # (n, H, W)
            image = bg[i, :, None, None] + alpha[:, None] * (fg[i] - bg[i])[:, :, None, None]  # (n, 3, H, W)
            out[i] = np.rint(image * 255)
    return out


# 'palette': bright shape colours on a dark background: fewer colours for a small model to learn in minutes.
SHAPE_PALETTE = np.array([[1, 0.15, 0.15], [0.2, 0.9, 0.2], [0.25, 0.4, 1], [1, 0.9, 0.1], [0.1, 0.9, 0.9],
                          [0.95, 0.2, 0.9], [1, 0.55, 0.1], [0.95, 0.95, 0.95]], np.float32)


def sample_shape_params(rng, n, resolution, colours='palette', num_classes=len(SHAPE_CLASSES)):
    """Random class (exactly balanced), half-size, colours; the centre is left to the caller.

    colours='palette': shape colour from SHAPE_PALETTE, background uniform in [0, 0.3]^3 (dark);
    colours='random': both uniform in [0, 1]^3 (harder: a model must learn that a shape is one colour).
    """
    labels = rng.permutation(np.arange(n) % num_classes)
    radii = rng.uniform(0.2, 0.4, n).astype(np.float32) * resolution
    if colours == 'palette':
        bg = rng.uniform(0, 0.3, (n, 3)).astype(np.float32)
        fg = SHAPE_PALETTE[rng.integers(0, len(SHAPE_PALETTE), n)]
    elif colours == 'random':
        bg = rng.uniform(0, 1, (n, 3)).astype(np.float32)
        fg = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    else:
        raise ValueError(f"colours must be 'palette' or 'random', not {colours!r}")
    # Redraw shape colours too close to the background, so every shape is clearly visible (vectorised retries).
    close = np.linalg.norm(fg - bg, axis=1) < 0.5
    while close.any():
        fg[close] = rng.uniform(0, 1, (close.sum(), 3))
        close = np.linalg.norm(fg - bg, axis=1) < 0.5
    return labels, radii, fg, bg


def sample_centres(rng, radii, resolution):
    """A uniform centre that keeps the whole shape (half-size r) at least 1 pixel inside the image."""
    low = radii[:, None] + 1
    return (low + rng.uniform(0, 1, (len(radii), 2)) * (resolution - 2 * low)).astype(np.float32)


SPLITS = {'train': 0, 'test': 1}   # a split is a separate random stream of the same seed


class ShapesDataset(InMemoryDataset):
    """Coloured shapes (SHAPE_CLASSES) on a plain background, random size/position/colours, deterministic.

    20,000 images at 32 px render in about a second with numpy. `params` keeps what was drawn per image
    (centre, radius, colours), for tests and for checking samples.
    """

    def __init__(self, num_images=None,  # default 20,000 for 'train', 2,000 for 'test'
                 resolution=32,           # image side in pixels (16, 32, 64, ...)
                 seed=0,                  # same seed and split -> the same images
                 split='train',           # 'train' or 'test': independent random streams (held-out images)
                 colours='palette'):      # 'palette' (easier, the default) or 'random' RGB
        num_images = num_images or (20000 if split == 'train' else 2000)
        rng = np.random.default_rng([seed, SPLITS[split]])
        labels, radii, fg, bg = sample_shape_params(rng, num_images, resolution, colours)
        centres = sample_centres(rng, radii, resolution)
        images = render_shapes(labels, centres, radii, fg, bg, resolution)
        self.params = dict(centres=centres, radii=radii, fg=fg, bg=bg)
        super().__init__(torch.from_numpy(images), torch.from_numpy(labels), SHAPE_CLASSES)


class VideoShapesDataset(InMemoryDataset):
    """Videos (C, F, H, W): one shape moving at constant velocity from a random start to a random end point.

    Class = shape type. Both end points keep the shape inside the frame, so no frame clips it and the
    velocity (end - start) / (F - 1) pixels per frame is exactly constant. An image batch is a batch of
    one-frame videos, which is how joint video-image training (Ho et al. 2022, arXiv:2204.03458) mixes them.
    """

    def __init__(self, num_videos=None,  # default 4,000 for 'train', 400 for 'test'
                 frames=8,                # F, frames per video
                 resolution=32,           # frame side in pixels
                 seed=0,                  # same seed and split -> the same videos
                 split='train',           # 'train' or 'test'
                 colours='palette'):      # 'palette' or 'random' RGB, as for ShapesDataset
        num_videos = num_videos or (4000 if split == 'train' else 400)
        rng = np.random.default_rng([seed, SPLITS[split], 1])    # 1: a stream distinct from ShapesDataset's
        labels, radii, fg, bg = sample_shape_params(rng, num_videos, resolution, colours)
        start, end = sample_centres(rng, radii, resolution), sample_centres(rng, radii, resolution)
        t = np.linspace(0, 1, frames, dtype=np.float32)
        centres = start[:, None] + t[None, :, None] * (end - start)[:, None]    # (N, F, 2), linear in time
        rep = lambda a: np.repeat(a, frames, axis=0)                           # per video -> per frame
        images = render_shapes(rep(labels), centres.reshape(-1, 2), rep(radii), rep(fg), rep(bg), resolution)
        images = images.reshape(num_videos, frames, 3, resolution, resolution).transpose(0, 2, 1, 3, 4)
        self.params = dict(centres=centres, velocity=(end - start) / max(frames - 1, 1), radii=radii, fg=fg, bg=bg)
        super().__init__(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), SHAPE_CLASSES)


# ----------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: the IDX gz files (md5s as published and as torchvision checks them)

IDX_DATASETS = {
    'mnist': dict(
        mirrors=('https://ossci-datasets.s3.amazonaws.com/mnist/', 'http://yann.lecun.com/exdb/mnist/'),
        md5={'train-images-idx3-ubyte.gz': 'f68b3c2dcbeaaa9fbdd348bbdeb94873',
             'train-labels-idx1-ubyte.gz': 'd53e105ee54ea40749a09fcbcd1e9432',
             't10k-images-idx3-ubyte.gz': '9fb629c4189551a2d022fa330f9573f3',
             't10k-labels-idx1-ubyte.gz': 'ec29112dd5afa0611ce80d1b7f02629c'},
        classes=tuple(str(d) for d in range(10))),
    'fashion-mnist': dict(
        mirrors=('http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
                 'https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/'),
        md5={'train-images-idx3-ubyte.gz': '8d4fb7e6c68d591d4c3dfef9ec88bf0d',
             'train-labels-idx1-ubyte.gz': '25c81989df183df01b3e8a0aad5dffbe',
             't10k-images-idx3-ubyte.gz': 'bef4ecab320f06d8554ea6380940ec79',
             't10k-labels-idx1-ubyte.gz': 'bb300cfdad3c16e7a12a480ee83cd310'},
        classes=('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                 'Ankle boot')),
}


def read_idx(path):
    """Read a gzipped IDX file: magic (0, 0, type 0x08 = uint8, ndim), ndim big-endian int32 sizes, then data."""
    with gzip.open(path, 'rb') as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f'{path}: not an unsigned-byte IDX file (header {data[:4].hex()})')
    shape = struct.unpack('>' + 'i' * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class MNISTDataset(InMemoryDataset):
    """MNIST or Fashion-MNIST, 1 channel. 28x28 digits are zero-padded to 32x32 by default (so three 2x
    downsamplings divide evenly); resolution=28 keeps them as they are; any other size resizes the padded 32."""

    def __init__(self, data_dir,          # folder with the four *-ubyte.gz files (or a mnist/ sub-folder)
                 split='train',           # 'train' (60,000) or 'test' (10,000: the t10k files)
                 resolution=32,           # 28 = original, 32 = padded, else resized from the padded 32
                 download=True,           # fetch missing files (md5 checked) when online
                 variant='mnist'):        # 'mnist' or 'fashion-mnist'
        info = IDX_DATASETS[variant]
        prefix = {'train': 'train', 'test': 't10k'}[split]
        files = {f'{prefix}-images-idx3-ubyte.gz': None, f'{prefix}-labels-idx1-ubyte.gz': None}
        files = {f: info['md5'][f] for f in files}
        folder = find_files(variant, files, data_dir, info['mirrors'], download)
        images = torch.from_numpy(read_idx(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz')).copy())
        labels = torch.from_numpy(read_idx(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz')).astype(np.int64))
        images = images[:, None]                                   # (N, 1, 28, 28), background 0 -> -1
        if resolution != 28:
            images = F.pad(images, (2, 2, 2, 2))                   # (N, 1, 32, 32): pad with background
            images = resize_uint8(images, resolution)
        super().__init__(images, labels, info['classes'])


# ----------------------------------------------------------------------------------------------------
# Moving MNIST (Srivastava, Mansimov & Salakhutdinov 2015, arXiv:1502.04681, Sec. 3): digits bouncing in a box

def bounce(p, length):
    """Fold an unbounded coordinate into [0, length] as a ball bouncing off both walls (a triangle wave)."""
    m = np.mod(p, 2 * length)
    return np.where(m <= length, m, 2 * length - m)


class MovingMNISTDataset(InMemoryDataset):
    """Videos (1, F, R, R) of MNIST digits moving at constant speed, bouncing off the frame's edges.

    As in Srivastava et al. (64 x 64 frames, 28 x 28 digits, two digits), with sizes scaled to R: each digit is
    resized to round(28 R / 64) pixels; start points are uniform, directions uniform on the circle, the speed
    `speed` (default R / 16 pixels per frame); overlapping digits combine by per-pixel maximum. The digits come
    from the MNIST test file t10k (the one in ../shared/data): the 'train' split draws from its first 9,000
    images, 'test' from the last 1,000, so no digit image appears in both. One digit per video gives its class
    label (10 classes); two or more are unlabelled. Procedural and seeded: the same seed and split give the
    same videos.
    """

    def __init__(self, data_dir,             # folder with t10k-images/labels-idx?-ubyte.gz (or an mnist/ sub-folder)
                 num_videos=None,             # default 4,000 for 'train', 400 for 'test'
                 frames=8,                    # F, frames per video
                 resolution=32,               # frame side R in pixels (64 in the paper)
                 num_digits=2,                # digits per video (2 in the paper)
                 speed=None,                  # pixels per frame; default R / 16
                 seed=0,                      # same seed and split -> the same videos
                 split='train',               # 'train' or 'test' (disjoint digit images)
                 download=True):              # fetch the MNIST test files (md5 checked) when online
        num_videos = num_videos or (4000 if split == 'train' else 400)
        info = IDX_DATASETS['mnist']
        files = {f: info['md5'][f] for f in ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
        folder = find_files('mnist', files, data_dir, info['mirrors'], download)
        digits = read_idx(os.path.join(folder, 't10k-images-idx3-ubyte.gz'))       # (10000, 28, 28)
        digit_labels = read_idx(os.path.join(folder, 't10k-labels-idx1-ubyte.gz')).astype(np.int64)
        pool = np.arange(9000) if split == 'train' else np.arange(9000, 10000)
        size = max(1, round(28 * resolution / 64))                                # digit side at this scale
        speed = resolution / 16 if speed is None else speed
        rng = np.random.default_rng([seed, SPLITS[split], 2])       # 2: a stream distinct from the shapes'
        which = rng.choice(pool, size=(num_videos, num_digits))                   # (N, D) digit indices
        room = resolution - size                                                  # top-left corner range
        start = rng.uniform(0, room, size=(num_videos, num_digits, 2))
        angle = rng.uniform(0, 2 * np.pi, size=(num_videos, num_digits))
        velocity = speed * np.stack([np.cos(angle), np.sin(angle)], -1)           # (N, D, 2) px / frame
        t = np.arange(frames)[None, None, :, None]
        corners = np.rint(bounce(start[:, :, None] + t * velocity[:, :, None], room)).astype(int)  # (N, D, F, 2)
        sprites = resize_uint8(torch.from_numpy(digits[which.reshape(-1)].copy())[:, None], size)
        sprites = sprites.reshape(num_videos, num_digits, size, size).numpy()
        video = np.zeros((num_videos, frames, resolution, resolution), np.uint8)
        for n in range(num_videos):
            for d in range(num_digits):
                for f in range(frames):
                    x0, y0 = corners[n, d, f]
                    window = video[n, f, y0:y0 + size, x0:x0 + size]
                    np.maximum(window, sprites[n, d], out=window)
        self.params = dict(corners=corners, velocity=velocity, digits=which, digit_size=size)
        labels = torch.from_numpy(digit_labels[which[:, 0]]) if num_digits == 1 else None
        super().__init__(torch.from_numpy(video[:, None]), labels, info['classes'] if num_digits == 1 else None)


# ----------------------------------------------------------------------------------------------------
# CIFAR-10: the python pickles, read from the archive or the extracted folder, with a restricted unpickler

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR10_BATCHES = {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only numpy arrays and builtins: a pickle can otherwise run arbitrary code when loaded."""

    def find_class(self, module, name):
        if name == '_reconstruct' and module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
            return np.empty(0).__reduce__()[0]             # numpy's array reconstructor, wherever it lives
        if module == 'numpy' and name in ('ndarray', 'dtype'):
            return getattr(np, name)
        if (module, name) == ('_codecs', 'encode'):   # how Python 3 writes bytes at protocol 2; harmless
            import codecs
            return codecs.encode
        raise pickle.UnpicklingError(f'refusing to unpickle {module}.{name} from a CIFAR batch')


def _read_cifar_batch(f):
    batch = _ArrayUnpickler(f, encoding='latin1').load()   # latin1: the batches were pickled by Python 2
    images = np.asarray(batch['data'], np.uint8).reshape(-1, 3, 32, 32)   # rows are R, G, B planes
    return images, np.asarray(batch['labels'], np.int64)


class CIFAR10Dataset(InMemoryDataset):
    """CIFAR-10, 3 channels, 32x32 (resized when another resolution is asked for)."""

    def __init__(self, data_dir,    # folder with cifar-10-python.tar.gz or its extracted cifar-10-batches-py/
                 split='train',     # 'train' (50,000) or 'test' (10,000)
                 resolution=32,     # image side in pixels
                 download=True):    # fetch the archive (md5 checked) when online
        names = CIFAR10_BATCHES[split]
        extracted = [os.path.join(d, 'cifar-10-batches-py') for d in (data_dir, os.path.join(data_dir, 'cifar10'))]
        extracted = [d for d in extracted if all(os.path.isfile(os.path.join(d, n)) for n in names)]
        if extracted:
            parts = []
            for n in names:
                with open(os.path.join(extracted[0], n), 'rb') as f:
                    parts.append(_read_cifar_batch(f))
        else:
            archive = os.path.basename(CIFAR10_URL)
            folder = find_files('cifar10', {archive: CIFAR10_MD5}, data_dir, (CIFAR10_URL[:-len(archive)],), download,
                                hint='The extracted folder cifar-10-batches-py/ inside the data dir works too.')
            with tarfile.open(os.path.join(folder, archive), 'r:gz') as tar:
                parts = [_read_cifar_batch(tar.extractfile(f'cifar-10-batches-py/{n}')) for n in names]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        super().__init__(resize_uint8(images, resolution), labels, CIFAR10_CLASSES)


# ----------------------------------------------------------------------------------------------------
# Noto emoji: a small real colour dataset (3786 images, 10 categories) stored as npz

class EmojiDataset(InMemoryDataset):
    """Noto Color Emoji on white, labels = Unicode category (10 classes, very unbalanced: see the README).

    There is no official test split: split='train' (or 'all') gives all images; hold some out with
    torch.utils.data.random_split if needed.
    """

    def __init__(self, data_dir,      # folder with noto_emoji_32.npz / noto_emoji_64.npz (or an emoji/ sub-folder)
                 split='train',       # 'train' or 'all': every image
                 resolution=32,       # 32 and 64 are stored; other sizes are resized from the nearer one
                 base_only=False):    # keep only the 1911 emoji without a skin-tone variant
        if split not in ('train', 'all'):
            raise ValueError(f"emoji has no '{split}' split; use split='train' and torch.utils.data.random_split")
        name = 'noto_emoji_32.npz' if resolution <= 32 else 'noto_emoji_64.npz'
        md5 = {'noto_emoji_32.npz': '51c2f8385b5894b59926ed7e84d739df',     # ../shared/data/README.md
               'noto_emoji_64.npz': '76cfc94ed34be5a9a4a6d2fb2d9e4add'}[name]
        folder = find_files('emoji', {name: md5}, data_dir, download=False,   # not downloadable: built by hand
                            hint='They are in the team checkout at ../shared/data/emoji (made from the npm package '
                                 'emoji-datasource-google@16.0.0; see ../shared/data/README.md).')
        with np.load(os.path.join(folder, name)) as z:
            keep = z['skin_tone'] == '' if base_only else slice(None)
            images = torch.from_numpy(z['images'][keep]).permute(0, 3, 1, 2).contiguous()   # NHWC -> NCHW
            labels = torch.from_numpy(z['category'][keep].astype(np.int64))
            class_names = [str(c) for c in z['category_names']]
        super().__init__(resize_uint8(images, resolution), labels, class_names)


# ----------------------------------------------------------------------------------------------------
# Any folder of images: sub-folders are classes; resize the shorter side, then centre-crop

def decode_image(path):
    """One image file -> uint8 (3, H, W) at its own size; any problem is a ValueError naming the file.

    PIL's convert('RGB') clips a 16-bit image to 255 (white) and truncates a float image to 0 (black), so
    these are scaled first: 16-bit integers v -> round(v / 257) (65535 -> 255, the inverse of v * 257 that
    writes 8 bits as 16), floats must lie in [0, 1] (-> round(255 v)). Transparent images are composited on
    white (not on the black that dropping alpha would give).
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith('I') or im.mode == 'F':   # 'I;16', 'I;16B', 'I' (32-bit int), 'F' (float)
                im = Image.fromarray(high_depth_to_uint8(np.asarray(im), im.mode))
            if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
                im = Image.alpha_composite(Image.new('RGBA', im.size, 'white'), im.convert('RGBA'))
            im = im.convert('RGB')
    except Exception as e:   # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ValueError(f'cannot read image {path}: {type(e).__name__}: {e}') from None
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)   # (3, H, W)


def high_depth_to_uint8(a, mode):
    """A single-channel 16-bit, 32-bit integer or float image (H, W) -> uint8, refusing what would be misread."""
    if mode == 'F':
        if not np.isfinite(a).all():
            raise ValueError(f'float image with {int((~np.isfinite(a)).sum())} NaN/inf pixels')
        if a.min() < 0 or a.max() > 1:
            raise ValueError(f'float image with values in [{a.min():.4g}, {a.max():.4g}]; float images must be '
                             'in [0, 1] (save 8- or 16-bit integers otherwise)')
        return to_uint8(torch.from_numpy(a.astype(np.float64) * 2 - 1)).numpy()   # [0, 1] -> [-1, 1] -> uint8
    if a.min() < 0 or a.max() > 65535:   # mode 'I' holds 16-bit PNG/TIFF data; anything wider is ambiguous
        raise ValueError(f'{mode} image with values in [{a.min()}, {a.max()}] does not fit 16 bits; '
                         'save it as an 8- or 16-bit image')
    return np.rint(a.astype(np.float64) / 257).astype(np.uint8)      # 0..65535 -> 0..255


def load_image(path, resolution):
    """One image file -> uint8 (3, R, R): shorter side resized to R (PIL bicubic, antialiased), centre crop."""
    im = Image.fromarray(decode_image(path).permute(1, 2, 0).numpy())
    w, h = im.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    im = im.resize(size, Image.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)   # (3, R, R)


def list_image_folder(root):
    """(paths, labels, class_names): classes are sorted sub-folder names; with no sub-folders, unlabelled."""
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f'image folder {os.path.abspath(root)} ' + ('is a file, not a folder: give the folder '
                                   'that holds the images' if os.path.exists(root) else 'does not exist'))

    def images_under(folder):
        found = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()   # os.walk order is filesystem-dependent; sorting makes indices reproducible
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
        return found

    class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and images_under(os.path.join(root, d)))
    if class_names:
        per_class = [images_under(os.path.join(root, c)) for c in class_names]
        paths = [p for files in per_class for p in files]
        labels = [k for k, files in enumerate(per_class) for _ in files]
    else:
        paths = images_under(root)
        labels = None
    if not paths:
        raise DatasetNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) found in {os.path.abspath(root)}')
    return paths, labels, class_names


class ImageFolderDataset(InMemoryDataset):
    """A folder of images, labels from sub-folders (sorted names -> 0, 1, ...) or none.

    cache=True decodes every file up front (a bad file is reported by path before training starts) and keeps
    the uint8 tensor in memory; cache=False streams: each item is decoded from disk when asked for (by
    make_loader's DataLoader workers), raising the same message naming the file. `streaming` tells which.
    """

    def __init__(self, root,          # the folder
                 resolution=32,       # output side: shorter side resized to this, then centre-cropped
                 cache=True):         # decode everything now (fast epochs, early errors) or per item
        self.paths, labels, class_names = list_image_folder(root)
        self.cache = cache
        self.streaming = not cache
        if cache:
            images = torch.stack([load_image(p, resolution) for p in
                                  tqdm(self.paths, desc=f'reading {root}', disable=len(self.paths) < 2000)])
        else:   # a placeholder of the right shape that takes no memory (expand); __getitem__ decodes the file
            images = torch.zeros((1, 3, resolution, resolution), dtype=torch.uint8).expand(len(self.paths), -1, -1, -1)
        super().__init__(images, labels, class_names)
        if not cache:
            del self.images   # no `.images` when they are not in memory: callers must index the dataset

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        if self.cache:
            return super().__getitem__(index)
        return to_float(load_image(self.paths[index], self.resolution)), int(self.labels[index])

    def batch(self, index):
        if self.cache:
            return super().batch(index)
        items = [self[int(i)] for i in index]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


# ----------------------------------------------------------------------------------------------------
# A folder of clips: each clip a sub-folder of frame images (sorted by name) or an animated GIF

def resize_crop(im, resolution):
    """PIL image -> uint8 (3, R, R): shorter side resized to R (bicubic, antialiased), centre crop."""
    w, h = im.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    im = im.convert('RGB').resize(size, Image.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return torch.from_numpy(np.asarray(im.crop((left, top, left + resolution, top + resolution))).copy()).permute(2, 0, 1)


def load_clip(path, frames, resolution):
    """A GIF file or a folder of frame images -> uint8 (3, F, R, R): its first F frames, each resized/cropped."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        pictures = [load_image(os.path.join(path, f), resolution) for f in files[:frames]]
    else:
        try:
            with Image.open(path) as im:
                pictures = []
                for i in range(min(frames, getattr(im, 'n_frames', 1))):
                    im.seek(i)           # GIF frames may be partial updates; PIL composes the full frame
                    pictures.append(resize_crop(im, resolution))
        except Exception as e:
            raise ValueError(f'cannot read clip {path}: {type(e).__name__}: {e}') from None
    if len(pictures) < frames:
        raise ValueError(f'clip {path} has {len(pictures)} frames, fewer than frames={frames}; '
                         'lower --frames or remove the clip')
    return torch.stack(pictures, dim=1)                                   # (3, F, R, R)


class ClipFolderDataset(InMemoryDataset):
    """Videos (3, F, R, R) from a folder whose entries are clips: sub-folders of frames or .gif files.

    Frames of a sub-folder are taken in sorted name order (name them 0000.png, 0001.png, ...); a longer clip
    contributes its first F frames; a shorter one is an error naming it. Unlabelled.
    """

    def __init__(self, root,          # the folder of clips
                 frames=8,            # F, frames per clip
                 resolution=32):      # frame side: shorter side resized to this, then centre-cropped
        if not os.path.isdir(root):
            raise DatasetNotFoundError(f'clip folder {os.path.abspath(root)} ' + ('is a file, not a folder of clips'
                                       if os.path.exists(root) else 'does not exist'))
        entries = sorted(os.listdir(root))
        self.paths = [os.path.join(root, e) for e in entries
                      if os.path.isdir(os.path.join(root, e)) or e.lower().endswith('.gif')]
        if not self.paths:
            raise DatasetNotFoundError(f'no clips (sub-folders of frames or .gif files) in {os.path.abspath(root)}')
        videos = torch.stack([load_clip(p, frames, resolution) for p in
                              tqdm(self.paths, desc=f'reading {root}', disable=len(self.paths) < 500)])
        super().__init__(videos)


# ----------------------------------------------------------------------------------------------------
# Feeding batches: in memory by slicing, from disk through a DataLoader with workers

class _IndexBatches:
    """The batch_sampler a DataLoader wants: an iterable of index lists, here the caller's index tensors."""

    def __init__(self, batch_indices):
        self.batch_indices = batch_indices

    def __iter__(self):
        return ([int(i) for i in index] for index in self.batch_indices)


def make_loader(dataset, batch_indices, num_workers=0):
    """Iterator of (x, y) batches, one per index tensor of the iterable `batch_indices`, in that order.

    The caller chooses every index (train.py draws them from a (seed, step, rank) generator), so the batches,
    and a resumed run, do not depend on how they are read. In-memory datasets are sliced directly (faster than
    any worker). A streaming dataset goes through a torch DataLoader with `num_workers` processes decoding
    files in parallel; its workers pull indices ahead of use (prefetch_factor = 2 batches per worker), so
    `batch_indices` must be computable in advance: a function of the step, never of the training state.
    """
    if not getattr(dataset, 'streaming', False):
        return (dataset.batch(index) for index in batch_indices)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_IndexBatches(batch_indices),
                                         num_workers=num_workers, persistent_workers=False)
    return iter(loader)   # default collate: x stacked (B, C, H, W), y a long tensor (B,), as batch() gives


def holdout_split(num_items, seed=0, every=20, max_held_out=1000):
    """(train_index, val_index): one item in `every` (at most max_held_out), fixed by the seed, held out.

    The held-out items give a validation loss; rising while the training loss falls is the sign of
    memorisation on a small dataset. Fewer than `every` items hold out nothing: val_index is then EMPTY, and
    the caller must skip the validation loss and say so (a mean over no images is NaN, not a loss).
    """
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    n_val = min(max_held_out, num_items // every)
    return order[n_val:], order[:n_val]


# ----------------------------------------------------------------------------------------------------
# One entry point for train.py / sample.py / evaluate.py

DATASETS = ('shapes', 'video-shapes', 'moving-mnist', 'mnist', 'fashion-mnist', 'cifar10', 'emoji', 'folder:<path>',
            'clips:<path>')
DEFAULT_MEMORY_BUDGET = 4 << 30   # bytes of decoded uint8 images a folder may take in memory (4 GiB)


def is_video_dataset(name):
    """Whether load_dataset(name) gives videos (N, C, F, H, W), known from the name alone (before any reading)."""
    key = name.lower().replace('_', '-')
    return key in ('video-shapes', 'videoshapes', 'moving-mnist', 'movingmnist') or key.startswith('clips:')


def load_dataset(name='shapes', data_dir=None, split='train', resolution=None, download=True, seed=0,
                 memory_budget=DEFAULT_MEMORY_BUDGET, **kw):
    """Build a dataset by name (see DATASETS). data_dir defaults to ./data; resolution to 32.

    An image folder whose decoded size (N x 3 x R x R bytes) exceeds memory_budget streams from disk
    (dataset.streaming is True; read it with make_loader); a smaller one is decoded once into memory.
    The other sources are small enough to stay in memory. Extra keywords go to the class: num_images
    (shapes), num_videos/frames (video-shapes, moving-mnist; also num_digits/speed), frames (clips),
    base_only (emoji), path/cache (folder; cache overrides the budget).
    """
    data_dir = data_dir if data_dir is not None else 'data'
    resolution = resolution or 32
    key = name.lower().replace('_', '-')
    if key == 'shapes':
        return ShapesDataset(kw.pop('num_images', None), resolution, seed, split, **kw)
    if key in ('video-shapes', 'videoshapes'):
        return VideoShapesDataset(kw.pop('num_videos', None), kw.pop('frames', 8), resolution, seed, split, **kw)
    if key in ('moving-mnist', 'movingmnist'):
        return MovingMNISTDataset(data_dir, kw.pop('num_videos', None), kw.pop('frames', 8), resolution,
                                  seed=seed, split=split, download=download, **kw)
    if key.startswith('clips:'):
        if split != 'train':
            raise ValueError(f"a clip folder has only one split; got split={split!r}")
        return ClipFolderDataset(name.split(':', 1)[1], kw.pop('frames', 8), resolution)
    if key in ('mnist', 'fashion-mnist', 'fashionmnist'):
        variant = 'mnist' if key == 'mnist' else 'fashion-mnist'
        return MNISTDataset(data_dir, split, resolution, download, variant)
    if key in ('cifar10', 'cifar-10'):
        return CIFAR10Dataset(data_dir, split, resolution, download)
    if key == 'emoji':
        return EmojiDataset(data_dir, split, resolution, **kw)
    if key == 'folder' or key.startswith('folder:'):
        path = name.split(':', 1)[1] if ':' in name else kw.pop('path', data_dir)
        if split != 'train':
            raise ValueError(f"an image folder has only one split; got split={split!r}")
        if 'cache' not in kw:   # decide from the size the decoded images would take
            kw['cache'] = len(list_image_folder(path)[0]) * 3 * resolution ** 2 <= memory_budget
        return ImageFolderDataset(path, resolution, **kw)
    raise ValueError(f'unknown dataset {name!r}; choose from {", ".join(DATASETS)}')


# ----------------------------------------------------------------------------------------------------

if __name__ == '__main__':
    # 1. The default dataset: render time, class balance, and rendered area vs the exact area per class.
    t0 = time.perf_counter()
    ds = ShapesDataset(num_images=20000, resolution=32, seed=0)
    print(f'shapes: {len(ds)} images {tuple(ds.images.shape[1:])} in {time.perf_counter() - t0:.2f} s, '
          f'range [{to_float(ds.images).min():.0f}, {to_float(ds.images).max():.0f}]')
    img = ds.images.float().numpy() / 255
    fg, bg = ds.params['fg'][:, :, None, None], ds.params['bg'][:, :, None, None]
    alpha = ((img - bg) * (fg - bg)).sum(1) / ((fg - bg) ** 2).sum(1)     # coverage recovered from colours
    for k, kind in enumerate(SHAPE_CLASSES):
        sel = ds.labels.numpy() == k
        ratio = alpha[sel].sum((1, 2)) / shape_area(kind, ds.params['radii'][sel])
        print(f'  {kind:9s} n={sel.sum():5d}  rendered area / exact area = {ratio.mean():.3f}')
    # 2. Moving shapes: the centre moves the same number of pixels every frame.
    vids = VideoShapesDataset(num_videos=100, frames=8)
    print(f'video-shapes: {tuple(vids.images.shape)}; video 0 moves {vids.params["velocity"][0].round(2)} px/frame')
    # 3. Streaming: a folder over the memory budget is read from disk, batch by batch, with the same result.
    import tempfile
    with tempfile.TemporaryDirectory() as root:
        for i in range(64):
            Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(os.path.join(root, f'{i:02d}.png'))
        in_memory = load_dataset(f'folder:{root}')
        streamed = load_dataset(f'folder:{root}', memory_budget=64 * 3 * 32 * 32 - 1)   # one byte too few
        batches = [torch.arange(i, i + 16) for i in range(0, 64, 16)]
        same = all(torch.equal(a[0], b[0]) for a, b in zip(make_loader(in_memory, batches),
                                                            make_loader(streamed, batches, num_workers=2)))
        print(f'folder of 64 PNGs: streaming={streamed.streaming}; 4 batches through 2 workers equal the '
              f'in-memory ones: {same}')
