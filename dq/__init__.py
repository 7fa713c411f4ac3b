"""dq: dynamic vector quantization (DQ-VAE + DQ-Transformer) in JAX/Flax."""

__version__ = "0.1.0"
