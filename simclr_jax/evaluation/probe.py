"""Linear and few-shot logistic-regression probes on frozen features.

The reference's linear evaluation trains a linear head with SGD for 90-100
epochs (Chen et al. 2020a, App. B.6); that is the `linear_eval` mode. The
pretraining job needs a read-out that takes seconds, so it fits an
L2-regularised multinomial logistic regression with full-batch L-BFGS on
precomputed features instead, as the SimCLR paper does for its transfer
linear evaluation (appendix B.8). The few-shot variant fits the same probe on
a handful of labels per class, which is where pretraining shows on small
datasets whose all-label probe is near its ceiling even at random init
(docs/benchmarks.md#the-main-job-on-digits).

The fit runs on the devices, in float32, with the training features sharded
over the mesh's 'data' axis: ImageNet's 1.28M x 2048 features are 10 GB as
float32, too much to fit in float64 on one host in reasonable time and too
much for one device. The objective is a weighted mean over rows, so under jit
XLA reduces it across the devices itself; padding rows (which make the shards
equal) and rows held out for validation get weight 0. Because nothing in it
depends on the order of the rows, the features may also come spread over the
hosts (features.ShardedFeatures): the global array is then built from each
host's own rows, and a row's weight is looked up by its index in the split.
The result differs from the whole-array fit only by the order of the
floating-point sums.

The objective is scikit-learn's LogisticRegression(C) exactly: mean
cross-entropy + ||W||^2 / (2 C n), intercept unpenalised, on features
standardised with the statistics of the rows being fitted. The all-label
probe picks C from C_GRID by cross-entropy on a seeded, stratified 20% of
the training split held out from a fit on the other 80%, then refits on all
of it; the test split is never looked at before the final prediction.
"""

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np
import optax
import optax.tree_utils as otu

from simclr_jax.data.sampling import fewshot_indices
from simclr_jax.data.sampling import stratified_fraction
from simclr_jax.evaluation import features as features_lib
from simclr_jax.runtime import parallel
from simclr_jax.runtime.parallel import DATA_AXIS

# Inverse L2 strength of the few-shot probes, and the centre of the all-label
# probe's grid. The SimCLR paper sweeps 45 values of C per dataset on a
# validation split. On standardised digits features (raw pixels and 512-d
# random ReLU features) test accuracy was flat, within about one point, for C
# in [0.1, 1] for the all-label and the 1/5/10-shot probes, and fell off from
# 0.01 down. 0.1 takes the more regularised end of that plateau because
# few-shot fits have far fewer examples than feature dimensions (10 vs 2048
# for 1-shot CIFAR-10 on ResNet-50), and L-BFGS converges faster there.
DEFAULT_C = 0.1
# C values the all-label probe starts from on held-out training rows: the
# plateau above and half a decade either side of it. When the best value is
# at an end of the grid, the grid grows by one more step at that end (the
# same ratio as its two outermost values), up to C_RANGE, so the choice is
# never a value at the grid's edge unless it is at C_RANGE's (Fashion-
# MNIST's 60,000 x 784 raw pixels choose 0.01 with 0.0033 fitted below it,
# 84.7% on the test split). Each value costs one fit, warm-started from its
# neighbour's.
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
C_RANGE = (1e-5, 1e4)
# Share of every class held out of the training split to choose C.
VALIDATION_FRACTION = 0.2
# L-BFGS stops when the largest gradient entry of the (mean) objective is
# below _TOL, scikit-learn's default gtol for the same objective, or after
# _MAX_ITER iterations, or when an iteration no longer lowers the objective
# (float32 has no more to give there).
_TOL = 1e-4
_MAX_ITER = 1000
# float32 standard deviations below this share of the mean are rounding noise
# of a constant feature; such features are left unscaled (as StandardScaler
# does), instead of being blown up to unit variance.
_CONSTANT_RTOL = 10 * float(np.finfo(np.float32).eps)


@dataclasses.dataclass(frozen=True)
class ProbeFit:
  """A fitted probe: what it needs to predict, and the C it was fitted with.

  Attributes:
    mean: (d,) feature means of the rows it was fitted on.
    scale: (d,) their standard deviations (1 for constant features).
    weights: (d, k) weights on standardised features.
    bias: (k,) intercepts.
    classes: (k,) the training labels that column j of the logits stands for.
    c: inverse L2 strength used for the fit.
  """
  mean: jax.Array
  scale: jax.Array
  weights: jax.Array
  bias: jax.Array
  classes: np.ndarray
  c: float


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
  # HIGHEST: the default float32 matmul on TPU (bf16 passes) and GPU (TF32)
  # keeps ~3 significant digits, too few for L-BFGS curvature pairs and the
  # gradient tolerance; the probe's matmuls are cheap next to pretraining.
  return jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)


def _standardizer(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weighted mean and standard deviation of the rows of x (two passes)."""
  total = jnp.sum(w)
  mean = jnp.sum(w[:, None] * x, axis=0) / total
  var = jnp.sum(w[:, None] * jnp.square(x - mean), axis=0) / total
  std = jnp.sqrt(var)
  constant = std <= _CONSTANT_RTOL * jnp.abs(mean)
  return mean, jnp.where(constant, 1.0, std)


def _logits(params: tuple[jax.Array, jax.Array], x: jax.Array) -> jax.Array:
  weights, bias = params
  return _dot(x, weights) + bias


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_iter'))
def _fit(x: jax.Array, y: jax.Array, w: jax.Array, c: jax.Array,
         init: tuple[jax.Array, jax.Array] | None = None, *,
         num_classes: int, max_iter: int = _MAX_ITER):
  """L-BFGS fit on the rows of weight 1; returns (mean, scale, W, b).

  x (n, d) and y, w (n,) may be sharded row-wise; the outputs are small and
  replicated. Rows of weight 0 (padding, held-out rows) take no part in the
  statistics or the loss, so they cannot change the fit. `init` (W, b)
  starts L-BFGS from a neighbouring fit's solution instead of zeros: the
  objective is strictly convex, so only the number of iterations changes
  (on 60,000 x 784 pixels a fit from zeros takes 25 to 50 s on 2 cores).
  """
  x = x.astype(jnp.float32)
  mean, scale = _standardizer(x, w)
  z = (x - mean) / scale
  total = jnp.sum(w)
  l2 = 1.0 / (c * total)
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)

  def objective(params):
    log_p = jax.nn.log_softmax(_logits(params, z))
    nll = -jnp.sum(w * jnp.sum(onehot * log_p, axis=-1)) / total
    return nll + 0.5 * l2 * jnp.sum(jnp.square(params[0]))

  params = ((jnp.zeros((x.shape[1], num_classes), jnp.float32),
             jnp.zeros((num_classes,), jnp.float32)) if init is None else
            init)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state, _ = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                value_fn=objective)
    return optax.apply_updates(params, updates), state, value

  def running(carry):
    _, state, previous = carry
    count = otu.tree_get(state, 'count')
    grad = otu.tree_get(state, 'grad')
    largest = jnp.maximum(jnp.max(jnp.abs(grad[0])), jnp.max(jnp.abs(grad[1])))
    improving = otu.tree_get(state, 'value') < previous
    return (count == 0) | ((count < max_iter) & (largest > _TOL) & improving)

  carry = (params, opt.init(params), jnp.float32(jnp.inf))
  (weights, bias), _, _ = jax.lax.while_loop(running, step, carry)
  return mean, scale, weights, bias


@jax.jit
def _scores(mean: jax.Array, scale: jax.Array, weights: jax.Array,
            bias: jax.Array, x: jax.Array, y: jax.Array,
            w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(correct predictions, summed cross-entropy) over the rows of weight 1.

  A label of -1 (a class the fit never saw) is never correct and adds no
  cross-entropy; it only occurs in test rows, where only the count is used.
  """
  z = (x.astype(jnp.float32) - mean) / scale
  logits = _logits((weights, bias), z)
  correct = jnp.sum(w * (jnp.argmax(logits, axis=-1) == y))
  onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.float32)
  nll = -jnp.sum(w * jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))
  return correct, nll


Features = np.ndarray | features_lib.ShardedFeatures


def _sharded(x: Features) -> bool:
  return isinstance(x, features_lib.ShardedFeatures)


def _check_xy(x: Features, y: np.ndarray, name: str
              ) -> tuple[Features, np.ndarray]:
  if not _sharded(x):
    x = np.asarray(x, np.float32)
  y = np.asarray(y)
  if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
    raise ValueError(f'{name}: need features (n, d) and labels (n,), got '
                     f'{x.shape} and {y.shape}')
  return x, y


def _mesh_or_default(mesh: Mesh | None) -> Mesh:
  mesh = parallel.make_mesh() if mesh is None else mesh
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f'mesh needs a {DATA_AXIS!r} axis, got '
                     f'{mesh.axis_names}')
  return mesh


class _Rows:
  """(features, labels) padded to equal shards and placed on the mesh.

  Put there once and reused by every fit or prediction on them, so the
  features cross from the host once. Whole features are padded at the end;
  ShardedFeatures are assembled from every process's own rows, in their
  order. `index` is the split row of each of this process's rows (-1 for
  padding), which is how weights find their rows either way.
  """

  def __init__(self, x: Features, y: np.ndarray, mesh: Mesh,
               rows: int | None = None):
    self.n = x.shape[0]
    self.mesh = mesh
    y = np.asarray(y, np.int32)
    if _sharded(x):
      self._sharded = x
      self.index = x.index
      self.x = x.on_mesh(mesh)
      self.y = self._put(np.where(self.index >= 0,
                                  y[np.maximum(self.index, 0)], 0))
    else:
      shards = mesh.shape[DATA_AXIS]
      self._sharded = None
      self.rows = -(-max(self.n, rows or 0) // shards) * shards
      self.index = np.where(np.arange(self.rows) < self.n,
                            np.arange(self.rows), -1)
      self.x = self._put(x)
      self.y = self._put(y)

  def _put(self, values: np.ndarray) -> jax.Array:
    """Per-row values (one per row of `index`) on the mesh like x."""
    if self._sharded is not None:
      return self._sharded.on_mesh(self.mesh, values)
    padded, _ = features_lib.pad_rows(values, self.rows)
    return features_lib.on_mesh(padded, self.mesh, P(DATA_AXIS))

  def weights(self, rows: np.ndarray | None = None) -> jax.Array:
    """Weight 1 on the given real rows (all real rows by default), else 0."""
    if rows is None:
      w = self.index >= 0
    else:
      w = np.zeros(self.n, bool)
      w[rows] = True
      w = (self.index >= 0) & w[np.maximum(self.index, 0)]
    return self._put(w.astype(np.float32))


def _replicated_float(x: jax.Array) -> float:
  # Replicated: every process has the whole value locally.
  return float(np.asarray(x.addressable_data(0)))


def _fit_rows(data: _Rows, num_classes: int, w: jax.Array, c: float,
              init: tuple[jax.Array, jax.Array] | None = None
              ) -> tuple[jax.Array, ...]:
  return _fit(data.x, data.y, w, jnp.float32(c), init,
              num_classes=num_classes)


def _best(grid: Sequence[float], losses: dict[float, float]) -> float:
  """The C of `grid` with the lowest held-out loss; exact ties go to the C
  closest to DEFAULT_C on a log scale, then to the smaller C."""
  return min(grid, key=lambda c: (losses[c], abs(math.log(c / DEFAULT_C)), c))


def _grown(grid: list[float], losses: dict[float, float],
           c_range: tuple[float, float]) -> float | None:
  """The C to add when the best of `grid` is at one of its ends, else None.

  The new value is one more step of the grid's ratio at that end; none is
  added past c_range (the choice then stays at the range's edge).
  """
  best = _best(grid, losses)
  if len(grid) < 2 or best not in (grid[0], grid[-1]):
    return None
  if best == grid[0]:
    c = grid[0] * grid[0] / grid[1]
    return c if c >= c_range[0] * (1 - 1e-6) else None
  c = grid[-1] * grid[-1] / grid[-2]
  return c if c <= c_range[1] * (1 + 1e-6) else None


def _choose_c(data: _Rows, y: np.ndarray, num_classes: int,
              c_grid: Sequence[float], seed: int,
              c_range: tuple[float, float] = C_RANGE
              ) -> tuple[float, tuple[jax.Array, jax.Array]]:
  """The C with the lowest cross-entropy on held-out train rows, and its fit.

  A seeded, stratified VALIDATION_FRACTION of the training rows is held out;
  every C is fitted on the rest, in increasing order, each fit starting from
  the previous one's solution, until the held-out loss rises. While the best
  C is at an end of the values fitted, the grid grows at that end
  (`_grown`). The criterion is the held-out cross-entropy, not accuracy: on
  a few hundred held-out rows (digits) accuracy moves in steps of one
  example and neighbouring C values tie or swap by noise, while the
  cross-entropy varies smoothly with C (ties: `_best`).
  """
  held = stratified_fraction(y, VALIDATION_FRACTION, seed)
  kept = np.setdiff1d(np.arange(data.n), held)
  fit_w, held_w = data.weights(kept), data.weights(held)
  losses, solutions = {}, {}

  def fit(c: float, init) -> None:
    mean, scale, weights, bias = _fit_rows(data, num_classes, fit_w, c, init)
    solutions[c] = (weights, bias)
    losses[c] = _replicated_float(
        _scores(mean, scale, weights, bias, data.x, data.y, held_w)[1])

  grid = sorted(float(c) for c in c_grid)
  for i, c in enumerate(grid):
    fit(c, solutions[grid[i - 1]] if i else None)
    if i and losses[c] > losses[grid[i - 1]]:
      # Past the minimum: larger C only fits slower and scores worse (the
      # held-out cross-entropy is smooth in log C).
      grid = grid[:i + 1]
      break
  while (c := _grown(grid, losses, c_range)) is not None:
    fit(c, solutions[grid[0] if c < grid[0] else grid[-1]])
    grid = sorted(grid + [c])
  best = _best(grid, losses)
  return best, solutions[best]


def fit_probe(train_x: Features, train_y: np.ndarray, *,
              c_grid: Sequence[float] = C_GRID, seed: int = 0,
              mesh: Mesh | None = None, rows: int | None = None,
              c_range: tuple[float, float] = C_RANGE) -> ProbeFit:
  """Fits the probe on training data only, choosing C on held-out rows.

  Args:
    train_x: (n, d) frozen features, whole or ShardedFeatures.
    train_y: (n,) integer labels, at least two classes, the same on every
      process.
    c_grid: inverse L2 strengths to start the choice from (grown at an end
      while the best is there, within c_range); with one value it is used
      directly and nothing is held out.
    seed: seed of the held-out split.
    mesh: mesh whose 'data' axis the features are sharded over (default:
      all devices).
    rows: pad to at least this many rows, so fits of different sizes share
      one compilation.
    c_range: the smallest and largest C the grid may grow to.

  Returns:
    The ProbeFit refitted on all of train_x with the chosen C.
  """
  train_x, train_y = _check_xy(train_x, train_y, 'train')
  classes, y = np.unique(train_y, return_inverse=True)
  if classes.size < 2:
    raise ValueError('the probe needs at least two classes in train_y')
  if not c_grid or any(not c > 0 for c in c_grid):
    raise ValueError(f'c_grid needs positive values, got {tuple(c_grid)}')
  data = _Rows(train_x, y, _mesh_or_default(mesh), rows)
  c, init = float(c_grid[0]), None
  if len(c_grid) > 1:
    c, init = _choose_c(data, y, classes.size, tuple(c_grid), seed, c_range)
  mean, scale, weights, bias = _fit_rows(data, classes.size, data.weights(),
                                         c, init)
  return ProbeFit(mean, scale, weights, bias, classes, c)


def _test_rows(test_x: Features, test_y: np.ndarray, classes: np.ndarray,
               mesh: Mesh) -> _Rows:
  """Test rows on the mesh, labels as column indices of the fit.

  A test label the training split never had can never be predicted; it gets
  index -1, which no argmax equals.
  """
  pos = np.clip(np.searchsorted(classes, test_y), 0, classes.size - 1)
  y = np.where(classes[pos] == test_y, pos, -1)
  return _Rows(test_x, y, mesh)


def _accuracy(fitted: ProbeFit, test: _Rows) -> float:
  if test.n == 0:
    return float('nan')
  correct, _ = _scores(fitted.mean, fitted.scale, fitted.weights,
                       fitted.bias, test.x, test.y, test.weights())
  return _replicated_float(correct) / test.n


def linear_probe(train_x: Features, train_y: np.ndarray,
                 test_x: Features, test_y: np.ndarray, *, seed: int = 0,
                 c_grid: Sequence[float] = C_GRID,
                 mesh: Mesh | None = None) -> tuple[float, float]:
  """(test accuracy, chosen C) of the probe fitted on the train split; the
  arguments are linear_probe_accuracy's."""
  test_x, test_y = _check_xy(test_x, test_y, 'test')
  mesh = _mesh_or_default(mesh)
  fitted = fit_probe(train_x, train_y, c_grid=c_grid, seed=seed, mesh=mesh)
  return (_accuracy(fitted, _test_rows(test_x, test_y, fitted.classes, mesh)),
          fitted.c)


def linear_probe_accuracy(train_x: Features, train_y: np.ndarray,
                          test_x: Features, test_y: np.ndarray, *,
                          seed: int = 0, c_grid: Sequence[float] = C_GRID,
                          mesh: Mesh | None = None) -> float:
  """Test accuracy of a logistic-regression probe fitted on the train split.

  Args:
    train_x: (n_train, d) frozen features, whole or ShardedFeatures.
    train_y: (n_train,) integer labels.
    test_x: (n_test, d) frozen features, whole or ShardedFeatures.
    test_y: (n_test,) integer labels.
    seed: seed of the held-out rows that choose C (see fit_probe).
    c_grid: inverse L2 strengths to choose from (see C_GRID).
    mesh: mesh whose 'data' axis the features are sharded over (default:
      all devices).

  Returns:
    Fraction of test examples classified correctly.
  """
  return linear_probe(train_x, train_y, test_x, test_y, seed=seed,
                      c_grid=c_grid, mesh=mesh)[0]


def fewshot_probe_accuracy(train_x: Features, train_y: np.ndarray,
                           test_x: Features, test_y: np.ndarray,
                           shots: Sequence[int] = (1, 5, 10),
                           draws: int = 10, seed: int = 0, *,
                           c: float = DEFAULT_C,
                           mesh: Mesh | None = None) -> dict[str, float]:
  """Mean test accuracy of the probe fitted on `shots` labels per class.

  For each shot count, draw d (d = 0..draws-1) takes fewshot_indices with
  seed + d and fits the probe (standardisation included) on those examples
  only; the value is the mean over draws. Averaging over draws matters: a
  single 1-shot draw swings by several points.

  C is fixed rather than chosen: a 1-shot draw has nothing to hold out, and
  choosing on labels outside the draw would use more labels than the
  protocol grants.

  Args:
    train_x: (n_train, d) features to draw the labelled examples from,
      whole or ShardedFeatures (the drawn rows, a few per class, are then
      fetched to every host).
    train_y: (n_train,) integer labels.
    test_x: (n_test, d) features, whole or ShardedFeatures.
    test_y: (n_test,) integer labels.
    shots: labelled examples per class, one result per value.
    draws: seeded draws averaged per shot count.
    seed: seed of draw 0.
    c: inverse L2 regularisation strength (see DEFAULT_C).
    mesh: mesh whose 'data' axis the features are sharded over (default:
      all devices).

  Returns:
    {str(shot): mean accuracy}, e.g. {'1': 0.41, '5': 0.73, '10': 0.82}.
  """
  train_x, train_y = _check_xy(train_x, train_y, 'train')
  test_x, test_y = _check_xy(test_x, test_y, 'test')
  if draws < 1:
    raise ValueError(f'draws must be >= 1, got {draws}')
  mesh = _mesh_or_default(mesh)
  classes = np.unique(train_y)
  # Every draw padded to the largest one: one compilation for all fits.
  rows = max(shots, default=0) * classes.size
  test = _test_rows(test_x, test_y, classes, mesh)
  results = {}
  for shot in shots:
    accuracies = []
    for d in range(draws):
      idx = fewshot_indices(train_y, shot, seed + d)
      drawn = (train_x.take(idx, mesh) if _sharded(train_x) else
               train_x[idx])
      fitted = fit_probe(drawn, train_y[idx], c_grid=(c,), mesh=mesh,
                         rows=rows)
      accuracies.append(_accuracy(fitted, test))
    results[str(shot)] = float(np.mean(accuracies))
  return results
