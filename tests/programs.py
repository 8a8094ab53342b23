"""Run the training programs the way a user does: `python train.py ...` in a subprocess. Nothing imports a training
program (DESIGN.md), tests included; what a run leaves (checkpoint, log, grids, its messages) is what they check.

    run_program('train.py', ['--steps', '2', '--out', str(out)])     # -> subprocess.CompletedProcess
    run_program(..., patch='import reports; reports.sample_grid = kill')   # a kill at a chosen place

A program that exits with an error raises SystemExit carrying its stderr, so `pytest.raises(SystemExit, match=...)`
checks the message the user sees."""
import os
import runpy
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Defines kill(*a, **k), which raises KeyboardInterrupt as Ctrl-C would, for patches.
KILL = 'def kill(*a, **k):\n    raise KeyboardInterrupt\n'


def run_program(script, argv, patch=None, timeout=600):
    """python SCRIPT ARGV from the project root, one torch thread. patch: Python lines run first in the same process
    (replace a harness function to simulate a kill); the program then runs as __main__ (runpy), as from the shell."""
    argv = [str(a) for a in argv]
    code = (f'import runpy, sys\nsys.argv = {[script] + argv!r}\n{KILL}{patch or ""}\n'
            f'runpy.run_path({os.path.join(ROOT, script)!r}, run_name="__main__")\n')
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode:
        raise SystemExit(result.stderr.strip()[-4000:] or f'exit status {result.returncode}')
    return result


def weights(ckpt, key='ema'):
    """The state dict `key` ('ema' or 'model') of a checkpoint file, as a list of tensors in order."""
    return list(torch.load(ckpt, weights_only=True)[key].values())


_PROGRAMS = {}


def program(script):
    """The functions of a training program (its parse_args, check_args, ...), from running the file as a module
    that is not __main__ (runpy), so tests check its flags in-process, in milliseconds, without importing it."""
    if script not in _PROGRAMS:
        _PROGRAMS[script] = runpy.run_path(os.path.join(ROOT, script), run_name=f'program_{script[:-3]}')
    return _PROGRAMS[script]


def check_program(script, argv):
    """parse_args(argv) and the checks main runs before any work; returns args, or raises SystemExit('error: ...')."""
    p = program(script)
    args = p['parse_args']([str(a) for a in argv])
    if 'check_args' in p:
        p['check_args'](args)
    else:
        import runs
        runs.check_flags(args, *[p[name] for name in ('check_autoencoder_args',) if name in p])
    return args
