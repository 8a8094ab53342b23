"""Video end to end (Ho et al. 2022, Video Diffusion Models, arXiv:2204.03458): data, metrics, joint training,
sampling and extension.

Data: moving MNIST's bounce law and disjoint splits, clip folders (frame folders and GIFs) read back exactly.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data


# ----------------------------------------------------------------------------------------------------
# Data: moving MNIST (Srivastava et al. 2015) and clip folders

def test_bounce_is_a_reflection():
    """Inside the box the coordinate is unchanged; past a wall it comes back by the distance it overshot."""
    L = 10.0
    p = np.array([0.0, 3.5, 10.0, 12.0, 20.0, 23.0, -2.0])
    np.testing.assert_allclose(data.bounce(p, L), [0.0, 3.5, 10.0, 8.0, 0.0, 3.0, 2.0])


def test_moving_mnist_digits_move_at_constant_speed(shared_data):
    ds = data.load_dataset('moving-mnist', data_dir=shared_data, num_videos=20, frames=10, resolution=32)
    assert ds.images.shape == (20, 1, 10, 32, 32) and ds.num_classes == 0
    corners, size = ds.params['corners'], ds.params['digit_size']           # (N, D, F, 2) top-left corners
    assert size == 14 and corners.min() >= 0 and corners.max() <= 32 - size
    # Speed R/16 = 2 px per frame. A bounce flips the sign of one velocity component and keeps its size, so
    # on steps that touch no wall |step| = |velocity| per axis, up to the rounding of both ends (<= 1 px).
    step = np.diff(corners, axis=2)                                          # (N, D, F-1, 2)
    inside = lambda c: ((c > 2) & (c < 32 - size - 2)).all(-1)
    free = inside(corners[:, :, :-1]) & inside(corners[:, :, 1:])
    expected = np.broadcast_to(np.abs(ds.params['velocity'])[:, :, None], step.shape)
    np.testing.assert_allclose(np.hypot(*ds.params['velocity'].reshape(-1, 2).T), 2.0)
    assert free.sum() > 50
    assert np.abs(np.abs(step[free]) - expected[free]).max() <= 1.0
    # A clip that reaches a wall comes back: some digit's coordinate reverses direction.
    assert (np.sign(step[..., 1:, :]) * np.sign(step[..., :-1, :]) < 0).any()
    # The pixels are the digits: each frame's maximum is a digit's maximum (MNIST digits reach 255 at 28 px).
    assert ds.images.amax(dim=(-1, -2)).float().mean() > 200


def test_moving_mnist_splits_and_labels(shared_data):
    train = data.load_dataset('moving-mnist', data_dir=shared_data, num_videos=50)
    again = data.load_dataset('moving-mnist', data_dir=shared_data, num_videos=50)
    test = data.load_dataset('moving-mnist', data_dir=shared_data, num_videos=50, split='test', num_digits=1)
    assert torch.equal(train.images, again.images)                             # seeded
    assert train.params['digits'].max() < 9000 <= test.params['digits'].min()  # disjoint digit images
    assert test.num_classes == 10 and test.images.shape[1:] == (1, 8, 32, 32)
    from data import read_idx
    labels = read_idx(os.path.join(shared_data, 'mnist', 't10k-labels-idx1-ubyte.gz'))
    assert np.array_equal(test.labels.numpy(), labels[test.params['digits'][:, 0]])


def test_clip_folder_reads_gifs_and_frame_folders(tmp_path):
    """Frames written as a GIF and as PNGs come back in order; a clip with too few frames is named."""
    g = torch.Generator().manual_seed(0)
    colours = (torch.rand(2, 8, 3, generator=g) * 255).round().to(torch.uint8)   # one flat colour per frame
    root = tmp_path / 'clips'
    root.mkdir()
    pictures = [Image.new('RGB', (40, 32), tuple(int(c) for c in colours[0, f])) for f in range(8)]
    pictures[0].save(root / 'a.gif', save_all=True, append_images=pictures[1:], duration=100, loop=0)
    (root / 'b').mkdir()
    for f in range(9):  # a longer clip: its first 8 frames are used
        Image.new('RGB', (32, 32), tuple(int(c) for c in colours[1, min(f, 7)])).save(root / 'b' / f'{f:04d}.png')
    ds = data.load_dataset(f'clips:{root}', frames=8, resolution=16)
    assert ds.images.shape == (2, 3, 8, 16, 16) and ds.num_classes == 0
    got = ds.images[:, :, :, 8, 8].permute(0, 2, 1)                             # (clip, frame, RGB)
    assert (got[1] == colours[1]).all()                                        # PNG: exact
    assert (got[0].int() - colours[0].int()).abs().max() <= 8                  # GIF: a 256-colour palette
    with pytest.raises(ValueError, match='has 8 frames, fewer than frames=9'):
        data.load_dataset(f'clips:{root}', frames=9)


# ----------------------------------------------------------------------------------------------------
# Metrics: evaluate.py --video (FVD/KVD on I3D features, frame-wise scores with an image network)

class MeanPerFrame(torch.nn.Module):
    """A cheap stand-in for I3D (tests/test_i3d.py tests the real one): the mean colour of every frame, in order."""

    def forward(self, x):                       # (N, C, F, H, W) in [0, 1] -> (N, C * F)
        return x.mean(dim=(3, 4)).flatten(1)


def test_video_command_scores_motion_and_frames_separately(tmp_path, monkeypatch):
    """Generated = the reference clips played backwards. Frame-wise scores see the same set of frames (FD 0);
    FVD sees the motion, and equals the Frechet distance of the video features computed by hand."""
    import evaluate
    g = torch.Generator().manual_seed(0)
    real = (torch.rand(6, 3, 4, 8, 8, generator=g) * 255).round().to(torch.uint8)      # (N, C, F, H, W)
    root = tmp_path / 'clips'
    for n, clip in enumerate(real):
        (root / f'{n:02d}').mkdir(parents=True)
        for f in range(4):
            Image.fromarray(clip[:, f].permute(1, 2, 0).numpy()).save(root / f'{n:02d}' / f'{f:04d}.png')
    fake = real.flip(2)
    np.savez(tmp_path / 'fake.npz', samples=fake.permute(0, 2, 3, 4, 1).numpy())      # sample.py's (N, F, H, W, C)
    lenet = evaluate.LeNetFeatures(in_channels=3, num_classes=10, image_size=8)
    torch.save(lenet.state_dict(), tmp_path / 'lenet.pt')
    monkeypatch.setattr(evaluate, 'load_i3d', lambda path, device: MeanPerFrame())
    args = evaluate.parse_args(['--video', str(tmp_path / 'fake.npz'), str(root), '--metrics', 'fvd,fid',
                                '--network', 'lenet', '--lenet-weights', str(tmp_path / 'lenet.pt'),
                                '--out', str(tmp_path / 'scores.json')])
    results = evaluate.main(args)
    assert set(results) == {'FVD', 'frame-FD_lenet'}
    assert abs(results['frame-FD_lenet']) < 1e-6
    features = lambda v: MeanPerFrame()(v.double() / 255).numpy()
    expected = evaluate.frechet_distance(*evaluate.feature_statistics(features(fake)),
                                         *evaluate.feature_statistics(features(real)))
    assert expected > 1e-3 and abs(results['FVD'] - expected) < 1e-6 * expected
    assert (tmp_path / 'scores.json').exists()


def test_video_metric_names_and_checks():
    import evaluate
    assert evaluate.metric_name('fid', 'i3d') == 'FVD' and evaluate.metric_name('kid', 'i3d') == 'KVD'
    assert evaluate.metric_name('fid', 'inception/frames', 'legacy') == 'frame-FID'
    assert evaluate.metric_name('is', 'inception/frames', 'clean') == 'frame-clean-IS'
    assert evaluate.metric_name('fid', 'lenet/frames', 'clean') == 'frame-FD_lenet'
    with pytest.raises(ValueError, match=r'\(N, C, F, H, W\) videos'):
        evaluate.extract_features(torch.zeros(2, 3, 8, 8), evaluate.VideoFeatures(MeanPerFrame()), progress=False)
