"""
The checkpoint format: written and read in this one file, so its schema is seen once.

A checkpoint is one `torch.save` dict, loaded with `torch.load(..., weights_only=True)` (it can hold tensors,
numbers, strings, lists and dicts, nothing that runs when loaded), written by runs.atomic_write (a crash never
leaves half a file):

    config      everything needed to rebuild the model and sample it as trained (make_config):
        task        'diffusion' | 'superres' | 'classifier' | 'autoencoder': what the network learnt
        model       'unet' | 'dit' | 'classifier' | 'autoencoder': the class (NETWORKS; never a name chosen by the file)
        config_name the named configuration it started from (unet.UNET_CONFIGS, dit.DIT_CONFIGS, ...)
        net         the constructor's keyword arguments (UNet.config, DiT.config, ...): build_network(config)
        diffusion   {prediction, schedule, t_sampler, sigma_data, T (discrete schedules)}; {} for an autoencoder
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
import os

import torch

import vae
from classifier import CLASSIFIER_CONFIGS, NoiseConditionalClassifier
from diffusion import NOISE_SCHEDULES, Diffusion
from dit import DIT_CONFIGS, DiT
from unet import UNET_CONFIGS, UNet

NETWORKS = {'unet': UNet, 'dit': DiT, 'classifier': NoiseConditionalClassifier}   # config['model'] -> class; config['net'] its kwargs
CHECKPOINT_KEYS = ('config', 'model', 'ema')    # what every training checkpoint holds, at least
# The natural schedule of each parameterisation (diffusion.py): cosine VP for eps/x0/v, EDM's, the flow's.
DEFAULT_SCHEDULE = {'eps': 'cosine', 'x0': 'cosine', 'v': 'cosine', 'edm': 'edm', 'flow': 'flow'}


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
    if model == 'unet':
        name = config_name or 'micro'
        levels = len(UNET_CONFIGS[name]['channel_mult'])
        factor = 2 ** (levels - 1)                                      # one halving per level below the first
        if r % factor:
            return (f"resolution {r} does not suit U-Net '{name}': its {levels} levels halve the image {levels - 1} "
                    f'times, so it needs a multiple of {factor}')
        return None
    name = config_name or 'DiT-S/4'
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
        name = args.config or 'micro'
        net = dict(UNET_CONFIGS[name], in_channels=dataset.channels, image_size=r, num_classes=num_classes, aug_dim=aug_dim)
        if args.dropout is not None:
            net['dropout'] = args.dropout
        if args.model_channels is not None:
            net['model_channels'] = args.model_channels
        return name, UNet(**net).config
    name = args.config or 'DiT-S/4'
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
    """config['diffusion']: the parameterisation, training schedule (T for the discrete ones) and noise-level sampler."""
    schedule = args.schedule or DEFAULT_SCHEDULE[args.prediction]
    return {'prediction': args.prediction, 'schedule': schedule, 't_sampler': args.t_sampler,
            'sigma_data': args.sigma_data, **({'T': args.T} if schedule in ('linear', 'cosine') else {})}


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


# Class names may be re-spelt (a renamed folder) without changing what was learnt, so they are not compared.
def config_mismatch(a, b, prefix=''):
    """Keys where two nested configs differ, as readable strings (a resume must rebuild the same model)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_mismatch(va, vb, f'{prefix}{k}.')
        elif va != vb and k not in ('class_names', 'scale_factor', 'shift_factor'):   # latent scale: measured at the end
            out.append(f'{prefix}{k}: checkpoint has {va!r}, this run has {vb!r}')
    return out


# ----------------------------------------------------------------------------------------------------
# Reading.

# weights_only=True refuses pickled code: a downloaded checkpoint can hold tensors, numbers, strings, lists
# and dicts, nothing that runs when loaded. map_location lets a GPU checkpoint load on a CPU-only machine.
def load_checkpoint(path, device='cpu'):
    """Load with weights_only=True (a checkpoint cannot run code) and check that it is a training checkpoint."""
    if not os.path.isfile(path):
        raise SystemExit(f'error: checkpoint {path!r} does not exist')
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:                                       # truncated, not a checkpoint, or unsafe content
        raise SystemExit(f'error: cannot read checkpoint {path!r} ({type(e).__name__}: {e}). '
                         'Is it a file written by train.py, and complete?') from None
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
    return ckpt


# config['net'] is exactly the constructor's keyword arguments (UNet.config / DiT.config), so a checkpoint
# rebuilds the same architecture without any flag.
def build_network(config):
    """Rebuild a network from the config stored in a checkpoint (its class and constructor arguments)."""
    # The class comes from a fixed table, never from a name in the file: a checkpoint cannot pick code to run.
    if config['model'] not in NETWORKS:
        raise SystemExit(f"error: unknown network {config['model']!r} in the checkpoint; known: {', '.join(NETWORKS)}")
    return NETWORKS[config['model']](**config['net'])


def build_diffusion(config):
    """The Diffusion (parameterisation, training schedule, noise-level sampler) the model was trained with."""
    # t_sampler matters only for training; older checkpoints without it default to uniform.
    d = config['diffusion']
    # Discrete schedules record their number of steps T (train.py --T); older checkpoints used T = 1000.
    schedule = NOISE_SCHEDULES[d['schedule']](d['T']) if d.get('T') else d['schedule']
    return Diffusion(schedule, d['prediction'], d.get('t_sampler', 'uniform'), d['sigma_data'])


# The EMA weights are what one samples (Karras et al. 2022 and DDPM sample the EMA); --raw reads the
# optimised weights, e.g. to see how much the average helps.
def load_model(path, device='cpu', use_ema=True):
    """(network in eval mode, Diffusion, config) from a training checkpoint; config['args'] holds the run's flags.

    Weights that are not finite are refused here: sampling them gives NaN images that would be written as
    black PNGs."""
    ckpt = load_checkpoint(path, device)
    config = dict(ckpt['config'], args=ckpt.get('args', {}))
    net = build_network(config).to(device)
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
    return net.eval().requires_grad_(False), build_diffusion(config), config


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
    ckpt = load_checkpoint(path, device)
    if ckpt['config'].get('task') != 'autoencoder':
        raise SystemExit(f"error: {path!r} is a {ckpt['config'].get('task', 'diffusion')} checkpoint, not an "
                         'autoencoder; train one with train.py --task autoencoder')
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
