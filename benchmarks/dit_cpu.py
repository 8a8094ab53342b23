"""
DiT sizes on the CPU (issue 32): train a DiT of any size with train.py's flags; judge it with benchmarks/levers.py.

    python benchmarks/dit_cpu.py train depth=4,hidden_size=64,num_heads=4,patch_size=2[,init=xavier] -- TRAIN_ARGS
    python benchmarks/levers.py --ckpt OUT/ckpt.pt --n 300 --data-dir ../shared/data/mnist

`train` registers the size as the DiT configuration 'lab' and runs train.py --model dit --config lab; init=xavier
keeps the xavier init of the adaLN modulation (the 'adaLN' block of DiT Fig. 5) instead of zeroing it (adaLN-Zero).
"""
import os
import runpy
import sys

import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dit                                                    # noqa: E402


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
    if sys.argv[1:2] != ['train'] or len(sys.argv) < 3:
        raise SystemExit(__doc__)
    train(sys.argv[2], sys.argv[4:] if sys.argv[3:4] == ['--'] else sys.argv[3:])
