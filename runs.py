"""
A run you can trust: the harness every training program (train.py, train_autoencoder.py, train_classifier.py)
shares, so each of them shows only its own algorithm and loop.

    atomic_write(path, write)               THE one way a file is written: write(tmp) to a unique temp file in the
                                            same folder, fsync, os.replace onto path; the temp file never survives
    check_output_path(path, exts, flag)     THE one output-path check, before any long work (ValueError naming flag)

What "trust" means here, and where each promise is kept:
  - nothing lost: a run folder is never silently reused (prepare_run_folder); checkpoints are written atomically,
    and weights that are non-finite or exploded never replace the last good checkpoint (save_checkpoint); a full
    disk is reported as such, with what survived
  - exact resume: every piece of state lives in an owner with a state_dict() (Trainee), the dropout RNG of every
    rank is saved (rng_states), and each micro-batch draws from a generator seeded by (seed, step, rank, micro)
    (step_generator), so a resumed run is bit-identical to an uninterrupted one; flags that change the result
    must match unless --allow-changes (resume_run)
  - a JSON-lines log whose every step appears once, even after a kill (RunLog)
  - one gradient-update skeleton for every objective (gradient_step): DDP no_sync on all but the last
    micro-batch (nanoGPT), CUDA autocast with bf16 or fp16 + GradScaler, a skipped update on a non-finite loss,
    clipping, the optimizer step and the EMA update with warm-up
  - DDP through torchrun (NCCL on GPUs, gloo on CPU), one process otherwise (setup_distributed)

Imports: torch and data.py (the loader) only; the checkpoint format itself is checkpoints.py's.
"""
import errno
import json
import math
import os
import tempfile
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import data

MAX_WEIGHT = 1e4                               # |weight| above this: the run has blown up (trained nets: |w| < 10)


# ----------------------------------------------------------------------------------------------------
# Files: one atomic write and one output-path check for the whole command layer.

def disk_full(path, e, keep=''):
    """The message of a full disk (the common failure of long runs): what was removed, what survived, what to do."""
    return SystemExit(f'error: disk full while writing {path} ({e.strerror or e}); the partial file was removed{keep}. '
                      'Free space, then rerun (training: with --resume auto).')


def _umask():
    """The process umask (read by setting and restoring it): mkstemp makes 0600 files, the result should not be."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """write(tmp_path) writes the whole file under a temporary name; it is then fsync'ed and renamed onto `path`.

    The rename is atomic (POSIX rename / os.replace), so `path` holds either the old file or the complete new one,
    never half of one. The temporary name is unique (tempfile.mkstemp: two runs writing the same file never share
    it), lies in the same folder (a rename within one file system) and keeps the extension (PIL, numpy and torch
    pick formats from it). On ANY failure, KeyboardInterrupt included, the temporary file is removed and the error
    raised again; a full disk (ENOSPC) or a file-size limit (EFBIG) becomes an OSError that says so."""
    folder = os.path.dirname(path) or '.'
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix=f'.tmp{os.path.splitext(path)[1]}')
    os.close(fd)
    try:
        write(tmp)
        # fsync before the rename: otherwise a power cut can leave the new name pointing at an empty file.
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())                        # the permissions a plain open() would have given
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch.save reports a full disk or file-size limit as RuntimeError ('unexpected pos'), not OSError.
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG):
            raise OSError(e.errno, f'disk full while writing {path} ({e.strerror or e}); free space and rerun') from None
        if isinstance(e, RuntimeError) and ('unexpected pos' in str(e) or 'file write failed' in str(e)):
            raise OSError(errno.ENOSPC, f'disk full or file too large while writing {path} ({e}); free space and rerun') from None
        raise


def check_output_path(path, extensions, flag, overwrite=False):
    """Before any long work, every way the final write could fail that can be known now: ValueError naming `flag`
    when the path lacks one of `extensions`, is a folder, already exists (unless overwrite=True), or its folder
    cannot be made or written. A missing folder is created (a fresh output tree is the common case)."""
    extensions = tuple(extensions)
    if os.path.isdir(path):
        raise ValueError(f'{flag} {path!r} is a folder; give a file name such as '
                         f'{os.path.join(path, "out" + extensions[0])}')
    # A missing extension matters: np.savez appends '.npz', so the file would land somewhere else than asked.
    if not path.lower().endswith(extensions):
        raise ValueError(f'{flag} {path!r} needs one of the extensions {", ".join(extensions)}')
    if os.path.exists(path) and not overwrite:
        raise ValueError(f'{flag} {path!r} already exists; give a new file name (it is not replaced)')
    folder = os.path.dirname(path) or '.'
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.write_test_'):
            pass                                                 # a real write: os.access lies on some mounts
    except OSError as e:
        raise ValueError(f'{flag} {path!r}: cannot write in {folder!r} ({e.strerror or e})') from None
