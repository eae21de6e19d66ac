"""orthax: orthogonalized optimizers for JAX, as composable optax transforms."""

from optax.contrib import MuonDimensionNumbers

from orthax import contrib, polar, routing
from orthax.adaptive import adamuon, auon, hybrid_auon, namo, namo_d, root
from orthax.optimizers import muon, normuon, pion
from orthax.routing import Route, describe, route
from orthax.transforms.clip import clip_to_quantile
from orthax.transforms.momentum import MomentumState, momentum
from orthax.transforms.neuron_normalize import NeuronNormalizeState, neuron_normalize
from orthax.transforms.norm_adaptive import NormAdaptiveState, norm_adaptive
from orthax.transforms.orthogonalize import orthogonalize
from orthax.transforms.rms import cosh_rms_normalize, scale_to_rms
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
    "NormAdaptiveState",
    "adamuon",
    "auon",
    "cautious_weight_decay",
    "clip_to_quantile",
    "contrib",
    "cosh_rms_normalize",
    "describe",
    "hybrid_auon",
    "momentum",
    "muon",
    "namo",
    "namo_d",
    "neuron_normalize",
    "norm_adaptive",
    "normuon",
    "orthogonalize",
    "pion",
    "polar",
    "root",
    "RotateState",
    "Route",
    "route",
    "routing",
    "scale_by_multipliers",
    "scale_by_shape",
    "scale_to_rms",
    "spectrum_drift",
    "spectrum_preserving_rotate",
]
