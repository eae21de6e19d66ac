"""orthax: orthogonalized optimizers for JAX, as composable optax transforms."""

from optax.contrib import MuonDimensionNumbers

from orthax import contrib, nn, polar, routing
from orthax.adaptive import adamuon, auon, hybrid_auon, namo, namo_d, root
from orthax.optimizers import muon, normuon, pion
from orthax.routing import Route, describe, route
from orthax.structured import aro, dion, fismo, muon_clip, poet
from orthax.transforms.adaptive_rotate import AdaptiveRotateState, adaptive_rotate
from orthax.transforms.block_rotate import BlockRotateState, block_stochastic_rotate
from orthax.transforms.clip import clip_to_quantile
from orthax.transforms.dion import DionState, scale_by_dion
from orthax.transforms.kronecker_whiten import KroneckerWhitenState, kronecker_whiten
from orthax.transforms.momentum import MomentumState, momentum
from orthax.transforms.neuron_normalize import NeuronNormalizeState, neuron_normalize
from orthax.transforms.norm_adaptive import NormAdaptiveState, norm_adaptive
from orthax.transforms.orthogonalize import orthogonalize
from orthax.transforms.qk_clip import QKClipState, qk_clip
from orthax.transforms.rms import cosh_rms_normalize, scale_to_rms
from orthax.transforms.rotate import RotateState, spectrum_drift, spectrum_preserving_rotate
from orthax.transforms.shape import scale_by_shape
from orthax.transforms.weight_decay import (CautiousWeightDecayState,
                                           cautious_weight_decay,
                                           scale_by_multipliers)

__version__ = "0.1.0"

__all__ = [
    "adamuon",
    "adaptive_rotate",
    "AdaptiveRotateState",
    "aro",
    "auon",
    "block_stochastic_rotate",
    "BlockRotateState",
    "cautious_weight_decay",
    "CautiousWeightDecayState",
    "clip_to_quantile",
    "contrib",
    "cosh_rms_normalize",
    "describe",
    "dion",
    "DionState",
    "fismo",
    "hybrid_auon",
    "kronecker_whiten",
    "KroneckerWhitenState",
    "momentum",
    "MomentumState",
    "muon",
    "muon_clip",
    "MuonDimensionNumbers",
    "namo",
    "namo_d",
    "neuron_normalize",
    "NeuronNormalizeState",
    "nn",
    "norm_adaptive",
    "NormAdaptiveState",
    "normuon",
    "orthogonalize",
    "pion",
    "poet",
    "polar",
    "qk_clip",
    "QKClipState",
    "root",
    "RotateState",
    "Route",
    "route",
    "routing",
    "scale_by_dion",
    "scale_by_multipliers",
    "scale_by_shape",
    "scale_to_rms",
    "spectrum_drift",
    "spectrum_preserving_rotate",
]
