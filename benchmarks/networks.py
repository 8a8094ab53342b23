"""
Throughput and peak memory of the networks in unet.py and dit.py, and a side-by-side race against diffusers.

For each configuration it prints the parameter count, forward throughput (eval mode, no grad), training-step
throughput (forward, MSE loss, backward, AdamW step; train mode, so dropout is on) in images per second, and
peak memory. Each configuration runs in a fresh subprocess so that its peak memory is its own: on CUDA the
allocator's peak (torch.cuda.max_memory_allocated), on CPU the process's peak resident set size (weights,
optimizer state, activations and the Python/PyTorch runtime, ~0.3 GB of which is there before any model).

The comparison builds diffusers' UNet2DModel with the architecture of google/ddpm-cifar10-32 (Ho et al. 2020,
35.7M parameters) from its config, with random weights (nothing is downloaded), next to our 'ddpm-cifar10'
U-Net, which has the same layers and the same parameter count. The two alternate step by step in one process
(ABAB..., the order flipping every round) so that load from other programs hits both alike; it reports medians.
diffusers is not a dependency of this project: install it anywhere importable to enable the race, e.g.
    pip install --target /tmp/diffusers_pkgs --no-deps diffusers huggingface_hub safetensors ...
    PYTHONPATH=/tmp/diffusers_pkgs python benchmarks/networks.py

On a CPU shared with other jobs, use --threads 1: with two OpenMP threads on two busy cores every small op
waits for a descheduled thread (the tiny U-Net's forward took 2.9 s at 2 threads and 0.2 s at 1 thread).

Usage:
    python benchmarks/networks.py                                   # CPU, fp32, default configs
    python benchmarks/networks.py --device cuda --amp bf16 --batch-size 64
    python benchmarks/networks.py --configs tiny ddpm-cifar10 --steps 5 --compare-rounds 7
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dit import DIT_CONFIGS, create_dit          # noqa: E402
from unet import UNET_CONFIGS, create_unet      # noqa: E402


# ----------------------------------------------------------------------------
# Models and their inputs

def diffusers_ddpm_cifar10():
    """diffusers' UNet2DModel with google/ddpm-cifar10-32's config.json (random weights, no download)."""
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
                       up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
                       attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, act_fn='silu',
                       time_embedding_type='positional', flip_sin_to_cos=False, freq_shift=1,
                       downsample_padding=0, center_input_sample=False, mid_block_scale_factor=1, dropout=0.1)


class DiffusersAdapter(torch.nn.Module):
    """Give UNet2DModel our call signature net(x, noise_level) -> tensor (it returns an output object)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, noise_level, **cond):
        return self.net(x, noise_level).sample


def build(name, batch_size, device):
    """Return (network, inputs dict) for a U-Net or DiT config name, or 'diffusers-ddpm-cifar10'."""
    generator = torch.Generator().manual_seed(0)
    if name == 'diffusers-ddpm-cifar10':
        net, shape, cond = DiffusersAdapter(diffusers_ddpm_cifar10()), (3, 32, 32), {}
    elif name in UNET_CONFIGS:
        net = create_unet(name)
        size = net.config['image_size']
        shape = (3, 4, size, size) if net.config['temporal_attention'] else (3, size, size)   # 4-frame clips
        cond = {}
    else:
        # The paper's setting: 256x256 images as 32x32x4 latents, 1000 classes, learned sigma.
        net = create_dit(name, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
        shape, cond = (4, 32, 32), dict(y=torch.randint(0, 1000, (batch_size,), generator=generator))
    inputs = dict(x=torch.randn((batch_size,) + shape, generator=generator),
                  noise_level=torch.randint(0, 1000, (batch_size,), generator=generator).float(), **cond)
    return net.to(device), {k: v.to(device) for k, v in inputs.items()}


# ----------------------------------------------------------------------------
# Timing

def synchronize(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def autocast(device, amp):
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(amp)
    return torch.autocast(device.split(':')[0], dtype=dtype, enabled=dtype is not None)


def make_train_step(net, inputs, device, amp):
    """One optimisation step: loss = ||F - target||^2 with a random target of the output's shape."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.split(':')[0], enabled=amp == 'fp16')    # fp16 needs loss scaling
    target = None

    def step():
        nonlocal target
        with autocast(device, amp):
            out = net(**inputs)
        if target is None:
            target = torch.randn_like(out, dtype=torch.float32)
        loss = F.mse_loss(out.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def make_forward(net, inputs, device, amp):
    def forward():
        with torch.no_grad(), autocast(device, amp):
            net(**inputs)
    return forward


def time_calls(fn, steps, device):
    """Seconds per call of fn, one number per call."""
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def measure(name, args):
    """Throughput and peak memory of one config (run inside its own worker process)."""
    torch.manual_seed(0)
    net, inputs = build(name, args.batch_size, args.device)
    n_params = sum(p.numel() for p in net.parameters())
    if args.device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    forward = make_forward(net.eval(), inputs, args.device, args.amp)
    time_calls(forward, args.warmup, args.device)
    fwd = time_calls(forward, args.steps, args.device)
    train_step = make_train_step(net.train(), inputs, args.device, args.amp)
    time_calls(train_step, args.warmup, args.device)
    train = time_calls(train_step, args.steps, args.device)
    if args.device.startswith('cuda'):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux reports KiB
    return dict(name=name, params=n_params, fwd=args.batch_size / statistics.median(fwd),
                train=args.batch_size / statistics.median(train), peak=peak)


def race(args):
    """Our ddpm-cifar10 U-Net vs diffusers' UNet2DModel, interleaved in one process; medians of per-round rates."""
    torch.manual_seed(0)
    contenders = {}
    for name in ('ddpm-cifar10', 'diffusers-ddpm-cifar10'):
        net, inputs = build(name, args.batch_size, args.device)
        contenders[name] = dict(net=net, params=sum(p.numel() for p in net.parameters()),
                                train=make_train_step(net, inputs, args.device, args.amp),
                                fwd=make_forward(net, inputs, args.device, args.amp), rates=dict(fwd=[], train=[]))
    for c in contenders.values():                                          # warm-up (allocator, oneDNN caches)
        c['net'].train()
        time_calls(c['train'], args.warmup, args.device)
    order = list(contenders)
    for round_ in range(args.compare_rounds):
        for name in (order if round_ % 2 == 0 else order[::-1]):
            c = contenders[name]
            for kind in ('train', 'fwd'):
                c['net'].train(kind == 'train')                           # dropout on for training only
                seconds = statistics.median(time_calls(c[kind], args.steps, args.device))
                c['rates'][kind].append(args.batch_size / seconds)
    return contenders


# ----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu or cuda (default: cuda when available)')
    parser.add_argument('--amp', choices=['none', 'bf16', 'fp16'], default=None,
                        help='autocast dtype (default: bf16 on CUDA, none = fp32 on CPU)')
    parser.add_argument('--batch-size', type=int, default=8, help='images per step')
    parser.add_argument('--steps', type=int, default=5, help='timed calls per measurement (median is reported)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed calls before timing')
    parser.add_argument('--configs', nargs='*', default=['tiny', 'ddpm-cifar10', 'DiT-S/2', 'DiT-B/2'],
                        help=f'any of {list(UNET_CONFIGS)} or {list(DIT_CONFIGS)}; none = race only')
    parser.add_argument('--compare-rounds', type=int, default=5,
                        help='interleaved rounds of the diffusers race (0 = skip the race)')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)   # internal: measure one config
    args = parser.parse_args(argv)
    if args.amp is None:
        args.amp = 'bf16' if args.device.startswith('cuda') else 'none'
    return args


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:                                  # child process: measure one config, print one JSON line
        print(json.dumps(measure(args.worker, args)))
        return

    print(f'device={args.device} amp={args.amp} batch={args.batch_size} steps={args.steps} '
          f'threads={args.threads or torch.get_num_threads()} torch={torch.__version__}')
    if args.device.startswith('cuda'):
        print('gpu:', torch.cuda.get_device_name())
    print(f'{"config":<24}{"params":>12}{"fwd img/s":>12}{"train img/s":>13}{"peak mem":>12}')
    for name in args.configs:
        command = [sys.executable, os.path.abspath(__file__), '--worker', name, '--device', args.device,
                   '--amp', args.amp, '--batch-size', str(args.batch_size), '--steps', str(args.steps),
                   '--warmup', str(args.warmup)] + (['--threads', str(args.threads)] if args.threads else [])
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f'{name:<24} failed: {result.stderr.strip().splitlines()[-1]}')
            continue
        r = json.loads(result.stdout.strip().splitlines()[-1])
        print(f'{name:<24}{r["params"] / 1e6:>11.2f}M{r["fwd"]:>12.2f}{r["train"]:>13.2f}{r["peak"] / 2**30:>10.2f}GB')

    if args.compare_rounds <= 0:
        return
    try:
        import diffusers
    except ImportError:
        print('\ndiffusers is not importable: skipping the race against UNet2DModel (see this file\'s docstring).')
        return
    print(f'\nRace, interleaved in one process: {args.compare_rounds} rounds x {args.steps} steps each '
          f'(diffusers {diffusers.__version__}); median over rounds of each round\'s median img/s')
    contenders = race(args)
    print(f'{"model":<24}{"params":>12}{"fwd img/s":>12}{"train img/s":>13}   per-round train img/s')
    for name, c in contenders.items():
        rates = c['rates']
        print(f'{name:<24}{c["params"] / 1e6:>11.2f}M{statistics.median(rates["fwd"]):>12.2f}'
              f'{statistics.median(rates["train"]):>13.2f}   {" ".join(f"{r:.2f}" for r in rates["train"])}')
    wins = sum(a > b for a, b in zip(*(c['rates']['train'] for c in contenders.values())))
    print(f'rounds in which our training step was faster: {wins} of {args.compare_rounds}')
    ours, theirs = (statistics.median(contenders[n]['rates']['train']) for n in contenders)
    print(f'train-step speed, ours / diffusers = {ours / theirs:.2f}x')


if __name__ == '__main__':
    main(parse_args())
