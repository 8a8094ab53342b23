"""
The sampling knobs as command-line flags, shared by sample.py and evaluate.py so that a score names exactly what
was sampled: the sigma schedule (Karras et al. 2022, arXiv:2206.00364, Eq. 5; log-linear; the model's own discrete
steps; the flow's shifted steps, Esser et al. 2024, Eq. 23), the sampler's own options (samplers.py), the guidance
weight and its schedule over the steps (guidance.py: constant, increasing as Muse, oscillating as Imagen Video,
an interval as Kynkaanniemi et al. 2024; a schedule fitted to the checkpoint by fit_schedule.py, read from its JSON
file and refused for another checkpoint or number of steps), thresholding (Imagen, Saharia et al. 2022, Sec. 2.3), autoguidance
(Karras et al. 2024, arXiv:2406.02507), classifier guidance (Dhariwal & Nichol 2021, arXiv:2105.05233, Alg. 1)
and rejection sampling.

    add_sampling_flags(parser); problems = check_sampling_flags(args)
    setup = sampling_setup(args, config, diffusion, device)   # sampler, steps, sigmas, options, guidance, guide
    describe_sampling(args, setup)                            # one line naming all of it

A solver's options are its own keyword arguments (samplers.py); the network's conditioning travels separately in
`cond`, so a misspelt option is an error naming it, never something handed to the network.
Imports samplers.py, guidance.py, checkpoints.py (the classifier and the autoguidance model, sha256 of a fitted file).
"""
import ast
import json
import math
import os

import torch

import samplers
from checkpoints import load_model
from guidance import (Autoguidance, ClassifierGuidance, IntervalSchedule, LinearSchedule, OscillatingSchedule,
                      Thresholded)


# ----------------------------------------------------------------------------------------------------
# Sampler options, checked against the solver's signature.

# Options are checked against the solver's signature (samplers.sampler_options), so a new solver's options
# are accepted as soon as it is registered in SAMPLERS.
def check_sampler_options(name, options=None):
    """Validate a sampler name and its options before any work: unknown names are ValueErrors that list the valid ones."""
    if name not in samplers.SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(samplers.SAMPLERS)}")
    known = samplers.sampler_options(name)
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        raise ValueError(f"sampler {name!r} has no option {', '.join(map(repr, unknown))}; its options: "
                         + (', '.join(f'{k}={v!r}' for k, v in known.items()) or 'none'))
    for key, value in (options or {}).items():
        # A number's option takes a number (--sampler-opt S_churn=x would be a TypeError deep in the solver).
        default = known[key]
        if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f'sampler {name!r} option {key} must be a number (got {value!r})')
        problem = option_range_problem(key, value)
        if problem:
            raise ValueError(f'sampler {name!r} option {key} {problem}')
    o = {**known, **(options or {})}
    if isinstance(o.get('S_tmin'), (int, float)) and isinstance(o.get('S_tmax'), (int, float)) and o['S_tmin'] > o['S_tmax']:
        raise ValueError(f"sampler {name!r}: S_tmin {o['S_tmin']} is above S_tmax {o['S_tmax']}, so churn never applies")
    return dict(options or {})


# The ranges the papers define: noise scales and churn are amounts (>= 0; eta = 0 is the ODE), the corrector's
# signal-to-noise ratio is positive (Song et al. 2021, Alg. 5), a step count is a whole number >= 0.
OPTION_RANGES = {'eta': 'nonneg', 'S_churn': 'nonneg', 'S_noise': 'nonneg', 's_noise': 'nonneg', 'S_tmin': 'nonneg',
                 'S_tmax': 'nonneg_inf', 'snr': 'positive', 'n_corrector': 'count'}


def option_range_problem(key, value):
    """What is wrong with a sampler option's value ('must be ...'), or None; options without a known range pass.
    Needs no sampler name, so the command lines check --sampler-opt before the checkpoint names the sampler."""
    kind = OPTION_RANGES.get(key)
    if kind is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f'must be a number (got {value!r})'
    if kind == 'count':
        return None if float(value).is_integer() and value >= 0 else f'must be a whole number >= 0 (got {value})'
    if kind == 'nonneg_inf':
        return None if value >= 0 else f'must be >= 0 (got {value})'     # S_tmax = inf: churn at every level
    if not math.isfinite(value) or value < 0 or (kind == 'positive' and value == 0):
        return f"must be a finite number {'> 0' if kind == 'positive' else '>= 0'} (got {value})"
    return None


# The command lines pass options as KEY=VALUE strings; Python literals give numbers, booleans and None.
def parse_sampler_options(items):
    """['eta=0.5', 'S_churn=40'] (the --sampler-opt flags) -> {'eta': 0.5, 'S_churn': 40}; values are Python literals."""
    # literal_eval, never eval: a value on the command line must not run code.
    options = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key.isidentifier():
            raise ValueError(f'--sampler-opt expects KEY=VALUE (e.g. eta=0.5), got {item!r}')
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value                                 # a plain word: keep it as a string
    return options


# ----------------------------------------------------------------------------------------------------
# Every sampling knob as a flag: the sigma schedule, the sampler's own options, the guidance weight's schedule,
# thresholding, autoguidance, classifier guidance and rejection sampling. sample.py and evaluate.py share these
# flags (add_sampling_flags) and this construction (sampling_setup), so a score names exactly what was sampled.

# The sigma schedules sample.py offers by name; make_sigmas maps each to samplers.py's function.
# The EDM2 ImageNet-512 guidance interval of Kynkaanniemi et al. 2024 as public ports use it (--guidance-interval).
GUIDANCE_INTERVAL = (0.28, 5.42)
SCHEDULES = ('karras', 'loglinear', 'vp-leading', 'vp-trailing', 'vp-linspace', 'vp-continuous', 'flow', 'fitted')
# Dedicated flags for the options the papers tune; each fills the sampler's own keyword (any other: --sampler-opt).
OPTION_FLAGS = {'eta': ('eta',), 's_churn': ('S_churn',), 's_tmin': ('S_tmin',), 's_tmax': ('S_tmax',),
                's_noise': ('S_noise', 's_noise'), 'snr': ('snr',), 'n_corrector': ('n_corrector',)}


def add_sampling_flags(p):
    """The sampler and guidance flag groups; defaults of None mean 'what the training run used for its grids'."""
    g = p.add_argument_group('sampler')
    g.add_argument('--sampler', default=None, choices=list(samplers.SAMPLERS), help="default: the training run's --sampler")
    g.add_argument('--steps', type=int, default=None, help="noise levels of the schedule; default: the run's --sample-steps")
    g.add_argument('--schedule', default='karras', choices=SCHEDULES,
                   help="sigma schedule (samplers.py): karras (Karras et al. Eq. 5), loglinear, the model's own "
                        "discrete steps vp-leading|vp-trailing|vp-linspace (DDPM/DDIM models; with --sampler ddpm and "
                        "--steps T this is exactly the trained Markov chain), vp-continuous, flow, fitted (--schedule-file of fit_schedule.py, fitted to this checkpoint)")
    g.add_argument('--schedule-file', default=None, metavar='JSON', help='fitted: the schedule fit_schedule.py wrote for '
                   'this checkpoint (its sigmas; default --sampler and --steps: those it was fitted for)')
    g.add_argument('--rho', type=float, default=None, help='karras: the schedule exponent rho (default 7)')
    g.add_argument('--sigma-max', type=float, default=None, help="start of karras/loglinear; default: the model's "
                   "sigma_max (a lower start is SDEdit/CCDF's shortcut: with --inverse ccdf the solve starts here)")
    g.add_argument('--sigma-min', type=float, default=None, help="end of karras/loglinear; default: the model's")
    g.add_argument('--flow-shift', type=float, default=None, help='flow: shift of the time steps (SD3 Eq. 23; default 1)')
    g.add_argument('--eta', type=float, default=None, help='ddim / euler_ancestral / dpmpp_2m_sde: noise scale (0 = ODE)')
    g.add_argument('--s-churn', type=float, default=None, help='heun: S_churn, stochasticity (Karras et al. Alg. 2)')
    g.add_argument('--s-tmin', type=float, default=None, help='heun: S_tmin, churn only for sigma >= this')
    g.add_argument('--s-tmax', type=float, default=None, help='heun: S_tmax, churn only for sigma <= this')
    g.add_argument('--s-noise', type=float, default=None, help='heun / euler_ancestral / dpmpp_2m_sde: noise inflation')
    g.add_argument('--snr', type=float, default=None, help='pc: signal-to-noise ratio of the Langevin corrector')
    g.add_argument('--n-corrector', type=int, default=None, help='pc: Langevin corrector steps per noise level')
    g.add_argument('--sampler-opt', action='append', default=[], metavar='KEY=VALUE',
                   help="any other option of the sampler, e.g. order=3 for unipc_bh2 (repeatable)")
    # Guidance methods compose as denoiser wrappers (sampling_setup), so each flag adds one wrapper.
    g = p.add_argument_group('guidance (guidance.py)')
    g.add_argument('--guidance', type=float, default=None, help="guidance weight w (1 = none): classifier-free, or "
                   "autoguidance's with --autoguidance; default: the run's")
    g.add_argument('--guidance-schedule', default='constant', choices=['constant', 'increasing', 'oscillating', 'interval'],
                   help='w over the steps: constant; increasing from --guidance-start to w (Muse); oscillating '
                        'between w and --guidance-low (Imagen Video); interval: w only inside --guidance-interval')
    g.add_argument('--guidance-start', type=float, default=None, help='increasing: the weight at the first step (default 1)')
    g.add_argument('--guidance-low', type=float, default=None, help='oscillating: the low weight (default 1)')
    g.add_argument('--guidance-num-high', type=int, default=None, help='oscillating: steps at w before oscillating (default 0)')
    g.add_argument('--guidance-interval', type=float, nargs=2, default=None, metavar=('SIGMA_LO', 'SIGMA_HI'),
                   help='interval: guide where SIGMA_LO < sigma <= SIGMA_HI (default 0.28 5.42: the EDM2 ImageNet-512 '
                        'interval of Kynkaanniemi et al. 2024 as public ports use it; tune per model)')
    g.add_argument('--threshold', default='none', choices=['none', 'static', 'dynamic'],
                   help='clip the x0 estimate (Imagen Sec. 2.3): static to [-1, 1], dynamic at a percentile')
    g.add_argument('--threshold-percentile', type=float, default=None, help='dynamic thresholding percentile (default: Imagen\'s 0.995)')
    g.add_argument('--autoguidance', default=None, metavar='BAD_CKPT', help='guide with this worse model instead of the '
                   "unconditional one (Karras et al. 2024), e.g. the early checkpoint of train.py --save-early")
    g.add_argument('--classifier', default=None, metavar='CKPT', help='noise-conditional classifier of train.py --task '
                   'classifier, for classifier guidance (--classifier-scale) and rejection (--reject)')
    g.add_argument('--classifier-scale', type=float, default=0.0, help='classifier guidance scale s (ADM Alg. 1; 0 = none)')
    g.add_argument('--reject', type=float, default=None, nargs='?', const=-1, metavar='TOP_FRACTION',
                   help='rejection sampling with --classifier: keep samples it assigns to the requested class '
                        '(or, given a fraction, the most confident fraction per class); prints the acceptance rate')


def check_sampling_flags(args):
    """Range checks of the sampling flags (no checkpoint needed): a list of problems, empty when all is well."""
    problems = []
    for flag in ('rho', 'sigma_max', 'sigma_min', 'flow_shift', 'guidance_start', 'guidance_low', 'classifier_scale'):
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):
            problems.append(f"--{flag.replace('_', '-')} must be a finite number (got {value})")
    # Noise levels and the Karras exponent are positive by definition; 0 would give log(0) or a division by 0.
    for flag in ('sigma_max', 'sigma_min', 'rho', 'flow_shift'):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            problems.append(f"--{flag.replace('_', '-')} must be positive (got {getattr(args, flag)})")
    if args.sigma_max is not None and args.sigma_min is not None and args.sigma_min >= args.sigma_max:
        problems.append(f'--sigma-min {args.sigma_min} must be below --sigma-max {args.sigma_max}')
    if args.threshold_percentile is not None and not 0 < args.threshold_percentile <= 1:
        problems.append(f'--threshold-percentile must be in (0, 1] (got {args.threshold_percentile})')
    lo, hi = args.guidance_interval or GUIDANCE_INTERVAL
    if not 0 <= lo < hi:
        problems.append(f'--guidance-interval needs 0 <= SIGMA_LO < SIGMA_HI (got {lo} {hi})')
    # The solver options' ranges (option_range_problem), named by their flags, before anything is loaded.
    for flag, names in OPTION_FLAGS.items():
        value = getattr(args, flag, None)
        problem = option_range_problem(names[0], value) if value is not None else None
        if problem:
            problems.append(f"--{flag.replace('_', '-')} {problem}")
    if args.s_tmin is not None and args.s_tmax is not None and args.s_tmin > args.s_tmax:
        problems.append(f'--s-tmin {args.s_tmin} is above --s-tmax {args.s_tmax}: churn would never apply')
    if args.guidance_num_high is not None and args.guidance_num_high < 0:
        problems.append(f'--guidance-num-high must be at least 0 (got {args.guidance_num_high})')
    # A flag of a mode that is not selected would be ignored without a word: refused, naming what it applies to.
    applies = [('rho', args.schedule == 'karras', '--schedule karras'),
               ('flow_shift', args.schedule == 'flow', '--schedule flow'),
               ('sigma_min', args.schedule in ('karras', 'loglinear'), '--schedule karras or loglinear'),
               ('sigma_max', args.schedule in ('karras', 'loglinear'), '--schedule karras or loglinear'),
               ('guidance_start', args.guidance_schedule == 'increasing', '--guidance-schedule increasing'),
               ('guidance_low', args.guidance_schedule == 'oscillating', '--guidance-schedule oscillating'),
               ('guidance_num_high', args.guidance_schedule == 'oscillating', '--guidance-schedule oscillating'),
               ('guidance_interval', args.guidance_schedule == 'interval', '--guidance-schedule interval'),
               ('threshold_percentile', args.threshold == 'dynamic', '--threshold dynamic'),
               ('schedule_file', args.schedule == 'fitted', '--schedule fitted')]
    for flag, used, mode in applies:
        if getattr(args, flag) is not None and not used:
            problems.append(f"--{flag.replace('_', '-')} applies to {mode}")
    # Flags that only make sense together are checked here, before any checkpoint is read.
    if (args.classifier_scale or args.reject is not None) and not args.classifier:
        problems.append('--classifier-scale and --reject need --classifier CKPT (train one with train.py --task classifier)')
    if args.reject is not None and args.reject != -1 and not 0 < args.reject <= 1:
        problems.append(f'--reject TOP_FRACTION must be in (0, 1] (got {args.reject})')
    for path, flag in ((args.autoguidance, '--autoguidance'), (args.classifier, '--classifier')):
        if path and not os.path.isfile(path):
            problems.append(f'{flag} {path!r} does not exist')
    if args.schedule == 'fitted':
        problems += fitted_schedule_problems(args)
    return problems


# ----------------------------------------------------------------------------------------------------
# A schedule fitted to one checkpoint (fit_schedule.py, schedule_search.fit_schedule): a small JSON file with the
# checkpoint's sha256, the solver, the steps and NFE it was fitted for, the sigma range and the sigmas. It is tied to
# the weights (their error is what was fitted) and to its number of noise levels, so both are checked before loading.

FITTED_KEYS = ('checkpoint_sha256', 'sampler', 'steps', 'nfe', 'sigma_min', 'sigma_max', 'sigmas')


def read_fitted_schedule(path):
    """The record fit_schedule.py wrote at `path` (a dict with FITTED_KEYS), or ValueError saying what is wrong."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'--schedule-file {path!r} is not a readable JSON file ({e})') from None
    missing = [k for k in FITTED_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise ValueError(f"--schedule-file {path!r} is not a fitted schedule of fit_schedule.py (no {', '.join(missing)})")
    s = record['sigmas']
    if (not isinstance(s, list) or len(s) != record['steps'] + 1 or s[-1] != 0 or not all(map(math.isfinite, s))
            or any(a <= b for a, b in zip(s, s[1:]))):
        raise ValueError(f"--schedule-file {path!r}: its sigmas must be {record['steps']} descending noise levels and a final 0")
    return record


def fitted_schedule_problems(args):
    """Why --schedule fitted cannot be used with these flags (an empty list when it can): a missing or broken file,
    no checkpoint, another checkpoint (sha256), another number of steps, a mode that does not sample an image batch."""
    import checkpoints
    if not args.schedule_file:
        return ['--schedule fitted needs --schedule-file JSON (written by fit_schedule.py --ckpt CKPT --out JSON)']
    try:
        record = read_fitted_schedule(args.schedule_file)
    except ValueError as e:
        return [str(e)]
    problems, name = [], f'--schedule-file {args.schedule_file}'
    modes = [m for m in ('inverse', 'extend', 'cascade') if getattr(args, m, None) not in (None, False, '')]
    if modes:
        problems.append(f'--schedule fitted applies to plain sampling, not --{modes[0]}')
    ckpt = getattr(args, 'ckpt', None) or getattr(args, 'generated', None)      # sample.py --ckpt / evaluate GENERATED
    if not ckpt or not os.path.isfile(ckpt):
        problems.append(f'{name} is fitted to a train.py checkpoint: give that checkpoint (--ckpt)')
    elif (sha := checkpoints.sha256_of(ckpt)) != record['checkpoint_sha256']:         # the whole file, hashed once
        problems.append(f"{name} was fitted to another checkpoint ({record.get('checkpoint', '?')}, sha256 "
                        f"{record['checkpoint_sha256'][:12]}), not {ckpt} (sha256 {sha[:12]}): "
                        f'fit one for it with python fit_schedule.py --ckpt {ckpt}')
    if args.steps is not None and args.steps != record['steps']:
        problems.append(f"{name} was fitted for {record['steps']} noise levels ({record['sampler']}, {record['nfe']} "
                        f'NFE), not --steps {args.steps}: drop --steps, or fit one with python fit_schedule.py '
                        f"--sampler {record['sampler']} --nfe N")
    return problems


def sampler_options_from_args(args, sampler):
    """--sampler-opt KEY=VALUE plus the dedicated flags, mapped to this sampler's own option names."""
    options = parse_sampler_options(args.sampler_opt)
    # A dedicated flag maps to whichever spelling this sampler uses (Heun's S_noise, the others' s_noise).
    known = samplers.sampler_options(sampler) if sampler in samplers.SAMPLERS else {}
    for flag, names in OPTION_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        name = next((n for n in names if n in known), names[0])   # S_noise for heun, s_noise for the others
        options[name] = value
    return check_sampler_options(sampler, options)


def make_sigmas(name, steps, diffusion, rho=7.0, sigma_min=None, sigma_max=None, flow_shift=1.0, fitted=None):
    """The descending noise levels (steps of them, then 0) of a named schedule for this model (None: the default);
    'fitted' takes them from `fitted`, a read_fitted_schedule record."""
    if name == 'fitted':
        if fitted is None or steps != fitted['steps']:
            raise ValueError('--schedule fitted needs --schedule-file, fitted for --steps '
                             + ('(none given)' if fitted is None else f"{fitted['steps']} (asked: {steps})"))
        return torch.tensor(fitted['sigmas'], dtype=torch.float32)
    rho, flow_shift = 7.0 if rho is None else rho, 1.0 if flow_shift is None else flow_shift
    # The model's own noise range unless overridden: sampling outside the trained range asks for what it never saw.
    lo, hi = sigma_min or diffusion.sigma_min, sigma_max or diffusion.sigma_max
    if name in ('karras', 'loglinear') and not lo < hi:     # one flag given past the model's other end
        raise ValueError(f"--sigma-min {lo:g} must be below the model's sigma_max {hi:g}" if sigma_max is None else
                         f"--sigma-max {hi:g} must be above the model's sigma_min {lo:g}" if sigma_min is None else
                         f'--sigma-min {lo:g} must be below --sigma-max {hi:g}')
    if name == 'karras':
        return samplers.karras_sigmas(steps, lo, hi, rho)
    if name == 'loglinear':
        return samplers.loglinear_sigmas(steps, lo, hi)
    if name.startswith('vp-') and name != 'vp-continuous':
        table = getattr(diffusion.schedule, 'sigmas', None)        # only discrete VP models have their own steps
        if table is None:
            raise ValueError(f"--schedule {name} uses the model's own discrete noise levels; this model's schedule "
                             f'({type(diffusion.schedule).__name__}) has none: use karras or loglinear')
        if steps > len(table):
            raise ValueError(f'--steps {steps} is more than the model\'s {len(table)} discrete noise levels')
        return samplers.vp_sigmas(table, steps, name[3:])
    if name == 'vp-continuous':
        return samplers.vp_continuous_sigmas(steps)
    if name == 'flow':
        return samplers.flow_sigmas(steps, shift=flow_shift)
    raise ValueError(f"unknown --schedule {name!r}; choose from {', '.join(SCHEDULES)}")


def guidance_weight(args, w, sigmas):
    """The guidance weight as guidance.py takes it: a number, or a schedule over the sampler's sigmas."""
    # w = 1 is no guidance at any step, whatever the schedule: keep it a plain number (the cheap path in CFG).
    if args.guidance_schedule == 'constant' or w == 1:
        return w
    if args.guidance_schedule == 'increasing':
        return LinearSchedule(sigmas, w_end=w, w_start=1.0 if args.guidance_start is None else args.guidance_start)
    if args.guidance_schedule == 'oscillating':
        return OscillatingSchedule(sigmas, w_high=w, w_low=1.0 if args.guidance_low is None else args.guidance_low,
                                   num_high=args.guidance_num_high or 0)
    return IntervalSchedule(w, *(args.guidance_interval or GUIDANCE_INTERVAL))


# Autoguidance's bad model answers the same question as the good one (Karras et al. 2024, Sec. 3): a denoiser of
# the same kind of data (size, channels, frames, the same latent space) with the same classes. Checked from the
# stored config before its weights are built, naming both files.
def check_guiding_model(path, config, model_path):
    """SystemExit unless the checkpoint at `path` can serve as autoguidance's bad model for the model `config`."""
    import checkpoints
    bad = checkpoints.load_checkpoint(path)['config']
    task = bad.get('task', 'diffusion') if isinstance(bad, dict) else None

    def kind(c):
        d, ae = c.get('data', {}), c.get('autoencoder') or {}
        return {'data': f"{d.get('channels')}x{d.get('resolution')}px" + (f", {d['frames']} frames" if d.get('frames') else ''),
                'space': f"latents {ae.get('latent_shape')} of autoencoder {str(ae.get('sha256'))[:12]}" if ae else 'pixels',
                'classes': d.get('num_classes'), 'dataset': d.get('dataset')}
    if task != 'diffusion':
        why = {'superres': 'a super-resolution stage (it needs a low-res image)', 'classifier': 'a classifier',
               'autoencoder': 'an autoencoder'}.get(task, f'a {task!r} checkpoint')
        raise SystemExit(f'error: --autoguidance {path} is {why}, not a diffusion model like {model_path}')
    mine, theirs = kind(config), kind(bad)
    diff = [f'{k}: {model_path} has {mine[k]}, {path} has {theirs[k]}' for k in mine if mine[k] != theirs[k]]
    if diff:
        raise SystemExit(f'error: --autoguidance {path} is not a model of the same data as {model_path}:\n       '
                         + '\n       '.join(diff))


# Classifier guidance differentiates log p(y | x_t) at the sampler's x_t (ADM Alg. 1): the classifier must read that x_t.
def check_classifier(config, path, model_config):
    """SystemExit unless the classifier (config, at path) reads the images the model (model_config) samples."""
    if model_config.get('autoencoder'):
        raise SystemExit(f'error: --classifier {path} reads pixels; this model samples latents of an autoencoder, '
                         'which a pixel classifier cannot read')
    d, m = config['data'], model_config['data']
    if (d['channels'], d['resolution'], d.get('frames') or 0) != (m['channels'], m['resolution'], m.get('frames') or 0):
        raise SystemExit(f"error: --classifier {path} reads {d['channels']}x{d['resolution']}px images, the model "
                         f"samples {m['channels']}x{m['resolution']}px" + (f", {m['frames']} frames" if m.get('frames') else ''))


# A classifier is a train.py checkpoint like any other; its task field says what it is.
def load_classifier(path, device, model_config=None):
    """(log p(y | x, sigma), log p(y | x) of clean samples, num_classes) from a train.py --task classifier checkpoint;
    with model_config, checked to read the sampled model's images (pixels of its size and channels)."""
    import classifier as clf_lib
    net, diffusion, config = load_model(path, device, expect='classifier')
    if config.get('task') != 'classifier':
        raise SystemExit(f"error: {path!r} is not a classifier checkpoint (its task is {config.get('task', 'diffusion')!r}); "
                         'train one with train.py --task classifier')
    if model_config is not None:
        check_classifier(config, path, model_config)
    return (clf_lib.classifier_log_prob(net, diffusion), clf_lib.clean_log_prob(net, diffusion),
            config['net']['num_classes'])


def sampling_setup(args, config, diffusion, device, trained=None):
    """Everything generate() needs from the flags: a dict of sampler, steps, sigmas, sampler_options, guidance,
    guide (autoguidance, classifier guidance, thresholding, in that order around CFG) and, for --reject, the
    clean classifier. Models are loaded here, after the flag checks, so a typo costs no loading time."""
    # Defaults come from the training run's own grid settings, so a bare `sample.py --ckpt` reproduces its grids.
    trained = trained if trained is not None else config.get('args', {})
    # A fitted schedule's own solver and number of levels are the defaults (check_sampling_flags checked the file).
    fitted = read_fitted_schedule(args.schedule_file) if args.schedule == 'fitted' else None
    if fitted:
        trained = dict(trained, sampler=fitted['sampler'], sample_steps=fitted['steps'])
    sampler = args.sampler or trained.get('sampler', 'heun')
    steps = args.steps or trained.get('sample_steps', 18)
    w = args.guidance if args.guidance is not None else trained.get('guidance', 1.0)
    # Classifier-free guidance contrasts the class with "no class": an unconditional model has nothing to contrast.
    if not config['data']['num_classes'] and not args.autoguidance:
        if args.guidance not in (None, 1.0):
            raise ValueError(f'--guidance {args.guidance:g} is classifier-free guidance, which needs a class-conditional '
                             'model; this one has no classes (--autoguidance BAD_CKPT guides an unconditional model)')
        w = 1.0
    options = sampler_options_from_args(args, sampler)
    sigmas = make_sigmas(args.schedule, steps, diffusion, args.rho, args.sigma_min, args.sigma_max, args.flow_shift,
                         fitted)
    weight = guidance_weight(args, w, sigmas)
    wrappers, cfg = [], weight
    if args.autoguidance:
        # Autoguidance replaces CFG's unconditional branch by the bad model, with the same condition (Karras 2024).
        check_guiding_model(args.autoguidance, config, getattr(args, 'ckpt', None) or 'the sampled model')
        bad_net, bad_diffusion, _ = load_model(args.autoguidance, device)
        bad = bad_diffusion.denoiser(bad_net)
        wrappers.append(lambda d: Autoguidance(d, bad, w=weight))
        cfg = 1.0
    log_prob = clean_log_prob = None
    if args.classifier:
        log_prob, clean_log_prob, num_classes = load_classifier(args.classifier, device, config)
        if config['data']['num_classes'] and num_classes != config['data']['num_classes']:
            raise SystemExit(f"error: the classifier has {num_classes} classes, the model {config['data']['num_classes']}")
        if args.classifier_scale:
            conditional = bool(config['data']['num_classes'])   # guide the conditional model, else the unconditional
            wrappers.append(lambda d: ClassifierGuidance(d, log_prob, scale=args.classifier_scale, pass_y=conditional))
    # Thresholding is the outermost wrapper: it clips the final x0 estimate after every guidance term is added.
    if args.threshold != 'none':
        wrappers.append(lambda d: Thresholded(d, args.threshold, args.threshold_percentile or 0.995))

    # generate() applies this after classifier-free guidance: the wrappers in the order they were listed.
    def guide(denoiser):
        for wrap in wrappers:
            denoiser = wrap(denoiser)
        return denoiser
    return dict(sampler=sampler, steps=steps, sigmas=sigmas, sampler_options=options, guidance=cfg,
                guide=guide if wrappers else None, clean_log_prob=clean_log_prob, weight=w,
                classifier_classes=None if not args.classifier else num_classes)


def describe_sampling(args, setup):
    """One line naming what was sampled, printed with the samples and stored with evaluate.py's scores."""
    # The same words in the console and in evaluate.py's results: a score always names how it was sampled.
    schedule = f'fitted: {args.schedule_file}' if args.schedule == 'fitted' else args.schedule
    parts = [setup['sampler'], f"{setup['steps']} steps ({schedule})"]
    parts += [f'{k}={v}' for k, v in setup['sampler_options'].items()]
    if args.autoguidance:
        parts.append(f"autoguidance w={setup['weight']:g} ({args.guidance_schedule})")
    elif setup['weight'] != 1:
        parts.append(f"CFG w={setup['weight']:g} ({args.guidance_schedule})")
    if args.classifier_scale:
        parts.append(f'classifier guidance s={args.classifier_scale:g}')
    if args.threshold != 'none':
        parts.append(f'{args.threshold} thresholding')
    return ', '.join(parts)
