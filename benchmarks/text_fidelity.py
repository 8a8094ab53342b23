"""
Prompt fidelity of text-to-image models (train_text.py): does a sample show what its prompt says?

1. An attribute classifier (a small CNN with four heads: size, colour, shape, position) is trained on held-out
   shapes: the 'test' split of data.ShapesDataset (seed 1), a random stream no model trained on, labelled by
   captions.py's words. Its own accuracy is measured on more held-out images (seed 2) and printed: it bounds
   what the fidelity numbers can mean.
2. Each checkpoint samples one image per prompt for the captions of --prompts held-out images (seed 3, Euler with
   classifier-free guidance, sample_text.generate), and the classifier reads the four attributes back; the table
   gives the share of samples whose attribute matches the prompt, and of samples where all four match.
3. Unseen combinations: prompts that were left out of training with train_text.py --exclude (e.g. every
   "red triangle"), at the 9 positions and 2 sizes; the share where colour and shape both match.
4. A grid per model: docs/text2img_<name>.png, one row per prompt in docs/text2img_prompts.txt.

Usage: OMP_NUM_THREADS=1 python benchmarks/text_fidelity.py runs/fid_mmdit/ckpt.pt runs/fid_dit/ckpt.pt ... \
           [--unseen "red triangle"] [--steps 20] [--guidance 3] [--grid-dir docs]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import captions  # noqa: E402
import data  # noqa: E402
import sample_text  # noqa: E402
from sample import save_grid  # noqa: E402

POSITIONS = [f'{v} {h}'.strip() or 'centre' for v in ('top', '', 'bottom') for h in ('left', '', 'right')]
POSITIONS = ['centre' if p == 'centre' else p for p in POSITIONS]
ATTRIBUTES = {'size': ['small', 'large'], 'colour': list(captions.COLOURS), 'shape': list(data.SHAPE_CLASSES),
              'position': POSITIONS}


def attributes(text):
    """{'size', 'colour', 'shape', 'position'} of a shapes caption ('a small red triangle top left')."""
    w = text.split()
    return {'size': w[1], 'colour': w[2], 'shape': w[3], 'position': ' '.join(w[4:])}


def labels_of(texts):
    return {k: torch.tensor([names.index(attributes(t)[k]) for t in texts]) for k, names in ATTRIBUTES.items()}


class AttributeNet(nn.Module):
    """Conv features of a 16x16 (or 32x32) image -> logits of each attribute (positions need the spatial map)."""

    def __init__(self, resolution):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                                      nn.SiLU(), nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten())
        width = 64 * (resolution // 4) ** 2
        self.heads = nn.ModuleDict({k: nn.Sequential(nn.Linear(width, 128), nn.SiLU(), nn.Linear(128, len(v)))
                                    for k, v in ATTRIBUTES.items()})

    def forward(self, x):
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


def train_classifier(resolution, steps=800, seed=1):
    ds = data.ShapesDataset(6000, resolution, seed=seed, split='test')
    x, y = data.to_float(ds.images), labels_of(captions.dataset_captions(ds))
    net, g = AttributeNet(resolution), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        i = torch.randint(len(x), (128,), generator=g)
        # Light noise: samples of a briefly trained model are not as clean as the renders.
        logits = net(x[i] + 0.05 * torch.randn(x[i].shape, generator=g))
        loss = sum(F.cross_entropy(logits[k], y[k][i]) for k in ATTRIBUTES)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def read(net, images):
    logits = net(images)
    return {k: logits[k].argmax(1) for k in ATTRIBUTES}


def shares(net, images, texts):
    """Share of images whose read-back attribute equals the caption's, per attribute and all four."""
    got, want = read(net, images), labels_of(texts)
    ok = {k: (got[k] == want[k]) for k in ATTRIBUTES}
    ok['all'] = torch.stack(list(ok.values())).all(0)
    return {k: v.float().mean().item() for k, v in ok.items()}


def main():
    p = argparse.ArgumentParser(description='Prompt fidelity of train_text.py checkpoints')
    p.add_argument('ckpts', nargs='+')
    p.add_argument('--prompts', type=int, default=300, help='held-out captions used as prompts')
    p.add_argument('--unseen', default='red triangle', help='the colour and shape left out of training (--exclude)')
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--guidance', type=float, default=3.0)
    p.add_argument('--grid-dir', default=None, help='write text2img_<run>.png grids here')
    args = p.parse_args()
    torch.manual_seed(0)
    _, _, _, config = sample_text.load_text_model(args.ckpts[0])
    R = config['data']['resolution']

    t0 = time.process_time()
    net = train_classifier(R)
    check = data.ShapesDataset(1000, R, seed=2, split='test')
    acc = shares(net, data.to_float(check.images), captions.dataset_captions(check))
    print(f'attribute classifier ({time.process_time() - t0:.0f} CPU s), accuracy on 1,000 held-out renders: '
          + ', '.join(f'{k} {v:.3f}' for k, v in acc.items()))

    prompts = captions.dataset_captions(data.ShapesDataset(args.prompts, R, seed=3, split='test'))
    colour, shape = args.unseen.split()
    unseen = [f'a {s} {colour} {shape} {pos}' for s in ('small', 'large') for pos in POSITIONS]
    grid_prompts = prompts[:5] + [unseen[4], unseen[9 + 4], unseen[0]]
    print(f'| model | CPU s trained | size | colour | shape | position | all four | unseen "{args.unseen}": colour+shape |')
    print('|---|---|---|---|---|---|---|---|')
    for path in args.ckpts:
        model, diffusion, tokenizer, config = sample_text.load_text_model(path)
        if any(tokenizer.unknown_words(t) for t in prompts):
            raise SystemExit(f'{path}: prompts with unknown words')
        shape_ = (config['data']['channels'], R, R)
        images = sample_text.generate(model, diffusion, tokenizer, prompts, shape_, args.steps, args.guidance, seed=0)
        s = shares(net, images, prompts)
        u_images = sample_text.generate(model, diffusion, tokenizer, unseen, shape_, args.steps, args.guidance, seed=1)
        got = read(net, u_images)
        u_share = ((got['colour'] == ATTRIBUTES['colour'].index(colour)) &
                   (got['shape'] == ATTRIBUTES['shape'].index(shape))).float().mean().item()
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        cpu = read_cpu(path)
        print(f"| {name} ({config['model']} {config['config_name']}, text {'frozen' if config['text']['frozen'] else 'trained'}) | "
              f"{cpu} | {s['size']:.2f} | {s['colour']:.2f} | {s['shape']:.2f} | {s['position']:.2f} | {s['all']:.2f} | {u_share:.2f} |")
        if args.grid_dir:
            grid = sample_text.generate(model, diffusion, tokenizer, [q for q in grid_prompts for _ in range(6)], shape_,
                                        args.steps, args.guidance, seed=2)
            save_grid(grid, os.path.join(args.grid_dir, f'text2img_{name}.png'), nrow=6)
    if args.grid_dir:
        with open(os.path.join(args.grid_dir, 'text2img_prompts.txt'), 'w') as f:
            f.write('\n'.join(grid_prompts) + '\n')


def read_cpu(ckpt):
    """The 'CPU ...' line /usr/bin/time left in runs/<run>.out beside the run folder, if any."""
    out = os.path.dirname(os.path.abspath(ckpt)) + '.out'
    if os.path.isfile(out):
        for line in open(out).read().splitlines()[::-1]:
            if ' CPU ' in line:
                user, sys_ = line.split(' CPU ')[1].split(' s')[0].split('+')
                return f'{float(user) + float(sys_):.0f}'
    return '?'


if __name__ == '__main__':
    main()
