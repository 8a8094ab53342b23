"""sample.py against the attack of issue 23 (its sample-side findings): no file is replaced without --overwrite, the
default name never replaces an earlier result, Ctrl-C keeps the finished batches, the rescue write never raises,
flags of a mode that is not selected and out-of-range sampler values are refused by name before anything is
loaded, guidance that cannot act is refused, and a guiding model of another kind is refused naming both files.

The checkpoints are tiny hand-built U-Nets (random weights, no training), saved once per module: every check here
happens before or around sampling, so 2 steps of a 16-px micro network are all the sampling there is."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoints
import sample
from programs import run_program
from unet import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = dict(in_channels=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
           image_size=16, head_channels=8, norm_groups=8, num_classes=2)
NAMES = ['a', 'b', 'c']


def save_ckpt(path, task='diffusion', resolution=16, frames=0, num_classes=2, dataset='shapes', **extra):
    """A tiny train.py-shaped checkpoint: the network's config, random weights as both raw and EMA weights."""
    net_config = dict(NET, image_size=resolution, num_classes=num_classes, temporal_attention=bool(frames))
    if task == 'superres':
        net_config['cond_channels'] = 3
        extra['superres'] = {'low_res': resolution // 2, 'noise_aug_max': 0.0, 'aug_dim': 0, 'upsample': 'bicubic'}
    torch.manual_seed(0)
    state = UNet(**net_config).state_dict()
    config = {'task': task, 'model': 'unet', 'config_name': 'micro', 'net': net_config,
              'diffusion': {'prediction': 'edm', 'schedule': 'edm', 't_sampler': 'uniform', 'sigma_data': 0.5},
              'data': {'dataset': dataset, 'resolution': resolution, 'channels': 3, 'num_classes': num_classes,
                       'class_names': NAMES[:num_classes], 'frames': frames}, **extra}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'config': config, 'model': state, 'ema': state, 'step': 1, 'args': {}}, path)
    return str(path)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpts')
    return {'run': save_ckpt(root / 'run' / 'ckpt.pt'), 'early': save_ckpt(root / 'early' / 'ckpt.pt'),
            'uncond': save_ckpt(root / 'uncond' / 'ckpt.pt', num_classes=0),
            'sr': save_ckpt(root / 'sr' / 'ckpt.pt', task='superres'),
            'video': save_ckpt(root / 'video' / 'ckpt.pt', resolution=8, frames=4),
            'res8': save_ckpt(root / 'res8' / 'ckpt.pt', resolution=8),
            'classes3': save_ckpt(root / 'classes3' / 'ckpt.pt', num_classes=3),
            'mnist': save_ckpt(root / 'mnist' / 'ckpt.pt', dataset='mnist')}


def run(*argv):
    """sample.py in this process with 2 samples of 2 steps (the checks come before any real work)."""
    return sample.main(sample.parse_args(['-n', '2', '--steps', '2', *map(str, argv)]))


# ----------------------------------------------------------------------------------------------------
# 1. Nothing is replaced: an existing output is refused before sampling (--overwrite allows it), and the default
# name moves on to the next free one. Attack cases O-sample-out-exists, O-sample-npz-exists,
# O-sample-out-is-run-logpng, O-sample-video-gif-exists, O-sample-default-out-twice.

@pytest.mark.parametrize('flag,name', [('--out', 's.png'), ('--npz', 'd.npz'), ('--out', 'log.png')])
def test_an_existing_output_is_refused_before_sampling_and_kept(ckpts, tmp_path, monkeypatch, flag, name):
    """(Planted: check_outputs with overwrite=True, as before -> the file is replaced -> fails.)"""
    existing = tmp_path / name
    existing.write_bytes(b'a dataset or a run log')
    monkeypatch.setattr(sample, 'generate', lambda *a, **k: pytest.fail('sampled before refusing'))
    argv = ['--ckpt', ckpts['run'], '--out', existing if flag == '--out' else tmp_path / 'new.png']
    with pytest.raises(SystemExit, match=f"{flag} .*already exists.*--overwrite"):
        run(*argv, *(['--npz', existing] if flag == '--npz' else []))
    assert existing.read_bytes() == b'a dataset or a run log'


def test_overwrite_allows_replacing(ckpts, tmp_path):
    (tmp_path / 's.png').write_bytes(b'old')
    run('--ckpt', ckpts['run'], '--out', tmp_path / 's.png', '--overwrite')
    assert (tmp_path / 's.png').read_bytes()[:4] == b'\x89PNG'


def test_a_videos_gif_beside_out_is_checked_before_sampling(ckpts, tmp_path, monkeypatch):
    """The .gif written beside a video's --out is an output too. (Planted: only --out checked -> fails.)"""
    (tmp_path / 'v.gif').write_bytes(b'old gif')
    monkeypatch.setattr(sample, 'generate', lambda *a, **k: pytest.fail('sampled before refusing'))
    with pytest.raises(SystemExit, match=r"\.gif .*already exists"):
        run('--ckpt', ckpts['video'], '--out', tmp_path / 'v.png')
    assert (tmp_path / 'v.gif').read_bytes() == b'old gif'


def test_save_stages_files_are_checked_before_sampling(ckpts, tmp_path):
    stage0 = tmp_path / 'c_stage0.png'
    stage0.write_bytes(b'old')
    args = sample.parse_args(['--ckpt', ckpts['res8'], '--out', str(tmp_path / 'c.png'), '--save-stages',
                              '--cascade', f'[{{"ckpt": "{ckpts["sr"]}"}}]'])
    sample.check_args(args)
    with pytest.raises(SystemExit, match='--save-stages .*c_stage0.png.*already exists'):
        sample.resolve_outputs(args, checkpoints.load_checkpoint(ckpts['res8'])['config'])
    assert stage0.read_bytes() == b'old'


def test_the_default_name_never_replaces_an_earlier_result(tmp_path, capsys):
    """Two calls without --out: samples.png, then samples_1.png, and the first is kept. (Planted: the old fixed
    default -> the second call replaces samples.png -> fails.)"""
    ckpt = save_ckpt(tmp_path / 'run' / 'ckpt.pt')
    run('--ckpt', ckpt)
    first = (tmp_path / 'run' / 'samples.png').read_bytes()
    (tmp_path / 'run' / 'samples.png').write_bytes(first + b'marker')        # tell the files apart
    run('--ckpt', ckpt, '--seed', '1')
    assert (tmp_path / 'run' / 'samples.png').read_bytes() == first + b'marker'
    assert (tmp_path / 'run' / 'samples_1.png').is_file()
    assert 'samples.png exists: writing to' in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# 2. Ctrl-C keeps the finished batches (I-sample-sigint); the rescue write never raises (F-sample-fsize).

def test_ctrl_c_writes_the_finished_batches_and_says_how_many(ckpts, tmp_path, monkeypatch):
    """Ctrl-C in the third batch of 2: the first 4 samples are written to --out and --npz, with one line.
    (Planted: no SamplingInterrupted handling -> KeyboardInterrupt propagates, nothing written -> fails.)"""
    calls = []
    real = sample.run_sampler

    def interrupted_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(sample, 'run_sampler', interrupted_third)
    with pytest.raises(SystemExit, match=r'interrupted \(Ctrl-C\): wrote the 4 finished samples of 6'):
        try:
            sample.main(sample.parse_args(['--ckpt', ckpts['run'], '-n', '6', '--batch', '2', '--steps', '2',
                                           '--out', str(tmp_path / 's.png'), '--npz', str(tmp_path / 's.npz')]))
        except KeyboardInterrupt:                 # would stop pytest itself: a failure of this test instead
            pytest.fail('Ctrl-C escaped sample.main: the finished batches were not written')
    with np.load(tmp_path / 's.npz') as z:
        assert z['samples'].shape == (4, 16, 16, 3) and z['labels'].tolist() == [0, 1, 0, 1]
    assert (tmp_path / 's.png').is_file()


def test_ctrl_c_from_the_command_line_is_one_line_without_traceback(ckpts, tmp_path):
    """The same through `python sample.py` (a real KeyboardInterrupt raised by the sampler in the second batch).
    (Planted: __main__ without its KeyboardInterrupt handling and generate without SamplingInterrupted -> fails.)"""
    patch = ('import samplers\nreal = samplers.SAMPLERS["heun"]\ncalls = []\n'
             'def second_kills(*a, **k):\n    calls.append(1)\n    return kill() if len(calls) == 2 else real(*a, **k)\n'
             'samplers.SAMPLERS["heun"] = second_kills\n')
    with pytest.raises(SystemExit) as e:
        run_program('sample.py', ['--ckpt', ckpts['run'], '-n', '4', '--batch', '2', '--steps', '2',
                                  '--out', tmp_path / 's.png'], patch=patch, timeout=60)
    assert 'Traceback' not in str(e.value) and 'wrote the 2 finished samples of 4' in str(e.value), str(e.value)
    assert (tmp_path / 's.png').is_file()


def test_a_failed_write_under_a_real_file_size_limit_never_raises(tmp_path):
    """RLIMIT_FSIZE (SIGXFSZ ignored): the .npz and the rescue torch.save both hit the limit (torch raises
    RuntimeError 'unexpected pos'); the user gets one error line, no traceback, and no half rescue file.
    (Planted: the rescue catching only OSError -> RuntimeError traceback -> fails.)"""
    code = ('import resource, signal, sys, tempfile, torch, sample\n'
            'signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n'
            f'tempfile.tempdir = {str(tmp_path)!r}\n'
            'resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))\n'
            'x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1\n'
            f'sample.write_samples(x, torch.zeros(16, dtype=torch.long), {str(tmp_path / "s.png")!r}, '
            f'{str(tmp_path / "a.npz")!r})\n')
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=60)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert 'writing the samples failed' in result.stderr and 'failed too' in result.stderr
    assert not [n for n in os.listdir(tmp_path) if n.startswith(('samples_rescued_', '.a.npz'))]


def test_the_rescue_file_has_a_unique_name_and_holds_the_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(sample.tempfile, 'tempdir', str(tmp_path))
    (tmp_path / 'folder.png').mkdir()                     # the grid cannot be written: a folder has its name
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(SystemExit, match='kept in') as e:
        sample.write_samples(x, None, str(tmp_path / 'folder.png' / 'x' / 's.png'), None)
    path = str(e.value).split('kept in ')[1].split(' (torch.load')[0]
    assert os.path.basename(path) != f'samples_rescued_{os.getpid()}.pt'
    assert torch.equal(torch.load(path, weights_only=True)['samples'], x)


# ----------------------------------------------------------------------------------------------------
# 3. and 4. Flags of a mode that is not selected, and out-of-range values: refused by name before loading.

NOT_APPLICABLE = [  # (flags, message), attack ids S-rho-on-loglinear ... M-inverse-cascade
    (['--schedule', 'loglinear', '--rho', '3'], '--rho applies to --schedule karras'),
    (['--flow-shift', '3'], '--flow-shift applies to --schedule flow'),
    (['--guidance-low', '3'], '--guidance-low applies to --guidance-schedule oscillating'),
    (['--guidance-start', '3'], '--guidance-start applies to --guidance-schedule increasing'),
    (['--guidance-num-high', '2'], '--guidance-num-high applies to --guidance-schedule oscillating'),
    (['--threshold-percentile', '0.9'], '--threshold-percentile applies to --threshold dynamic'),
    (['--operator', 'inpaint_box'], '--operator applies to --inverse'),
    (['--image', 'x.png'], '--image applies to --inverse'),
    (['--context', '2'], '--context applies to --extend'),
    (['--save-stages'], '--save-stages applies to --cascade'),
    (['--weights-dir', '/tmp'], '--weights-dir applies to --pretrained'),
    (['--inverse', 'dps', '--cascade', '[{"ckpt": "CKPT"}]'], '--cascade does not apply to --inverse'),
    (['--inverse', 'dps', '--npz', 'a.npz'], '--npz does not apply to --inverse'),
    (['--inverse', 'dps', '--sampler', 'ddim'], '--sampler does not apply to --inverse'),
    (['--extend', '--schedule', 'loglinear'], '--schedule does not apply to --extend'),
    (['--cascade', '[{"ckpt": "CKPT"}]', '--threshold', 'static'], '--threshold does not apply to --cascade'),
]
OUT_OF_RANGE = [  # attack ids S-eta=-1-ddim, S-eta=nan-ddim, S-eta-on-euler-ancestral-nan, S-snr=-1-pc, ...
    (['--sampler', 'ddim', '--eta', '-1'], '--eta must be a finite number >= 0'),
    (['--sampler', 'ddim', '--eta', 'nan'], '--eta must be a finite number >= 0'),
    (['--sampler', 'euler_ancestral', '--eta', 'inf'], '--eta must be a finite number >= 0'),
    (['--sampler', 'pc', '--snr', '-1'], '--snr must be a finite number > 0'),
    (['--sampler', 'pc', '--snr', '0'], '--snr must be a finite number > 0'),
    (['--sampler', 'pc', '--n-corrector', '-1'], '--n-corrector must be a whole number >= 0'),
    (['--guidance-schedule', 'oscillating', '--guidance-num-high', '-3'], '--guidance-num-high must be at least 0'),
    (['--s-churn', '10', '--s-noise', '-1'], '--s-noise must be a finite number >= 0'),
    (['--s-churn', '-5'], '--s-churn must be a finite number >= 0'),
    (['--s-churn', '10', '--s-tmin', '5', '--s-tmax', '1'], '--s-tmin 5.0 is above --s-tmax 1.0'),
    (['--sampler-opt', 'S_churn=x'], "--sampler-opt S_churn must be a number \\(got 'x'\\)"),
    (['--sampler-opt', 'S_churn=-1'], '--sampler-opt S_churn must be a finite number >= 0'),
    (['--sampler', 'heun', '--sampler-opt', 'order=x'], "sampler 'heun' has no option 'order'"),
]


@pytest.mark.parametrize('flags,message', NOT_APPLICABLE + OUT_OF_RANGE, ids=lambda v: ' '.join(v) if isinstance(v, list) else '')
def test_flags_that_would_be_ignored_or_are_out_of_range_are_refused_before_loading(ckpts, tmp_path, monkeypatch,
                                                                                    flags, message):
    """(Planted: the 'applies to' rules or the range checks removed -> the call samples and exits 0 -> fails.)"""
    monkeypatch.setattr(sample, 'load_model', lambda *a, **k: pytest.fail('loaded the model before refusing'))
    monkeypatch.chdir(tmp_path)
    flags = [f.replace('CKPT', ckpts['sr']) for f in flags]
    with pytest.raises(SystemExit, match=message):
        run('--ckpt', ckpts['run'], '--out', tmp_path / 's.png', *flags)


def test_cascade_and_extend_use_the_option_flags(ckpts):
    """--eta reaches the extension's sampler (before: dropped), so an out-of-range --sampler-opt is caught there."""
    args = sample.parse_args(['--ckpt', ckpts['video'], '--extend', '--sampler', 'ddim', '--eta', '0.5'])
    assert sample.sampler_options_from_args(args, 'ddim') == {'eta': 0.5}


# ----------------------------------------------------------------------------------------------------
# 5. Guidance that has nothing to act on (M-guidance-on-uncond-ckpt) and 7. --extend's advice (M-extend-clip-png).

def test_guidance_with_class_none_is_refused(ckpts, tmp_path):
    """(Planted: no check -> prints 'CFG w=5' and returns unguided samples -> fails.)"""
    with pytest.raises(SystemExit, match='--guidance 5 applies to class-conditional samples; --class none'):
        run('--ckpt', ckpts['run'], '--out', tmp_path / 's.png', '--class', 'none', '--guidance', '5')
    assert not (tmp_path / 's.png').exists()


def test_guidance_on_an_unconditional_model_is_refused(ckpts, tmp_path):
    with pytest.raises(SystemExit, match='--guidance 5 is classifier-free guidance, which needs a class-conditional'):
        run('--ckpt', ckpts['uncond'], '--out', tmp_path / 's.png', '--guidance', '5')


def test_extend_advice_names_a_flag_sample_py_has(ckpts, tmp_path):
    from PIL import Image
    Image.new('RGB', (8, 8)).save(tmp_path / 'one.png')
    with pytest.raises(SystemExit) as e:
        sample.main(sample.parse_args(['--ckpt', ckpts['video'], '--out', str(tmp_path / 'v.png'), '--steps', '2',
                                       '--extend', str(tmp_path / 'one.png')]))
    assert 'lower --context' in str(e.value) and '--frames' not in str(e.value)


# ----------------------------------------------------------------------------------------------------
# 6. A guiding model of another kind (W-autoguidance-sr, W-autoguidance-video, W-autoguidance-latent,
# M-reject-latent-classifier-pixels): refused naming both files, before sampling.

@pytest.mark.parametrize('bad,message', [('sr', 'is a super-resolution stage'), ('video', 'data: .* has 3x16px, .* has 3x8px, 4 frames'),
                                         ('res8', 'has 3x16px, .* has 3x8px'), ('classes3', 'classes: .* has 2, .* has 3'),
                                         ('mnist', 'dataset: .* has shapes, .* has mnist')])
def test_autoguidance_from_another_kind_of_model_is_refused(ckpts, tmp_path, monkeypatch, bad, message):
    """(Planted: check_guiding_model skipped -> the SR stage / video model guides the image model -> fails.)"""
    monkeypatch.setattr(sample, 'generate', lambda *a, **k: pytest.fail('sampled before refusing'))
    with pytest.raises(SystemExit, match=message) as e:
        run('--ckpt', ckpts['run'], '--out', tmp_path / 's.png', '--autoguidance', ckpts[bad])
    assert ckpts['run'] in str(e.value) and ckpts[bad] in str(e.value)


def test_autoguidance_from_the_same_kind_of_model_samples(ckpts, tmp_path):
    run('--ckpt', ckpts['run'], '--out', tmp_path / 's.png', '--autoguidance', ckpts['early'], '--guidance', '2')
    assert (tmp_path / 's.png').is_file()


def test_a_pixel_classifier_on_a_latent_model_is_refused(ckpts):
    import knobs
    cls = {'task': 'classifier', 'data': {'channels': 3, 'resolution': 16, 'frames': 0}}
    with pytest.raises(SystemExit, match='reads pixels; this model samples latents'):
        knobs.check_classifier(cls, 'clf.pt', {'autoencoder': {'latent_shape': [2, 8, 8]}, 'data': cls['data']})
    with pytest.raises(SystemExit, match='reads 3x16px images, the model samples 3x8px'):
        knobs.check_classifier(cls, 'clf.pt', {'data': {'channels': 3, 'resolution': 8, 'frames': 0}})


# ----------------------------------------------------------------------------------------------------
# --npz with --extend is written (M-extend-npz); impossible sizes and sigma ranges name the flag (M-sample-n-1e11,
# S-sigma-min=100).

def test_extend_writes_npz(ckpts, tmp_path):
    """(Planted: run_extend writing only the grid and GIF, as before -> no .npz -> fails.)"""
    from PIL import Image
    frames = [Image.new('RGB', (8, 8), (60 * i, 0, 0)) for i in range(4)]
    frames[0].save(tmp_path / 'clip.gif', save_all=True, append_images=frames[1:])
    sample.main(sample.parse_args(['--ckpt', ckpts['video'], '--out', str(tmp_path / 'v.png'), '--steps', '2',
                                   '--extend', str(tmp_path / 'clip.gif'), '--continuations', '2',
                                   '--npz', str(tmp_path / 'v.npz')]))
    with np.load(tmp_path / 'v.npz') as z:
        assert z['samples'].shape == (2, 4, 8, 8, 3)              # (N, F, H, W, C), readable by --extend again
    assert (tmp_path / 'v.gif').is_file()


def test_more_samples_than_memory_is_refused_naming_n(ckpts, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, 'generate', lambda *a, **k: pytest.fail('sampled before refusing'))
    with pytest.raises(SystemExit, match='-n and sample the rest'):
        sample.main(sample.parse_args(['--ckpt', ckpts['run'], '-n', str(10 ** 11), '--out', str(tmp_path / 's.png')]))


def test_sigma_min_above_the_models_sigma_max_names_the_flags(ckpts, tmp_path):
    with pytest.raises(SystemExit, match="--sigma-min 100 must be below the model's sigma_max 80"):
        run('--ckpt', ckpts['run'], '--out', tmp_path / 's.png', '--sigma-min', '100')


def test_sample_discrete_never_replaces_an_existing_file(tmp_path):
    """sample_discrete.py (token models) follows the same rule: an existing --out/--npz is refused before the model is
    loaded, and the default name moves on to samples_1.png (it used to pass overwrite=True and replace both)."""
    import sample_discrete
    ckpt = tmp_path / 'run' / 'ckpt.pt'                     # never read: the check comes first
    ckpt.parent.mkdir()
    for out, npz in ((tmp_path / 'grid.png', None), (None, tmp_path / 'data.npz')):
        for path in (out, npz):
            if path:
                path.write_bytes(b'precious')
        argv = ['--ckpt', str(ckpt)] + (['--out', str(out)] if out else []) + (['--npz', str(npz)] if npz else [])
        with pytest.raises(SystemExit, match='already exists.*--overwrite'):
            sample_discrete.main(sample_discrete.parse_args(argv))
        assert (out or npz).read_bytes() == b'precious'
    (ckpt.parent / 'samples.png').write_bytes(b'first')
    with pytest.raises(SystemExit, match='not a checkpoint|does not exist|No such file|cannot'):
        sample_discrete.main(sample_discrete.parse_args(['--ckpt', str(ckpt)]))   # got past the output check
    assert (ckpt.parent / 'samples.png').read_bytes() == b'first'
