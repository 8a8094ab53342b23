"""Tests for lpips.py: distances equal the reference implementation's (the `lpips` package) on fixed random weights,
the weight files are read under their published key names, and a missing file says what to download."""
import pytest
import torch

import lpips  # this project's lpips.py (tests/conftest.py puts the project root first on sys.path)


pytestmark = pytest.mark.usefixtures('one_thread')


# torchvision's vgg16.features: (layer index, output channels) of its 13 convolutions (VGG configuration D)
VGG16_CONVS = [(0, 64), (2, 64), (5, 128), (7, 128), (10, 256), (12, 256), (14, 256), (17, 512), (19, 512), (21, 512),
               (24, 512), (26, 512), (28, 512)]


def fixed_random_weights(seed=0):
    """Every LPIPS-VGG weight drawn from `seed`, float64, under this file's names: He-scaled convs (activations stay
    O(1) through 13 layers), small biases, and lin weights in [0, 1) (the published w_l are >= 0)."""
    g = torch.Generator().manual_seed(seed)
    state, width = {}, 3
    for i, v in VGG16_CONVS:
        he_std = (2 / (9 * width)) ** 0.5
        state[f'features.{i}.weight'] = he_std * torch.randn(v, width, 3, 3, generator=g, dtype=torch.float64)
        state[f'features.{i}.bias'] = 0.1 * torch.randn(v, generator=g, dtype=torch.float64)
        width = v
    for k, c in enumerate((64, 128, 256, 512, 512)):                  # relu1_2 ... relu5_3
        state[f'lins.{k}.weight'] = torch.rand(1, c, 1, 1, generator=g, dtype=torch.float64)
    return state


def fixed_inputs():
    """Three pairs of 48x48 images in [-1, 1]: unrelated images, a small perturbation, a large one."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 48, 48, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.rand(3, 3, 48, 48, generator=g, dtype=torch.float64) * 2 - 1
    y[1] = (x[1] + 0.05 * torch.randn(3, 48, 48, generator=g, dtype=torch.float64)).clamp(-1, 1)
    y[2] = (x[2] + 0.5 * torch.randn(3, 48, 48, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return x, y


# lpips 0.1.4 (pip), LPIPS(net='vgg', version='0.1', pretrained=False, pnet_rand=True) on torchvision 0.28's vgg16,
# eval mode, float64, with fixed_random_weights(0) copied in and fixed_inputs(): `python tests/test_lpips.py` prints
# these with the reference package installed (and this project's root not on sys.path).
REFERENCE_DISTANCES = [7.484548540271e-01, 8.987958613089e-03, 3.119926847889e-01]


def test_distances_match_the_reference_implementation():
    """Eq. 1 as the `lpips` package computes it: the unit normalisation along channels at each position, the
    per-channel weights, the spatial mean, the ScalingLayer. (Planted mistakes caught: normalising over space,
    dim (2, 3), instead of over channels; summing instead of averaging over positions.)"""
    model = lpips.LPIPS().double()
    model.load_state_dict(fixed_random_weights(0))
    x, y = fixed_inputs()
    with torch.no_grad():
        d = model.eval()(x, y)
    assert torch.allclose(d, torch.tensor(REFERENCE_DISTANCES, dtype=torch.float64), rtol=1e-6, atol=0), d.tolist()


def test_normalisation_is_along_channels():
    h = torch.randn(2, 5, 3, 4)
    unit = lpips.normalize_channels(h)
    assert torch.allclose(unit.norm(dim=1), torch.ones(2, 3, 4), atol=1e-6)
    assert torch.allclose(unit * h.norm(dim=1, keepdim=True), h, atol=1e-5)


def test_lpips_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv(lpips.LPIPS_ENV, str(tmp_path))
    monkeypatch.setattr(lpips, 'default_cache_dir', lambda: str(tmp_path / 'cache'))
    with pytest.raises(FileNotFoundError) as error:
        lpips.find_lpips_weights(download=False)
    message = str(error.value)
    assert 'vgg16-397923af.pth' in message and 'vgg.pth' in message and 'L1 + GAN' in message


def test_lpips_loads_weight_files_under_their_published_names(tmp_path):
    """Weights saved under torchvision's and LPIPS's key names land where they belong: the loaded network gives
    the reference distances; d(x, x) = 0 and d is symmetric."""
    state = {k: v.float() for k, v in fixed_random_weights(0).items()}
    vgg = {k: v for k, v in state.items() if k.startswith('features.')}
    vgg['classifier.0.weight'] = torch.zeros(2, 2)                    # torchvision's file also holds the classifier
    torch.save(vgg, tmp_path / 'vgg16-397923af.pth')
    torch.save({f'lin{k}.model.1.weight': state[f'lins.{k}.weight'] for k in range(5)}, tmp_path / 'vgg.pth')
    model = lpips.load_lpips(str(tmp_path)).double()
    x, y = fixed_inputs()
    with torch.no_grad():
        assert torch.all(model(x, x) == 0)
        assert torch.allclose(model(x, y), model(y, x))
        # float32 weights: the reference values to float32 rounding
        assert torch.allclose(model(x, y), torch.tensor(REFERENCE_DISTANCES, dtype=torch.float64), rtol=1e-4)


if __name__ == '__main__':
    import re
    # Regenerate REFERENCE_DISTANCES with the reference package (pip install lpips torchvision, in a separate
    # environment; run from outside the project root so that `import lpips` above found the package).
    assert hasattr(lpips, 'pretrained_networks'), 'run with the lpips package, not this project root, on sys.path'
    reference = lpips.LPIPS(net='vgg', version='0.1', pretrained=False, pnet_rand=True, verbose=False).double()
    ours = fixed_random_weights(0)
    state, used = reference.state_dict(), set()
    for key in state:
        match = re.fullmatch(r'net\.slice\d\.(\d+\.(weight|bias))|lins?\.?(\d)\.model\.1\.weight', key)
        if match:                 # net.slice{k}.{i}.*: torchvision's layer i; lin{k} and lins.{k}: one module
            ours_key = f'features.{match[1]}' if match[1] else f'lins.{match[3]}.weight'
            state[key] = ours[ours_key]
            used.add(ours_key)
    assert used == set(ours), set(ours) - used
    reference.load_state_dict(state)
    x, y = fixed_inputs()
    with torch.no_grad():
        d = reference.eval()(x, y).flatten()
    print('REFERENCE_DISTANCES = [' + ', '.join(f'{v:.12e}' for v in d.tolist()) + ']')
