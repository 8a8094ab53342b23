"""motion.py: the weight-free motion measure (centroid tracking, velocity W1 distances, straight-line share).

The tracker is checked against the velocities data.py drew, the distances against closed forms, and the whole
measure against plants: held-out halves of the data agree, frozen and shuffled-frame clips score clearly worse.
"""
import math

import numpy as np
import pytest
import torch

import data
import motion

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def shapes():
    """400 held-out moving-shapes clips, 8 frames at 16 px (the video experiment's setting)."""
    return data.load_dataset('video-shapes', split='test', resolution=16, num_videos=400, seed=0)


def test_tracker_recovers_the_drawn_velocities(shapes):
    """Tracked frame-to-frame velocities equal the constant velocity data.py drew, (end - start) / (F - 1).
    Circles are drawn with exact coverage, so they are tracked to a few hundredths of a pixel; the polygons' corner
    coverage is approximate (data.shape_sdf), which costs up to ~0.2 px per frame but little on average.
    (Planted and caught: no background subtraction (mass = raw intensity), which shrinks velocities toward 0;
    velocities over two frames instead of one.)"""
    centres = motion.track_centroids(shapes.images)                        # (N, F, 2)
    v = motion.velocities(centres).reshape(len(shapes), -1, 2)             # (N, F-1, 2)
    error = np.abs(v - shapes.params['velocity'][:, None])                 # (N, F-1, 2), px per frame
    circles = shapes.labels.numpy() == data.SHAPE_CLASSES.index('circle')
    assert error[circles].max() < 0.05
    assert error.mean() < 0.025
    # the speed distribution is recovered: W1 between tracked and drawn speeds of the same clips
    drawn = np.repeat(shapes.params['velocity'], v.shape[1], axis=0)
    assert motion.speed_w1(v.reshape(-1, 2), drawn) < 0.02


def test_fit_line_closed_form():
    """Exactly linear motion leaves no residual; x = (0, 0, 0, 3) over frames 0..3 is fitted by x = 0.9 f - 0.6
    (residuals 0.6, -0.3, -1.2, 0.9: RMS sqrt(0.675) px) with a fitted displacement of 3 x 0.9 = 2.7 px, not the
    3 px between the first and last centroids. (Planted and caught: the residual divided by F - 1 instead of F;
    the displacement taken as the last centroid minus the first.)"""
    f = torch.arange(5, dtype=torch.float64)
    linear = torch.stack([3 + 0.7 * f, 1 - 0.2 * f], -1)[None]            # (1, 5, 2)
    residual, displacement = motion.fit_line(linear)
    assert residual.item() == pytest.approx(0, abs=1e-12)
    torch.testing.assert_close(displacement[0], torch.tensor([2.8, -0.8], dtype=torch.float64))
    late_jump = torch.tensor([[[0.0, 5.0], [0.0, 5.0], [0.0, 5.0], [3.0, 5.0]]], dtype=torch.float64)
    residual, displacement = motion.fit_line(late_jump)
    assert residual.item() == pytest.approx(math.sqrt(0.675), rel=1e-12)
    torch.testing.assert_close(displacement[0], torch.tensor([2.7, 0.0], dtype=torch.float64))


def test_wasserstein_closed_forms():
    """W1(mu, mu shifted by d) = |d| in any dimension (the translation plan is optimal: Kantorovich-Rubinstein with
    f(x) = <x, d/|d|> gives the matching lower bound); a permutation of the same set is at distance 0; the speeds of
    a set and of the set scaled by 2 differ by the mean speed. (Planted and caught: matching in the given order
    instead of solving the assignment; squared instead of Euclidean ground cost.)"""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 2))
    d = np.array([0.3, -0.4])
    assert motion.velocity_w1(a, a + d) == pytest.approx(0.5, rel=1e-9)
    assert motion.velocity_w1(a, a[rng.permutation(300)]) == pytest.approx(0, abs=1e-12)
    assert motion.speed_w1(a, 2 * a) == pytest.approx(np.linalg.norm(a, axis=1).mean(), rel=1e-9)
    shuffled = rng.permutation(a[:, 0])                                    # same x's, paired with other y's
    b = np.stack([shuffled, a[:, 1]], -1)
    assert motion.velocity_w1(a, b) > 0.1                                  # the joint law differs; marginals do not


def test_held_out_halves_agree_and_frozen_or_shuffled_clips_do_not(shapes):
    """Two held-out halves of moving shapes are near each other; the same clips frozen (frame 0 repeated) or with
    their frames shuffled are clearly farther away on both distances, and no longer move in straight lines.
    Measured at 16 px: halves 0.04 / 0.08 px per frame (speed / velocity W1), frozen 0.35 / 0.35, shuffled
    0.57 / 0.57; straight shares 0.97 (tolerance 0.32 px), 0, 0.09. (Planted and caught: frozen clips counted as
    straight, without the movement condition.)"""
    half_a, half_b = shapes.images[:200], shapes.images[200:]
    same = motion.motion_distance(half_b, half_a)
    frozen = motion.motion_distance(motion.frozen_clips(half_b), half_a)
    shuffled = motion.motion_distance(motion.shuffled_clips(half_b, seed=0), half_a)
    assert same['speed_w1'] < 0.06 and same['velocity_w1'] < 0.12
    for planted in (frozen, shuffled):
        assert planted['speed_w1'] > 4 * same['speed_w1']
        assert planted['velocity_w1'] > 3 * same['velocity_w1']
    assert frozen['mean_speed'] == 0 and frozen['speed_w1'] == pytest.approx(same['reference_mean_speed'], rel=1e-6)
    assert same['straight_share'] > 0.95 and same['reference_straight_share'] > 0.95
    assert frozen['straight_share'] == 0 and shuffled['straight_share'] < 0.2
    assert same['tolerance_px'] == pytest.approx(0.32) and same['lost_share'] == 0


def test_moving_mnist_halves_and_plants(shared_data):
    """Moving MNIST (two digits, 32 px, bouncing): the joint centroid of the digits; halves agree with each other on
    the straight share (bounces make it ~0.35, not 1) and the plants are far off."""
    ds = data.load_dataset('moving-mnist', data_dir=shared_data, split='test', resolution=32, num_videos=300, frames=8)
    half_a, half_b = ds.images[:150], ds.images[150:]
    same = motion.motion_distance(half_b, half_a)
    frozen = motion.motion_distance(motion.frozen_clips(half_b), half_a)
    shuffled = motion.motion_distance(motion.shuffled_clips(half_b), half_a)
    assert same['speed_w1'] < 0.1 and abs(same['straight_share'] - same['reference_straight_share']) < 0.15
    assert frozen['speed_w1'] > 10 * same['speed_w1'] and shuffled['speed_w1'] > 10 * same['speed_w1']
    assert frozen['straight_share'] == 0 and shuffled['straight_share'] < 0.05


def test_lost_objects_and_bad_input():
    """A clip with an empty frame is lost (no centroid, not straight, no velocities); all lost -> NaN distances."""
    clips = motion.moving_discs(6, frames=5, size=16, seed=1)
    blank = clips.clone()
    blank[:2, :, 3] = blank[:2, :, 3, :1, :1]                              # frame 3 of two clips: background only
    stats = motion.motion_statistics(blank)
    assert stats['lost_share'] == pytest.approx(2 / 6)
    assert torch.isnan(stats['centres'][:2, 3]).all() and not torch.isnan(stats['centres'][2:]).any()
    assert stats['velocities'].shape == (4 * 4, 2)
    empty = clips[:, :, :, :1, :1].expand_as(clips)                       # every frame background only
    report = motion.motion_distance(empty, clips)
    assert math.isnan(report['speed_w1']) and report['lost_share'] == 1 and report['straight_share'] == 0
    with pytest.raises(ValueError, match='at least 3 frames'):
        motion.motion_statistics(clips[:, :, :2])
    with pytest.raises(ValueError, match='same frames'):
        motion.motion_distance(clips[:, :, :4], clips)


def test_evaluate_video_command_reports_motion(tmp_path, shapes):
    """evaluate.py --video --metrics motion: the measure of motion.py on the .npz clips, no network needed; frozen
    generated clips score the reference's mean speed and no straight share. (Planted and caught: the reference
    clips passed as the generated ones.)"""
    import evaluate
    real = shapes.images[:100]
    frozen = motion.frozen_clips(shapes.images[100:200])
    np.savez(tmp_path / 'fake.npz', videos=frozen.permute(0, 2, 3, 4, 1).numpy())      # sample.py's (N, F, H, W, C)
    np.savez(tmp_path / 'real.npz', videos=real.permute(0, 2, 3, 4, 1).numpy())
    results = evaluate.cli(['--video', str(tmp_path / 'fake.npz'), str(tmp_path / 'real.npz'), '--metrics', 'motion'])
    expected = motion.motion_distance(frozen, real)
    assert results['motion_speed_w1'] == pytest.approx(expected['speed_w1'], rel=1e-9)
    assert results['motion_speed_w1'] == pytest.approx(results['motion_reference_mean_speed'], rel=1e-6)
    assert results['motion_straight_share'] == 0 and results['motion_reference_straight_share'] > 0.9
