"""
Video-only against joint video-image training (Ho et al. 2022, arXiv:2204.03458, Sec. 3) on the moving-shapes
videos, at equal steps AND at equal CPU seconds, over seeds; and the scores of any video checkpoints (--score).

Per seed, two train.py runs with the same seed, data, network, learning rate and a constant learning rate after
warm-up (--lr-decay constant, so that a run's step-N checkpoint is exactly what an N-step run would give):
  joint       --image-share S for N steps: each video gets round(S F / (1 - S)) independent frames appended, so a
              step costs more (about (F + k) / F times the frames);
  video-only  the same for M = round(N (F + k) / F) steps (or --video-steps M), its step-N checkpoint kept
              (--save-early N): the equal-step model at step N, the equal-CPU model at step M. The CPU seconds of
              every run are measured (the child's user + system time, os.wait4), those of the step-N checkpoint
              prorated by N / M.
Scores of each model (EMA weights, classes cycled, Heun sampling), against held-out 'test' clips never trained on:
  speed_w1, velocity_w1, straight, lost   motion.py: the tracked object's frame-to-frame velocities against the
              held-out clips' (Wasserstein-1, pixels per frame), the share of clips moving in a straight line at
              constant speed, the share where the object was lost in some frame;
  frame-FD_lenet, frame-KD_lenet   the frames of generated clips against held-out frames, in the features of a LeNet
              trained once on training frames (appearance only; a different scale from FID, never called FID);
  val_loss    train.py's held-out denoising loss on videos (fixed noise levels and noise).
Process CPU seconds make the comparison fair on a shared machine; wall time is not reported for that reason.

    python benchmarks/video.py --steps 160 --seeds 0 1 --channels 16 --batch-size 8 --warmup 16   # the experiment
    python benchmarks/video.py --steps 700 --video-steps 1200 --seeds 0 --jobs 1 --reuse ...   # then --seeds 0 1
    python benchmarks/video.py --score runs/a/ckpt.pt runs/b/ckpt.pt --sample-steps 12    # scores of checkpoints
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
import checkpoints  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import motion  # noqa: E402
import sample  # noqa: E402
import video  # noqa: E402


def train_command(out, share, steps, args, seed, save_early=0):
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--dataset', args.dataset, '--resolution',
           str(args.resolution), '--config', args.config, '--steps', str(steps), '--batch-size', str(args.batch_size),
           '--image-share', str(share), '--val-every', str(args.steps), '--sample-every', '0', '--sample-steps', '2',
           '--ckpt-every', str(steps), '--warmup', str(args.warmup), '--lr', str(args.lr), '--lr-decay', 'constant',
           '--seed', str(seed), '--out', out, '--overwrite', '--no-progress']
    if args.channels:
        cmd += ['--model-channels', str(args.channels)]
    if args.data_dir:
        cmd += ['--data-dir', args.data_dir]
    if args.device:
        cmd += ['--device', args.device]
    return cmd + (['--save-early', str(save_early)] if save_early else [])


def run_all(commands, jobs, threads, record=None):
    """Run {key: command} at most `jobs` at a time; {key: CPU seconds (user + system) of the child}. record: {key:
    folder}: each finished run's CPU seconds are also written to folder/cpu_seconds.json (read back by --reuse)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    pending, running, cpu = list(commands.items()), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            key, cmd = pending.pop(0)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            running[proc.pid] = (key, proc, time.time())
        pid, status, usage = os.wait4(-1, 0)              # any child; its own rusage (not its siblings')
        if pid not in running:
            continue
        key, proc, start = running.pop(pid)
        log = proc.stdout.read()
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f'run {key} failed:\n{log[-3000:]}')
        cpu[key] = usage.ru_utime + usage.ru_stime
        if record:
            with open(os.path.join(record[key], 'cpu_seconds.json'), 'w') as f:
                json.dump({'cpu_seconds': cpu[key], 'wall_seconds': time.time() - start}, f)   # wall: GPU runs
    return cpu


def recorded_cpu(folder):
    """The CPU seconds run_all recorded for a finished run, or None (no finished run there)."""
    path = os.path.join(folder, 'cpu_seconds.json')
    if not (os.path.exists(path) and os.path.exists(os.path.join(folder, 'ckpt.pt'))):
        return None
    return json.load(open(path))['cpu_seconds']


class Scorer:
    """Samples checkpoints and scores them against held-out clips: motion.py and frame-FD/KD in a data LeNet."""

    def __init__(self, dataset, resolution, frames, data_dir=None, reference=400, lenet_steps=300, device='cpu'):
        self.device = device                                      # where checkpoints are sampled
        kw = dict(data_dir=data_dir, resolution=resolution, frames=frames, seed=0)
        train = data.load_dataset(dataset, num_videos=1000, **kw)
        self.reference = data.load_dataset(dataset, split='test', num_videos=reference, **kw).images   # uint8
        frames_train = train.images.transpose(1, 2).flatten(0, 1)                                        # (N F, C, H, W)
        labels = (train.labels.repeat_interleave(frames) if train.labels is not None
                  else torch.zeros(len(frames_train), dtype=torch.long))
        torch.manual_seed(0)                                 # the LeNet's dropout draws from the global generator
        lenet = evaluate.train_classifier(frames_train.float() / 255, labels, max(train.num_classes or 1, 2),
                                          steps=lenet_steps, seed=0)
        self.frame_net = evaluate.FrameFeatures(lenet)
        self.reference_features = evaluate.extract_features(self.reference, self.frame_net, progress=False)
        half = len(self.reference) // 2
        self.floor = self.scores(self.reference[half:], self.reference[:half])      # two held-out halves

    def scores(self, clips, reference=None):
        """clips: uint8 (N, C, F, H, W) -> dict of the motion and frame scores against the held-out clips."""
        reference = self.reference if reference is None else reference
        feats = evaluate.extract_features(clips, self.frame_net, progress=False)
        ref = (self.reference_features if reference is self.reference
               else evaluate.extract_features(reference, self.frame_net, progress=False))
        mu_a, s_a = evaluate.feature_statistics(feats)
        mu_b, s_b = evaluate.feature_statistics(ref)
        kd = evaluate.kid(feats, ref, num_subsets=50, subset_size=min(1000, len(feats) // 2, len(ref) // 2))[0]
        return dict(motion.motion_distance(clips, reference), frame_fd=evaluate.frechet_distance(mu_a, s_a, mu_b, s_b),
                    frame_kd=kd)

    def sample(self, path, n, steps=18, seed=100):
        net, diffusion, config = checkpoints.load_model(path, self.device)
        num_classes = config['data']['num_classes']
        labels = torch.arange(n) % num_classes if num_classes else None
        t0 = time.process_time()
        videos = sample.generate(net, diffusion, n, checkpoints.sample_shape(config), self.device, labels, num_classes,
                                 'heun', steps, 1.0, seed=seed, batch_size=32)
        return videos, time.process_time() - t0


HEADER = (f'{"model":>40} {"speed_w1":>8} {"vel_w1":>7} {"straight":>8} {"lost":>5} {"frame-FD":>9} {"frame-KD":>9}'
          f' {"val_loss":>8} {"train CPU s":>11}')


def row(name, s, val=float('nan'), cpu=float('nan')):
    return (f'{name:>40} {s["speed_w1"]:8.3f} {s["velocity_w1"]:7.3f} {s["straight_share"]:8.2f} {s["lost_share"]:5.2f}'
            f' {s["frame_fd"]:9.2f} {s["frame_kd"]:9.4f} {val:8.4f} {cpu:11.0f}')


def last_val_loss(path, step):
    vals = [r['val_loss'] for r in map(json.loads, open(os.path.join(path, 'log.jsonl')))
            if 'val_loss' in r and r['step'] <= step]
    return vals[-1] if vals else float('nan')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    p.add_argument('--score', nargs='+', default=None, metavar='CKPT', help='only score these video checkpoints')
    p.add_argument('--dataset', default='video-shapes', help='video-shapes | moving-mnist')
    p.add_argument('--data-dir', default=None, help='moving-mnist: the folder of the MNIST files')
    p.add_argument('--steps', type=int, default=200, help='N: the joint runs\' steps (the equal-step point)')
    p.add_argument('--config', default='tiny-video')
    p.add_argument('--channels', type=int, default=None, help='override the U-Net width (--model-channels)')
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--resolution', type=int, default=16)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--warmup', type=int, default=20)
    p.add_argument('--share', type=float, default=0.5, help='--image-share of the joint runs')
    p.add_argument('--video-steps', type=int, default=None, help='M: the video-only runs\' steps (the equal-CPU '
                   'point); default N (F + k) / F, the frame ratio (a joint step measured 1.7x, not 2x, a video-only '
                   'one at F = 8, k = 8)')
    p.add_argument('--reuse', action='store_true', help='do not retrain a run whose folder holds ckpt.pt and the '
                   'cpu_seconds.json of a finished run (score several seeds trained by separate invocations)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--samples', type=int, default=64, help='generated clips per model')
    p.add_argument('--sample-steps', type=int, default=18, help='noise levels of the Heun schedule')
    p.add_argument('--jobs', type=int, default=2, help='training runs at a time')
    p.add_argument('--threads', type=int, default=1, help='threads per training run')
    p.add_argument('--device', default=None, help='training and sampling device; default: cuda if available, else '
                   'cpu (on a GPU read the wall seconds in each run\'s cpu_seconds.json, not the CPU seconds)')
    p.add_argument('--out', default='runs/video_joint')
    p.add_argument('--gif', default=None, help='write 8 samples of every model (4x, nearest) to '
                   'GIF_<joint|video>_<steps>_seed<seed>.gif; with --score, to GIF_<its run folder>.gif')
    p.add_argument('--docs', default=None, help='write an extension example of the first joint model here '
                   '(video_extension.png / .gif: 4 given frames of held-out clips, then 8 generated, Sec. 3.1)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    frames = 8
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    scorer = Scorer(args.dataset, args.resolution, frames, args.data_dir, device=device)
    print(HEADER)
    print(row('held-out half vs the other half', scorer.floor))

    if args.score:
        for path in args.score:
            videos, seconds = scorer.sample(path, args.samples, args.sample_steps)
            print(row(os.path.relpath(path), scorer.scores(data.to_uint8(videos)), last_val_loss(
                os.path.dirname(path), 10 ** 9)) + f'  ({seconds:.0f} CPU s to sample)')
            if args.gif:                                 # one GIF per checkpoint: GIF_<run folder>.gif
                write_gif(videos[:8], args.gif.replace('.gif', f'_{os.path.basename(os.path.dirname(path))}.gif'))
        return

    k = video.joint_image_count(args.share, frames)
    m = args.video_steps or round(args.steps * (frames + k) / frames)
    if m < args.steps:
        raise SystemExit(f'--video-steps {m} is below --steps {args.steps}: the equal-step checkpoint would not exist')
    runs, folders, cpu = {}, {}, {}
    for seed in args.seeds:
        for kind, share, steps, early in (('joint', args.share, args.steps, 0), ('video', 0.0, m, args.steps)):
            folders[(kind, seed)] = folder = os.path.join(args.out, f'{kind}_seed{seed}')
            if args.reuse and recorded_cpu(folder) is not None:
                cpu[(kind, seed)] = recorded_cpu(folder)
                print(f'reusing {folder} ({cpu[(kind, seed)]:.0f} CPU s)')
                continue
            runs[(kind, seed)] = train_command(folder, share, steps, args, seed, save_early=early)
    cpu.update(run_all(runs, args.jobs, args.threads, record=folders))
    rows = []
    for seed in args.seeds:
        joint, only = os.path.join(args.out, f'joint_seed{seed}'), os.path.join(args.out, f'video_seed{seed}')
        models = [(f'joint {args.share:g}, {args.steps} steps', os.path.join(joint, 'ckpt.pt'), joint, args.steps,
                   cpu[('joint', seed)]),
                  (f'video-only, {args.steps} steps', os.path.join(only, f'ckpt_{args.steps:07d}.pt'), only, args.steps,
                   cpu[('video', seed)] * args.steps / m),
                  (f'video-only, {m} steps', os.path.join(only, 'ckpt.pt'), only, m, cpu[('video', seed)])]
        for name, path, folder, step, seconds in models:
            videos, _ = scorer.sample(path, args.samples, args.sample_steps, seed=100 + seed)
            rows.append((f'{name}, seed {seed}', scorer.scores(data.to_uint8(videos)), last_val_loss(folder, step),
                         seconds))
            if args.gif:                                 # every model: GIF_<joint|video>_<steps>_seed<seed>.gif
                write_gif(videos[:8], args.gif.replace('.gif', f'_{name.split()[0].rstrip(",")}_{step}_seed{seed}.gif'))
            if args.docs and seed == args.seeds[0] and name.startswith('joint'):
                extension_example(path, args)
    for name, s, val, seconds in sorted(rows, key=lambda r: r[0]):
        print(row(name, s, val, seconds))
    floats = lambda d: {key: float(v) for key, v in d.items()}                      # noqa: E731
    with open(os.path.join(args.out, 'scores.json'), 'w') as f:
        json.dump([dict(floats(s), model=name, val_loss=val, cpu_seconds=seconds) for name, s, val, seconds in rows]
                  + [dict(floats(scorer.floor), model='held-out half vs the other half')], f, indent=1)
    print(f'settings: {args.dataset} {args.resolution}px {frames} frames, {args.config}'
          f'{f" width {args.channels}" if args.channels else ""}, batch {args.batch_size}, lr {args.lr:g} constant '
          f'after {args.warmup} warm-up steps; joint: {k} images per video; {args.samples} samples per model (Heun, '
          f'{args.sample_steps} levels) against {len(scorer.reference)} held-out clips; train CPU s: process user + '
          f'system seconds (video-only at {args.steps} steps: prorated)')


def extension_example(path, args):
    """Extension by reconstruction guidance (Sec. 3.1): the first 4 frames of 4 held-out clips given, 8 generated
    (two sliding windows of 8 frames with 4 frames of context)."""
    net, diffusion, config = checkpoints.load_model(path)
    test = data.load_dataset(args.dataset, data_dir=args.data_dir, split='test', resolution=args.resolution,
                             num_videos=4, seed=0)
    clip, y = test.batch(torch.arange(4))
    sigmas = sample.samplers.karras_sigmas(24, diffusion.sigma_min, diffusion.sigma_max)
    ext = video.extend_video(diffusion.denoiser(net), clip[:, :, :4], config['data']['frames'], 8, sigmas, context=4,
                             method_options={'w_r': 2.0}, generator=torch.Generator().manual_seed(0),
                             cond={'y': y} if y is not None else None).clamp(-1, 1)
    os.makedirs(args.docs, exist_ok=True)
    sample.save_grid(torch.cat([clip, ext[:, :, :8]]), os.path.join(args.docs, 'video_extension.png'))
    sample.save_gif(ext, os.path.join(args.docs, 'video_extension.gif'))
    print(f'wrote {args.docs}/video_extension.png (rows 1-4: the held-out clips; rows 5-8: their first 4 frames then '
          f'4 generated) and video_extension.gif (4 given + 8 generated)')


def write_gif(videos, path):
    """8 clips side by side, 4x nearest-neighbour upscaled."""
    n, c, f, h, w = videos.shape
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    big = torch.nn.functional.interpolate(videos.transpose(1, 2).flatten(0, 1), scale_factor=4, mode='nearest')
    sample.save_gif(big.reshape(n, f, c, 4 * h, 4 * w).transpose(1, 2), path)
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
