"""
The DiT levers on the CPU (issue 32): train a DiT of any size, and judge a class-conditional MNIST checkpoint with a
classifier trained on images the diffusion model did not see.

The judge: train.py holds out data.holdout_split(10000, seed 0), 500 of the 10,000 shared MNIST test images. A
LeNet (lenet.py) is trained on those 500 alone (with 7 copies shifted by up to 2 pixels), so no image it learned from
was seen by a seed-0 diffusion run; its accuracy on the other 9,500 is printed. The 500 images are also the
reference of evaluate.py's FD_lenet.

    python benchmarks/dit_cpu.py judge-train                       # -> runs/judge/lenet.pt, runs/judge/ref.npz
    python benchmarks/dit_cpu.py judge CKPT OUT_PREFIX             # accuracy at guidance 1 and 2, 500 samples each
    python evaluate.py OUT_PREFIX_w1.npz runs/judge/ref.npz --network lenet --lenet-weights runs/judge/lenet.pt --metrics fid
    python benchmarks/dit_cpu.py train depth=5,hidden_size=128,num_heads=4,patch_size=4[,init=xavier] -- TRAIN_ARGS

`train` registers the size as the DiT configuration 'lab' and runs train.py --model dit --config lab; init=xavier
keeps the xavier init of the adaLN modulation (the 'adaLN' block of DiT Fig. 5) instead of zeroing it (adaLN-Zero).
"""
import argparse
import json
import os
import runpy
import sys
import time

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data                                                   # noqa: E402
import dit                                                    # noqa: E402
import lenet                                                  # noqa: E402
from sample import generate, load_model, sample_shape        # noqa: E402

JUDGE = 'runs/judge'


def to_uint8_nhwc(x):
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def judge_train(data_dir):
    ds = data.load_dataset('mnist', data_dir=data_dir, split='test', resolution=32)
    x, y = ds.batch(torch.arange(len(ds)))
    seen, held_out = data.holdout_split(len(ds), 0)          # what train.py (seed 0) trains on / holds out
    u = (x[held_out] + 1) / 2
    g = torch.Generator().manual_seed(0)
    copies = [u] + [torch.roll(u, (int(a), int(b)), (2, 3)) for a, b in torch.randint(-2, 3, (7, 2), generator=g)]
    model = lenet.train_classifier(torch.cat(copies), y[held_out].repeat(len(copies)), 10, steps=1500)
    with torch.no_grad():
        acc = (model((x[seen] + 1) / 2, return_logits=True)[1].argmax(1) == y[seen]).float().mean().item()
    print(f'judge: LeNet trained on the {len(held_out)} held-out images; accuracy on the other {len(seen)}: {acc:.4f}')
    os.makedirs(JUDGE, exist_ok=True)
    torch.save(model.state_dict(), f'{JUDGE}/lenet.pt')
    np.savez(f'{JUDGE}/ref.npz', images=to_uint8_nhwc(x[held_out]), labels=y[held_out].numpy())


def judge(ckpt, prefix, n, weights):
    clf = lenet.lenet_from_state_dict(torch.load(f'{JUDGE}/lenet.pt', weights_only=True))
    net, diffusion, config = load_model(ckpt)
    labels = torch.arange(10).repeat(n // 10)
    scores = {}
    for w in weights:
        t0 = time.process_time()
        images = generate(net, diffusion, len(labels), sample_shape(config), 'cpu', labels, 10, 'heun', 18, w,
                          seed=0, batch_size=100)
        with torch.no_grad():
            pred = clf((images + 1) / 2, return_logits=True)[1].argmax(1)
        scores[f'acc_w{w:g}'] = acc = (pred == labels).float().mean().item()
        np.savez(f'{prefix}_w{w:g}.npz', images=to_uint8_nhwc(images), labels=labels.numpy())
        print(f'{ckpt} w={w:g}: accuracy {acc:.3f} ({len(labels)} samples, heun 18, {time.process_time() - t0:.0f} CPU s)')
    with open(f'{prefix}.json', 'w') as f:
        json.dump(scores, f)


def train(spec, train_args):
    sizes = dict(kv.split('=') for kv in spec.split(','))
    init = sizes.pop('init', 'zero')
    dit.DIT_CONFIGS['lab'] = {k: int(v) for k, v in sizes.items()}
    if init == 'xavier':                                     # DiT Fig. 5's adaLN: the modulation is not zeroed
        zero_init = dit.DiT.init_weights

        def init_weights(self):
            zero_init(self)
            for block in self.blocks:
                nn.init.xavier_uniform_(block.adaLN_modulation[-1].weight)
        dit.DiT.init_weights = init_weights
    sys.argv = [os.path.join(ROOT, 'train.py')] + train_args + ['--model', 'dit', '--config', 'lab']
    runpy.run_path(sys.argv[0], run_name='__main__')


if __name__ == '__main__':
    if sys.argv[1:2] == ['train']:
        train(sys.argv[2], sys.argv[4:] if sys.argv[3:4] == ['--'] else sys.argv[3:])
    else:
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument('command', choices=['judge-train', 'judge'])
        p.add_argument('ckpt', nargs='?')
        p.add_argument('prefix', nargs='?')
        p.add_argument('--data-dir', default='../shared/data/mnist')
        p.add_argument('--n', type=int, default=500)
        p.add_argument('--w', type=float, nargs='+', default=[1.0, 2.0])
        a = p.parse_args()
        judge_train(a.data_dir) if a.command == 'judge-train' else judge(a.ckpt, a.prefix, a.n, a.w)
