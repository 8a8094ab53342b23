"""captions.py: every caption agrees with its image. The attributes are read back from the pixels alone (the
background is the corner pixel, the shape colour the pixel farthest from it, the coverage by projecting onto
that colour; the half-size from the covered area, the centre from its mean, the shape as the candidate whose
re-rendering fits best, the motion from the first and last frames; see read_back), captioned with the same words, and compared with the generated caption."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import captions
import data

AREA_PER_R2 = {k: data.shape_area(k, 1.0) for k in data.SHAPE_CLASSES}


def read_back(images):
    """Attributes of uint8 (N, 3, R, R) shapes images from their pixels alone: (shape names, centres (N, 2) as
    (x, y), half-sizes r (N,), shape colours (N, 3)).

    The background is the corner pixel (shapes stay 1 px inside), the shape colour the pixel farthest from it (a
    fully covered pixel), the coverage alpha the projection of each pixel onto (colour - background). Its sum is the
    exact area (data.render_shapes), so for each candidate shape r = sqrt(area / (area per r^2)); the centre is the
    alpha-weighted mean (every shape is mirror-symmetric about its centre, except the triangle vertically: its
    centroid lies sqrt(3) r / 6 below the centre of its box). The candidate whose re-rendering is closest wins."""
    img = images.numpy().astype(np.float64) / 255
    N, _, R, _ = img.shape
    bg = img[:, :, 0, 0]                                                     # (N, 3)
    diff = img - bg[:, :, None, None]
    far = np.linalg.norm(diff, axis=1).reshape(N, -1).argmax(1)
    fg = img.reshape(N, 3, -1)[np.arange(N), :, far]                          # (N, 3)
    alpha = np.einsum('nchw,nc->nhw', diff, fg - bg) / ((fg - bg) ** 2).sum(1)[:, None, None]
    coords = np.arange(R) + 0.5
    area = alpha.sum((1, 2))
    mean_x = (alpha.sum(1) * coords).sum(1) / area
    mean_y = (alpha.sum(2) * coords).sum(1) / area
    fits = []
    for k, kind in enumerate(data.SHAPE_CLASSES):
        r = np.sqrt(area / AREA_PER_R2[kind])
        centres = np.stack([mean_x, mean_y - (np.sqrt(3) * r / 6 if kind == 'triangle' else 0)], 1)
        redrawn = data.render_shapes(np.full(N, k), centres.astype(np.float32), r.astype(np.float32),
                                     fg.astype(np.float32), bg.astype(np.float32), R)
        fits.append((np.abs(redrawn.astype(np.float64) / 255 - img).reshape(N, -1).sum(1), centres, r))
    best = np.argmin([f[0] for f in fits], axis=0)                            # (N,)
    centres = np.stack([fits[b][1][i] for i, b in enumerate(best)])
    r = np.array([fits[b][2][i] for i, b in enumerate(best)])
    return [data.SHAPE_CLASSES[b] for b in best], centres, r, fg


def captions_from_pixels(images, resolution, last_frames=None):
    """The caption of each image made from read_back's attributes with captions.py's words (and the motion from the
    centres in last_frames, for videos)."""
    shapes, centres, r, fg = read_back(images)
    colours = captions.colour_name(fg)
    ends = read_back(last_frames)[1] if last_frames is not None else None
    out = []
    for i in range(len(images)):
        words = [captions.size_word(r[i], resolution), colours[i], shapes[i],
                 captions.position_words(*centres[i], resolution)]
        if ends is not None:
            words.append(captions.motion_words(ends[i] - centres[i], resolution))
        out.append(f'{captions.article(words[0])} ' + ' '.join(words))
    return out


def agreement(generated, read):
    """Share of captions whose each word slot agrees: {'size': .., 'colour': .., 'shape': .., 'rest': ..}."""
    slots = {'size': 1, 'colour': 2, 'shape': 3}
    out = {k: np.mean([g.split()[i] == r.split()[i] for g, r in zip(generated, read)]) for k, i in slots.items()}
    out['position and motion'] = np.mean([g.split()[4:] == r.split()[4:] for g, r in zip(generated, read)])
    return out


def test_shape_captions_agree_with_the_pixels():
    ds = data.ShapesDataset(400, resolution=32, seed=3)
    generated = captions.dataset_captions(ds)
    read = captions_from_pixels(ds.images, 32)
    score = agreement(generated, read)
    # Disagreements are only float rounding at a threshold: at most a few in a thousand here.
    assert all(v >= 0.98 for v in score.values()), score
    # Every word class is used (a caption generator stuck on one word would agree trivially with itself).
    assert {c.split()[1] for c in generated} == {'small', 'large'}
    assert {c.split()[3] for c in generated} == set(data.SHAPE_CLASSES)
    assert len({' '.join(c.split()[4:]) for c in generated}) == 9
    # The fixed vocabulary holds every word the generators say (no caption becomes <unk>).
    tok = captions.Tokenizer(captions.base_vocabulary())
    assert not [w for c in generated + captions.class_captions(range(10), tuple('0123456789')) for w in tok.unknown_words(c)]


def test_video_captions_say_the_motion_the_frames_show():
    ds = data.VideoShapesDataset(120, frames=6, resolution=32, seed=1)
    generated = captions.dataset_captions(ds)
    read = captions_from_pixels(ds.images[:, :, 0], 32, ds.images[:, :, -1])
    score = agreement(generated, read)
    assert all(v >= 0.98 for v in score.values()), score
    assert len({c.split('moving')[-1] for c in generated if 'moving' in c}) >= 6   # most directions occur


def test_palette_names_match_data_py():
    assert np.allclose(np.array(list(captions.COLOURS.values())), data.SHAPE_PALETTE, atol=1e-6)
    assert captions.colour_name(data.SHAPE_PALETTE) == list(captions.COLOURS)


def test_motion_and_position_words():
    assert captions.motion_words((10, 0), 32) == 'moving right'
    assert captions.motion_words((0, -10), 32) == 'moving up'          # image y points down
    assert captions.motion_words((-7, 7), 32) == 'moving down left'
    assert captions.motion_words((1, 1), 32) == 'staying still'
    assert captions.position_words(5, 5, 32) == 'top left'
    assert captions.position_words(16, 30, 32) == 'bottom'
    assert captions.position_words(16, 16, 32) == 'centre'


def test_class_captions_mnist_and_others():
    assert captions.class_captions([7, 0], tuple('0123456789')) == ['the digit seven', 'the digit zero']
    assert captions.class_captions([0, 1], ('Ankle boot', 'T-shirt/top')) == ['an ankle boot', 'a t shirt top']
    unlabelled = data.InMemoryDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match='no captions'):
        captions.dataset_captions(unlabelled)


def test_folder_captions_read_the_text_beside_each_image(tmp_path):
    for i, text in enumerate(['a red fox\n', '  two  cats ']):
        Image.new('RGB', (8, 8), (i * 100, 0, 0)).save(tmp_path / f'{i}.png')
        (tmp_path / f'{i}.txt').write_text(text)
    ds = data.load_dataset(f'folder:{tmp_path}', resolution=8)
    assert captions.dataset_captions(ds) == ['a red fox', 'two cats']
    os.remove(tmp_path / '1.txt')
    with pytest.raises(FileNotFoundError, match=r'1 of 2 images have no caption file.*1\.txt'):
        captions.dataset_captions(data.load_dataset(f'folder:{tmp_path}', resolution=8))


def test_tokenizer_round_trip_unknown_words_and_empty_caption():
    texts = ['a small red triangle top left moving right', 'the digit seven', 'a purple fox']
    tok = captions.Tokenizer.build(texts[:2])
    ids, mask = tok.encode(texts + [''])
    assert tok.decode(ids[:2]) == texts[:2]
    assert (ids[:, 0] == captions.BOS).all() and mask.sum(1).tolist() == [9, 4, 4, 1]
    assert tok.decode(ids[2:3]) == ['a'] and (ids[2, 2:4] == captions.UNK).all()     # 'purple', 'fox' unknown
    assert tok.unknown_words('a purple fox') == ['purple', 'fox']
    # A folder's own words join the fixed vocabulary after it, so shapes captions keep their indices.
    bigger = captions.Tokenizer.build(texts)
    assert bigger.vocab[:len(tok.vocab)] == tok.vocab and 'fox' in bigger.vocab
    assert torch.equal(captions.Tokenizer(**tok.config()).encode(texts)[0], tok.encode(texts)[0])
    short = captions.Tokenizer(tok.vocab, max_len=3)
    assert short.decode(short.encode(texts[:1])[0]) == ['a small']                  # cut to max_len tokens
