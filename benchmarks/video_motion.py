"""
Do a video model's samples move like the data? motion.py's weight-free measure for train.py video checkpoints.

For each checkpoint: sample clips (classes cycled, no guidance), track the object in every frame and compare the
frame-to-frame velocities with held-out clips of the same dataset (the 'test' split, never trained on):
  speed_w1, velocity_w1   Wasserstein-1 distances of speeds / 2-D velocities (pixels per frame; 0 = the data's law)
  straight                share of clips moving in a straight line at constant speed (motion.py's tolerance)
  lost                    share of clips with a frame where no object was found
The first rows give the scale: two held-out halves of the data (what a perfect model scores, up to sampling noise),
and the same clips frozen (frame 0 repeated) or with shuffled frames (what a model without motion scores).

    python benchmarks/video_motion.py runs/vA/ckpt.pt [runs/vB/ckpt.pt ...] --samples 64 --gif docs/issue30_samples.gif
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoints  # noqa: E402
import data  # noqa: E402
import motion  # noqa: E402
import sample  # noqa: E402


def row(name, report):
    return (f'{name:>34} {report["speed_w1"]:9.3f} {report["velocity_w1"]:12.3f} {report["straight_share"]:9.2f} '
            f'{report["lost_share"]:6.2f} {report["mean_speed"]:11.3f}')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    p.add_argument('ckpts', nargs='+', help='train.py checkpoints of a video dataset (video-shapes, moving-mnist)')
    p.add_argument('--samples', type=int, default=64, help='generated clips per checkpoint')
    p.add_argument('--reference', type=int, default=400, help='held-out clips')
    p.add_argument('--sampler', default='heun')
    p.add_argument('--steps', type=int, default=18, help='noise levels of the sampling schedule')
    p.add_argument('--seed', type=int, default=100)
    p.add_argument('--data-dir', default=None, help='for moving-mnist: the folder of the MNIST files')
    p.add_argument('--gif', default=None, help='write the first 8 samples of the first checkpoint here (4x, nearest)')
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    reference = None
    print(f'{"clips":>34} {"speed_w1":>9} {"velocity_w1":>12} {"straight":>9} {"lost":>6} {"mean speed":>11}'
          '  (px/frame)')
    for i, path in enumerate(args.ckpts):
        net, diffusion, config = checkpoints.load_model(path)
        shape = checkpoints.sample_shape(config)                              # (C, F, H, W)
        if reference is None:
            cfg = config['data']
            ref = data.load_dataset(cfg['dataset'], data_dir=args.data_dir, split='test', resolution=shape[-1],
                                    frames=shape[1], num_videos=args.reference, seed=0)
            reference = ref.images
            half = len(reference) // 2
            print(row('held-out half vs the other half', motion.motion_distance(reference[half:], reference[:half])))
            print(row('  the same, frozen', motion.motion_distance(motion.frozen_clips(reference[half:]),
                                                                  reference[:half])))
            print(row('  the same, frames shuffled', motion.motion_distance(motion.shuffled_clips(reference[half:]),
                                                                           reference[:half])))
        num_classes = config['data']['num_classes']
        labels = torch.arange(args.samples) % num_classes if num_classes else None
        t0 = time.process_time()
        videos = sample.generate(net, diffusion, args.samples, shape, 'cpu', labels, num_classes, args.sampler,
                                 args.steps, 1.0, seed=args.seed, batch_size=32)
        seconds = time.process_time() - t0
        print(row(os.path.relpath(path), motion.motion_distance(data.to_uint8(videos), reference))
              + f'  ({seconds:.0f} CPU s to sample)')
        if args.gif and i == 0:
            big = F.interpolate(videos[:8].transpose(1, 2).flatten(0, 1), scale_factor=4, mode='nearest')
            big = big.reshape(8, shape[1], shape[0], 4 * shape[2], 4 * shape[3]).transpose(1, 2)
            sample.save_gif(big, args.gif)
            print(f'wrote {args.gif}')
    print(f'straight: residual <= {motion.STRAIGHT_TOLERANCE:.0%} of the frame side and a net displacement above it; '
          f'{args.samples} samples ({args.sampler}, {args.steps} levels), {len(reference)} held-out clips')


if __name__ == '__main__':
    main()
