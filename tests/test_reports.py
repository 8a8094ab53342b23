"""reports.py: the loss per noise level lands in the right bins, and the held-out batch is the same every time."""
import math

import pytest
import torch

import data
import reports
from diffusion import Diffusion

pytestmark = pytest.mark.usefixtures('one_thread')


def test_loss_by_noise_level_bins_by_log_sigma_and_averages_per_bin():
    """4 bins of log sigma over [0.01, 100]: one decade each. Losses at sigma 0.05 (bin 0) and 50 (bin 3)."""
    tracker = reports.LossByNoiseLevel(0.01, 100.0, n_buckets=4)
    tracker.add([(torch.tensor([1.0, 3.0]), torch.tensor([0.05, 0.05])), (torch.tensor([10.0]), torch.tensor([50.0]))])
    tracker.add([(torch.tensor([5.0]), torch.tensor([0.05]))])
    loss, by_sigma = tracker.summary()
    centres = [f'{math.exp(math.log(0.01) + (b + 0.5) * math.log(1e4) / 4):.3g}' for b in (0, 3)]
    assert by_sigma == {centres[0]: 3.0, centres[1]: 10.0}            # (1 + 3 + 5) / 3 and 10
    assert loss == pytest.approx(((2.0 + 10.0) / 2 + 5.0) / 2)        # the mean over steps of each step's mean
    tracker.reset()
    assert tracker.summary() == (0.0, {})


def test_held_out_batch_is_fixed_and_spreads_its_noise_levels():
    dataset = data.load_dataset('shapes', resolution=8, num_images=40)
    config = {'data': {'num_classes': 6}, 'net': {'aug_dim': 0}}
    diffusion = Diffusion('edm', 'edm')
    a = reports.held_out_batch(dataset, torch.arange(20, 40), diffusion, config)
    b = reports.held_out_batch(dataset, torch.arange(20, 40), diffusion, config)
    assert all(torch.equal(a[k], b[k]) for k in ('x0', 'sigma', 'noise')) and torch.equal(a['cond']['y'], b['cond']['y'])
    # the 1%..99% quantiles of the training distribution, one per image, shuffled
    expected = diffusion.schedule.sigma(torch.linspace(0.01, 0.99, 20, dtype=torch.float64)).float()
    assert torch.allclose(a['sigma'].sort().values, expected.sort().values)
    assert reports.held_out_batch(dataset, torch.arange(0), diffusion, config, quiet=True) is None
