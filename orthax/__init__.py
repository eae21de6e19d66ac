"""orthax: orthogonalized optimizers for JAX, as composable optax transforms."""

from optax.contrib import MuonDimensionNumbers

from orthax import contrib, polar, routing
from orthax.optimizers import muon, normuon, pion
from orthax.routing import Route, describe, route
from orthax.transforms.momentum import MomentumState, momentum
from orthax.transforms.neuron_normalize import NeuronNormalizeState, neuron_normalize
from orthax.transforms.orthogonalize import orthogonalize
from orthax.transforms.rotate import RotateState, spectrum_drift, spectrum_preserving_rotate
from orthax.transforms.shape import scale_by_shape
from orthax.transforms.weight_decay import (CautiousWeightDecayState,
                                           cautious_weight_decay,
                                           scale_by_multipliers)

__version__ = "0.1.0"

__all__ = [
    "CautiousWeightDecayState",
    "MomentumState",
    "MuonDimensionNumbers",
    "NeuronNormalizeState",
    "cautious_weight_decay",
    "contrib",
    "describe",
    "momentum",
    "muon",
    "neuron_normalize",
    "normuon",
    "orthogonalize",
    "pion",
    "polar",
    "RotateState",
    "Route",
    "route",
    "routing",
    "scale_by_multipliers",
    "scale_by_shape",
    "spectrum_drift",
    "spectrum_preserving_rotate",
]
