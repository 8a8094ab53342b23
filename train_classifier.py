"""
Train the noise-conditional classifier of classifier guidance: `python train_classifier.py --dataset mnist
--data-dir DIR --split test --out runs/clf` (also `python train.py --task classifier ...`); then
`sample.py --classifier runs/clf/ckpt.pt --classifier-scale s` guides a diffusion model with it.

Classifier guidance (Dhariwal & Nichol 2021, arXiv:2105.05233, Sec. 4) needs p(y | x_t, sigma) on noised images, so
the classifier (ADM's U-Net encoder half, classifier.py) is trained on x = x0 + sigma noise with sigma drawn from
the same training distribution as the diffusion model's (the diffusion flags), by cross-entropy:
    L = E_{x0, y, sigma, noise} [ -log p_phi(y | x0 + sigma noise, sigma) ]        (classifier.classifier_loss)
The held-out log reports its accuracy in bands of log sigma (chance = 1 / classes): guidance is only as good as
the classifier where the sampler asks it.

The harness is runs.py's (run folder, exact resume, AMP, DDP, the gradient-update skeleton); the checkpoint
format checkpoints.py's. Imports no training program.
"""
import argparse
import math

import torch
from tqdm import tqdm

import checkpoints
import reports
import runs
from classifier import CLASSIFIER_CONFIGS, accuracy_by_noise_level, classifier_loss


def train_step(run, micro_batches, args):
    """One optimizer step on the cross-entropy of noised images; [(loss, sigma)] per micro-batch, or None."""
    def loss(b):
        per_sample, sigma = classifier_loss(run.model, run.diffusion, b['x0'], b['y'], generator=b['generator'])
        return per_sample.mean(), per_sample, sigma.detach()
    return runs.gradient_step(run, micro_batches, args, loss)


def main(args):
    # Setup: flags, processes, run folder, data; the classifier sized for the images, its EMA, the Diffusion whose
    # training noise levels it learns on.
    runs.check_flags(args)
    setup = runs.start_run(args)
    device, is_main = setup.device, setup.is_main
    dataset, train_index, val_index = runs.load_training_data(args)
    name, net = checkpoints.classifier_config(args, dataset)
    config = checkpoints.make_config('classifier', 'classifier', name, net, checkpoints.data_config(args.dataset, dataset),
                                     checkpoints.diffusion_config(args))
    run = runs.make_trainee(args, checkpoints.build_network(config), checkpoints.build_network(config), setup,
                            checkpoints.build_diffusion(config))
    if setup.resume:
        runs.resume_run(run, config, args, setup)
    last_good, log = runs.saved_step(run, setup), runs.open_log(run, setup, args)
    if is_main:
        print(f"classifier '{name}' {sum(p.numel() for p in run.net.parameters()) / 1e6:.2f}M parameters; "
              f'{args.dataset}: {len(train_index)} training + {len(val_index)} held-out images, '
              f'{dataset.num_classes} classes; device {device}, {setup.world} process(es)')

    # The batches (runs.training_batches: a pure function of seed and step) and the held-out batch of fixed noise.
    batches = runs.training_batches(args, dataset, train_index, setup.rank, setup.micro_batch, run.step)
    held_out = reports.held_out_batch(dataset, val_index, run.diffusion, config) if is_main and args.val_every else None
    tracker = reports.LossByNoiseLevel(run.diffusion.sigma_min, run.diffusion.sigma_max)
    bar = tqdm(total=args.steps, initial=run.step, disable=not is_main or args.no_progress, desc='train', dynamic_ncols=True)

    while run.step < args.steps:
        # Train: the true labels (no dropout: the classifier must learn them), sigma and noise from stream 1.
        lr = runs.get_lr(run.step, args)
        runs.set_lr([run.optimizer], lr)
        micro = []
        for m in range(args.grad_accum):
            x0, y = next(batches)
            micro.append({'x0': x0.to(device), 'y': y.to(device),
                          'generator': runs.step_generator(args, run.step, setup.rank, m, stream=1)})
        losses = train_step(run, micro, args)
        run.step += 1
        bar.update(1)
        if losses is not None:
            tracker.add(losses)
        done = run.step == args.steps

        # Log: the cross-entropy per noise level; held-out cross-entropy and accuracy by noise level.
        if is_main and (run.step % args.log_every == 0 or done) and tracker.steps:
            reports.log_losses(log, bar, tracker, run, lr, args)
        if held_out is not None and (run.step % args.val_every == 0 or done):
            log.write({'step': run.step, 'val_loss': held_out_loss(run, held_out, device),
                       'val_accuracy_by_sigma': accuracy_by_sigma(run, held_out, device)})

        # Save checkpoint: only weights known to be good replace the previous one.
        if run.step % args.ckpt_every == 0 or done:
            last_good = runs.save_checkpoint(run, config, args, setup, last_good)
    bar.close()

    # Finish: the accuracy by noise level on held-out images (training images when none are held out).
    if is_main:
        batch = held_out or reports.held_out_batch(dataset, val_index if len(val_index) else train_index,
                                                   run.diffusion, config, quiet=True)
        acc = accuracy_by_sigma(run, batch, device)
        log.write({'step': run.step, 'val_accuracy_by_sigma': acc})
        print(f"held-out accuracy by sigma band (chance {1 / dataset.num_classes:.3f}): "
              + ', '.join(f'{k}: {v:.3f}' for k, v in acc.items()))
    runs.finish_run(run, setup, log)
    return run.net, run.ema


@torch.no_grad()
def held_out_loss(run, batch, device):
    """The EMA classifier's cross-entropy on the fixed held-out batch (fixed sigma and noise)."""
    return classifier_loss(run.ema, run.diffusion, batch['x0'].to(device), batch['cond']['y'].to(device),
                           batch['sigma'].to(device), batch['noise'].to(device))[0].mean().item()


@torch.no_grad()
def accuracy_by_sigma(run, batch, device):
    """Held-out accuracy in 4 bands of log sigma (chance = 1 / classes), the check that the classifier knows the
    class where guidance will ask it (ADM Sec. 4)."""
    edges = torch.logspace(math.log10(run.diffusion.sigma_min), math.log10(run.diffusion.sigma_max), 5).tolist()
    rows = accuracy_by_noise_level(run.ema, run.diffusion, batch['x0'].to(device), batch['cond']['y'].to(device),
                                   edges, generator=torch.Generator().manual_seed(0))
    return {f'{lo:.3g}-{hi:.3g}': round(acc, 4) for lo, hi, acc in rows}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train a noise-conditional classifier for classifier guidance.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    runs.add_run_flags(p)
    g = p.add_argument_group('model')
    g.add_argument('--config', default=None, help=f"classifier configuration: {', '.join(CLASSIFIER_CONFIGS)} (default micro)")
    # The noise levels it learns on are those of the diffusion model it will guide: the same flags as train.py.
    runs.add_diffusion_flags(p)
    args = p.parse_args(argv)
    args.unconditional = False                  # checkpoints.classifier_config: a classifier needs the labels
    return args


if __name__ == '__main__':
    runs.run_command(main, parse_args)
