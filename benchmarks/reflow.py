"""
Flow vs reflow at 1, 2, 4 and 8 Euler steps on a 2-D Gaussian mixture (reflow.py; Liu et al. 2022, arXiv:2209.03003).

Data: three Gaussians (std 0.39) at the corners of a triangle; noise N(0, I). The flows, all sampled by Euler from
the same 4,000 noise points and compared with 4,000 exact samples by the sliced 2-Wasserstein distance (the floor
of that distance between two exact sample sets of this size is printed too):
  exact 1-RF     the exact 1-rectified flow: diffusion.GaussianMixture's exact denoiser as a velocity
  1-RF (MLP)     an MLP trained on independent (noise, data) pairs: the usual flow-matching model
  2-RF           reflow: an MLP initialised from 1-RF (MLP), trained on its (Z_0, Z_1) ODE couplings (100 Euler steps)
  2-RF distilled the 2-RF's one-step distillation (Sec. 2.3): v(., 0) fitted to Z_1 - Z_0
with the straightness S of each (Sec. 2.2). Training cost is the same per model (--steps of batch 256), and the
CPU seconds (process time) of every phase are printed.

Usage: OMP_NUM_THREADS=1 python benchmarks/reflow.py [--steps 2000] [--seed 0]
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reflow  # noqa: E402
from diffusion import GaussianMixture  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    p.add_argument('--steps', type=int, default=2000, help='training steps of each MLP (batch 256)')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    gm = GaussianMixture(torch.tensor([[-2.5, -1.0], [2.5, -1.0], [0.0, 2.5]]), torch.tensor([0.15, 0.15, 0.15]))
    g = torch.Generator().manual_seed(args.seed + 1)
    noise = lambda n, g: torch.randn(n, 2, generator=g)
    data = lambda n, g: gm.sample(n, generator=g)[0].float()
    z_eval, x_eval, x_floor, z_train = noise(4000, g), data(4000, g), data(4000, g), noise(8000, g)
    train = dict(steps=args.steps, batch=256, seed=args.seed)

    flows, cpu = {'exact 1-RF': reflow.velocity_from_denoiser(gm.denoise)}, {}
    t0 = time.process_time()
    flows['1-RF (MLP)'] = reflow.train_flow(reflow.VelocityMLP(2), reflow.independent_pairs(noise, data), **train)
    cpu['1-RF (MLP)'] = time.process_time() - t0
    t0 = time.process_time()
    flows['2-RF'] = reflow.reflow(flows['1-RF (MLP)'], copy.deepcopy(flows['1-RF (MLP)']).train(), z_train, **train)
    cpu['2-RF'] = time.process_time() - t0
    t0 = time.process_time()
    flows['2-RF distilled'] = reflow.distill_one_step(flows['2-RF'], z_train, **train)
    cpu['2-RF distilled'] = time.process_time() - t0

    print(f'sliced W2 to exact samples (floor between two exact sets: {reflow.sliced_wasserstein(x_floor, x_eval):.3f})')
    print(f"| flow | S (straightness) | 1 step | 2 steps | 4 steps | 8 steps | 100 steps | CPU s to train |")
    print('|---|---|---|---|---|---|---|---|')
    for name, v in flows.items():
        sw = [reflow.sliced_wasserstein(reflow.sample(v, z_eval, k), x_eval) for k in (1, 2, 4, 8, 100)]
        print(f"| {name} | {reflow.straightness(v, z_eval):.3f} | " + ' | '.join(f'{s:.3f}' for s in sw)
              + f" | {cpu.get(name, 0):.0f} |")


if __name__ == '__main__':
    main()
