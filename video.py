"""
The algorithms of the video diffusion paper: Ho, Salimans, Gritsenko, Chan, Norouzi, Fleet 2022, "Video Diffusion
Models", arXiv:2204.03458. The network side (factorised space-time U-Net, temporal attention with its frame mask)
is unet.py's; this file holds the two things the paper does around the network.

1. Joint video-image training (Sec. 3): "concatenate random independent image frames to the end of each video ...
   and mask the attention in the temporal attention blocks", so one network learns videos and images at once.
   With a share s of each sample's frames being images, an F-frame video gets k = round(s F / (1 - s)) images
   (joint_image_count); the images are single frames of other training clips (of the video's class when the model
   is class-conditional, since the label conditions the whole sample: image_sources), appended along the frame axis
   (joint_video_image_batch). The network is told num_video_frames = F, and unet.py's temporal attention lets each
   appended frame attend only to itself.

2. Extension by reconstruction guidance (Sec. 3.1): a longer video is sampled window by window; each window's first
   frames are the last frames so far, imposed as an inverse problem in time with the reconstruction-guided x0
       x0_tilde = x0_hat - (w_r / 2) grad_x ||x_a - x0_hat_a||^2                   (Ho et al. 2022, Eq. 7)
   (extend_video; the guidance itself is inverse.py's reconstruction_guidance, with any sampler).

Tensors: videos (N, C, F, H, W) in [-1, 1], images (N, C, H, W). Imports inverse.py (extension) only.

    x, y, F = joint_video_image_batch(clips, labels, k, generator)       # then net(x, ..., num_video_frames=F)
"""
import torch

import inverse


# ----------------------------------------------------------------------------------------------------
# Joint video-image training (Sec. 3).

def joint_image_count(image_share, frames):
    """Images appended to each F-frame video so they are a share s of its frames: round(s F / (1 - s))."""
    return round(image_share * frames / (1 - image_share)) if image_share and frames else 0


def image_sources(labels, train_index, videos, k, generator, conditional=True):
    """Indices of k random training clips per video (of the video's class when conditional): the clips whose frames
    become its appended images. labels: (N,) class of every item of the dataset (None: unconditional)."""
    if not conditional or labels is None:
        return train_index[torch.randint(len(train_index), (len(videos) * k,), generator=generator)]
    labels_train = labels[train_index]
    order = torch.argsort(labels_train, stable=True)                 # training items grouped by class
    counts = torch.bincount(labels_train, minlength=int(labels.max()) + 1)
    first = torch.cumsum(counts, 0) - counts                          # where each class starts in `order`
    c = labels[videos].repeat_interleave(k)                           # (B*k,) the class of each image's video
    r = (torch.rand(len(c), generator=generator) * counts[c]).long()  # uniform within that class
    return train_index[order[first[c] + r]]


def joint_video_image_batch(x0, y, k, generator):
    """B*(1+k) loaded clips -> (B videos with k independent images appended along the frame axis, their labels,
    num_video_frames F): frames [0, F) of each sample are its video, frames [F, F+k) one random frame each of its k
    source clips. With num_video_frames = F the U-Net's temporal attention keeps every image to itself."""
    B = len(x0) // (1 + k)
    videos, sources = x0[:B], x0[B:]                                  # (B, C, F, H, W), (B*k, C, F, H, W)
    frames = videos.shape[2]
    pick = torch.randint(frames, (B * k,), generator=generator)       # one random frame per source clip
    images = sources[torch.arange(B * k), :, pick]                    # (B*k, C, H, W)
    images = images.reshape(B, k, *images.shape[1:]).transpose(1, 2)  # (B, C, k, H, W)
    return torch.cat([videos, images], dim=2), y[:B], frames


# ----------------------------------------------------------------------------------------------------
# Extension by reconstruction guidance (Sec. 3.1): sample a window whose first frames are given, as an inverse
# problem in time (inverse.py), append its new frames, slide the window, repeat.

def extend_video(denoiser, clip, window, num_new, sigmas, context=None, method='reconstruction_guidance',
                 method_options=None, generator=None, cond=None):
    """Continue clips (N, C, G, H, W) by num_new frames -> (N, C, G + num_new, H, W), the given frames first, as given.

    Each round samples one window of `window` frames (the model's length) whose first `context` frames are the last
    frames so far: A keeps those frames (inverse.Inpaint with a mask over time), y holds them, and the inverse method
    (default: reconstruction guidance, x0_tilde = x0_hat - (w_r / 2) grad ||y - A x0_hat||^2, Ho et al. Eq. 7, with
    any sampler) draws the window's other frames conditioned on them. The model's own version of the given frames
    is only the means of conditioning: the output keeps the given frames themselves."""
    N, C, G, H, W = clip.shape
    context = context or window // 2
    if not 0 < context < window or context > G:
        raise ValueError(f'context must be in [1, {window - 1}] (the window has {window} frames) and at most the '
                         f'{G} given frames, got {context}')
    out = clip
    while out.shape[2] < G + num_new:
        mask = torch.zeros(1, 1, window, 1, 1, dtype=clip.dtype, device=clip.device)
        mask[:, :, :context] = 1                                             # A keeps the first `context` frames
        y = torch.zeros(N, C, window, H, W, dtype=clip.dtype, device=clip.device)
        y[:, :, :context] = out[:, :, -context:]                             # ... which are the last frames so far
        x = sigmas[0] * torch.randn(y.shape, generator=generator, dtype=clip.dtype).to(clip.device)
        sampled = inverse.INVERSE_METHODS[method](denoiser, x, sigmas, inverse.Inpaint(mask), y, generator=generator,
                                                  cond=cond, **(method_options or {}))
        need = min(window - context, G + num_new - out.shape[2])
        out = torch.cat([out, sampled[:, :, context:context + need].detach()], dim=2)
    return out


# ----------------------------------------------------------------------------------------------------

if __name__ == '__main__':
    # Two 4-frame "videos" whose pixels are their index, sources with distinct values: the appended frames come
    # from the sources, the videos are untouched, and num_video_frames tells the network where the videos end.
    g = torch.Generator().manual_seed(0)
    k = joint_image_count(0.5, 4)
    clips = torch.arange(2 * (1 + k)).float().view(-1, 1, 1, 1, 1).expand(-1, 1, 4, 2, 2)
    x, y, F = joint_video_image_batch(clips, torch.arange(len(clips)), k, g)
    print(f'share 0.5 of 4-frame videos: k = {k} images each; batch {tuple(x.shape)}, num_video_frames {F}')
    print('frame values of sample 0:', x[0, 0, :, 0, 0].tolist(), '(frames 4.. come from clips 2..5)')
    # Extension with the exact denoiser of pixels ~ N(0.3, 0.1^2): mu + s^2 / (s^2 + sigma^2) (x - mu). The given
    # frames (zeros) stay as given; the new frames come out near 0.3.
    import samplers
    sigmas = samplers.karras_sigmas(10, 0.01, 10.0)
    denoiser = lambda x, sigma, **cond: 0.3 + 0.01 / (0.01 + sigma.view(-1, 1, 1, 1, 1) ** 2) * (x - 0.3)
    out = extend_video(denoiser, torch.zeros(1, 1, 2, 2, 2), 4, 3, sigmas, context=2,
                       method_options=dict(w_r=2.0, sampler='euler'), generator=g)
    print('extended clip frame means:', [round(v, 3) for v in out.mean((0, 1, 3, 4)).tolist()])
