"""
Sample a discrete diffusion model on VQ tokens (train_discrete.py) and decode the tokens with its VQ autoencoder:
    python sample_discrete.py --ckpt runs/discrete/ckpt.pt --decoder maskgit --steps 12 --out samples.png
(also `python sample.py --ckpt runs/discrete/ckpt.pt ...` once sample.py hands discrete checkpoints here).

The network predicts p(x0 | x_t) over the K codes at every position of the h x w token grid (discrete.py); a
decoder turns that into tokens (ancestral unmasking / D3PM's reverse step, or MaskGIT's confidence-ordered
decoding), classifier-free guidance mixes the logits with and without the class, and the autoencoder the run was
trained on (recorded by path and sha256 in the checkpoint) maps tokens to images:
    z_q = codebook[tokens] (N, D, h, w);  x = Decoder(post_quant_conv(z_q))        (vae.py, VQGAN Sec. 3)

The checkpoint (checkpoints.py's file format, a dict loaded with weights_only=True) has config:
    task 'discrete', model 'token_transformer', config_name (discrete.DISCRETE_CONFIGS), net (the
    TokenTransformer's kwargs), diffusion {process, schedule, T, hybrid_lambda}, data (checkpoints.make_config),
    autoencoder {path, sha256, config, latent_shape = [h, w] of the token grid} (checkpoints.latent_record)
load_discrete_model checks these keys and says what is wrong; nothing else reads them.
"""
import argparse
import os
import sys
import time

import torch

import checkpoints
import discrete
from runs import check_output_path

DECODERS = ('maskgit', 'ancestral')
DIFFUSION_KEYS = {'process': ('absorbing', 'uniform'), 'schedule': tuple(discrete.SCHEDULES)}


# ----------------------------------------------------------------------------------------------------
# Tokens <-> images through a VQ autoencoder (vae.py)

@torch.no_grad()
def encode_tokens(ae, x):
    """Images (N, C, H, W) in [-1, 1] -> code indices (N, h, w): the nearest code of each encoder output."""
    z = ae.encode_raw(x)                                                       # (N, D, h, w), before quantising
    flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    if ae.quantizer.l2_normalize:
        flat = torch.nn.functional.normalize(flat, dim=1)
    return ae.quantizer.nearest(flat).reshape(z.shape[0], z.shape[2], z.shape[3])


@torch.no_grad()
def decode_tokens(ae, tokens):
    """Code indices (N, h, w) -> images (N, C, H, W) (not clamped)."""
    z_q = ae.quantizer.codes()[tokens].permute(0, 3, 1, 2)                     # (N, D, h, w)
    return ae.decode_raw(z_q, quantize=False)


# ----------------------------------------------------------------------------------------------------
# The checkpoint

def is_discrete_checkpoint(path):
    """Whether path holds a train_discrete.py checkpoint (the hook sample.py / evaluate.py ask)."""
    if not (isinstance(path, str) and path.endswith('.pt') and os.path.isfile(path)):
        return False
    config = checkpoints.load_checkpoint(path).get('config', {})
    return isinstance(config, dict) and config.get('task') == 'discrete'


def is_discrete_argv(argv):
    """Whether a command line's --ckpt names a discrete checkpoint (sample.py's hook hands those to this program)."""
    for i, a in enumerate(argv):
        path = argv[i + 1] if a == '--ckpt' and i + 1 < len(argv) else a[len('--ckpt='):] if a.startswith('--ckpt=') else None
        if path is not None:
            return is_discrete_checkpoint(path)
    return False


def check_discrete_config(config, path):
    """The config keys this program reads, each checked: a damaged or foreign file is a message, not a KeyError."""
    problems = []
    if config.get('task') != 'discrete' or config.get('model') != 'token_transformer':
        problems.append(f"task/model are {config.get('task')!r}/{config.get('model')!r}, not 'discrete'/'token_transformer'")
    d = config.get('diffusion', {})
    for key, allowed in DIFFUSION_KEYS.items():
        if d.get(key) not in allowed:
            problems.append(f'diffusion.{key} is {d.get(key)!r}, not one of {allowed}')
    record = config.get('autoencoder') or {}
    if not all(k in record for k in ('path', 'sha256', 'config', 'latent_shape')):
        problems.append('config.autoencoder does not record the VQ autoencoder (path, sha256, config, latent_shape)')
    net = config.get('net', {})
    if not isinstance(net, dict) or not {'vocab_size', 'seq_len'} <= set(net):
        problems.append('config.net lacks vocab_size / seq_len')
    if problems:
        raise SystemExit(f'error: {path} is not a usable discrete diffusion checkpoint: ' + '; '.join(problems))


def load_discrete_model(path, device='cpu', use_ema=True):
    """(TokenTransformer in eval mode, DiscreteProcess, config, decode(tokens) -> images) from a checkpoint."""
    ckpt = checkpoints.load_checkpoint(path, device)
    config = dict(ckpt['config'], args=ckpt.get('args', {}))
    check_discrete_config(config, path)
    net = discrete.TokenTransformer(**config['net']).to(device)
    try:
        net.load_state_dict(ckpt['ema' if use_ema else 'model'])
    except (RuntimeError, TypeError) as e:
        raise SystemExit(f'error: the weights in {path} do not fit the network its config describes: '
                         f'{str(e).splitlines()[0][:300]}') from None
    d = config['diffusion']
    process = discrete.DiscreteProcess(d['process'], config['net']['vocab_size'], d['schedule'])
    return net.eval().requires_grad_(False), process, config, token_decoder(config, device)


def token_decoder(config, device='cpu'):
    """tokens (N, L) -> images through the autoencoder the checkpoint records (checked by sha256, as
    checkpoints.latent_decoder does for continuous latents)."""
    record = config['autoencoder']
    if not os.path.isfile(record['path']):
        raise SystemExit(f"error: this model decodes through the VQ autoencoder {record['path']!r}, which is missing")
    if checkpoints.sha256_of(record['path']) != record['sha256']:
        raise SystemExit(f"error: {record['path']!r} is not the autoencoder this model was trained on (sha256 changed)")
    ae = checkpoints.load_autoencoder(record['path'], device)
    h, w = record['latent_shape']
    return lambda tokens: decode_tokens(ae, tokens.reshape(-1, h, w).to(device))


# ----------------------------------------------------------------------------------------------------
# Generation

@torch.no_grad()
def generate_tokens(net, process, n, labels=None, decoder='maskgit', steps=12, guidance=1.0, temperature=1.0,
                    choice_temperature=4.5, seed=0, batch_size=256, device='cpu'):
    """n token sequences (n, L): batch b draws from a generator seeded seed + its first index (sample.generate's
    convention), so a sample does not depend on the batch size."""
    num_classes = net.config['num_classes']
    denoiser = net
    if num_classes and guidance != 1:
        denoiser = discrete.classifier_free_guidance(net, guidance, null_label=num_classes)
    out = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        g = torch.Generator(device).manual_seed(seed + start)
        cond = {'y': labels[start:start + m].to(device)} if labels is not None and num_classes else {}
        shape = (m, net.config['seq_len'])
        if decoder == 'maskgit':
            x = discrete.sample_maskgit(denoiser, process, shape, steps, temperature, choice_temperature, cond=cond,
                                        generator=g, device=device)
        else:
            x = discrete.sample_ancestral(denoiser, process, shape, steps, cond=cond, generator=g, device=device)
        out.append(x.cpu())
    return torch.cat(out)


def generate(net, process, decode, n, labels=None, batch_size=256, **options):
    """n images in [-1, 1] (n, C, H, W): generate_tokens, then the VQ decoder."""
    tokens = generate_tokens(net, process, n, labels, batch_size=batch_size, **options)
    return torch.cat([decode(tokens[i:i + batch_size]).clamp(-1, 1).cpu() for i in range(0, n, batch_size)])


def default_labels(config, n, label=None):
    """Classes cycling through all of them (or one, or None for an unconditional model / 'none')."""
    num_classes = config['net']['num_classes']
    if not num_classes or label == 'none':
        return None
    if label is not None:
        return torch.full((n,), int(label), dtype=torch.long)
    return torch.arange(n) % num_classes


def sample_for_evaluate(args):
    """evaluate.py's hook for a discrete checkpoint: (uint8 images, labels) of --num-gen samples, classes by its
    --conditions (uniform or fixed; data/real need reference labels, as evaluate.sample_checkpoint), decoded with the
    run's --sample-decoder, --steps (else the run's) and --guidance (else the run's)."""
    import evaluate
    net, process, config, decode = load_discrete_model(args.generated, args.device)
    n, num_classes = args.num_gen or 2000, config['net']['num_classes']
    labels = None
    if num_classes:
        mode = args.conditions or 'uniform'
        reference = evaluate.load_labels(args.reference) if mode in ('data', 'real') else None
        labels = torch.from_numpy(evaluate.choose_conditions(mode, n, num_classes, reference, args.fixed_class,
                                                             args.seed))
    run = config['args']
    options = dict(decoder=run.get('sample_decoder', 'maskgit'),
                   steps=getattr(args, 'steps', None) or run.get('sample_steps', 12),
                   guidance=run.get('guidance', 1.0) if getattr(args, 'guidance', None) is None else args.guidance)
    images = evaluate.samples_to_uint8(generate(net, process, decode, n, labels, args.batch_size, seed=args.seed,
                                                device=args.device, **options), args.generated)
    args.sampling = f"{options['decoder']}, {options['steps']} steps, guidance {options['guidance']:g}"
    print(f'sampled {n} images from {args.generated} ({args.sampling})')
    return images, labels


# ----------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Sample a discrete diffusion model on VQ tokens (train_discrete.py).',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', required=True, help='checkpoint written by train_discrete.py')
    p.add_argument('--out', default=None, help='PNG grid; default: samples.png next to the checkpoint')
    p.add_argument('--npz', default=None, help='also save the samples as uint8 (N, H, W, C) with labels')
    p.add_argument('--overwrite', action='store_true', help='replace existing output files (else they are refused)')
    p.add_argument('-n', '--num', type=int, default=64, help='number of samples')
    p.add_argument('--batch', type=int, default=256, help='samples per batch')
    p.add_argument('--class', dest='label', default=None,
                   help="class index; default: cycle through the classes ('none': unconditional)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--raw', action='store_true', help='use the raw weights instead of the EMA')
    p.add_argument('--device', default='cpu')
    g = p.add_argument_group('decoding (discrete.py)')
    g.add_argument('--decoder', '--sampler', dest='decoder', default=None, choices=DECODERS,
                   help="maskgit (confidence-ordered parallel decoding) or ancestral; default: the run's")
    g.add_argument('--steps', type=int, default=None, help="decoding steps / MaskGIT iterations; default: the run's")
    g.add_argument('--guidance', type=float, default=None,
                   help="classifier-free guidance scale on logits (1 = none); default: the run's")
    g.add_argument('--temperature', type=float, default=1.0, help='token sampling temperature (MaskGIT)')
    g.add_argument('--choice-temperature', type=float, default=4.5,
                   help="MaskGIT's Gumbel noise on the confidences (reference: 4.5)")
    return p.parse_args(argv)


def main(args):
    if args.num < 1 or args.batch < 1 or (args.steps is not None and args.steps < 1) or args.temperature <= 0:
        raise SystemExit('error: -n, --batch and --steps must be at least 1, --temperature > 0')
    # No existing file is replaced without --overwrite; the default name is samples.png next to the checkpoint, or
    # the first free samples_K.png, so a second call never replaces the first one's grid (as sample.py does).
    out = args.out
    if out is None:
        folder = os.path.dirname(args.ckpt) or '.'
        out = next(path for k in range(100_000)
                   if not os.path.exists(path := os.path.join(folder, f"samples{f'_{k}' if k else ''}.png")))
    try:
        check_output_path(out, ('.png',), '--out', overwrite=args.overwrite)
        if args.npz:
            check_output_path(args.npz, ('.npz',), '--npz', overwrite=args.overwrite)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    net, process, config, decode = load_discrete_model(args.ckpt, args.device, use_ema=not args.raw)
    run = config['args']
    decoder = args.decoder or run.get('sample_decoder', 'maskgit')
    if decoder == 'maskgit' and process.kind != 'absorbing':
        raise SystemExit('error: MaskGIT decodes masked tokens; this model uses the uniform process (--decoder ancestral)')
    steps = args.steps or run.get('sample_steps', 12)
    guidance = run.get('guidance', 1.0) if args.guidance is None else args.guidance
    labels = default_labels(config, args.num, args.label)
    t0 = time.time()
    images = generate(net, process, decode, args.num, labels, args.batch, decoder=decoder, steps=steps,
                      guidance=guidance, temperature=args.temperature, choice_temperature=args.choice_temperature,
                      seed=args.seed, device=args.device)
    import sample                                   # its writers: npz first, then the grid (sample.write_samples)
    sample.write_samples(images, labels, out, args.npz)
    print(f'wrote {out}: {args.num} samples, {decoder} {steps} steps, guidance {guidance:g}, '
          f'{args.num / (time.time() - t0):.1f} images/s')


if __name__ == '__main__':
    main(parse_args(sys.argv[1:]))
