"""Tests of augment.py: each aug_cond entry means what the docstring says, the labels reproduce and invert the
transform exactly, each transform is drawn with probability p, and video frames move together."""
import pytest
import torch

import augment


pytestmark = pytest.mark.usefixtures('one_thread')


# ----------------------------------------------------------------------------------------------------
# Augmentation

def cond_with(**entries):
    """One aug_cond row with the named entries set."""
    cond = torch.zeros(1, augment.AUG_DIM)
    for name, value in entries.items():
        cond[0, augment.AUG_COND_NAMES.index(name)] = value
    return cond


@pytest.fixture
def batch():
    """64 images in [-1, 1]: smooth colour ramps plus a random checkerboard, so every transform shows."""
    g = torch.Generator().manual_seed(5)
    ramp = torch.linspace(-1, 1, 32)
    smooth = torch.stack([ramp[None, :].expand(32, 32), ramp[:, None].expand(32, 32), ramp.outer(ramp)])
    return (0.6 * smooth + 0.4 * (torch.rand(64, 3, 32, 32, generator=g) * 2 - 1)).contiguous()


def test_augment_p0_is_identity_with_zero_labels(batch):
    x_aug, cond = augment.AugmentPipe(p=0.0)(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_aug, batch) and cond.shape == (64, augment.AUG_DIM) and (cond == 0).all()


def test_each_aug_cond_entry_means_what_the_docstring_says(batch):
    x = batch[:1]
    W = x.shape[-1]
    apply = augment.apply_augment
    assert torch.equal(apply(x, cond_with(xflip=1)), x.flip(-1))
    assert torch.equal(apply(apply(x, cond_with(xflip=1)), cond_with(xflip=1)), x)     # x-flip twice = identity
    assert torch.equal(apply(x, cond_with(yflip=1)), x.flip(-2))
    quarter = cond_with(rot90_cos=-1, rot90_sin=1)                                      # k = 1: cos - 1, sin
    assert torch.equal(apply(x, quarter), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(apply(x, cond_with(rot90_cos=-2, rot90_sin=0)), torch.rot90(x, 2, dims=(-2, -1)))
    shifted = apply(x, cond_with(translate_x=3 / W, translate_y=-2 / W))                # 3 px right, 2 px up
    assert torch.equal(shifted[..., :-2, 3:], x[..., 2:, :-3])
    assert torch.equal(shifted[..., :-2, 2], x[..., 2:, 1])                             # reflect padding
    # 2x zoom about the centre: output pixel i (centre i + 0.5) samples the input at 16 + (i + 0.5 - 16) / 2,
    # so even i = 8 + 2j lands at index 11.75 + j: bilinear weights 1/4, 3/4 on pixels 11 + j, 12 + j per axis.
    zoom = apply(x, cond_with(log2_scale=1.0))
    rows = 0.25 * x[..., 11:19, :] + 0.75 * x[..., 12:20, :]
    assert torch.allclose(zoom[..., 8:24:2, 8:24:2], 0.25 * rows[..., 11:19] + 0.75 * rows[..., 12:20], atol=1e-5)
    assert torch.allclose(apply(x, cond_with(brightness=0.1)), x + 0.1)
    assert torch.allclose(apply(x, cond_with(log2_contrast=1.0)), 2 * x)
    saturated = apply(x, cond_with(log2_saturation=1.0))
    mean = x.mean(1, keepdim=True)
    assert torch.allclose(saturated, mean + 2 * (x - mean), atol=1e-6)
    assert torch.allclose(saturated.mean(1), x.mean(1), atol=1e-6)                      # grey level kept


def test_aug_cond_records_exactly_what_was_applied(batch):
    g = torch.Generator().manual_seed(1)
    pipe = augment.AugmentPipe(p=0.7)
    x_aug, cond = pipe(batch, generator=g)
    assert (cond != 0).any(0).all()                                         # every entry was exercised
    assert torch.equal(augment.apply_augment(batch, cond), x_aug)               # the labels alone reproduce it
    # Without resampling transforms, inverting the recorded transform recovers the images (to float error).
    exact = augment.AugmentPipe(p=0.7, translate=0, scale_std=0)
    x_aug, cond = exact(batch, generator=g)
    assert (x_aug - batch).abs().max() > 0.5
    assert (augment.invert_augment(x_aug, cond) - batch).abs().max() < 1e-5
    # Integer translation is exact too, except for the pixels that came in from the reflected border.
    shifted, cond = augment.AugmentPipe(p=1.0, xflip=False, yflip=False, rotate90=False, scale_std=0, brightness_std=0,
                                     contrast_std=0, saturation_std=0)(batch, generator=g)
    m = round(0.125 * 32)
    assert (cond[:, 4:6].abs() * 32 <= m + 1e-4).all() and (cond[:, 4:6] != 0).any()
    assert (cond[:, :4] == 0).all() and (cond[:, 6:] == 0).all()              # disabled transforms stay 0
    assert torch.equal(augment.invert_augment(shifted, cond)[..., m:-m, m:-m], batch[..., m:-m, m:-m])
    # Same generator seed, same augmentation (reproducible runs).
    a = pipe(batch, generator=torch.Generator().manual_seed(7))
    b = pipe(batch, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_each_augmentation_is_applied_with_probability_p():
    p, n = 0.3, 20000
    cond = augment.AugmentPipe(p=p).sample(n, channels=3, resolution=32, generator=torch.Generator().manual_seed(0))
    on = cond != 0
    tolerance = 5 * (p * (1 - p) / n) ** 0.5                                  # 5 standard deviations
    names = augment.AUG_COND_NAMES
    for name in ('xflip', 'yflip', 'log2_scale', 'brightness', 'log2_contrast', 'log2_saturation'):
        assert abs(on[:, names.index(name)].float().mean() - p) < tolerance, name
    turned = on[:, 2] | on[:, 3]
    assert abs(turned.float().mean() - p) < tolerance
    k = torch.round(torch.atan2(cond[turned, 3], cond[turned, 2] + 1) / (torch.pi / 2)).long() % 4
    assert k.bincount(minlength=4)[0] == 0 and (k.bincount(minlength=4)[1:] > 0.3 * turned.sum() / 3).all()
    # A drawn shift can be 0 (9 values -4..4 px), so a translation is visible at rate p * 8/9.
    assert abs(on[:, 4].float().mean() - p * 8 / 9) < tolerance
    grey = augment.AugmentPipe(p=p).sample(100, channels=1, generator=torch.Generator().manual_seed(0))
    assert (grey[:, names.index('log2_saturation')] == 0).all()              # no saturation for 1 channel


def test_augment_moves_all_frames_of_a_video_together():
    videos = torch.rand(6, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1   # (N, C, F, H, W)
    v_aug, cond = augment.AugmentPipe(p=0.8)(videos, generator=torch.Generator().manual_seed(3))
    assert v_aug.shape == videos.shape
    for f in range(4):
        assert torch.allclose(v_aug[:, :, f], augment.apply_augment(videos[:, :, f], cond), atol=1e-6)
