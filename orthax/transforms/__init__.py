"""One optax GradientTransformation per module."""
