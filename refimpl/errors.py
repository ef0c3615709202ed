"""Errors raised by the reference.

Every error the reference raises on bad input derives from :class:`RefimplError`
(itself a ``ValueError``), carries a one-line message that names the problem, and
is meant to be shown to a user as is, without a traceback.
"""

from __future__ import annotations


class RefimplError(ValueError):
    """Base class of every input error raised by ``refimpl``."""


class UnknownArchitectureError(RefimplError):
    """config.json names an architecture that has no registry entry."""


class ConfigError(RefimplError):
    """config.json is missing a field, has a field of the wrong type, or asks for
    a feature this version of the reference does not implement."""


class CheckpointError(RefimplError):
    """A checkpoint directory or one of its files cannot be read."""


class MissingWeightsError(CheckpointError):
    """The checkpoint lacks tensors the architecture needs."""


class UnexpectedWeightsError(CheckpointError):
    """The checkpoint carries tensors the architecture does not use."""


class WeightShapeError(CheckpointError):
    """A tensor in the checkpoint has the wrong shape for the config."""


class InputError(RefimplError):
    """An input has the wrong type, dtype or range: model token ids, an op's array
    argument (integer, bool or complex where floats are needed) or a scalar
    parameter (NaN, infinite or out of range eps, scale, cap, embed scale)."""


class RoutingTieWarning(UserWarning):
    """A router met exactly equal scores at its top-k boundary: which expert it chose is the
    documented tie rule (lower index), and other implementations may choose another."""


class ShapeError(RefimplError):
    """A component received arrays whose shapes do not fit together."""
