"""
Parity of c3d.py with the C3D that TGANv2 computes its video IS and FID with (pfnet-research/tgan2, chainer).

The reference is not part of this project and needs chainer, which does not share an environment with torch here:
give a Python that has chainer and a checkout of tgan2, e.g.
    python -m venv /tmp/refenv && /tmp/refenv/bin/pip install "setuptools<70" wheel "numpy<1.24"
    /tmp/refenv/bin/pip install --no-build-isolation chainer==7.8.1
    git clone https://github.com/pfnet-research/tgan2 /tmp/tgan2        # tested at f892bc4
    python benchmarks/parity_c3d.py --ref-python /tmp/refenv/bin/python --ref-dir /tmp/tgan2
This script writes random weights under the file's chainer keys (tests/test_c3d.py's official_arrays, He-scaled),
a random mean clip and two clips, runs TGANv2's C3DVersion1UCF101 on them in the reference Python (input 2 u - 1,
as TGANv2 feeds generator outputs), and c3d.load_c3d here on u; it prints the largest differences of fc7 and fc8.
With --weights/--mean the real conv3d_deepnetA_ucf.npz and mean2.npz are compared instead.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]
import c3d  # noqa: E402
from test_c3d import official_arrays, parity_clips, random_mean  # noqa: E402

REFERENCE = '''
import sys
import numpy as np, chainer
sys.path.insert(0, sys.argv[1] + '/tgan2/models/c3d')   # the file alone: the package imports cv2, h5py, ...
from c3d_ucf101 import C3DVersion1UCF101
folder = sys.argv[2]
model = C3DVersion1UCF101(pretrained_model=sys.argv[3], mean_path=sys.argv[4])
x = (2 * np.load(folder + '/clips.npy') - 1).astype(np.float32)
with chainer.using_config('train', False), chainer.using_config('enable_backprop', False):
    out = model.extract(x, layers=['fc7', 'fc8'])
np.savez(folder + '/reference.npz', fc7=out['fc7'].array, fc8=out['fc8'].array)
'''


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    p.add_argument('--ref-python', required=True, help='a Python with chainer 7')
    p.add_argument('--ref-dir', required=True, help='a checkout of pfnet-research/tgan2')
    p.add_argument('--weights', default=None, help='conv3d_deepnetA_ucf.npz (default: random weights)')
    p.add_argument('--mean', default=None, help='mean2.npz (default: a random mean clip)')
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        weights = args.weights or os.path.join(folder, c3d.C3D_WEIGHTS_NAME)
        mean = args.mean or os.path.join(folder, c3d.C3D_MEAN_NAME)
        if not args.weights:
            np.savez(weights, **official_arrays(torch.Generator().manual_seed(1)))
        if not args.mean:
            np.savez(mean, mean=random_mean(torch.Generator().manual_seed(2)))
        clips = parity_clips()
        np.save(os.path.join(folder, 'clips.npy'), clips.numpy())
        subprocess.run([args.ref_python, '-c', REFERENCE, args.ref_dir, folder, weights, mean], check=True)
        reference = np.load(os.path.join(folder, 'reference.npz'))
        with torch.no_grad():
            fc7, fc8 = c3d.load_c3d(weights, mean)(clips, return_logits=True)
        for name, ours in (('fc7', fc7), ('fc8', fc8)):
            ref = reference[name].astype(np.float64)
            gap = np.abs(ours.double().numpy() - ref).max()
            print(f'{name}: max |ours - reference| = {gap:.3g} ({gap / np.abs(ref).max():.2g} of the largest value)')


if __name__ == '__main__':
    main()
