"""
Rectified flow and reflow: straighten the paths of a flow so that few Euler steps (even one) sample well.

Paper: Liu, Gong & Liu 2022, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified
Flow", arXiv:2209.03003. Its notation, used in this file: X0 ~ pi_0 is the *noise*, X1 ~ pi_1 the *data*, time runs
from noise (t = 0) to data (t = 1). (diffusion.py runs the other way: x_t = (1 - t) x0 + t noise, t = 1 is noise;
velocity_from_denoiser converts.)

  rectified flow (Eq. 1):  min_v  int_0^1 E || (X1 - X0) - v(X_t, t) ||^2 dt,   X_t = t X1 + (1 - t) X0
  sampling:                dZ_t = v(Z_t, t) dt from Z_0 ~ pi_0 (Euler here)
  reflow (Alg. 1):         Z^{k+1} = RectFlow((Z_0^k, Z_1^k)): draw Z_0 ~ pi_0, run the ODE of the k-rectified flow
                           to Z_1, and train a new flow on these *coupled* pairs instead of independent ones.
                           Paths of a coupled pair cross less, so the new flow is straighter (Thm. 3.7).
  straightness (Def. 2.x): S(Z) = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt; S = 0 iff every path is a straight
                           line travelled at constant speed, which one Euler step then integrates exactly.
  distillation (Sec. 2.3): for k = 1 step, min_v E || (Z_1 - Z_0) - v(Z_0, 0) ||^2 on the coupled pairs: the one-step
                           map Z_0 + v(Z_0, 0) is fitted to the flow's own endpoints.

The 1-rectified flow trained on independent pairs (X0, X1) is the usual flow-matching model; a trained image model
of this codebase is one too (its denoiser, through velocity_from_denoiser). The demo and tests use a small MLP on
2-D data; a GaussianMixture's exact denoiser gives the exact 1-rectified flow to start from.

Tensors: x (N, D) float; t (N,) in [0, 1]. Usage:
    z0, z1 = make_couplings(velocity, noise)             # the ODE's endpoints of the current flow
    student = train_flow(VelocityMLP(2), coupled_pairs(z0, z1), steps=2000)
    print(straightness(student, noise), straightness(velocity, noise))
"""
import copy
import math

import torch
import torch.nn as nn
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------------
# A velocity network for low-dimensional data

class VelocityMLP(nn.Module):
    """v(x, t): an MLP on [x, sin/cos features of t], for 2-D toy data."""

    def __init__(self,
                 dim=2,                   # data dimension D
                 hidden=128,              # width of the hidden layers
                 depth=3,                 # hidden layers
                 time_features=8):        # sin/cos pairs of t at frequencies 1, 2, 4, ... (times pi)
        super().__init__()
        self.register_buffer('freqs', math.pi * 2.0 ** torch.arange(time_features), persistent=False)
        layers, width = [], dim + 2 * time_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x, t):
        angles = t.to(x.dtype)[:, None] * self.freqs                          # (N, time_features)
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1))


def velocity_from_denoiser(denoiser, t_clip=1e-4):
    """The velocity v(z, t) (this file's frame) of a denoiser D(x, sigma) of diffusion.py's flow frame.

    With s = 1 - t the diffusion time, x_s = (1 - s) x0 + s noise = z and sigma = s / (1 - s): x0_hat = D(z / (1 - s),
    sigma), and v = X1 - X0 = x0 - noise = (x0_hat - z) / s. t is clipped to [t_clip, 1 - t_clip] (sigma finite)."""
    def velocity(z, t):
        s = (1 - t).clamp(t_clip, 1 - t_clip).to(z.dtype)[:, None]
        x0_hat = denoiser(z / (1 - s), (s / (1 - s))[:, 0])
        return (x0_hat.to(z.dtype) - z) / s
    return velocity


# ----------------------------------------------------------------------------------------------------
# Training: the rectified-flow objective on a source of (X0, X1) pairs

def independent_pairs(sample_noise, sample_data):
    """The 1-rectified flow's coupling: noise and data drawn independently. Each fn(n, generator) -> (n, D)."""
    return lambda n, g: (sample_noise(n, g), sample_data(n, g))


def coupled_pairs(z0, z1):
    """Reflow's coupling: rows drawn from fixed (Z_0, Z_1) pairs made by one flow's ODE (make_couplings)."""
    def draw(n, g):
        i = torch.randint(len(z0), (n,), generator=g)
        return z0[i], z1[i]
    return draw


def flow_loss(velocity, x0, x1, t):
    """|| (X1 - X0) - v(X_t, t) ||^2 per sample, X_t = t X1 + (1 - t) X0 (Liu et al. Eq. 1)."""
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    return ((x1 - x0) - velocity(x_t, t)).pow(2).sum(1)


def train_flow(model, pairs, steps=2000, batch=512, lr=2e-3, seed=0, t_fixed=None, progress=False):
    """Adam on E_t E_pairs flow_loss, t ~ U(0, 1) (or t = t_fixed: 0 is one-step distillation, Sec. 2.3).
    pairs(n, generator) -> (X0, X1). The learning rate decays by cosine to 10%. Returns the trained model."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in tqdm(range(steps), disable=not progress, desc='train flow'):
        for group in opt.param_groups:
            group['lr'] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        x0, x1 = pairs(batch, g)
        t = torch.rand(batch, generator=g, dtype=x0.dtype) if t_fixed is None else \
            torch.full((batch,), float(t_fixed), dtype=x0.dtype)
        loss = flow_loss(model, x0, x1, t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Sampling, couplings, straightness

@torch.no_grad()
def euler_trajectory(velocity, z0, steps):
    """Euler from t = 0 to 1 in `steps` equal steps: (Z_1, the velocities v_k (steps, N, D) that were used)."""
    z, vs = z0, []
    for k in range(steps):
        t = torch.full((len(z),), k / steps, dtype=z.dtype)
        v = velocity(z, t)
        vs.append(v)
        z = z + v / steps
    return z, torch.stack(vs)


def sample(velocity, z0, steps):
    """Samples Z_1 of the ODE dZ = v dt from noise z0, by `steps` Euler steps."""
    return euler_trajectory(velocity, z0, steps)[0]


def make_couplings(velocity, z0, steps=100):
    """Reflow's data (Alg. 1): (Z_0, Z_1) with Z_1 the ODE solution from Z_0 (Euler, many steps)."""
    return z0, sample(velocity, z0, steps)


def straightness(velocity, z0, steps=100):
    """S(Z) = int_0^1 E || (Z_1 - Z_0) - v(Z_t, t) ||^2 dt on the flow's own Euler paths (Liu et al. Sec. 2.2),
    the integral a mean over the steps; Z_1 - Z_0 = sum_k v_k / steps on these paths."""
    _, vs = euler_trajectory(velocity, z0, steps)
    chord = vs.mean(0)                                                         # Z_1 - Z_0
    return (vs - chord[None]).pow(2).sum(-1).mean().item()


def reflow(velocity, student, z0, steps=2000, ode_steps=100, **train_kw):
    """One reflow: couple z0 to the ODE endpoints of `velocity`, then train `student` on those pairs.
    The paper initialises the k+1-rectified flow from the k-th; pass copy.deepcopy(model) to do so."""
    z0, z1 = make_couplings(velocity, z0, ode_steps)
    return train_flow(student, coupled_pairs(z0, z1), steps=steps, **train_kw)


def distill_one_step(model, z0, steps=2000, ode_steps=100, **train_kw):
    """k = 1 distillation (Sec. 2.3): v(., 0) fitted to Z_1 - Z_0 of the model's own couplings; sample with 1 step."""
    z0, z1 = make_couplings(model, z0, ode_steps)
    return train_flow(copy.deepcopy(model).train(), coupled_pairs(z0, z1), steps=steps, t_fixed=0.0, **train_kw)


def sliced_wasserstein(a, b, projections=256, seed=0):
    """Sliced 2-Wasserstein distance between two equal-size point clouds (N, D): the root mean over random unit
    directions of the squared W2 between the sorted 1-D projections. A sample-quality number for toy data."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (x.double() @ dirs for x in (a, b))
    return (pa.sort(0)[0] - pb.sort(0)[0]).pow(2).mean().sqrt().item()


# ----------------------------------------------------------------------------------------------------

if __name__ == '__main__':
    # Two well-separated Gaussians in 2-D; noise N(0, I). 1-RF on independent pairs, then one reflow.
    torch.manual_seed(0)
    means = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    data = lambda n, g: means[torch.randint(2, (n,), generator=g)] + 0.3 * torch.randn(n, 2, generator=g)
    noise = lambda n, g: torch.randn(n, 2, generator=g)
    g = torch.Generator().manual_seed(1)
    z0, exact = noise(2000, g), data(2000, g)
    flow1 = train_flow(VelocityMLP(2), independent_pairs(noise, data), steps=800, batch=256)
    flow2 = reflow(flow1, copy.deepcopy(flow1).train(), noise(4000, g), steps=800, batch=256)
    for name, v in (('1-rectified (independent pairs)', flow1), ('2-rectified (reflow)', flow2)):
        sw = {k: sliced_wasserstein(sample(v, z0, k), exact) for k in (1, 2, 8)}
        print(f'{name:32s} straightness S = {straightness(v, z0):.3f}; sliced W2 to data at 1/2/8 Euler steps: '
              + ' / '.join(f'{sw[k]:.3f}' for k in sw))
