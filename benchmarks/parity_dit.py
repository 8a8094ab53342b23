"""Parity of dit.py with the official DiT code (facebookresearch/DiT models.py and its diffusion package).

No DiT weights are needed to check the architecture and the loader: the script builds the official DiT with every
weight random (the official init zeroes the adaLN-Zero gates and the final layer, which would make any two
networks agree), saves its state dict exactly as the released DiT-XL-2-*.pt files are saved (a plain state dict
under the official names, with the frozen pos_embed), loads that file with dit.load_official_dit, and compares
  1. the network outputs (eps and the variance channels) on the same inputs, classes and steps, the "no class"
     index 1000 included;
  2. the x0 estimate: the official GaussianDiffusion.p_mean_variance(...)['pred_xstart'] at step t against our
     sigma-frame denoiser D(x_t / sqrt(abar_t), sigma_t) with pretrained.py's eps-half wrapper and DDPM schedule;
  3. for reference, our network with the position table's halves swapped (this file's layout before issue 18).
Prints largest absolute differences and their size relative to the largest output.

Not part of the test suite. The official code needs timm, which imports torchvision; a torchvision build for this
torch is not available here, so a stand-in that only satisfies timm's import-time names may be put on the path
(DiT uses timm's PatchEmbed, Attention and Mlp, which are plain torch):
    (fetch github:facebookresearch/DiT, then) git -C <mirror> archive HEAD models.py diffusion | tar -x -C /tmp/dit_ref
    pip install --no-deps --target /tmp/ref_pkgs_pretrained timm
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/ref_pkgs_pretrained:/tmp/pretrained_stubs \\
        python benchmarks/parity_dit.py --dit-repo /tmp/dit_ref [--model DiT-S/2] [--input-size 32]
"""
import argparse
import importlib.util
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dit  # noqa: E402
import pretrained  # noqa: E402


def official_modules(repo):
    """models.DiT_models and diffusion.create_diffusion from a checkout of facebookresearch/DiT."""
    # Loaded under their own names: the official package 'diffusion' would clash with this repository's diffusion.py.
    modules = {}
    for name, path in (('official_dit_models', 'models.py'), ('official_dit_diffusion', 'diffusion/__init__.py')):
        spec = importlib.util.spec_from_file_location(name, os.path.join(repo, path))
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[name] = modules[name]
        spec.loader.exec_module(modules[name])
    return modules['official_dit_models'].DiT_models, modules['official_dit_diffusion'].create_diffusion


def randomise(net, std=0.05, seed=0):
    """Every learned tensor random; pos_embed (frozen, requires_grad=False) keeps the official sin-cos table."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return net.eval()


def report(label, ours, ref):
    diff = (ours.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    print(f'{label:<58} max |diff| {diff:.3e}   max |ref| {scale:.3e}   relative {diff / scale:.2e}')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dit-repo', required=True, help='folder with the official models.py and diffusion/')
    p.add_argument('--model', default='DiT-S/2', help="official model name, e.g. DiT-S/2 or DiT-XL/2")
    p.add_argument('--input-size', type=int, default=32, help='latent size (32 for 256x256 images)')
    p.add_argument('--batch', type=int, default=4)
    args = p.parse_args()
    torch.manual_seed(0)
    DiT_models, create_diffusion = official_modules(args.dit_repo)

    official = randomise(DiT_models[args.model](input_size=args.input_size, num_classes=1000, learn_sigma=True))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'DiT-test.pt')
        torch.save(official.state_dict(), path)                 # what the released files hold
        ours = dit.load_official_dit(path)
    print(f'{args.model}: {sum(p.numel() for p in ours.parameters()):,} parameters loaded from '
          f'{len(official.state_dict())} official keys')

    n, size = args.batch, args.input_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, size, size, generator=g)
    t = torch.tensor([0, 10, 500, 999][:n] + [250] * max(0, n - 4))
    y = torch.tensor([1, 207, 999, 1000][:n] + [3] * max(0, n - 4))   # 1000 = the "no class" row
    with torch.no_grad():
        ref_out = official(x, t, y)
        our_out = ours(x, t.float(), y)
        report('network output, eps channels', our_out[:, :4], ref_out[:, :4])
        report('network output, variance channels', our_out[:, 4:], ref_out[:, 4:])
        # In float64 the gap stays at round-off. The official DiT computes the sinusoidal features in float32
        # (t.float()) and feeds them to a float64 MLP, so its MLP input is cast up here; ours is told to compute them
        # in float32 too (dit.feature_dtype), then restored.
        hook = official.t_embedder.mlp.register_forward_pre_hook(lambda module, inputs: (inputs[0].double(),))
        feature_dtype, dit.feature_dtype = dit.feature_dtype, lambda dtype: torch.float32
        report('network output, both in float64', ours.double()(x.double(), t.double(), y),
               official.double()(x.double(), t, y))
        dit.feature_dtype = feature_dtype
        hook.remove()
        ours, official = ours.float(), official.float()

        # The denoiser: official pred_xstart vs our sigma-frame D, through pretrained.py's wrapper and schedule.
        gd = create_diffusion('')                                   # 1000 linear steps, learned sigma
        pred_xstart = gd.p_mean_variance(official, x, t, clip_denoised=False, model_kwargs=dict(y=y))['pred_xstart']
        diffusion = pretrained.ddpm_linear_diffusion()
        abar = torch.from_numpy(gd.alphas_cumprod)[t]
        sigma = ((1 - abar) / abar).sqrt().float()
        denoised = diffusion.denoiser(pretrained.LearnedSigmaEps(ours, 4))(x / abar.sqrt().float()[:, None, None, None],
                                                                          sigma, y=y)
        report('x0 estimate: p_mean_variance pred_xstart vs our D(x, sigma)', denoised, pred_xstart)
        ab_ours = diffusion.schedule.alpha_bar
        report('alpha_bar table (1000 steps)', ab_ours, torch.from_numpy(gd.alphas_cumprod))

        # What the issue measured: the same weights with the position table's halves swapped (rows first).
        ours.pos_embed.copy_(torch.cat(ours.pos_embed.chunk(2, dim=-1)[::-1], dim=-1))
        report('for reference: rows-first position table (old layout)', ours(x, t.float(), y)[:, :4], ref_out[:, :4])


if __name__ == '__main__':
    main()
