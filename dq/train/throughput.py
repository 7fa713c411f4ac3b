"""Model FLOPs and utilisation (MFU) for the trainers' logs and the throughput benchmark.

MFU = model FLOPs per second / the devices' peak. Model FLOPs count the matmuls a training step
needs (forward + backward = 3x forward), not what the compiler emits (rematerialisation and
padding do not count), as in the PaLM paper's appendix B.
"""
from __future__ import annotations

from typing import Any, Optional

# Dense bf16 peak per chip (no sparsity), by `jax.Device.device_kind` prefix.
PEAK_BF16_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "TPU v6 lite": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v4": 275e12,
    "TPU v3": 123e12,
}


def device_peak_flops(device: Any) -> Optional[float]:
  """Peak dense bf16 FLOP/s of one device, None when unknown (e.g. CPU)."""
  kind = getattr(device, "device_kind", "")
  for prefix, peak in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return peak
  return None


def transformer_train_flops_per_token(n_embd: int, position_layers: int, content_layers: int,
                                      vocab_size: int, position_vocab_size: int,
                                      context: int) -> float:
  """Training FLOPs per token of the StackedTransformer at sequence length `context`.

  Per layer: q/k/v/proj 4 d^2 and MLP 8 d^2 weights (2 FLOPs per weight per token forward) plus
  attention scores and mixing 2 * 2 * context * d; heads d * (V + P). Training = 3x forward.
  """
  layers = position_layers + content_layers
  weights = layers * 12 * n_embd**2 + n_embd * (vocab_size + position_vocab_size)
  attention = layers * 2 * 2 * context * n_embd
  return 3.0 * (2.0 * weights + attention)


def model_flops_per_token(model: Any, context: int) -> float:
  """`transformer_train_flops_per_token` for a StackedTransformer module."""
  return transformer_train_flops_per_token(
      model.n_embd, model.position_layers, model.content_layers, model.vocab_size,
      model.fine_position_size, context)


def mfu(flops_per_step: float, steps_per_sec: float, devices: list) -> Optional[float]:
  """Model FLOPs utilisation over `devices`, None when a device's peak is unknown."""
  peaks = [device_peak_flops(d) for d in devices]
  if not peaks or any(p is None for p in peaks):
    return None
  return flops_per_step * steps_per_sec / sum(peaks)


def compiled_flops(jitted: Any, *args: Any) -> Optional[float]:
  """FLOPs XLA counts for one call of a jitted function (None when the backend does not say).

  Used for stage 1, whose convolutions have no simple closed form here; it compiles once more,
  so callers only ask when a device peak is known.
  """
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None
