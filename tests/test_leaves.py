"""The shape of the project (DESIGN.md): leaves import no project file and their demos run copied alone; no file
is over 850 lines; nothing imports a training program.

Leaves are discovered, not listed: a top-level .py whose module-level imports name no top-level module of the
project is a leaf, so a new leaf is covered the day it is added. The leaves DESIGN.md promises are checked too,
so that a leaf which gains a sibling import is caught rather than silently dropped from the list.
Each check is a function of a folder; test_each_check_catches_a_planted_violation runs them on a small made-up
project with one violation of each kind, so none of them can pass vacuously.
"""
import ast
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_LINES = 850
# The leaves DESIGN.md promises (those that exist are checked): they import only torch/numpy/scipy/pillow/tqdm.
DESIGN_LEAVES = ('diffusion', 'samplers', 'guidance', 'unet', 'dit', 'vae', 'data', 'augment', 'cascade', 'plots',
                 'inception', 'i3d', 'lpips', 'metrics', 'discrete')
DEMO_TIMEOUT = 120          # seconds per demo; they take 2-12 s on a busy 2-core CPU
# A demo that cannot run without something from outside (a weight file, a download, a command-line argument)
# must say so and stop without a traceback; such a stop is a skip whose reason is the demo's own message.
NEEDS_SOMETHING = ('usage:', 'weights', 'download')


def module_names(folder):
    """The project's importable names: every top-level .py of `folder`."""
    return {p.stem for p in pathlib.Path(folder).glob('*.py')}


def project_imports(path, names, module_level_only=False):
    """Project modules `path` imports: at module level only, or anywhere (imports inside functions included)."""
    tree = ast.parse(pathlib.Path(path).read_text(), filename=str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add('.' if node.level else node.module.split('.')[0])  # a relative import breaks copying too
    return found & (names | {'.'})


def leaves(folder):
    """Top-level .py files whose module-level imports name no project module."""
    names = module_names(folder)
    return sorted(p for p in pathlib.Path(folder).glob('*.py') if not project_imports(p, names, True))


def leaf_import_problems(folder, promised=()):
    """{file: project modules imported anywhere} for discovered leaves and for the promised ones that exist."""
    names = module_names(folder)
    files = set(leaves(folder)) | {pathlib.Path(folder) / f'{m}.py' for m in promised if m in names}
    return {p.name: sorted(found) for p in sorted(files) if (found := project_imports(p, names))}


def long_files(folder, limit=MAX_LINES):
    """{file: line count} of the top-level .py files over `limit` lines."""
    counts = {p.name: len(p.read_text().splitlines()) for p in pathlib.Path(folder).glob('*.py')}
    return {name: n for name, n in counts.items() if n > limit}


def training_program_importers(folder, subfolders=('benchmarks',)):
    """{file: training programs imported}: a training program is a top-level train*.py; nothing may import one.

    tests/ is left out: end-to-end tests of a training program run it (tests/test_X.py -> X.py, DESIGN.md).
    """
    folder = pathlib.Path(folder)
    programs = {name for name in module_names(folder) if name.startswith('train')}
    files = list(folder.glob('*.py')) + [p for sub in subfolders for p in (folder / sub).glob('*.py')]
    return {str(p.relative_to(folder)): sorted(found) for p in sorted(files)
            if (found := project_imports(p, programs) - {p.stem} - {'.'})}


def has_demo(path):
    return any(isinstance(node, ast.If) and "__name__ == '__main__'" in ast.unparse(node.test).replace('"', "'")
               for node in ast.parse(pathlib.Path(path).read_text()).body)


def run_demo_alone(path, folder, timeout=DEMO_TIMEOUT):
    """Copy `path` ALONE into the empty `folder` and run `python file.py` there: (status, message).

    status: 'ok' (exit 0), 'needs' (stopped without a traceback, saying it needs weights, a download or arguments),
    or 'failed'. Only the copy is importable (no PYTHONPATH), so a sibling import fails as it would for a reader.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    assert not any(folder.iterdir()), f'{folder} is not empty'
    copy = folder / pathlib.Path(path).name
    copy.write_text(pathlib.Path(path).read_text())
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    try:
        done = subprocess.run([sys.executable, copy.name], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return 'failed', f'did not finish in {timeout} s'
    output = (done.stdout + done.stderr).strip()
    if done.returncode == 0:
        return 'ok', output[-500:]
    if 'Traceback' not in done.stderr and any(word in output.lower() for word in NEEDS_SOMETHING):
        return 'needs', output[-500:]
    return 'failed', f'exit {done.returncode}: {output[-1500:]}'


# ----------------------------------------------------------------------------------------------------
# The project itself

def test_leaves_import_no_project_file():
    assert leaves(ROOT), 'no leaf found: the discovery is broken'
    assert leaf_import_problems(ROOT, DESIGN_LEAVES) == {}


def test_no_top_level_file_is_over_850_lines():
    assert long_files(ROOT) == {}, 'a new capability is a new file, not a branch in an old one (DESIGN.md)'


def test_nothing_imports_a_training_program():
    assert training_program_importers(ROOT) == {}


DEMOS = [p for p in leaves(ROOT) if has_demo(p)]


@pytest.fixture(scope='module')
def demo_results(tmp_path_factory):
    """Every leaf demo run copied alone, two at a time (the 2 CPU cores), once for the module."""
    def run(path):
        return path.name, run_demo_alone(path, tmp_path_factory.mktemp(path.stem))
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, DEMOS))


@pytest.mark.parametrize('path', DEMOS, ids=[p.name for p in DEMOS])
def test_leaf_demo_runs_copied_alone_into_an_empty_folder(path, demo_results):
    status, message = demo_results[path.name]
    if status == 'needs':
        pytest.skip(f'{path.name} needs something from outside: {message.splitlines()[-1]}')
    assert status == 'ok', f'python {path.name}, copied alone: {message}'


# ----------------------------------------------------------------------------------------------------
# Each check fails on a planted violation

def test_each_check_catches_a_planted_violation(tmp_path):
    project = tmp_path / 'project'
    (project / 'benchmarks').mkdir(parents=True)
    (project / 'good.py').write_text("import torch\nif __name__ == '__main__':\n    print('fine')\n")
    (project / 'sibling.py').write_text('X = 1\n')
    # a leaf (nothing at module level) that imports a sibling inside a function: breaks when copied alone
    (project / 'lazy.py').write_text("def f():\n    import sibling\n    return sibling.X\n"
                                     "if __name__ == '__main__':\n    print(f())\n")
    (project / 'broken.py').write_text("if __name__ == '__main__':\n    raise RuntimeError('demo broke')\n")
    (project / 'weights.py').write_text("if __name__ == '__main__':\n    raise SystemExit('no weights file found')\n")
    (project / 'promised.py').write_text('import sibling\n')             # a promised leaf that gained an import
    (project / 'long.py').write_text('x = 1\n' * (MAX_LINES + 1))
    (project / 'train_extra.py').write_text('')
    (project / 'benchmarks' / 'bench.py').write_text('from train_extra import main\n')
    (project / 'uses_train.py').write_text('def f():\n    import train_extra\n')

    assert {p.name for p in leaves(project)} >= {'good.py', 'lazy.py', 'broken.py', 'long.py'}
    assert leaf_import_problems(project, ('promised',)) == {'lazy.py': ['sibling'], 'promised.py': ['sibling'],
                                                        'uses_train.py': ['train_extra']}
    assert long_files(project) == {'long.py': MAX_LINES + 1}
    assert training_program_importers(project) == {'benchmarks/bench.py': ['train_extra'],
                                                   'uses_train.py': ['train_extra']}
    assert has_demo(project / 'broken.py') and not has_demo(project / 'sibling.py')
    assert run_demo_alone(project / 'good.py', tmp_path / 'a')[0] == 'ok'
    status, message = run_demo_alone(project / 'lazy.py', tmp_path / 'b')     # the sibling is not copied
    assert status == 'failed' and "No module named 'sibling'" in message
    assert run_demo_alone(project / 'broken.py', tmp_path / 'c')[0] == 'failed'
    assert run_demo_alone(project / 'weights.py', tmp_path / 'd') == ('needs', 'no weights file found')
