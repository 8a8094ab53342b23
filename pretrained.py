"""
Public pretrained diffusion models, loaded into this codebase's own networks: find, download, verify, build.

Models (each file of the name its authors published, see PRETRAINED below):
  ddpm-cifar10   Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239: the CIFAR-10
                 U-Net (35.7M parameters) in the diffusers UNet2DModel layout of google/ddpm-cifar10-32.
  dit-xl-2-256   Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", arXiv:2212.09748: DiT-XL/2 on
  dit-xl-2-512   32x32x4 (64x64x4) latents of 256x256 (512x512) ImageNet, class-conditional, decoded by the Stable
                 Diffusion VAE (Rombach et al. 2022, arXiv:2112.10752; sd-vae-ft-mse as in DiT's sample.py).
  sd-vae-ft-*    the Stable Diffusion KL-f8 autoencoder (vae.py's 'sd-kl-f8', latent scale 0.18215): load_sd_vae()
                 reads its .safetensors / .bin / .ckpt in the diffusers AutoencoderKL or the original LDM layout.

All three were trained as DDPM eps-predictors on the linear schedule, beta from 1e-4 to 0.02 over T = 1000 steps
(Ho et al. 2020, Sec. 4), with the network seeing the step index t = 0..999. In the sigma frame of diffusion.py:

    x_t = sqrt(abar_t) (x0 + sigma_t eps),  sigma_t = sqrt((1 - abar_t) / abar_t)       (DESIGN.md, VP row)
    D(x, sigma) = x - sigma eps_hat(x / sqrt(1 + sigma^2), t(sigma))                   (Karras et al. 2022, Table 1)

so every sampler and guidance method of this codebase runs them. DiT also learned the variance (Nichol &
Dhariwal 2021, arXiv:2102.09672, Eq. 15): its network outputs 2C channels, eps first; the samplers here use the
eps half only (LearnedSigmaEps). DiT's "no class" label is index 1000 (its extra embedding row), ours too.
Guidance note: DiT's own sampling script guides only 3 of the 4 latent channels ("for exact reproducibility");
guidance here applies to all channels, the standard classifier-free guidance (Ho & Salimans 2022, Eq. 6).

Weights are looked for in: the weights_dir argument, then $PRETRAINED_WEIGHTS_DIR, then
<torch hub dir>/pretrained. A missing file is downloaded when the machine is online (to a temporary name, checked
against its recorded size and SHA-256 where this registry records them, then renamed); offline, the error names
each file's URL and the exact path to save it under.

Usage: net, diffusion, config, vae = load_pretrained('dit-xl-2-256', 'cuda')
       python pretrained.py            # lists the models and which files are present
       python sample.py --pretrained dit-xl-2-256 --class 207 --guidance 4 --steps 32 -n 16
"""
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from types import SimpleNamespace

import torch
import torch.nn as nn

import checkpoints
import dit
import unet
import vae
from diffusion import DiscreteVP, Diffusion


# ----------------------------------------------------------------------------
# The registry. Each file: the local name it is saved under (unique across models), its public URL, and what this
# registry can check. sha256 / size (bytes) are None where no published value was available to record; such a
# file is still checked on load, key by key and shape by shape, by the loaders of dit.py and unet.py and by
# load_sd_vae below.

PRETRAINED_ENV = 'PRETRAINED_WEIGHTS_DIR'

FILES = {
    'google-ddpm-cifar10-32.bin': dict(
        url='https://huggingface.co/google/ddpm-cifar10-32/resolve/main/diffusion_pytorch_model.bin',
        # the Git LFS pointer of the file on the main branch (commit "convert weights")
        sha256='ac3416a548879738893e935b42cab9119f51745b62bec4b6d8375e4d86e98ea4', size=None, about='143 MB'),
    'DiT-XL-2-256x256.pt': dict(url='https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt',
                                sha256=None, size=None, about='2.7 GB'),
    'DiT-XL-2-512x512.pt': dict(url='https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt',
                                sha256=None, size=None, about='2.7 GB'),
    'sd-vae-ft-mse.safetensors': dict(
        url='https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/diffusion_pytorch_model.safetensors',
        sha256=None, size=None, about='335 MB'),
    'sd-vae-ft-ema.safetensors': dict(
        url='https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/diffusion_pytorch_model.safetensors',
        sha256=None, size=None, about='335 MB'),
}

PRETRAINED = {
    'ddpm-cifar10': dict(kind='unet', weights='google-ddpm-cifar10-32.bin', vae=None, dataset='cifar10',
                         resolution=32, channels=3, num_classes=0),
    'dit-xl-2-256': dict(kind='dit', weights='DiT-XL-2-256x256.pt', vae='sd-vae-ft-mse.safetensors',
                         dataset='imagenet', resolution=256, channels=3, num_classes=1000),
    'dit-xl-2-512': dict(kind='dit', weights='DiT-XL-2-512x512.pt', vae='sd-vae-ft-mse.safetensors',
                         dataset='imagenet', resolution=512, channels=3, num_classes=1000),
}


# ----------------------------------------------------------------------------
# Finding, downloading and verifying files

def default_weights_dir():
    return os.path.join(torch.hub.get_dir(), 'pretrained')


def search_dirs(weights_dir=None):
    """Where files are looked for, in order: the argument, $PRETRAINED_WEIGHTS_DIR, the torch hub folder."""
    return [d for d in (weights_dir, os.environ.get(PRETRAINED_ENV)) if d] + [default_weights_dir()]


sha256_of = checkpoints.sha256_of                 # a published file is checked by content, as an autoencoder is


def verify_file(path, spec):
    """Raise ValueError when the file's size or SHA-256 differs from what the registry records (where it does)."""
    if spec.get('size') is not None and os.path.getsize(path) != spec['size']:
        raise ValueError(f"{path} has {os.path.getsize(path)} bytes, expected {spec['size']}: an incomplete or "
                         f"different file; delete it and download {spec['url']} again")
    if spec.get('sha256') is not None:
        digest = sha256_of(path)
        if digest != spec['sha256']:
            raise ValueError(f"{path} has SHA-256 {digest}, expected {spec['sha256']}: a different or damaged "
                             f"file; delete it and download {spec['url']} again")


def missing_files_message(names, dirs, files=FILES):
    """What to do by hand: each missing file's URL and the exact path to save it under."""
    target = dirs[0]
    lines = [f"pretrained weights not found (looked in: {', '.join(dirs)}) and not downloaded. Download"]
    lines += [f"  {files[n]['url']}\n    -> {os.path.join(target, n)}  (about {files[n]['about']})" for n in names]
    lines.append(f'or put the files in any folder and pass it (weights_dir= / --weights-dir) or set {PRETRAINED_ENV}.')
    return '\n'.join(lines)


def download(url, path, spec):
    """Download to a temporary file in the target folder, verify it, then rename: never a half file under `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.part')
    try:
        with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=60) as response:
            print(f'downloading {url} -> {path}', file=sys.stderr)
            shutil.copyfileobj(response, out, length=1 << 20)
        verify_file(tmp, spec)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def find_files(names, weights_dir=None, download_missing=True, files=FILES):
    """{name: path} for the named files: found locally (and verified), else downloaded, else FileNotFoundError
    naming every missing file's URL and destination. An explicit weights_dir that lacks a file is downloaded into."""
    dirs = search_dirs(weights_dir)
    found, missing = {}, []
    for name in names:
        path = next((os.path.join(d, name) for d in dirs if os.path.isfile(os.path.join(d, name))), None)
        if path is not None:
            verify_file(path, files[name])
            found[name] = path
        else:
            missing.append(name)
    if missing and download_missing:
        for name in list(missing):
            try:
                download(files[name]['url'], os.path.join(dirs[0], name), files[name])
            except OSError as e:          # offline (URLError is an OSError), or the folder is not writable
                print(f'could not download {name}: {e}', file=sys.stderr)
                continue
            found[name] = os.path.join(dirs[0], name)
            missing.remove(name)
    if missing:
        raise FileNotFoundError(missing_files_message(missing, dirs, files))
    return found


# ----------------------------------------------------------------------------
# The Stable Diffusion VAE (vae.py's 'sd-kl-f8') from its public weights: the diffusers AutoencoderKL layout and
# the original LDM layout, renamed into vae.py's parameter names; every key and shape must match.

def official_key(key, layout, levels):
    """The name under which `layout` ('diffusers' or 'ldm') stores our parameter `key`.

    Ours -> LDM: encoder.down.i.res.j -> encoder.down.i.block.j; Level.resample -> downsample / upsample;
    decoder.up.i (deepest first) -> decoder.up.(levels-1-i) (LDM numbers decoder levels from the shallowest);
    mid.res1/attn/res2 -> mid.block_1/attn_1/block_2; attn.proj -> proj_out; ResBlock.skip -> nin_shortcut.
    Ours -> diffusers: down_blocks.i.resnets.j, downsamplers.0 / upsamplers.0, up_blocks.i (deepest first, as ours),
    mid_block.resnets.0/1, mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}, skip -> conv_shortcut,
    norm_out -> conv_norm_out.
    """
    parts = key.split('.')
    if layout == 'ldm':
        if parts[0] == 'decoder' and parts[1] == 'up':
            parts[2] = str(levels - 1 - int(parts[2]))
        names = dict(res='block', skip='nin_shortcut', res1='block_1', res2='block_2', attn='attn_1', proj='proj_out')
        out = [names.get(p, p) for p in parts]
        if 'resample' in parts:
            out[out.index('resample')] = 'downsample' if parts[0] == 'encoder' else 'upsample'
        return '.'.join(out)
    if layout != 'diffusers':
        raise ValueError(f"layout must be 'diffusers' or 'ldm', got {layout!r}")
    text = '.'.join(parts)
    for ours, theirs in (('encoder.down.', 'encoder.down_blocks.'), ('decoder.up.', 'decoder.up_blocks.'),
                         ('.res.', '.resnets.'), ('.skip.', '.conv_shortcut.'), ('.resample.', '.SAMPLER.0.'),
                         ('mid.res1.', 'mid_block.resnets.0.'), ('mid.res2.', 'mid_block.resnets.1.'),
                         ('mid.attn.norm.', 'mid_block.attentions.0.group_norm.'),
                         ('mid.attn.q.', 'mid_block.attentions.0.to_q.'), ('mid.attn.k.', 'mid_block.attentions.0.to_k.'),
                         ('mid.attn.v.', 'mid_block.attentions.0.to_v.'),
                         ('mid.attn.proj.', 'mid_block.attentions.0.to_out.0.'), ('.norm_out.', '.conv_norm_out.')):
        text = text.replace(ours, theirs)
    return text.replace('SAMPLER', 'downsamplers' if parts[0] == 'encoder' else 'upsamplers')


# diffusers before 0.14 named the attention layers query/key/value/proj_attn; some hub files still do
DIFFUSERS_OLD_ATTENTION = {'to_q.': 'query.', 'to_k.': 'key.', 'to_v.': 'value.', 'to_out.0.': 'proj_attn.'}
# keys of full LDM checkpoints that are not the autoencoder's: its training losses (LPIPS, discriminator)
IGNORED_PREFIXES = ('loss.', 'model_ema.')
MODEL_PREFIXES = ('first_stage_model.', 'vae.')                          # a whole SD checkpoint / a pipeline dict


def detect_layout(state):
    if any(k.startswith(('encoder.down_blocks.', 'decoder.up_blocks.')) for k in state):
        return 'diffusers'
    if any(k.startswith(('encoder.down.', 'decoder.up.')) for k in state):
        return 'ldm'
    raise ValueError('not a KL autoencoder state dict: expected diffusers AutoencoderKL keys (encoder.down_blocks...) '
                     f'or LDM keys (encoder.down...); got e.g. {sorted(state)[:4]}')


def convert_official_state_dict(state, model, layout=None):
    """Rename (and reshape) a diffusers or LDM state dict into `model`'s names; every key must match exactly."""
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    for prefix in MODEL_PREFIXES:  # a whole Stable Diffusion checkpoint: keep only its autoencoder
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    layout = layout or detect_layout(state)
    if layout == 'diffusers' and any('.query.' in k or '.proj_attn.' in k for k in state):
        old = {new: old for new, old in DIFFUSERS_OLD_ATTENTION.items()}
        remap = lambda name: next((name.replace(n, o) for n, o in old.items() if f'attentions.0.{n}' in name), name)
    else:
        remap = lambda name: name
    levels = len(model.config['channel_mult'])
    converted, missing, wrong_shape, used = {}, [], [], set()
    for ours, target in model.state_dict().items():
        theirs = remap(official_key(ours, layout, levels))
        if theirs not in state:
            missing.append(theirs)
            continue
        used.add(theirs)
        tensor = state[theirs]
        if tensor.dim() == 4 and target.dim() == 2 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]                                         # LDM's 1x1 conv attention -> Linear
        if tensor.shape != target.shape:
            wrong_shape.append(f'{theirs}: {tuple(tensor.shape)} in file, {tuple(target.shape)} expected')
        converted[ours] = tensor
    unexpected = sorted(set(state) - used)
    if missing or unexpected or wrong_shape:
        lines = [f'this state dict does not fit {layout} KL autoencoder with config '
                 f"channels={model.config['channels']} channel_mult={model.config['channel_mult']} "
                 f"latent_channels={model.config['latent_channels']}:"]
        for label, keys in (('missing keys', missing), ('unexpected keys', unexpected), ('wrong shapes', wrong_shape)):
            if keys:
                lines.append(f'  {len(keys)} {label}, e.g. {keys[:3]}')
        lines.append('Expected the Stable Diffusion VAE (diffusers AutoencoderKL, e.g. stabilityai/sd-vae-ft-ema '
                     'diffusion_pytorch_model.safetensors, or the LDM vae-ft-*.ckpt).')
        raise ValueError('\n'.join(lines))
    return converted


def read_safetensors(path):
    """A .safetensors file as a dict of tensors (8-byte header length, JSON header, raw little-endian data)."""
    dtypes = dict(F32=torch.float32, F16=torch.float16, BF16=torch.bfloat16, F64=torch.float64, I64=torch.int64,
                  I32=torch.int32)
    with open(path, 'rb') as f:
        header_len = int.from_bytes(f.read(8), 'little')
        header = json.loads(f.read(header_len))
        data = bytearray(f.read())
    state = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        start, end = info['data_offsets']
        state[name] = torch.frombuffer(data, dtype=dtypes[info['dtype']], count=(end - start) // dtypes[info['dtype']].itemsize,
                                       offset=start).reshape(info['shape']).clone()
    return state


def read_state_dict(path):
    """Tensors from .safetensors, or from a torch file (.bin / .ckpt / .pt; a Lightning 'state_dict' is unwrapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist')
    if path.endswith('.safetensors'):
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f'could not read {path} as a PyTorch weight file ({e})') from e
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_sd_vae(path_or_state_dict, device='cpu', config='sd-kl-f8', layout=None):
    """Stable Diffusion's KL-f8 autoencoder with public weights (diffusers or LDM layout), scale 0.18215."""
    state = path_or_state_dict if isinstance(path_or_state_dict, dict) else read_state_dict(path_or_state_dict)
    with torch.device('meta'):  # shapes only: skip an 84M-parameter random init that would be overwritten
        model = vae.create_autoencoder(config)
    converted = convert_official_state_dict(state, model, layout)
    model.load_state_dict(converted, assign=True)
    model.set_latent_scale(model.config['scale_factor'], model.config['shift_factor'])
    return model.to(device).eval()


# ----------------------------------------------------------------------------
# The models as denoisers

class LearnedSigmaEps(nn.Module):
    """The eps half of a learned-variance network: out[:, :C] of its (N, 2C, ...) output (Improved DDPM Sec. 3.1).

    The other half sets the variance of DDPM's ancestral step; the samplers here take their own steps from the
    denoiser, so they need only eps. Everything else (config, conditioning keywords) passes through.
    """

    def __init__(self,
                 net,                     # a network whose output stacks eps (C channels) and the variance (C)
                 channels):               # C
        super().__init__()
        self.net, self.channels = net, channels
        self.config = net.config

    def forward(self, x, noise_level, **cond):
        return self.net(x, noise_level, **cond)[:, :self.channels]


def ddpm_linear_diffusion():
    """DDPM's training process as a Diffusion: linear betas 1e-4..0.02, T = 1000, eps prediction, c_noise = t."""
    return Diffusion(DiscreteVP.linear(1000), 'eps')


def load_pretrained(name, device='cpu', weights_dir=None, download=True):
    """(net in eval mode, Diffusion, config, autoencoder or None) for a model of PRETRAINED.

    config has train.py's layout (model, net, diffusion, data) plus 'pretrained' (the registry name) and
    'autoencoder': None for pixel models, else {'pretrained': its file, 'latent_shape': what the network sees
    (4, 32, 32 for DiT-XL/2 256), 'config': the autoencoder's config with its latent scale}; data is the image.
    """
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; choose one of {', '.join(PRETRAINED)}")
    entry = PRETRAINED[name]
    paths = find_files([entry['weights']] + ([entry['vae']] if entry['vae'] else []), weights_dir, download)
    if entry['kind'] == 'unet':
        net = unet.load_diffusers_unet(paths[entry['weights']], 'ddpm-cifar10', device)
        model_name, shape = 'ddpm-cifar10', (entry['channels'], entry['resolution'], entry['resolution'])
    else:
        official = dit.load_official_dit(paths[entry['weights']], device)
        net = LearnedSigmaEps(official, official.in_channels) if official.out_channels != official.in_channels \
            else official
        model_name = 'DiT-XL/2'
        shape = (official.in_channels, official.config['input_size'], official.config['input_size'])
    vae_model, autoencoder = None, None
    if entry['vae']:
        vae_model = load_sd_vae(paths[entry['vae']], device)
        # as sample.py reads a latent model's config: the network sees latent_shape; data is the decoded image
        autoencoder = {'pretrained': entry['vae'], 'latent_shape': list(shape), 'config': vae_model.config}
    # The one schema of checkpoints.py (make_config): the published model reads like a train.py checkpoint.
    data = checkpoints.data_config(entry['dataset'], SimpleNamespace(
        resolution=entry['resolution'], channels=entry['channels'], num_classes=entry['num_classes']))
    diffusion = {'prediction': 'eps', 'schedule': 'linear', 't_sampler': 'uniform', 'sigma_data': 0.5, 'T': 1000}
    config = checkpoints.make_config('diffusion', entry['kind'], model_name, net.config, data, diffusion,
                                     pretrained=name, autoencoder=autoencoder)
    return net.eval().requires_grad_(False), ddpm_linear_diffusion(), config, vae_model


# ----------------------------------------------------------------------------

if __name__ == '__main__':
    dirs = search_dirs()
    print(f'weights are looked for in: {", ".join(dirs)}')
    for model, entry in PRETRAINED.items():
        needed = [entry['weights']] + ([entry['vae']] if entry['vae'] else [])
        status = ['present' if any(os.path.isfile(os.path.join(d, n)) for d in dirs) else 'missing' for n in needed]
        print(f"{model:>14}: " + ', '.join(f'{n} ({FILES[n]["about"]}, {s})' for n, s in zip(needed, status)))
    # The sigma frame of DDPM's schedule, which all three models share.
    diffusion = ddpm_linear_diffusion()
    print(f'linear schedule: sigma from {diffusion.sigma_min:.4f} (t=0) to {diffusion.sigma_max:.1f} (t=999)')
