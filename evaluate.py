"""The evaluation command line: FID, KID, IS, precision/recall and memorisation of images, FVD/KVD of videos.

The metrics themselves are pure functions of features in metrics.py (Heusel et al. 2017 FID, Binkowski et al.
2018 KID, Salimans et al. 2016 IS, Kynkaanniemi et al. 2019 precision/recall, Gu et al. 2023 memorisation; read
it first), and the FID feature network is inception.py: FID = inception.py + metrics.py, both copyable alone.
This file adds what a command needs around them: reading images, videos and statistics files; the feature
networks (Inception, I3D for FVD (Unterthiner et al. 2019, arXiv:1812.01717), and a small LeNet trained on the
data for offline machines); sampling a train.py checkpoint through sample.py; and checking every input and output
path before any long computation. The metrics are re-exported here (evaluate.frechet_distance, evaluate.kid, ...).

A score's name says how it was made (metrics.metric_name):
  FID, KID, IS        Inception with the pytorch-fid/TF resize ('legacy', the default): comparable with papers
  clean-FID, ...      Inception with antialiased bicubic resizing (--resize clean, Parmar et al. 2022,
                      "On Aliased Resizing and Surprising Subtleties in GAN Evaluation", arXiv:2104.11222)
  FD_lenet, KD_lenet  Frechet/kernel distance in LeNet features: a different scale, never called FID
  FVD, KVD            videos (N, C, F, H, W): Frechet/kernel distance of the 400 time-averaged I3D logits
  FD_c3d, KD_c3d      videos: the same on C3D's fc7 features (--video-features c3d; TGANv2's 'FID', c3d.py)
  IS_c3d              videos: the video Inception Score of TGAN on C3D's UCF-101 logits (--metrics vis)
  frame-FID, ...      videos scored frame by frame with an image network: appearance only, blind to motion
Reference statistics remember the network's name, resize and a hash of its weights, and are refused when any
differs from the run's. An output never replaces an input, and an existing file only with --overwrite.

Conventions: images are float tensors in [0, 1] (or uint8 in [0, 255]), shape (N, C, H, W), C = 1 or 3, any
size; features are (N, D) arrays; statistics are float64 numpy.

Usage:  python sample.py --ckpt runs/x/ckpt.pt -n 2000 --npz samples.npz   # samples of a checkpoint
        python evaluate.py samples.npz reference_folder/ --metrics fid,kid,is,pr
        python evaluate.py runs/x/ckpt.pt ref_stats.npz --num-gen 2000    # sample and score a checkpoint
        python evaluate.py samples.npz ref_stats.npz      # cached statistics (--save-stats makes them)
        python evaluate.py --video fake.npz real_clips/ --metrics fvd,kvd,fid   # videos: FVD + frame-wise
        python evaluate.py --demo          # closed-form checks that need no weights (python metrics.py)
"""
import argparse
import hashlib
import json
import math
import os
import pickle
import sys
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
from c3d import C3D_MEAN_NAME, C3D_WEIGHTS_NAME, load_c3d   # C3D: FD_c3d/KD_c3d features and the video IS (TGAN)
from i3d import I3D_WEIGHTS_ENV, I3D_WEIGHTS_NAME, load_i3d
from inception import (FID_WEIGHTS_ENV, FID_WEIGHTS_NAME, FID_WEIGHTS_URL, FIDInceptionV3,  # noqa: F401 (re-exported)
                       find_inception_weights, load_inception, resize_images)
from metrics import (METRICS, check_statistics_match, clip_rounding_noise, compute_metrics,  # noqa: F401 (re-exported)
                     compute_statistics, demo, feature_statistics, format_results, frechet_distance, inception_score,
                     kid, knn_radii, loss_gap_report, manifold_coverage, memorization_check, metric_name,
                     mmd2_unbiased, nearest_neighbours, pairwise_distances, per_class_fd, polynomial_kernel,
                     precision_recall, to_unit_float, trace_sqrt_product)
from lenet import LeNetFeatures, lenet_from_state_dict, train_classifier  # noqa: F401 (FD_lenet's network; re-exported)
from runs import atomic_write, check_output_path  # the command layer's one atomic write and one output-path check

VIDEO_METRICS = ('fvd', 'kvd', 'vis', 'motion') + METRICS   # --video: vis = C3D's video IS; motion: motion.py;
                                                         # fid, kid, is, pr frame-wise
MAX_NUM_GEN = 10 ** 6                      # --num-gen: 20x the 50,000 of a headline FID


# ----------------------------------------------------------------------------------------------------
# Memorisation report as a picture (metrics.memorization_check finds the pairs)

def save_nearest_pairs(samples, train, nearest, ratio, path, num_pairs=16):
    """PNG grid of the closest (sample | nearest training image) pairs, closest first."""
    order = np.argsort(ratio)[:num_pairs]
    samples, train = to_unit_float(torch.as_tensor(samples)), to_unit_float(torch.as_tensor(train))
    pairs = [torch.cat([samples[i], train[nearest[i]]], dim=2) for i in order]  # side by side, (C, H, 2W)
    grid = torch.cat([F.pad(p, (2, 2, 2, 2), value=1.0) for p in pairs], dim=1)  # stacked vertically
    grid = grid.expand(3, -1, -1) if grid.shape[0] == 1 else grid
    image = Image.fromarray(data.to_uint8(grid.permute(1, 2, 0) * 2 - 1).numpy())  # [0, 1] -> [-1, 1] -> uint8
    atomic_write(path, lambda tmp: image.save(tmp, format='PNG'))


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


# ----------------------------------------------------------------------------------------------------
# Remembering which network made the features

def network_id(model):
    """First 16 hex digits of the sha256 of a feature network's weights (names, shapes and values).

    Stored with reference statistics: two LeNets trained on the same data share a name but not a feature
    space (the Frechet distance between their statistics was 970 where the right one gave 41.7).
    """
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(f'{key} {tuple(value.shape)} {value.dtype}'.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())  # contiguous: NHWC copies hash alike
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Images in, features out

def open_npz(path):
    """np.load of an .npz with the file named in every error (a damaged file, a pickle, not a zip)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist')
    try:
        return np.load(path, allow_pickle=False)  # never unpickle: an .npz can carry code otherwise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f'cannot read {path} as an .npz of arrays: {e}') from None


def float_images_to_uint8(x, source):
    """Float images in [0, 1] or [-1, 1] (data.py's range) -> uint8, refusing what would be misread.

    One NaN makes x.min() < 0 false, which silently decoded [-1, 1] data as [0, 1]: non-finite pixels and
    values outside [-1, 1] are errors. Data whose minimum is >= 0 is read as [0, 1].
    """
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(f'{source}: {int(bad.sum())} pixel values are NaN or infinite (first at index '
                         f'{tuple(int(i) for i in np.argwhere(bad)[0])}); fix or drop those images')
    low, high = float(x.min()), float(x.max())
    if low < -1 - 1e-6 or high > 1 + 1e-6:
        raise ValueError(f'{source}: float pixel values in [{low:.4g}, {high:.4g}]; float images must be in '
                         '[0, 1] or [-1, 1] (save 0..255 values as uint8)')
    signed = x if low < 0 else 2 * np.asarray(x, np.float64) - 1  # [0, 1] -> [-1, 1], data.py's range
    print(f"note: {source} holds {x.dtype} values in [{low:.3g}, {high:.3g}]: read as images in "
          f"{'[-1, 1]' if low < 0 else '[0, 1]'} and quantized to uint8 (as a PNG of them would be)")
    return data.to_uint8(torch.from_numpy(signed)).numpy()  # the one [-1, 1] -> uint8 conversion


def load_images(path, limit=None):
    """A folder of image files or an .npz (first array; NHWC or NCHW) -> uint8 tensor (N, C, H, W).

    Folders are read with data.decode_image (16-bit and float files scaled correctly, alpha on white) at
    their own size, which must be the same for every file: a file of another size is named.
    """
    if path.endswith('.npz'):
        with open_npz(path) as npz:
            if not npz.files:
                raise ValueError(f'{path} holds no arrays')
            key = next((k for k in ('images', 'samples', 'x', 'arr_0') if k in npz), npz.files[0])
            x = npz[key][:limit]
        if x.ndim == 3:
            x = x[:, None]  # (N, H, W) gray
        if x.ndim != 4:
            raise ValueError(f'{path}: array {key!r} has shape {x.shape}; expected images (N, H, W, C) or (N, C, H, W)')
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)  # NHWC (the guided-diffusion reference batches) -> NCHW
        if x.shape[1] not in (1, 3):
            raise ValueError(f'{path}: array {key!r} has shape {x.shape}: neither NHWC nor NCHW with 1 or 3 channels')
        if x.dtype != np.uint8:
            x = float_images_to_uint8(x, f'{path} (array {key!r})')
        return torch.from_numpy(np.ascontiguousarray(x))
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} does not exist')
    if not os.path.isdir(path):
        raise ValueError(f'{path} is neither a folder of images nor an .npz file')
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if f.lower().endswith(data.IMAGE_EXTENSIONS))[:limit]
    if not files:
        raise FileNotFoundError(f'no images ({", ".join(data.IMAGE_EXTENSIONS)}) found under {path}')
    images = []
    for f in tqdm(files, desc=f'reading {path}', disable=len(files) < 2000):
        images.append(data.decode_image(f))  # (3, H, W) uint8; a file it cannot read is named
        if images[-1].shape != images[0].shape:  # one size per folder: checked before any feature is computed
            raise ValueError(f'{f} is {images[-1].shape[2]}x{images[-1].shape[1]} but {files[0]} is '
                             f'{images[0].shape[2]}x{images[0].shape[1]}: every image of a folder must have the '
                             'same size (resize them first)')
    return torch.stack(images)


def load_labels(path):
    """Class labels stored beside the images in an .npz ('labels' or 'y'), else None.

    sample.py writes an empty 'labels' array for unconditional samples: that counts as no labels.
    """
    if not path.endswith('.npz'):
        return None
    with open_npz(path) as npz:
        key = next((k for k in ('labels', 'y') if k in npz), None)
        return None if key is None or npz[key].size == 0 else npz[key].astype(np.int64)


def is_statistics_file(path):
    if not path.endswith('.npz'):
        return False
    with open_npz(path) as npz:
        return 'mu' in npz and 'sigma' in npz


@torch.no_grad()
def extract_features(images, model, batch_size=50, device='cpu', return_logits=False, progress=True):
    """Run `model` over images (tensor/array (N, C, H, W), uint8 or [0, 1]) in batches -> numpy (N, D)."""
    images = torch.as_tensor(images)
    if images.ndim != getattr(model, 'input_ndim', 4):   # video networks (I3D, FrameFeatures) take 5-D input
        layout = '(N, C, F, H, W) videos' if getattr(model, 'input_ndim', 4) == 5 else '(N, C, H, W) images'
        raise ValueError(f'{model.name} features need {layout}, got shape {tuple(images.shape)}')
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
# Videos (N, C, F, H, W): I3D features for FVD/KVD, and any image network applied frame by frame

class VideoFeatures(nn.Module):
    """The I3D of i3d.py behind extract_features' interface: videos in [0, 1] -> (N, 400) time-averaged logits.

    Those logits are FVD's features (Unterthiner et al. 2019); scores are named FVD and KVD (metric_name).
    Clips go through in chunks: one 16-frame clip at 224 x 224 takes ~0.2 GB of activations.
    """

    name, resize, input_ndim = 'i3d', 'bilinear', 5   # resize: I3D's fixed protocol (224 x 224 bilinear)

    def __init__(self, i3d, chunk=8):
        super().__init__()
        self.i3d = i3d         # i3d.InceptionI3d in eval mode (load_i3d)
        self.chunk = chunk     # clips per forward pass

    def forward(self, x, return_logits=False):
        if return_logits:
            raise ValueError('I3D has no Inception Score; its logits are already the FVD features')
        return torch.cat([self.i3d(part) for part in x.split(self.chunk)])


class FrameFeatures(nn.Module):
    """An image feature network on every frame: videos (N, C, F, H, W) -> (N * F, D) features (and logits).

    Frame-wise FID/KID/IS treat the frames of all videos as one set of images; they measure appearance and
    are blind to motion (shuffling frames within a video leaves them unchanged). Named frame-FID etc.
    """

    input_ndim = 5

    def __init__(self, image_net, chunk=100):
        super().__init__()
        self.image_net = image_net                        # FIDInceptionV3 or LeNetFeatures
        self.name = image_net.name + '/frames'            # metric_name turns this into frame-FID, frame-FD_lenet
        self.resize = getattr(image_net, 'resize', 'legacy')
        self.chunk = chunk                                # frames per forward pass of the image network

    def forward(self, x, return_logits=False):
        frames = x.transpose(1, 2).flatten(0, 1)          # (N*F, C, H, W), video by video, frame by frame
        outs = [self.image_net(part, return_logits=return_logits) for part in frames.split(self.chunk)]
        if not return_logits:
            return torch.cat(outs)
        return torch.cat([f for f, _ in outs]), torch.cat([l for _, l in outs])


def load_videos(path, limit=None, frames=None, resolution=None):
    """Videos -> uint8 (N, C, F, H, W): an .npz (sample.py --npz writes uint8 (N, F, H, W, C); (N, C, F, H, W)
    and grey (N, F, H, W) are read too) or a folder of clips (data.py's clips:, sub-folders of frames or GIFs,
    read at `frames` x `resolution`). `frames` keeps the first F frames of every video."""
    if path.endswith('.npz'):
        with open_npz(path) as npz:
            key = next((k for k in ('videos', 'samples', 'x', 'arr_0') if k in npz), (npz.files or [None])[0])
            if key is None:
                raise ValueError(f'{path} holds no arrays')
            x = npz[key][:limit]
        if x.ndim == 4 and (x.shape[-1] in (1, 3) or x.shape[1] in (1, 3)):   # (N, H, W, C) or (N, C, H, W)
            raise ValueError(f'{path}: array {key!r} of shape {x.shape} holds images, not videos (N, F, H, W, C); score '
                             'them without --video (grey videos: store them as (N, F, H, W, 1))')
        if x.ndim == 4:
            x = x[:, None]                                # (N, F, H, W) grey
        if x.ndim != 5:
            raise ValueError(f'{path}: array {key!r} has shape {x.shape}; expected videos (N, F, H, W, C) '
                             'or (N, C, F, H, W)')
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 4, 1, 2, 3)                # (N, F, H, W, C) -> (N, C, F, H, W)
        if x.dtype != np.uint8:
            x = float_images_to_uint8(x, f'{path} (array {key!r})')
        videos = torch.from_numpy(np.ascontiguousarray(x))
    elif os.path.isdir(path):
        if not frames or not resolution:
            raise ValueError(f'{path}: reading a folder of clips needs --frames and --video-resolution '
                             '(or generated videos in an .npz to take them from)')
        videos = data.load_dataset(f'clips:{path}', frames=frames, resolution=resolution).images[:limit]
    else:
        raise FileNotFoundError(f'{path} is neither an .npz of videos nor a folder of clips')
    if frames:
        if videos.shape[2] < frames:
            raise ValueError(f'{path}: videos have {videos.shape[2]} frames, fewer than --frames {frames}')
        videos = videos[:, :, :frames]
    return videos


# ----------------------------------------------------------------------------------------------------
# Reference statistics, computed once and cached, refused when made another way

def images_id(images):
    """First 16 hex digits of the sha256 of images as read (shape, dtype and every pixel): the content of a reference.

    The statistics cache is keyed by it, not by the file name: a different ref.npz under the same name reused the
    other file's statistics (FID 26.98 instead of 16.31).
    """
    images = torch.as_tensor(images).contiguous()
    digest = hashlib.sha256(f'{tuple(images.shape)} {images.dtype}'.encode())
    digest.update(images.numpy().tobytes())
    return digest.hexdigest()[:16]


def statistics_cache_path(cache_dir, dataset, resolution, num_images, network='inception', resize='legacy',
                          network_id=None, content_id=None):
    """One file per (reference content, network, resize mode[, weights hash]); the name and sizes are for reading."""
    weights = f'_{network_id[:8]}' if network_id else ''
    content = f'_{content_id}' if content_id else ''
    return os.path.join(cache_dir, f'{dataset}{content}_{resolution}px_n{num_images}_{network}{weights}_{resize}.npz')


def save_statistics(path, stats):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: np.savez(tmp, **stats))  # never leave a half-written statistics file


def load_statistics(path):
    with open_npz(path) as npz:
        if 'mu' not in npz or 'sigma' not in npz:
            raise ValueError(f'{path} has no mu/sigma arrays (keys: {npz.files}); it is not a statistics file')
        return {k: npz[k] for k in npz.files}


def cached_statistics(path, compute_features, **meta):
    """Load the statistics at `path`, or compute them with compute_features() once and save them.

    meta (network=, resize=, network_id=) is recorded in a new file and checked against an existing one.
    """
    if os.path.isfile(path):
        stats = load_statistics(path)
        check_statistics_match(stats, meta.get('network', 'inception'), meta.get('resize', 'legacy'), path,
                               meta.get('network_id'))
        return stats
    stats = compute_statistics(compute_features(), **meta)
    save_statistics(path, stats)
    return stats


# ----------------------------------------------------------------------------------------------------
# Scoring a generator during training (train.py)

def samples_to_uint8(x, source):
    """Generated samples in [-1, 1] -> uint8 (data.to_uint8), refusing NaN/inf: to_uint8 would turn them into
    some pixel value, and the scores would be of those."""
    x = x.detach().cpu()
    if not torch.isfinite(x).all():
        raise ValueError(f'{source} returned {int((~torch.isfinite(x)).sum())} NaN/inf pixel values: the model has '
                         'diverged, so there is nothing meaningful to score')
    return data.to_uint8(x)


@torch.no_grad()
def evaluate_generator(generate, ref_stats, model, num_samples=2000, batch_size=50, device='cpu',
                       metrics=('fid', 'kid'), progress=False, kid_subset_size=1000):
    """Metrics of a sampler during training: generate(n) -> n images in [-1, 1] (data.py's range).

    Samples are quantized to 8 bits (data.to_uint8), as they would be when saved to PNG, so the score during
    training equals the one of the saved images. 2,000 samples make KID reliable and FID a trend; use 50,000
    for a headline FID. train.py calls this every N steps; names follow the model (see metric_name).
    """
    feats, logits = [], []
    want_logits = 'is' in metrics and model.name.split('/')[0] == 'inception'
    for start in range(0, num_samples, batch_size):
        x = samples_to_uint8(generate(min(batch_size, num_samples - start)), 'the generator')  # as in a PNG
        out = extract_features(x, model, batch_size, device, return_logits=want_logits, progress=progress)
        feats.append(out[0] if want_logits else out)
        if want_logits:
            logits.append(out[1])
    fake_logits = np.concatenate(logits) if want_logits else None
    return compute_metrics(np.concatenate(feats), ref_stats, fake_logits, metrics, model.name, kid_subset_size,
                           getattr(model, 'resize', 'legacy'))


# ----------------------------------------------------------------------------------------------------
# Command line

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
    g.add_argument('--resize', default='legacy', choices=['legacy', 'clean'],
                   help='legacy: pytorch-fid/TF bilinear, the protocol of published FIDs (scores named FID); '
                        'clean: PIL bicubic antialiased (scores named clean-FID, not comparable with papers)')
    g.add_argument('--exact-features', action='store_true',
                   help="pytorch-fid's Inception arithmetic bit for bit; by default NHWC convolutions with batch norm "
                        "folded in: ~1.5x faster on CPU, features within 1e-4 (inception.load_inception(fast=True))")
    g.add_argument('--batch-size', type=int, default=50, help='images per forward pass')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    m = p.add_argument_group('metrics')
    m.add_argument('--metrics', default=None, help='comma-separated subset of fid,kid,is,pr (default: all); with '
                   '--video of fvd,kvd,vis,motion,fid,kid,is,pr (default: fvd,kvd,fid; vis: the video IS of TGAN with '
                   'C3D; motion: centroid velocities of one-object clips, motion.py; fid/kid/is/pr are frame-wise)')
    m.add_argument('--kid-subset-size', type=int, default=1000,
                   help='samples per KID subset (Binkowski et al. use 1000); the smaller set when larger than it, '
                        'with a warning (when both sets are used whole, the std is 0)')
    m.add_argument('--num-gen', type=int, default=None, help='use at most this many generated images')
    m.add_argument('--num-ref', type=int, default=None, help='use at most this many reference images')
    m.add_argument('--reference-split', default=None, help='name of the reference split, printed with scores')
    m.add_argument('--conditions', default=None, choices=CONDITION_MODES,
                   help='how the classes of the generated samples were chosen (printed with the scores); '
                        'per-class scores are added when both .npz files hold labels')
    m.add_argument('--save-stats', default=None, help='write the reference statistics to this .npz')
    m.add_argument('--stats-cache', default=None, metavar='DIR',
                   help='cache reference statistics here, keyed by the reference images\' content (a hash), the '
                        'network, its weights and the resize')
    m.add_argument('--out', default=None, help='also write the scores and their context to this .json')
    m.add_argument('--overwrite', action='store_true', help='let --save-stats, --npz, --out, --pairs-png and '
                   '--lenet-weights (of --train-lenet) replace an existing file; without it they are refused before '
                   'any work. An input (REFERENCE, GENERATED, ...) is never overwritten')
    m.add_argument('--memorization', default=None, help='folder/.npz of training images: nearest-neighbour check')
    m.add_argument('--pairs-png', default='nearest_pairs.png', help='where the memorization check saves pairs')
    s = p.add_argument_group('sampling a checkpoint (when GENERATED is a .pt file): the flags of sample.py')
    s.add_argument('--class', dest='fixed_class', type=int, default=0, help='the class of --conditions fixed')
    s.add_argument('--seed', type=int, default=0, help='seed of the first batch of samples')
    s.add_argument('--npz', default=None, help='also save the samples (uint8 NHWC and labels, as sample.py --npz)')
    import sample  # the sampler, schedule and guidance flags are sample.py's own, so a score names what sample.py does
    sample.add_sampling_flags(p)
    sample.add_sampling_flags(sampling := argparse.ArgumentParser(add_help=False))   # defaults: given for images, refused
    sampling_defaults = dict(vars(sampling.parse_args([])), fixed_class=0, seed=0)
    v = p.add_argument_group('videos (--video)')
    v.add_argument('--video', action='store_true', help='GENERATED and REFERENCE are videos (.npz or clip folders): '
                   'FVD/KVD with I3D, frame-wise scores with --network')
    v.add_argument('--i3d-weights', default=None, help=f'path of {I3D_WEIGHTS_NAME} (else ${I3D_WEIGHTS_ENV}, '
                   'else the torch hub cache, else download)')
    v.add_argument('--video-features', default='i3d', choices=['i3d', 'c3d'], help='network of fvd,kvd: i3d (FVD, '
                   'KVD) or c3d (FD_c3d, KD_c3d: fc7 of the UCF-101 C3D, as TGANv2 computes its FID; 16 frames)')
    v.add_argument('--c3d-weights', default=None, help=f'path of {C3D_WEIGHTS_NAME} (else $C3D_WEIGHTS, else the '
                   'torch hub cache)')
    v.add_argument('--c3d-mean', default=None, help=f'path of {C3D_MEAN_NAME}, the mean clip (else $C3D_MEAN, else '
                   'the torch hub cache)')
    v.add_argument('--frames', type=int, default=None, help='use the first F frames of every video (clip folders: '
                   'frames to read; default: those of the generated .npz)')
    v.add_argument('--video-resolution', type=int, default=None,
                   help='frame side for reading clip folders (default: that of the generated .npz)')
    p.add_argument('--demo', action='store_true', help='print closed-form checks (no weights needed)')
    p.add_argument('--train-lenet', default=None, metavar='NPZ',
                   help='train the FD_lenet classifier on an .npz of images and labels, save it to --lenet-weights')
    p.add_argument('--lenet-steps', type=int, default=2000, help='training steps for --train-lenet')
    args = p.parse_args(argv)
    if args.train_lenet and not args.lenet_weights:
        p.error('--train-lenet needs --lenet-weights (where to save the classifier)')
    if not (args.demo or args.train_lenet) and (args.generated is None or args.reference is None):
        p.error('give GENERATED and REFERENCE (or --demo, or --train-lenet)')
    known = VIDEO_METRICS if args.video else METRICS
    args.metrics = args.metrics or ('fvd,kvd,fid' if args.video else ','.join(METRICS))
    unknown = set(args.metrics.split(',')) - set(known)
    if unknown:
        p.error(f'--metrics: unknown {", ".join(sorted(unknown))}; choose from {",".join(known)}')
    if args.video and args.generated and args.generated.endswith('.pt'):
        p.error('--video scores saved videos: sample the checkpoint with sample.py --npz first')
    for flag, value, low in (('--batch-size', args.batch_size, 1), ('--kid-subset-size', args.kid_subset_size, 2),
                             ('--num-gen', args.num_gen, 2), ('--num-ref', args.num_ref, 2), ('--steps', args.steps, 1),
                             ('--lenet-steps', args.lenet_steps, 1), ('--frames', args.frames, 1),
                             ('--video-resolution', args.video_resolution, 8)):
        if value is not None and value < low:
            p.error(f'{flag} must be at least {low}, got {value}')
    if (args.num_gen or 0) > MAX_NUM_GEN:   # labels and images are allocated for all of them before the first batch
        p.error(f'--num-gen must be at most {MAX_NUM_GEN:,} (got {args.num_gen:,}); 50,000 make a headline FID')
    given = [('--class' if k == 'fixed_class' else '--' + k.replace('_', '-')) for k, v in sampling_defaults.items()
             if getattr(args, k) != v]
    if given and args.generated and not args.generated.endswith('.pt'):
        p.error(f"{', '.join(given)} set how a checkpoint is sampled; GENERATED {args.generated} holds images "
                'already (give a train.py ckpt.pt to sample it)')
    if args.guidance is not None and not math.isfinite(args.guidance):
        p.error(f'--guidance must be a finite number, got {args.guidance}')
    problems = sample.check_sampling_flags(args)
    if problems:
        p.error('; '.join(problems))
    return args


def check_not_an_input(flag, path, inputs):
    """An output must never be one of the inputs, --overwrite or not (--save-stats onto REFERENCE destroyed it)."""
    for input_flag, input_path in inputs:
        if input_path and os.path.exists(path) and os.path.exists(input_path) and os.path.samefile(path, input_path):
            raise ValueError(f'{flag} {path} is the input {input_flag}: writing it would destroy it; give a new file name')


def check_paths(args):
    """Inputs exist and outputs can be written (new files, never an input), before any network or feature."""
    inputs = (('GENERATED', args.generated), ('REFERENCE', args.reference), ('--memorization', args.memorization),
              ('--lenet-weights', args.lenet_weights if args.network == 'lenet' else None))
    for flag, path in inputs:
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f'{flag} {path} does not exist')
        if path and flag != '--lenet-weights' and not (os.path.isdir(path) or path.endswith(('.npz', '.pt'))):
            raise ValueError(f'{flag} {path} is neither a folder of images nor an .npz file'
                             + (' nor a train.py checkpoint (.pt)' if flag == 'GENERATED' else ''))
    if args.conditions in ('data', 'real') and not args.generated.endswith('.pt') and load_labels(args.generated) is None:
        raise ValueError(f'--conditions {args.conditions}: GENERATED {args.generated} holds no labels, so its classes '
                         'cannot have been drawn from the reference labels (leave --conditions out)')
    for flag, path, extensions in (('--save-stats', args.save_stats, ('.npz',)), ('--out', args.out, ('.json',)),
                                   ('--npz', args.npz, ('.npz',)),
                                   ('--pairs-png', args.pairs_png if args.memorization else None, ('.png',))):
        if path is not None:
            check_not_an_input(flag, path, inputs)
            check_output_path(path, extensions, flag, overwrite=args.overwrite)
    if args.npz and not args.generated.endswith('.pt'):
        raise ValueError('--npz saves the samples of a checkpoint; GENERATED is not a .pt file')
    if args.save_stats and is_statistics_file(args.reference):
        raise ValueError('--save-stats: REFERENCE is already a statistics file')
    if args.stats_cache:
        check_output_path(os.path.join(args.stats_cache, 'probe.npz'), ('.npz',), '--stats-cache')


def build_feature_network(args):
    """The feature network the flags ask for, in eval mode on args.device."""
    if args.network == 'inception':
        return load_inception(args.inception_weights, args.device, resize=args.resize,
                              fast=not args.exact_features)
    if args.lenet_weights is None:
        raise ValueError('--network lenet needs --lenet-weights (train one with --train-lenet)')
    try:
        state = torch.load(args.lenet_weights, map_location='cpu', weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:  # missing, truncated, not a torch file
        reason = ('not tensors written by torch.save' if isinstance(e, pickle.UnpicklingError)  # torch's own text
                  else f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')  # suggests weights_only=False
        raise ValueError(f'cannot read --lenet-weights {args.lenet_weights} as a PyTorch state dict ({reason}); it '
                         'is truncated or another kind of file. Save one with --train-lenet.') from None
    return lenet_from_state_dict(state, f'--lenet-weights {args.lenet_weights}').to(args.device)


def lenet_split(num_images, seed=0):
    """(train, held-out) indices for --train-lenet: data.holdout_split holding out a random tenth, fixed by the seed.
    Not the first 90%: files sorted by class (the shared emoji are) would never show the classifier the last classes."""
    train, held_out = data.holdout_split(num_images, seed, every=10, max_held_out=num_images)
    return train.numpy(), held_out.numpy()


def train_lenet_command(args):
    """Train the small classifier on a random 90% of the labelled images, report accuracy on the rest, save it."""
    check_not_an_input('--lenet-weights', args.lenet_weights, [('--train-lenet', args.train_lenet)])
    check_output_path(args.lenet_weights, ('.pth', '.pt'), '--lenet-weights', overwrite=args.overwrite)
    images, labels = load_images(args.train_lenet), load_labels(args.train_lenet)
    if labels is None:
        raise ValueError(f'{args.train_lenet} has no labels array (key "labels" or "y")')
    train, held_out = lenet_split(len(images))
    model = train_classifier(images[train], labels[train], int(labels.max()) + 1, steps=args.lenet_steps)
    with torch.no_grad():
        predictions = model(to_unit_float(images[held_out]), return_logits=True)[1].argmax(1).numpy()
    print(f'held-out accuracy {np.mean(predictions == labels[held_out]):.4f} on {len(held_out)} images')
    state = model.state_dict()
    atomic_write(args.lenet_weights, lambda tmp: torch.save(state, tmp))
    print(f'saved to {args.lenet_weights}')


def load_checkpoint_model(path, device):
    """(net, diffusion, config) of a train.py image checkpoint via checkpoints.load_model, or a clear error."""
    import checkpoints  # only the command line reads models; the metrics need no model code
    try:   # checkpoints.py checks the config; expect='base' names a classifier, an autoencoder or an SR stage
        net, diffusion, config = checkpoints.load_model(path, device, expect='base')
    except SystemExit as e:   # an SR stage needs a low-res image to upsample: scored only in its cascade
        raise ValueError(str(e).removeprefix('error: ') + ('; sample the cascade (sample.py --cascade ... --npz) and '
                         'score that .npz' if 'super-resolution' in str(e) else '')) from None
    if config['data'].get('frames'):
        raise ValueError(f'{path} is a video model; these image metrics score images (sample it with sample.py)')
    return net, diffusion, config


def sample_checkpoint(args):
    """Generate --num-gen images (2,000 by default) from a train.py checkpoint: (uint8 images, labels or None).

    Conditions (--conditions): fixed (--class), uniform, data (i.i.d. from the reference labels' frequencies) or
    real (the reference labels themselves); data and real need a REFERENCE .npz with labels. Sampler, schedule and
    guidance come from sample.py's flags (default: what the training run used for its grids). Batch b starts from
    the noise of seed args.seed + its first index (sample.generate's convention).
    """
    import checkpoints
    import sample
    import sample_discrete
    if sample_discrete.is_discrete_checkpoint(args.generated):      # discrete diffusion on VQ tokens: its decoders
        return sample_discrete.sample_for_evaluate(args)
    net, diffusion, config = load_checkpoint_model(args.generated, args.device)   # clear errors: bad file, video model
    n, num_classes = args.num_gen or 2000, int(config['data']['num_classes'])
    labels = None
    if num_classes:
        mode = args.conditions or 'uniform'
        reference_labels = load_labels(args.reference) if mode in ('data', 'real') else None
        if mode in ('data', 'real') and reference_labels is None:
            raise ValueError(f'--conditions {mode} draws the classes from the reference labels; REFERENCE '
                             f'{args.reference} holds none (give an .npz with a labels array)')
        if mode == 'fixed' and not 0 <= args.fixed_class < num_classes:
            raise ValueError(f'--class {args.fixed_class} is not a class of this model (0..{num_classes - 1})')
        if reference_labels is not None and (reference_labels.min() < 0 or reference_labels.max() >= num_classes):
            raise ValueError(f'the reference labels span {reference_labels.min()}..{reference_labels.max()}; '
                             f'this model has classes 0..{num_classes - 1}')
        args.conditions = mode
        labels = torch.from_numpy(choose_conditions(mode, n, num_classes, reference_labels, args.fixed_class, args.seed))
    try:
        setup = sample.sampling_setup(args, config, diffusion, args.device)
        images = sample.generate(net, diffusion, n, checkpoints.sample_shape(config), args.device, labels, num_classes,
                                 setup['sampler'], setup['steps'], setup['guidance'], seed=args.seed, progress=False,
                                 aug_dim=int(config['net'].get('aug_dim', 0) or 0), sampler_options=setup['sampler_options'],
                                 batch_size=args.batch_size, sigmas=setup['sigmas'], guide=setup['guide'],
                                 decode=checkpoints.latent_decoder(config, args.device))
    except FloatingPointError as e:   # to_uint8 would turn NaN into pixels and the scores would be of those
        raise ValueError(f'{args.generated}: {e}; nothing meaningful to score') from None
    images = samples_to_uint8(images, args.generated)   # sample.generate checks too; this file does not rely on it
    args.sampling = sample.describe_sampling(args, setup)
    print(f'sampled {n} images from {args.generated} ({args.sampling})')
    if args.npz:  # the samples are kept, whatever happens later (sample.py's layout: uint8 NHWC + labels)
        atomic_write(args.npz, lambda tmp: np.savez(tmp, samples=images.permute(0, 2, 3, 1).numpy(),
                                                    labels=np.zeros(0, np.int64) if labels is None else labels.numpy()))
        print(f'samples saved to {args.npz}')
    return images, labels


def load_reference(args, net, net_id):
    """(statistics, None) for a statistics file, checked against this network; else (None, reference images).

    Called before the generated images are sampled or read, so a mismatch or a too small set costs nothing.
    """
    if is_statistics_file(args.reference):  # cached statistics: no reference image is read
        stats = load_statistics(args.reference)
        check_statistics_match(stats, net.name, net.resize, args.reference, net_id)
        return stats, None
    real = load_images(args.reference, args.num_ref)
    if len(real) < 2:
        raise ValueError(f'REFERENCE {args.reference} holds {len(real)} image(s); statistics need at least 2')
    return None, real


def reference_statistics(args, net, net_id, real):
    """(statistics, features or None) of the reference images `real`: from the cache, or computed (and saved)."""
    meta = dict(network=net.name, resize=net.resize, network_id=net_id)
    if args.stats_cache:  # computed once per (reference content, network, weights, resize), then reused
        name = os.path.splitext(os.path.basename(os.path.normpath(args.reference)))[0]  # for a reader; the key is
        path = statistics_cache_path(args.stats_cache, name, real.shape[-1], len(real), net.name, net.resize, net_id,
                                     images_id(real))                                   # the images' content
        cached = os.path.isfile(path)
        stats = cached_statistics(path, lambda: extract_features(real, net, args.batch_size, args.device), **meta)
        print(f'reference statistics {"read from" if cached else "computed and saved to"} {path}')
        return stats, None
    real_feats = extract_features(real, net, args.batch_size, args.device)
    stats = compute_statistics(real_feats, **meta)
    if args.save_stats:
        save_statistics(args.save_stats, stats)
    return stats, real_feats


def write_json(path, record):
    """The scores and their context as .json, written atomically (runs.atomic_write)."""
    text = json.dumps(record, indent=1, default=float)

    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write)


def video_command(args):
    """FVD/KVD (I3D features) and frame-wise FID/KID/IS/PR (the --network on every frame) of generated videos."""
    check_paths(args)
    metrics = set(args.metrics.split(','))
    fake = load_videos(args.generated, args.num_gen, args.frames, args.video_resolution)
    real = load_videos(args.reference, args.num_ref, args.frames or fake.shape[2], args.video_resolution or fake.shape[-1])
    if fake.shape[2] != real.shape[2] or min(len(fake), len(real)) < 2:
        raise ValueError(f'generated videos {tuple(fake.shape)} and reference videos {tuple(real.shape)} must have '
                         'the same number of frames (use --frames) and at least 2 videos each')
    results, record = {}, {}
    nets = []
    if metrics & {'fvd', 'kvd'} and args.video_features == 'i3d':
        nets.append((VideoFeatures(load_i3d(args.i3d_weights, args.device)), {'fvd': 'fid', 'kvd': 'kid'}))
    c3d_names = dict({'fvd': 'fid', 'kvd': 'kid'} if args.video_features == 'c3d' else {}, vis='is')
    if metrics & set(c3d_names):   # c3d.C3D has extract_features' interface itself (fc7 features, fc8 logits)
        nets.append((load_c3d(args.c3d_weights, args.c3d_mean, args.device), c3d_names))
    if metrics & set(METRICS):
        nets.append((FrameFeatures(build_feature_network(args)), {m: m for m in METRICS}))
    for net, names in nets:   # each network's features, statistics and scores, named after the network
        wanted = tuple(names[m] for m in VIDEO_METRICS if m in metrics and m in names)
        want_logits = 'is' in wanted and net.name.split('/')[0] in ('inception', 'c3d')
        out = extract_features(fake, net, args.batch_size, args.device, return_logits=want_logits)
        fake_feats, fake_logits = out if want_logits else (out, None)
        real_stats = {} if set(wanted) == {'is'} else compute_statistics(   # an IS needs no reference
            extract_features(real, net, args.batch_size, args.device), network=net.name, resize=net.resize)
        results.update(compute_metrics(fake_feats, real_stats, fake_logits, wanted, net.name, args.kid_subset_size,
                                       net.resize))
        record[net.name] = network_id(net)
    if 'motion' in metrics:   # no network: tracked object velocities against the reference clips'
        import motion   # the weight-free motion measure (imported here: its scipy modules cost every run ~0.5 s)
        results.update({f'motion_{k}': v for k, v in motion.motion_distance(fake, real).items()})
    split = args.reference_split or os.path.basename(os.path.normpath(args.reference))
    print(format_results(results, len(fake), len(real), None, split))
    if args.out:
        write_json(args.out, dict(scores=results, generated=args.generated, reference=args.reference,
                                  num_generated=len(fake), num_reference=len(real), frames=int(fake.shape[2]),
                                  networks=record))
    return results


def main(args):
    if args.demo:
        return demo()
    if args.train_lenet:
        return train_lenet_command(args)
    if args.video:
        return video_command(args)
    check_paths(args)  # every path before any long work: a bad output path must not cost the computation
    metrics = tuple(args.metrics.split(','))
    net = build_feature_network(args)
    net_id = network_id(net)
    want_logits = 'is' in metrics and net.name == 'inception'
    ref_stats, real = load_reference(args, net, net_id)  # checked first: a mismatch must not cost the sampling
    if args.generated.endswith('.pt'):
        fake, _ = sample_checkpoint(args)
    else:
        fake = load_images(args.generated, args.num_gen)
    if len(fake) < 2:
        raise ValueError(f'GENERATED {args.generated} holds {len(fake)} image(s); FID/KID need at least 2 '
                         '(thousands for meaningful scores)')
    out = extract_features(fake, net, args.batch_size, args.device, return_logits=want_logits)
    fake_feats, fake_logits = out if want_logits else (out, None)
    if ref_stats is None:
        ref_stats, real_feats = reference_statistics(args, net, net_id, real)
    else:
        real_feats = None
    num_ref = int(ref_stats.get('num_images', -1))
    results = compute_metrics(fake_feats, ref_stats, fake_logits, metrics, net.name, args.kid_subset_size, net.resize)
    split = args.reference_split or os.path.basename(os.path.normpath(args.reference))
    print(format_results(results, len(fake_feats), num_ref, net.resize, split, args.conditions))
    fake_labels = None if args.generated.endswith('.pt') else load_labels(args.generated)
    real_labels = load_labels(args.reference)
    if (real_feats is not None and fake_labels is not None and real_labels is not None
            and len(fake_labels) >= len(fake_feats) and len(real_labels) >= num_ref):
        fd_name = metric_name('fid', net.name, net.resize)
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
    if args.out:
        record = dict(scores=results, generated=args.generated, reference=args.reference, num_generated=len(fake),
                      num_reference=num_ref, network=net.name, network_id=net_id, resize=net.resize,
                      kid_subset_size=args.kid_subset_size, conditions=args.conditions)
        write_json(args.out, record)
    return results


def cli(argv=None):
    """main, ending in a message, not a traceback: bad input, a full disk or size limit (OSError), Ctrl-C (130)."""
    try:
        return main(parse_args(argv))
    except KeyboardInterrupt:
        print('\ninterrupted (Ctrl-C): no score written', file=sys.stderr)
        raise SystemExit(130) from None
    except (OSError, ValueError) as e:  # missing/wrong weights, bad inputs, disk full: the message, no traceback
        raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
    cli()
