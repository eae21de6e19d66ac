"""Pure numerics on arrays (no optax): the polar factor and its approximations."""

from orthax.polar.coefficients import (PRESETS, SHAPE_PRESETS,
                                       CoefficientPreset, ShapeCoefficients,
                                       by_shape, get_preset,
                                       resolve_coefficients)
from orthax.polar.newton_schulz import frobenius_normalize, newton_schulz
from orthax.polar.reference import orthogonality_error, polar_svd, singular_values
