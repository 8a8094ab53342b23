"""Issue 23, second attack (/work/attack/results.md): the training programs' findings, each checked in-process where
the check happens before any work (parse_args and the checks main runs first; tests/programs.check_program), so
these tests take seconds. Case ids of the attack are in the comments. Each test failed on the code before its fix
(checked by reverting the fix, see the commit messages)."""
import argparse
import os

import pytest
import torch

import checkpoints
import runs
from programs import check_program, program

TRAIN = ['--resolution', '16', '--batch-size', '8', '--steps', '4']


def refused(script, argv, match):
    with pytest.raises(SystemExit, match=match):
        check_program(script, argv)


# ----------------------------------------------------------------------------------------------------
# 1. Ctrl-C: one line (step reached, step the checkpoint holds, how to go on), exit 130, no traceback.

def interrupt_at(monkeypatch, step):
    """Ctrl-C at the start of optimizer step `step` + 1 (runs.get_lr is the first thing each step calls)."""
    real = runs.get_lr

    def get_lr(s, args):
        if s == step:
            raise KeyboardInterrupt
        return real(s, args)
    monkeypatch.setattr(runs, 'get_lr', get_lr)


def command(main, parse_args):
    """runs.run_command, the programs' entry; an escaping Ctrl-C fails the test (instead of stopping pytest)."""
    try:
        runs.run_command(main, parse_args)
    except KeyboardInterrupt:
        pytest.fail('Ctrl-C escaped as KeyboardInterrupt: the user sees a traceback')


@pytest.mark.parametrize('script,argv', [
    ('train_autoencoder.py', ['--vae-config', 'tiny-kl', '--lpips', 'off', '--disc-weight', '0']),
    ('train_classifier.py', [])], ids=['autoencoder', 'classifier'])
def test_ctrl_c_is_one_line_and_exit_130_and_the_checkpoint_stays(tmp_path, monkeypatch, capsys, script, argv):
    """I-ae-sigint, I-cls-sigint (train.py's: tests/test_bad_input.py, test_resume_writes_each_step_once_in_the_log)."""
    out = tmp_path / 'run'
    p = program(script)
    argv = argv + ['--resolution', '16', '--batch-size', '4', '--steps', '4', '--ckpt-every', '2', '--val-every', '0',
                   '--sample-every', '0', '--no-progress', '--workers', '0', '--out', str(out)]
    interrupt_at(monkeypatch, 3)
    with pytest.raises(SystemExit) as stop:
        command(p['main'], lambda: p['parse_args'](argv))
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == (f"interrupted at step 3; {out / 'ckpt.pt'} holds step 2; "
                                               '--resume auto continues')
    assert torch.load(out / 'ckpt.pt', weights_only=True)['step'] == 2


def test_ctrl_c_before_training_says_nothing_was_written(capsys):
    """I-train-sigint-early: interrupted while the data loads."""
    def main(args):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as stop:
        command(main, lambda: None)
    assert stop.value.code == 130 and 'interrupted before training started' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# 2. Flags that do not apply: refused with what they apply to (they were silently ignored).

@pytest.mark.parametrize('argv,match', [
    (['--model', 'dit', '--dropout', '0.3'], '--dropout applies to the U-Net'),                       # T-dropout-on-dit
    (['--model', 'dit', '--model-channels', '16'], '--model-channels applies to the U-Net'),
    (['--upsample', 'nearest'], '--upsample apply to --task superres'),                            # T-upsample-no-superres
    (['--image-share', '0.5'], '--image-share applies to video data'),                             # T-image-share-images
    (['--T', '50'], '--T applies to the discrete schedules'),                                        # T-T-on-edm
    (['--prediction', 'eps', '--sigma-data', '0.3'], '--sigma-data applies to --prediction edm'),  # T-sigma-data-on-eps
    (['--unconditional', '--p-uncond', '0.5'], '--p-uncond applies to class-conditional'),         # T-p-uncond-unconditional
    (['--unconditional', '--guidance', '5'], '--guidance applies to class-conditional'),           # T-guidance-unconditional
    (['--i3d-weights', 'i3d.pt'], '--i3d-weights applies to --eval-network i3d'),                  # T-i3d-weights-images
    (['--overfit-batch', '--aug-p', '0.5'], '--aug-p applies to normal training'),                 # T-overfit+aug
])
def test_train_flags_that_do_not_apply_are_refused(tmp_path, argv, match):
    refused('train.py', TRAIN + argv + ['--out', tmp_path / 'run'], match)
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('argv', [
    ['--dropout', '0.1'], ['--prediction', 'eps', '--T', '50'], ['--sigma-data', '0.3'], ['--p-uncond', '0.2'],
    ['--task', 'superres', '--low-res', '8', '--upsample', 'nearest'], ['--eval-network', 'i3d', '--i3d-weights', 'x'],
    ['--overfit-batch']])
def test_the_same_flags_where_they_apply_are_accepted(tmp_path, argv):
    args = check_program('train.py', TRAIN + argv + ['--out', tmp_path / 'run'])
    assert args.T in (50, 1000) and args.sigma_data in (0.3, 0.5)


def test_defaults_of_the_flags_that_default_to_none_are_the_documented_ones(tmp_path):
    args = check_program('train.py', TRAIN + ['--out', tmp_path / 'run'])
    assert (args.T, args.sigma_data, args.p_uncond, args.guidance) == (1000, 0.5, 0.1, 2.0)
    args = check_program('train.py', TRAIN + ['--task', 'superres', '--low-res', '8', '--out', tmp_path / 'run'])
    assert args.upsample == 'bicubic'
    args = check_program('train_autoencoder.py', TRAIN + ['--out', tmp_path / 'run'])
    assert (args.kl_weight, args.codebook_weight, args.gan_start) == (1e-6, 1.0, 2)


@pytest.mark.parametrize('argv,match', [
    (['--vq', '--kl-weight', '0.5'], '--kl-weight applies to a KL autoencoder'),                    # A-vq-kl-weight
    (['--codebook-weight', '3'], '--codebook-weight applies to a VQ autoencoder'),                 # A-kl-codebook-weight
    (['--gan-start', '1', '--disc-weight', '0'], '--gan-start applies to the GAN loss'),          # A-gan-start-nogan
    (['--gan-start', '99'], '--gan-start 99 is not below --steps 4'),                              # A-gan-start=99
    (['--vq', '--vae-config', 'tiny-kl'], '--vq asks for a VQ autoencoder but --vae-config tiny-kl'),  # A-vq-with-klconfig
    (['--dataset', 'video-shapes'], 'video-shapes holds videos; the autoencoder trains on images'),  # D-ae-video
])
def test_autoencoder_flags_that_do_not_apply_are_refused(tmp_path, argv, match):
    refused('train_autoencoder.py', TRAIN + argv + ['--out', tmp_path / 'run'], match)
    assert not (tmp_path / 'run').exists()                              # nothing left behind (D-ae-video left a log)


# ----------------------------------------------------------------------------------------------------
# 3-5. Step flags that never fire, contradictions, an --out inside the data, video data on an image network.

@pytest.mark.parametrize('argv,match', [
    (['--save-early', '99'], '--save-early 99 is beyond --steps 4'),                                # T-save-early=99
    (['--resume', 'auto', '--overwrite'], '--resume auto continues .* --overwrite replaces'),      # R-path-and-overwrite
    (['--dataset', 'video-shapes'], "video-shapes holds videos: it needs a U-Net with temporal attention"),  # D-video-on-image-config
    (['--dataset', 'video-shapes', '--model', 'dit'], 'needs a U-Net with temporal attention'),
])
def test_train_contradictions_are_refused_before_work(tmp_path, argv, match):
    refused('train.py', TRAIN + argv + ['--out', tmp_path / 'run'], match)
    assert not (tmp_path / 'run').exists()


def test_out_inside_the_training_folder_is_refused(tmp_path):
    """O-train-out-is-data-folder: the grids would become training images of the next run."""
    (tmp_path / 'imgs').mkdir()
    for out in (tmp_path / 'imgs', tmp_path / 'imgs' / 'run'):
        refused('train.py', TRAIN + ['--dataset', f'folder:{tmp_path / "imgs"}', '--out', out], 'inside the training data folder')
    check_program('train.py', TRAIN + ['--dataset', f'folder:{tmp_path / "imgs"}', '--out', tmp_path / 'imgs-run'])


def test_resumed_step_must_be_a_step_count_below_steps_and_save_early_must_still_fire(tmp_path, capsys):
    """R-auto-fewer-steps, H-resume-negstep, H-resume-bigstep, R-resume-save-early-passed."""
    args = argparse.Namespace(steps=4, save_early=0, out=str(tmp_path))
    for step, match in ((5, 'already at step 5, beyond --steps 4'), (10 ** 12, 'already at step 1000000000000'),
                        (-5, 'holds step -5, not a number of steps'), (2.0, 'holds step 2.0'), (True, 'holds step True')):
        with pytest.raises(SystemExit, match=match):
            runs.check_resumed_step(step, 'ckpt.pt', args)
    runs.check_resumed_step(4, 'ckpt.pt', args)                       # equal: only the end (a final grid) is left
    assert 'ckpt.pt is already at step 4 = --steps: nothing to train' in capsys.readouterr().out
    args.save_early = 2
    with pytest.raises(SystemExit, match='--save-early 2 is before the resumed step 3'):
        runs.check_resumed_step(3, 'ckpt.pt', args)
    (tmp_path / 'ckpt_0000002.pt').write_bytes(b'kept')
    runs.check_resumed_step(3, 'ckpt.pt', args)                       # it fired before the interruption


# ----------------------------------------------------------------------------------------------------
# 6-7. Impossible sizes and values named by their flag or variable.

@pytest.mark.parametrize('argv,match', [
    (['--resolution', '4096'], '--resolution must be at most 1024'),                                # M-train-res-4096
    (['--resolution', '100000'], '--resolution must be at most 1024'),                              # T-resolution=100000
    (['--batch-size', '1000000000'], '--batch-size must be at most 65536'),                         # M-train-batch-1e9
    (['--seed', '-1'], '--seed must be an integer in'),                                             # T-seed=-1
    (['--model-channels', '5'], '--model-channels must be a multiple of 8'),                        # T-model-channels=5
])
def test_impossible_values_name_their_flag(tmp_path, argv, match):
    refused('train.py', [a for a in TRAIN if a != '16' and a != '--resolution'] + argv + ['--out', tmp_path / 'run'], match)


@pytest.mark.parametrize('env,match', [
    ({'RANK': '3', 'WORLD_SIZE': '1'}, 'RANK=3 is not below WORLD_SIZE=1'),                         # P-train-rank-ge-world
    ({'RANK': '0', 'WORLD_SIZE': '2', 'LOCAL_RANK': 'abc'}, "LOCAL_RANK='abc'"),                    # P-train-localrank-abc
    ({'RANK': '0', 'WORLD_SIZE': '0'}, 'WORLD_SIZE=0'),                                              # P-train-world0
    ({'RANK': '0'}, 'WORLD_SIZE=None'),
    ({'RANK': '0', 'WORLD_SIZE': '2', 'LOCAL_RANK': '0'}, 'MASTER_ADDR is not set'),
])
def test_ddp_variables_are_named_when_wrong(monkeypatch, env, match):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=match):
        runs.setup_distributed(argparse.Namespace(device=None, device_obj=None))


# ----------------------------------------------------------------------------------------------------
# 8. Resume from another task's checkpoint: one line first, not a 25-line configuration diff.

@pytest.mark.parametrize('theirs,ours', [('classifier', 'diffusion'), ('autoencoder', 'diffusion'),
                                         ('diffusion', 'classifier'), ('diffusion', 'autoencoder')])
def test_resume_from_another_tasks_checkpoint_says_so_in_one_line(monkeypatch, theirs, ours):
    """W-resume-classifier, W-resume-autoencoder, W-cls-resume-diffusion, W-ae-resume-diffusion, R-auto-*-on-*."""
    monkeypatch.setattr(checkpoints, 'load_checkpoint', lambda path, device: {'config': {'task': theirs, 'net': {}}})
    setup = runs.Setup(0, 1, torch.device('cpu'), 8, 'run/ckpt.pt', resume='run/ckpt.pt')
    article = 'an' if theirs[0] in 'aeiou' else 'a'
    with pytest.raises(SystemExit, match=f'^error: run/ckpt.pt is {article} {theirs} checkpoint, not a {ours} run;'):
        runs.resume_run(None, {'task': ours}, argparse.Namespace(steps=4), setup)


def test_a_file_given_as_the_image_folder_is_named_a_file(tmp_path):
    """D-folder-is-file: 'image folder X does not exist' for a file that exists."""
    import data
    (tmp_path / 'img.png').write_bytes(b'x')
    for name, match in ((f'folder:{tmp_path / "img.png"}', 'is a file, not a folder'), (f'clips:{tmp_path / "img.png"}',
                        'is a file, not a folder of clips'), (f'folder:{tmp_path / "none"}', 'does not exist')):
        with pytest.raises(data.DatasetNotFoundError, match=match):
            data.load_dataset(name, resolution=16)
