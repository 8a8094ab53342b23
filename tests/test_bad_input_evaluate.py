"""Bad input to evaluate.py and the data loaders (issue 11): every case ends in a clear message before long work,
or is read correctly; nothing is silently misread and no computed result is lost to a bad output path.

Each test failed before the fix it guards (see the comment at its top for what happened then)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture
def lenet_run(tmp_path):
    """A small LeNet weight file and 40 generated / 60 reference gray 16x16 images; returns (args maker, folder)."""
    rng = np.random.RandomState(0)
    np.savez(tmp_path / 'gen.npz', rng.randint(0, 256, (40, 1, 16, 16), dtype=np.uint8))
    np.savez(tmp_path / 'ref.npz', rng.randint(0, 256, (60, 1, 16, 16), dtype=np.uint8))
    torch.manual_seed(1)
    torch.save(evaluate.LeNetFeatures(1, 10, 16).state_dict(), tmp_path / 'lenet.pth')

    def args(generated='gen.npz', reference='ref.npz', *extra, weights='lenet.pth'):
        return evaluate.parse_args([str(tmp_path / generated), str(tmp_path / reference), '--network', 'lenet',
                                    '--lenet-weights', str(tmp_path / weights), '--metrics', 'fid', *extra])
    return args, tmp_path


@pytest.fixture
def count_feature_passes(monkeypatch):
    """Counts calls of evaluate.extract_features (the long work a bad path must not waste)."""
    calls = []
    original = evaluate.extract_features

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(evaluate, 'extract_features', counting)
    return calls


# ----------------------------------------------------------------------------------------------------
# Output paths: checked before any feature is extracted (before: checked after, or not at all)

def test_output_paths_are_checked_before_any_feature_extraction(lenet_run, count_feature_passes):
    # Before: '--save-stats stats' (no extension) ran everything and np.savez wrote 'stats.npz' elsewhere than
    # asked; a folder that is a file failed with a traceback after all features were computed.
    args, root = lenet_run
    (root / 'a_file').write_text('x')
    bad = [('--save-stats', str(root / 'stats'), 'needs one of the extensions .npz'),
           ('--save-stats', str(root / 'a_file' / 'stats.npz'), 'cannot write'),
           ('--out', str(root / 'scores.txt'), 'needs one of the extensions .json'),
           ('--save-stats', str(root), 'is a folder')]
    for flag, path, message in bad:
        with pytest.raises(ValueError, match=message):
            evaluate.main(args('gen.npz', 'ref.npz', flag, path))
    assert count_feature_passes == []                                  # refused before any work
    # A missing folder is created, and the scores land where asked, named after their protocol.
    results = evaluate.main(args('gen.npz', 'ref.npz', '--save-stats', str(root / 'new' / 'stats.npz'),
                                 '--out', str(root / 'new' / 'scores.json')))
    assert os.path.isfile(root / 'new' / 'stats.npz')
    record = json.load(open(root / 'new' / 'scores.json'))
    assert record['scores']['FD_lenet'] == pytest.approx(results['FD_lenet'])
    assert record['network'] == 'lenet' and len(record['network_id']) == 16


def test_checkpoint_sample_path_is_checked_before_sampling(lenet_run, monkeypatch):
    # Before: evaluate.py had no way to keep the samples of a checkpoint; now --npz is checked before sampling.
    args, root = lenet_run
    (root / 'ckpt.pt').write_bytes(b'')
    monkeypatch.setattr(evaluate, 'sample_checkpoint', lambda a: pytest.fail('sampled despite a bad --npz'))
    with pytest.raises(ValueError, match='needs one of the extensions .npz'):
        evaluate.main(args('ckpt.pt', 'ref.npz', '--npz', str(root / 'samples.png')))
    with pytest.raises(ValueError, match='not a .pt file'):
        evaluate.main(args('gen.npz', 'ref.npz', '--npz', str(root / 'samples.npz')))


# ----------------------------------------------------------------------------------------------------
# Nothing lost (issue 23): an output never replaces an existing file unless --overwrite, and never an input

def test_train_lenet_never_replaces_an_existing_file(tmp_path):
    # Before: --train-lenet X.npz --lenet-weights ckpt.pt replaced any file, a training checkpoint included (exit 0).
    rng = np.random.RandomState(3)
    np.savez(tmp_path / 'digits.npz', rng.randint(0, 256, (20, 1, 8, 8), dtype=np.uint8), labels=np.arange(20) % 2)
    precious = tmp_path / 'ckpt.pt'
    precious.write_bytes(b'a training checkpoint')
    command = ['--train-lenet', str(tmp_path / 'digits.npz'), '--lenet-weights', str(precious), '--lenet-steps', '1']
    with pytest.raises(ValueError, match='--lenet-weights.*already exists.*--overwrite replaces it'):
        evaluate.main(evaluate.parse_args(command))
    assert precious.read_bytes() == b'a training checkpoint'
    evaluate.main(evaluate.parse_args(command + ['--overwrite']))    # asked for: replaced by a LeNet
    evaluate.lenet_from_state_dict(torch.load(precious, weights_only=True))
    assert [f for f in os.listdir(tmp_path) if 'tmp' in f] == []      # no temporary file left behind


def test_save_stats_and_npz_never_write_over_the_reference_or_an_existing_file(lenet_run, count_feature_passes,
                                                                                monkeypatch):
    # Before: --save-stats REFERENCE (and --npz REFERENCE when sampling a checkpoint) wrote over the input itself.
    args, root = lenet_run
    reference = (root / 'ref.npz').read_bytes()
    for extra in ([], ['--overwrite']):                               # an input is never an output, even when asked
        with pytest.raises(ValueError, match='--save-stats.*is the input REFERENCE'):
            evaluate.main(args('gen.npz', 'ref.npz', '--save-stats', str(root / 'ref.npz'), *extra))
    (root / 'ckpt.pt').write_bytes(b'')
    monkeypatch.setattr(evaluate, 'sample_checkpoint', lambda a: pytest.fail('sampled despite a bad --npz'))
    with pytest.raises(ValueError, match='--npz.*is the input REFERENCE'):
        evaluate.main(args('ckpt.pt', 'ref.npz', '--npz', str(root / 'ref.npz'), '--overwrite'))
    (root / 'old_samples.npz').write_bytes(b'samples of last week')
    with pytest.raises(ValueError, match='--npz.*already exists'):
        evaluate.main(args('ckpt.pt', 'ref.npz', '--npz', str(root / 'old_samples.npz')))
    assert (root / 'ref.npz').read_bytes() == reference and count_feature_passes == []   # refused before any work
    assert (root / 'old_samples.npz').read_bytes() == b'samples of last week'
    evaluate.main(args('gen.npz', 'ref.npz', '--save-stats', str(root / 'stats.npz')))
    (root / 'scores.json').write_text('{}')
    for flag, path in (('--save-stats', 'stats.npz'), ('--out', 'scores.json')):   # any existing file, any output
        with pytest.raises(ValueError, match=f'{flag}.*already exists'):
            evaluate.main(args('gen.npz', 'ref.npz', flag, str(root / path)))
    evaluate.main(args('gen.npz', 'ref.npz', '--save-stats', str(root / 'stats.npz'), '--overwrite'))


def test_stats_cache_is_keyed_by_the_reference_content_not_its_name(lenet_run, capsys):
    # Before: the cache key was the file's base name, so another ref.npz (same name, size, count) reused the first
    # one's statistics and the score was wrong (26.98 instead of 16.31 in the report).
    args, root = lenet_run
    (root / 'other').mkdir()
    np.savez(root / 'other' / 'ref.npz', np.random.RandomState(7).randint(0, 128, (60, 1, 16, 16), dtype=np.uint8))
    cache = ['--stats-cache', str(root / 'cache')]
    first = evaluate.main(args('gen.npz', 'ref.npz', *cache))['FD_lenet']
    second = evaluate.main(args('gen.npz', 'other/ref.npz', *cache))['FD_lenet']
    assert 'computed and saved to' in capsys.readouterr().out.split('reference statistics')[-1]
    expected = evaluate.main(args('gen.npz', 'other/ref.npz'))['FD_lenet']   # no cache: the truth
    assert second == pytest.approx(expected, rel=1e-9) and abs(second - first) > 1e-3 * first
    assert len(os.listdir(root / 'cache')) == 2
    assert evaluate.main(args('gen.npz', 'ref.npz', *cache))['FD_lenet'] == pytest.approx(first, rel=1e-9)


# ----------------------------------------------------------------------------------------------------
# Silently wrong before

def test_a_nan_pixel_in_a_float_npz_is_an_error_not_a_misdecode(tmp_path):
    # Before: one NaN made x.min() < 0 false, so [-1, 1] data was decoded as [0, 1] and scored.
    x = np.random.RandomState(1).uniform(-1, 1, (4, 3, 8, 8))
    x[2, 1, 3, 3] = np.nan
    np.savez(tmp_path / 'nan.npz', images=x)
    with pytest.raises(ValueError, match=r'1 pixel values are NaN.*\(2, 1, 3, 3\)'):
        evaluate.load_images(str(tmp_path / 'nan.npz'))
    np.savez(tmp_path / 'range255.npz', images=x[:2] * 0 + 200.0)     # 0..255 stored as floats: ambiguous
    with pytest.raises(ValueError, match=r'\[0, 1\] or \[-1, 1\]'):
        evaluate.load_images(str(tmp_path / 'range255.npz'))
    x = np.nan_to_num(x)                                              # the same data without the NaN
    np.savez(tmp_path / 'ok.npz', images=x)
    expected = np.clip(np.rint((x + 1) * 127.5), 0, 255)
    assert np.array_equal(evaluate.load_images(str(tmp_path / 'ok.npz')).numpy(), expected)


def test_statistics_of_another_feature_network_are_refused(lenet_run, count_feature_passes):
    # Before: only the network's name was stored, so statistics of another LeNet were accepted (FD 970, not 41.7).
    args, root = lenet_run
    evaluate.main(args('gen.npz', 'ref.npz', '--save-stats', str(root / 'stats.npz')))
    torch.manual_seed(2)                                              # another LeNet: same name, other weights
    torch.save(evaluate.LeNetFeatures(1, 10, 16).state_dict(), root / 'other.pth')
    count_feature_passes.clear()
    with pytest.raises(ValueError, match='other lenet weights'):
        evaluate.main(args('gen.npz', 'stats.npz', weights='other.pth'))
    assert count_feature_passes == []                                 # refused before the generated images' features
    evaluate.main(args('gen.npz', 'stats.npz'))                       # the right network is accepted


def test_kid_with_fewer_images_than_the_subset_size_warns_that_the_std_is_0():
    # Issue 22: the subset was silently shrunk to n/2 (another number than the published protocol's); now subsets are
    # the whole sets (clean-fid's min(n_a, n_b, subset_size)) and the warning says the std is then 0, not a precision.
    rng = np.random.RandomState(2)
    a, b = rng.randn(300, 8), rng.randn(300, 8) + 0.1
    with pytest.warns(UserWarning, match='std is 0'):
        mean, std = evaluate.kid(a, b, num_subsets=20, subset_size=1000)
    assert std == 0.0 and mean == pytest.approx(evaluate.mmd2_unbiased(a, b), rel=1e-12)
    assert evaluate.parse_args(['a', 'b', '--kid-subset-size', '50']).kid_subset_size == 50
    with pytest.raises(SystemExit):
        evaluate.parse_args(['a', 'b', '--kid-subset-size', '1'])


def make_16bit_png(path, values):
    Image.fromarray(values.astype(np.uint16)).save(path)              # PIL writes mode I;16 as a 16-bit PNG


def test_16bit_pngs_and_float_tiffs_are_read_at_their_real_brightness(tmp_path):
    # Before: convert('RGB') clipped 16-bit values to 255 (white) and truncated float [0, 1] to 0 (black).
    levels = np.arange(256).reshape(16, 16)
    folder = tmp_path / 'deep'
    folder.mkdir()
    make_16bit_png(folder / 'a16.png', levels * 257)                  # 8-bit level v written as v * 257
    Image.fromarray((levels / 255).astype(np.float32)).save(folder / 'b_float.tif')
    images = evaluate.load_images(str(folder))
    for image in images:                                              # both: the 256 gray levels, in all channels
        assert torch.equal(image, torch.from_numpy(levels).to(torch.uint8).expand(3, -1, -1))
    ds = data.load_dataset(f'folder:{folder}', resolution=16)          # the training loader reads them the same way
    assert torch.equal(ds.images[0], images[0]) and torch.equal(ds.images[1], images[1])
    Image.fromarray(np.full((4, 4), 3.5, np.float32)).save(folder / 'c_bright.tif')
    with pytest.raises(ValueError, match=r'c_bright.tif.*must be in \[0, 1\]'):
        evaluate.load_images(str(folder))


# ----------------------------------------------------------------------------------------------------
# Tracebacks before, messages now

def test_one_image_is_a_clear_error_before_feature_extraction(lenet_run, count_feature_passes):
    # Before: scipy's "array must not contain infs or NaNs" after all features were computed.
    args, root = lenet_run
    np.savez(root / 'one.npz', np.zeros((1, 1, 16, 16), np.uint8))
    with pytest.raises(ValueError, match='holds 1 image.*at least 2'):
        evaluate.main(args('one.npz', 'ref.npz'))
    with pytest.raises(ValueError, match='REFERENCE .* holds 1 image.*at least 2'):
        evaluate.main(args('gen.npz', 'one.npz'))
    assert count_feature_passes == []
    with pytest.raises(ValueError, match='at least 2 feature vectors'):
        evaluate.feature_statistics(np.ones((1, 8)))


def test_a_mixed_size_folder_names_the_odd_file(tmp_path):
    # Before: numpy's "all input arrays must have the same shape", no file named.
    for name, size in (('a.png', 16), ('b.png', 16), ('c_big.png', 20), ('d.png', 16)):
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(tmp_path / name)
    with pytest.raises(ValueError, match=r'c_big.png is 20x20 but .*a.png is 16x16'):
        evaluate.load_images(str(tmp_path))


@pytest.mark.parametrize('content', ['list', 'no_config', 'no_data', 'tensor'])
def test_a_checkpoint_with_missing_keys_or_another_object_is_a_clear_error(lenet_run, content):
    # Before: KeyError / IndexError / AttributeError tracebacks from inside the loader.
    args, root = lenet_run
    objects = {'list': [1, 2, 3], 'no_config': {'model': {}, 'ema': {}},
               'no_data': {'config': {'net': {}}, 'model': {}, 'ema': {}}, 'tensor': torch.zeros(3)}
    torch.save(objects[content], root / 'ckpt.pt')
    with pytest.raises((ValueError, SystemExit)) as info:             # sample.py may stop with its own message
        evaluate.main(args('ckpt.pt', 'ref.npz'))
    assert 'ckpt.pt' in str(info.value) and 'Traceback' not in str(info.value)


def test_lenet_weights_with_missing_keys_are_a_clear_error(lenet_run):
    # Before: KeyError("fc2.weight") from build_network (now build_feature_network).
    args, root = lenet_run
    state = torch.load(root / 'lenet.pth')
    del state['fc2.weight']
    torch.save(state, root / 'broken.pth')
    torch.save(['not', 'a', 'state', 'dict'], root / 'list.pth')
    for weights in ('broken.pth', 'list.pth'):
        with pytest.raises(ValueError, match=f'{weights} is not the state dict of a LeNetFeatures'):
            evaluate.main(args('gen.npz', 'ref.npz', weights=weights))


def test_a_folder_of_fewer_than_20_images_holds_out_nothing(tmp_path):
    # Before: train.py held out len // 20 = 0 images and logged val_loss NaN; data.holdout_split now returns an
    # empty held-out set, which train.py checks to skip the validation loss.
    for i in range(10):
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(tmp_path / f'{i}.png')
    ds = data.load_dataset(f'folder:{tmp_path}', resolution=8)
    train_index, val_index = data.holdout_split(len(ds), seed=0)
    assert len(val_index) == 0 and sorted(train_index.tolist()) == list(range(10))
    x, _ = ds.batch(train_index)
    assert torch.isfinite(x).all() and len(x) == 10


def test_nan_samples_are_an_error_not_a_score():
    # Before: NaN samples (of a diverged checkpoint, or during training) were cast to uint8 and scored like images.
    x = torch.zeros(4, 3, 8, 8)
    x[1, 2, 3, 4] = float('nan')
    with pytest.raises(ValueError, match='ckpt.pt returned 1 NaN/inf pixel values.*diverged'):
        evaluate.samples_to_uint8(x, 'ckpt.pt')                       # the checkpoint path of the command line
    model = evaluate.LeNetFeatures(3, 10, 8).eval()
    stats = evaluate.compute_statistics(np.random.RandomState(0).randn(20, 128))
    with pytest.raises(ValueError, match='NaN'):                      # the in-training path (train.py)
        evaluate.evaluate_generator(lambda n: x[:n], stats, model, num_samples=4, batch_size=4)
    assert torch.equal(evaluate.samples_to_uint8(torch.nan_to_num(x), 'ok'), data.to_uint8(torch.nan_to_num(x)))


# ----------------------------------------------------------------------------------------------------
# The attack of issue 23 (second round): each case failed as quoted before its fix

def tiny_checkpoint(path, task='diffusion'):
    """A train.py-layout checkpoint of a micro U-Net (8 channels, 8x8 gray, 2 classes) with its real weights."""
    import argparse
    from types import SimpleNamespace

    import checkpoints
    dataset = SimpleNamespace(resolution=8, channels=1, num_classes=2, class_names=['a', 'b'])
    flags = argparse.Namespace(model='unet', config=None, dropout=None, model_channels=8, prediction='eps',
                               schedule=None, t_sampler='uniform', sigma_data=0.5, T=50, low_res=4, noise_aug_max=0.0,
                               noise_aug_dim=0, upsample='bicubic')
    flags.unconditional, model, extra = False, 'unet', {}
    if task == 'superres':
        name, net, sr = checkpoints.superres_config(flags, dataset, 2)
        extra = {'superres': sr}
    elif task == 'classifier':
        (name, net), model = checkpoints.classifier_config(flags, dataset), 'classifier'
    else:
        name, net = checkpoints.network_config(flags, dataset, 2, 0)
    config = checkpoints.make_config(task, model, name, net, checkpoints.data_config('gray', dataset),
                                     checkpoints.diffusion_config(flags), **extra)
    weights = checkpoints.build_network(config).state_dict()
    torch.save({'config': config, 'model': weights, 'ema': weights, 'step': 1}, path)


def test_a_superres_stage_or_another_kind_of_checkpoint_is_not_scored(lenet_run, monkeypatch):
    # Before: W-eval-sr-ckpt exit 0 with scores of an SR stage sampled from an all-zero condition;
    # W-eval-ckpt-classifier TypeError: forward() got an unexpected keyword argument 'y'.
    args, root = lenet_run
    monkeypatch.setattr(evaluate, 'extract_features', lambda *a, **k: pytest.fail('scored'))
    tiny_checkpoint(root / 'sr.pt', 'superres')
    with pytest.raises(ValueError, match=r"sr.pt' is a super-resolution stage .*sample the cascade"):
        evaluate.main(args('sr.pt', 'ref.npz', '--num-gen', '2', '--steps', '1'))
    tiny_checkpoint(root / 'cls.pt', 'classifier')
    with pytest.raises(ValueError, match=r'cls.pt.* is a classifier checkpoint \(train_classifier.py\)'):
        evaluate.main(args('cls.pt', 'ref.npz', '--num-gen', '2', '--steps', '1'))


def test_sampling_flags_on_images_and_conditions_without_labels_are_refused(lenet_run, capsys):
    # Before: M-eval-sampler-flag-on-npz, M-eval-class-on-npz exit 0 with the flag ignored;
    # M-eval-conditions-real-no-labels printed 'conditions=real' for an .npz without labels.
    args, root = lenet_run
    for flags in (['--sampler', 'ddim'], ['--class', '1'], ['--guidance', '3'], ['--seed', '4']):
        with pytest.raises(SystemExit):
            args('gen.npz', 'ref.npz', *flags)
        assert f'{flags[0]} set how a checkpoint is sampled' in capsys.readouterr().err
    args('gen.npz', 'ref.npz', '--num-gen', '10')                       # not a sampling flag: accepted
    tiny_checkpoint(root / 'ckpt.pt')
    assert args('ckpt.pt', 'ref.npz', '--sampler', 'ddim', '--class', '1').fixed_class == 1   # they apply to a .pt
    with pytest.raises(ValueError, match='--conditions real: GENERATED .*gen.npz holds no labels'):
        evaluate.main(args('gen.npz', 'ref.npz', '--conditions', 'real'))


def test_num_gen_beyond_the_bound_is_refused_naming_the_flag(lenet_run, capsys):
    # Before: M-eval-num-gen-huge-ckpt: _ArrayMemoryError: Unable to allocate 745. GiB.
    args, root = lenet_run
    with pytest.raises(SystemExit):
        args('gen.npz', 'ref.npz', '--num-gen', str(10 ** 11))
    assert '--num-gen must be at most 1,000,000' in capsys.readouterr().err


def test_a_bad_memorization_input_is_refused_before_any_score(lenet_run, count_feature_passes):
    # Before: W-eval-memorization-png: every score computed, then 'fx/img.png is neither a folder ...' (scores lost).
    args, root = lenet_run
    Image.new('L', (8, 8)).save(root / 'img.png')
    with pytest.raises(ValueError, match='--memorization .*img.png is neither a folder of images nor an .npz'):
        evaluate.main(args('gen.npz', 'ref.npz', '--memorization', str(root / 'img.png')))
    with pytest.raises(ValueError, match='GENERATED .*img.png is neither .* nor a train.py checkpoint'):
        evaluate.main(args('img.png', 'ref.npz'))
    assert count_feature_passes == []


def test_video_on_an_image_array_says_it_holds_images(lenet_run, monkeypatch):
    # Before: W-eval-video-on-images read (N, H, W, C) images as grey videos and went on to download I3D.
    args, root = lenet_run
    np.savez(root / 'nhwc.npz', np.zeros((4, 16, 16, 3), np.uint8))
    monkeypatch.setattr(evaluate, 'load_i3d', lambda *a, **k: pytest.fail('I3D loaded'))
    with pytest.raises(ValueError, match=r'holds images, not videos .*without --video'):
        evaluate.load_videos(str(root / 'nhwc.npz'))
    with pytest.raises(ValueError, match='holds images, not videos'):
        evaluate.main(args('nhwc.npz', 'ref.npz', '--video'))
    np.savez(root / 'grey.npz', np.zeros((2, 5, 16, 16), np.uint8))       # grey videos (N, F, H, W) still read
    assert evaluate.load_videos(str(root / 'grey.npz')).shape == (2, 1, 5, 16, 16)


def test_float_images_are_read_with_a_statement_of_their_range(tmp_path, capsys):
    # Before: W-eval-float-npz: a float32 [0, 1] .npz scored without a word.
    np.savez(tmp_path / 'f.npz', np.full((2, 1, 4, 4), 0.5, np.float32))
    assert evaluate.load_images(str(tmp_path / 'f.npz')).dtype == torch.uint8
    assert 'holds float32 values in [0.5, 0.5]: read as images in [0, 1]' in capsys.readouterr().out


def test_ctrl_c_is_one_line_and_exit_130(lenet_run, monkeypatch, capsys):
    # Before: I-eval-sigint: a KeyboardInterrupt traceback.
    args, root = lenet_run

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, 'extract_features', interrupted)
    argv = [str(root / 'gen.npz'), str(root / 'ref.npz'), '--network', 'lenet', '--lenet-weights', str(root / 'lenet.pth')]
    try:
        with pytest.raises(SystemExit) as e:
            evaluate.cli(argv)
    except KeyboardInterrupt:                # escaping, it would stop this pytest session, not fail one test
        pytest.fail('Ctrl-C reached the user as a KeyboardInterrupt traceback')
    assert e.value.code == 130 and 'interrupted (Ctrl-C)' in capsys.readouterr().err


def test_a_file_size_limit_on_out_is_a_message_not_a_traceback(lenet_run, monkeypatch, capsys):
    # Before: F-eval-out-fsize: 'Traceback ... OSError: [Errno 27] disk full while writing o.json' under a real
    # RLIMIT_FSIZE. A real limit here too (Python ignores SIGXFSZ: the write fails with EFBIG), not a mocked OSError,
    # held only while the .json is written so that pytest's own output is not limited.
    import resource
    args, root = lenet_run
    real_write_json, limits = evaluate.write_json, resource.getrlimit(resource.RLIMIT_FSIZE)

    def limited(path, record):
        resource.setrlimit(resource.RLIMIT_FSIZE, (50, limits[1]))
        try:
            return real_write_json(path, record)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    monkeypatch.setattr(evaluate, 'write_json', limited)
    argv = [str(root / 'gen.npz'), str(root / 'ref.npz'), '--network', 'lenet', '--lenet-weights',
            str(root / 'lenet.pth'), '--metrics', 'fid', '--out', str(root / 'o.json')]
    with pytest.raises(SystemExit) as e:
        evaluate.cli(argv)
    assert str(e.value).startswith('error: ') and 'o.json' in str(e.value), e.value
    assert not (root / 'o.json').exists() and resource.getrlimit(resource.RLIMIT_FSIZE) == limits
