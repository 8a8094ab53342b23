"""Speed where users wait, each figure beside its peer in one run (issue 31): FID features against pytorch-fid,
the U-Net training step and sampling against diffusers' UNet2DModel of the same architecture.

Rows (all float32, the same inputs for both contenders):
  1. Inception features, 32x32 images resized to 299 inside the network (the CIFAR-10 case), batch 64:
     inception.load_inception(fast=True) (evaluate.py's default: NHWC, batch norm folded into the convolutions)
     and the exact path (pytorch-fid's arithmetic bit for bit) against pytorch-fid's InceptionV3 on the same
     weights. Also printed: the largest feature difference to pytorch-fid on the timed batch.
  2. The ddpm-cifar10 U-Net's training step (forward, MSE, backward, Adam step), batch 8, channels-last as
     checkpoints.build_network builds it, against diffusers' UNet2DModel with google/ddpm-cifar10-32's config
     (35,746,307 parameters each). Two rows from one race: both with torch's default Adam (the networks alone), and
     ours with the Adam runs.make_trainee builds (fused on the CPU) against diffusers with torch's default Adam
     (what its training examples use: torch.optim.AdamW with default settings).
     Then Amdahl's bound: diffusers' step against our step's convolutions alone (and its convolutions, linears and
     attention calls alone), replayed on the inputs and gradients of a real step (gemm_floor): the most that making
     every other op free could give at the same arithmetic.
  3. Sampling: one forward pass of each network (no grad) at batch 8, given as images/s of sample.py's default
     18-step Heun (35 network evaluations per image batch).
  4. Our own before/after: the U-Net training step of train.py's default 'micro' config, batch 64, channels-last
     (build_network's layout) against contiguous NCHW (the layout before issue 31).
Weights are random (speed does not depend on their values; the Inception BatchNorm statistics are calibrated so
activations stay at unit scale as with trained weights), so nothing is downloaded.

Timing: the contenders alternate in one process, round by round (A B, then B A, ...), so a change of machine load
hits both alike; each row gives the median over rounds of the per-round speed ratio, with its spread (min-max),
from wall-clock time and from the process's CPU time (on a machine shared with other jobs the CPU time is the
steadier figure at --threads 1; with several threads it also counts threads waiting at barriers). Rates are
printed as wall / CPU: per second of wall time and per second of the process's CPU time.

Needs pytorch-fid (with torchvision) and diffusers importable; rows whose peer is missing are skipped. E.g.
    python -m venv --system-site-packages /tmp/refenv_31
    /tmp/refenv_31/bin/pip install --no-deps pytorch-fid==0.3.0 torchvision==0.28.0   # torchvision matching torch
    /tmp/refenv_31/bin/pip install diffusers==0.42.1
    /tmp/refenv_31/bin/python benchmarks/speed.py [--quick] [--threads 1] [--device cuda]
On CUDA the Inception row adds bf16 autocast with its feature error (not yet measured: no GPU so far).
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import types

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import inception  # noqa: E402
import unet  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# The contenders

def calibrated_inception_weights(path, seed=0):
    """FID Inception weights under the real key names: random convolutions, BatchNorm calibrated on random images."""
    torch.manual_seed(seed)
    net = inception.FIDInceptionV3()
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None                       # cumulative average over the calibration pass
            m.reset_running_stats()
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    batch = torch.cat([F.interpolate(torch.rand(1, 3, s, s, generator=g), size=(299, 299), mode='bilinear',
                                     align_corners=False) for s in (32, 64, 128, 299)])
    with torch.no_grad():
        net.train()(batch)
    torch.save(net.eval().state_dict(), path)


def pytorch_fid_network(path):
    """pytorch-fid's InceptionV3 (2048-d pool features, its resize and scaling) on the file at path, or None."""
    # A torchvision wheel built for CUDA on a CPU-only torch fails on import in its operator registrations, which
    # pytorch-fid does not need (benchmarks/inception_parity.py).
    sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))
    try:
        import pytorch_fid.inception as pf
    except ImportError:
        return None
    pf.load_state_dict_from_url = lambda *args, **kwargs: torch.load(path)   # our file instead of a download
    net = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True).eval()
    return lambda x: net.to(x.device)(x)[0].flatten(1)


def features(net, x, autocast_dtype=None):
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return net(x)


def diffusers_unet():
    try:
        from networks import diffusers_ddpm_cifar10      # benchmarks/networks.py: google/ddpm-cifar10-32's config
        return diffusers_ddpm_cifar10()
    except ImportError:
        return None


def train_step(net, x, noise_level, diffusers=False, fused=None):
    """One step: forward, MSE against a fixed target, backward, Adam (fused=True: as runs.make_trainee on the CPU)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, fused=fused)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    net.train()

    def step():
        out = net(x, noise_level).sample if diffusers else net(x, noise_level)
        loss = F.mse_loss(out, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def forward(net, x, noise_level, diffusers=False):
    net = copy.deepcopy(net).eval()

    def call():
        with torch.inference_mode():
            return net(x, noise_level).sample if diffusers else net(x, noise_level)
    return call


def gemm_floor(net, x, noise_level):
    """The unavoidable part of our training step: {'convs': fn, 'convs, linears, SDPA': fn}, each replaying forward
    and backward of those calls alone, on the very inputs and output gradients one real step gave them. The time of
    a peer's whole step over these is the most any speed-up of the other ops (norms, SiLU, dropout, copies, adds,
    the optimizer) could give at the same arithmetic: Amdahl's bound."""
    convs, linears, attention, real_sdpa = [], [], [], F.scaled_dot_product_attention
    keep = lambda t: t.detach().clone(memory_format=torch.preserve_format)

    def record(calls, inputs, output, module=None):
        rec = dict(module=module, inputs=[keep(t) for t in inputs], grad_of=[t.requires_grad for t in inputs])
        output.register_hook(lambda g: rec.__setitem__('grad', keep(g)))
        calls.append(rec)

    def spy(q, k, v, **kwargs):
        out = real_sdpa(q, k, v, **kwargs)
        record(attention, (q, k, v), out)
        return out
    hooks = [m.register_forward_hook(lambda m, i, o: record(convs if isinstance(m, torch.nn.Conv2d) else linears,
                                                            i[:1], o, m))
             for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    F.scaled_dot_product_attention = spy
    try:
        F.mse_loss(net(x, noise_level), torch.randn_like(x)).backward()
    finally:
        F.scaled_dot_product_attention = real_sdpa
        for h in hooks:
            h.remove()
    net.zero_grad(set_to_none=True)

    def replay(*groups):
        def run():
            for calls in groups:
                for c in calls:
                    inputs = [t.requires_grad_(g) for t, g in zip(c['inputs'], c['grad_of'])]
                    out = c['module'](*inputs) if c['module'] is not None else real_sdpa(*inputs)
                    out.backward(c['grad'])
            net.zero_grad(set_to_none=True)
        return run
    return {'convs': replay(convs), 'convs, linears, SDPA': replay(convs, linears, attention)}


# ----------------------------------------------------------------------------------------------------
# Interleaved timing

def race(contenders, rounds, warmup=1, device='cpu'):
    """{name: fn}: (wall seconds, CPU seconds) per call of each, rounds calls each in alternating order."""
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    wall, cpu = {k: [] for k in contenders}, {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            w, c = time.perf_counter(), time.process_time()
            contenders[name]()
            sync()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return wall, cpu


def ratio_summary(times, ours, peer):
    """Median and (min, max) over rounds of peer_time / our_time (> 1: ours is faster)."""
    ratios = [p / o for o, p in zip(times[ours], times[peer])]
    return statistics.median(ratios), min(ratios), max(ratios)


def print_row(figure, unit_per_call, units, times_wall, times_cpu, ours, peer, extra=''):
    rate = lambda t, name: unit_per_call / statistics.median(t[name])
    med, lo, hi = ratio_summary(times_wall, ours, peer)
    cmed, clo, chi = ratio_summary(times_cpu, ours, peer)
    rates = lambda name: f'{rate(times_wall, name):.2f} / {rate(times_cpu, name):.2f}'
    print(f'{figure:<38} {ours:<22} {rates(ours):>13} {peer:<22} {rates(peer):>13} {units:<10}'
          f' {med:>5.2f}x ({lo:.2f}-{hi:.2f})   {cmed:>5.2f}x ({clo:.2f}-{chi:.2f}) {extra}', flush=True)


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='fewer rounds and a feature batch of 32 (about 2 minutes)')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    p.add_argument('--rounds', type=int, default=None, help='rounds per row (default 3, --quick 2; U-Net rows x2)')
    p.add_argument('--feature-batch', type=int, default=None, help='Inception batch (default 64, --quick 32)')
    p.add_argument('--device', default='cpu', help='cpu or cuda (on cuda the Inception row adds bf16 autocast)')
    args = p.parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 3)
    feature_batch = args.feature_batch or (32 if args.quick else 64)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, '
          f'load average {os.getloadavg()[0]:.1f}; float32; ratio = peer time / our time (> 1: ours faster)')
    print(f'{"figure":<38} {"ours":<22} {"wall / CPU":>13} {"peer":<22} {"wall / CPU":>13} {"unit":<10} '
          f'{"wall: median (min-max)":<24} {"CPU time: median (min-max)"}')

    # 1. Inception features.
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, inception.FID_WEIGHTS_NAME)
        calibrated_inception_weights(path)
        reference = pytorch_fid_network(path)
        if reference is None:
            print('pytorch-fid is not importable: Inception row skipped (see this file\'s docstring)')
        else:
            fast = inception.load_inception(path, device, download=False, fast=True)
            exact = inception.load_inception(path, device, download=False)
            x = (torch.rand(feature_batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
            x = x.to(device)
            with torch.inference_mode():
                ref_features = reference(x)
                gap_fast = (fast(x) - ref_features).abs().max().item()
                gap_exact = (exact(x) - ref_features).abs().max().item()
            contenders = {'ours (fast, default)': lambda: features(fast, x), 'ours (exact)': lambda: features(exact, x),
                          'pytorch-fid 0.3.0': lambda: features(reference, x)}
            if device.startswith('cuda'):     # bf16 autocast: not measured yet (no GPU so far); its error is printed
                contenders['ours (fast, bf16)'] = lambda: features(fast, x, torch.bfloat16)
            wall, cpu = race(contenders, rounds, device=device)
            scale = ref_features.abs().max().item()
            print_row(f'Inception features, batch {feature_batch}', feature_batch, 'images/s', wall, cpu,
                      'ours (fast, default)', 'pytorch-fid 0.3.0', f'max |diff| {gap_fast:.1e} of {scale:.1f}')
            print_row('', feature_batch, 'images/s', wall, cpu, 'ours (exact)', 'pytorch-fid 0.3.0',
                      f'max |diff| {gap_exact:.1e}')
            if 'ours (fast, bf16)' in contenders:
                gap_bf16 = (features(fast, x, torch.bfloat16).float() - ref_features).abs().max().item()
                print_row('', feature_batch, 'images/s', wall, cpu, 'ours (fast, bf16)', 'pytorch-fid 0.3.0',
                          f'max |diff| {gap_bf16:.1e}')

    # 2. and 3. The ddpm-cifar10 U-Net against diffusers' UNet2DModel.
    theirs = diffusers_unet()
    if theirs is None:
        print('diffusers is not importable: U-Net rows against diffusers skipped')
    else:
        torch.manual_seed(0)
        ours = unet.create_unet('ddpm-cifar10').to(device, memory_format=torch.channels_last)   # as build_network
        theirs = theirs.to(device)
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 1000, (8,), generator=g).float()
        x, t = x.to(device), t.to(device)
        fused = True if device == 'cpu' else None                       # runs.make_trainee's choice
        wall, cpu = race({'ours': train_step(ours, x, t), 'diffusers 0.42.1': train_step(theirs, x, t, True),
                          'ours, fused Adam': train_step(copy.deepcopy(ours), x, t, fused=fused)},
                         2 * rounds + 1, device=device)
        print_row('ddpm-cifar10 training step, batch 8', 8, 'images/s', wall, cpu, 'ours', 'diffusers 0.42.1',
                  'same Adam')
        print_row('', 8, 'images/s', wall, cpu, 'ours, fused Adam', 'diffusers 0.42.1', 'as runs.py trains')
        print_row('', 8, 'images/s', wall, cpu, 'ours, fused Adam', 'ours', 'fused vs for-loop Adam')
        # Amdahl's bound: diffusers' whole step against the replay of our convolutions (and GEMMs) alone.
        floor = gemm_floor(copy.deepcopy(ours), x, t)
        wall, cpu = race({'ours: convs alone': floor['convs'], 'ours: convs+GEMMs alone': floor['convs, linears, SDPA'],
                          'diffusers 0.42.1': train_step(copy.deepcopy(theirs), x, t, True)}, 2 * rounds + 1, device=device)
        print_row('bound: every other op of ours free', 8, 'images/s', wall, cpu, 'ours: convs alone', 'diffusers 0.42.1',
                  'if norms, SiLU, linears, attention, ... took 0 s')
        print_row('', 8, 'images/s', wall, cpu, 'ours: convs+GEMMs alone', 'diffusers 0.42.1',
                  'if norms, SiLU, dropout, copies, Adam ... took 0 s')
        wall, cpu = race({'ours': forward(ours, x, t), 'diffusers 0.42.1': forward(theirs, x, t, True)},
                         2 * rounds + 1, device=device)
        print_row('ddpm-cifar10 sampling, 18 Heun steps', 8 / 35, 'images/s', wall, cpu, 'ours', 'diffusers 0.42.1')

    # 4. Our own before/after at train.py's default size.
    torch.manual_seed(0)
    micro = unet.create_unet('micro').to(device)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(64, 3, 32, 32, generator=g).to(device), (torch.rand(64, generator=g) * 999).to(device)
    nhwc = copy.deepcopy(micro).to(memory_format=torch.channels_last)
    wall, cpu = race({'ours, NHWC (now)': train_step(nhwc, x, t), 'ours, NCHW (before)': train_step(micro, x, t)},
                     2 * rounds + 1, device=device)
    print_row('micro training step, batch 64', 64, 'images/s', wall, cpu, 'ours, NHWC (now)', 'ours, NCHW (before)')
    wall, cpu = race({'ours, NHWC (now)': forward(nhwc, x, t), 'ours, NCHW (before)': forward(micro, x, t)},
                     2 * rounds + 1, device=device)
    print_row('micro sampling, 18 Heun steps', 64 / 35, 'images/s', wall, cpu, 'ours, NHWC (now)',
              'ours, NCHW (before)')


if __name__ == '__main__':
    main()
