"""checkpoints.py: the config a checkpoint carries is enough to rebuild the model, and a wrong file is a message."""
import argparse
import ast
import os

import pytest
import torch

import checkpoints
import data
from dit import DIT_CONFIGS, DiT
from programs import ROOT

pytestmark = pytest.mark.usefixtures('one_thread')


def diffusion_args(**kw):
    """The flags checkpoints.py's writers read, as train.py's defaults (a micro U-Net on 16x16 shapes)."""
    defaults = dict(model='unet', config=None, dropout=None, model_channels=8, prediction='eps', schedule=None,
                    t_sampler='uniform', sigma_data=0.5, T=100, low_res=8, noise_aug_max=0.5, noise_aug_dim=4,
                    upsample='bicubic')
    return argparse.Namespace(**dict(defaults, **kw))


def test_a_config_rebuilds_the_same_network_and_diffusion(tmp_path):
    dataset = data.load_dataset('shapes', resolution=16, num_images=10)
    args = diffusion_args()
    name, net = checkpoints.network_config(args, dataset, dataset.num_classes, 0)
    config = checkpoints.make_config('diffusion', 'unet', name, net, checkpoints.data_config('shapes', dataset),
                                     checkpoints.diffusion_config(args))
    # the schema the docstring promises
    assert set(config) == {'task', 'model', 'config_name', 'net', 'diffusion', 'data'}
    assert config['diffusion'] == {'prediction': 'eps', 'schedule': 'cosine', 't_sampler': 'uniform', 'sigma_data': 0.5,
                                   'T': 100}                       # eps's natural schedule, discrete: its T recorded
    assert config['data'] == {'dataset': 'shapes', 'resolution': 16, 'channels': 3, 'num_classes': 6,
                              'class_names': list(dataset.class_names), 'frames': 0}
    torch.manual_seed(0)
    trained = checkpoints.build_network(config)
    torch.save({'config': config, 'model': trained.state_dict(), 'ema': trained.state_dict()}, tmp_path / 'c.pt')
    net, diffusion, loaded = checkpoints.load_model(str(tmp_path / 'c.pt'))
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), net.state_dict().values()))
    assert diffusion.schedule.T == 100 and diffusion.prediction == 'eps' and not net.training
    assert checkpoints.sample_shape(loaded) == (3, 16, 16)
    assert checkpoints.sample_shape(dict(loaded, data=dict(loaded['data'], frames=8))) == (3, 8, 16, 16)


def test_superres_config_records_its_conditioning():
    dataset = data.load_dataset('shapes', resolution=16, num_images=10)
    name, net, sr = checkpoints.superres_config(diffusion_args(), dataset, 0)
    assert sr == {'low_res': 8, 'noise_aug_max': 0.5, 'aug_dim': 4, 'upsample': 'bicubic'}
    assert net['cond_channels'] == 3 and net['aug_dim'] == 4
    with pytest.raises(SystemExit, match='--low-res 16 must be smaller'):
        checkpoints.superres_config(diffusion_args(low_res=16), dataset, 0)


def test_resolution_problems_name_the_constraint():
    assert 'multiple of 4' in checkpoints.resolution_problem('unet', 'micro', 18)
    assert 'patch size 2' in checkpoints.resolution_problem('dit', None, 31)
    assert checkpoints.resolution_problem('unet', 'micro', 16) is None


def test_the_default_dit_is_sized_for_a_cpu_and_the_published_sizes_keep_their_meaning():
    # --model dit without --config: DiT-cpu (about as costly per step as the micro U-Net), not DiT-S/4 (32.5M).
    mnist = argparse.Namespace(resolution=32, channels=1)
    name, net = checkpoints.network_config(diffusion_args(model='dit'), mnist, 10, 0)
    assert name == 'DiT-cpu' and (net['depth'], net['hidden_size'], net['patch_size']) == (2, 64, 2)
    assert checkpoints.parameter_count(DiT, net) < 2_000_000
    # Table 1 of Peebles & Xie: DiT-S is 12 blocks of width 384 with 6 heads, whatever our default is.
    assert DIT_CONFIGS['DiT-S/4'] == dict(depth=12, hidden_size=384, num_heads=6, patch_size=4)


def test_config_mismatch_lists_the_differing_keys_but_not_class_names():
    a = {'net': {'model_channels': 8}, 'data': {'class_names': ['a'], 'resolution': 16}}
    b = {'net': {'model_channels': 16}, 'data': {'class_names': ['b'], 'resolution': 16}}
    assert checkpoints.config_mismatch(a, b) == ['net.model_channels: checkpoint has 8, this run has 16']


@pytest.mark.parametrize('content,message', [([1, 2], 'holds a list'), ({'w': torch.zeros(1)}, 'bare state_dict'),
                                             ({'config': 3, 'model': {}, 'ema': {}}, 'config'),
                                             (b'not a checkpoint', 'cannot read')])
def test_a_wrong_file_is_a_message_that_says_what_it_is(tmp_path, content, message):
    path = tmp_path / 'x.pt'
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(SystemExit, match=message):
        checkpoints.load_checkpoint(str(path))


def test_nothing_imports_a_training_program_and_the_harness_imports_no_command_line():
    """The import DAG of DESIGN.md: no file (tests and benchmarks included) imports train.py, train_autoencoder.py
    or train_classifier.py; checkpoints/runs/video import no command line."""
    programs = {'train', 'train_autoencoder', 'train_classifier'}
    command_lines = programs | {'sample', 'evaluate'}
    for folder in ('.', 'tests', 'benchmarks'):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if not name.endswith('.py'):
                continue
            tree = ast.parse(open(os.path.join(ROOT, folder, name)).read())
            imported = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not imported & programs, (folder, name, imported & programs)
            if name in ('checkpoints.py', 'runs.py', 'video.py') and folder == '.':
                assert not imported & command_lines, (name, imported & command_lines)
