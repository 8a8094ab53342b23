"""Parity of unet.py's 'ddpm-cifar10' U-Net with diffusers' UNet2DModel in the google/ddpm-cifar10-32 layout.

The public DDPM CIFAR-10 weights (143 MB) are not needed to check the architecture and the loader: the script
builds diffusers' UNet2DModel from google/ddpm-cifar10-32's config.json, gives every tensor a random value (the
default init leaves GroupNorm at identity and biases at zero, which would hide a swapped norm or bias), saves its
state dict under the official names (current attention names, and the pre-0.14 query/key/value/proj_attn names
of the released file), loads each file with unet.load_diffusers_unet, and compares
  1. the network outputs (eps) on the same inputs and steps, in float32 and float64;
  2. the x0 estimate of diffusers' DDPMScheduler (its alphas_cumprod, x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar))
     against our sigma-frame denoiser D(x_t / sqrt(abar_t), sigma_t) on pretrained.py's DDPM schedule;
  3. for reference, the same weights in a U-Net with this file's other choices (cos-sin timestep features, then
     also the symmetric downsampling pad): the two differences issue 18 found.
Prints largest absolute differences and their size relative to the largest output.

Not part of the test suite (diffusers is not a dependency). Run with diffusers on PYTHONPATH:
    pip install --no-deps --target /tmp/ref_pkgs diffusers huggingface_hub safetensors filelock regex
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/ref_pkgs python benchmarks/parity_ddpm.py [--batch 4]
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pretrained  # noqa: E402
import unet  # noqa: E402
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402  (the reference implementation)

# google/ddpm-cifar10-32 config.json (unet) and scheduler_config.json
DDPM_CIFAR10_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                           down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
                           up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
                           layers_per_block=2, attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
                           downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, act_fn='silu',
                           mid_block_scale_factor=1, center_input_sample=False, time_embedding_type='positional',
                           resnet_time_scale_shift='default')
OLD_ATTENTION_NAMES = {'.to_q.': '.query.', '.to_k.': '.key.', '.to_v.': '.value.', '.to_out.0.': '.proj_attn.'}


def reference_unet(std=0.05, seed=0):
    torch.manual_seed(seed)
    ref = UNet2DModel(**DDPM_CIFAR10_CONFIG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            base = 1.0 if name.endswith('weight') and p.dim() == 1 else 0.0    # norms around 1, everything varied
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return ref.eval()


def report(label, ours, ref):
    diff = (ours.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    print(f'{label:<62} max |diff| {diff:.3e}   max |ref| {scale:.3e}   relative {diff / scale:.2e}')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch', type=int, default=4)
    args = p.parse_args()
    ref = reference_unet()
    state = ref.state_dict()
    n = args.batch
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=g)
    t = torch.tensor([0, 10, 500, 999][:n] + [250] * max(0, n - 4))
    with torch.no_grad():
        ref_eps = ref(x, t).sample
        with tempfile.TemporaryDirectory() as folder:
            for layout, sd in (('current names', state),
                               ('pre-0.14 attention names', {next((k.replace(a, b) for a, b in OLD_ATTENTION_NAMES.items()
                                                                   if a in k), k): v for k, v in state.items()})):
                path = os.path.join(folder, 'diffusion_pytorch_model.bin')
                torch.save(sd, path)
                ours = unet.load_diffusers_unet(path)
                report(f'network output (eps), {layout}', ours(x, t.float()), ref_eps)
        print(f'{sum(p.numel() for p in ours.parameters()):,} parameters, {len(state)} official keys')
        # In float64 the gap shrinks by orders of magnitude if the float32 one above is only round-off. diffusers
        # computes the sinusoidal features in float32 even in a float64 model; ours would use float64, so for this
        # comparison ours is told to do as diffusers does (unet.feature_dtype), then restored.
        feature_dtype, unet.feature_dtype = unet.feature_dtype, lambda dtype: torch.float32
        report('network output (eps), both in float64', ours.double()(x.double(), t.double()),
               ref.double()(x.double(), t).sample)
        unet.feature_dtype = feature_dtype
        ours, ref = ours.float(), ref.float()

        # The x0 estimate: DDPMScheduler's schedule and eps -> x0 formula vs our sigma-frame denoiser.
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear')
        abar = scheduler.alphas_cumprod.double()[t]
        x0_ref = (x.double() - (1 - abar).sqrt()[:, None, None, None] * ref_eps.double()) / abar.sqrt()[:, None, None, None]
        diffusion = pretrained.ddpm_linear_diffusion()
        sigma = ((1 - abar) / abar).sqrt().float()
        denoised = diffusion.denoiser(ours)(x / abar.sqrt().float()[:, None, None, None], sigma)
        report('x0 estimate: DDPMScheduler formula vs our D(x, sigma)', denoised, x0_ref)
        report('alpha_bar table (1000 steps; diffusers keeps float32)', diffusion.schedule.alpha_bar,
               scheduler.alphas_cumprod.double())

        # The two details, one at a time: the same weights in U-Nets with this file's other choices.
        converted = unet.convert_diffusers_unet(state, ours)
        for label, overrides in (('cos-sin timestep features', dict(timestep_features='cos_sin')),
                                 ('... and the symmetric downsampling pad', dict(timestep_features='cos_sin',
                                                                                 downsample_pad='symmetric'))):
            other = unet.create_unet('ddpm-cifar10', **overrides).eval()
            other.load_state_dict(converted)
            report(f'for reference: {label}', other(x, t.float()), ref_eps)


if __name__ == '__main__':
    main()
