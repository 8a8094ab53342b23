"""Parity of vae.py's 'sd-kl-f8' autoencoder, loaded by pretrained.load_sd_vae, with diffusers' AutoencoderKL on
the same (random) weights.

The Stable Diffusion VAE weights (sd-vae-ft-ema / ft-mse, 335 MB) are not needed to check the architecture: this
script builds diffusers' AutoencoderKL in the Stable Diffusion configuration, gives every weight a random value
(diffusers' default init leaves GroupNorm at identity and biases at zero, which would hide a swapped norm or bias),
and saves the state dict under the official names in the three forms the public weights come in:
  1. diffusers layout, .safetensors (read by pretrained.read_safetensors, no safetensors package);
  2. diffusers layout with the pre-0.14 attention names (query/key/value/proj_attn), torch .bin;
  3. the original LDM layout (encoder.down.i.block.j, mid.attn_1 as 1x1 convs, decoder levels numbered from the
     shallowest), prefixed 'first_stage_model.' as in a whole SD .ckpt, with diffusers' own LDM->diffusers
     converter as the referee: the LDM dict is converted by diffusers and loaded strictly into AutoencoderKL.
For each, pretrained.load_sd_vae loads the file and both networks encode (posterior mean and log-variance) and decode
the same inputs; the script prints the largest absolute and relative differences, in float32 and float64.

Not part of the test suite (diffusers is not a dependency). Run with diffusers on PYTHONPATH:
    pip install --no-deps --target /tmp/ref_pkgs diffusers huggingface_hub safetensors filelock regex
    PYTHONPATH=/tmp/ref_pkgs python benchmarks/parity_vae.py [--size 64] [--batch 2]
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pretrained  # noqa: E402
import vae  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402  (the reference implementation)
from safetensors.torch import save_file  # noqa: E402


def reference_autoencoder(seed=0):
    """diffusers AutoencoderKL as configured for stabilityai/sd-vae-ft-ema, every tensor randomised."""
    torch.manual_seed(seed)
    ref = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                        block_out_channels=(128, 256, 512, 512), down_block_types=('DownEncoderBlock2D',) * 4,
                        up_block_types=('UpDecoderBlock2D',) * 4, sample_size=256, scaling_factor=0.18215)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 1 and 'norm' in name and name.endswith('weight'):
                p.uniform_(0.5, 1.5)                              # GroupNorm scales near 1
            elif p.dim() == 1:
                p.uniform_(-0.1, 0.1)                             # biases and GroupNorm shifts
            else:                                                 # keep activations O(1) through 30+ layers
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / fan_in ** 0.5)
    return ref.eval()


def to_old_diffusers_names(state):
    new_to_old = {'to_q.': 'query.', 'to_k.': 'key.', 'to_v.': 'value.', 'to_out.0.': 'proj_attn.'}
    out = {}
    for k, v in state.items():
        for new, old in new_to_old.items():
            if f'attentions.0.{new}' in k:
                k = k.replace(new, old)
        out[k] = v
    return out


def ldm_state_dict(ref):
    """The reference weights under LDM names, checked by diffusers' own LDM -> diffusers converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    ours = vae.create_autoencoder('sd-kl-f8')
    diffusers_state = ref.state_dict()
    ldm = {}
    for key, target in ours.state_dict().items():  # our names -> both official names
        value = diffusers_state[pretrained.official_key(key, 'diffusers', 4)]
        if value.dim() == 2:
            value = value[:, :, None, None]                       # LDM's attention layers are 1x1 convs
        ldm['first_stage_model.' + pretrained.official_key(key, 'ldm', 4)] = value.clone()
    back = convert_ldm_vae_checkpoint(ldm, dict(ref.config))     # the referee: diffusers' converter
    result = ref.load_state_dict(back, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in back.items():
        assert torch.equal(v, diffusers_state[k]), f'diffusers maps the LDM name to {k} with different values'
    return ldm


def compare(ours, ref, x, z, dtype):
    ours, ref, x, z = ours.to(dtype), ref.to(dtype), x.to(dtype), z.to(dtype)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        posterior = ours.posterior(x)
        decoded_ref, decoded = ref.decode(z).sample, ours.decode_raw(z)
        # scaled interface: ours.encode(x) = 0.18215 * mean, as SD's pipelines scale
        scaled = ours.encode(x)
    rows = []
    for name, a, b in (('posterior mean', posterior.mean, dist.mean), ('posterior logvar', posterior.logvar, dist.logvar),
                       ('decoder output', decoded, decoded_ref), ('encode() = 0.18215 mean', scaled, 0.18215 * dist.mean)):
        diff = (a - b).abs().max().item()
        rows.append((name, diff, diff / b.abs().max().item()))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, default=64, help='image side (multiple of 8)')
    parser.add_argument('--batch', type=int, default=2, help='images per comparison')
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    ref = reference_autoencoder()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=generator) * 2 - 1
    z = torch.randn(args.batch, 4, args.size // 8, args.size // 8, generator=generator)
    print(f'diffusers AutoencoderKL, SD KL-f8 config, {sum(p.numel() for p in ref.parameters()):,} parameters; '
          f'inputs {tuple(x.shape)}, latents {tuple(z.shape)}')
    with tempfile.TemporaryDirectory() as tmp:
        files = {'diffusers .safetensors': os.path.join(tmp, 'diffusion_pytorch_model.safetensors'),
                 'diffusers old attention names .bin': os.path.join(tmp, 'diffusion_pytorch_model.bin'),
                 'LDM .ckpt (first_stage_model.*)': os.path.join(tmp, 'sd.ckpt')}
        state = {k: v.contiguous() for k, v in ref.state_dict().items()}
        save_file(state, files['diffusers .safetensors'])
        torch.save(to_old_diffusers_names(state), files['diffusers old attention names .bin'])
        torch.save({'state_dict': ldm_state_dict(ref)}, files['LDM .ckpt (first_stage_model.*)'])
        worst = 0.0
        for label, path in files.items():
            ours = pretrained.load_sd_vae(path)
            print(f'\n{label}: {sum(p.numel() for p in ours.parameters()):,} parameters loaded')
            for dtype in (torch.float32, torch.float64):
                for name, diff, rel in compare(ours, ref, x, z, dtype):
                    print(f'  {str(dtype)[6:]:8s} {name:26s} max |diff| {diff:.2e}  (relative to max |ref| {rel:.2e})')
                    worst = max(worst, rel) if dtype == torch.float64 else worst
                ref.float()
        print(f'\nworst float64 relative difference: {worst:.2e} (the encode() row carries the float32 rounding of '
              '0.18215, 3e-8 relative: the latent scale is a float32 buffer)')


if __name__ == '__main__':
    main()
