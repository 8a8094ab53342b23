"""
Parity of i3d.py with the I3D that the PyTorch FVD code runs (VideoGPT's copy of piergiaj/pytorch-i3d).

The reference module is not part of this project: put its file somewhere private and point --ref-dir at it, e.g.
    git clone https://github.com/wilson1yan/VideoGPT /tmp/VideoGPT      # or any copy of videogpt/fvd/pytorch_i3d.py
    python benchmarks/parity_i3d.py --ref-dir /tmp/VideoGPT/videogpt/fvd
Both networks get the same random state dict (He-initialised convolutions, random BatchNorm statistics) through
`load_state_dict(strict=True)`, so the check covers the key names and shapes as well as the computation: TF 'SAME'
padding, pooling, branch order, the 2x7x7 average pool and the mean of the logits over time. The reference gets the
input after our preprocessing (resize to 224, [0, 1] -> [-1, 1]), which is what its FVD code feeds it. With
--weights PATH the real i3d_pretrained_400.pt is used instead of random weights.

Prints the largest absolute difference of the (N, 400) logits, relative to their scale.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from i3d import InceptionI3d, he_init_  # noqa: E402


def random_state(seed=0):
    """He-initialised weights plus non-trivial BatchNorm affine parameters and running statistics."""
    model = he_init_(InceptionI3d(), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return {k: v for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    p.add_argument('--ref-dir', required=True, help='folder holding pytorch_i3d.py (VideoGPT videogpt/fvd)')
    p.add_argument('--weights', default=None, help='i3d_pretrained_400.pt (default: random weights)')
    p.add_argument('--clips', type=int, default=2)
    p.add_argument('--frames', type=int, default=17,
                   help='17 or more: 16 frames leave 2 time steps before the 2x7x7 logits pool, which hides a 1x7x7 '
                        'pool and logits taken at one time step (tests/test_i3d.py stores logits at 17)')
    p.add_argument('--size', type=int, default=64, help='input frame side before the resize to 224')
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.ref_dir)
    from pytorch_i3d import InceptionI3d as ReferenceI3d

    state = torch.load(args.weights, map_location='cpu', weights_only=True) if args.weights else random_state()
    ours, ref = InceptionI3d().eval(), ReferenceI3d(400, in_channels=3).eval()
    print('ours', ours.load_state_dict(state, strict=False))   # only num_batches_tracked may be missing
    print('reference', ref.load_state_dict(state, strict=False))
    videos = torch.rand(args.clips, 3, args.frames, args.size, args.size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t0 = time.perf_counter()
        a = ours(videos)
        t1 = time.perf_counter()
        b = ref(ours.preprocess(videos))
        t2 = time.perf_counter()
    diff = (a - b).abs().max().item()
    print(f'{args.clips} clips x {args.frames} frames: ours {t1 - t0:.1f} s, reference {t2 - t1:.1f} s')
    print(f'logits {tuple(a.shape)}, scale (max |logit|) {b.abs().max().item():.4g}, '
          f'max |ours - reference| {diff:.3g} (relative {diff / b.abs().max().item():.2e})')


if __name__ == '__main__':
    main()
