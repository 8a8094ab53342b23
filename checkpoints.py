"""
The checkpoint format: written and read in this one file, so its schema is seen once.

A checkpoint is one `torch.save` dict, loaded with `torch.load(..., weights_only=True)` (it can hold tensors,
numbers, strings, lists and dicts, nothing that runs when loaded), written by runs.atomic_write (a crash never
leaves half a file):

    config      everything needed to rebuild the model and sample it as trained (make_config):
        task        'diffusion' | 'superres' | 'classifier' | 'autoencoder': what the network learnt
        model       'unet' | 'dit' | 'edm2' | 'classifier' | 'autoencoder': the class (NETWORKS; never a name chosen by the file)
        config_name the named configuration it started from (unet.UNET_CONFIGS, dit.DIT_CONFIGS, ...)
        net         the constructor's keyword arguments (UNet.config, DiT.config, ...): build_network(config)
        diffusion   {prediction, schedule, t_sampler, sigma_data, T (discrete schedules), P_mean/P_std (a
                    log-normal other than EDM's)}; {} for an autoencoder
        data        {dataset, resolution, channels, num_classes, class_names, frames (0 for images)}
        superres    --task superres: {low_res, noise_aug_max, aug_dim, upsample} (cascade.py)
        autoencoder latent diffusion: {path, sha256, config (with the latent scale), latent_shape} of the
                    autoencoder the latents came from (latent_record); sample_shape is then the latents'
    model, ema  the raw and EMA weights (state_dicts); sampling reads 'ema'
    optimizer, scaler, step, diffusion (importance-sampling history), rng (one per rank)
                the state an exact resume restores (runs.Trainee, runs.resume_run); an autoencoder adds
                discriminator and gan_optimizer
    args        the flags of the run (sample.py takes its grid settings as defaults)

Writers: network_config, classifier_config, superres_config, autoencoder_config -> (config_name, net kwargs);
diffusion_config, data_config, make_config(...) -> the config dict; latent_record(...). Readers: load_checkpoint, build_network, build_diffusion,
load_model, sample_shape, load_autoencoder, latent_decoder. Every reading failure is a SystemExit that says what
the file is and what to do, never a KeyError from deep inside: a checkpoint is user input.

    net, diffusion, config = load_model('runs/default/ckpt.pt')
"""
import hashlib
import inspect
import math
import os
import pickle

import torch
from torch.overrides import TorchFunctionMode

import iddpm
import vae
import vdm
from classifier import CLASSIFIER_CONFIGS, NoiseConditionalClassifier
from diffusion import NOISE_SCHEDULES, PREDICTIONS, Diffusion, EDMSchedule
from dit import DIT_CONFIGS, DiT
from edm2 import EDM2_CONFIGS, EDM2UNet, resolution_problem as edm2_resolution_problem
from unet import UNET_CONFIGS, UNet

NETWORKS = {'unet': UNet, 'dit': DiT, 'classifier': NoiseConditionalClassifier, 'edm2': EDM2UNet}   # config['model'] -> class; config['net'] its kwargs
CHECKPOINT_KEYS = ('config', 'model', 'ema')    # what every training checkpoint holds, at least
# The natural schedule of each parameterisation (diffusion.py): cosine VP for eps/x0/v, EDM's, the flow's.
DEFAULT_SCHEDULE = {'eps': 'cosine', 'x0': 'cosine', 'v': 'cosine', 'edm': 'edm', 'flow': 'flow'}
# The network size train.py builds when --config is not given (unet.UNET_CONFIGS / dit.DIT_CONFIGS names).
DEFAULT_CONFIG = {'unet': 'micro', 'dit': 'DiT-cpu'}


def sha256_of(path):
    """The file's SHA-256: a latent model names its autoencoder by content, not only by path."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Writing: the network of each task, then the config every checkpoint carries.

def resolution_problem(model, config_name, r):
    """Why image size r does not suit the network, or None. The U-Net halves the image once per level and the DiT
    cuts it into patches: checked before building, so the message names the constraint instead of a shape error
    from deep inside the network."""
    if model in EDM2_CONFIGS:                                           # --model edm2-xs, ... (edm2.py)
        return edm2_resolution_problem(len(EDM2_CONFIGS[model]['channel_mult']), r)
    if model == 'unet':
        name = config_name or DEFAULT_CONFIG['unet']
        levels = len(UNET_CONFIGS[name]['channel_mult'])
        factor = 2 ** (levels - 1)                                      # one halving per level below the first
        if r % factor:
            return (f"resolution {r} does not suit U-Net '{name}': its {levels} levels halve the image {levels - 1} "
                    f'times, so it needs a multiple of {factor}')
        return None
    name = config_name or DEFAULT_CONFIG['dit']
    patch = DIT_CONFIGS[name]['patch_size']
    if r % patch:
        return f"resolution {r} does not suit DiT '{name}': it needs a multiple of its patch size {patch}"
    return None


def network_config(args, dataset, num_classes, aug_dim):
    """(config name, constructor arguments) of the U-Net or DiT for this dataset (its image size checked first)."""
    r = dataset.resolution
    problem = resolution_problem(args.model, args.config, r)
    if problem:
        raise SystemExit(f'error: {problem}')
    if args.model == 'unet':
        name = args.config or DEFAULT_CONFIG['unet']
        net = dict(UNET_CONFIGS[name], in_channels=dataset.channels, image_size=r, num_classes=num_classes, aug_dim=aug_dim)
        if args.dropout is not None:
            net['dropout'] = args.dropout
        if args.model_channels is not None:
            net['model_channels'] = args.model_channels
        return name, UNet(**net).config
    if args.model in EDM2_CONFIGS:                  # the EDM2 U-Net: its name is the configuration
        net = dict(EDM2_CONFIGS[args.model], in_channels=dataset.channels, image_size=r, num_classes=num_classes)
        return args.model, EDM2UNet(**net).config
    name = args.config or DEFAULT_CONFIG['dit']
    return name, DiT(**dict(DIT_CONFIGS[name], input_size=r, in_channels=dataset.channels, num_classes=num_classes,
                            aug_dim=aug_dim)).config


def superres_config(args, dataset, num_classes):
    """An SR stage of a cascade: (name, the network with x_cond channels and level embedding, config['superres'])."""
    if getattr(dataset, 'frames', 0):
        raise SystemExit('error: --task superres works on images; this dataset holds videos')
    if args.low_res >= dataset.resolution:
        raise SystemExit(f'error: --low-res {args.low_res} must be smaller than the training resolution {dataset.resolution}')
    # Without noise augmentation the network gets no level input at all (aug_dim 0), as the papers' plain SR stage.
    aug_dim = args.noise_aug_dim if args.noise_aug_max > 0 else 0
    name, net = network_config(args, dataset, num_classes, aug_dim)
    net = dict(net, cond_channels=dataset.channels)             # x_cond: the upsampled low-res image
    return name, net, {'low_res': args.low_res, 'noise_aug_max': args.noise_aug_max, 'aug_dim': aug_dim,
                       'upsample': args.upsample}


def classifier_config(args, dataset):
    """The noise-conditional classifier (ADM's U-Net encoder half), sized for the images."""
    name = args.config or 'micro'
    if name not in CLASSIFIER_CONFIGS:
        raise ValueError(f"--config {name!r} is not a classifier configuration; choose from {', '.join(CLASSIFIER_CONFIGS)}")
    if not dataset.num_classes or args.unconditional:
        raise ValueError('--task classifier needs a dataset with class labels (and no --unconditional)')
    if getattr(dataset, 'frames', 0):
        raise ValueError('--task classifier trains on images; this dataset holds videos')
    net = NoiseConditionalClassifier(dataset.channels, dataset.num_classes, image_size=dataset.resolution,
                                     **CLASSIFIER_CONFIGS[name])
    return name, net.config


def autoencoder_config(args, dataset):
    """The vae.py configuration (--vae-config, --vq) for this dataset's channels, checked against its size."""
    name = args.vae_config or ('vq-f4' if args.vq else 'kl-f4')
    ae = vae.autoencoder_config(name, in_channels=dataset.channels, **({'kind': 'vq'} if args.vq else {}))
    factor = 2 ** (len(ae['channel_mult']) - 1)
    if dataset.resolution % factor:
        raise SystemExit(f"error: resolution {dataset.resolution} does not suit autoencoder '{name}': it needs a "
                         f'multiple of its downsampling factor {factor}')
    return name, ae


def diffusion_config(args):
    """config['diffusion']: the parameterisation, training schedule (T for the discrete ones) and noise-level sampler;
    train.py --objective adds the objective: 'hybrid'/'vlb' (iddpm.py, learned variances) or 'vdm' (vdm.py: schedule
    'vdm', its gamma 'linear'/'learned', learn_endpoints, fourier)."""
    objective = getattr(args, 'objective', 'simple')
    if objective == 'vdm':
        return {'prediction': 'eps', 'schedule': 'vdm', 't_sampler': args.t_sampler, 'sigma_data': args.sigma_data,
                'objective': 'vdm', 'gamma': args.vdm_schedule, 'learn_endpoints': not args.vdm_fixed_endpoints,
                'fourier': args.vdm_fourier}
    schedule = args.schedule or DEFAULT_SCHEDULE[args.prediction]
    return {'prediction': args.prediction, 'schedule': schedule, 't_sampler': args.t_sampler,
            'sigma_data': args.sigma_data, **({'T': args.T} if schedule in ('linear', 'cosine') else {}),
            # the log-normal of training sigmas when not EDM's (-1.2, 1.2): --P-mean/--P-std, --recipe edm2
            **({'P_mean': args.P_mean, 'P_std': args.P_std} if getattr(args, 'P_mean', None) is not None else {}),
            **({'objective': objective} if objective in iddpm.OBJECTIVES else {})}


def objective_network(net, model, channels, diffusion):
    """The network's kwargs for its objective: 2C outputs for a learned variance (U-Net out_channels, DiT
    learn_sigma; iDDPM Eq. 15's v), 4C x_cond channels for VDM's Fourier features."""
    if diffusion.get('objective') in iddpm.OBJECTIVES:
        net = dict(net, **({'out_channels': 2 * channels} if model == 'unet' else {'learn_sigma': True}))
    if diffusion.get('fourier'):
        net = dict(net, cond_channels=2 * len(vdm.FOURIER_EXPONENTS) * channels)
    return net


def data_config(dataset_name, dataset):
    """config['data']: what the images are (for latent diffusion the images, not the latents). dataset: anything
    with resolution, channels, num_classes (0: unconditional), and optionally class_names and frames."""
    return {'dataset': dataset_name, 'resolution': dataset.resolution, 'channels': dataset.channels,
            'num_classes': dataset.num_classes, 'class_names': list(getattr(dataset, 'class_names', None) or []),
            'frames': getattr(dataset, 'frames', 0)}


def make_config(task, model, config_name, net, data, diffusion=None, **extra):
    """The config stored in every checkpoint (schema in the module docstring). data: data_config(...); extra:
    'superres' or 'autoencoder' records (pretrained.py: 'pretrained', the published model's name)."""
    return {'task': task, 'model': model, 'config_name': config_name, 'net': net, **extra,
            'diffusion': diffusion or {}, 'data': data}


def latent_record(path, autoencoder, latent_shape):
    """config['autoencoder'] of a latent diffusion model: which file decodes its samples (by path and content),
    its config with the latent scale, and the latents' shape (what the network sees)."""
    return {'path': os.path.abspath(path), 'sha256': sha256_of(path), 'config': autoencoder.config,
            'latent_shape': list(latent_shape)}


# Older checkpoints recorded the training sigma distribution only when it was not EDM's: a missing value is EDM's.
IMPLIED = {'diffusion.P_mean': -1.2, 'diffusion.P_std': 1.2}


# Class names may be re-spelt (a renamed folder) without changing what was learnt, so they are not compared.
def config_mismatch(a, b, prefix=''):
    """Keys where two nested configs differ, as readable strings (a resume must rebuild the same model)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, IMPLIED.get(prefix + k)), b.get(k, IMPLIED.get(prefix + k))
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_mismatch(va, vb, f'{prefix}{k}.')
        elif va != vb and k not in ('class_names', 'scale_factor', 'shift_factor'):   # latent scale: measured at the end
            out.append(f'{prefix}{k}: checkpoint has {va!r}, this run has {vb!r}')
    return out


# ----------------------------------------------------------------------------------------------------
# Reading.

# What a file is, from its first bytes: a wrong file is named ("a PNG image"), never torch's unpickling advice.
FILE_SIGNATURES = ((b'\x89PNG', 'a PNG image'), (b'\xff\xd8\xff', 'a JPEG image'), (b'GIF8', 'a GIF image'),
                   (b'BM', 'a BMP image'), (b'RIFF', 'a RIFF (WebP/WAV/AVI) file'), (b'%PDF', 'a PDF document'),
                   (b'\x93NUMPY', 'a NumPy .npy array'), (b'\x1f\x8b', 'a gzip archive'), (b'{', 'a JSON/text file'))
# Which task a caller may expect (load_checkpoint / load_model expect=), and which program writes each task.
EXPECT = {'diffusion': ('diffusion', 'superres'), 'base': ('diffusion',), 'superres': ('superres',),
          'classifier': ('classifier',), 'autoencoder': ('autoencoder',), 'discrete': ('discrete',), 'text': ('text',)}
WRITTEN_BY = {'diffusion': 'a diffusion model (train.py)', 'superres': 'a super-resolution stage (train.py --task superres)',
              'classifier': 'a classifier checkpoint (train_classifier.py)',
              'autoencoder': 'an autoencoder checkpoint (train_autoencoder.py)',
              'discrete': 'a discrete token model (train_discrete.py)',
              'text': 'a text-to-image model (train_text.py)'}
WANTED = {'diffusion': 'a diffusion model', 'base': 'a diffusion model that samples from noise alone',
          'superres': 'a super-resolution stage', 'classifier': 'a classifier', 'autoencoder': 'an autoencoder',
          'discrete': 'a discrete token model', 'text': 'a text-to-image model'}
TASK_MODELS = {'diffusion': ('unet', 'dit', 'edm2'), 'superres': ('unet', 'dit'), 'classifier': ('classifier',),
               'autoencoder': ('autoencoder',)}   # 'discrete' is checked by sample_discrete.check_discrete_config
# A config is refused before anything is built when its network would exceed this many parameters (8 GB of
# float32 weights; DiT-XL/2, the largest published model here, has 675M): a hand-edited width is not a 43 s build.
MAX_PARAMETERS = 2 * 10 ** 9
MAX_RESOLUTION = 4096   # pixels per side of config.data (the image a sampler writes)
MAX_STEP = 10 ** 9        # a training step beyond this (or below 0) is a damaged or edited file


def describe_file(path):
    """'a PNG image', 'a NumPy .npz archive', ... for a file that is not a checkpoint, else None."""
    try:
        with open(path, 'rb') as f:
            head = f.read(8)
    except OSError:
        return None
    if not head:
        return 'an empty file'
    for magic, what in FILE_SIGNATURES:
        if head.startswith(magic):
            return what
    if head.startswith(b'PK'):                                   # torch.save and np.savez both write zips
        import zipfile
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if names and all(n.endswith('.npy') for n in names):
            return 'a NumPy .npz archive'
        if not any(n.endswith('data.pkl') for n in names):
            return 'a zip archive'
    return None


def _number(v, integer=False):
    return not isinstance(v, bool) and isinstance(v, (int,) if integer else (int, float)) and math.isfinite(v)


# Ops that keep a tensor's shape when the other operands are numbers (CLIP-style init: randn(...) / c; copies).
_SHAPE_KEEPING = {'clone', 'detach', 'contiguous', 'float', 'div', 'mul', 'add', 'sub', 'pow', 'neg', 'exp', 'sqrt',
                  'sin', 'cos', 'log', 'true_divide',
                  '__truediv__', '__mul__', '__add__', '__sub__', '__pow__', '__neg__', '__rmul__', '__radd__'}


class _ShapesOnly(TorchFunctionMode):
    """On meta tensors, in-place initialisers (init.normal_, zero_, ...) and element-wise ops with numbers return
    their input and random/constant factories are torch.empty: only parameter shapes are wanted, and the first
    such op on 'meta' costs seconds (torch imports its compiler for the reference kernels)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name, target = getattr(func, '__name__', ''), args[0] if args else kwargs.get('tensor')
        if name in ('randn', 'rand', 'zeros', 'ones') and func is getattr(torch, name):   # values unused: an empty tensor
            return torch.empty(*args, **{k: v for k, v in kwargs.items() if k != 'generator'})
        if torch.is_tensor(target) and target.is_meta and (
                (name.endswith('_') and not name.startswith('_'))
                or (name in _SHAPE_KEEPING and all(isinstance(a, (int, float)) for a in args[1:]) and not kwargs)):
            return target
        return func(*args, **kwargs)


def parameter_count(cls, net):
    """Parameters of cls(**net), built on the 'meta' device: shapes only, no memory and (with _ShapesOnly) no
    time, so an 8192-wide edit is measured in milliseconds instead of built for minutes."""
    with torch.device('meta'), _ShapesOnly():
        return sum(p.numel() for p in cls(**net).parameters())


def config_problem(config, ckpt=None):
    """Why a checkpoint's config (and step) cannot be used, naming the field, or None. Checked before anything is
    built: the file is user input (a hand-edited key must be a message, not a TypeError from UNet.__init__)."""
    if not isinstance(config, dict):
        return f'config is a {type(config).__name__}, not a dict'
    task = config.get('task', 'diffusion')
    if task not in WRITTEN_BY:
        return f"config.task is {task!r}; known: {', '.join(WRITTEN_BY)}"
    if ckpt is not None and 'step' in ckpt and not (_number(ckpt['step'], True) and 0 <= ckpt['step'] <= MAX_STEP):
        return f"step is {ckpt['step']!r}; a training step is a whole number from 0 to {MAX_STEP:.0e}"
    if task in ('discrete', 'text'):
        return None                     # sample_discrete.check_discrete_config / sample_text.check_text_config read the rest
    model, net = config.get('model'), config.get('net')
    if model not in TASK_MODELS[task]:
        return f"config.model is {model!r}, but a {task} checkpoint holds a {' or '.join(TASK_MODELS[task])}"
    if not isinstance(net, dict):
        return f'config.net is a {type(net).__name__}, not a dict of constructor arguments'
    cls = vae.Autoencoder if model == 'autoencoder' else NETWORKS[model]
    if model != 'autoencoder':          # Autoencoder(config, **overrides) checks its own keys (built below)
        params = inspect.signature(cls.__init__).parameters
        unknown = sorted(k for k in net if k not in params or k == 'self')
        if unknown:
            return f"config.net has {', '.join(map(repr, unknown))}, not arguments of {cls.__name__}"
        missing = [k for k, p in params.items() if k != 'self' and p.default is p.empty and k not in net
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if missing:
            return f"config.net lacks {', '.join(map(repr, missing))} ({cls.__name__} needs them)"
    # Sizes, counts and widths are never negative (num_classes -1 would index the label table from its end).
    negative = [k for k, v in net.items() if _number(v) and v < 0]
    if negative:
        return f'config.net.{negative[0]} is {net[negative[0]]!r}; it must be >= 0'
    d = config.get('data')
    if not isinstance(d, dict):
        return 'config.data is missing or not a dict'
    for key, low, high in (('resolution', 1, MAX_RESOLUTION), ('channels', 1, 4), ('num_classes', 0, 10 ** 6),
                           ('frames', 0, 10 ** 4)):
        if (key in d or key != 'frames') and not (_number(d.get(key), True) and low <= d[key] <= high):
            return f'config.data.{key} is {d.get(key)!r}; it must be a whole number from {low} to {high}'
    names = d.get('class_names') or []   # an unconditional run on labelled data keeps the names: compared when conditional
    if not isinstance(names, list) or (names and d['num_classes'] and len(names) != d['num_classes']):
        return (f"config.data.class_names has {len(names) if isinstance(names, list) else repr(names)} names for "
                f"{d['num_classes']} classes")
    if task != 'autoencoder':
        diff = config.get('diffusion')
        if not isinstance(diff, dict):
            return 'config.diffusion is missing or not a dict'
        if diff.get('prediction') not in PREDICTIONS:
            return f"config.diffusion.prediction is {diff.get('prediction')!r}; known: {', '.join(PREDICTIONS)}"
        if diff.get('schedule') not in NOISE_SCHEDULES and not (diff.get('schedule') == 'vdm' and diff.get('gamma') in vdm.GAMMAS):
            return f"config.diffusion.schedule is {diff.get('schedule')!r}; known: {', '.join(NOISE_SCHEDULES)}"
        if diff.get('t_sampler', 'uniform') not in ('uniform', 'low_discrepancy', 'importance'):
            return f"config.diffusion.t_sampler is {diff.get('t_sampler')!r}; known: uniform, low_discrepancy, importance"
        if not (_number(diff.get('sigma_data')) and diff['sigma_data'] > 0):
            return f"config.diffusion.sigma_data is {diff.get('sigma_data')!r}; it must be a number > 0"
        if diff.get('T') is not None and not (_number(diff['T'], True) and 2 <= diff['T'] <= 10 ** 6):
            return f"config.diffusion.T is {diff['T']!r}; it must be a whole number from 2 to 1e6"
        if diff.get('P_mean') is not None and not (_number(diff['P_mean']) and _number(diff.get('P_std')) and diff['P_std'] > 0):
            return f"config.diffusion.P_mean/P_std are {diff['P_mean']!r}/{diff.get('P_std')!r}; numbers, P_std > 0"
    try:
        size = parameter_count(cls, net)
    except Exception as e:                                       # a value the constructor refuses or cannot use
        return f'config.net does not describe a {cls.__name__} ({type(e).__name__}: {str(e)[:200]})'
    if size > MAX_PARAMETERS:
        return (f'config.net describes a {cls.__name__} of {size / 1e9:.1f} billion parameters (over the bound of '
                f'{MAX_PARAMETERS / 1e9:.0f} billion, {4 * size / 2 ** 30:.0f} GiB of weights): an edited or damaged file')
    return None


# weights_only=True refuses pickled code: a downloaded checkpoint can hold tensors, numbers, strings, lists
# and dicts, nothing that runs when loaded. map_location lets a GPU checkpoint load on a CPU-only machine.
def load_checkpoint(path, device='cpu', expect=None):
    """Load with weights_only=True (a checkpoint cannot run code), check that it is a training checkpoint with a
    usable config (config_problem), and, given expect (a key of EXPECT: 'diffusion', 'base', 'superres',
    'classifier', 'autoencoder', 'discrete'), that it is that kind of checkpoint."""
    if os.path.isdir(path):
        raise SystemExit(f'error: checkpoint {path!r} is a folder; give the ckpt.pt file inside a run folder')
    if not os.path.isfile(path):
        raise SystemExit(f'error: checkpoint {path!r} does not exist')
    what = describe_file(path)
    if what:
        raise SystemExit(f'error: {path!r} is not a checkpoint ({what}); give a ckpt.pt written by train.py')
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:                                       # truncated, not a checkpoint, or unsafe content
        # torch's own text suggests weights_only=False (running the file's code): it is never shown.
        if isinstance(e, pickle.UnpicklingError) and 'global' in str(e).lower():
            raise SystemExit(f'error: {path!r} holds Python objects beyond tensors, numbers and strings, which could '
                             'run code when loaded; it is not a train.py checkpoint and is not read') from None
        first = str(e).splitlines()[0].split('. ')[0][:200] if str(e) else ''
        reason = '' if isinstance(e, pickle.UnpicklingError) else f' ({type(e).__name__}: {first})'
        raise SystemExit(f'error: cannot read {path!r} as a checkpoint{reason}: it is not a file written by '
                         'train.py, or it is incomplete') from None
    # A state_dict saved alone, or a list: readable by torch, but not something we can rebuild a model from.
    # Messages name the file and what it holds instead, so a wrong file is recognised at once.
    if not isinstance(ckpt, dict):
        raise SystemExit(f'error: {path!r} holds a {type(ckpt).__name__}, not a train.py checkpoint '
                         f'(a dict with {", ".join(CHECKPOINT_KEYS)})')
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    config = ckpt.get('config')
    if not missing and isinstance(config, dict):
        missing = [f'config.{k}' for k in ('model', 'net', 'diffusion', 'data') if not isinstance(config.get(k), (dict, str))]
    elif not missing:
        missing = ['config (a dict)']
    if missing:
        raise SystemExit(f'error: {path!r} is not a complete train.py checkpoint: missing {", ".join(missing)}'
                         + (' (it looks like a bare state_dict: save the dict train.py writes)' if 'config' in
                            ', '.join(missing) and all(torch.is_tensor(v) for v in ckpt.values()) else ''))
    task = config.get('task', 'diffusion')
    if expect is not None and task in WRITTEN_BY and task not in EXPECT[expect]:
        raise SystemExit(f'error: {path!r} is {WRITTEN_BY[task]}, not {WANTED[expect]}')
    problem = config_problem(config, ckpt)
    if problem:
        raise SystemExit(f'error: {path!r} has an unusable config: {problem}')
    return ckpt


# config['net'] is exactly the constructor's keyword arguments (UNet.config / DiT.config), so a checkpoint
# rebuilds the same architecture without any flag.
def build_network(config):
    """Rebuild a network from the config stored in a checkpoint (its class and constructor arguments), after
    config_problem (a config from a file is user input; a clear SystemExit instead of a TypeError)."""
    # The class comes from a fixed table, never from a name in the file: a checkpoint cannot pick code to run.
    if config.get('model') not in NETWORKS:
        raise SystemExit(f"error: unknown network {config.get('model')!r} in the checkpoint; known: {', '.join(NETWORKS)}")
    problem = config_problem(config)
    if problem:
        raise SystemExit(f'error: unusable checkpoint config: {problem}')
    return in_memory_layout(NETWORKS[config['model']](**config['net']), config['model'])


def in_memory_layout(net, model):
    """The U-Net runs NHWC activations when its weights are channels-last (unet.UNet.forward): the same function,
    ~1.1x faster to train and 1.1-1.3x faster to sample at the small configs on CPU (issue 31, benchmarks/speed.py)."""
    return net.to(memory_format=torch.channels_last) if model == 'unet' else net


def build_diffusion(config):
    """The Diffusion (parameterisation, training schedule, noise-level sampler) the model was trained with."""
    # t_sampler matters only for training; older checkpoints without it default to uniform.
    d = config['diffusion']
    if d.get('objective') == 'vdm':            # vdm.py: the continuous-time bound, fixed or learned gamma(t)
        return vdm.VDMDiffusion(d['gamma'], learn_endpoints=d.get('learn_endpoints', True),
                                t_sampler=d.get('t_sampler', 'low_discrepancy'), fourier=d.get('fourier', False))
    # Discrete schedules record their number of steps T (train.py --T); older checkpoints used T = 1000.
    schedule = NOISE_SCHEDULES[d['schedule']](d['T']) if d.get('T') else d['schedule']
    if d.get('objective') in iddpm.OBJECTIVES:  # iddpm.py: learned variances (network with 2C outputs)
        return iddpm.LearnedVarianceDiffusion(schedule, d['objective'], d.get('t_sampler', 'uniform'))
    if d.get('P_mean') is not None:                              # EDM's log-normal with other (P_mean, P_std)
        schedule = EDMSchedule(d['P_mean'], d['P_std'])
    return Diffusion(schedule, d['prediction'], d.get('t_sampler', 'uniform'), d['sigma_data'])


# The EMA weights are what one samples (Karras et al. 2022 and DDPM sample the EMA); --raw reads the
# optimised weights, e.g. to see how much the average helps.
def load_model(path, device='cpu', use_ema=True, expect='diffusion'):
    """(network in eval mode, Diffusion, config) from a training checkpoint; config['args'] holds the run's flags.
    expect: the kind of checkpoint the caller needs (EXPECT; 'diffusion' takes a base model or an SR stage,
    'base' only a base model, 'classifier' a noise-conditional classifier, None any network); another kind is
    refused naming what the file is ("a classifier checkpoint (train_classifier.py), not a diffusion model").

    Weights that are not finite are refused here: sampling them gives NaN images that would be written as
    black PNGs."""
    ckpt = load_checkpoint(path, device, expect)
    config = dict(ckpt['config'], args=ckpt.get('args', {}))
    if config['model'] not in NETWORKS:            # expect=None let an autoencoder or token model through: own loaders
        raise SystemExit(f"error: {path!r} is {WRITTEN_BY[config.get('task', 'diffusion')]}, not a network load_model "
                         'builds (load_autoencoder, sample_discrete.load_discrete_model read those)')
    net = in_memory_layout(NETWORKS[config['model']](**config['net']).to(device), config['model'])
    # strict loading: a missing or extra key means the file and its config disagree, never silently ignored.
    weights = ckpt['ema' if use_ema else 'model']
    try:
        net.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:      # missing/extra keys, wrong shapes, not a dict
        raise SystemExit(f'error: the weights in {path!r} do not fit the network its config describes: '
                         f'{str(e).splitlines()[0][:300]}') from None
    # Checked on the tensors actually loaded (EMA or raw), buffers included.
    bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"error: {path!r} has non-finite {'EMA' if use_ema else 'raw'} weights ({len(bad)} tensors, "
                         f'e.g. {bad[0]}): the run blew up. Use an earlier checkpoint.')
    diffusion = build_diffusion(config)
    diffusion.load_state_dict(ckpt.get('diffusion') or {})      # a learned VDM schedule's parameters (vdm.py)
    return net.eval().requires_grad_(False), diffusion, config


# The noise shape a sampler draws: the network's input shape, which for latent models is the latents'.
def sample_shape(config):
    """(C, H, W) of an image model, (C, F, H, W) of a video model, from the checkpoint's data config."""
    if config.get('autoencoder'):                                 # latent diffusion: the shape the network sees
        return tuple(config['autoencoder']['latent_shape'])
    d = config['data']
    return (d['channels'],) + ((d['frames'],) if d.get('frames') else ()) + (d['resolution'], d['resolution'])


# Latent diffusion (vae.py): a checkpoint trained with train.py --autoencoder records its autoencoder (path,
# sha256, config with the latent scale) in config['autoencoder']; samples are latents, decoded to pixels here.

def load_autoencoder(path, device='cpu', use_ema=True):
    """The (EMA) autoencoder of a train.py --task autoencoder checkpoint, frozen, in eval mode."""
    ckpt = load_checkpoint(path, device, expect='autoencoder')
    # Rebuilt from its own stored config, like build_network; the EMA weights unless asked for the raw ones.
    ae = vae.Autoencoder(**ckpt['config']['net']).to(device)
    ae.load_state_dict(ckpt['ema' if use_ema else 'model'])
    return ae.eval().requires_grad_(False)


def latent_decoder(config, device='cpu'):
    """latents -> images for a latent diffusion checkpoint (None for a pixel model), through the autoencoder its
    config records, with the latent scale it was trained with. The file must be the one trained on (sha256)."""
    record = config.get('autoencoder')
    if not record:
        return None
    if not os.path.isfile(record['path']):
        raise SystemExit(f"error: this latent diffusion model decodes through the autoencoder {record['path']!r}, "
                         'which is missing; put that checkpoint back at that path')
    # Identified by content, not by name: a retrained file at the same path decodes to other images.
    if sha256_of(record['path']) != record['sha256']:
        raise SystemExit(f"error: {record['path']!r} is not the autoencoder this model was trained on (its sha256 "
                         "changed: retrained or replaced?); decoding through it would give wrong images")
    ae = load_autoencoder(record['path'], device)
    # The diffusion model was trained on scaled latents (z - shift) * scale; decoding must undo the same scale.
    ae.set_latent_scale(record['config']['scale_factor'], record['config']['shift_factor'])

    @torch.no_grad()
    def decode(z):
        return ae.decode(z.to(device))
    return decode
