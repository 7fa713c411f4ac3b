"""PatchGAN discriminator (pix2pix / taming `NLayerDiscriminator`), NHWC.

conv4x4/2 -> LeakyReLU, then `num_layers - 1` blocks of conv4x4/2 -> BatchNorm -> LeakyReLU with
widths ndf * min(2^n, 8), one conv4x4/1 -> BatchNorm -> LeakyReLU, and a conv4x4/1 to one logit
per patch. Init as the official `weights_init`: conv N(0, 0.02), BatchNorm scale N(1, 0.02).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

conv_init = nn.initializers.normal(0.02)


def _scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class PatchDiscriminator(nn.Module):
  """x [B, H, W, 3] in [-1, 1] -> patch logits [B, H', W', 1]."""
  ndf: int = 64
  num_layers: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    def conv(features, stride, bias, name):
      return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                     use_bias=bias, kernel_init=conv_init, dtype=self.dtype, name=name)

    def norm(name):
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          scale_init=_scale_init, dtype=self.dtype, name=name)

    h = nn.leaky_relu(conv(self.ndf, 2, True, "conv_0")(x), 0.2)
    for n in range(1, self.num_layers + 1):
      stride = 2 if n < self.num_layers else 1
      h = conv(self.ndf * min(2 ** n, 8), stride, False, f"conv_{n}")(h)
      h = nn.leaky_relu(norm(f"norm_{n}")(h), 0.2)
    return conv(1, 1, True, "conv_out")(h).astype(jnp.float32)
