"""The launchers pass on a failure and a SIGTERM.

Neither cluster is here, so the commands the launchers call are stand-ins,
put first on PATH: `srun`, `scancel` and `scontrol` for
launch/slurm_gpu.sh, `gcloud` for launch/tpu_pod.sh. Each one imitates what
the real tool does in the cases tested, and says what. The training command
is a stand-in too (the launchers' PYTHON): it records how it was started,
exits 3 if it is the process chosen to fail, exits 1 once that one is gone
(as a training process does when it loses a peer), and otherwise waits for
SIGTERM and exits 0, as the train loop does once its checkpoint is saved.
What real training processes do with the SIGTERM (stop together after one
step, with one checkpoint) is tests/test_pod_stop.py's; there one process
gets it, here every process does.

A launcher must exit with a failed process's status, and a SIGTERM to the
launcher must reach every process. A launcher that runs its tool in the
foreground fails the SIGTERM tests: bash runs no trap before its foreground
command ends, so the signal ends the launcher alone and the processes train
on.
"""

import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 3
# Bounds that only keep a broken launcher from hanging the test run.
TIMEOUT_S = 60
# How long a stand-in training process lives if nothing stops it, so that
# none outlives a failed test for long even if its cleanup is cut off.
LIFETIME_S = 120

WORKLOAD = '''#!{python}
"""Stand-in for `python -m simclr_jax.main ...`."""
import json, os, signal, sys, time

markers, fail = {markers!r}, {fail!r}
process_id = [a for a in sys.argv if a.startswith('--process_id=')]
if 'SLURM_PROCID' in os.environ:
  name = 'task' + os.environ['SLURM_PROCID']
elif process_id:  # launch/multiprocess_cpu.sh.
  name = 'process' + process_id[0].split('=', 1)[1]
else:  # A TPU worker: its home tells which.
  name = os.path.basename(os.environ['HOME'])


def stop(signum, frame):
  with open(os.path.join(markers, name + '.stopped'), 'w') as f:
    f.write(str(signum))
  sys.exit(0)


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
info = dict(pid=os.getpid(), argv=sys.argv[1:],
            require_accelerator=os.environ.get(
                'SIMCLR_JAX_REQUIRE_ACCELERATOR'))
with open(os.path.join(markers, name + '.tmp'), 'w') as f:
  json.dump(info, f)
os.replace(os.path.join(markers, name + '.tmp'),
           os.path.join(markers, name + '.started'))
if name == fail:
  sys.exit(3)
deadline = time.monotonic() + {lifetime}
while time.monotonic() < deadline:
  time.sleep(0.05)
  if fail is None or not os.path.exists(os.path.join(markers,
                                                     fail + '.started')):
    continue
  # Once the failed process is gone (or a zombie), end as the training
  # processes do when a peer is lost: exit 1.
  with open(os.path.join(markers, fail + '.started')) as f:
    peer = json.load(f)['pid']
  try:
    with open('/proc/%d/stat' % peer) as f:
      gone = f.read().rsplit(')', 1)[1].split()[0] == 'Z'
  except FileNotFoundError:
    gone = True
  if gone:
    sys.exit(1)
'''

SRUN = '''#!{python}
"""Stand-in for srun inside an sbatch allocation, all on this machine.

Imitates srun(1) and its source (src/srun/libsrun/srun_job.c): one task
per task of the allocation ($SLURM_NTASKS), each with SLURM_PROCID,
SLURM_LOCALID, SLURM_NODEID and SLURM_STEP_ID set and the caller's
environment otherwise (--export=ALL, the default). slurmstepd starts the
tasks on the nodes, apart from srun: here each gets a session of its own,
and the step's pids are registered for scancel. --kill-on-bad-exit=1: a task
that exits non-zero ends the step's other tasks. A SIGTERM to srun itself
makes it SIGKILL every task ("forcing job termination"). Exit status: that
of the task with the highest wait status (exit code, or 128 + signal).
"""
import os, signal, subprocess, sys, time

args = sys.argv[1:]
kill_on_bad_exit = False
while args[0].startswith('-'):
  option = args.pop(0)
  if option not in ('--kill-on-bad-exit=1', '--kill-on-bad-exit', '-K'):
    sys.exit('srun stand-in: unsupported option ' + option)
  kill_on_bad_exit = True
job_dir = os.path.join({state!r}, os.environ['SLURM_JOB_ID'])
os.makedirs(job_dir, exist_ok=True)
tasks = []
for i in range(int(os.environ['SLURM_NTASKS'])):
  env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
             SLURM_NODEID='0', SLURM_STEP_ID='0', SLURM_STEPID='0')
  tasks.append(subprocess.Popen(args, env=env, start_new_session=True))
with open(os.path.join(job_dir, 'tmp'), 'w') as f:
  f.write(' '.join(str(t.pid) for t in tasks))
os.replace(os.path.join(job_dir, 'tmp'), os.path.join(job_dir, 'step0.pids'))


def kill_tasks():
  for t in tasks:
    if t.poll() is None:
      t.kill()


def on_term(signum, frame):
  print('srun: forcing job termination', file=sys.stderr)
  kill_tasks()


signal.signal(signal.SIGTERM, on_term)
statuses = {{}}
while len(statuses) < len(tasks):
  for i, t in enumerate(tasks):
    if i not in statuses and t.poll() is not None:
      # As a wait status: exit code << 8, or the signal number.
      statuses[i] = t.returncode << 8 if t.returncode >= 0 else -t.returncode
      if statuses[i] and kill_on_bad_exit:
        kill_tasks()
  time.sleep(0.02)
highest = max(statuses.values())
sys.exit(highest >> 8 or (128 + highest if highest else 0))
'''

SCANCEL = '''#!{python}
"""Stand-in for `scancel --signal=SIG JOBID`.

Imitates scancel(1): the signal goes to the tasks of the job's steps; a
signal other than SIGKILL is not sent to the batch step (the batch script
and srun in it) unless --batch is given.
"""
import glob, os, signal, sys

options = [a for a in sys.argv[1:] if a.startswith('-')]
jobs = [a for a in sys.argv[1:] if not a.startswith('-')]
if len(options) != 1 or not options[0].startswith('--signal=') or (
    len(jobs) != 1):
  sys.exit('scancel stand-in: only `scancel --signal=SIG JOBID`')
name = options[0].split('=', 1)[1]
signum = int(name) if name.isdigit() else getattr(
    signal, name if name.startswith('SIG') else 'SIG' + name)
for path in glob.glob(os.path.join({state!r}, jobs[0], '*.pids')):
  for pid in open(path).read().split():
    try:
      os.kill(int(pid), signum)
    except ProcessLookupError:
      pass
'''

SCONTROL = '''#!{python}
"""Stand-in for `scontrol show hostnames LIST`, for a list without ranges."""
import sys

if sys.argv[1:3] != ['show', 'hostnames']:
  sys.exit('scontrol stand-in: only `scontrol show hostnames LIST`')
print('\\n'.join(sys.argv[3].split(',')))
'''

GCLOUD = '''#!{python}
"""Stand-in for `gcloud compute tpus tpu-vm ssh TPU --zone=ZONE
--worker=all --command=CMD` on a slice whose hosts are all this machine.

Imitates gcloud's tpu-vm ssh (command_lib/compute/tpus/tpu_vm/ssh_utils.py)
and ssh: CMD runs on every worker at once, through the login shell sshd
starts (bash -c CMD), in that host's environment, not the caller's: each
worker has a home and a /tmp of its own ($TMPDIR here). gcloud waits for
every worker and exits with the first non-zero status in worker order. A
SIGTERM ends gcloud and nothing else: with --worker=all its ssh clients run
in threads, without its signal handler, and a remote command started without
a terminal gets no SIGHUP when its session closes. So the remote commands
run in sessions of their own, apart from gcloud.

While a file `hold` is in the hosts folder, the first call stays connecting
(after writing `connecting` there) until the file is removed.
"""
import os, subprocess, sys, time

args = sys.argv[1:]
if args[:4] != ['compute', 'tpus', 'tpu-vm', 'ssh'] or (
    '--worker=all' not in args):
  sys.exit('gcloud stand-in: only `gcloud compute tpus tpu-vm ssh TPU '
           '--worker=all --command=CMD`')
command = [a for a in args if a.startswith('--command=')][0]
command = command[len('--command='):]
hosts = {hosts!r}
try:
  os.close(os.open(os.path.join(hosts, 'first_call'),
                   os.O_CREAT | os.O_EXCL | os.O_WRONLY))
  first = True
except FileExistsError:
  first = False
if first and os.path.exists(os.path.join(hosts, 'hold')):
  open(os.path.join(hosts, 'connecting'), 'w').close()
  while os.path.exists(os.path.join(hosts, 'hold')):
    time.sleep(0.02)
workers = []
for i in range({workers}):
  home = os.path.join(hosts, 'worker%d' % i)
  os.makedirs(os.path.join(home, 'tmp'), exist_ok=True)
  env = dict(PATH='/usr/local/bin:/usr/bin:/bin', HOME=home,
             TMPDIR=os.path.join(home, 'tmp'))
  workers.append(subprocess.Popen(['bash', '-c', command], cwd=home, env=env,
                                  start_new_session=True))
# ssh's own status is 255 when the remote command dies of a signal.
statuses = [w.wait() for w in workers]
sys.exit(next((s if s > 0 else 255 for s in statuses if s), 0))
'''


def _write_script(path: str, text: str) -> None:
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, 0o755)


class _Cluster:
  """Stand-in tools and training command in `tmp_path`, and the launcher
  started with them; `close` kills whatever of it is left."""

  def __init__(self, tmp_path: pathlib.Path, fail: str | None = None):
    self.markers = str(tmp_path / 'markers')
    self.state = str(tmp_path / 'slurm_state')
    self.hosts = str(tmp_path / 'hosts')
    self.bin = str(tmp_path / 'bin')
    self.log = str(tmp_path / 'launcher.log')
    for d in (self.markers, self.state, self.hosts, self.bin):
      os.makedirs(d)
    fields = dict(python=sys.executable, markers=self.markers, fail=fail,
                  lifetime=LIFETIME_S, state=self.state, hosts=self.hosts,
                  workers=PROCESSES)
    self.workload = os.path.join(str(tmp_path), 'workload')
    _write_script(self.workload, WORKLOAD.format(**fields))
    for name, text in (('srun', SRUN), ('scancel', SCANCEL),
                       ('scontrol', SCONTROL), ('gcloud', GCLOUD)):
      _write_script(os.path.join(self.bin, name), text.format(**fields))
    self.launcher = None

  def start(self, script: str, env: dict, *args: str) -> None:
    """Starts launch/`script` in a process group of its own."""
    base = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
    base.update(PATH=self.bin + os.pathsep + os.environ['PATH'],
                PYTHON=self.workload, **env)
    with open(self.log, 'w') as log:
      self.launcher = subprocess.Popen(
          ['bash', os.path.join(ROOT, 'launch', script), *args], env=base,
          cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
          start_new_session=True)

  def output(self) -> str:
    """The end of the launcher's output, for failure messages."""
    with open(self.log, errors='replace') as f:
      return f.read()[-3000:]

  def started(self) -> dict[str, dict]:
    """What each process that has started recorded, by name."""
    out = {}
    for name in os.listdir(self.markers):
      if name.endswith('.started'):
        with open(os.path.join(self.markers, name)) as f:
          out[name[:-len('.started')]] = json.load(f)
    return out

  def stopped(self) -> dict[str, int]:
    """The signal each stopped process received, by name."""
    out = {}
    for name in os.listdir(self.markers):
      if name.endswith('.stopped'):
        with open(os.path.join(self.markers, name)) as f:
          out[name[:-len('.stopped')]] = int(f.read())
    return out

  def wait_until_running(
      self, ready: Callable[[], bool] = lambda: True) -> None:
    """Waits until every process has started and `ready()` holds."""
    self.wait_for(lambda: len(self.started()) == PROCESSES and ready())

  def wait_for(self, done: Callable[[], bool]) -> None:
    """Waits until `done()` holds while the launcher runs."""
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
      assert self.launcher.poll() is None, self.output()
      assert time.monotonic() < deadline, self.output()
      time.sleep(0.02)

  def wait(self) -> int:
    """The launcher's exit status."""
    try:
      return self.launcher.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      raise AssertionError('the launcher did not end:\n' + self.output())

  def close(self) -> None:
    """Kills the launcher's process group and every training process (each
    leads a session of its own, as on a cluster), started or starting."""
    groups = [info['pid'] for info in self.started().values()]
    for path in (glob.glob(os.path.join(self.state, '*', '*.pids')) +
                 glob.glob(os.path.join(self.hosts, '*', 'tmp', '*.pid'))):
      with open(path) as f:
        groups += [int(pid) for pid in f.read().split()]
    if self.launcher is not None:
      groups.append(self.launcher.pid)
    for pgid in groups:
      try:
        os.killpg(pgid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    if self.launcher is not None:
      self.launcher.wait()


# --- Slurm: launch/slurm_gpu.sh ---------------------------------------------

JOB_ID = 4242


def _start_slurm(cluster: _Cluster, tmp_path: pathlib.Path) -> None:
  # What sbatch puts in the batch script's environment.
  env = dict(SLURM_JOB_ID=str(JOB_ID), SLURM_NTASKS=str(PROCESSES),
             SLURM_JOB_NUM_NODES='1', SLURM_JOB_NODELIST='localhost')
  cluster.start('slurm_gpu.sh', env, 'configs/digits.py',
                str(tmp_path / 'run'), '--config.batch_size=48')


def _check_slurm_commands(started: dict[str, dict],
                          tmp_path: pathlib.Path) -> None:
  """Each task runs the one command, with its own --process_id."""
  port = 20000 + JOB_ID % 20000
  for name, info in started.items():
    assert info['argv'][:2] == ['-m', 'simclr_jax.main'], info
    assert info['argv'][2:] == [
        '--config=configs/digits.py', f'--workdir={tmp_path / "run"}',
        f'--coordinator_address=localhost:{port}',
        f'--num_processes={PROCESSES}', '--config.batch_size=48',
        f'--process_id={name[len("task"):]}'], info
    assert info['require_accelerator'] == '1', info


def test_slurm_launcher_exits_with_a_failed_tasks_status(tmp_path):
  cluster = _Cluster(tmp_path, fail='task1')
  try:
    _start_slurm(cluster, tmp_path)
    assert cluster.wait() == 3, cluster.output()
    # srun may have ended the others before they started.
    assert 'task1' in cluster.started()
    _check_slurm_commands(cluster.started(), tmp_path)
  finally:
    cluster.close()


def test_slurm_launcher_passes_sigterm_to_every_task(tmp_path):
  cluster = _Cluster(tmp_path)
  try:
    _start_slurm(cluster, tmp_path)
    # Every task started and registered with its step, where scancel finds it.
    cluster.wait_until_running(lambda: os.path.exists(
        os.path.join(cluster.state, str(JOB_ID), 'step0.pids')))
    cluster.launcher.send_signal(signal.SIGTERM)  # The batch script alone.
    # Each task stopped on SIGTERM, not srun's SIGKILL, so srun exits 0.
    assert cluster.wait() == 0, cluster.output()
    assert cluster.stopped() == {
        f'task{i}': signal.SIGTERM for i in range(PROCESSES)}, cluster.output()
    assert sorted(cluster.started()) == [f'task{i}' for i in range(PROCESSES)]
    _check_slurm_commands(cluster.started(), tmp_path)
  finally:
    cluster.close()


# --- Cloud TPU: launch/tpu_pod.sh -------------------------------------------

def _start_tpu(cluster: _Cluster) -> None:
  env = dict(TPU='my-pod', ZONE='us-central2-b', BUCKET='gs://bucket',
             REPO_DIR=ROOT)
  cluster.start('tpu_pod.sh', env, 'configs/digits.py', 'run',
                '--config.batch_size=48')


def _check_tpu_commands(started: dict[str, dict]) -> None:
  """Every worker runs the one command; JAX finds the topology itself."""
  assert sorted(started) == [f'worker{i}' for i in range(PROCESSES)], started
  for info in started.values():
    assert info['argv'] == [
        '-m', 'simclr_jax.main', '--config=configs/digits.py',
        '--workdir=gs://bucket/run',
        '--config.dataset.data_dir=gs://bucket/tensorflow_datasets',
        '--distributed', '--config.batch_size=48'], info
    assert info['require_accelerator'] == '1', info


def test_tpu_launcher_exits_with_a_failed_workers_status(tmp_path):
  # Worker 0, whose status gcloud reports first; the others exit 1.
  cluster = _Cluster(tmp_path, fail='worker0')
  try:
    _start_tpu(cluster)
    assert cluster.wait() == 3, cluster.output()
    _check_tpu_commands(cluster.started())
  finally:
    cluster.close()


def test_tpu_launcher_passes_sigterm_to_every_worker(tmp_path):
  cluster = _Cluster(tmp_path)
  try:
    _start_tpu(cluster)
    cluster.wait_until_running()
    cluster.launcher.send_signal(signal.SIGTERM)  # The launcher alone.
    assert cluster.wait() == 0, cluster.output()
    assert cluster.stopped() == {
        f'worker{i}': signal.SIGTERM for i in range(PROCESSES)}, (
            cluster.output())
    _check_tpu_commands(cluster.started())
  finally:
    cluster.close()


def test_tpu_launcher_stops_workers_that_start_after_the_sigterm(tmp_path):
  """A SIGTERM while the ssh sessions still connect: the stop command finds
  no process yet, so it leaves a stop file that each host then obeys."""
  cluster = _Cluster(tmp_path)
  hold = os.path.join(cluster.hosts, 'hold')
  open(hold, 'w').close()
  try:
    _start_tpu(cluster)
    cluster.wait_for(lambda: os.path.exists(
        os.path.join(cluster.hosts, 'connecting')))
    cluster.launcher.send_signal(signal.SIGTERM)
    stop_files = os.path.join(cluster.hosts, 'worker*', 'tmp', '*.stop')
    cluster.wait_for(lambda: len(glob.glob(stop_files)) == PROCESSES)
    os.remove(hold)  # The sessions connect now.
    assert cluster.wait() == 128 + signal.SIGTERM, cluster.output()
    assert not cluster.started()
  finally:
    cluster.close()


# --- One machine: launch/multiprocess_cpu.sh ---------------------------------

def test_multiprocess_cpu_launcher_passes_sigterm_and_exits_0(tmp_path):
  # The script runs the training command itself (no cluster tool); a
  # SIGTERM arrives while it waits for process 0, whose own exit status (0)
  # is the one to report, not the interrupted wait's 143.
  cluster = _Cluster(tmp_path)
  try:
    cluster.start('multiprocess_cpu.sh',
                  dict(NUM_PROCESSES=str(PROCESSES), PORT='12345'),
                  'configs/digits.py', str(tmp_path / 'run'))
    cluster.wait_until_running()
    cluster.launcher.send_signal(signal.SIGTERM)  # The launcher alone.
    assert cluster.wait() == 0, cluster.output()
    assert cluster.stopped() == {
        f'process{i}': signal.SIGTERM for i in range(PROCESSES)}, (
            cluster.output())
  finally:
    cluster.close()
