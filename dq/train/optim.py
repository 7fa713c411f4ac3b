"""Optimizers and learning-rate schedules from config."""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax

OPTIMIZERS = ("adam", "adamw")      # config.optim.name
SCHEDULES = ("cosine", "constant")  # config.optim.schedule


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0,
                  end_factor: float = 0.0, kind: str = "cosine") -> optax.Schedule:
  """Linear warmup from 0 then cosine (or constant) to `lr * end_factor` at `total_steps`."""
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup_steps), alpha=end_factor)
  else:
    raise ValueError(f"config.optim.schedule={kind!r}: expected one of {SCHEDULES}")
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def weight_decay_mask(params: Any) -> Any:
  """True for weights with >= 2 dims (kernels, embeddings); biases and norms are not decayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg: Any, total_steps: int, *,
                   decay_mask: Callable[[Any], Any] = weight_decay_mask
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam/AdamW with optional global-norm clipping, from `config.optim`.

  `decay_mask(params)` -> bool tree: the weights AdamW decays (default `weight_decay_mask`).
  """
  schedule = make_schedule(optim_cfg.lr, total_steps, optim_cfg.warmup_steps,
                           optim_cfg.get("end_factor", 0.0), optim_cfg.get("schedule", "cosine"))
  name = optim_cfg.get("name", "adam")
  if name == "adam":
    opt = optax.adam(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.get("eps", 1e-8))
  elif name == "adamw":
    opt = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.get("eps", 1e-8),
                      weight_decay=optim_cfg.weight_decay, mask=decay_mask)
  else:
    raise ValueError(f"config.optim.name={name!r}: expected one of {OPTIMIZERS}")
  parts = []
  if optim_cfg.get("grad_clip", 0.0):
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  parts.append(opt)
  lr_mults = {name[:-len("_lr_mult")]: float(value) for name, value in optim_cfg.items()
              if name.endswith("_lr_mult") and float(value) != 1.0}
  for module, mult in sorted(lr_mults.items()):
    # `<module>_lr_mult`: the updates of the top-level params subtree `<module>` are scaled.
    parts.append(optax.masked(optax.scale(mult), _top_level_mask(module)))
  return optax.chain(*parts), schedule


def _top_level_mask(module: str) -> Callable[[Any], Any]:
  def mask(params: Any) -> Any:
    return {key: jax.tree.map(lambda _: key == module, value) for key, value in params.items()}
  return mask
