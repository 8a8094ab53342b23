"""
A run you can trust: the harness every training program (train.py, train_autoencoder.py, train_classifier.py)
shares, so each of them shows only its own algorithm and loop.

    atomic_write(path, write)               THE one way a file is written: write(tmp) to a unique temp file in the
                                            same folder, fsync, os.replace onto path; the temp file never survives
    check_output_path(path, exts, flag)     THE one output-path check, before any long work (ValueError naming flag)

What "trust" means here, and where each promise is kept:
  - nothing lost: a run folder is never silently reused, and is locked while a run uses it (prepare_run_folder,
    lock_run_folder); a replaced run's files are moved aside, never deleted (set_aside_previous_run); checkpoints
    are written atomically, and weights that are non-finite, exploded or no longer compute never replace the last
    good checkpoint, nor does a step while steps are being skipped (save_checkpoint); a full disk or a file-size
    limit is reported as such, with what survived
  - exact resume: every piece of state lives in an owner with a state_dict() (Trainee), the dropout RNG of every
    rank is saved (rng_states), and each micro-batch draws from a generator seeded by (seed, step, rank, micro)
    (step_generator), so a resumed run is bit-identical to an uninterrupted one; flags that change the result
    must match unless --allow-changes (resume_run)
  - a JSON-lines log whose every step appears once, even after a kill (RunLog)
  - one gradient-update skeleton for every objective (gradient_step): DDP no_sync on all but the last
    micro-batch (nanoGPT), CUDA autocast with bf16 or fp16 + GradScaler, a skipped update on a non-finite loss,
    clipping, the optimizer step and the EMA update with warm-up
  - DDP through torchrun (NCCL on GPUs, gloo on CPU), one process otherwise (setup_distributed)

Imports data.py (the loader), diffusion.py (the schedule names of the diffusion flags) and checkpoints.py (a
resume reads a checkpoint through it); no command line.
"""
import errno
import json
import math
import os
import re
import socket
import sys
import tempfile
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import checkpoints
import data
from diffusion import NOISE_SCHEDULES

MAX_RESOLUTION = 1024                          # --resolution above this: refused (memory), see check_run_args
MAX_BATCH = 65536                              # --batch-size above this: refused
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
    when the path lacks one of `extensions`, is a folder, already exists (unless overwrite=True: the command lines'
    --overwrite, which the message names), or its folder
    cannot be made or written. A missing folder is created (a fresh output tree is the common case)."""
    extensions = tuple(extensions)
    if os.path.isdir(path):
        raise ValueError(f'{flag} {path!r} is a folder; give a file name such as '
                         f'{os.path.join(path, "out" + extensions[0])}')
    # A missing extension matters: np.savez appends '.npz', so the file would land somewhere else than asked.
    if not path.lower().endswith(extensions):
        raise ValueError(f'{flag} {path!r} needs one of the extensions {", ".join(extensions)}')
    if os.path.exists(path) and not overwrite:
        raise ValueError(f'{flag} {path!r} already exists; give a new file name, or --overwrite replaces it')
    folder = os.path.dirname(path) or '.'
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.write_test_'):
            pass                                                 # a real write: os.access lies on some mounts
    except OSError as e:
        raise ValueError(f'{flag} {path!r}: cannot write in {folder!r} ({e.strerror or e})') from None


# ----------------------------------------------------------------------------------------------------
# The flags every training program shares (data, optimisation, the run folder, misc) and their checks.

# Flags that change what an uninterrupted run would have done: a resume with other values is not exact.
# Each program adds its own (train.py: --p-uncond, --aug-p, ...; the autoencoder: its loss weights).
RESUME_FLAGS = ('split', 'seed', 'batch_size', 'grad_accum', 'lr', 'warmup', 'lr_decay', 'weight_decay',
                'grad_clip', 'ema_decay', 'amp')


def add_run_flags(p):
    """The shared flag groups; returns them by name so a program adds its own flags to the same group."""
    groups = {}
    g = groups['data'] = p.add_argument_group('data')
    g.add_argument('--dataset', default='shapes', help='shapes | mnist | fashion-mnist | cifar10 | emoji | folder:PATH | video-shapes | moving-mnist | clips:PATH')
    g.add_argument('--data-dir', default='data', help='where dataset files are read from (and downloaded to)')
    g.add_argument('--split', default='train', help="which split to train on (the shared MNIST files hold only 'test')")
    g.add_argument('--resolution', type=int, default=None, help='image size; default: the dataset\'s own')
    g.add_argument('--workers', type=int, default=2, help='DataLoader workers for image folders streamed from disk')
    g.add_argument('--memory-budget', type=float, default=4.0, help='GB: image folders larger than this decoded are streamed from disk')
    g = groups['optimisation'] = p.add_argument_group('optimisation')
    g.add_argument('--steps', type=int, default=1000, help='optimizer steps')
    g.add_argument('--batch-size', type=int, default=64, help='global batch size (split over processes and accumulation)')
    g.add_argument('--grad-accum', type=int, default=1, help='micro-batches per optimizer step')
    g.add_argument('--lr', type=float, default=2e-3, help='peak learning rate (Adam)')
    g.add_argument('--warmup', type=int, default=200, help='linear warm-up steps')
    g.add_argument('--lr-decay', default='cosine', choices=['cosine', 'constant'], help='after warm-up')
    g.add_argument('--weight-decay', type=float, default=0.0)
    g.add_argument('--grad-clip', type=float, default=1.0, help='max gradient norm (0 = off)')
    g.add_argument('--ema-decay', type=float, default=0.999, help='EMA decay after warm-up, in [0, 1)')
    g.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'none'], help='CUDA mixed precision (CPU always fp32)')
    # The run folder and how often it is written to; --resume / --overwrite decide what happens to an existing one.
    g = groups['output'] = p.add_argument_group('output')
    g.add_argument('--out', default='runs/default', help='run folder: checkpoints, samples, log')
    g.add_argument('--resume', default=None, help="checkpoint to continue from, or 'auto' for OUT/ckpt.pt if it exists")
    g.add_argument('--overwrite', action='store_true', help='start afresh in an --out that already holds a run (its checkpoint and log are replaced)')
    g.add_argument('--allow-changes', action='store_true', help='resume although --seed/--lr/--batch-size/... differ from the run (no longer exact)')
    g.add_argument('--log-every', type=int, default=50)
    g.add_argument('--val-every', type=int, default=500, help='held-out loss every N steps (0 = off)')
    g.add_argument('--sample-every', type=int, default=1000, help='sample grid every N steps (0 = only at the end)')
    g.add_argument('--ckpt-every', type=int, default=1000, help='checkpoint every N steps (and at the end)')
    g = groups['misc'] = p.add_argument_group('misc')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    g.add_argument('--no-progress', action='store_true', help='no tqdm bar (for logs)')
    return groups


def add_diffusion_flags(p):
    """What the network predicts and which noise levels it trains on (diffusion.py): config['diffusion']."""
    g = p.add_argument_group('diffusion')
    g.add_argument('--prediction', default='edm', choices=['eps', 'x0', 'v', 'edm', 'flow'], help='parameterisation of the network output')
    g.add_argument('--schedule', default=None, choices=list(NOISE_SCHEDULES), help='training noise levels and c_noise; default: the natural one for --prediction')
    g.add_argument('--t-sampler', default='low_discrepancy', choices=['uniform', 'low_discrepancy', 'importance'], help='how the batch\'s noise levels are drawn')
    # None = not given (then 0.5 and 1000, set by check_run_args), so a value given where it does nothing is refused.
    g.add_argument('--sigma-data', type=float, default=None, help='data standard deviation for EDM preconditioning (--prediction edm; default 0.5)')
    g.add_argument('--T', type=int, default=None, help='steps of the discrete schedules linear and cosine (DDPM: 1000)')
    return g


def check_run_args(args, need):
    """The shared flags' ranges; need(ok, message) collects the problems (check_flags)."""
    finite = lambda v: v is not None and math.isfinite(v)
    # Counts and intervals: 0 or negative values used to crash after the first step (step % 0) or train nothing.
    for flag in ('steps', 'batch_size', 'grad_accum', 'log_every', 'ckpt_every'):
        need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    for flag in ('warmup', 'val_every', 'sample_every', 'workers'):
        need(getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be 0 or more (got {getattr(args, flag)})")
    # NaN compares False with everything, so each check asks for a finite value first.
    need(finite(args.lr) and args.lr > 0, f'--lr must be a finite number > 0 (got {args.lr})')
    need(finite(args.ema_decay) and 0 <= args.ema_decay < 1, f'--ema-decay must be in [0, 1) (got {args.ema_decay}; 1 never moves, > 1 or < 0 extrapolates)')
    for flag in ('weight_decay', 'grad_clip', 'memory_budget'):
        need(finite(getattr(args, flag)) and getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be a finite number >= 0 (got {getattr(args, flag)})")
    need(args.resolution is None or args.resolution >= 1, f'--resolution must be a positive size (got {args.resolution})')
    need(args.split in ('train', 'test'), f"--split must be 'train' or 'test' (got {args.split!r})")
    if hasattr(args, 'sigma_data'):                                  # the diffusion flags, where the program has them
        check_diffusion_flags(args, need)
    # Sizes that cannot be allocated end in an allocator error naming nothing (20,000 shapes at 4096^2 are 938 GB):
    # stated bounds, far above what this code trains on, name the flag instead.
    need(args.resolution is None or args.resolution <= MAX_RESOLUTION,
         f'--resolution must be at most {MAX_RESOLUTION} (got {args.resolution}): larger images do not fit in memory here')
    need(args.batch_size <= MAX_BATCH, f'--batch-size must be at most {MAX_BATCH} (got {args.batch_size})')
    need(0 <= args.seed < 2 ** 63, f'--seed must be an integer in [0, 2^63) (got {args.seed})')
    need(not (args.resume == 'auto' and args.overwrite), '--resume auto continues the run in --out and --overwrite replaces '
                                                         'it: give one of them')
    # A run folder inside the training images: the next run would train on this run's grids and plots.
    if args.dataset.startswith('folder:'):
        images = os.path.realpath(args.dataset[len('folder:'):])
        out = os.path.realpath(args.out)
        need(os.path.commonpath([images, out]) != images,
             f'--out {args.out} is inside the training data folder {images}: the next run would train on its grids; '
             'give an --out outside it')
    # A device string torch cannot parse; whether CUDA exists is checked in setup_distributed.
    try:
        args.device_obj = torch.device(args.device) if args.device else None
    except RuntimeError:
        need(False, f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, mps)")


def check_diffusion_flags(args, need):
    """--sigma-data and --T: their ranges, and refused where they do nothing; then their defaults."""
    schedule = 'vdm' if getattr(args, 'objective', None) == 'vdm' else args.schedule or checkpoints.DEFAULT_SCHEDULE.get(args.prediction)
    if args.sigma_data is not None:
        need(math.isfinite(args.sigma_data) and args.sigma_data > 0, f'--sigma-data must be > 0 (got {args.sigma_data})')
        need(args.prediction == 'edm', f'--sigma-data applies to --prediction edm (its preconditioning); '
                                       f'--prediction {args.prediction} does not use it')
    if args.T is not None:
        need(args.T > 20, f'--T must be more than 20 (got {args.T})')
        need(schedule in ('linear', 'cosine'), f'--T applies to the discrete schedules linear and cosine; '
                                               f'--schedule {schedule} is continuous')
    args.sigma_data = 0.5 if args.sigma_data is None else args.sigma_data
    args.T = 1000 if args.T is None else args.T


def check_flags(args, *checks):
    """Run every check(args, need) and stop with one message listing all problems, before the dataset is read,
    so a typo costs seconds, not the run."""
    bad = []
    def need(ok, message):
        if not ok:
            bad.append(message)
    for check in (check_run_args,) + checks:
        check(args, need)
    if bad:
        raise SystemExit('error: ' + '\n       '.join(bad))


# ----------------------------------------------------------------------------------------------------
# Processes, devices, precision.

def setup_distributed(args):
    """(rank, world, device): one process, or one per GPU/CPU slot under torchrun (RANK, LOCAL_RANK, WORLD_SIZE)."""
    # Without torchrun: one process on the requested (or best available) device.
    if 'RANK' not in os.environ:
        device = args.device_obj or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise SystemExit(f'error: --device {args.device} but this machine has no CUDA GPU; use --device cpu')
        return 0, 1, device
    check_distributed_env(os.environ)
    # NCCL between GPUs; gloo lets the same script run several CPU processes (and the DDP test).
    backend = 'nccl' if torch.cuda.is_available() and args.device != 'cpu' else 'gloo'
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == 'nccl':
        torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
    else:
        device = torch.device('cpu')
    return rank, world, device


def check_distributed_env(env):
    """torchrun's variables, each named when wrong (init_process_group said only 'MASTER_ADDR expected')."""
    values = {}
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        value = env.get(name, '0' if name == 'LOCAL_RANK' else None)
        if value is None or not value.strip().isdigit():
            raise SystemExit(f'error: {name}={value!r}: it must be a non-negative integer (torchrun sets RANK, '
                             'LOCAL_RANK and WORLD_SIZE; unset RANK to train in one process)')
        values[name] = int(value)
    if values['WORLD_SIZE'] < 1:
        raise SystemExit(f"error: WORLD_SIZE={values['WORLD_SIZE']}: the number of processes must be at least 1")
    for name in ('RANK', 'LOCAL_RANK'):
        if values[name] >= values['WORLD_SIZE']:
            raise SystemExit(f"error: {name}={values[name]} is not below WORLD_SIZE={values['WORLD_SIZE']} (ranks count from 0)")
    for name in ('MASTER_ADDR', 'MASTER_PORT'):
        if not env.get(name):
            raise SystemExit(f'error: {name} is not set: several processes need the address and port of rank 0 (torchrun sets them)')


def amp_settings(args, device):
    """(autocast dtype or None, use a gradient scaler?): bf16 if the GPU has it, fp16 + scaler otherwise."""
    # CPU autocast (bf16) is slower than fp32 on most CPUs, so CPU always trains in fp32.
    if device.type != 'cuda' or args.amp == 'none':
        return None, False
    # bf16 has fp32's exponent range, so it needs no loss scaling; fp16 does (GradScaler).
    if args.amp == 'bf16' or (args.amp == 'auto' and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


@dataclass
class Setup:
    """Where this process stands: rank, processes, device, its share of the batch, and the run folder's decision."""
    rank: int
    world: int
    device: torch.device
    micro_batch: int                            # images per micro-batch on this process
    ckpt_path: str                              # OUT/ckpt.pt
    resume: str = None                          # checkpoint to continue from, or None
    replaces: bool = False                      # OUT holds a previous run that this one replaces (set aside)
    lock: object = None                         # the open OUT/.lock (rank 0), held until the process ends

    @property
    def is_main(self):
        return self.rank == 0


def start_run(args):
    """Processes and device, the dropout RNG (seed + rank: saved in every checkpoint), the batch split, and the run
    folder (rank 0 alone decides about it; the other ranks learn its decision)."""
    rank, world, device = setup_distributed(args)
    torch.manual_seed(args.seed + rank)
    # The global batch splits evenly over processes and accumulation steps, or the effective batch would differ.
    if args.batch_size % (world * args.grad_accum):
        raise SystemExit(f'error: --batch-size {args.batch_size} must be divisible by processes x --grad-accum = {world * args.grad_accum}')
    ckpt_path, resume, replaces, lock = (prepare_run_folder(args) if rank == 0 else
                                         (os.path.join(args.out, 'ckpt.pt'), None, False, None))
    if world > 1:
        resume = [resume]
        dist.broadcast_object_list(resume)
        resume = resume[0]
    return Setup(rank, world, device, args.batch_size // (world * args.grad_accum), ckpt_path, resume, replaces, lock)


# ----------------------------------------------------------------------------------------------------
# What a run trains: every piece of state in an owner with its own state_dict(), so resume restores it exactly.

@dataclass
class Trainee:
    """The network, its EMA, the optimizer, the gradient scaler, the Diffusion (importance-sampling history) and
    any extra owners (an autoencoder's discriminator and its optimizer). `model` is the network as the loss sees it
    (DDP-wrapped when there are several ranks); optimizer, EMA and checkpoints use the bare `net`."""
    net: torch.nn.Module                        # the weights being trained
    ema: torch.nn.Module                        # their exponential moving average: what is sampled
    optimizer: torch.optim.Optimizer            # Adam
    scaler: torch.amp.GradScaler                # fp16 loss scaling (disabled otherwise)
    model: torch.nn.Module = None               # net, or DDP(net)
    amp_dtype: torch.dtype = None               # autocast dtype on CUDA, None = fp32
    diffusion: object = None                    # diffusion.Diffusion: parameterisation, schedule, t-sampler
    extras: dict = field(default_factory=dict)  # name -> other state owners saved under that name
    step: int = 0                               # optimizer steps done
    skipped: int = 0                            # consecutive steps skipped for a non-finite loss
    grad_norm: float = 0.0                      # gradient norm of the last update (before clipping)

    # The checkpoint is this dict plus config, args and rng: sample.py reads 'ema' and 'config' only.
    def state_dict(self):
        return {'model': self.net.state_dict(), 'ema': self.ema.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'scaler': self.scaler.state_dict(), 'step': self.step,
                'diffusion': self.diffusion.state_dict() if self.diffusion is not None else {},
                **{name: owner.state_dict() for name, owner in self.extras.items()}}

    def load_state_dict(self, state):
        self.net.load_state_dict(state['model'])
        self.ema.load_state_dict(state['ema'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scaler.load_state_dict(state['scaler'])
        if self.diffusion is not None:
            self.diffusion.load_state_dict(state.get('diffusion', {}))    # importance-sampling history
        for name, owner in self.extras.items():
            owner.load_state_dict(state[name])
        self.step = state['step']


# What a Ctrl-C reports (run_command): the run being trained, and the step its checkpoint holds.
PROGRESS = {}


def make_trainee(args, net, ema, setup, diffusion=None, betas=(0.9, 0.999), extras=None):
    """A Trainee around a fresh network: the EMA starts as an exact copy (eval mode: no dropout, no RNG drawn), Adam,
    the AMP scaler, and DDP for the loss when there are several processes."""
    net, ema = net.to(setup.device), ema.to(setup.device).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    # fused=True on the CPU: one kernel per tensor instead of ~8 (the same Adam update to float32 rounding; 3.4x
    # faster, 1.7% of a ddpm-cifar10 step, issue 31). Other devices keep torch's default (foreach on CUDA).
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=betas, weight_decay=args.weight_decay,
                                 fused=True if setup.device.type == 'cpu' else None)
    amp_dtype, use_scaler = amp_settings(args, setup.device)
    model = torch.nn.parallel.DistributedDataParallel(net) if setup.world > 1 else net
    run = Trainee(net, ema, optimizer, torch.amp.GradScaler('cuda', enabled=use_scaler), model, amp_dtype,
                  diffusion, extras or {})
    PROGRESS.update(run=run, ckpt=setup.ckpt_path, saved=None)
    return run


# ----------------------------------------------------------------------------------------------------
# The gradient update every objective shares: learning rate, accumulation, AMP, skip, clip, step, EMA.

# nanoGPT's schedule: warm-up protects Adam's early, badly estimated second moments; the cosine tail lets the
# weights settle. It depends on --steps, so extending a run changes the tail (resume keeps --steps free).
def get_lr(step, args):
    """Linear warm-up, then constant or cosine decay to 10% (nanoGPT's get_lr)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_decay == 'constant':
        return args.lr
    # Cosine from the peak to 10% of it over the steps after warm-up (never to 0: the last steps still learn).
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizers, lr):
    """Give every parameter group of the optimizers this learning rate."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group['lr'] = lr


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay ema + (1 - decay) model, over parameters and buffers."""
    # lerp_(m, 1 - decay) is decay * e + (1 - decay) * m in place; integer buffers (counters) are left alone.
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(m, 1 - decay)


def ema_decay(step, max_decay):
    """EMA warm-up: decay_t = min(decay, (1 + t) / (10 + t)), so early samples are not an average dominated by the
    random initialisation (Tensorflow's ExponentialMovingAverage with num_updates, as DDPM's code uses)."""
    return min(max_decay, (1 + step) / (10 + step))


def gradient_step(run, micro_batches, args, loss_fn, extra_optimizer=None, step_extra=False):
    """One optimizer step of any objective. loss_fn(batch) -> (objective to minimise, per-sample loss, info) for one
    micro-batch; returns [(loss, info)] of every micro-batch, or None when the step was skipped (non-finite loss).
    extra_optimizer: a second optimizer fed by the same backward passes (an autoencoder's discriminator, not
    DDP-wrapped: its gradients are averaged over ranks here), stepped when step_extra."""
    # Gradients of all micro-batches add up in .grad; each objective is divided by their number, so the sum is the
    # gradient of the mean over the whole batch, the same as one big batch would give.
    out = []
    for i, b in enumerate(micro_batches):
        # In DDP the gradients need syncing only on the last micro-batch (nanoGPT): the others accumulate locally.
        last = i == len(micro_batches) - 1
        sync = run.model.no_sync() if run.model is not run.net and not last else nullcontext()
        with sync, torch.autocast(b['x0'].device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            objective, loss, info = loss_fn(b)
            run.scaler.scale(objective / len(micro_batches)).backward()
        out.append((loss.detach(), info))
    # Every rank must take the same decision about skipping, so the loss is averaged over ranks first.
    step_loss = torch.stack([l.mean() for l, _ in out]).mean()
    if dist.is_initialized():
        dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        for group in (extra_optimizer.param_groups if extra_optimizer else []):
            for p in group['params']:
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    if not torch.isfinite(step_loss):
        if extra_optimizer is not None:
            extra_optimizer.zero_grad(set_to_none=True)
        skip_step(run)
        return None
    apply_update(run, args, extra_optimizer if step_extra else None)
    if extra_optimizer is not None:
        extra_optimizer.zero_grad(set_to_none=True)
    return out


def apply_update(run, args, extra_optimizer=None):
    """The gradient step (Ho et al. 2020, Alg. 1 line 5): undo fp16 loss scaling so that clipping sees the true
    gradients (a no-op when the scaler is off), clip, step, clear the gradients, update the EMA."""
    run.skipped = 0
    run.scaler.unscale_(run.optimizer)
    run.grad_norm = torch.nn.utils.clip_grad_norm_(run.net.parameters(), args.grad_clip if args.grad_clip > 0 else float('inf'))
    run.scaler.step(run.optimizer)
    if extra_optimizer is not None:
        run.scaler.step(extra_optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    update_ema(run.ema, run.net, ema_decay(run.step, args.ema_decay))


def skip_step(run):
    """A non-finite loss (fp16 overflow, a bad batch, a blown-up run): no update; stop after 10 in a row."""
    # The gradients of the bad step are dropped; with fp16 the loss scale halves, as GradScaler would.
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler.is_enabled():
        run.scaler.update(run.scaler.get_scale() / 2)
    run.skipped += 1
    warnings.warn(f'step {run.step}: non-finite loss, update skipped ({run.skipped} in a row)')
    if run.skipped >= 10:
        raise SystemExit(f'error: the loss was not finite for 10 steps in a row (steps {run.step - 9}..{run.step}). '
                         'The weights were not updated by those steps. Lower --lr, use --amp bf16 or none, or check '
                         'the data for NaNs; then --resume auto continues from the last checkpoint.')


# ----------------------------------------------------------------------------------------------------
# Batches: which images each micro-batch trains on, a pure function of (seed, step, rank, micro).

def step_generator(args, step, rank, micro=0, stream=0):
    """The generator of one micro-batch: a pure function of (seed, step, rank), so resuming is exact.
    stream 0 draws the image indices (consumed by the loader), stream 1 the rest (augment, dropout, sigma, noise)."""
    return torch.Generator().manual_seed((((args.seed * 1_000_003 + step) * 4099 + rank) * 131 + micro) * 2 + stream)


def training_batches(args, dataset, train_index, rank, micro_batch, start_step, more_indices=None):
    """Iterator of (x0, y) for every micro-batch from start_step on. The indices come from the (seed, step, rank,
    micro) generators, so a resumed run reads exactly the images an uninterrupted one would have.
    more_indices(indices, generator): items to load after them (video.image_sources for joint training)."""
    # A generator, not a list: the DataLoader's workers prefetch from it, and each entry is a pure function of
    # (seed, step, rank, micro), so prefetching ahead never changes what a step trains on.
    def indices():
        for step in range(start_step, args.steps):
            for micro in range(args.grad_accum):
                g = step_generator(args, step, rank, micro, stream=0)
                index = train_index[torch.randint(len(train_index), (micro_batch,), generator=g)]
                # Extra items are drawn after the batch's own, so the batch is that of a run without them.
                yield torch.cat([index, more_indices(index, g)]) if more_indices else index
    return iter(data.make_loader(dataset, indices(), args.workers))


def load_batch(dataset, indices):
    """(x, y) of the given indices, streamed or in memory."""
    return next(iter(data.make_loader(dataset, [indices])))


def load_training_data(args):
    """The dataset and its (training, held-out) indices; image folders bigger than --memory-budget GB decoded are
    streamed from disk (data.py)."""
    dataset = data.load_dataset(args.dataset, data_dir=args.data_dir, split=args.split, resolution=args.resolution,
                                seed=args.seed, memory_budget=int(args.memory_budget * 2 ** 30))
    return dataset, *data.holdout_split(len(dataset), args.seed)


# ----------------------------------------------------------------------------------------------------
# The run folder: never reuse one silently, checkpoints that are always loadable, exact resume, the log.

def prepare_run_folder(args):
    """Create --out, refusing a folder that holds another run unless told what to do with it; returns
    (checkpoint path, checkpoint to resume from or None)."""
    # Checked before any data is read: a wrong --out must fail in a second, not after the dataset loads.
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f'error: --out {args.out!r} is a file; give a folder for the run')
    try:
        os.makedirs(args.out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=args.out, prefix='.write_test_'):
            pass
    except OSError as e:
        raise SystemExit(f'error: cannot write to --out {args.out!r}: {e.strerror or e}') from None
    lock = lock_run_folder(args.out)
    # --resume auto means: this folder's checkpoint if there is one, else a fresh start in this folder.
    ckpt_path = os.path.join(args.out, 'ckpt.pt')
    resume = ckpt_path if args.resume == 'auto' and os.path.exists(ckpt_path) else (None if args.resume == 'auto' else args.resume)
    has_run = os.path.exists(ckpt_path) or os.path.exists(os.path.join(args.out, 'log.jsonl'))
    continues_it = resume is not None and os.path.abspath(resume) == os.path.abspath(ckpt_path)
    # A folder with a checkpoint or a log holds someone's run: a new run there would replace its checkpoint
    # and mix two runs in one log. Only an explicit --overwrite, or --resume auto in a folder whose run never
    # reached its first checkpoint, starts afresh there; the previous run's files are then set aside, not deleted,
    # once the new run has its data and model (set_aside_previous_run), so a typo in a flag loses nothing.
    if has_run and not continues_it and args.resume != 'auto' and not args.overwrite:
        raise SystemExit(f'error: {args.out} already holds a run (ckpt.pt / log.jsonl). Use --resume auto to continue '
                         f'it, a new --out for a new run, or --overwrite to replace it (its files are kept aside).')
    return ckpt_path, resume, has_run and not continues_it, lock


# The files a run writes in its folder, by exact name: --overwrite sets aside these and nothing else.
RUN_FILES = re.compile(r'(ckpt\.pt|log\.jsonl|log\.png|nearest_pairs\.png|samples_\d{7}\.(png|gif)|ckpt_\d{7}\.pt)')


def set_aside_previous_run(out):
    """Move the previous run's files (RUN_FILES, nothing else) into a new subfolder of `out`, deleting nothing."""
    names = sorted(n for n in os.listdir(out) if RUN_FILES.fullmatch(n))
    if not names:
        return None
    folder = tempfile.mkdtemp(prefix='previous_run_', dir=out)
    for name in names:
        os.replace(os.path.join(out, name), os.path.join(folder, name))
    print(f'the previous run in {out} ({len(names)} files) was moved to {folder}; delete it when no longer needed')
    return folder


def lock_run_folder(out):
    """An exclusive lock on OUT/.lock for the life of the process (released by the OS even on kill -9), so a
    second run started into the same folder is refused instead of mixing its checkpoint and log with the first's.
    Returns the open lock file (keep it), or None where fcntl does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(os.path.join(out, '.lock'), 'a+')
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise SystemExit(f'error: another run is using {out} ({holder or "a running process"}); wait for it to end, or '
                         'give a new --out') from None
    f.seek(0)
    f.truncate()
    f.write(f'process {os.getpid()} on {socket.gethostname()}')
    f.flush()
    return f


@torch.no_grad()
def weights_problem(run, probe_loss=None):
    """Why the weights must not be saved, or None: non-finite, exploded past MAX_WEIGHT, or (with probe_loss, the
    loss of a module on a fixed batch) finite weights that no longer compute a finite loss. Raw and EMA."""
    # Both the raw weights (resumed from) and the EMA (sampled): either one broken makes the checkpoint useless.
    for name, module in (('weights', run.net), ('EMA weights', run.ema)):
        for key, p in module.state_dict().items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                return f'the {name} are not finite ({key})'
            if p.is_floating_point() and p.numel() and p.abs().max() > MAX_WEIGHT:
                return f'the {name} exploded (max |{key}| = {p.abs().max().item():.3g} > {MAX_WEIGHT:g})'
        if probe_loss is not None:
            # In eval mode: no dropout, so the probe draws nothing from the RNG an exact resume restores.
            training = module.training
            loss = probe_loss(module.eval())
            module.train(training)
            if not torch.isfinite(loss).all():
                return f'the {name} are finite but give a non-finite loss on a fixed batch (they no longer compute)'
    return None


def write_checkpoint(path, state):
    """runs.atomic_write of a torch.save dict: a crash never leaves half a checkpoint, and a full disk removes the
    temporary file and leaves the previous checkpoint as it was."""
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG):
            raise disk_full(path, e, f'; {path} still holds the previous checkpoint' if os.path.exists(path) else '') from None
        raise SystemExit(f'error: cannot write checkpoint {path}: {e}') from None


def save_checkpoint(run, config, args, setup, last_good, probe_loss=None):
    """Save the run, unless its weights are broken (weights_problem): then the last good checkpoint stays and the
    run stops with the reason (every rank checks, so all stop together). While steps are being skipped (the loss
    is not finite) a good checkpoint is never replaced: the run is not saved and goes on (skip_step stops it
    after 10). Returns the step the checkpoint now holds (last_good: 0 while none has been written)."""
    problem = weights_problem(run, probe_loss)
    if problem:
        raise SystemExit(f'error: step {run.step}: {problem}. Not saved: {setup.ckpt_path} still holds step {last_good}. '
                         'Lower --lr (or --warmup longer), then --resume auto --allow-changes.')
    if run.skipped and last_good:
        warnings.warn(f'step {run.step}: not saved: the last {run.skipped} step(s) had a non-finite loss, and '
                      f'{setup.ckpt_path} holds step {last_good}, the last step known to be good')
        return last_good
    # The RNG of every rank is gathered (a collective: all ranks call it), then rank 0 writes the file.
    rng = rng_states(setup.device, setup.world)
    if setup.is_main:
        state = dict(run.state_dict(), config=config, args={k: v for k, v in vars(args).items() if k != 'device_obj'}, rng=rng)
        write_checkpoint(setup.ckpt_path, state)
        if run.step == getattr(args, 'save_early', 0):                 # a kept early model (autoguidance)
            write_checkpoint(os.path.join(args.out, f'ckpt_{run.step:07d}.pt'), state)
    PROGRESS['saved'] = run.step
    return run.step


def saved_step(run, setup):
    """The step OUT/ckpt.pt holds at the start: the resumed step when continuing it, else 0 (none written yet)."""
    continues = setup.resume and os.path.abspath(setup.resume) == os.path.abspath(setup.ckpt_path)
    PROGRESS['saved'] = run.step if continues else 0
    return PROGRESS['saved']


def resume_run(run, config, args, setup, resume_flags=RESUME_FLAGS):
    """Restore every owner's state from a checkpoint of the same configuration. Flags that change what an
    uninterrupted run would do (resume_flags, the number of processes) must match unless --allow-changes."""
    path = setup.resume
    ckpt = checkpoints.load_checkpoint(path, setup.device)
    # Another task's checkpoint (a classifier, an autoencoder, a diffusion model): said first, in one line.
    task = ckpt['config'].get('task') if isinstance(ckpt.get('config'), dict) else None
    if task != config['task']:
        raise SystemExit(f"error: {path} is {'an' if str(task)[:1] in 'aeiou' else 'a'} {task} checkpoint, not a "
                         f"{config['task']} run; resume it with its own program, or give a new --out")
    diff = checkpoints.config_mismatch(ckpt['config'], config)
    if diff:
        raise SystemExit(f'error: {path} was trained with another configuration:\n  ' + '\n  '.join(diff) +
                         '\nUse the same flags as that run, or a new --out.')
    # The config (network, diffusion, data) must match exactly; the optimisation flags may change only knowingly.
    old = ckpt.get('args', {})
    # Flags missing from an old checkpoint's args are not compared (older runs stored fewer).
    changed = [f"--{k.replace('_', '-')}: run had {old[k]!r}, now {getattr(args, k)!r}" for k in resume_flags
               if k in old and old[k] != getattr(args, k)]
    if len(ckpt.get('rng', [])) not in (0, setup.world):
        changed.append(f"processes: run had {len(ckpt['rng'])}, now {setup.world}")
    if changed and not args.allow_changes:
        raise SystemExit(f'error: resuming {path} with other settings than the run used:\n  ' + '\n  '.join(changed) +
                         '\nUse the run\'s values, or --allow-changes to continue with these (no longer identical '
                         'to an uninterrupted run).')
    if changed:
        print('resuming with changed settings (the result is no longer that of an uninterrupted run):\n  ' + '\n  '.join(changed))
    # A checkpoint stripped to weights (for sharing) samples fine but cannot continue a run exactly.
    missing = [k for k in ('optimizer', 'scaler', 'step', 'rng') if k not in ckpt]
    if missing:
        raise SystemExit(f'error: {path} cannot be resumed: it lacks {", ".join(missing)} (a sampling-only checkpoint?)')
    check_resumed_step(ckpt['step'], path, args)
    # Each owner restores its own state; this rank's dropout RNG comes last, as the run saved it.
    run.load_state_dict(ckpt)
    set_rng_state(ckpt['rng'][dist.get_rank() % len(ckpt['rng']) if dist.is_initialized() else 0], setup.device)
    if setup.is_main:
        print(f'resumed from {path} at step {run.step}')
    return run.step


def check_resumed_step(step, path, args):
    """The checkpoint's step is a count of steps done, below --steps (equal: only the end of the run is left, e.g. a
    final grid a kill interrupted); a step flag it has already passed must have fired."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise SystemExit(f'error: {path} holds step {step!r}, not a number of steps done (an edited file?)')
    if step > args.steps:
        raise SystemExit(f'error: {path} is already at step {step}, beyond --steps {args.steps}: nothing to train. '
                         f'Give --steps above {step} to continue it.')
    if step == args.steps:
        print(f'{path} is already at step {step} = --steps: nothing to train; only what the run does at its end '
              '(a final grid a kill interrupted, the final reports) is done. Give a larger --steps to train on.')
    early = getattr(args, 'save_early', 0)
    kept = os.path.join(args.out, f'ckpt_{early:07d}.pt')
    if early and early <= step and not os.path.exists(kept):
        raise SystemExit(f'error: --save-early {early} is before the resumed step {step} and {kept} does not exist: '
                         'it would never be saved. Drop --save-early, or start a new run.')


# Dropout draws from the global torch RNG (not from the step generators), so its state is part of the
# checkpoint; each rank has its own, seeded seed + rank.
def rng_states(device, world):
    """Every rank's dropout RNG (CPU and CUDA), gathered to rank 0 for an exact resume."""
    rng = {'cpu': torch.get_rng_state()}
    if device.type == 'cuda':
        rng['cuda'] = torch.cuda.get_rng_state(device)
    if world == 1:
        return [rng]
    states = [None] * world
    dist.all_gather_object(states, rng)
    return states


def set_rng_state(rng, device):
    torch.set_rng_state(rng['cpu'].cpu())
    if 'cuda' in rng and device.type == 'cuda':
        torch.cuda.set_rng_state(rng['cuda'].cpu(), device)


def parse_record(line):
    """A log line as a dict; a line torn by a kill mid-write reads as {} (dropped on resume)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return {}


class RunLog:
    """log.jsonl: one JSON record per line. On resume from step K, records after K (written by the interrupted
    run after its last checkpoint) are dropped first, so every step appears once."""

    def __init__(self, path, step):
        self.path = path
        # Keep the records up to the step we restart from; an interrupted run may have logged beyond it. The
        # rewrite is atomic: a crash while rewriting must not lose the old records.
        if os.path.exists(path):
            with open(path) as f:
                keep = ''.join(line for line in f if line.strip() and parse_record(line).get('step', math.inf) <= step)
            try:
                atomic_write(path, lambda tmp: open(tmp, 'w').write(keep))
            except OSError as e:
                raise disk_full(path, e) if e.errno in (errno.ENOSPC, errno.EFBIG) else e
        self.file = open(path, 'a')

    # Flushed per record: a killed run loses at most the line being written.
    def write(self, record):
        try:
            self.file.write(json.dumps(record) + '\n')
            self.file.flush()
        except OSError as e:
            raise disk_full(self.path, e) if e.errno in (errno.ENOSPC, errno.EFBIG) else e

    def close(self):
        self.file.close()


def open_log(run, setup, args):
    """The run's log (rank 0 only; None on the other ranks). Called once data and model are ready: a run that
    replaces a previous one (--overwrite) sets that run's files aside here, not before its flags have proved good."""
    if not setup.is_main:
        return None
    if setup.replaces:
        set_aside_previous_run(args.out)
    return RunLog(os.path.join(args.out, 'log.jsonl'), run.step)


# ----------------------------------------------------------------------------------------------------
# The end of a run.

def check_replicas(run, world, log, is_main):
    """DDP keeps the replicas identical by averaging gradients; check it, since a silent divergence (a buffer
    updated on one rank only, a rank-dependent branch) ruins a run without any error."""
    # One float64 sum per replica is enough to see a divergence, and cheap to gather.
    checksum = torch.stack([p.detach().double().sum() for p in run.net.parameters()]).sum().cpu()
    sums = [None] * world
    dist.all_gather_object(sums, checksum.item())
    if is_main:
        log.write({'step': run.step, 'ddp_param_checksums': sums})
        if max(sums) - min(sums) > 1e-6 * (1 + abs(sums[0])):
            warnings.warn(f'DDP replicas diverged: parameter checksums {sums}')


def finish_run(run, setup, log, last_good=None):
    """DDP replica check and shutdown, the log closed; a run whose last steps were all skipped fails loudly."""
    if setup.world > 1:
        check_replicas(run, setup.world, log, setup.is_main)
        dist.barrier()
        dist.destroy_process_group()
    if log:
        log.close()
    if setup.lock:
        setup.lock.close()                                  # the folder is free for the next run
    if run.skipped:
        held = (f'holds the weights from before them (step {run.step - run.skipped} of training)'
                if last_good in (None, run.step) else f'holds step {last_good}, the last good one')
        raise SystemExit(f'error: the last {run.skipped} step(s) had a non-finite loss and were skipped; the checkpoint '
                         f'{held}. Lower --lr or check the data, then --resume auto --allow-changes.')


def interrupted_message():
    """What Ctrl-C says instead of a traceback: the step reached, the step the checkpoint holds, how to go on."""
    run, ckpt, saved = PROGRESS.get('run'), PROGRESS.get('ckpt'), PROGRESS.get('saved')
    if run is None:
        return 'interrupted before training started; no checkpoint was written'
    held = (f'{ckpt} holds step {saved}' if saved else f'{ckpt} is as it was' if saved is None else
            f'no checkpoint yet ({ckpt} not written by this run)')
    return f'interrupted at step {run.step}; {held}; --resume auto continues'


def run_command(main, parse_args):
    """The command line's entry: a missing dataset or a bad value is its message, a full disk says so, Ctrl-C
    says where the run stands (exit 130, as a shell reports SIGINT). A checkpoint write is atomic (atomic_write),
    so an interrupt never leaves half a checkpoint."""
    PROGRESS.clear()
    try:
        main(parse_args())
    except KeyboardInterrupt:
        print(interrupted_message(), file=sys.stderr)
        raise SystemExit(130) from None
    except (data.DatasetNotFoundError, ValueError) as e:     # a missing dataset, a bad flag value: the message only
        raise SystemExit(f'error: {e}')
    except OSError as e:                                     # a full disk while writing a grid or the log
        if e.errno not in (errno.ENOSPC, errno.EFBIG):
            raise
        raise SystemExit(f'error: disk full ({e}); the last checkpoint is intact. Free space, then --resume auto.')
