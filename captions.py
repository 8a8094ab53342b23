"""
Captions for the datasets, made offline: a sentence per image from what was drawn, and a word tokenizer.

Text-to-image models learn p(x | caption). Real captions come from people (LAION alt-texts) or from a captioning
model (DALL-E 3's "recaptioning", Betker et al. 2023); here the shapes datasets know exactly what they drew, so
every caption is true by construction and a sample can be checked against its prompt:

  shapes         "a small red triangle top left"                  colour, size, shape, position (data.ShapesDataset)
  video-shapes   "a large cyan ring bottom moving up right"         position of the first frame, then the motion
  mnist          "the digit seven"                                  from the label
  other classes  "a sandal"                                         the class name (fashion-mnist, emoji, cifar10)
  folder:PATH    the text of NAME.txt beside each image NAME.png    (a folder without them is an error)

The words, read off the attributes data.py keeps per image (ds.params: centres, radii, fg, bg; ds.labels):
  colour    the nearest of COLOURS to the shape colour fg (data.SHAPE_PALETTE, same order, same RGB)
  size      'small' if the half-size r < 0.3 R else 'large'    (r is drawn uniform in [0.2 R, 0.4 R])
  position  x < 0.45 R 'left', x > 0.55 R 'right'; y < 0.45 R 'top', y > 0.55 R 'bottom'; neither: 'centre'
            (centres lie in [r + 1, R - r - 1]: a large shape has little room, so 'centre' is the commonest word)
  motion    'moving' + the nearest of 8 compass directions of (end - start), image y pointing down;
            'staying still' when the shape moves less than 0.1 R in the whole clip

The tokenizer is word level: lower-case words [a-z0-9]+, a fixed vocabulary (the specials, then every word the
generators above can say, then any new words of a folder's captions in sorted order), and every sequence starts
with <bos>, so an empty caption (classifier-free guidance's "no prompt") is the one token <bos>, never nothing.

Usage: texts = dataset_captions(ds); tok = Tokenizer.build(texts); ids, mask = tok.encode(texts)  # (N, L), (N, L)
"""
import os
import re

import numpy as np
import torch

# The names of data.SHAPE_PALETTE's colours, in its order (tests check the RGB values agree with data.py).
COLOURS = {'red': (1, 0.15, 0.15), 'green': (0.2, 0.9, 0.2), 'blue': (0.25, 0.4, 1), 'yellow': (1, 0.9, 0.1),
           'cyan': (0.1, 0.9, 0.9), 'magenta': (0.95, 0.2, 0.9), 'orange': (1, 0.55, 0.1), 'white': (0.95, 0.95, 0.95)}
SMALL_BELOW = 0.3                 # half-size / resolution under which a shape is 'small'
SIDE_THRESHOLDS = (0.45, 0.55)    # centre / resolution: below the first 'left'/'top', above the second 'right'/'bottom'
STILL_BELOW = 0.1                 # total displacement / resolution under which a moving shape is 'staying still'
DIGITS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
# Compass directions at angles k * 45 degrees, measured with x right and y *up* (the image's y points down).
DIRECTIONS = ('right', 'up right', 'up', 'up left', 'left', 'down left', 'down', 'down right')


# ----------------------------------------------------------------------------------------------------
# The words of one attribute each

def colour_name(rgb):
    """Nearest named colour (Euclidean in RGB) of each (N, 3) colour in [0, 1] -> list of names."""
    table = np.array(list(COLOURS.values()), np.float32)                      # (8, 3)
    rgb = np.asarray(rgb, np.float32).reshape(-1, 3)
    nearest = ((rgb[:, None] - table[None]) ** 2).sum(-1).argmin(1)           # (N,)
    return [list(COLOURS)[k] for k in nearest]


def size_word(radius, resolution):
    return 'small' if radius < SMALL_BELOW * resolution else 'large'


def position_words(x, y, resolution):
    """'top left', 'right', 'centre', ...: vertical word first, as people say it."""
    low, high = SIDE_THRESHOLDS[0] * resolution, SIDE_THRESHOLDS[1] * resolution
    vertical = 'top' if y < low else 'bottom' if y > high else ''
    horizontal = 'left' if x < low else 'right' if x > high else ''
    return ' '.join(w for w in (vertical, horizontal) if w) or 'centre'


def motion_words(displacement, resolution):
    """'moving up left' for a displacement (dx, dy) in pixels over the clip (image y down); 'staying still' if small."""
    dx, dy = float(displacement[0]), float(displacement[1])
    if np.hypot(dx, dy) < STILL_BELOW * resolution:
        return 'staying still'
    sector = int(np.round(np.arctan2(-dy, dx) / (np.pi / 4))) % 8             # -dy: up is positive
    return 'moving ' + DIRECTIONS[sector]


def article(word):
    return 'an' if word[0] in 'aeiou' else 'a'


# ----------------------------------------------------------------------------------------------------
# A caption for every item of a dataset

def shape_captions(labels, centres, radii, fg, resolution, class_names, velocity=None, frames=1):
    """Captions of procedural shapes from their attributes. centres (N, 2) (x, y) in pixels, or (N, F, 2) for videos
    (the first frame's position is said); radii (N,); fg (N, 3); velocity (N, 2) pixels per frame, for videos."""
    centres = np.asarray(centres)
    start = centres[:, 0] if centres.ndim == 3 else centres
    colours = colour_name(fg)
    out = []
    for i in range(len(labels)):
        words = [size_word(radii[i], resolution), colours[i], class_names[int(labels[i])],
                 position_words(start[i, 0], start[i, 1], resolution)]
        if velocity is not None:
            words.append(motion_words(np.asarray(velocity[i]) * max(frames - 1, 1), resolution))
        out.append(f'{article(words[0])} ' + ' '.join(words))
    return out


def class_captions(labels, class_names):
    """'the digit seven' for digit classes ('0'..'9'), else 'a sandal' from the class name."""
    out = []
    for y in labels:
        name = class_names[int(y)]
        if name.isdigit() and len(name) == 1:
            out.append(f'the digit {DIGITS[int(name)]}')
        else:
            name = ' '.join(words(name))
            out.append(f'{article(name)} {name}')
    return out


def folder_captions(paths):
    """The caption of each image: the text of the .txt file with the same name beside it (whitespace joined)."""
    out, missing = [], []
    for p in paths:
        txt = os.path.splitext(p)[0] + '.txt'
        if not os.path.isfile(txt):
            missing.append(txt)
            continue
        with open(txt, encoding='utf-8') as f:
            out.append(' '.join(f.read().split()))
    if missing:
        raise FileNotFoundError(f'{len(missing)} of {len(paths)} images have no caption file beside them '
                                f'(first: {missing[0]}); put the caption of NAME.png in NAME.txt')
    return out


def dataset_captions(dataset):
    """A caption per item of a data.py dataset, from what it exposes: shapes and video-shapes their drawn
    attributes (params), an image folder its .txt files (paths), a labelled dataset its class names."""
    params = getattr(dataset, 'params', None)
    labels = np.asarray(dataset.labels)
    if params is not None and 'radii' in params:
        return shape_captions(labels, params['centres'], params['radii'], params['fg'], dataset.resolution,
                              dataset.class_names, params.get('velocity'), getattr(dataset, 'frames', 1))
    if hasattr(dataset, 'paths'):
        return folder_captions(dataset.paths)
    if getattr(dataset, 'num_classes', 0):
        return class_captions(labels, dataset.class_names)
    raise ValueError(f'{type(dataset).__name__} has no captions: give a captioned source (shapes, video-shapes, '
                     'a labelled dataset, or folder:PATH with a NAME.txt beside each image)')


# ----------------------------------------------------------------------------------------------------
# The word tokenizer

SPECIALS = ('<pad>', '<bos>', '<unk>')
PAD, BOS, UNK = 0, 1, 2


def words(text):
    """Lower-case words [a-z0-9]+ of a text: 'A small, RED triangle' -> ['a', 'small', 'red', 'triangle']."""
    return re.findall(r'[a-z0-9]+', text.lower())


def base_vocabulary():
    """Every word the caption generators above can say, sorted, after the specials: the fixed vocabulary."""
    said = {'a', 'an', 'the', 'digit', 'moving', 'staying', 'still', 'centre', 'small', 'large'}
    said |= set(COLOURS) | set(DIGITS) | {w for d in DIRECTIONS for w in d.split()} | {'top', 'bottom'}
    said |= {'circle', 'square', 'triangle', 'diamond', 'ring', 'cross'}          # data.SHAPE_CLASSES
    return list(SPECIALS) + sorted(said)


class Tokenizer:
    """Words -> indices into a fixed vocabulary; <bos> first, <pad> after the end, <unk> for unknown words."""

    def __init__(self, vocab, max_len=16):      # vocab: list of words (SPECIALS first); max_len counts <bos>
        if list(vocab[:len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f'a vocabulary starts with {SPECIALS}')
        self.vocab, self.max_len = list(vocab), int(max_len)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts, max_len=None, limit=77):
        """The base vocabulary plus the new words of `texts` (sorted); max_len fits the longest (at most `limit`)."""
        vocab = base_vocabulary()
        known = set(vocab)
        vocab += sorted({w for t in texts for w in words(t)} - known)
        longest = max((len(words(t)) for t in texts), default=0)
        return cls(vocab, max_len or min(limit, longest + 1))

    def config(self):
        """What a checkpoint stores to rebuild this tokenizer: Tokenizer(**config)."""
        return {'vocab': list(self.vocab), 'max_len': self.max_len}

    def encode(self, texts):
        """(ids (N, max_len) long, mask (N, max_len) bool, True = a real token); long captions are cut."""
        ids = torch.full((len(texts), self.max_len), PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            seq = [BOS] + [self.index.get(w, UNK) for w in words(t)][:self.max_len - 1]
            ids[i, :len(seq)] = torch.tensor(seq)
        return ids, ids != PAD

    def decode(self, ids):
        """The words of each row (specials dropped): the inverse of encode for known words."""
        return [' '.join(self.vocab[i] for i in row.tolist() if i >= len(SPECIALS)) for row in ids]

    def unknown_words(self, text):
        return [w for w in words(text) if w not in self.index]


# ----------------------------------------------------------------------------------------------------

if __name__ == '__main__':
    # Captions of a few drawn shapes (attributes as data.ShapesDataset draws them) and their tokens.
    rng = np.random.default_rng(0)
    R, n = 32, 6
    radii = rng.uniform(0.2, 0.4, n) * R
    centres = radii[:, None] + 1 + rng.uniform(0, 1, (n, 2)) * (R - 2 * (radii[:, None] + 1))
    fg = np.array(list(COLOURS.values()))[rng.integers(0, len(COLOURS), n)]
    shapes = ('circle', 'square', 'triangle', 'diamond', 'ring', 'cross')
    texts = shape_captions(np.arange(n), centres, radii, fg, R, shapes)
    texts += shape_captions([2], [[[6, 6], [26, 7]]], [7.0], [COLOURS['red']], R, shapes, velocity=[[20, 1]], frames=2)
    texts += class_captions([7, 0], tuple('0123456789'))
    tok = Tokenizer.build(texts)
    ids, mask = tok.encode(texts + [''])
    print(f'vocabulary: {len(tok.vocab)} words, max_len {tok.max_len}')
    for t, row in zip(texts + ['(empty)'], ids):
        print(f'  {t!r:50s} -> {row.tolist()}')
    assert tok.decode(ids[:-1]) == texts, 'decode(encode(caption)) must give the caption back'
    print('decode(encode(captions)) == captions; the empty caption is <bos> alone:', mask[-1].sum().item() == 1)
