"""
How far is each solver from the exact answer on a TRAINED network, on Karras's schedule and on a fitted one?

Every deterministic solver integrates the same probability-flow ODE of the model (Karras et al. 2022, arXiv:2206.00364,
Eq. 3), so its error is measurable without any sample metric: start every solver from the same held-out noises,
compare its output with a converged reference solution from the same noises (schedule_search.reference_solutions:
DEIS tAB3 on 512 and Heun on 256 Karras levels; their RMS distance is the floor), and report the RMS distance at
5/10/20/35 NFE on 64 held-out noises. The schedule fitted by schedule_search.fit_schedule (for eps_abm at each NFE,
on 32 OTHER noise draws: seed 0 for the fit, seed 1 for the measurement) is then given to every solver that uses one
evaluation per level, so the gain of the schedule and of the solver are seen apart; further --fit-sampler solvers
are also fitted for themselves. A class-conditional model is measured on its classes
cycled (as sample.py's grid), with the guidance weights asked for (each weight is its own ODE, fitted separately).

    python benchmarks/ode_error.py --ckpt runs/mnist/ckpt.pt --guidance 1 2 --ref-cache runs --json runs/ode_mnist.json
    python benchmarks/ode_error.py --plot runs/ode_*.json --out docs/fitted_ode_error.png
    python benchmarks/ode_error.py --grids runs/ode_mnist.json runs/ode_default.json --out docs/fitted_grids.png
    python benchmarks/ode_error.py --sample-metric runs/ode_mnist.json --json runs/metric_mnist.json
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import samplers                                                     # noqa: E402
from checkpoints import latent_decoder, sample_shape               # noqa: E402
from fit_schedule import model_ode                                 # noqa: E402
from schedule_search import draw_noise, fit_schedule, reference_solutions   # noqa: E402

PUBLISHED = ('euler', 'heun', 'dpmpp_2m', 'dpmpp_3m', 'deis_tab', 'unipc_bh2', 'ipndm')
OURS = ('eps_abm', 'dpmpp_3m_corrected')


def rms(a, b):
    return ((a - b) ** 2).mean().sqrt().item()


def fit_budget(n, evals=1600):
    """Sampler runs for a fit of n levels: about `evals` denoiser calls on the paths (a few CPU minutes here)."""
    return max(20, min(320, evals // n))


def cached_reference(denoiser, x, lo, hi, cond, steps, path):
    """reference_solutions for the noises x, read from `path` when it holds the same noises (and written there)."""
    if path and os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        if saved['x'].shape == x.shape and torch.equal(saved['x'], x) and saved['steps'] == steps:
            return saved['target'], saved['floor'], saved['cpu_seconds']
    t0 = time.process_time()
    target, floor = reference_solutions(denoiser, x, lo, hi, cond, steps, progress=True)
    seconds = time.process_time() - t0
    if path:
        torch.save(dict(x=x, target=target, floor=floor, steps=steps, cpu_seconds=seconds), path)
    return target, floor, seconds


@torch.no_grad()
def measure(ckpt, w, args):
    """Errors of every solver at every NFE on Karras's and the fitted schedules, for one model and guidance weight."""
    denoiser, cond_all, w, diffusion, config = model_ode(ckpt, w, max(args.paths, args.test_paths))
    cond, cond_test = ({k: v[:m] for k, v in cond_all.items()} for m in (args.paths, args.test_paths))   # classes cycled
    shape, lo, hi = sample_shape(config), diffusion.sigma_min, diffusion.sigma_max
    cache = lambda seed, paths, steps: args.ref_cache and os.path.join(
        args.ref_cache, f'ref_{os.path.basename(os.path.dirname(os.path.abspath(ckpt)))}_w{w:g}_s{seed}_p{paths}_r{steps}.pt')
    x_fit = draw_noise(shape, args.paths, args.fit_seed, hi)
    ref_fit, floor_fit, fit_ref_seconds = cached_reference(denoiser, x_fit, lo, hi, cond, args.fit_ref_steps,
                                                           cache(args.fit_seed, args.paths, args.fit_ref_steps))
    x_test = draw_noise(shape, args.test_paths, args.test_seed, hi)
    ref_test, floor, ref_seconds = cached_reference(denoiser, x_test, lo, hi, cond_test, args.ref_steps,
                                                    cache(args.test_seed, args.test_paths, args.ref_steps))
    print(f'{ckpt} w={w:g}: held-out reference ({args.test_paths} noises, {args.ref_steps} levels) {ref_seconds:.0f} '
          f'CPU s, floor {floor:.2e}; fit reference ({args.paths} noises, {args.fit_ref_steps} levels) '
          f'{fit_ref_seconds:.0f} CPU s, floor {floor_fit:.2e}')
    fits = {}                                                   # (solver fitted for, nfe) -> (sigmas, info)
    fit_nfes = args.fit_nfe or args.nfe
    evals = dict(zip(fit_nfes, args.fit_evals * len(fit_nfes) if len(args.fit_evals) == 1 else args.fit_evals))
    for fs in args.fit_sampler:
        for nfe in fit_nfes:
            n = samplers.steps_for_nfe(fs, nfe)
            sigmas, info = fit_schedule(denoiser, shape, n, fs, cond, lo, hi, seed=args.fit_seed,
                                        n_paths=args.paths, max_evals=fit_budget(n, evals[nfe]),
                                        reference=(ref_fit, floor_fit), progress=True, return_info=True)
            print(f"  fit {fs} {nfe} NFE: {info['karras_error']:.3e} -> {info['fitted_error']:.3e} on its own noise, "
                  f"{info['sampler_runs']} runs, {info['cpu_seconds']:.0f} CPU s; sigmas "
                  + ' '.join(f'{s:.3g}' for s in sigmas.tolist()))
            fits[fs, nfe] = (sigmas, info)
    errors, first = {}, args.fit_sampler[0]
    for solver in PUBLISHED + OURS:
        for nfe in args.nfe:
            n = samplers.steps_for_nfe(solver, nfe)
            # fitted: the first --fit-sampler's schedule, for every solver with as many levels; own: fitted for itself
            candidates = (('karras', samplers.karras_sigmas(n, lo, hi)),
                          ('fitted', fits[first, nfe][0] if (first, nfe) in fits and len(fits[first, nfe][0]) == n + 1 else None),
                          ('own', fits[solver, nfe][0] if (solver, nfe) in fits and solver != first else None))
            for name, sigmas in candidates:
                if sigmas is not None:
                    out = samplers.SAMPLERS[solver](denoiser, x_test.clone(), sigmas.float(), cond=cond_test)
                    errors[f'{solver}|{name}|{nfe}'] = rms(out, ref_test)
    record = dict(ckpt=ckpt, guidance=w, dataset=config['data']['dataset'], latent=bool(config.get('autoencoder')),
                  paths=args.test_paths, fit_paths=args.paths, fit_evals=args.fit_evals, ref_steps=args.ref_steps, floor=floor,
                  reference_cpu_seconds=ref_seconds, nfe=args.nfe, errors=errors,
                  fits={nfe: dict(sigmas=s.tolist(), **info) for (fs, nfe), (s, info) in fits.items() if fs == first},
                  own_fits={f'{fs}|{nfe}': dict(sigmas=s.tolist(), **info) for (fs, nfe), (s, info) in fits.items()})
    print_table(record)
    return record


def print_table(r):
    """Markdown: a row per solver and schedule, a column per NFE, then the goal's ratio."""
    e, nfes = r['errors'], r['nfe']
    kind = f"{r['dataset']}{' latent' if r['latent'] else ''}, guidance {r['guidance']:g}"
    print(f"\n{kind}: RMS distance to the reference ODE solution, {r['paths']} held-out noises (floor {r['floor']:.1e})")
    print('| solver | schedule | ' + ' | '.join(f'{n} NFE' for n in nfes) + ' |')
    print('| --- | --- |' + ' --- |' * len(nfes))
    for solver in PUBLISHED + OURS:
        for sched in ('karras', 'fitted', 'own'):
            cells = [e.get(f'{solver}|{sched}|{n}') for n in nfes]
            if any(c is not None for c in cells):
                name = solver + (' (ours)' if solver in OURS else '')
                label = 'fitted for itself' if sched == 'own' else sched
                print(f'| {name} | {label} | ' + ' | '.join('-' if c is None else f'{c:.2e}' for c in cells) + ' |')
    best_pub = [min(e[f'{s}|karras|{n}'] for s in PUBLISHED) for n in nfes]
    best_ours = [min([e[k] for k in e if k.endswith(f'|{n}') and k.split('|')[1] != 'karras' and k.split('|')[0] in OURS]
                     or [None]) for n in nfes]
    print('| best ours, fitted / best published, Karras | | ' + ' | '.join('-' if o is None else f'{o / p:.2f}' for o, p in
                                                                         zip(best_ours, best_pub)) + ' |')


def plot(records, out):
    """One panel per model (plots.draw_chart, PIL): the best published solver on Karras and on the fitted schedule,
    eps_abm on both, DPM-Solver++(2M) on both, and the reference floor; log error against NFE."""
    from PIL import Image, ImageDraw
    import plots
    w, h = 420, 320
    img = Image.new('RGB', (w * len(records), h), 'white')
    draw = ImageDraw.Draw(img)
    for k, r in enumerate(records):
        nfes, e = r['nfe'], r['errors']
        best = lambda sched, n: min([e[f'{s}|{sched}|{n}'] for s in PUBLISHED if f'{s}|{sched}|{n}' in e] or [None])
        series = {'best publ., Karras': (nfes, [best('karras', n) for n in nfes]),
                  'best publ., fitted': (nfes, [best('fitted', n) for n in nfes]),
                  'eps_abm, Karras': (nfes, [e.get(f'eps_abm|karras|{n}') for n in nfes]),
                  'eps_abm, fitted': (nfes, [e.get(f'eps_abm|fitted|{n}') for n in nfes]),
                  'dpmpp_2m, Karras': (nfes, [e.get(f'dpmpp_2m|karras|{n}') for n in nfes]),
                  'dpmpp_2m, fitted': (nfes, [e.get(f'dpmpp_2m|fitted|{n}') for n in nfes]),
                  'reference floor': (nfes, [r['floor']] * len(nfes))}
        title = f"{r['dataset']}{' latent' if r['latent'] else ''}, w={r['guidance']:g}: RMS error vs NFE"
        plots.draw_chart(draw, (k * w, 0, (k + 1) * w, h), series, title, log_y=True)
    img.save(out)
    print(f'wrote {out}')


@torch.no_grad()
def grids(records, out, paths=10):
    """Samples at 5 and 10 NFE (eps_abm) on Karras's and the fitted schedules (the records' fits) from the same
    held-out noise, beside the converged reference: one row per record, five panels of paths images each."""
    from PIL import Image, ImageDraw
    rows = []
    for r in records:
        denoiser, cond, w, diffusion, config = model_ode(r['ckpt'], r['guidance'], paths)
        shape, lo, hi = sample_shape(config), diffusion.sigma_min, diffusion.sigma_max
        decode = latent_decoder(config) or (lambda z: z)
        x = draw_noise(shape, paths, 1, hi)
        ref, _ = reference_solutions(denoiser, x, lo, hi, cond, 128)
        panels = [('reference', ref)]
        for nfe in (5, 10):
            fitted = torch.tensor(r['fits'][str(nfe)]['sigmas'], dtype=torch.float32)
            for name, sigmas in (('Karras', samplers.karras_sigmas(nfe, lo, hi)), ('fitted', fitted)):
                panels.append((f'{nfe} NFE {name}', samplers.SAMPLERS['eps_abm'](denoiser, x.clone(), sigmas, cond=cond)))
        label = f"{r['dataset']}{' latent' if r['latent'] else ''} w={w:g}"
        rows.append((label, [(t, decode(p).clamp(-1, 1)) for t, p in panels]))
    tiles = []
    for label, panels in rows:                                   # each panel: paths images in 2 rows
        row = []
        for title, imgs in panels:
            imgs = ((imgs + 1) * 127.5).round().byte().expand(-1, 3, -1, -1) if imgs.shape[1] == 1 else \
                ((imgs + 1) * 127.5).round().byte()
            half = (len(imgs) + 1) // 2
            grid = torch.cat([torch.cat(list(imgs[:half]), -1), torch.cat(list(imgs[half:2 * half]), -1)], -2)
            row.append((f'{label}: {title}' if not row else title, Image.fromarray(grid.permute(1, 2, 0).numpy())))
        tiles.append(row)
    scale, gap, head = 2, 8, 14
    tw, th = tiles[0][0][1].width * scale, tiles[0][0][1].height * scale
    img = Image.new('RGB', (5 * (tw + gap), len(tiles) * (th + head + gap)), 'white')
    draw = ImageDraw.Draw(img)
    for i, row in enumerate(tiles):
        for j, (title, tile) in enumerate(row):
            x0, y0 = j * (tw + gap), i * (th + head + gap)
            draw.text((x0 + 2, y0), title, fill=(0, 0, 0))
            img.paste(tile.resize((tw, th), Image.NEAREST), (x0, y0 + head))
    img.save(out)
    print(f'wrote {out}')


def sample_metric(r, args):
    """Class accuracy of a LeNet trained on the model's data (checked on held-out real images) and the Frechet
    distance of its features (evaluate.frechet_distance) to held-out real images, for eps_abm on the fitted schedule
    at 10 NFE against the published solvers on Karras at 10 and 20 NFE (--metric-nfe), from the same noises and classes."""
    import data
    import evaluate
    from sample import generate, load_model
    ckpt, w = r['ckpt'], r['guidance']
    net, diffusion, config = load_model(ckpt)
    d, trained = config['data'], config['args']
    ds = data.load_dataset(d['dataset'], data_dir=trained.get('data_dir'), split=trained.get('split', 'train'),
                           resolution=d['resolution'])
    x, y = ds.batch(torch.arange(len(ds)))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    test, train = order[:2000], order[2000:]
    clf = evaluate.train_classifier((x[train] + 1) / 2, y[train], d['num_classes'], steps=500)
    torch.set_grad_enabled(False)                       # the LeNet is trained; from here on only sampling
    real_feats, logits = clf((x[test] + 1) / 2, return_logits=True)
    print(f"LeNet: {(logits.argmax(1) == y[test]).float().mean():.3f} on {len(test)} held-out real images")
    real_stats = (real_feats.mean(0).double().numpy(), torch.cov(real_feats.T).double().numpy())
    labels = torch.arange(d['num_classes']).repeat_interleave(args.per_class)
    fitted = torch.tensor(r['fits']['10']['sigmas'], dtype=torch.float32)
    runs = [('eps_abm (ours), fitted', 'eps_abm', 10, fitted)]
    for solver in args.metric_solvers:
        for nfe in args.metric_nfe:
            n = samplers.steps_for_nfe(solver, nfe)
            runs.append((f'{solver}, Karras', solver, nfe, samplers.karras_sigmas(n, diffusion.sigma_min, diffusion.sigma_max)))
    results = []
    for name, solver, nfe, sigmas in runs:
        imgs = generate(net, diffusion, len(labels), sample_shape(config), 'cpu', labels, d['num_classes'], solver,
                        len(sigmas) - 1, w, seed=args.test_seed, batch_size=250, sigmas=sigmas,
                        decode=latent_decoder(config))
        feats, logits = clf((imgs + 1) / 2, return_logits=True)
        acc = (logits.argmax(1) == labels).float().mean().item()
        fd = evaluate.frechet_distance(feats.mean(0).double().numpy(), torch.cov(feats.T).double().numpy(), *real_stats)
        results.append(dict(run=name, nfe=nfe, accuracy=acc, fd_lenet=float(fd)))
        print(f'| {name} | {nfe} | {acc:.3f} | {fd:.2f} |')
    return dict(ckpt=ckpt, guidance=w, samples=len(labels), results=results)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', default=None, help='measure the ODE error of this checkpoint')
    p.add_argument('--guidance', type=float, nargs='+', default=[None], help="weights (default: the run's)")
    p.add_argument('--nfe', type=int, nargs='+', default=[5, 10, 20, 35])
    p.add_argument('--paths', type=int, default=32, help='noise draws the schedules are fitted on')
    p.add_argument('--test-paths', type=int, default=64, help='held-out noise draws the errors are measured on')
    p.add_argument('--fit-seed', type=int, default=0)
    p.add_argument('--test-seed', type=int, default=1)
    p.add_argument('--fit-sampler', nargs='+', default=['eps_abm'], help="the first one's schedule is given to every "
                   'solver ("fitted"); each other one is also fitted for itself ("fitted for itself")')
    p.add_argument('--ref-steps', type=int, default=256, help='held-out reference: Heun on these levels, DEIS on 2x')
    p.add_argument('--fit-ref-steps', type=int, default=128, help="the fit's reference (its floor is far below a "
                   '5-10 NFE error)')
    p.add_argument('--ref-cache', default=None, metavar='DIR', help='keep the reference solutions here (reused when '
                   'the same noises, weight and levels come again)')
    p.add_argument('--json', default=None, help='save the measurements here')
    p.add_argument('--plot', nargs='+', default=None, metavar='JSON', help='plot saved measurements to --out')
    p.add_argument('--grids', nargs='+', default=None, metavar='JSON', help='sample grids of measured models to --out')
    p.add_argument('--sample-metric', default=None, metavar='JSON', help='class accuracy and FD_lenet at 10 NFE, '
                   "the records' fitted schedules")
    p.add_argument('--fit-nfe', type=int, nargs='+', default=None, help='fit at these NFE only (default: all --nfe)')
    p.add_argument('--fit-evals', type=int, nargs='+', default=[1600], help='denoiser calls (per path) each fit may '
                   'spend: one number for every fit, or one per --fit-nfe')
    p.add_argument('--per-class', type=int, default=50)
    p.add_argument('--metric-solvers', nargs='+', default=['dpmpp_2m', 'deis_tab'])
    p.add_argument('--metric-nfe', type=int, nargs='+', default=[10, 20])
    p.add_argument('--out', default=None)
    args = p.parse_args()
    if len(args.fit_evals) not in (1, len(args.fit_nfe or args.nfe)):
        p.error(f'--fit-evals takes one number or one per fitted NFE ({len(args.fit_nfe or args.nfe)}), '
                f'got {len(args.fit_evals)}')
    torch.manual_seed(0)
    if args.plot:
        return plot([r for f in args.plot for r in json.load(open(f))], args.out)
    if args.grids:
        return grids([r for f in args.grids for r in json.load(open(f))], args.out)
    if args.sample_metric:
        records = [sample_metric(r, args) for r in json.load(open(args.sample_metric))
                   if args.guidance == [None] or r['guidance'] in args.guidance]
        return save(records, args.json)
    records = []
    for w in args.guidance:                           # saved after each weight: a long run keeps what it finished
        records.append(measure(args.ckpt, w, args))
        save(records, args.json)


def save(records, path):
    if path:
        with open(path, 'w') as f:
            json.dump(records, f, indent=1)
        print(f'wrote {path}')


if __name__ == '__main__':
    main()
