"""Speed of inception.py and metrics.py (FID = the two): Inception feature extraction (images/s) and the FID/KID arithmetic.

Feature extraction is timed for inception.py's network (legacy = default, and clean resize) and, when the package is
importable, for pytorch-fid's InceptionV3 on the same machine, batch size, thread count and images
(32x32 inputs, the CIFAR-10 case, upsampled to 299x299 inside each network). Weights are random:
speed does not depend on their values, and the benchmark then runs without the 91 MB file.
Networks take turns batch by batch, so that a change in machine load hits all of them alike.

The arithmetic part times, for 2048-d features: covariance of 10k features, the Frechet distance
with the symmetric-eigensolver method (default) and with scipy's sqrtm (pytorch-fid's), and KID
with 100 subsets of 1000.

    python benchmarks/evaluate.py                    # ours only (this environment has no torchvision)
    /tmp/fidenv/bin/python benchmarks/evaluate.py    # with pytorch-fid (see benchmarks/inception_parity.py)
    python benchmarks/evaluate.py --device cuda --batch-size 50 --num-images 500
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metrics  # noqa: E402
import inception  # noqa: E402


def images_per_second(networks, images, batch_size, device, rounds):
    """Throughput of each network, timed batch by batch in turn, so that changes in machine load
    (other processes) hit every network alike; one warm-up batch each (allocator, oneDNN caches)."""
    seconds = {name: 0.0 for name in networks}
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    with torch.inference_mode():
        for fn in networks.values():
            fn(images[:batch_size].to(device))
        for r in range(rounds):
            for i in range(0, len(images), batch_size):
                batch = images[i:i + batch_size].to(device)
                names = list(networks)[r % len(networks):] + list(networks)[:r % len(networks)]  # rotate order
                for name in names:
                    sync()
                    start = time.perf_counter()
                    networks[name](batch)
                    sync()
                    seconds[name] += time.perf_counter() - start
    return {name: rounds * len(images) / t for name, t in seconds.items()}


def pytorch_fid_network(device):
    """pytorch-fid's FID InceptionV3 with random weights, or None when the package is missing."""
    try:
        import pytorch_fid.inception as pf
    except ImportError:
        return None
    state = inception.FIDInceptionV3().state_dict()  # the same key layout as the real file
    pf.load_state_dict_from_url = lambda *a, **k: state  # skip the download, keep the architecture
    net = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
    net = net.eval().to(device)
    return lambda x: net(x)[0]


def time_call(fn, repeats=3):
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    p.add_argument('--batch-size', type=int, default=8, help='images per forward pass')
    p.add_argument('--num-images', type=int, default=32, help='images timed per network and round')
    p.add_argument('--rounds', type=int, default=2, help='passes over the images; the total time is reported')
    p.add_argument('--image-size', type=int, default=32, help='input resolution before the resize to 299')
    p.add_argument('--skip-arithmetic', action='store_true', help='only time feature extraction')
    args = p.parse_args()

    print(f'torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, '
          f'batch {args.batch_size}, {args.num_images} images of {args.image_size}x{args.image_size}')
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.num_images, 3, args.image_size, args.image_size, generator=g)
    networks = {}
    for resize, channels_last in (('legacy', False), ('clean', False), ('legacy', True)):
        net = inception.FIDInceptionV3(resize=resize, channels_last=channels_last).eval().requires_grad_(False)
        net = net.to(args.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        networks[f'inception.py ({resize}{", channels-last" if channels_last else ""})'] = net
    reference = pytorch_fid_network(args.device)
    if reference is not None:
        networks['pytorch-fid'] = reference
    rates = images_per_second(networks, images, args.batch_size, args.device, args.rounds)
    print(f'\n| feature extractor | images/s ({args.device}) |\n|---|---|')
    for name, rate in rates.items():
        print(f'| {name} | {rate:.2f} |')
    if reference is None:
        print('(pytorch-fid not importable here: run this script in its environment to compare)')

    if args.skip_arithmetic:
        return
    rng = np.random.RandomState(0)
    feats_a = np.abs(rng.randn(10000, 2048)).astype(np.float32)  # pool features are non-negative
    feats_b = feats_a * 1.1 + 0.05 * rng.rand(2048).astype(np.float32)
    stats = {}
    t_cov = time_call(lambda: stats.update(a=metrics.feature_statistics(feats_a)), 1)
    stats['b'] = metrics.feature_statistics(feats_b)
    rows = [('mean + covariance of 10k x 2048 features', t_cov)]
    values = {}
    for method in ('eigh', 'sqrtm'):
        fd = lambda: values.update({method: metrics.frechet_distance(*stats['a'], *stats['b'], method=method)})  # noqa: E731
        t = time_call(fd, 1)
        rows.append((f'frechet_distance, 2048-d, method={method}', t))
    rows.append(('kid, 100 subsets of 1000, 2048-d', time_call(lambda: metrics.kid(feats_a, feats_b), 1)))
    print('\n| FID / KID arithmetic | seconds |\n|---|---|')
    for name, t in rows:
        print(f'| {name} | {t:.2f} |')
    print(f"FD eigh = {values['eigh']:.6f}, FD sqrtm = {values['sqrtm']:.6f}, "
          f"relative difference {abs(values['eigh'] - values['sqrtm']) / values['sqrtm']:.1e}")


if __name__ == '__main__':
    main()
