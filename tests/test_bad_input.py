"""Issue 11 against train.py and sample.py: nothing lost, every bad input a clear message before long work.

Data loss first (reruns into a run folder, blown-up runs, non-finite last steps, kills during the final grid,
duplicate log records, a full disk, sample.py's output paths), then silently wrong results (resume with changed
flags, NaN weights, NaN guidance, --image preprocessing, tiny folders), then the inputs that used to end in a
traceback. Each test failed on the code before the fix (run against the previous commit's train.py/sample.py)."""
import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
import sample
from programs import check_program, run_program

# A micro model on 16x16 shapes (seconds on a 2-core CPU); data_dir default.
FAST = ['--resolution', '16', '--model-channels', '8', '--batch-size', '8', '--log-every', '1', '--val-every', '0',
        '--sample-every', '0', '--sample-steps', '2', '--warmup', '2', '--no-progress', '--bpd-images', '0']


def run(out, *extra, patch=None):
    """python train.py FAST EXTRA --out OUT (tests/programs.py); patch: lines run first, to plant a failure."""
    return run_program('train.py', FAST + ['--out', str(out)] + list(extra), patch=patch)


def check(out, *extra):
    """train.py's flag checks alone, in-process (main runs them before anything else): for refusals of flags."""
    return check_program('train.py', FAST + ['--out', str(out)] + list(extra))


# Planted in the run's process: the training loss of every step from the third on is NaN (one grad-enabled call per
# step with --grad-accum 1); losses computed without gradients (held-out batch, the checkpoint's probe) stay finite.
NAN_FROM_STEP_3 = """
import diffusion, torch
real_loss, calls = diffusion.Diffusion.loss, []
def loss(self, net, x0, *a, **k):
    calls.append(1) if torch.is_grad_enabled() else None
    out, sigma = real_loss(self, net, x0, *a, **k)
    return (out * float('nan') if torch.is_grad_enabled() and len(calls) > 2 else out), sigma
diffusion.Diffusion.loss = loss
"""


def step_of(path):
    return torch.load(path, weights_only=True)['step']


def log_steps(path, key='loss'):
    with open(path) as f:
        return [r['step'] for r in map(json.loads, f) if key in r]


def error_of(excinfo):
    return str(excinfo.value)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    """One tiny trained checkpoint (2 steps, 6 classes) shared by the sample.py tests."""
    out = tmp_path_factory.mktemp('trained') / 'run'
    run(out, '--steps', '2')
    return out / 'ckpt.pt'


def no_sampling(monkeypatch):
    """Make any sampling fail loudly: the checks must come before it."""
    def boom(*a, **k):
        raise AssertionError('sampling started before the inputs were checked')
    monkeypatch.setattr(sample, 'generate', boom)


# ----------------------------------------------------------------------------------------------------
# Data loss

def test_rerun_into_a_run_folder_refuses_and_keeps_the_checkpoint(tmp_path):
    """Issue 11 #1: a second run without --resume used to replace ckpt.pt (step 6 became step 2) and append to the log."""
    out = tmp_path / 'run'
    run(out, '--steps', '3')
    with pytest.raises(SystemExit) as e:
        run(out, '--steps', '1')
    assert all(s in error_of(e) for s in ('--resume auto', '--out', '--overwrite'))
    assert step_of(out / 'ckpt.pt') == 3 and log_steps(out / 'log.jsonl') == [1, 2, 3]
    run(out, '--steps', '1', '--overwrite')                            # said explicitly: replaced, log restarted
    assert step_of(out / 'ckpt.pt') == 1 and log_steps(out / 'log.jsonl') == [1]


def test_blown_up_weights_never_replace_the_last_good_checkpoint(tmp_path):
    """Issue 11 #2: --lr 1e6 --ckpt-every 1: the exploded step has a finite loss, and was checkpointed."""
    out = tmp_path / 'run'
    run(out, '--steps', '2', '--ckpt-every', '1')
    good = torch.load(out / 'ckpt.pt', weights_only=True)
    with pytest.raises(SystemExit, match='exploded|not finite') as e:
        run(out, '--steps', '8', '--ckpt-every', '1', '--resume', 'auto', '--lr', '1e6', '--warmup', '1', '--allow-changes')
    assert 'still holds step 2' in error_of(e)
    kept = torch.load(out / 'ckpt.pt', weights_only=True)
    assert kept['step'] == 2 and all(torch.equal(kept['ema'][k], v) for k, v in good['ema'].items())
    assert not os.path.exists(out / 'ckpt.pt.tmp')


def test_non_finite_last_steps_exit_with_an_error_after_saving_the_good_weights(tmp_path):
    """Issue 11 #4: when the last steps' losses were NaN the run exited 0 with no checkpoint and no grid."""
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match='last 2 step') as e:
        run(out, '--steps', '4', '--ckpt-every', '100', patch=NAN_FROM_STEP_3)
    assert 'non-finite loss' in error_of(e)                             # each skipped step was warned about
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 4 and all(torch.isfinite(v).all() for v in ckpt['ema'].values())
    assert (out / 'samples_0000004.png').exists()


def test_a_blow_up_with_finite_weights_never_replaces_the_good_checkpoint(tmp_path):
    """Issue 23 #1, its own command: the loss is NaN from step 12 while the weights stay finite (max ~4), and the
    checkpoints of steps 15 and 20 replaced step 10 with weights that give NaN on every input. Now a checkpoint is
    written only if the raw and EMA weights still give a finite loss on a fixed batch."""
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match='still holds step 10') as e:
        run(out, '--steps', '60', '--ckpt-every', '5', '--lr', '1', '--warmup', '20')
    assert 'no longer compute' in error_of(e) or 'not finite' in error_of(e)
    assert step_of(out / 'ckpt.pt') == 10
    import checkpoints                                                  # the kept weights compute
    for ema in (True, False):
        net, diffusion, config = checkpoints.load_model(str(out / 'ckpt.pt'), use_ema=ema)
        x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(diffusion.denoiser(net)(x, torch.full((4,), 1.0), y=torch.zeros(4, dtype=torch.long))).all()


def test_no_checkpoint_over_a_good_one_while_steps_are_skipped(tmp_path):
    """Issue 23 #1: never checkpoint over a good state while steps are being skipped. Steps 3 and 4 (of 4) have a
    NaN loss (planted; the weights themselves stay those of step 2 and compute): --ckpt-every 1 used to write
    steps 3 and 4 over step 2; now ckpt.pt keeps step 2 and the run says so."""
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match='last 2 step') as e:
        run(out, '--steps', '4', '--ckpt-every', '1', patch=NAN_FROM_STEP_3)
    assert 'not saved' in error_of(e) and 'holds step 2, the last good one' in error_of(e)
    assert step_of(out / 'ckpt.pt') == 2


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    """Issue 23 #4: two runs started into one folder while the first loads its data were both accepted (neither had
    written ckpt.pt or log.jsonl yet); one run's checkpoint and log vanished. Now the folder is locked for the life
    of a run: the second is refused at once, the first ends with its own checkpoint and log."""
    import subprocess
    import sys
    from programs import ROOT
    out = tmp_path / 'run'
    slow_data = ('import runs, sys, time\nload = runs.load_training_data\n'
                 'def slow(args):\n    print("loading", flush=True)\n    time.sleep(4)\n    return load(args)\n'
                 'runs.load_training_data = slow\n')
    first = subprocess.Popen([sys.executable, '-c', slow_data + 'import runpy\nsys.argv = ' +
                              repr(['train.py'] + FAST + ['--out', str(out), '--steps', '3']) +
                              '\nrunpy.run_path("train.py", run_name="__main__")'],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS='1'))
    try:
        assert first.stdout.readline().strip() == 'loading'            # the first run holds the folder
        with pytest.raises(SystemExit, match='another run is using'):
            run(out, '--steps', '1')
    finally:
        first.communicate(timeout=300)
    assert first.returncode == 0
    assert step_of(out / 'ckpt.pt') == 3 and log_steps(out / 'log.jsonl') == [1, 2, 3]
    run(out, '--steps', '4', '--resume', 'auto')                        # free again once the first has ended
    assert step_of(out / 'ckpt.pt') == 4


def test_overwrite_keeps_the_previous_run_until_the_new_one_starts_and_then_sets_it_aside(tmp_path):
    """Issue 23 #5 and #6: --overwrite deleted the old run before the new one could start (a typo in --dataset left
    nothing), and deleted by name pattern files the run never wrote. Now nothing is deleted: the run's own files
    (by exact name) move to a previous_run_* subfolder once the new run has its data and model."""
    out = tmp_path / 'run'
    run(out, '--steps', '2')
    (out / 'samples_best.png').write_bytes(b'mine')                     # the user's files beside the run
    (out / 'ckpt_good.pt').write_bytes(b'mine too')
    with pytest.raises(SystemExit, match='nonexistent'):
        run(out, '--steps', '1', '--overwrite', '--dataset', 'nonexistent')
    assert step_of(out / 'ckpt.pt') == 2 and log_steps(out / 'log.jsonl') == [1, 2]   # a typo loses nothing
    said = run(out, '--steps', '1', '--overwrite').stdout
    assert step_of(out / 'ckpt.pt') == 1 and log_steps(out / 'log.jsonl') == [1] and 'was moved to' in said
    kept = [p for p in out.iterdir() if p.name.startswith('previous_run_')]
    assert len(kept) == 1 and step_of(kept[0] / 'ckpt.pt') == 2 and log_steps(kept[0] / 'log.jsonl') == [1, 2]
    assert (kept[0] / 'samples_0000002.png').exists()
    assert (out / 'samples_best.png').read_bytes() == b'mine' and (out / 'ckpt_good.pt').read_bytes() == b'mine too'


def test_resume_auto_without_a_checkpoint_keeps_the_old_log(tmp_path):
    """Issue 23 #7: --resume auto in a folder whose run never reached a checkpoint silently started afresh and
    replaced its log. Now the fresh start is stated and the old log is kept aside."""
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match=r'interrupted at step 2; no checkpoint yet'):   # before its first checkpoint
        run(out, '--steps', '4', '--ckpt-every', '4',
            patch='import runs\nreal = runs.get_lr\nruns.get_lr = lambda step, args: kill() if step == 2 else real(step, args)')
    assert not (out / 'ckpt.pt').exists() and log_steps(out / 'log.jsonl') == [1, 2]
    said = run(out, '--steps', '1', '--resume', 'auto').stdout
    assert 'was moved to' in said and log_steps(out / 'log.jsonl') == [1]
    kept = [p for p in out.iterdir() if p.name.startswith('previous_run_')]
    assert len(kept) == 1 and log_steps(kept[0] / 'log.jsonl') == [1, 2]


def test_kill_during_the_final_grid_then_resume_auto_writes_it(tmp_path):
    """Issue 11 #4: the checkpoint of the last step exists, so --resume auto had nothing to do and exited 0."""
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match='interrupted at step 2; .*ckpt.pt holds step 2'):   # Ctrl-C in the final grid
        run(out, '--steps', '2', patch='import reports\nreports.sample_grid = kill')
    assert step_of(out / 'ckpt.pt') == 2 and not (out / 'samples_0000002.png').exists()
    run(out, '--steps', '2', '--resume', 'auto')
    assert (out / 'samples_0000002.png').exists()


def test_resume_writes_each_step_once_in_the_log(tmp_path):
    """Issue 11 #4: a run killed after logging step 3 but before its checkpoint logged step 3 twice on resume."""
    out = tmp_path / 'run'
    kill_at_3 = ('import runs\nreal = runs.get_lr\n'                   # the start of step 4: step 3 is logged
                 'runs.get_lr = lambda step, args: kill() if step == 3 else real(step, args)')
    # Issue 23: Ctrl-C is one line (no KeyboardInterrupt traceback) with the step reached and the step ckpt.pt holds.
    with pytest.raises(SystemExit) as said:
        run(out, '--steps', '4', '--ckpt-every', '2', patch=kill_at_3)
    message = f"interrupted at step 3; {out / 'ckpt.pt'} holds step 2; --resume auto continues"
    assert str(said.value).endswith(message) and 'Traceback' not in str(said.value)
    assert log_steps(out / 'log.jsonl') == [1, 2, 3] and step_of(out / 'ckpt.pt') == 2
    run(out, '--steps', '4', '--ckpt-every', '2', '--resume', 'auto')
    assert log_steps(out / 'log.jsonl') == [1, 2, 3, 4]


def test_full_disk_says_disk_full_removes_the_temp_file_and_keeps_the_checkpoint(tmp_path):
    """Issue 11 #5: torch's 'unexpected pos' traceback and a partial ckpt.pt.tmp."""
    out = tmp_path / 'run'
    run(out, '--steps', '1')
    full = """
import errno, torch
def full(obj, path, *a, **k):                                           # half a file, then ENOSPC
    with open(path, 'wb') as f:
        f.write(b'partial')
    raise OSError(errno.ENOSPC, 'No space left on device')
torch.save = full
"""
    with pytest.raises(SystemExit, match='disk full') as e:
        run(out, '--steps', '2', '--resume', 'auto', patch=full)
    assert 'still holds the previous checkpoint' in error_of(e)
    assert sorted(n for n in os.listdir(out) if n != '.lock') == ['ckpt.pt', 'log.jsonl', 'log.png', 'samples_0000001.png']
    assert step_of(out / 'ckpt.pt') == 1


def test_sample_output_paths_are_checked_before_sampling(tmp_path, ckpt, monkeypatch):
    """Issue 11 #3: --out / --npz were checked only after all sampling (missing folder, a folder, no extension)."""
    no_sampling(monkeypatch)
    for flags, message in ((['--out', str(tmp_path)], 'is a folder'),
                           (['--out', str(tmp_path / 'samples')], 'extension'),
                           (['--npz', str(tmp_path / 'samples')], 'extension'),
                           (['--out', str(tmp_path / 'x.png'), '--npz', str(tmp_path / 'x.png')], 'extension')):
        with pytest.raises(SystemExit, match=message):
            sample.main(sample.parse_args(['--ckpt', str(ckpt), '-n', '2'] + flags))


def test_sample_creates_missing_folders(tmp_path, ckpt):
    out, npz = tmp_path / 'new' / 'deeper' / 's.png', tmp_path / 'other' / 's.npz'
    sample.main(sample.parse_args(['--ckpt', str(ckpt), '-n', '2', '--steps', '2', '--out', str(out), '--npz', str(npz)]))
    assert out.exists() and np.load(npz)['samples'].shape == (2, 16, 16, 3)


def test_sample_never_loses_computed_samples(tmp_path, ckpt, monkeypatch):
    """A write that fails after sampling (disk full) keeps the samples in a rescue file and says where."""
    def full(*a, **k):
        raise OSError(errno.ENOSPC, 'disk full while writing')
    monkeypatch.setattr(sample, 'save_grid', full)
    with pytest.raises(SystemExit, match='kept in') as e:
        sample.main(sample.parse_args(['--ckpt', str(ckpt), '-n', '3', '--steps', '2', '--out', str(tmp_path / 's.png')]))
    rescued = error_of(e).split('kept in ')[1].split(' ')[0]
    assert torch.load(rescued, weights_only=True)['samples'].shape == (3, 3, 16, 16)
    os.remove(rescued)


# ----------------------------------------------------------------------------------------------------
# Silently wrong

@pytest.fixture(scope='module')
def one_step_run(tmp_path_factory):
    """A run folder after 1 step, copied by each test that resumes it."""
    out = tmp_path_factory.mktemp('one_step') / 'run'
    run(out, '--steps', '1')
    return out


@pytest.mark.parametrize('flag,value', [('--split', 'test'), ('--seed', '1'), ('--batch-size', '4'), ('--lr', '1e-3')])
def test_resume_with_changed_flags_is_refused_or_stated(tmp_path, one_step_run, flag, value):
    out = tmp_path / 'run'
    shutil.copytree(one_step_run, out)
    with pytest.raises(SystemExit, match=f'{flag}: run had') as e:
        run(out, '--steps', '2', '--resume', 'auto', flag, value)
    assert '--allow-changes' in error_of(e) and step_of(out / 'ckpt.pt') == 1
    if flag == '--lr':                          # the stated resume once (the same code path for every flag)
        said = run(out, '--steps', '2', '--resume', 'auto', flag, value, '--allow-changes').stdout
        assert 'no longer that of an uninterrupted run' in said and step_of(out / 'ckpt.pt') == 2


def test_sample_refuses_nan_weights_instead_of_writing_a_black_png(tmp_path, ckpt):
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in state['ema'].items() if v.is_floating_point())
    state['ema'][key] = state['ema'][key] * float('nan')
    torch.save(state, tmp_path / 'nan.pt')
    with pytest.raises(SystemExit, match='non-finite'):
        sample.main(sample.parse_args(['--ckpt', str(tmp_path / 'nan.pt'), '-n', '2', '--out', str(tmp_path / 'x.png')]))
    assert not (tmp_path / 'x.png').exists()


def test_nan_guidance_is_refused(tmp_path, ckpt, monkeypatch):
    no_sampling(monkeypatch)
    with pytest.raises(SystemExit, match='guidance'):
        sample.main(sample.parse_args(['--ckpt', str(ckpt), '--guidance', 'nan', '--out', str(tmp_path / 'x.png')]))
    with pytest.raises(SystemExit, match='guidance'):
        check(tmp_path / 'run', '--steps', '1', '--guidance', 'nan')


def test_inverse_image_is_cropped_and_composited_as_in_training(tmp_path, ckpt):
    """A 32x16 image (red | green | blue quarters-half-quarter) with a transparent top-left corner: training
    centre-crops to the green half and composites on white; the old --image stretched it and dropped alpha."""
    rgba = np.zeros((16, 32, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)
    rgba[:, 8:24] = (0, 255, 0, 255)
    rgba[:, 24:] = (0, 0, 255, 255)
    rgba[:4, 8:12, 3] = 0                                               # transparent: white after compositing
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'wide.png')
    x = sample.read_image(str(tmp_path / 'wide.png'), 3, 16)[0]
    expect = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16).clone()
    expect[:, :4, :4] = 1.0
    assert torch.equal(x, expect)
    assert torch.equal(x, data.to_float(data.load_image(str(tmp_path / 'wide.png'), 16)))
    out = tmp_path / 'inv.png'
    sample.main(sample.parse_args(['--ckpt', str(ckpt), '--inverse', 'replacement', '--operator', 'inpaint_box',
                                   '--image', str(tmp_path / 'wide.png'), '--steps', '2', '--out', str(out)]))
    assert out.exists()


@pytest.mark.parametrize('flags', [['--steps', '0'], ['--steps', '-5'], ['--batch-size', '0'], ['--lr', '0'],
                                   ['--ema-decay', '1.5'], ['--ema-decay', '-1'], ['--aug-p', '2'], ['--p-uncond', '-1'],
                                   ['--resolution', '0'], ['--lr', 'nan']])
def test_train_range_checks(tmp_path, flags):
    with pytest.raises(SystemExit, match='must|probability'):
        check(tmp_path / 'run', *flags)
    assert not (tmp_path / 'run').exists()                             # refused before anything was written


def test_sample_steps_zero_is_refused_not_replaced_by_18(tmp_path, ckpt, monkeypatch):
    no_sampling(monkeypatch)
    with pytest.raises(SystemExit, match='--steps must be at least 1'):
        sample.main(sample.parse_args(['--ckpt', str(ckpt), '--steps', '0', '--out', str(tmp_path / 'x.png')]))


def test_tiny_folder_logs_no_nan_validation_loss(tmp_path):
    (tmp_path / 'imgs').mkdir()
    for i in range(5):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(tmp_path / 'imgs' / f'{i}.png')
    out = tmp_path / 'run'
    said = run(out, '--steps', '2', '--dataset', f'folder:{tmp_path / "imgs"}', '--val-every', '1').stdout
    with open(out / 'log.jsonl') as f:
        records = [json.loads(line) for line in f]
    assert not any('val_loss' in r for r in records) and all(np.isfinite(r['loss']) for r in records if 'loss' in r)
    assert 'too few to hold any out' in said


# ----------------------------------------------------------------------------------------------------
# Tracebacks that are now messages

@pytest.mark.parametrize('flags,message', [
    (['--resolution', '7'], 'multiple of 4'), (['--resolution', '33'], 'multiple of 4'),
    (['--model', 'dit', '--resolution', '31'], 'patch size 2'), (['--model', 'dit', '--resolution', '3'], 'patch size 2'),
    (['--config', 'nonexistent'], 'not a unet configuration'), (['--model', 'dit', '--config', 'micro'], 'not a dit configuration'),
    (['--split', 'nonsense'], "'train' or 'test'"), (['--ckpt-every', '0'], 'ckpt-every'), (['--log-every', '0'], 'log-every'),
    (['--grad-accum', '0'], 'grad-accum'), (['--device', 'bogus'], 'not a device'),
    (['--sampler-opt', 'eta'], 'KEY=VALUE')])
def test_train_bad_flags_are_messages(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        check(tmp_path / 'run', '--steps', '2', *flags)


def test_train_out_is_a_file_or_read_only(tmp_path):
    (tmp_path / 'file').write_text('x')
    with pytest.raises(SystemExit, match='is a file'):
        run(tmp_path / 'file', '--steps', '1')
    if os.geteuid() != 0:                                               # root writes through any permission bits
        (tmp_path / 'ro').mkdir(mode=0o500)
        with pytest.raises(SystemExit, match='cannot write'):
            run(tmp_path / 'ro' / 'run', '--steps', '1')


@pytest.mark.parametrize('flags,message', [
    (['-n', '0'], '-n must be'), (['-n', '-2'], '-n must be'), (['--batch', '0'], '--batch must'),
    (['--steps', '-3'], '--steps must'), (['--device', 'bogus'], 'not a device'),
    (['--inverse', 'dps', '--factor', '3'], 'factor'), (['--inverse', 'dps', '--factor', '0'], 'factor'),
    (['--inverse', 'dps', '--factor', '64'], 'factor'), (['--inverse', 'dps', '--operator', 'blur'], 'operator'),
    (['--inverse', 'dps', '--image', 'missing.png'], 'does not exist')])
def test_sample_bad_flags_are_messages(tmp_path, ckpt, flags, message, monkeypatch):
    no_sampling(monkeypatch)
    with pytest.raises(SystemExit, match=message):
        sample.main(sample.parse_args(['--ckpt', str(ckpt), '--out', str(tmp_path / 'x.png')] + flags))


@pytest.mark.parametrize('content,message', [
    ([1, 2, 3], 'holds a list'), ({'weight': torch.zeros(2)}, 'missing config'),
    ('missing-ema', 'missing ema'), ('wrong-shapes', 'do not fit'), ('no-optimizer', 'cannot be resumed')])
def test_checkpoints_with_missing_keys_or_other_objects(tmp_path, ckpt, content, message):
    """KeyError / IndexError / AttributeError before; now a message in both sample.py and train.py --resume."""
    state = torch.load(ckpt, weights_only=True)
    if content == 'missing-ema':
        del state['ema']
    elif content == 'wrong-shapes':
        state['ema'] = {k: v[..., :1] if v.ndim else v for k, v in state['ema'].items()}
    elif content == 'no-optimizer':
        del state['optimizer']
    else:
        state = content
    torch.save(state, tmp_path / 'bad.pt')
    if content != 'no-optimizer':
        with pytest.raises(SystemExit, match=message):
            sample.main(sample.parse_args(['--ckpt', str(tmp_path / 'bad.pt'), '--out', str(tmp_path / 'x.png')]))
    if content != 'wrong-shapes':                                       # train.py resumes the raw weights, not the EMA
        with pytest.raises(SystemExit, match=message):
            run(tmp_path / 'run', '--steps', '2', '--resume', str(tmp_path / 'bad.pt'))
