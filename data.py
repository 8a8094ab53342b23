"""
Datasets for training diffusion models, and augmentation that the network is told about.

Sources (every one gives float tensors in [-1, 1]: images (C, H, W), videos (C, F, H, W), plus an int label):
  shapes         procedural coloured shapes, 6 classes, no files needed (the default: `python train.py` runs anywhere)
  video-shapes   procedural shapes moving at constant velocity over F frames, for the video model
  mnist          LeCun, Bottou, Bengio & Haffner 1998, "Gradient-Based Learning Applied to Document Recognition"
  fashion-mnist  Xiao, Rasul & Vollgraf 2017, "Fashion-MNIST", arXiv:1708.07747
  cifar10        Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images" (tech. report)
  emoji          Google Noto Color Emoji (Apache 2.0), packed as noto_emoji_{32,64}.npz (see ../shared/data/README.md)
  folder:<path>  any folder of images; one sub-folder per class, or none (unlabelled)

Augmentation regularisation for small datasets:
  Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data" (ADA), arXiv:2006.06676
  Jun et al. 2020, "Distribution Augmentation for Generative Modeling", ICML 2020 (condition on the augmentation)
  Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), arXiv:2206.00364, App. C.4

  x_aug = A_a(x0),  a ~ p(a)                      a random transform, parameters a (the "augmentation label")
  loss  = || D(x_aug + n, sigma, aug_cond=a) - x_aug ||^2        the denoiser is told a, so it learns p(x | a)
  sample with aug_cond = 0 (a = identity)  ->  p(x | identity) = p(x0): the augmentations cannot "leak"
Without the label the model would learn the mixture sum_a p(A_a x0) and generate flipped/rotated images (ADA Sec. 2.2).

aug_cond layout (AUG_COND_NAMES, AUG_DIM = 10 floats per image; 0 everywhere = "no augmentation"):
  0 xflip       1 if mirrored left-right, else 0
  1 yflip       1 if mirrored top-bottom, else 0
  2 rot90_cos   cos(k pi/2) - 1   } k counter-clockwise quarter turns (torch.rot90), k = 0 gives (0, 0)
  3 rot90_sin   sin(k pi/2)       }   (EDM's cos-1 / sin encoding of an angle, so the identity is zero)
  4 translate_x integer shift right, in pixels / W   (reflect padding at the border, as in ADA/EDM)
  5 translate_y integer shift down,  in pixels / H
  6 log2_scale  log2 of the isotropic zoom about the centre (bilinear resampling, reflect padding)
  7 brightness  b added to every pixel (in the [-1, 1] scale)
  8 log2_contrast    log2 c: x -> c x (about mid-grey 0)
  9 log2_saturation  log2 s: x -> mean_c(x) + s (x - mean_c(x)); 0 for 1-channel images
Applied in this order; invert_augment undoes them in reverse. Colour changes are not clipped, so augmented pixels
may leave [-1, 1] slightly (EDM/ADA do not clip either); that keeps every step exactly invertible.

Usage: ds = load_dataset('shapes'); x, y = ds[0]            # x: (3, 32, 32) in [-1, 1], y in 0..5
       x_aug, aug_cond = AugmentPipe(p=0.15)(x_batch, generator=g)
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

def load_image(path, resolution):
    """One image file -> uint8 (3, R, R): shorter side resized to R (PIL bicubic, antialiased), centre crop.

    Transparent images are composited on white (not on the black that dropping alpha would give).
    Any decoding problem is raised as ValueError naming the file.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
                im = Image.alpha_composite(Image.new('RGBA', im.size, 'white'), im.convert('RGBA'))
            im = im.convert('RGB')
    except Exception as e:   # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ValueError(f'cannot read image {path}: {type(e).__name__}: {e}') from None
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
        raise DatasetNotFoundError(f'image folder {os.path.abspath(root)} does not exist')

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
    the uint8 tensor in memory; cache=False decodes per item, raising the same message naming the file.
    """

    def __init__(self, root,          # the folder
                 resolution=32,       # output side: shorter side resized to this, then centre-cropped
                 cache=True):         # decode everything now (fast epochs, early errors) or per item
        self.paths, labels, class_names = list_image_folder(root)
        self.cache = cache
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
# One entry point for train.py / sample.py / evaluate.py

DATASETS = ('shapes', 'video-shapes', 'mnist', 'fashion-mnist', 'cifar10', 'emoji', 'folder:<path>')


def load_dataset(name='shapes', data_dir=None, split='train', resolution=None, download=True, seed=0, **kw):
    """Build a dataset by name (see DATASETS). data_dir defaults to ./data; resolution to 32.

    Extra keywords go to the class: num_images (shapes), num_videos/frames (video-shapes),
    base_only (emoji), path/cache (folder).
    """
    data_dir = data_dir if data_dir is not None else 'data'
    resolution = resolution or 32
    key = name.lower().replace('_', '-')
    if key == 'shapes':
        return ShapesDataset(kw.pop('num_images', None), resolution, seed, split, **kw)
    if key in ('video-shapes', 'videoshapes'):
        return VideoShapesDataset(kw.pop('num_videos', None), kw.pop('frames', 8), resolution, seed, split, **kw)
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
        return ImageFolderDataset(path, resolution, **kw)
    raise ValueError(f'unknown dataset {name!r}; choose from {", ".join(DATASETS)}')


# ----------------------------------------------------------------------------------------------------
# Augmentation with labels (ADA's pipeline, EDM App. C.4): sample parameters, apply, invert

AUG_COND_NAMES = ('xflip', 'yflip', 'rot90_cos', 'rot90_sin', 'translate_x', 'translate_y', 'log2_scale',
                  'brightness', 'log2_contrast', 'log2_saturation')
AUG_DIM = len(AUG_COND_NAMES)


def _per_sample(v, x):
    """(N,) -> (N, 1, 1, ...) broadcastable against x."""
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def _translate(x, tx, ty):
    """Shift each image by integer (tx, ty) pixels (right, down) with reflect padding: gather along W then H."""
    N, H, W = x.shape[0], x.shape[-2], x.shape[-1]

    def reflect(i, n):   # mirror index i into [0, n-1] without repeating the edge pixel (period 2n - 2)
        i = torch.remainder(i, 2 * n - 2)
        return torch.where(i >= n, 2 * n - 2 - i, i)

    cols = reflect(torch.arange(W, device=x.device)[None] - tx[:, None], W)   # (N, W) source column per output
    rows = reflect(torch.arange(H, device=x.device)[None] - ty[:, None], H)   # (N, H) source row per output
    x = x.gather(-1, cols[:, None, None, :].expand(N, x.shape[1], H, W))
    return x.gather(-2, rows[:, None, :, None].expand(N, x.shape[1], H, W))


def _scale(x, log2_s):
    """Zoom by s = 2^log2_s about the image centre: out(p) = in(p / s), bilinear, reflect padding."""
    todo = torch.nonzero(log2_s != 0).flatten()
    if len(todo) == 0:
        return x
    inv_s = torch.exp2(-log2_s[todo]).to(x.dtype)
    theta = torch.zeros(len(todo), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = inv_s               # grid coords are in [-1, 1] around the centre
    grid = F.affine_grid(theta, (len(todo), *x.shape[1:]), align_corners=False)
    x = x.clone()
    x[todo] = F.grid_sample(x[todo], grid, mode='bilinear', padding_mode='reflection', align_corners=False)
    return x


def _geometric(x, cond, inverse=False):
    """Flips, quarter turns, integer translation and scaling of (N, C', H, W), as recorded in aug_cond."""
    W = x.shape[-1]
    xflip, yflip = cond[:, 0] > 0.5, cond[:, 1] > 0.5
    k = torch.round(torch.atan2(cond[:, 3], cond[:, 2] + 1) / (torch.pi / 2)).long() % 4   # angle -> turns
    tx, ty = torch.round(cond[:, 4] * W).long(), torch.round(cond[:, 5] * x.shape[-2]).long()

    def flips(x):
        x = torch.where(_per_sample(xflip, x).bool(), x.flip(-1), x)
        return torch.where(_per_sample(yflip, x).bool(), x.flip(-2), x)

    def turns(x, sign):
        x = x.clone()
        for turn in (1, 2, 3):   # per-sample quarter turns, one group at a time
            idx = torch.nonzero(k == turn).flatten()
            if len(idx):
                assert x.shape[-1] == x.shape[-2], 'quarter turns need square images'
                x[idx] = torch.rot90(x[idx], sign * turn, dims=(-2, -1))
        return x

    if not inverse:
        return _scale(_translate(turns(flips(x), 1), tx, ty), cond[:, 6])
    return flips(turns(_translate(_scale(x, -cond[:, 6]), -tx, -ty), -1))


def _colour(x, cond, inverse=False):
    """Brightness, contrast (about 0), saturation (about the channel mean) of (N, C, ...).

    Written so that a zero entry is the exact identity in floating point (x + 0, x * 1, x + 0 * (...)),
    which keeps p = 0 and aug_cond = 0 bit-exact no-ops.
    """
    b, c, s = _per_sample(cond[:, 7], x), torch.exp2(_per_sample(cond[:, 8], x)), torch.exp2(_per_sample(cond[:, 9], x))
    saturate = lambda x, s: x + (s - 1) * (x - x.mean(dim=1, keepdim=True))   # the grey axis mean_c(x) is kept
    if not inverse:
        return saturate((x + b) * c, s)
    return saturate(x, 1 / s) / c - b


def apply_augment(x, aug_cond):
    """Apply exactly the transform that aug_cond (N, AUG_DIM) describes to x (N, C, H, W) or (N, C, F, H, W)."""
    shape = x.shape
    x = _geometric(x.reshape(shape[0], -1, *shape[-2:]), aug_cond).reshape(shape)   # frames move together
    return _colour(x, aug_cond)


def invert_augment(x, aug_cond):
    """Undo apply_augment (exact for flips, turns and colour; translation/scaling lose what left the frame)."""
    shape = x.shape
    x = _colour(x, aug_cond, inverse=True)
    return _geometric(x.reshape(shape[0], -1, *shape[-2:]), aug_cond, inverse=True).reshape(shape)


class AugmentPipe:
    """Draws augmentation parameters per image, each transform switched on with probability p (ADA Sec. 2.3).

    p around 0.1-0.2 suits a few thousand images (ADA Fig. 5); the label makes even p = 1 safe for diffusion
    (EDM trains CIFAR-10 with p = 0.12), but too high a p spends capacity on images never sampled.
    Set a strength to 0/False to disable that transform; its aug_cond entries then stay 0.
    """

    def __init__(self, p=0.12,              # probability of each transform, independently per image
                 xflip=True, yflip=True,    # mirror left-right / top-bottom
                 rotate90=True,             # k = 1, 2 or 3 quarter turns
                 translate=0.125,           # max integer shift, as a fraction of the side (ADA's xint_max)
                 scale_std=0.2,             # std of log2 zoom (ADA's scale_std)
                 brightness_std=0.2,        # std of the added offset, [-1, 1] units (ADA)
                 contrast_std=0.5,          # std of log2 contrast (ADA)
                 saturation_std=1.0):       # std of log2 saturation (ADA)
        self.p, self.xflip, self.yflip, self.rotate90 = p, xflip, yflip, rotate90
        self.translate, self.scale_std = translate, scale_std
        self.brightness_std, self.contrast_std, self.saturation_std = brightness_std, contrast_std, saturation_std

    def sample(self, n, channels=3, resolution=32, generator=None):
        """aug_cond (n, AUG_DIM) on the generator's device (CPU by default)."""
        dev = generator.device if generator is not None else 'cpu'
        rand = lambda *s: torch.rand(*s, generator=generator, device=dev)
        randn = lambda *s: torch.randn(*s, generator=generator, device=dev)
        on = lambda enabled: (rand(n) < self.p) & bool(enabled)          # Bernoulli(p) gate per image
        cond = torch.zeros(n, AUG_DIM, device=dev)
        cond[:, 0] = on(self.xflip).float()
        cond[:, 1] = on(self.yflip).float()
        k = torch.where(on(self.rotate90), 1 + (rand(n) * 3).long(), 0)   # 1..3 turns when applied
        angle = k * (torch.pi / 2)
        cond[:, 2], cond[:, 3] = torch.round(torch.cos(angle)) - 1, torch.round(torch.sin(angle))
        m = round(self.translate * resolution)   # max shift in pixels; a shift of 0 may be drawn
        shift = (rand(n, 2) * (2 * m + 1)).long() - m                     # uniform integers in [-m, m]
        cond[:, 4:6] = torch.where(on(m > 0)[:, None], shift, 0) / resolution   # one gate for both axes
        cond[:, 6] = torch.where(on(self.scale_std), randn(n) * self.scale_std, 0)
        cond[:, 7] = torch.where(on(self.brightness_std), randn(n) * self.brightness_std, 0)
        cond[:, 8] = torch.where(on(self.contrast_std), randn(n) * self.contrast_std, 0)
        cond[:, 9] = torch.where(on(self.saturation_std and channels == 3), randn(n) * self.saturation_std, 0)
        return cond

    def __call__(self, x, generator=None):
        """(x_aug, aug_cond) for a batch x (N, C, [F,] H, W) in [-1, 1]; aug_cond = 0 where nothing was applied."""
        cond = self.sample(len(x), x.shape[1], x.shape[-1], generator).to(x.device)
        return apply_augment(x, cond), cond


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
    # 2. Augmentation: what was applied is in aug_cond, and inverting it recovers the image.
    x, _ = ds.batch(torch.arange(8))
    g = torch.Generator().manual_seed(0)
    x_aug, cond = AugmentPipe(p=0.5, translate=0, scale_std=0)(x, generator=g)
    print('aug_cond of image 0:', dict(zip(AUG_COND_NAMES, [round(v, 3) for v in cond[0].tolist()])))
    print(f'max |invert(augment(x)) - x| = {(invert_augment(x_aug, cond) - x).abs().max():.2e}  (expect ~1e-6)')
    # 3. Moving shapes: the centre moves the same number of pixels every frame.
    vids = VideoShapesDataset(num_videos=100, frames=8)
    print(f'video-shapes: {tuple(vids.images.shape)}; video 0 moves {vids.params["velocity"][0].round(2)} px/frame')
