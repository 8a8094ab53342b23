"""
Video-only against joint video-image training (Ho et al. 2022, arXiv:2204.03458, Sec. 3) at equal steps, on the
moving-shapes videos, plus a sample GIF and an extension example (Sec. 3.1) from the joint model.

Both runs are train.py with the same seed, data, network and steps; the joint run adds --image-share independent
frames to every video (the videos themselves are the same batches: the image sources are drawn after them). Scores:
  val_loss        train.py's held-out denoising loss on videos (fixed noise levels and noise): lower is better;
  frame-KD_lenet  KID of the frames of generated videos against training frames, in the features of a LeNet trained
                  once on the training frames (shared by both runs, so the two scores are comparable);
  motion error    moving shapes move at constant velocity: the mean over generated clips of the spread of the
                  per-frame displacement of the intensity centroid (pixels; 0 for perfectly steady motion).
The runs are on CPU and small, so differences below the run-to-run noise mean nothing: rerun with --seeds 0 1 2.

    python benchmarks/video.py --steps 300 --out runs/video_bench --docs docs
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import evaluate  # noqa: E402
import checkpoints  # noqa: E402
import video  # noqa: E402
import sample  # noqa: E402


def train_run(out, share, args, seed):
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--dataset', 'video-shapes', '--resolution', str(args.resolution),
           '--config', 'tiny-video', '--model-channels', str(args.channels), '--steps', str(args.steps),
           '--batch-size', str(args.batch_size), '--image-share', str(share), '--val-every', str(max(1, args.steps // 4)),
           '--sample-every', '0', '--ckpt-every', str(args.steps), '--warmup', str(max(1, args.steps // 10)),
           '--lr', str(args.lr), '--seed', str(seed), '--out', out, '--overwrite', '--no-progress', '--sample-steps', '8']
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def centroid_motion_error(videos):
    """Spread (std over frames) of the frame-to-frame displacement of the intensity centroid, mean over clips.

    The moving-shapes centre moves by a constant vector every frame; the background is flat, so the centroid of
    |frame - its median| follows the shape."""
    v = (videos.float() + 1) / 2                                            # (N, C, F, H, W) in [0, 1]
    mass = (v - v.flatten(3).median(-1).values[..., None, None]).abs().sum(1)   # (N, F, H, W)
    H, W = mass.shape[-2:]
    ys, xs = torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32)
    total = mass.sum((-1, -2)).clamp(min=1e-6)
    cy = (mass.sum(-1) * ys).sum(-1) / total
    cx = (mass.sum(-2) * xs).sum(-1) / total
    step = torch.stack([cy.diff(dim=1), cx.diff(dim=1)], -1)                # (N, F-1, 2)
    return float(step.std(dim=1).norm(dim=-1).mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--resolution', type=int, default=16)
    p.add_argument('--channels', type=int, default=16, help='U-Net width (tiny-video has 32)')
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--share', type=float, default=0.5, help='--image-share of the joint run')
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--samples', type=int, default=32, help='generated videos per run for the scores')
    p.add_argument('--threads', type=int, default=1, help='threads per training run (the runs go in parallel)')
    p.add_argument('--out', default='runs/video_bench')
    p.add_argument('--docs', default=None, help='write the GIF / extension pictures of the joint model here')
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    # Train: both settings (and seeds) in parallel.
    t0 = time.time()
    runs = {(seed, share): os.path.join(args.out, f'share{share:g}_seed{seed}') for seed in args.seeds for share in (0.0, args.share)}
    procs = {key: train_run(path, key[1], args, key[0]) for key, path in runs.items()}
    for key, proc in procs.items():
        log = proc.communicate()[0]
        if proc.returncode:
            raise SystemExit(f'run {key} failed:\n{log[-3000:]}')
    print(f'trained {len(runs)} runs of {args.steps} steps in {time.time() - t0:.0f} s')

    # Reference: training frames and a LeNet trained on them once (the feature space both runs are scored in).
    ds = data.load_dataset('video-shapes', resolution=args.resolution, num_videos=1000, seed=0)
    frames = ds.images.transpose(1, 2).flatten(0, 1)                       # (N*F, C, H, W) uint8
    labels = ds.labels.repeat_interleave(ds.frames)
    lenet = evaluate.train_classifier(frames.float() / 255, labels, ds.num_classes, steps=300, seed=0)
    net_frames = evaluate.FrameFeatures(lenet)
    ref = evaluate.extract_features(ds.images, net_frames, progress=False)
    print(f'reference: {len(ds)} training videos, motion error {centroid_motion_error(data.to_float(ds.images)):.3f} px')

    rows = []
    for (seed, share), path in runs.items():
        net, diffusion, config = checkpoints.load_model(os.path.join(path, 'ckpt.pt'))
        labels = torch.arange(args.samples) % config['data']['num_classes']
        videos = sample.generate(net, diffusion, args.samples, checkpoints.sample_shape(config), 'cpu', labels,
                                 config['data']['num_classes'], 'heun', 12, 1.0, seed=seed + 100)
        feats = evaluate.extract_features(data.to_uint8(videos), net_frames, progress=False)
        kd = evaluate.kid(feats, ref, num_subsets=50, subset_size=min(1000, len(feats) // 2))[0]
        val = [r['val_loss'] for r in map(json.loads, open(os.path.join(path, 'log.jsonl'))) if 'val_loss' in r]
        rows.append((share, seed, val[-1], kd, centroid_motion_error(videos)))
        if args.docs and share > 0 and seed == args.seeds[0]:
            os.makedirs(args.docs, exist_ok=True)
            sample.save_gif(videos[:8], os.path.join(args.docs, 'video_samples.gif'))
            # Extension: the first 4 frames of held-out clips given, 8 generated (two sliding windows of 8).
            test = data.load_dataset('video-shapes', split='test', resolution=args.resolution, num_videos=4, seed=0)
            clip, y = test.batch(torch.arange(4))
            sigmas = sample.samplers.karras_sigmas(24, diffusion.sigma_min, diffusion.sigma_max)
            ext = video.extend_video(diffusion.denoiser(net), clip[:, :, :4], config['data']['frames'], 8, sigmas,
                                      context=4, method_options={'w_r': 2.0},
                                      generator=torch.Generator().manual_seed(0), cond={'y': y}).clamp(-1, 1)
            sample.save_grid(torch.cat([clip, ext[:, :, :8]]), os.path.join(args.docs, 'video_extension.png'))
            sample.save_gif(ext, os.path.join(args.docs, 'video_extension.gif'))
            print(f'wrote {args.docs}/video_samples.gif, video_extension.png (rows 1-4: the held-out clips; rows 5-8: '
                  'their first 4 frames then 4 generated) and video_extension.gif (4 given + 8 generated)')
    print(f'\n{"image share":>11} {"seed":>4} {"val_loss":>9} {"frame-KD_lenet":>15} {"motion err (px)":>16}')
    for share, seed, val, kd, motion in sorted(rows):
        print(f'{share:>11g} {seed:>4d} {val:>9.4f} {kd:>15.4f} {motion:>16.3f}')
    print(f'settings: {args.steps} steps, batch {args.batch_size}, {args.resolution}px, 8 frames, tiny-video width '
          f'{args.channels}, {args.samples} samples (heun, 12 steps); total {time.time() - t0:.0f} s')


if __name__ == '__main__':
    main()
