"""Tests for dit.py: zero init, gradient flow, conditioning paths, patchify geometry, paper parameter counts, the
MAE/DiT position table and the official checkpoint loader."""
import copy
import math
import os

import pytest
import torch

import dit
from dit import create_dit, sincos_pos_embed_2d



pytestmark = pytest.mark.usefixtures('one_thread')

def small_dit(**overrides):
    """Two blocks of width 64 on 16x16x3 inputs: milliseconds per step on CPU."""
    return create_dit('DiT-tiny/2', **{**dict(input_size=16, in_channels=3, num_classes=5), **overrides})


def perturb(net, std=0.05, seed=1):
    """Add noise to every weight: adaLN-Zero gates and the final layer start at 0, which would otherwise make
    every conditioning test pass vacuously (a fresh DiT ignores its input)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator))
    return net.eval()


def inputs(n=2):
    generator = torch.Generator().manual_seed(2)
    return dict(x=torch.randn(n, 3, 16, 16, generator=generator), noise_level=torch.tensor([10.0, 700.0])[:n],
                y=torch.tensor([1, 4])[:n], context=torch.randn(n, 4, 8, generator=generator),
                x_cond=torch.randn(n, 2, 16, 16, generator=generator), aug_cond=torch.randn(n, 3, generator=generator))


def full_dit(**overrides):
    return small_dit(aug_dim=3, cond_channels=2, context_dim=8, **overrides)


# ----------------------------------------------------------------------------
# Initialisation and gradients

@pytest.mark.parametrize('learn_sigma', [False, True])
def test_fresh_network_outputs_zeros(learn_sigma):
    out = full_dit(learn_sigma=learn_sigma)(**inputs())
    assert out.shape == (2, 6 if learn_sigma else 3, 16, 16)   # default: shaped like x; learned sigma: 2C
    assert torch.all(out == 0)


def test_adaln_zero_blocks_start_as_identity():
    net = full_dit()
    data = inputs()
    tokens = torch.randn(2, 64, 64)
    c = torch.randn(2, 64)
    for block in net.blocks:
        torch.testing.assert_close(block(tokens, c, data['context']), tokens)


def test_gradients_reach_every_parameter():
    net = perturb(full_dit(learn_sigma=True)).train()
    out = net(**inputs(), context_mask=torch.tensor([[True, True, False, False], [True] * 4]))
    out.square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f'no gradient reaches {missing}'


# ----------------------------------------------------------------------------
# Geometry: patchify, unpatchify, position embeddings

@pytest.mark.parametrize('patch_size', [2, 4, 8])
def test_unpatchify_inverts_patchify(patch_size):
    """Token t = (row, col) in raster order holds its p x p patch; unpatchify must put it back in place."""
    net = small_dit(patch_size=patch_size)
    x = torch.randn(2, 3, 16, 16)
    p, g = patch_size, 16 // patch_size
    # patchify by hand: (N, C, g, p, g, p) -> (N, g*g, p*p*C) with the (p, p, C) order the final layer uses
    tokens = x.reshape(2, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 3)
    torch.testing.assert_close(net.unpatchify(tokens, g, g), x)


def test_sincos_position_similarity_depends_only_on_offset():
    """<PE(p), PE(p')> = sum_k cos(w_k (p - p')) per axis: the fixed table encodes relative offsets."""
    pe = torch.from_numpy(sincos_pos_embed_2d(64, 8, 8)).reshape(8, 8, 64)
    torch.testing.assert_close(pe[1, 2] @ pe[3, 5], pe[4, 1] @ pe[6, 4])        # same offset (2, 3)
    assert abs(pe[1, 2] @ pe[3, 5] - pe[1, 2] @ pe[3, 6]) > 1e-3                 # a different offset differs
    assert torch.unique(pe.reshape(64, 64), dim=0).shape[0] == 64               # every position distinct


@pytest.mark.parametrize('size', [16, 24])
def test_other_input_sizes(size):
    net = perturb(small_dit(num_classes=0))
    out = net(torch.randn(1, 3, size, size), torch.tensor([5.0]))
    assert out.shape == (1, 3, size, size) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------
# Conditioning paths

def test_noise_level_and_class_conditioning():
    net = perturb(small_dit())
    x, level = torch.randn(2, 3, 16, 16), torch.tensor([100.0, 100.0])
    with torch.no_grad():
        out = net(x, level, y=torch.tensor([0, 0]))
        out_y = net(x, level, y=torch.tensor([2, 2]))
        out_edm = net(x, torch.tensor([-1.0, -1.0]), y=torch.tensor([0, 0]))   # EDM c_noise range
        out_edm2 = net(x, torch.tensor([0.5, 0.5]), y=torch.tensor([0, 0]))
        out_none, out_null = net(x, level), net(x, level, y=torch.tensor([5, 5]))
    assert (out - out_y).abs().max() > 1e-3
    assert (out_edm - out_edm2).abs().max() > 1e-3
    torch.testing.assert_close(out_none, out_null)            # y=None means "no class"


def test_aug_cond_and_x_cond():
    net = perturb(full_dit())
    data = inputs()
    x, level = data['x'], data['noise_level']
    with torch.no_grad():
        out = net(x, level)
        torch.testing.assert_close(net(x, level, aug_cond=torch.zeros(2, 3)), out)     # zeros = absent
        torch.testing.assert_close(net(x, level, x_cond=torch.zeros(2, 2, 16, 16)), out)
        assert (net(x, level, aug_cond=data['aug_cond']) - out).abs().max() > 1e-3
        assert (net(x, level, x_cond=data['x_cond']) - out).abs().max() > 1e-3


def test_cross_attention_uses_context_and_ignores_padding():
    net = perturb(small_dit(context_dim=8))
    x, level = torch.randn(2, 3, 16, 16), torch.tensor([100.0, 400.0])
    context = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, False, True, False, False], [True, True, True, True, False]])
    with torch.no_grad():
        out = net(x, level, context=context, context_mask=mask)
        changed_padding = context.clone()
        changed_padding[~mask] = 100 * torch.randn(int((~mask).sum()), 8)
        out_padding = net(x, level, context=changed_padding, context_mask=mask)
        changed_kept = context.clone()
        changed_kept[0, 2] += 1
        out_kept = net(x, level, context=changed_kept, context_mask=mask)
        out_none = net(x, level)
        out_all_padding = net(x, level, context=context, context_mask=torch.zeros(2, 5, dtype=torch.bool))
    torch.testing.assert_close(out_padding, out)
    assert (out_kept[0] - out[0]).abs().max() > 1e-3
    torch.testing.assert_close(out_kept[1], out[1])
    assert (out - out_none).abs().max() > 1e-3
    torch.testing.assert_close(out_all_padding, out_none)


# ----------------------------------------------------------------------------
# Paper configurations

# Peebles & Xie 2023, Table 4 (and the official README): parameters in millions for 256x256 images,
# i.e. 32x32x4 latents, 1000 classes, learned sigma. Their count includes the fixed position table.
PAPER_PARAMS_M = {'DiT-S/2': 33, 'DiT-B/2': 130, 'DiT-L/2': 458, 'DiT-XL/2': 675}


def paper_count(name):
    with torch.device('meta'):                               # shapes only: no memory, instant even for XL
        net = create_dit(name, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    return sum(p.numel() for p in net.parameters()) + net.pos_embed.numel()


@pytest.mark.parametrize('name', list(PAPER_PARAMS_M))
def test_parameter_counts_match_paper(name):
    n = paper_count(name)
    assert abs(n / 1e6 - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.005, n


def test_dit_xl2_exact_count_and_patch_sizes():
    assert paper_count('DiT-XL/2') == 675_129_632            # the official training log's count
    # The patch size changes only the patch embedding (p*p*C*d weights), the final linear (d*p*p*2C + p*p*2C)
    # and the position table (T*d, T = (32/p)^2): the transformer blocks are the same (Sec. 3.2).
    d, C = 1152, 4
    for p in (4, 8):
        expected = (p * p - 4) * (C * d + 2 * C * d + 2 * C) - d * (16 * 16 - (32 // p) ** 2)
        assert paper_count(f'DiT-XL/{p}') - paper_count('DiT-XL/2') == expected
    assert set(dit.DIT_CONFIGS) >= {f'DiT-{s}/{p}' for s in ('S', 'B', 'L', 'XL') for p in (2, 4, 8)}


# ----------------------------------------------------------------------------
# Precision and compilation

def test_autocast_bf16_cpu_close_to_fp32():
    net = perturb(full_dit())
    data = inputs()
    with torch.no_grad():
        ref = net(**data)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = net(**data)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.05


@pytest.mark.parametrize('size', [16, 24])
def test_float64_network_runs_and_agrees_with_float32(size):
    """net.double() runs (the timestep features, the position table and aug_cond follow the network's dtype), agrees
    with the float32 network to float32 round-off, and its time MLP sees float64-precision features. Size 24 takes
    the rebuilt position table of another resolution."""
    net = perturb(full_dit())
    generator = torch.Generator().manual_seed(3)
    data = {**inputs(), 'x': torch.randn(2, 3, size, size, generator=generator),
            'x_cond': torch.randn(2, 2, size, size, generator=generator)}
    net64 = copy.deepcopy(net).double()
    data64 = {k: v.double() if v.is_floating_point() else v for k, v in data.items()}
    seen = []
    net64.t_embedder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        out32, out64 = net(**data), net64(**data64)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=0, atol=1e-5 * out32.abs().max().item())
    half = net64.freq_dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    angles = data64['noise_level'][:, None] * freqs
    features = torch.cat([angles.cos(), angles.sin()], dim=1) + net64.aug_embedder(data64['aug_cond'])
    torch.testing.assert_close(seen[0], features, rtol=0, atol=1e-12)     # float32 angles to 700: ~3e-5 off


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast_cuda(dtype):
    net = perturb(full_dit()).cuda()
    data = {k: v.cuda() for k, v in inputs().items()}
    with torch.no_grad():
        ref = net(**data)
        with torch.autocast('cuda', dtype=dtype):
            out = net(**data)
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.05


def test_torch_compile_captures_one_graph():
    """Dynamo traces the whole forward without graph breaks (backend='eager' skips code generation, so it is fast)."""
    net = perturb(full_dit())
    data = inputs()
    compiled = torch.compile(net, backend='eager', fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**data), net(**data))


@pytest.mark.skipif(not os.environ.get('RUN_COMPILE_TESTS'),
                    reason='inductor compilation takes minutes on a 2-core CPU; set RUN_COMPILE_TESTS=1 to run it')
def test_torch_compile_matches_eager():
    net = perturb(full_dit())
    data = inputs()
    compiled = torch.compile(net)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**data), net(**data), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------
# The official layout: MAE/DiT position table and the official checkpoint names

def test_position_table_is_the_mae_dit_formula():
    """MAE's get_2d_sincos_pos_embed, written out for a 2 x 3 grid of width 8: token (r, c) in raster order is
    [sin(c w0), sin(c w1), cos(c w0), cos(c w1), sin(r w0), sin(r w1), cos(r w0), cos(r w1)], w_k = 10000^(-k/2).
    (Planted mistake caught: the row half first, this file's layout before issue 18.)"""
    w = [1.0, 10000 ** -0.5]
    expected = []
    for r in range(2):
        for c in range(3):
            expected.append([math.sin(c * w[0]), math.sin(c * w[1]), math.cos(c * w[0]), math.cos(c * w[1]),
                             math.sin(r * w[0]), math.sin(r * w[1]), math.cos(r * w[0]), math.cos(r * w[1])])
    torch.testing.assert_close(torch.from_numpy(sincos_pos_embed_2d(8, 2, 3)).double(),
                               torch.tensor(expected, dtype=torch.float64), atol=1e-7, rtol=0)


def official_dit_state_dict(depth=12, hidden=384, patch=2, channels=4, num_classes=1000, grid=4, seed=0):
    """A state dict with the names and shapes of facebookresearch/DiT models.py (DiT-S/2 by default; random values),
    written out from their module tree, not from ours: PatchEmbed.proj, TimestepEmbedder.mlp, LabelEmbedder.
    embedding_table (+1 row for "no class"), timm Attention qkv/proj and Mlp fc1/fc2, adaLN_modulation.1, FinalLayer.
    The frozen pos_embed is the MAE table written by hand (column half first)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {'x_embedder.proj.weight': (hidden, channels, patch, patch), 'x_embedder.proj.bias': (hidden,),
              't_embedder.mlp.0.weight': (hidden, 256), 't_embedder.mlp.0.bias': (hidden,),
              't_embedder.mlp.2.weight': (hidden, hidden), 't_embedder.mlp.2.bias': (hidden,),
              'y_embedder.embedding_table.weight': (num_classes + 1, hidden)}
    for i in range(depth):
        shapes.update({f'blocks.{i}.attn.qkv.weight': (3 * hidden, hidden), f'blocks.{i}.attn.qkv.bias': (3 * hidden,),
                       f'blocks.{i}.attn.proj.weight': (hidden, hidden), f'blocks.{i}.attn.proj.bias': (hidden,),
                       f'blocks.{i}.mlp.fc1.weight': (4 * hidden, hidden), f'blocks.{i}.mlp.fc1.bias': (4 * hidden,),
                       f'blocks.{i}.mlp.fc2.weight': (hidden, 4 * hidden), f'blocks.{i}.mlp.fc2.bias': (hidden,),
                       f'blocks.{i}.adaLN_modulation.1.weight': (6 * hidden, hidden),
                       f'blocks.{i}.adaLN_modulation.1.bias': (6 * hidden,)})
    out = patch * patch * 2 * channels                                   # learned sigma: 2C output channels
    shapes.update({'final_layer.linear.weight': (out, hidden), 'final_layer.linear.bias': (out,),
                   'final_layer.adaLN_modulation.1.weight': (2 * hidden, hidden),
                   'final_layer.adaLN_modulation.1.bias': (2 * hidden,)})
    sd = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    omega = [10000 ** (-k / (hidden // 4)) for k in range(hidden // 4)]
    pos = torch.tensor([[math.sin(c * w) for w in omega] + [math.cos(c * w) for w in omega]
                        + [math.sin(r * w) for w in omega] + [math.cos(r * w) for w in omega]
                        for r in range(grid) for c in range(grid)])
    sd['pos_embed'] = pos[None].float()
    return sd


# Where each official name must land in our module tree (written by hand, not by the loader's table).
def our_tensor(net, key):
    parts = key.split('.')
    if parts[0] == 'blocks':
        block = net.blocks[int(parts[1])]
        rest = parts[2:]
        if rest[0] == 'mlp':
            layer = block.mlp[{'fc1': 0, 'fc2': 2}[rest[1]]]
        elif rest[0] == 'attn':
            layer = getattr(block.attn, rest[1])
        else:
            layer = block.adaLN_modulation[1]
        return getattr(layer, rest[-1])
    layer = {'x_embedder.proj': net.x_embedder, 't_embedder.mlp.0': net.t_embedder[0],
             't_embedder.mlp.2': net.t_embedder[2], 'y_embedder.embedding_table': net.y_embedder,
             'final_layer.linear': net.final_layer.linear,
             'final_layer.adaLN_modulation.1': net.final_layer.adaLN_modulation[1]}['.'.join(parts[:-1])]
    return getattr(layer, parts[-1])


def test_official_dit_loader_maps_every_key():
    """Every official key lands on the parameter of the same role, and every parameter of ours is filled.
    (Planted mistake caught: fc1/fc2 swapped in the rename table.)"""
    sd = official_dit_state_dict()
    net = dit.load_official_dit(sd)
    assert net.config['depth'] == 12 and net.config['num_heads'] == 6 and net.config['input_size'] == 8
    assert net.out_channels == 8 and net.num_classes == 1000          # learned sigma; index 1000 = no class
    for key, value in sd.items():
        if key != 'pos_embed':
            assert torch.equal(our_tensor(net, key), value), key
    assert sum(p.numel() for p in net.parameters()) == sum(v.numel() for k, v in sd.items() if k != 'pos_embed')
    torch.testing.assert_close(net.pos_embed, sd['pos_embed'], atol=1e-6, rtol=0)


@pytest.mark.parametrize('break_it, message', [
    (lambda sd: sd.update({'blocks.0.attn.q_norm.weight': torch.ones(64)}), 'unknown keys'),
    (lambda sd: sd.pop('blocks.3.mlp.fc2.bias'), 'missing parameters'),
    (lambda sd: sd.update({'blocks.1.attn.qkv.weight': torch.zeros(384, 384)}), 'shape mismatches'),
    # our old layout: the row half first; the same weights would compute another function
    (lambda sd: sd.update({'pos_embed': torch.cat(sd['pos_embed'].chunk(2, dim=-1)[::-1], dim=-1)}), 'position table'),
])
def test_official_dit_loader_refuses_what_is_not_official(break_it, message):
    """(Planted mistake caught: no checks and strict=False loading, which accepts all four.)"""
    sd = official_dit_state_dict()
    break_it(sd)
    with pytest.raises(ValueError, match=message):
        dit.load_official_dit(sd)


def test_official_dit_loader_refuses_other_files():
    with pytest.raises(ValueError, match='not an official DiT state dict'):
        dit.load_official_dit({'model.diffusion_model.input_blocks.0.0.weight': torch.zeros(1)})
