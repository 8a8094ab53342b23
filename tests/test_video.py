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
import video


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


# ----------------------------------------------------------------------------------------------------
# Joint video-image training (Ho et al. 2022, Sec. 3): images appended along the frame axis stay independent

def test_joint_batch_keeps_images_independent():
    """Through video.py's batch builder: changing one appended image changes the output at that frame only, and
    changing a video frame changes the video's frames but none of the images. The images are frames of other clips
    of the video's class."""
    from unet import create_unet
    ds = data.VideoShapesDataset(num_videos=24, frames=4, resolution=8)
    k = video.joint_image_count(0.5, ds.frames)
    assert k == 4                                                      # share 1/2 of 8 frames: 4 video + 4 images
    g = torch.Generator().manual_seed(0)
    videos = torch.arange(3)
    sources = video.image_sources(ds.labels, torch.arange(len(ds)), videos, k, g)
    assert torch.equal(ds.labels[sources], ds.labels[videos].repeat_interleave(k))   # same class as the video
    x0, y0 = ds.batch(torch.cat([videos, sources]))
    x, y, frames = video.joint_video_image_batch(x0, y0, k, g)
    assert x.shape == (3, 3, 8, 8, 8) and frames == 4 and torch.equal(y, ds.labels[videos])
    assert torch.equal(x[:, :, :4], x0[:3])                            # the videos, unchanged
    for b in range(3):                                                 # each image is a frame of its source clip
        for j in range(k):
            clip = x0[3 + b * k + j]                                   # (C, F, H, W)
            assert any(torch.equal(x[b, :, 4 + j], clip[:, f]) for f in range(4))
    torch.manual_seed(0)
    net = create_unet('tiny-video', image_size=8, attention_resolutions=(8, 4)).eval()
    with torch.no_grad():
        for p in net.parameters():                                     # zero-initialised layers must pass signal
            p.add_(0.05 * torch.randn_like(p))
        level = torch.tensor([0.3, 1.0, 2.0])
        out = net(x, level, num_video_frames=frames)
        change = lambda x2: (net(x2, level, num_video_frames=frames) - out).abs().amax(dim=(0, 1, 3, 4))  # per frame
        image_edit = x.clone()
        image_edit[:, :, 5] += 1.0                                     # the second image of every sample
        moved = change(image_edit)
        assert moved[5] > 1e-2 and moved[[0, 1, 2, 3, 4, 6, 7]].max() < 1e-5
        video_edit = x.clone()
        video_edit[:, :, 0] += 1.0                                     # the first video frame
        moved = change(video_edit)
        assert moved[1:4].min() > 1e-4 and moved[4:].max() < 1e-5      # the video mixes over time, images do not


# ----------------------------------------------------------------------------------------------------
# Sampling videos: every sampler on 5-D tensors; extension by reconstruction guidance

def gaussian_video_prior(frames=4, pixels=4):
    """A Gaussian over (1, F, 2, 2) clips, correlated in time (squared-exponential, length 1.5 frames) and space."""
    from diffusion import GaussianMixture
    f = torch.arange(frames, dtype=torch.float64)
    T = torch.exp(-(f[:, None] - f[None]) ** 2 / (2 * 1.5 ** 2))
    S = 0.25 * torch.kron(T, 0.7 * torch.eye(pixels, dtype=torch.float64) + 0.3)
    S = S + 1e-3 * torch.eye(frames * pixels, dtype=torch.float64)
    mean = torch.linspace(-0.3, 0.3, frames * pixels, dtype=torch.float64)
    return GaussianMixture(mean[None], S[None]), mean, S


@pytest.mark.parametrize('name', ['euler', 'heun', 'ddim', 'dpmpp_2m', 'dpmpp_3m', 'euler_ancestral', 'dpmpp_2m_sde', 'pc'])
def test_samplers_treat_videos_as_flat_vectors(name):
    """A sampler on (N, C, F, H, W) gives exactly what it gives on the same numbers flattened to (N, D): nothing in
    it may assume 4-D images (per-sample sigmas must broadcast over the frame axis too)."""
    import samplers
    prior, _, _ = gaussian_video_prior()
    sigmas = samplers.karras_sigmas(8, 0.01, 20.0).double()
    x = sigmas[0] * torch.randn(3, 1, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run = lambda x: samplers.SAMPLERS[name](prior, x, sigmas, **(
        {'generator': torch.Generator().manual_seed(1)} if samplers.is_stochastic(name, {}) else {}))
    video, flat = run(x), run(x.flatten(1))
    torch.testing.assert_close(video.flatten(1), flat, rtol=1e-12, atol=1e-12)
    assert video.std() > 0.1                                          # it sampled something


def test_extension_keeps_given_frames_and_conditions_on_them():
    """Extension of 2 given frames by 4 (two windows of 4 frames, context 2) with the exact denoiser of a Gaussian
    video prior: the given frames come back exactly, and each window's new frames have, on average, the conditional
    mean E[x_new | the 2 frames before] (inverse.gaussian_posterior) rather than the prior mean. The guidance is an
    approximation (Ho et al. Eq. 7), so the bias is reduced, not zero: measured 0.35 of the prior's at w_r=2."""
    import inverse
    import samplers
    from video import extend_video
    prior, mean, S = gaussian_video_prior()
    g = torch.Generator().manual_seed(0)
    given = prior.sample(1, generator=g)[0].reshape(1, 1, 4, 2, 2)[:, :, :2].expand(600, -1, -1, -1, -1)
    sigmas = samplers.karras_sigmas(32, 0.002, 80.0).double()
    out = extend_video(prior, given, window=4, num_new=4, sigmas=sigmas, context=2,
                       method_options={'w_r': 2.0}, generator=torch.Generator().manual_seed(1))
    assert out.shape == (600, 1, 6, 2, 2)
    assert torch.equal(out[:, :, :2], given)                           # the given frames, as given
    A = torch.eye(16, dtype=torch.float64)[:8]                         # a window's first 2 frames (8 numbers)
    prior_mean = mean.reshape(4, 4)[2:].reshape(-1)
    for start in (2, 4):                                               # first window, then the slid one
        before = out[:, :, start - 2:start].reshape(600, 8)
        new = out[:, :, start:start + 2].reshape(600, 8)
        target = torch.stack([inverse.gaussian_posterior(mean, S, A, b)[0][8:] for b in before])   # (600, 8)
        bias = (new - target).mean(0).norm()
        prior_bias = (prior_mean - target).mean(0).norm()
        assert bias < 0.6 * prior_bias, (start, float(bias), float(prior_bias))


# ----------------------------------------------------------------------------------------------------
# Training and in-training evaluation on video data (the --eval-every crash of issue 17)

def test_training_with_joint_batches_and_evaluation_on_videos(tmp_path):
    """A 2-step run on moving shapes with joint batches and --eval-every: frame-wise scores are logged, finite."""
    import json
    from programs import run_program
    # 300 LeNet steps cost minutes on a busy CPU; the scores' quality is not tested here, so the run trains 5.
    fewer_steps = ('import evaluate\ntrain_classifier = evaluate.train_classifier\n'
                   'evaluate.train_classifier = lambda *a, **k: train_classifier(*a, **dict(k, steps=5))')
    out = tmp_path / 'run'
    run_program('train.py', [
        '--dataset', 'video-shapes', '--config', 'tiny-video', '--resolution', '8', '--steps', '2', '--batch-size', '2',
        '--image-share', '0.5', '--eval-every', '2', '--eval-samples', '4', '--sample-steps', '2', '--sampler', 'euler',
        '--sample-every', '0', '--val-every', '0', '--warmup', '1', '--out', str(out), '--no-progress'], patch=fewer_steps)
    records = [json.loads(line) for line in open(out / 'log.jsonl')]
    evals = [r['eval'] for r in records if 'eval' in r]
    assert evals and set(evals[-1]) >= {'frame-FD_lenet', 'frame-KD_lenet'}
    assert all(np.isfinite(v) for v in evals[-1].values())
    assert any('loss' in r and np.isfinite(r['loss']) for r in records)
