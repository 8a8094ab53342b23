"""
A LeNet as the feature network of an offline Frechet distance: FD_lenet and KD_lenet.

FID needs the Inception weights (inception.py); on an offline machine, or for data far from ImageNet (MNIST, emoji),
a small classifier trained on the dataset itself is the usual stand-in: a LeNet-5-style CNN (LeCun et al. 1998,
widths (8, 16) instead of (6, 16)) whose penultimate layer gives the features. Its Frechet distances are reported as
FD_lenet and KD_lenet and are NOT comparable with FID (another network, another dataset). Its inputs are always
resized with the antialiased bicubic resize (Parmar et al. 2022, clean-fid), as part of the network.

    model = train_classifier(images, labels, num_classes=10)   # images (N, C, H, W) in [0, 1] or uint8
    features, logits = model(x, return_logits=True)             # x in [0, 1], any size and channel count
    model = lenet_from_state_dict(torch.load(path, weights_only=True))

A leaf: imports only torch, so it can be copied alone (metrics.py computes the distances on its features).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def resize_clean(x, size):
    """Antialiased bicubic resize of float images (N, C, H, W) in [0, 1] (inception.resize_images' 'clean' mode,
    repeated here so this file stands alone): computed in float64 and clamped, as clean-fid does."""
    if x.shape[-2:] == (size, size):
        return x
    y = F.interpolate(x.double(), size=(size, size), mode='bicubic', align_corners=False, antialias=True)
    return y.clamp(0, 1).to(x.dtype)


def to_unit_float(x):
    """uint8 [0, 255] -> float [0, 1]; floats are taken to be in [0, 1] already."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


# ----------------------------------------------------------------------------------------------------
# The network, its training, and rebuilding it from saved weights


class LeNetFeatures(nn.Module):
    """LeNet-5-style CNN (LeCun et al. 1998) trained on the dataset itself; features = penultimate layer.

    Fréchet distances in its feature space are reported as FD_lenet: they are not comparable with FID.
    """

    name = 'lenet'
    resize = 'clean'  # its inputs are always resized this way (part of the network, not a protocol choice)

    def __init__(self, in_channels=1, num_classes=10, image_size=28, feature_dim=128, widths=(8, 16)):
        super().__init__()
        self.in_channels = in_channels  # 1 for MNIST; colour inputs are averaged to gray if 1
        self.image_size = image_size  # inputs are resized to this (antialiased)
        self.feature_dim = feature_dim  # width of the penultimate layer = dimension of the features
        self.conv1 = nn.Conv2d(in_channels, widths[0], 5, padding=2)  # LeNet-5 widths are (6, 16)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 5, padding=2)
        self.fc1 = nn.Linear(widths[1] * (image_size // 4) ** 2, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def forward(self, x, return_logits=False):
        x = x.float()
        if x.shape[1] != self.in_channels:  # gray <-> colour, so any sampler output can be scored
            x = x.mean(1, keepdim=True).expand(-1, self.in_channels, -1, -1)
        x = resize_clean(x, self.image_size)  # self.resize == 'clean'
        x = 2 * x - 1
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        features = F.relu(self.fc1(x.flatten(1)))
        return (features, self.fc2(features)) if return_logits else features


def train_classifier(images, labels, num_classes=10, steps=500, batch_size=128, lr=1e-3, seed=0):
    """Train LeNetFeatures on (N, C, H, W) images in [0, 1] (or uint8) and integer labels."""
    images, labels = to_unit_float(torch.as_tensor(images)), torch.as_tensor(labels).long()
    generator = torch.Generator().manual_seed(seed)
    model = LeNetFeatures(images.shape[1], num_classes, images.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        _, logits = model(images[idx], return_logits=True)
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def lenet_from_state_dict(state, source='the state dict'):
    """Rebuild LeNetFeatures from its saved weights alone (the shapes give the architecture), or a clear error."""
    try:
        widths = (state['conv1.weight'].shape[0], state['conv2.weight'].shape[0])
        image_size = int(math.sqrt(state['fc1.weight'].shape[1] / widths[1])) * 4
        model = LeNetFeatures(state['conv1.weight'].shape[1], state['fc2.weight'].shape[0], image_size,
                              state['fc1.weight'].shape[0], widths)
        model.load_state_dict(state)
    except (KeyError, IndexError, AttributeError, TypeError, RuntimeError) as e:  # missing keys, another object
        raise ValueError(f'{source} is not the state dict of a LeNetFeatures ({type(e).__name__}: {e}); make one '
                         'with --train-lenet') from None
    return model.eval().requires_grad_(False)


if __name__ == '__main__':
    # Demo: two classes of synthetic images (a bright left or right half, with noise); the trained LeNet separates
    # them, and a copy rebuilt from its state dict alone gives the same features.
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(2, (512,), generator=g)
    images = 0.3 * torch.rand(512, 1, 16, 16, generator=g)
    images[labels == 0, :, :, :8] += 0.6
    images[labels == 1, :, :, 8:] += 0.6
    model = train_classifier(images, labels, num_classes=2, steps=60, batch_size=64, lr=3e-3)
    features, logits = model(images, return_logits=True)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    rebuilt = lenet_from_state_dict(model.state_dict())
    print(f'train accuracy {accuracy:.3f} (chance 0.5); features {tuple(features.shape)}; rebuilt from its state '
          f'dict: max |difference| {(rebuilt(images) - features).abs().max().item():.1e}')
