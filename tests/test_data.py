"""Tests of data.py: procedural data is deterministic and means what its labels say, real data loads with its
published statistics, missing files give a message naming them, and big folders stream with the same batches."""
import gzip
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data

MNIST_T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]   # shared/data/README.md


pytestmark = pytest.mark.usefixtures('one_thread')


def coverage(images_uint8, fg, bg):
    """Recover each pixel's shape coverage alpha in [0, 1] from image = bg + alpha (fg - bg): (N, ..., H, W).

    The colours are rounded to uint8 levels as the renderer's output is, so background and interior pixels
    give exactly 0 and 1 (unrounded colours would bias the sum over thousands of background pixels).
    """
    img = images_uint8.double().numpy() / 255
    shape = (-1, 3) + (1,) * (img.ndim - 2)
    fg, bg = np.rint(fg.reshape(shape) * 255) / 255, np.rint(bg.reshape(shape) * 255) / 255
    return ((img - bg) * (fg - bg)).sum(1) / ((fg - bg) ** 2).sum(1)


# ----------------------------------------------------------------------------------------------------
# Procedural shapes and videos

def test_shapes_deterministic_per_seed_and_split():
    a = data.ShapesDataset(num_images=300, seed=3)
    b = data.ShapesDataset(num_images=300, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = data.ShapesDataset(num_images=300, seed=4)
    held_out = data.ShapesDataset(num_images=300, seed=3, split='test')
    for other in (c, held_out):
        # Different streams: essentially every image differs (not just a shuffled order of the same ones).
        differs = (other.images != a.images).flatten(1).any(1).float().mean()
        assert differs > 0.99


@pytest.mark.parametrize('resolution', [16, 32, 64])
def test_shapes_range_shape_and_attributes(resolution):
    ds = data.load_dataset('shapes', resolution=resolution, num_images=120)
    x, y = ds[0]
    assert x.shape == (3, resolution, resolution) and x.dtype == torch.float32 and isinstance(y, int)
    xb, yb = ds.batch(torch.arange(len(ds)))
    assert xb.min() >= -1 and xb.max() <= 1 and xb.min() < -0.9 and xb.max() > 0.9   # the full range is used
    assert (ds.num_classes, ds.channels, ds.resolution) == (6, 3, resolution)
    assert ds.class_names == data.SHAPE_CLASSES
    assert torch.equal(yb, ds.labels) and ds.labels.bincount().tolist() == [20] * 6   # exactly balanced
    # The background is plain: all four corners carry the background colour (shapes stay 1 px inside).
    corners = ds.images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].double() / 255       # (N, 3, 4)
    assert np.abs(corners.numpy() - ds.params['bg'][:, :, None]).max() < 1 / 255


@pytest.mark.parametrize('colours', ['palette', 'random'])
def test_shapes_of_each_class_have_that_shapes_area(colours):
    """Coverage summed over the image equals the exact area of the labelled shape, and area identifies it."""
    ds = data.ShapesDataset(num_images=600, resolution=64, seed=1, colours=colours)
    alpha = coverage(ds.images, ds.params['fg'], ds.params['bg'])                       # (N, H, W)
    r = ds.params['radii']
    area = alpha.sum((1, 2))
    for k, kind in enumerate(data.SHAPE_CLASSES):
        sel = ds.labels.numpy() == k
        ratio = area[sel] / data.shape_area(kind, r[sel])
        assert abs(ratio.mean() - 1) < 0.005 and np.abs(ratio - 1).max() < 0.02, kind
    # Nearest exact area / r^2 among the six classes recovers every label.
    per_r2 = np.array([data.shape_area(kind, 1.0) for kind in data.SHAPE_CLASSES])
    predicted = np.abs(area[:, None] / r[:, None] ** 2 - per_r2[None]).argmin(1)
    assert (predicted == ds.labels.numpy()).all()
    # The shape is centred where params says: coverage centroid of symmetric shapes = centre.
    yy, xx = np.mgrid[:64, :64] + 0.5
    centroid = np.stack([(alpha * xx).sum((1, 2)), (alpha * yy).sum((1, 2))], 1) / area[:, None]
    symmetric = ds.labels.numpy() != data.SHAPE_CLASSES.index('triangle')
    # (to 0.1 px: the 1-px linear ramp is not the exact pixel coverage at corners and diagonal edges)
    assert np.abs(centroid[symmetric] - ds.params['centres'][symmetric]).max() < 0.1


def test_video_shapes_move_at_constant_velocity():
    ds = data.load_dataset('video-shapes', num_videos=40, frames=6, seed=2)
    x, y = ds[0]
    assert x.shape == (3, 6, 32, 32) and ds.frames == 6 and ds.num_classes == 6 and 0 <= y < 6
    assert x.min() >= -1 and x.max() <= 1
    alpha = coverage(ds.images, ds.params['fg'], ds.params['bg'])                       # (N, F, H, W)
    yy, xx = np.mgrid[:32, :32] + 0.5
    mass = alpha.sum((2, 3))
    centroid = np.stack([(alpha * xx).sum((2, 3)), (alpha * yy).sum((2, 3))], -1) / mass[..., None]   # (N, F, 2)
    step = np.diff(centroid, axis=1)                                                    # (N, F-1, 2)
    # Every frame moves by the same displacement, the recorded velocity; the shape itself does not change.
    error = np.abs(step - ds.params['velocity'][:, None])    # antialiasing wobbles a centroid by < 0.1 px
    assert error.mean() < 0.02 and error.max() < 0.15
    assert (np.abs(mass - mass[:, :1]) / mass[:, :1]).max() < 0.02
    assert np.linalg.norm(ds.params['velocity'], axis=1).mean() > 0.5   # the shapes really move
    again = data.VideoShapesDataset(num_videos=40, frames=6, seed=2)
    assert torch.equal(again.images, ds.images)


# ----------------------------------------------------------------------------------------------------
# Real data from ../shared/data

def test_mnist_t10k(shared_data):
    folder = os.path.join(shared_data, 'mnist')
    ds = data.load_dataset('mnist', data_dir=folder, split='test', download=False)
    assert len(ds) == 10000 and (ds.channels, ds.resolution, ds.num_classes) == (1, 32, 10)
    assert ds.labels.bincount().tolist() == MNIST_T10K_COUNTS
    x, _ = ds.batch(torch.arange(len(ds)))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, :, border] == -1).all()                            # padding is background (black = -1)
    inner = x[:, :, 2:30, 2:30]
    assert abs(inner.mean().item() - (33.79 / 127.5 - 1)) < 1e-3    # README: mean pixel 33.79 / 255
    # resolution=28 gives the file's pixels unchanged (the README's numpy-only reader).
    raw = data.load_dataset('mnist', data_dir=folder, split='test', resolution=28, download=False)
    with gzip.open(os.path.join(folder, 't10k-images-idx3-ubyte.gz')) as f:
        reference = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    assert np.array_equal(raw.images[:, 0].numpy(), reference)
    small = data.load_dataset('mnist', data_dir=folder, split='test', resolution=16, download=False)
    assert small.images.shape == (10000, 1, 16, 16)


def test_emoji(shared_data):
    ds = data.load_dataset('emoji', data_dir=shared_data)       # finds emoji/noto_emoji_32.npz
    assert len(ds) == 3786 and (ds.channels, ds.resolution, ds.num_classes) == (3, 32, 10)
    assert ds.class_names[3] == 'Flags' and ds.labels.bincount()[3] == 270
    x, _ = ds.batch(torch.arange(len(ds)))
    assert (x[:, :, 0, 0] == 1).float().mean() > 0.9            # white background -> +1
    big = data.load_dataset('emoji', data_dir=os.path.join(shared_data, 'emoji'), resolution=64, base_only=True)
    assert big.images.shape == (1911, 3, 64, 64)


def make_photo_folder(root, shared_data):
    """root/cats/chelsea.png, root/people/{astronaut,camera}.png, root/things/{coffee.png,rocket.jpg}."""
    photos = os.path.join(shared_data, 'photos')
    layout = {'cats': ['chelsea.png'], 'people': ['astronaut.png', 'camera.png'],
              'things': ['coffee.png', 'rocket.jpg']}
    for cls, files in layout.items():
        os.makedirs(root / cls)
        for f in files:
            shutil.copy(os.path.join(photos, f), root / cls / f)
    return photos


def test_image_folder_labels_resize_and_crop(tmp_path, shared_data):
    photos = make_photo_folder(tmp_path, shared_data)
    ds = data.load_dataset(f'folder:{tmp_path}', resolution=32)
    assert ds.class_names == ('cats', 'people', 'things') and ds.labels.tolist() == [0, 1, 1, 2, 2]
    assert ds.images.shape == (5, 3, 32, 32) and (ds.channels, ds.num_classes) == (3, 3)
    # chelsea is 451x300: shorter side -> 32, then the centre 32x32; compare with cropping the centre
    # 300x300 first and resizing that (the same region; resampling differs only slightly).
    im = Image.open(os.path.join(photos, 'chelsea.png')).convert('RGB')
    left = (451 - 300) // 2
    expected = np.asarray(im.crop((left, 0, left + 300, 300)).resize((32, 32), Image.BICUBIC), np.float64)
    got = ds.images[0].permute(1, 2, 0).numpy().astype(np.float64)
    assert np.abs(got - expected).mean() < 4
    # The off-centre crop (left edge) would be far from it: the check can tell where the crop came from.
    off = np.asarray(im.crop((0, 0, 300, 300)).resize((32, 32), Image.BICUBIC), np.float64)
    assert np.abs(got - off).mean() > 3 * np.abs(got - expected).mean()
    camera = ds.images[2]                                       # grey photo -> three equal channels
    assert torch.equal(camera[0], camera[1]) and torch.equal(camera[1], camera[2])
    # A folder without sub-folders is unlabelled: num_classes 0, every label 0 (= "no class").
    flat = tmp_path / 'flat'
    flat.mkdir()
    shutil.copy(os.path.join(photos, 'coffee.png'), flat / 'coffee.png')
    plain = data.load_dataset('folder', path=str(flat), resolution=16)
    assert plain.num_classes == 0 and plain[0][1] == 0 and plain[0][0].shape == (3, 16, 16)


def test_image_folder_reports_a_corrupt_file_by_name(tmp_path, shared_data):
    make_photo_folder(tmp_path, shared_data)
    (tmp_path / 'people' / 'broken.png').write_bytes(b'this is not a png')
    with pytest.raises(ValueError, match='broken.png'):
        data.load_dataset(f'folder:{tmp_path}')                 # cache=True: found before training starts
    lazy = data.load_dataset(f'folder:{tmp_path}', cache=False)  # cache=False: listed now, read per item
    index = [os.path.basename(p) for p in lazy.paths].index('broken.png')
    assert lazy[0][0].shape == (3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(lazy, [index]), batch_size=1)
    with pytest.raises(ValueError, match=r'cannot read image .*people.broken\.png'):
        next(iter(loader))


# ----------------------------------------------------------------------------------------------------
# Files missing, downloads and checksums

@pytest.mark.parametrize('name, files', [
    ('mnist', ['train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz']),
    ('fashion-mnist', ['train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz']),
    ('cifar10', ['cifar-10-python.tar.gz']),
    ('emoji', ['noto_emoji_32.npz'])])
def test_missing_files_message_names_files_and_folder(tmp_path, name, files):
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load_dataset(name, data_dir=str(tmp_path), download=False)
    message = str(error.value)
    assert str(tmp_path) in message and all(f in message for f in files)
    if name != 'emoji':
        assert 'https://' in message or 'http://' in message                    # where to get them


def test_download_checks_md5_and_falls_back_to_the_next_mirror(tmp_path, shared_data):
    md5 = {f: data.IDX_DATASETS['mnist']['md5'][f] for f in ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
    bad = tmp_path / 'bad_mirror'
    bad.mkdir()
    for f in md5:
        (bad / f).write_bytes(b'truncated')
    good = 'file://' + os.path.join(shared_data, 'mnist') + '/'
    target = tmp_path / 'data'
    # Only a mirror with wrong files: nothing is kept and the error says why.
    with pytest.raises(data.DatasetNotFoundError, match='md5'):
        data.find_files('mnist', md5, str(target), mirrors=(f'file://{bad}/',))
    assert not any(target.iterdir())                                        # no half or wrong file left
    # A dead mirror, a wrong one, then the real files (file:// stands in for the network here).
    folder = data.find_files('mnist', md5, str(target), mirrors=('file:///no/such/mirror/', f'file://{bad}/', good))
    assert folder == str(target) and sorted(os.listdir(target)) == sorted(md5)
    ds = data.MNISTDataset(str(target), split='test', download=False)
    assert len(ds) == 10000
    # A damaged file already on disk is reported with its path, not as a parser crash.
    with open(target / 't10k-labels-idx1-ubyte.gz', 'ab') as f:
        f.write(b'x')
    with pytest.raises(data.DatasetNotFoundError, match='t10k-labels-idx1-ubyte.gz.*md5'):
        data.MNISTDataset(str(target), split='test', download=False)


def test_cifar10_reads_batches_and_refuses_foreign_pickles(tmp_path):
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    labels = list(rng.integers(0, 10, 20))
    with open(folder / 'test_batch', 'wb') as f:
        pickle.dump({'data': pixels, 'labels': [int(v) for v in labels]}, f, protocol=2)
    ds = data.load_dataset('cifar10', data_dir=str(tmp_path), split='test', download=False)
    assert ds.images.shape == (20, 3, 32, 32) and ds.labels.tolist() == labels and ds.class_names[0] == 'airplane'
    assert torch.equal(ds.images[5, 1], torch.from_numpy(pixels[5, 1024:2048].reshape(32, 32)))   # R, G, B planes
    # A pickle that names anything but numpy arrays is refused (unpickling can run arbitrary code).
    with open(folder / 'test_batch', 'wb') as f:
        pickle.dump({'data': pixels, 'labels': [int(v) for v in labels], 'x': shutil.copy}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match='shutil'):
        data.load_dataset('cifar10', data_dir=str(tmp_path), split='test', download=False)
    # The archive route checks the published md5 before opening anything.
    shutil.rmtree(folder)
    with tarfile.open(tmp_path / 'cifar-10-python.tar.gz', 'w:gz') as tar:
        tar.add(tmp_path, arcname='empty')
    with pytest.raises(data.DatasetNotFoundError, match='md5'):
        data.load_dataset('cifar10', data_dir=str(tmp_path), split='test', download=False)


def test_unknown_dataset_lists_the_names():
    with pytest.raises(ValueError, match='shapes'):
        data.load_dataset('imagenet')


# ----------------------------------------------------------------------------------------------------
# Streaming a folder that does not fit the memory budget

def test_folder_over_the_memory_budget_streams_the_same_batches(tmp_path):
    rng = np.random.default_rng(3)
    for k, cls in enumerate(('a', 'b')):
        (tmp_path / cls).mkdir()
        for i in range(12):                                      # 24 images of 20x24 px, resized/cropped to 16
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f'{i}.png')
    size = 24 * 3 * 16 * 16                                      # decoded bytes at resolution 16
    in_memory = data.load_dataset(f'folder:{tmp_path}', resolution=16, memory_budget=size)   # fits exactly
    streamed = data.load_dataset(f'folder:{tmp_path}', resolution=16, memory_budget=size - 1)
    assert not in_memory.streaming and hasattr(in_memory, 'images')
    assert streamed.streaming and not hasattr(streamed, 'images')          # nothing decoded up front
    # The (seed, step)-drawn indices of a training run, with repeats and in no sorted order.
    g = torch.Generator().manual_seed(0)
    index_tensors = [torch.randint(24, (5,), generator=g) for _ in range(6)]
    expected = list(data.make_loader(in_memory, index_tensors))
    for workers in (0, 2):
        got = list(data.make_loader(streamed, iter(index_tensors), num_workers=workers))   # a one-shot iterator
        assert len(got) == len(expected)
        for (x, y), (x_ref, y_ref), index in zip(got, expected, index_tensors):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref) and y.dtype == torch.long
            assert torch.equal(y, (index >= 12).long())                    # sub-folder b is class 1


def test_holdout_split_holds_out_one_in_twenty_and_nothing_below_twenty():
    train, val = data.holdout_split(100, seed=4)
    assert len(val) == 5 and sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert torch.equal(val, data.holdout_split(100, seed=4)[1])             # fixed by the seed
    assert len(data.holdout_split(50000, seed=0)[1]) == 1000               # at most 1000
    train, val = data.holdout_split(19, seed=0)
    assert len(val) == 0 and len(train) == 19                              # empty: the caller skips val loss
    assert len(data.holdout_split(20, seed=0)[1]) == 1
