"""Checkpoints are user input (issue 23, attack of 414 cases): a hand-edited config, the wrong kind of checkpoint
and a file that is not a checkpoint are each one message naming the file and the field, before anything is built."""
import argparse
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints

pytestmark = pytest.mark.usefixtures('one_thread')

DATA = SimpleNamespace(resolution=16, channels=3, num_classes=6, class_names=list('abcdef'))


def args(**kw):
    return argparse.Namespace(**dict(dict(model='unet', config=None, dropout=None, model_channels=8, prediction='eps',
                                          schedule=None, t_sampler='uniform', sigma_data=0.5, T=100, vae_config='tiny-kl',
                                          vq=False, unconditional=False), **kw))


def diffusion_config():
    name, net = checkpoints.network_config(args(), DATA, 6, 0)
    return checkpoints.make_config('diffusion', 'unet', name, net, checkpoints.data_config('shapes', DATA),
                                   checkpoints.diffusion_config(args()))


def save(path, config, step=3):
    """A checkpoint as train.py writes it, with the weights of the network its config describes (when buildable)."""
    try:
        weights = checkpoints.NETWORKS[config['model']](**config['net']).state_dict()
    except Exception:                   # an edited config that no network takes: refused before the weights matter
        weights = {}
    torch.save({'config': config, 'model': weights, 'ema': weights, 'step': step}, path)
    return str(path)


def edited(**changes):
    """The valid config with one field replaced: changes maps 'section.key' (or 'key') to a value."""
    config = diffusion_config()
    for where, value in changes.items():
        section, _, key = where.rpartition('.')
        (config[section] if section else config)[key] = value
    return config


@pytest.mark.parametrize('change,field', [
    ({'net.foo': 1}, "config.net has 'foo'"),                          # H-sample-unknown: TypeError from UNet.__init__
    ({'model': 'dit'}, 'not arguments of DiT'),                         # H-sample-dit: a unet net config on a DiT
    ({'diffusion.schedule': 'nope'}, 'config.diffusion.schedule'),      # H-sample-sched: ValueError via build_diffusion
    ({'diffusion.prediction': 'nope'}, 'config.diffusion.prediction'),
    ({'diffusion.sigma_data': 'abc'}, 'config.diffusion.sigma_data'),   # H-sample-strsd: TypeError in sampling
    ({'data.resolution': 0}, 'config.data.resolution'),                 # H-sample-res0: a conv shape error
    ({'data.resolution': 100000}, 'config.data.resolution'),            # H-sample-hugeres
    ({'data.num_classes': -1}, 'config.data.num_classes'),
    ({'net.num_classes': -1}, 'config.net.num_classes'),                # H-sample-negcls
    ({'data.class_names': ['one']}, 'class_names has 1 names for 6'),   # H-sample-classnames: accepted silently
    ({'task': 'banana'}, "config.task is 'banana'"),                    # H-sample-task: sampled as diffusion
])
def test_an_edited_config_is_one_message_naming_the_file_and_field(tmp_path, change, field):
    path = save(tmp_path / 'e.pt', edited(**change), step=3)
    with pytest.raises(SystemExit, match='e.pt') as e:
        checkpoints.load_model(path)
    assert field in str(e.value)
    with pytest.raises(SystemExit, match='unusable') as e:              # train.py's path: build_network alone
        checkpoints.build_network(edited(**change))
    assert field in str(e.value)


@pytest.mark.parametrize('step', [-5, 10 ** 12, 2.5])                  # H-resume-negstep, H-resume-bigstep
def test_an_impossible_step_is_refused(tmp_path, step):
    with pytest.raises(SystemExit, match=r'step is'):
        checkpoints.load_checkpoint(save(tmp_path / 's.pt', diffusion_config(), step=step))


def test_a_huge_network_is_refused_before_it_is_built(tmp_path):
    """H-sample-huge / H-eval-huge: model_channels 8192 (77 billion parameters) built for a minute before any check."""
    config = edited(**{'net.model_channels': 8192})
    torch.save({'config': config, 'model': {}, 'ema': {}}, tmp_path / 'h.pt')
    start = time.perf_counter()
    with pytest.raises(SystemExit, match=r'h.pt.*77.5 billion parameters .*over the bound'):
        checkpoints.load_model(str(tmp_path / 'h.pt'))
    assert time.perf_counter() - start < 10            # building it took minutes and hundreds of GB


def test_the_wrong_kind_of_checkpoint_says_what_it_is(tmp_path):
    """W-sample-ckpt-classifier (TypeError: forward() got 'y'), W-sample-ckpt-autoencoder ("unknown network")."""
    data = checkpoints.data_config('shapes', DATA)
    name, net = checkpoints.classifier_config(args(config=None), DATA)
    cls = save(tmp_path / 'cls.pt', checkpoints.make_config('classifier', 'classifier', name, net, data,
                                                           checkpoints.diffusion_config(args())))
    name, ae = checkpoints.autoencoder_config(args(), DATA)
    ae_path = str(tmp_path / 'ae.pt')
    torch.save({'config': checkpoints.make_config('autoencoder', 'autoencoder', name, ae, data), 'model': {},
                'ema': {}}, ae_path)
    with pytest.raises(SystemExit, match=r'cls.pt.* is a classifier checkpoint \(train_classifier.py\), not a diffusion model'):
        checkpoints.load_model(cls)
    with pytest.raises(SystemExit, match=r'ae.pt.* is an autoencoder checkpoint .*, not a diffusion model'):
        checkpoints.load_model(ae_path)
    with pytest.raises(SystemExit, match=r'is a diffusion model \(train.py\), not a classifier'):
        checkpoints.load_model(save(tmp_path / 'd.pt', diffusion_config()), expect='classifier')
    with pytest.raises(SystemExit, match=r'is a classifier checkpoint .*, not an autoencoder'):
        checkpoints.load_autoencoder(cls)
    net, _, config = checkpoints.load_model(cls, expect='classifier')   # the kind asked for loads
    assert config['task'] == 'classifier' and net.config == checkpoints.build_network(config).config
    sr = edited(task='superres')
    with pytest.raises(SystemExit, match='is a super-resolution stage .*not a diffusion model that samples from noise'):
        checkpoints.load_checkpoint(save(tmp_path / 'sr.pt', sr), expect='base')


def test_a_file_that_is_not_a_checkpoint_is_named_and_torch_advice_never_shown(tmp_path):
    """W-sample-ckpt-png: torch's 'retry with weights_only=False' reached the user; W-sample-ckpt-folder said
    'does not exist' of a folder; an .npz is not unpickled either."""
    Image.new('RGB', (4, 4)).save(tmp_path / 'img.png')
    np.savez(tmp_path / 'a.npz', x=np.zeros(3))
    (tmp_path / 'text.pt').write_bytes(b'not a checkpoint')
    for name, said in (('img.png', r'is not a checkpoint \(a PNG image\)'), ('a.npz', r'NumPy .npz'),
                       ('text.pt', 'cannot read')):
        with pytest.raises(SystemExit, match=said) as e:
            checkpoints.load_model(str(tmp_path / name))
        assert 'weights_only' not in str(e.value) and 'file an issue' not in str(e.value)
    with pytest.raises(SystemExit, match='is a folder'):
        checkpoints.load_model(str(tmp_path))
    with pytest.raises(SystemExit, match='does not exist'):
        checkpoints.load_model(str(tmp_path / 'missing.pt'))


def test_a_pickled_object_is_refused_without_the_weights_only_advice(tmp_path):
    torch.save({'config': argparse.Namespace(a=1), 'model': {}, 'ema': {}}, tmp_path / 'p.pt')
    with pytest.raises(SystemExit, match='could run code') as e:
        checkpoints.load_checkpoint(str(tmp_path / 'p.pt'))
    assert 'weights_only' not in str(e.value)


def test_the_meta_parameter_count_equals_the_built_networks():
    """The bound is checked on a 'meta' build whose initialisers are skipped (_ShapesOnly): its count must be the
    real one for every network a checkpoint can hold."""
    import vae
    from classifier import NoiseConditionalClassifier
    from dit import DiT
    from unet import UNet
    _, unet_net = checkpoints.network_config(args(), DATA, 6, 0)
    _, dit_net = checkpoints.network_config(args(model='dit', config='DiT-S/4'), DATA, 6, 0)
    _, cls_net = checkpoints.classifier_config(args(), DATA)
    _, ae_net = checkpoints.autoencoder_config(args(), DATA)
    for cls, net in ((UNet, unet_net), (DiT, dit_net), (NoiseConditionalClassifier, cls_net), (vae.Autoencoder, ae_net)):
        assert checkpoints.parameter_count(cls, net) == sum(p.numel() for p in cls(**net).parameters()), cls.__name__
