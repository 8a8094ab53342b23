"""The text-to-image command lines end to end: `train.py --captions` trains a few steps (MM-DiT on shapes, a U-Net
with cross-attention on a captioned image folder), the checkpoint carries the tokenizer and text encoder, and
`sample.py --prompt` rebuilds everything from it and writes one row per prompt; bad prompts are refused."""
import pytest
import torch
from PIL import Image

import sample_text
from programs import check_program, run_program

FAST = ['--batch-size', '8', '--val-every', '0', '--sample-every', '0', '--sample-steps', '2', '--no-progress']


@pytest.fixture(scope='module')
def shapes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('text') / 'run'
    run_program('train.py', ['--captions', '--dataset', 'shapes', '--model', 'mmdit', '--steps', '3', '--out', out] + FAST)
    return out


def test_checkpoint_carries_tokenizer_and_text_encoder(shapes_run):
    ckpt = torch.load(shapes_run / 'ckpt.pt', weights_only=True)
    config = ckpt['config']
    assert config['task'] == 'text' and config['model'] == 'mmdit'
    assert 'triangle' in config['tokenizer']['vocab'] and config['text']['vocab_size'] == len(config['tokenizer']['vocab'])
    assert any(k.startswith('encoder.') for k in ckpt['ema']) and any(k.startswith('backbone.') for k in ckpt['ema'])
    model, diffusion, tokenizer, _ = sample_text.load_text_model(str(shapes_run / 'ckpt.pt'))
    assert tokenizer.vocab == config['tokenizer']['vocab'] and diffusion.prediction == 'flow'
    # The training grid's prompts are written beside it.
    assert len((shapes_run / 'samples_0000003.txt').read_text().splitlines()) == 8


def test_sample_with_prompts(shapes_run, tmp_path):
    out = tmp_path / 'grid.png'
    result = run_program('sample.py', ['--ckpt', shapes_run / 'ckpt.pt', '--prompt', 'a small red triangle top left',
                                       '--prompt', 'a large blue circle centre', '--num', '3', '--steps', '2', '--out', out])
    assert 'wrote' in result.stdout
    assert Image.open(out).size == (3 * 34 + 2, 2 * 34 + 2)                  # 3 samples x 2 prompts, 32 px + borders
    # Refusals, in-process: sample.py hands --prompt to sample_text.py (importable: not a training program).
    with pytest.raises(SystemExit, match="'fox', 'purple' not in the model's vocabulary"):
        sample_text.main(sample_text.parse_args(['--ckpt', str(shapes_run / 'ckpt.pt'), '--prompt', 'a purple fox',
                                                 '--out', str(tmp_path / 'x.png')]))
    with pytest.raises(SystemExit, match='already exists'):
        sample_text.main(sample_text.parse_args(['--ckpt', str(shapes_run / 'ckpt.pt'), '--prompt', 'a red ring',
                                                 '--out', str(out)]))


def test_folder_captions_train_a_unet_with_cross_attention(tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in range(8):
        Image.new('RGB', (16, 16), (255 * (i % 2), 0, 255 * (1 - i % 2))).save(folder / f'{i}.png')
        (folder / f'{i}.txt').write_text('a red square' if i % 2 else 'a blue square')
    out = tmp_path / 'run'
    run_program('train.py', ['--captions', '--dataset', f'folder:{folder}', '--resolution', '16', '--model', 'unet',
                             '--steps', '2', '--out', out] + FAST)
    config = torch.load(out / 'ckpt.pt', weights_only=True)['config']
    assert config['net']['context_dim'] == config['text']['width'] and config['data']['captions'] == f'folder:{folder}'
    (folder / '3.txt').unlink()
    with pytest.raises(SystemExit, match='1 of 8 images have no caption file'):
        run_program('train.py', ['--captions', '--dataset', f'folder:{folder}', '--resolution', '16', '--steps', '1',
                                 '--out', tmp_path / 'run2'] + FAST)


def test_bad_flags_are_refused_before_work():
    with pytest.raises(SystemExit, match="--config 'DiT-S/2' is not a mmdit configuration"):
        check_program('train_text.py', ['--model', 'mmdit', '--config', 'DiT-S/2'])
    with pytest.raises(SystemExit, match='holds videos'):
        check_program('train_text.py', ['--dataset', 'video-shapes'])
    with pytest.raises(SystemExit, match=r'--p-uncond must be in \[0, 1\)'):
        check_program('train_text.py', ['--p-uncond', '1.5'])
