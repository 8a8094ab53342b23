"""
Reflow of a text-to-image model (reflow.py's algorithm on images): few-step sampling before and after.

Liu et al. 2022 (arXiv:2209.03003, Alg. 1): couple noise Z_0 to the teacher's ODE sample Z_1, then retrain on the
pairs (Z_0, Z_1). Here the teacher is a train_text.py checkpoint sampled with classifier-free guidance (w =
--guidance, --teacher-steps Euler steps), so the coupled pairs also carry the guidance; the student (initialised
from the teacher, as the paper does) is trained on (Z_0, Z_1, caption) with the rectified-flow loss and sampled
without guidance (w = 1), as InstaFlow does (Liu et al. 2023, arXiv:2309.06380, Sec. 3).

In diffusion.py's frame (x_t = (1 - t) x0 + t noise, the network predicting noise - x0 at c_noise = 1000 t) the
loss on a coupled pair is || F(x_t, 1000 t, caption) - (Z_0 - Z_1) ||^2 with x_t = (1 - t) Z_1 + t Z_0, t ~ U(0, 1).

Measured at 1, 2, 4 and 8 Euler steps, for held-out prompts: prompt fidelity (the attribute classifier of
benchmarks/text_fidelity.py, share with all four attributes right) and the mean |pixel| distance to the teacher's
own --teacher-steps sample from the same noise (how well few steps reproduce the full ODE).

Usage: OMP_NUM_THREADS=1 python benchmarks/text_reflow.py runs/fid_mmdit/ckpt.pt [--pairs 2000] [--steps 500]
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import captions  # noqa: E402
import data  # noqa: E402
import sample_text  # noqa: E402
import text_fidelity  # noqa: E402


def student_loss(student, z0, z1, ids, t):
    """Rectified-flow loss on coupled pairs in diffusion.py's frame (module docstring)."""
    x_t = (1 - t)[:, None, None, None] * z1 + t[:, None, None, None] * z0
    return (student(x_t, 1000 * t, ids) - (z0 - z1)).pow(2).flatten(1).mean(1)


def main():
    p = argparse.ArgumentParser(description='reflow of a train_text.py model')
    p.add_argument('ckpt')
    p.add_argument('--pairs', type=int, default=2000, help='coupled (noise, sample) pairs')
    p.add_argument('--steps', type=int, default=500, help='student training steps (batch 64)')
    p.add_argument('--teacher-steps', type=int, default=20)
    p.add_argument('--guidance', type=float, default=3.0)
    p.add_argument('--prompts', type=int, default=200)
    p.add_argument('--classifier-steps', type=int, default=800, help='training steps of the attribute classifier')
    args = p.parse_args()
    torch.manual_seed(0)
    teacher, diffusion, tokenizer, config = sample_text.load_text_model(args.ckpt)
    R, C = config['data']['resolution'], config['data']['channels']
    net = text_fidelity.train_classifier(R, args.classifier_steps)

    # Couplings: training captions, noise, and the guided teacher's sample from that noise (the Euler grid starts
    # at t_max = 0.999, whose x is noise * sigma_0 in the sigma frame, i.e. 0.999 noise + 0.001 x0 at t: close to Z_0).
    t0 = time.process_time()
    texts = captions.dataset_captions(data.ShapesDataset(args.pairs, R, seed=0, split='train'))
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(args.pairs, C, R, R, generator=g)
    ids = tokenizer.encode(texts)[0]
    z1 = []
    for s in range(0, args.pairs, 500):
        z1.append(sample_from(teacher, diffusion, ids[s:s + 500], z0[s:s + 500], args.teacher_steps, args.guidance))
    z1 = torch.cat(z1)
    cpu_pairs = time.process_time() - t0

    t0 = time.process_time()
    student = copy.deepcopy(teacher).train()
    opt = torch.optim.Adam([q for q in student.parameters() if q.requires_grad], lr=2e-4)
    for step in range(args.steps):
        i = torch.randint(args.pairs, (64,), generator=g)
        loss = student_loss(student, z0[i], z1[i], ids[i], torch.rand(64, generator=g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    cpu_student = time.process_time() - t0
    print(f'{args.pairs} couplings in {cpu_pairs:.0f} CPU s, student {args.steps} steps in {cpu_student:.0f} CPU s')

    prompts = captions.dataset_captions(data.ShapesDataset(args.prompts, R, seed=3, split='test'))
    pids = tokenizer.encode(prompts)[0]
    noise = torch.randn(args.prompts, C, R, R, generator=torch.Generator().manual_seed(5))
    reference = sample_from(teacher, diffusion, pids, noise, args.teacher_steps, args.guidance)
    print('| model | Euler steps | prompt fidelity (all four) | mean abs pixel distance to the teacher\'s '
          f'{args.teacher_steps}-step sample |')
    print('|---|---|---|---|')
    for name, model, w in (('teacher (1-RF, CFG w=%g)' % args.guidance, teacher, args.guidance), ('2-RF student (w=1)', student, 1.0)):
        for k in (1, 2, 4, 8):
            x = sample_from(model, diffusion, pids, noise, k, w)
            fidelity = text_fidelity.shares(net, x, prompts)['all']
            print(f'| {name} | {k} | {fidelity:.2f} | {(x - reference).abs().mean():.3f} |')


@torch.no_grad()
def sample_from(model, diffusion, ids, noise, steps, guidance):
    """sample_text.generate's Euler sampler from given unit noise (shift as trained)."""
    from samplers import sample_euler
    sigmas = sample_text.flow_sigmas(steps, diffusion.schedule.shift)
    denoise = sample_text.guided_denoiser(model, diffusion, ids, ids != 0, guidance)
    return sample_euler(denoise, noise * sigmas[0], sigmas).clamp(-1, 1)


if __name__ == '__main__':
    main()
