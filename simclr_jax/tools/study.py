r"""Scaling studies as one command: a grid of ordinary runs, then one report.

  python -m simclr_jax.study --config=configs/digits.py --workdir=STUDY \
      --sweep=batch_size=64,128,256,512,1024 --sweep=num_epochs=15,30
  python -m simclr_jax.study --workdir=STUDY --point=3   # one point (array job)
  python -m simclr_jax.study --report=STUDY              # study.json/.md/PNGs

Each point of the grid is an ordinary run of `python -m simclr_jax.main` in
`STUDY/points/<name>/`, so every point gets the main command's resume,
preemption safety and evaluation. The grid is fixed in `STUDY/study_spec.json`
by the first invocation; later ones (`--point=K`, a re-run, another host)
read it, and a different grid for an existing study is refused.

Fair budgets: the sweep fixes epochs, not steps, and each point's learning
rate follows the recipe's scaling rule (`optim.lr_scaling`, base x B/256 or
x sqrt(B)) with warmup in epochs, so a point at batch 4096 is the recipe at
4096, as in SimCLR's batch-size study (Chen et al. 2020a, Fig. 9). Every
point records its effective settings. With `--max_batch_per_device=N` a
point whose per-device batch is larger runs with gradient caching at the
fewest chunks that fit (`config.max_batch_per_device`), and its log and
results say so.

Seeds: an axis named `seed` (`--sweep=seed=0,1,2`) is repetition, not a
setting. The report then also gives, for every other combination of
settings, the mean and standard deviation over seeds of each accuracy the
runs wrote (`summary` in study.json, the second table of study.md): the
form in which docs/ publishes a figure.

Downstream tables: `--mode=finetune` (any mode of the main command) runs
every point in that mode, and a fixed setting may name a point's own
settings in braces, so each seed fine-tunes its own pretrained encoder:

  python -m simclr_jax.study --config=configs/fashion_mnist.py \
      --workdir=FT --mode=finetune --sweep=seed=0,1,2 \
      --sweep=finetune.from_scratch=False,True \
      --config.init_from=PRETRAIN/points/seed-{seed}

Points run one after another by default; `--point=K` runs one, so a cluster
array job runs a study in parallel (launch/study_slurm_array.sh). A finished
point (results.json, not interrupted) is skipped; an interrupted one resumes.
SIGTERM/SIGINT go to the running point, which checkpoints and exits; the
study then stops without starting another point.
"""

import ast
import itertools
import json
import math
import statistics
import os
import re
import signal
import subprocess
import sys
from typing import Any, Sequence

from simclr_jax.runtime import entry

SPEC = 'study_spec.json'
POINTS = 'points'
# The report's small JSON: what docs/results/ keeps of a published study.
COMPACT = 'study_results.json'
# The axis that repeats a run rather than changing it.
SEED = 'seed'
# Read-outs copied from each point's results.json into the report.
_READOUTS = ('linear_probe_accuracy', 'knn_accuracy', 'fewshot_probe_accuracy')


class StudyError(ValueError):
  pass


# The grid.


def parse_value(text: str) -> Any:
  """'256' -> 256, '0.5' -> 0.5, 'True' -> True, 'sqrt' -> 'sqrt'."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_sweeps(sweeps: Sequence[str]) -> list[tuple[str, list[Any]]]:
  """['batch_size=64,128', ...] -> [('batch_size', [64, 128]), ...]."""
  axes = []
  for sweep in sweeps:
    field, sep, values = sweep.partition('=')
    field = field.strip()
    if field.startswith('config.'):
      field = field[len('config.'):]
    if not sep or not field or not values.strip():
      raise StudyError(f'--sweep={sweep!r} must look like FIELD=V1,V2,... '
                       '(e.g. batch_size=256,512)')
    if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*',
                        field):
      raise StudyError(f'--sweep field {field!r} is not a config field path')
    if field in (f for f, _ in axes):
      raise StudyError(f'--sweep names {field} twice; give each field once')
    parsed = [parse_value(v.strip()) for v in values.split(',')]
    if len(set(map(repr, parsed))) != len(parsed):
      raise StudyError(f'--sweep={sweep!r} repeats a value')
    axes.append((field, parsed))
  if not axes:
    raise StudyError('a new study needs at least one --sweep=FIELD=V1,V2,...')
  return axes


def _slug(value: Any) -> str:
  return re.sub(r'[^A-Za-z0-9.+-]+', '_', str(value)).strip('_') or '_'


def point_name(settings: dict[str, Any]) -> str:
  """{'batch_size': 256, 'optim.lr_scaling': 'sqrt'} ->
  'batch_size-256__optim.lr_scaling-sqrt' (filesystem-safe, unique)."""
  return '__'.join(f'{field}-{_slug(v)}' for field, v in settings.items())


def expand(axes: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
  """The grid in row-major order (the last axis varies fastest)."""
  fields = [f for f, _ in axes]
  points = []
  for index, values in enumerate(itertools.product(*(v for _, v in axes))):
    settings = dict(zip(fields, values))
    points.append({'index': index, 'name': point_name(settings),
                   'settings': settings})
  names = [p['name'] for p in points]
  if len(set(names)) != len(names):
    raise StudyError('two points of the grid get the same directory name; '
                     'use values that differ in letters or digits')
  return points


def make_spec(config: str, axes, overrides: Sequence[str],
              max_batch_per_device: int, mode: str = 'pretrain'
              ) -> dict[str, Any]:
  fields = {f for f, _ in axes}
  for name in re.findall(r'\{([^{}]*)\}', ' '.join(overrides)):
    if name not in fields:
      raise StudyError(f'{{{name}}} in a fixed setting names no --sweep '
                       f'axis; the axes: {", ".join(sorted(fields))}')
  return {'config': config, 'axes': [[f, v] for f, v in axes],
          'overrides': list(overrides), 'mode': mode,
          'max_batch_per_device': int(max_batch_per_device),
          'points': expand(axes)}


def _write_json(path: str, obj: Any) -> None:
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)  # Atomic: concurrent --point runs never see half.


def load_or_create_spec(workdir: str, config: str | None,
                        sweeps: Sequence[str], overrides: Sequence[str],
                        max_batch_per_device: int, mode: str = 'pretrain'
                        ) -> dict[str, Any]:
  """The study's grid: created on first use, then read back and checked."""
  path = os.path.join(workdir, SPEC)
  new = None
  if config or sweeps:
    if not config:
      raise StudyError('--sweep needs --config=RECIPE')
    new = make_spec(os.path.abspath(config.split(':')[0]) +
                    (':' + config.split(':', 1)[1] if ':' in config else ''),
                    parse_sweeps(sweeps), overrides, max_batch_per_device,
                    mode)
  if os.path.exists(path):
    with open(path) as f:
      spec = json.load(f)
    if new is not None:
      spec.setdefault('mode', 'pretrain')
      for key in ('config', 'axes', 'overrides', 'max_batch_per_device',
                  'mode'):
        if new[key] != spec[key]:
          raise StudyError(
              f'{workdir} holds a study with {key}={spec[key]!r}; this '
              f'command asks for {new[key]!r}. Use a new --workdir, or run '
              'the existing study with --workdir alone')
    return spec
  if new is None:
    raise StudyError(f'no study in {workdir} ({SPEC} is missing): start one '
                     'with --config=RECIPE and --sweep=FIELD=V1,V2,...')
  os.makedirs(os.path.join(workdir, POINTS), exist_ok=True)
  _write_json(path, new)
  return new


# Running points.


def point_dir(workdir: str, point: dict[str, Any]) -> str:
  return os.path.join(workdir, POINTS, point['name'])


def point_status(workdir: str, point: dict[str, Any]) -> str:
  """'finished', 'interrupted', 'failed', 'started' or 'pending'."""
  d = point_dir(workdir, point)
  results = os.path.join(d, 'results.json')
  if os.path.exists(results):
    with open(results) as f:
      return 'interrupted' if json.load(f).get('interrupted') else 'finished'
  if os.path.exists(os.path.join(d, 'FAILED')):
    return 'failed'
  if os.path.exists(os.path.join(d, 'config.json')):
    return 'started'  # Running now, or killed before it wrote results.
  return 'pending'


def _flag_value(value: Any) -> str:
  return repr(value) if isinstance(value, (tuple, list)) else str(value)


def fill_in(text: str, settings: dict[str, Any]) -> str:
  """`text` with each {field} replaced by the point's value of that axis."""
  return re.sub(r'\{([^{}]*)\}',
                lambda m: _slug(settings[m.group(1)]) if m.group(1) in settings
                else m.group(0), text)


def point_command(spec: dict[str, Any], point: dict[str, Any], workdir: str,
                  main_module: str = 'simclr_jax.main') -> list[str]:
  args = [sys.executable, '-m', main_module, f'--config={spec["config"]}',
          f'--workdir={point_dir(workdir, point)}',
          *(fill_in(o, point['settings']) for o in spec['overrides'])]
  if spec.get('mode', 'pretrain') != 'pretrain':
    args.append(f'--mode={spec["mode"]}')
  args += [f'--config.{f}={_flag_value(v)}'
           for f, v in point['settings'].items()]
  if spec.get('max_batch_per_device'):
    args.append(f'--config.max_batch_per_device={spec["max_batch_per_device"]}')
  return args


class _Forwarder:
  """Forwards SIGTERM/SIGINT to the running point; remembers it was asked."""

  def __init__(self):
    self.child = None
    self.stopping = False

  def __call__(self, signum, frame):
    del frame
    self.stopping = True
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signum)


def run_point(spec: dict[str, Any], point: dict[str, Any], workdir: str, *,
              main_module: str = 'simclr_jax.main',
              forwarder: _Forwarder | None = None) -> str:
  """Runs (or resumes, or skips) one point; returns its status after."""
  status = point_status(workdir, point)
  label = f'point {point["index"]} ({point["name"]})'
  if status == 'finished':
    print(f'study: {label}: finished before, skipped', flush=True)
    return status
  d = point_dir(workdir, point)
  os.makedirs(d, exist_ok=True)
  failed = os.path.join(d, 'FAILED')
  if os.path.exists(failed):
    os.remove(failed)  # A re-run retries a failed point.
  print(f'study: {label}: {"resuming" if status != "pending" else "starting"}',
        flush=True)
  with open(os.path.join(d, 'log.txt'), 'a') as log:
    child = subprocess.Popen(point_command(spec, point, workdir, main_module),
                             stdout=log, stderr=subprocess.STDOUT)
    if forwarder is not None:
      forwarder.child = child
    rc = child.wait()
    if forwarder is not None:
      forwarder.child = None
  status = point_status(workdir, point)
  if rc != 0 or status not in ('finished', 'interrupted'):
    with open(os.path.join(d, 'log.txt')) as f:
      tail = f.read()[-2000:]
    with open(failed, 'w') as f:
      f.write(f'exit status {rc}\n{tail}')
    status = 'failed'
  print(f'study: {label}: {status}'
        + (f' (exit status {rc}; see {d}/log.txt)' if status == 'failed'
           else ''), flush=True)
  return status


def run_study(spec: dict[str, Any], workdir: str, point: int | None = None,
              main_module: str = 'simclr_jax.main') -> dict[str, str]:
  """Runs every point (or point K); returns {name: status}."""
  points = spec['points']
  if point is not None:
    if not 0 <= point < len(points):
      raise StudyError(f'--point={point} is out of range: the study has '
                       f'{len(points)} points (0..{len(points) - 1})')
    points = [points[point]]
  forwarder = _Forwarder()
  previous = {s: signal.signal(s, forwarder)
              for s in (signal.SIGTERM, signal.SIGINT)}
  out = {}
  try:
    for p in points:
      if forwarder.stopping:
        break
      out[p['name']] = run_point(spec, p, workdir, main_module=main_module,
                                 forwarder=forwarder)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  return out


# The report.


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def accuracies(results: dict[str, Any]) -> dict[str, float]:
  """Every accuracy in a results.json, flat: 'knn_accuracy',
  'fewshot_probe_accuracy/10', 'top1_accuracy', ... (the kNN monitor's
  history excluded)."""
  out = {}
  for key, value in results.items():
    if not key.endswith('accuracy'):
      continue
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      out[key] = float(value)
    elif isinstance(value, dict):
      for sub, x in value.items():
        if isinstance(x, (int, float)) and not isinstance(x, bool):
          out[f'{key}/{sub}'] = float(x)
  return out


def summarize(spec: dict[str, Any], rows: list[dict[str, Any]]
              ) -> list[dict[str, Any]]:
  """Mean and standard deviation over the `seed` axis of every accuracy,
  one entry per combination of the other axes (in grid order).

  The standard deviation is the sample one (n - 1), 0.0 for a single seed;
  only finished points count, and `n` says how many did. `paired` holds
  each setting's per-seed differences against its baselines
  (paired_differences).
  """
  others = [f for f, _ in spec['axes'] if f != SEED]
  groups: dict[str, dict[str, Any]] = {}
  for r in rows:
    settings = {f: r['settings'][f] for f in others}
    g = groups.setdefault(json.dumps(settings, sort_keys=True),
                          {'settings': settings, 'seeds': [], 'values': {},
                           'rows': []})
    if r['status'] != 'finished':
      continue
    g['seeds'].append(r['settings'].get(SEED))
    g['rows'].append(r)
    for key, value in (r.get('accuracies') or {}).items():
      g['values'].setdefault(key, []).append(value)
  out = []
  for g in groups.values():
    metrics = {}
    for key, values in g['values'].items():
      metrics[key] = {
          'mean': statistics.fmean(values), 'n': len(values),
          'std': statistics.stdev(values) if len(values) > 1 else 0.0,
          'values': values}
    out.append({'settings': g['settings'], 'seeds': g['seeds'],
                'metrics': metrics, 'paired': paired_differences(g['rows'])})
  return out


def point_row(workdir: str, point: dict[str, Any]) -> dict[str, Any]:
  """One row of study.json: settings, status and what the run measured."""
  d = point_dir(workdir, point)
  row = {'index': point['index'], 'name': point['name'],
         'settings': point['settings'],
         'status': point_status(workdir, point)}
  path = os.path.join(d, 'results.json')
  if os.path.exists(path):
    with open(path) as f:
      r = json.load(f)
    prov = r.get('provenance', {})
    batch = prov.get('global_batch')
    wall = r.get('pretrain_wall_time_s')
    steps = r.get('steps')
    row.update(
        steps=steps, pretrain_wall_time_s=wall,
        wall_time_s=prov.get('wall_time_s'),
        images_per_sec=(steps * batch / wall if steps and batch and wall
                        else None),
        final_loss=r.get('final_train_loss'),
        knn_monitor=r.get('knn_monitor', []),
        global_batch=batch, per_device_batch=prov.get('per_device_batch'),
        grad_cache_chunks=prov.get('grad_cache_chunks'),
        code_version=prov.get('code', {}).get('version'),
        code_starts=[s.get('version') for s in prov.get('code_starts', [])],
        device=(f"{prov.get('device_count')} x {prov.get('device_kind')}"
                if prov else None),
        provenance=prov)
    for key in _READOUTS:
      row[key] = r.get(key)
    row['accuracies'] = accuracies(r)
  loss = [(m['step'], m['loss']) for m in _read_jsonl(
      os.path.join(d, 'metrics.jsonl')) if 'loss' in m]
  row['loss_curve'] = loss
  return row


def _pct(x: Any) -> str:
  return '' if x is None else f'{100 * x:.1f}'


def markdown(spec: dict[str, Any], rows: list[dict[str, Any]],
             warnings: list[str]) -> str:
  fields = [f for f, _ in spec['axes']]
  shots = sorted({k for r in rows for k in (r.get('fewshot_probe_accuracy')
                                            or {})}, key=int)
  head = (fields + ['status', 'steps', 'probe %', 'kNN %'] +
          [f'{s}-shot %' for s in shots] +
          ['final loss', 'img/s', 'chunks', 'wall'])
  lines = [f"Study of `{spec['config']}` over "
           + ', '.join(f'`{f}`' for f in fields) + '.', '']
  lines += [f'> {w}' for w in warnings]
  if warnings:
    lines.append('')
  lines += ['| ' + ' | '.join(head) + ' |',
            '|' + '---|' * len(head)]
  for r in rows:
    fs = r.get('fewshot_probe_accuracy') or {}
    wall = r.get('wall_time_s')
    cells = ([str(r['settings'][f]) for f in fields] + [
        r['status'], str(r.get('steps') or ''),
        _pct(r.get('linear_probe_accuracy')), _pct(r.get('knn_accuracy'))] +
             [_pct(fs.get(s)) for s in shots] + [
                 '' if r.get('final_loss') is None
                 else f"{r['final_loss']:.3f}",
                 '' if r.get('images_per_sec') is None
                 else f"{r['images_per_sec']:.0f}",
                 str(r.get('grad_cache_chunks') or 0)
                 if r.get('global_batch') else '',
                 '' if wall is None else f'{wall / 60:.1f} min'])
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def summary_markdown(spec: dict[str, Any],
                     summary: list[dict[str, Any]]) -> str:
  """The mean ± std table: one row per setting, one column per accuracy."""
  others = [f for f, _ in spec['axes'] if f != SEED]
  keys = sorted({k for g in summary for k in g['metrics']})
  head = others + ['seeds'] + keys
  lines = ['Mean ± standard deviation over seeds (accuracy in %).', '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for g in summary:
    cells = [str(g['settings'][f]) for f in others] + [str(len(g['seeds']))]
    for k in keys:
      m = g['metrics'].get(k)
      cells.append('' if m is None else
                   f"{100 * m['mean']:.2f} ± {100 * m['std']:.2f}")
    lines.append('| ' + ' | '.join(cells) + ' |')
  paired = [(g, p) for g in summary for p in g.get('paired', [])]
  if paired:
    lines += ['', 'Encoder minus baseline, per seed: mean ± standard '
              'deviation of the differences (points); "ahead" or "behind" '
              'when the mean is more than twice the deviation, else "level".',
              '', '| ' + ' | '.join(others + ['accuracy', 'baseline', 'seeds',
                                              'difference', 'verdict']) + ' |',
              '|' + '---|' * (len(others) + 5)]
    for g, p in paired:
      cells = [str(g['settings'][f]) for f in others] + [
          p['metric'], p['baseline'], str(p['n']),
          f"{100 * p['mean']:+.2f} ± {100 * p['std']:.2f}", p['verdict']]
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def compact(spec: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
  """The raw results of a study in a few kB, for docs/results/: every
  point's settings, status, accuracies and wall time, the summary over
  seeds, and what made them (the command, code version and devices)."""
  return {
      'command': command_line(spec),
      'config': _relative_config(spec['config']),
      'axes': spec['axes'], 'overrides': spec['overrides'],
      'mode': spec.get('mode', 'pretrain'), 'warnings': out['warnings'],
      'points': [{k: r.get(k) for k in (
          'settings', 'status', 'accuracies', 'steps', 'wall_time_s',
          'code_version', 'code_starts', 'device')} for r in out['points']],
      'summary': out.get('summary')}


def _relative_config(config: str) -> str:
  """A recipe path inside the working directory, relative to it."""
  path, sep, arg = config.partition(':')
  if os.path.isabs(path) and path.startswith(os.getcwd() + os.sep):
    path = os.path.relpath(path)
  return path + sep + arg


def command_line(spec: dict[str, Any]) -> str:
  """The command that re-makes the study (from the repository root)."""
  parts = ['python -m simclr_jax.study',
           f'--config={_relative_config(spec["config"])}',
           '--workdir=STUDY']
  if spec.get('mode', 'pretrain') != 'pretrain':
    parts.append(f"--mode={spec['mode']}")
  parts += [f'--sweep={f}=' + ','.join(_flag_value(v) for v in values)
            for f, values in spec['axes']]
  parts += spec['overrides']
  if spec.get('max_batch_per_device'):
    parts.append(f"--max_batch_per_device={spec['max_batch_per_device']}")
  return ' '.join(parts)


def _dirty(version: Any) -> bool:
  return str(version).endswith('-dirty')


def unpoolable(rows: list[dict[str, Any]]) -> list[str]:
  """Why the finished points cannot be pooled over seeds, one line a point:
  a start from a tree with uncommitted changes, a run resumed on other code,
  or a commit that differs from the one most points ran (empty when all
  ran one clean commit)."""
  done = [r for r in rows if r.get('status') == 'finished']
  versions = {}
  for r in done:
    versions[r['name']] = (r.get('code_starts') or
                           [r.get('code_version')])
  counts: dict[Any, int] = {}
  for vs in versions.values():
    counts[vs[-1]] = counts.get(vs[-1], 0) + 1
  common = max(counts, key=lambda v: (counts[v], str(v)), default=None)
  out = []
  for name, vs in versions.items():
    if any(_dirty(v) for v in vs):
      out.append(f'{name} started from a tree with uncommitted changes '
                 f'({", ".join(sorted({str(v) for v in vs if _dirty(v)}))})')
    elif len(set(vs)) > 1:
      out.append(f'{name} was resumed on other code ({" then ".join(vs)})')
    elif vs[-1] != common:
      out.append(f'{name} ran {vs[-1]}, the others {common}')
  return out


def paired_differences(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Encoder minus each baseline that read the same images, per seed.

  For every accuracy K of a finished point with a baseline `pixel_K` or
  `random_init_K` ('linear_probe' named 'probe' there) in the same run, the
  differences over the runs of one setting: their mean, sample standard
  deviation and the verdict the docs use: 'ahead' or 'behind' when the mean
  is more than twice the standard deviation away from 0 (at least two
  seeds), else 'level'.
  """
  out = []
  for prefix in ('pixel_', 'random_init_'):
    keys = sorted({k for r in rows for k in (r.get('accuracies') or {})
                   if not k.startswith(('pixel_', 'random_init_'))})
    for key in keys:
      base = prefix + key.replace('linear_probe', 'probe')
      diffs = [r['accuracies'][key] - r['accuracies'][base] for r in rows
               if base in r['accuracies'] and key in r['accuracies']]
      if not diffs:
        continue
      mean = statistics.fmean(diffs)
      std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
      verdict = 'level'
      if len(diffs) > 1 and abs(mean) > 2 * std:
        verdict = 'ahead' if mean > 0 else 'behind'
      out.append({'metric': key, 'baseline': base, 'n': len(diffs),
                  'mean': mean, 'std': std, 'values': diffs,
                  'verdict': verdict})
  return out


def provenance_warnings(rows: list[dict[str, Any]]) -> list[str]:
  """Points made by different code or on different hardware."""
  out = []
  for key, what in (('code_version', 'code versions'),
                    ('device', 'devices')):
    seen = sorted({str(r[key]) for r in rows if r.get(key)})
    if len(seen) > 1:
      out.append(f'These points were made with different {what}: '
                 + '; '.join(seen) + '. Compare them with care.')
  return out


def _plots(spec: dict[str, Any], rows: list[dict[str, Any]],
           workdir: str) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fields = [f for f, _ in spec['axes']]
  done = [r for r in rows if r['status'] == 'finished']
  written = []

  def save(fig, name):
    path = os.path.join(workdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

  if 'batch_size' in fields:
    others = [f for f in fields if f != 'batch_size']
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for metric, ax in zip(('linear_probe_accuracy', 'knn_accuracy'), axes):
      _accuracy_lines(ax, done, metric, 'batch_size', others, 'all')
      ax.set_xlabel('batch size')
      ax.legend(fontsize=7)
    save(fig, 'accuracy_vs_batch.png')
    fig, ax = plt.subplots(figsize=(5, 4))
    pts = sorted((r['settings']['batch_size'], r['images_per_sec'])
                 for r in done if r.get('images_per_sec'))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o')
    ax.set_xscale('log', base=2)
    ax.set_xlabel('batch size')
    ax.set_ylabel('training images / s')
    ax.grid(alpha=0.3)
    save(fig, 'throughput_vs_batch.png')
  if 'num_epochs' in fields:
    save(_length_plot(plt, fields, done), 'accuracy_vs_epochs.png')
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for r in rows:
    label = r['name']
    if r['loss_curve']:
      axes[0].plot(*zip(*r['loss_curve']), label=label)
    hist = r.get('knn_monitor') or []
    if hist:
      axes[1].plot([h['epoch'] for h in hist],
                   [100 * h['knn_accuracy'] for h in hist], 'o-', label=label)
  axes[0].set_xlabel('step')
  axes[0].set_ylabel('training loss')
  axes[1].set_xlabel('epoch')
  axes[1].set_ylabel('kNN monitor top-1 (%)')
  for ax in axes:
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=6)
  save(fig, 'curves.png')
  return written


def _accuracy_lines(ax, done: list[dict[str, Any]], metric: str, x: str,
                    others: list[str], label: str) -> None:
  """`metric` (%) against the setting `x` on a log2 axis, one line per
  combination of the `others` settings (`label` when there are none)."""
  groups: dict[tuple, list] = {}
  for r in done:
    if r.get(metric) is not None:
      key = tuple(r['settings'][f] for f in others)
      groups.setdefault(key, []).append((r['settings'][x], 100 * r[metric]))
  for key, pts in sorted(groups.items(), key=lambda kv: repr(kv[0])):
    pts.sort()
    name = ', '.join(f'{f}={v}' for f, v in zip(others, key)) or label
    ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label=name)
  ax.set_xscale('log', base=2)
  ax.set_ylabel(('linear probe' if metric.startswith('linear')
                 else 'kNN') + ' top-1 (%)')
  ax.grid(alpha=0.3)


def _length_plot(plt, fields: list[str], done: list[dict[str, Any]]):
  """Probe and kNN against pretraining length (a learning curve: each
  point its own run with its own schedule), one line per value of the other
  axes, and the raw pixels' figures of the same runs as horizontal lines."""
  others = [f for f in fields if f not in ('num_epochs', SEED)]
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for (metric, base), ax in zip(
      (('linear_probe_accuracy', 'pixel_probe_accuracy'),
       ('knn_accuracy', 'pixel_knn_accuracy')), axes):
    _accuracy_lines(ax, done, metric, 'num_epochs', others, 'encoder')
    pixels = [100 * r['accuracies'][base] for r in done
              if base in (r.get('accuracies') or {})]
    if pixels:
      ax.axhline(statistics.fmean(pixels), color='grey', ls='--',
                 label='raw pixels')
    lengths = sorted({r['settings']['num_epochs'] for r in done})
    ax.set_xticks(lengths, [f'{e:g}' for e in lengths])
    ax.set_xlabel('pretraining epochs (each its own run and schedule)')
    ax.legend(fontsize=7)
  return fig


def report(workdir: str, allow_mixed_code: bool = False) -> dict[str, Any]:
  """Writes study.json, study.md and the PNG plots; returns study.json.

  Seeds are pooled only when every finished point ran one clean commit
  (`unpoolable`); otherwise StudyError names the points, unless
  allow_mixed_code, when the report pools them and lists them first.
  """
  with open(os.path.join(workdir, SPEC)) as f:
    spec = json.load(f)
  rows = [point_row(workdir, p) for p in spec['points']]
  warnings = provenance_warnings(rows)
  seeded = SEED in [f for f, _ in spec['axes']]
  mixed = unpoolable(rows) if seeded else []
  if mixed and not allow_mixed_code:
    raise StudyError('will not pool seeds made by different or uncommitted '
                     'code: ' + '; '.join(mixed) + '. Re-run those points '
                     'from one clean commit, or pass --allow_mixed_code')
  warnings = [f'Pooled although {m}.' for m in mixed] + warnings
  out = {'config': spec['config'], 'axes': spec['axes'],
         'max_batch_per_device': spec['max_batch_per_device'],
         'warnings': warnings, 'points': rows,
         'counts': {s: sum(r['status'] == s for r in rows) for s in
                    ('finished', 'interrupted', 'started', 'failed',
                     'pending')}}
  if seeded:
    out['summary'] = summarize(spec, rows)
  out['plots'] = [os.path.basename(p) for p in _plots(spec, rows, workdir)]
  _write_json(os.path.join(workdir, 'study.json'), out)
  _write_json(os.path.join(workdir, COMPACT), compact(spec, out))
  with open(os.path.join(workdir, 'study.md'), 'w') as f:
    f.write(markdown(spec, rows, warnings))
    if seeded:
      f.write('\n' + summary_markdown(spec, out['summary']))
  return out


# Command line.


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m simclr_jax.study',
      description=__doc__.split('\n\n')[0].strip(),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', help='Recipe, as for simclr_jax.main.')
  parser.add_argument('--workdir', help='The study directory.')
  parser.add_argument('--sweep', action='append', default=[],
                      help='FIELD=V1,V2,... (repeat for more axes).')
  parser.add_argument('--point', type=int, default=None,
                      help='Run only point K (0-based; array jobs).')
  parser.add_argument('--max_batch_per_device', type=int, default=0,
                      help='Gradient caching for points above this many '
                      'images per device.')
  parser.add_argument('--mode', default='pretrain',
                      help='The main command\'s --mode for every point '
                      '(finetune, distill, ...; with --config.init_from).')
  parser.add_argument('--report', metavar='STUDY_DIR',
                      help='Only write the report of STUDY_DIR.')
  parser.add_argument('--allow_mixed_code', action='store_true',
                      help='Pool seeds even when points ran different '
                      'commits or uncommitted changes (the report lists '
                      'them).')
  parser.add_argument('--plan', action='store_true',
                      help='Write the study spec, list the points, exit '
                      '(before submitting an array job).')
  parser.add_argument('--main_module', default='simclr_jax.main',
                      help=argparse.SUPPRESS)  # Tests substitute a stub.
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith('--config.')]
  try:
    if bad:
      raise StudyError(f'unknown arguments: {" ".join(bad)} (fixed '
                       'settings for every point go as --config.FIELD=VALUE)')
    if args.report:
      out = report(args.report, args.allow_mixed_code)
      print(f"study: report of {len(out['points'])} points in "
            f"{args.report}/study.md", flush=True)
      return 0
    if not args.workdir:
      raise StudyError('--workdir is required')
    spec = load_or_create_spec(args.workdir, args.config, args.sweep,
                               overrides, args.max_batch_per_device,
                               args.mode)
    if args.plan:
      for p in spec['points']:
        print(f"{p['index']}\t{p['name']}")
      return 0
    statuses = run_study(spec, args.workdir, args.point, args.main_module)
  except StudyError as e:
    return entry.print_error(e)
  if args.point is None:
    try:
      out = report(args.workdir, args.allow_mixed_code)
    except StudyError as e:
      return entry.print_error(e)
    print(f"study: {out['counts']['finished']} of {len(out['points'])} "
          f"points finished; report in {args.workdir}/study.md", flush=True)
  return 1 if 'failed' in statuses.values() else 0


def run() -> None:
  sys.exit(main())


if __name__ == '__main__':
  run()
