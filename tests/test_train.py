"""End-to-end tests of the command lines: train.py and sample.py on real (procedural and MNIST) data, real
checkpoints written and read back, exact resume, the overfit check, clear errors, and a two-process DDP run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoints
import data
import sample
from programs import ROOT, check_program, run_program, weights
# A micro model on 16x16 shapes: a few steps take seconds on a 2-core CPU.
FAST = ['--resolution', '16', '--model-channels', '8', '--batch-size', '8', '--log-every', '2', '--val-every', '4',
        '--sample-every', '0', '--sample-steps', '3', '--warmup', '2', '--no-progress', '--bpd-images', '0']


def run(tmp_path, *extra, name='run', patch=None):
    """python train.py FAST EXTRA --out tmp_path/name; returns the finished process (stdout, stderr)."""
    return run_program('train.py', FAST + ['--out', str(tmp_path / name)] + list(extra), patch=patch)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_train_writes_checkpoint_log_and_grid_then_sample_reads_them(tmp_path):
    run(tmp_path, '--steps', '4', '--ckpt-every', '2')
    out = tmp_path / 'run'
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)            # loads without pickled code
    assert ckpt['step'] == 4 and ckpt['config']['data']['num_classes'] == 6
    assert sorted(n for n in os.listdir(out) if n != '.lock') == ['ckpt.pt', 'log.jsonl', 'log.png', 'samples_0000004.png']   # no temp files
    records = read_log(out / 'log.jsonl')
    assert [r['step'] for r in records if 'loss' in r] == [2, 4]
    assert any('val_loss' in r for r in records) and all(len(r['loss_by_sigma']) > 0 for r in records if 'loss' in r)
    net, _, _ = checkpoints.load_model(str(out / 'ckpt.pt'))          # the EMA rebuilt from the config alone
    for (k, v), w in zip(ckpt['ema'].items(), net.state_dict().values()):
        assert torch.equal(v, w), k
    # sample.py: settings come from the checkpoint; class by name; PNG and npz written
    png, npz = tmp_path / 's.png', tmp_path / 's.npz'
    sample.main(sample.parse_args(['--ckpt', str(out / 'ckpt.pt'), '-n', '4', '--out', str(png), '--npz', str(npz),
                                   '--class', 'circle', '--steps', '3']))
    from PIL import Image
    assert Image.open(png).size[0] > 16
    import numpy as np
    z = np.load(npz)
    assert z['samples'].shape == (4, 16, 16, 3) and z['samples'].dtype == np.uint8 and (z['labels'] == 0).all()


@pytest.mark.parametrize('extra', [[], ['--prediction', 'eps', '--schedule', 'linear', '--t-sampler', 'importance',
                                         '--grad-accum', '2', '--aug-p', '0.5', '--dropout', '0.1']],
                         ids=['default', 'importance-accum-augment-dropout'])
def test_resume_is_exact(tmp_path, extra):
    """N steps, stop, resume for N more == 2N steps straight (same weights, EMA and optimizer state); with
    importance sampling the history travels through Diffusion.state_dict(). (Planted: the diffusion state not
    restored on resume -> the importance probabilities differ -> fails; dropout RNG not restored -> fails.)"""
    run(tmp_path, '--steps', '6', '--ckpt-every', '100', *extra, name='straight')
    run(tmp_path, '--steps', '3', '--ckpt-every', '100', *extra, name='resumed')
    run(tmp_path, '--steps', '6', '--ckpt-every', '100', '--resume', 'auto', *extra, name='resumed')
    a, b = (torch.load(tmp_path / name / 'ckpt.pt', weights_only=True) for name in ('straight', 'resumed'))
    flat = lambda d: [v for k in sorted(d) for v in (flat(d[k]) if isinstance(d[k], dict) else [d[k]])]
    assert len(flat(a['diffusion'])) == (2 if extra else 0)            # the importance history, when there is one
    for x, y in zip(flat(a['diffusion']) + flat(a['optimizer']['state']), flat(b['diffusion']) + flat(b['optimizer']['state'])):
        assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))
    straight, resumed = (str(tmp_path / name / 'ckpt.pt') for name in ('straight', 'resumed'))
    for a, b in zip(weights(straight, 'model') + weights(straight), weights(resumed, 'model') + weights(resumed)):
        assert torch.equal(a, b)


def test_overfit_one_batch_drives_the_loss_to_near_zero(tmp_path):
    # 200 steps: the loss is at ~1% of its start (3% at 170, 5% at 150), a margin of 4x below the bound
    run(tmp_path, '--steps', '200', '--overfit-batch', '--lr', '3e-3', '--warmup', '10', '--lr-decay', 'constant',
        '--ckpt-every', '1000', '--val-every', '0', '--model-channels', '16', '--log-every', '10')
    losses = [r['loss'] for r in read_log(tmp_path / 'run' / 'log.jsonl') if 'loss' in r]
    assert losses[-1] < 0.05 * losses[0], losses


def test_clear_errors_for_bad_checkpoints(tmp_path):
    run(tmp_path, '--steps', '2')
    ckpt = tmp_path / 'run' / 'ckpt.pt'
    with pytest.raises(SystemExit, match='another configuration') as e:
        run(tmp_path, '--steps', '4', '--resume', str(ckpt), '--prediction', 'v', name='other')
    assert 'prediction' in str(e.value)
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(ckpt.read_bytes()[:1000])                          # a truncated download
    with pytest.raises(SystemExit, match='cannot read'):
        checkpoints.load_model(str(bad))
    with pytest.raises(SystemExit, match='does not exist'):
        checkpoints.load_model(str(tmp_path / 'missing.pt'))
    with pytest.raises(SystemExit, match='class must be'):
        sample.main(sample.parse_args(['--ckpt', str(ckpt), '-n', '2', '--class', 'hexagon', '--out', str(tmp_path / 'x.png')]))


def test_non_finite_loss_stops_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match='not finite for 10 steps') as e:
        run(tmp_path, '--steps', '30', '--lr', '1e30', '--warmup', '1', '--grad-clip', '0')
    assert 'non-finite loss, update skipped' in str(e.value)              # the warning of each skipped step


@pytest.mark.parametrize('prediction', ['eps', 'v', 'flow'])
def test_every_parameterisation_trains(tmp_path, prediction):
    run(tmp_path, '--steps', '2', '--prediction', prediction, '--t-sampler', 'uniform')
    assert (tmp_path / 'run' / 'ckpt.pt').exists()


def test_importance_sampling_and_augmentation_run(tmp_path):
    run(tmp_path, '--steps', '3', '--prediction', 'eps', '--schedule', 'linear', '--t-sampler', 'importance', '--aug-p', '0.5')
    ckpt = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    assert ckpt['config']['net']['aug_dim'] == 10
    diffusion = checkpoints.build_diffusion(ckpt['config'])                 # the history through Diffusion's own state
    diffusion.load_state_dict(ckpt['diffusion'])
    assert diffusion.importance.counts.sum() == 3 * 8                  # 3 steps x 8 images, each t counted once


def test_mnist_from_shared_data(tmp_path, shared_data):
    run(tmp_path, '--steps', '2', '--dataset', 'mnist', '--data-dir', os.path.join(shared_data, 'mnist'), '--split', 'test',
        '--resolution', '32')
    ckpt = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    assert ckpt['config']['data']['channels'] == 1 and ckpt['config']['data']['num_classes'] == 10


def test_two_process_ddp_with_gloo_stays_in_sync(tmp_path):
    """A real torchrun launch of two CPU processes: gradients are averaged, so both replicas end identical."""
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29517',
           os.path.join(ROOT, 'train.py'), *FAST, '--steps', '3', '--device', 'cpu', '--out', str(out)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sums = [r['ddp_param_checksums'] for r in read_log(out / 'log.jsonl') if 'ddp_param_checksums' in r][0]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert torch.load(out / 'ckpt.pt', weights_only=True)['step'] == 3


def test_video_model_trains_and_samples_to_a_gif(tmp_path):
    run(tmp_path, '--steps', '2', '--dataset', 'video-shapes', '--config', 'tiny-video', '--batch-size', '4')
    ckpt = tmp_path / 'run' / 'ckpt.pt'
    assert torch.load(ckpt, weights_only=True)['config']['data']['frames'] == 8
    sample.main(sample.parse_args(['--ckpt', str(ckpt), '-n', '2', '--steps', '2', '--out', str(tmp_path / 'v.png')]))
    from PIL import Image
    gif = Image.open(tmp_path / 'v.gif')
    assert gif.n_frames == 8 and Image.open(tmp_path / 'v.png').size == (8 * 18 + 2, 2 * 18 + 2)


def test_evaluation_during_training_logs_kid_and_fd(tmp_path):
    run(tmp_path, '--steps', '2', '--eval-every', '2', '--eval-samples', '40')
    evals = [r for r in read_log(tmp_path / 'run' / 'log.jsonl') if 'eval' in r]
    assert len(evals) == 1 and evals[0]['eval_network'] == 'lenet'
    assert evals[0]['eval']['FD_lenet'] > 0 and 'KD_lenet' in evals[0]['eval'] and 'FID' not in evals[0]['eval']


def test_evaluate_command_line_samples_a_checkpoint(tmp_path, capsys):
    import numpy as np
    import data
    import evaluate
    run(tmp_path, '--steps', '2')
    real = data.load_dataset('shapes', resolution=16, num_images=600)
    x, y = real.batch(torch.arange(600))
    clf = evaluate.train_classifier((x + 1) / 2, y, 6, steps=50)
    torch.save(clf.state_dict(), tmp_path / 'lenet.pt')
    np.savez(tmp_path / 'ref.npz', images=real.images.numpy())
    results = evaluate.main(evaluate.parse_args([str(tmp_path / 'run' / 'ckpt.pt'), str(tmp_path / 'ref.npz'),
                                                 '--network', 'lenet', '--lenet-weights', str(tmp_path / 'lenet.pt'),
                                                 '--num-gen', '24', '--metrics', 'fid,kid', '--steps', '2',
                                                 '--conditions', 'fixed', '--class', '2', '--device', 'cpu']))
    assert results['FD_lenet'] > 0 and 'KD_lenet' in results
    out = capsys.readouterr().out
    assert 'sampled 24 images' in out and 'conditions=fixed' in out and 'trend only' in out


def make_image_folder(root, n=40, size=16):
    """n random RGB PNGs in two class sub-folders."""
    from PIL import Image
    g = np.random.default_rng(0)
    for i in range(n):
        folder = root / ('a' if i % 2 else 'b')
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f'{i:03d}.png')


def test_folder_over_the_memory_budget_streams_and_trains_identically(tmp_path):
    """40 images of 16x16 (30 KB decoded) against a 1 KB budget: the dataset streams from disk through a
    DataLoader worker, and the run ends bit-identical to the in-memory run, because each step's indices come
    from the (seed, step, rank) generator, not from the loader; a streamed run resumed half-way ends there too.
    (Planted: --memory-budget not passed to data.load_dataset -> not streaming -> fails; the loader's indices
    restarted at step 0 on resume -> resumed weights differ -> fails.)"""
    make_image_folder(tmp_path / 'imgs')
    # The run says whether its dataset streams: data.load_dataset wrapped to print it.
    report = ('import data\nload = data.load_dataset\n'
              'data.load_dataset = lambda *a, **k: (lambda d: print("streaming:", getattr(d, "streaming", False)) or d)(load(*a, **k))')
    common = ['--dataset', f'folder:{tmp_path / "imgs"}', '--steps', '4', '--val-every', '2']
    budget = ['--memory-budget', str(1024 / 2 ** 30)]
    streamed = run(tmp_path, *common, *budget, '--workers', '1', name='streamed', patch=report)
    in_memory = run(tmp_path, *common, name='in_memory', patch=report)
    assert 'streaming: True' in streamed.stdout and 'streaming: False' in in_memory.stdout
    ema = lambda name: weights(str(tmp_path / name / 'ckpt.pt'))
    for a, b in zip(ema('streamed'), ema('in_memory')):
        assert torch.equal(a, b)
    # and a streamed run resumed half-way ends where the uninterrupted one did
    run(tmp_path, *common[:-4], '--steps', '2', '--val-every', '2', *budget, name='half')
    run(tmp_path, *common, *budget, '--resume', 'auto', name='half')
    for a, b in zip(ema('half'), ema('in_memory')):
        assert torch.equal(a, b)


def test_unknown_sampler_option_is_a_clear_error_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit, match="'heun' has no option 'eta'"):   # train.py's checks (main runs them first)
        check_program('train.py', FAST + ['--out', tmp_path / 'run', '--steps', '2', '--sampler-opt', 'eta=0.5'])
    assert not (tmp_path / 'run').exists()                             # nothing started
    ckpt = tmp_path / 'ok' / 'ckpt.pt'
    run(tmp_path, '--steps', '1', name='ok')
    with pytest.raises(SystemExit, match="'euler' has no option 'S_churn'"):
        sample.main(sample.parse_args(['--ckpt', str(ckpt), '--sampler', 'euler', '--sampler-opt', 'S_churn=40',
                                       '--out', str(tmp_path / 'x.png')]))
    # a valid option goes through, and the command line gives what the library gives with the same seed
    npz = tmp_path / 's.npz'
    sample.main(sample.parse_args(['--ckpt', str(ckpt), '--sampler', 'ddim', '--sampler-opt', 'eta=1.0', '-n', '3',
                                   '--steps', '4', '--seed', '5', '--class', 'none', '--out', str(tmp_path / 's.png'),
                                   '--npz', str(npz)]))
    net, diffusion, config = checkpoints.load_model(str(ckpt))
    ref = sample.generate(net, diffusion, 3, checkpoints.sample_shape(config), 'cpu', torch.full((3,), 6), 6, 'ddim', 4,
                          2.0, seed=5, sampler_options={'eta': 1.0})
    assert np.array_equal(np.load(npz)['samples'], data.to_uint8(ref).movedim(1, -1).numpy())
