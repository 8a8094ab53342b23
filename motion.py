"""
A motion measure for videos of one moving object (moving shapes, moving digits) that needs no trained network.

FVD (i3d.py) needs a 51 MB Kinetics network and mixes appearance with motion; frame-wise scores are blind to motion.
On synthetic clips whose only change over time is an object moving on a flat background, motion can be measured
directly: track the object, then compare how generated objects move with how held-out data objects move.

1. Track. Per clip, the background colour b is the median of the border pixels of all frames (every video-shapes
   object stays >= 1 pixel inside the frame, so the border is pure background). A pixel's foreground mass is its
   colour distance from the background above a threshold tau (which keeps faint noise in generated clips from
   pulling the centroid to the frame centre):
       m(p) = max(||x(p) - b||_2 - tau, 0),        c_f = sum_p m(p) p / sum_p m(p)       (intensity centroid)
   in pixel coordinates (x, y), pixel centres at i + 0.5 as data.py draws them. A frame with no mass has no
   centroid: its clip counts as "lost".
2. Velocities. v_f = c_{f+1} - c_f (pixels per frame), F - 1 per clip, pooled over clips. Two sets of velocities are
   compared by Wasserstein-1 distances, in pixels per frame:
       speed_w1     W1 between the speeds |v| (1-D: the area between the two CDFs; Villani 2008, Remark 2.19)
       velocity_w1  W1 between the 2-D velocity vectors (speed and direction together), exact optimal transport
                    between equal-size samples: min over matchings sigma of mean_i ||v_i - v'_sigma(i)||
                    (an assignment problem, Kuhn-Munkres; scipy.optimize.linear_sum_assignment)
   Frozen clips have all speeds 0 (W1 = the data's mean speed); clips with shuffled frames jump back and forth
   (larger speeds). Both distances are 0 for identical sets and near 0 for two samples of the same clips' law.
3. Straight lines at constant speed. video-shapes objects move exactly so: c_f = a + u f. Fit a and u by least
   squares per clip; the residual r = sqrt(mean_f ||c_f - a - u f||^2) (pixels) is 0 up to rendering. A clip
   "moves in a straight line at constant speed" (straight_share) when r <= tolerance and its object moves:
   |u| (F - 1) > tolerance. The tolerance is 2% of the frame side (0.32 px at 16 px, 0.64 px at 32 px); the data's
   own residuals are below 0.08 px at 16 px, and 1-3% of its clips move less than the tolerance (start and end
   points are drawn independently), so the held-out share is 0.97-0.99, and a frozen clip scores 0. Moving MNIST
   digits bounce off the walls, and with two digits their joint centroid is tracked, so its held-out share is lower:
   compare a model's share with the data's, not with 1.

Conventions: videos (N, C, F, H, W), uint8 in [0, 255] or float in [0, 1] (data.py's [-1, 1] tensors: (x + 1) / 2).

Usage: report = motion_distance(generated, held_out)    # dict: speed_w1, velocity_w1, straight_share, ...
       python motion.py                                 # the demo: held-out halves vs frozen vs shuffled clips
"""
import numpy as np
import scipy.optimize
import scipy.stats
import torch

THRESHOLD = 0.1           # tau: colour distance (in [0, 1] units) below which a pixel is background
STRAIGHT_TOLERANCE = 0.02  # straight-line residual allowed, as a fraction of the frame side
MAX_MATCHED = 2000        # velocity_w1 matches at most this many velocities of each set (O(n^3) assignment)


def to_unit_float(videos):
    """uint8 [0, 255] -> float [0, 1]; floats are taken to be in [0, 1] already."""
    videos = torch.as_tensor(videos)
    return videos.float() / 255 if videos.dtype == torch.uint8 else videos.float()


# ----------------------------------------------------------------------------------------------------
# 1. Tracking: the intensity centroid of the pixels that differ from the background

def background_colour(videos):
    """(N, C): the median colour of each clip's border pixels over all frames (the flat background)."""
    v = to_unit_float(videos)
    if v.dim() != 5 or v.shape[-1] < 3 or v.shape[-2] < 3:
        raise ValueError(f'videos must be (N, C, F, H, W) with H, W >= 3, got shape {tuple(v.shape)}')
    border = torch.cat([v[..., 0, :], v[..., -1, :], v[..., 1:-1, 0], v[..., 1:-1, -1]], dim=-1)  # (N, C, F, 2H+2W-4)
    return border.flatten(2).median(dim=-1).values


def track_centroids(videos, threshold=THRESHOLD):
    """(N, F, 2) centroids (x, y) in pixels of each frame's foreground mass (NaN where a frame has none)."""
    v = to_unit_float(videos)
    b = background_colour(v)                                                   # (N, C)
    distance = (v - b[:, :, None, None, None]).norm(dim=1)                     # (N, F, H, W): colour distance
    mass = (distance - threshold).clamp(min=0)                                 # m(p) = max(||x - b|| - tau, 0)
    H, W = mass.shape[-2:]
    ys = torch.arange(H, dtype=mass.dtype) + 0.5                               # pixel centres, as data.py draws
    xs = torch.arange(W, dtype=mass.dtype) + 0.5
    total = mass.sum(dim=(-1, -2))                                             # (N, F)
    cx = (mass.sum(-2) * xs).sum(-1) / total                                   # column sums weighted by x
    cy = (mass.sum(-1) * ys).sum(-1) / total                                   # row sums weighted by y
    return torch.stack([cx, cy], dim=-1).double()                             # 0 / 0 = NaN where no mass


# ----------------------------------------------------------------------------------------------------
# 2. Velocities and their Wasserstein-1 distances

def velocities(centres):
    """(N, F, 2) centroids -> (M, 2) frame-to-frame velocities (pixels / frame) of the clips tracked in every frame."""
    centres = torch.as_tensor(centres, dtype=torch.float64)
    tracked = ~torch.isnan(centres).any(dim=(1, 2))
    return centres[tracked].diff(dim=1).reshape(-1, 2).numpy()


def speed_w1(v_a, v_b):
    """W1 between the speed distributions |v| of two velocity sets (pixels / frame): the area between the CDFs."""
    return float(scipy.stats.wasserstein_distance(np.linalg.norm(v_a, axis=1), np.linalg.norm(v_b, axis=1)))


def velocity_w1(v_a, v_b, max_matched=MAX_MATCHED, seed=0):
    """Exact W1 between two 2-D velocity samples of equal size n (the larger is subsampled to n = the smaller,
    at most max_matched): min over one-to-one matchings of the mean Euclidean distance between matched vectors.
    (For equal-size empirical measures an optimal plan is a permutation: Birkhoff-von Neumann; Villani 2008, Ch. 6.)"""
    rng = np.random.default_rng(seed)
    n = min(len(v_a), len(v_b), max_matched)
    a = v_a[rng.permutation(len(v_a))[:n]]
    b = v_b[rng.permutation(len(v_b))[:n]]
    cost = np.linalg.norm(a[:, None] - b[None], axis=-1)                       # (n, n) ground distances
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


# ----------------------------------------------------------------------------------------------------
# 3. Straight lines at constant speed

def fit_line(centres):
    """Least-squares c_f = a + u f per clip: (N,) RMS residuals (pixels; NaN: lost) and (N, 2) velocities u."""
    centres = torch.as_tensor(centres, dtype=torch.float64)                    # (N, F, 2)
    frames = centres.shape[1]
    t = torch.arange(frames, dtype=torch.float64)
    design = torch.stack([torch.ones_like(t), t], dim=1)                       # (F, 2): [1, f]
    projection = design @ torch.linalg.pinv(design)                            # (F, F) hat matrix of the fit
    fitted = torch.einsum('fg,ngk->nfk', projection, centres)                  # a + u f per coordinate
    residual = ((centres - fitted) ** 2).sum(-1).mean(-1).sqrt()
    return residual, fitted[:, -1] - fitted[:, 0]                             # u (F - 1): the fitted displacement


# ----------------------------------------------------------------------------------------------------
# The report: a generated set against held-out data

def motion_statistics(videos, threshold=THRESHOLD, tolerance=STRAIGHT_TOLERANCE):
    """Velocities, per-clip residuals and shares of one set of clips (N, C, F, H, W)."""
    videos = torch.as_tensor(videos)
    if videos.dim() != 5 or videos.shape[2] < 3:
        raise ValueError(f'the motion measure needs videos (N, C, F, H, W) of at least 3 frames, got '
                         f'{tuple(videos.shape)}')
    centres = track_centroids(videos, threshold)
    residual, displacement = fit_line(centres)                                 # displacement: u (F - 1)
    lost = torch.isnan(residual)
    tolerance_px = tolerance * videos.shape[-1]
    straight = (residual <= tolerance_px) & (displacement.norm(dim=-1) > tolerance_px)   # NaN (lost) is False
    v = velocities(centres)
    return dict(centres=centres, velocities=v, residual=residual, tolerance_px=tolerance_px,
                lost_share=float(lost.double().mean()),
                straight_share=float(straight.double().mean()),
                mean_speed=float(np.linalg.norm(v, axis=1).mean()) if len(v) else float('nan'))


def motion_distance(generated, reference, threshold=THRESHOLD, tolerance=STRAIGHT_TOLERANCE):
    """Motion of generated clips against held-out reference clips (both (N, C, F, H, W), same F and size).

    Returns speed_w1 and velocity_w1 (pixels / frame; 0 for the same law of motion), the share of clips moving in
    a straight line at constant speed (straight_share; the reference's as reference_straight_share), the share of
    clips with a frame where nothing was found (lost_share), and mean speeds. Distances are NaN when every
    generated clip was lost.
    """
    gen = motion_statistics(generated, threshold, tolerance)
    ref = motion_statistics(reference, threshold, tolerance)
    if torch.as_tensor(generated).shape[2:] != torch.as_tensor(reference).shape[2:]:
        raise ValueError(f'generated clips {tuple(torch.as_tensor(generated).shape)} and reference clips '
                         f'{tuple(torch.as_tensor(reference).shape)} must have the same frames and frame size')
    if len(ref['velocities']) == 0:
        raise ValueError('no object was found in every frame of any reference clip: is it the right data?')
    found = len(gen['velocities']) > 0
    return dict(speed_w1=speed_w1(gen['velocities'], ref['velocities']) if found else float('nan'),
                velocity_w1=velocity_w1(gen['velocities'], ref['velocities']) if found else float('nan'),
                straight_share=gen['straight_share'], reference_straight_share=ref['straight_share'],
                lost_share=gen['lost_share'], mean_speed=gen['mean_speed'], reference_mean_speed=ref['mean_speed'],
                tolerance_px=gen['tolerance_px'])


def frozen_clips(videos, frame=0):
    """Every frame replaced by one frame: the object does not move (a plant the measure must catch)."""
    videos = torch.as_tensor(videos)
    return videos[:, :, frame:frame + 1].expand_as(videos).clone()


def shuffled_clips(videos, seed=0):
    """Each clip's frames in a random order: the same frames (frame-wise scores unchanged), broken motion."""
    videos = torch.as_tensor(videos)
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(videos.shape[2], generator=g) for _ in range(len(videos))])  # (N, F)
    index = order[:, None, :, None, None].expand_as(videos)
    return videos.gather(2, index)


# ----------------------------------------------------------------------------------------------------
# Demo: procedural moving shapes (a circle drawn here, so the file runs alone), halves vs frozen vs shuffled

def moving_discs(n, frames=8, size=16, seed=0):
    """uint8 (n, 3, frames, size, size): a bright antialiased disc moving at constant velocity on a dark background."""
    g = np.random.default_rng(seed)
    r = g.uniform(0.2, 0.3, n) * size
    start = r[:, None] + 1 + g.uniform(0, 1, (n, 2)) * (size - 2 * (r[:, None] + 1))
    end = r[:, None] + 1 + g.uniform(0, 1, (n, 2)) * (size - 2 * (r[:, None] + 1))
    t = np.linspace(0, 1, frames)
    centres = start[:, None] + t[None, :, None] * (end - start)[:, None]          # (n, F, 2)
    grid = np.arange(size) + 0.5
    dx = grid[None, None, None, :] - centres[..., 0, None, None]
    dy = grid[None, None, :, None] - centres[..., 1, None, None]
    alpha = np.clip(0.5 - (np.hypot(dx, dy) - r[:, None, None, None]), 0, 1)     # (n, F, H, W) coverage
    fg, bg = g.uniform(0.6, 1, (n, 3)), g.uniform(0, 0.3, (n, 3))
    video = bg[:, :, None, None, None] + alpha[:, None] * (fg - bg)[:, :, None, None, None]
    return torch.from_numpy(np.rint(video * 255).astype(np.uint8))


if __name__ == '__main__':
    clips = moving_discs(240, seed=0)
    half_a, half_b = clips[:120], clips[120:]
    print(f'{"generated set":>26} {"speed_w1":>9} {"velocity_w1":>12} {"straight":>9} {"mean speed":>11}  (px/frame)')
    for name, fake in (('the other held-out half', half_b), ('frozen (frame 0 repeated)', frozen_clips(half_b)),
                       ('shuffled frames', shuffled_clips(half_b))):
        r = motion_distance(fake, half_a)
        print(f'{name:>26} {r["speed_w1"]:9.3f} {r["velocity_w1"]:12.3f} {r["straight_share"]:9.2f} '
              f'{r["mean_speed"]:11.3f}')
    print(f'reference: straight share {r["reference_straight_share"]:.2f} (tolerance {r["tolerance_px"]:.2f} px), '
          f'mean speed {r["reference_mean_speed"]:.3f} px/frame')
