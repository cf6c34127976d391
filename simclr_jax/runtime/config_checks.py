"""ConfigError and the one-line field checks every config check uses.

It lives below both config/ (the whole-config validation) and methods/ (each
method validates its own section), so the two raise the same error with the
same wording: `config.<field>=<value> is invalid: <rule>` or `... is not
supported; choose one of ...`.
"""

from typing import Any, Iterable


class ConfigError(ValueError):
  """A config value that cannot work; the message is one line."""


def choice(field: str, value: Any, allowed: Iterable[Any]) -> None:
  allowed = tuple(allowed)
  if value not in allowed:
    raise ConfigError(f'config.{field}={value!r} is not supported; choose one '
                      f'of {", ".join(map(str, allowed))}')


def positive(field: str, value: Any, allow_zero: bool = False) -> None:
  ok = value >= 0 if allow_zero else value > 0  # NaN fails both.
  if not ok:
    bound = '>= 0' if allow_zero else '> 0'
    raise ConfigError(f'config.{field}={value!r} is invalid: must be {bound}')


def integer(field: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f'config.{field}={value!r} is invalid: must be an '
                      f'integer >= {minimum}')


def unit_interval(field: str, value: Any) -> None:
  """In [0, 1): momenta, rates."""
  if not 0.0 <= value < 1.0:  # Also rejects NaN.
    raise ConfigError(f'config.{field}={value!r} is invalid: must be in '
                      '[0, 1)')
