"""Which config fields a training run may change when it resumes in its workdir.

`resume_changes(saved, config)` compares the config a run was started with
(`WORKDIR/config.json`) with the new one. `RESUME_FIXED` lists, in one place per stage, the
fields a resume cannot change: they change the shapes of the saved parameters or optimizer
state (the restore would fail), or what the model means (the run would silently continue a
different model). Everything else (steps, learning rates, intervals, batch size, loss weights,
the learned router's training knobs, the mesh, ...) may change; such changes are logged.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from dq.validate.checker import ConfigError, base_config, is_section, plain, show
from dq.validate.stage1 import VAE_SHAPE_FIELDS
from dq.validate.stage2 import TRANSFORMER_SHAPE_FIELDS

# key(value, config) -> what must stay equal (config: the new config, as a Checker-like get).
Key = Callable[[Any, Callable[[str], Any]], Any]


def _value(value: Any, get: Callable[[str], Any]) -> Any:
  return plain(value)


def _on_off(value: Any, get: Callable[[str], Any]) -> Any:
  """Only switching it on or off changes the state (e.g. grad clipping adds a transform)."""
  return bool(value)


def _not_one(value: Any, get: Callable[[str], Any]) -> Any:
  """A learning-rate multiplier adds a transform to the optimizer chain unless it is 1."""
  return float(value) != 1.0


def _unless_feature_router(value: Any, get: Callable[[str], Any]) -> Any:
  """Grain targets decide the routing of the entropy and fixed routers; for the feature router
  they are only the budget loss's target (training)."""
  return None if get("model.router.kind") == "feature" else plain(value)


def _with_discriminator(value: Any, get: Callable[[str], Any]) -> Any:
  return plain(value) if (get("loss.disc_weight") or 0) > 0 else None


_NOTES = {_on_off: " (switching it on or off changes the optimizer or model state)",
          _not_one: " (a value other than 1 adds a transform to the optimizer state)"}
RESUME_FIXED: dict[str, tuple[tuple[str, Key], ...]] = {
    "vae": (
        ("stage", _value),
        ("data.image_size", _value),
        *((f"model.{field}", _value) for field in VAE_SHAPE_FIELDS),
        ("model.in_channels", _value),
        ("model.norm_groups", _value),
        ("model.router.kind", _value),
        ("model.router.norm", _value),          # which normalisation parameters exist
        ("model.router.norm_groups", _value),
        ("model.router.fine_ratio", _unless_feature_router),
        ("model.router.median_ratio", _unless_feature_router),
        ("optim.name", _value),                 # optimizer-state structure
        ("optim.grad_clip", _on_off),
        ("optim.router_lr_mult", _not_one),
        ("optim_disc.name", _value),
        ("optim_disc.grad_clip", _on_off),
        ("loss.disc_weight", _on_off),          # the discriminator is part of the state
        ("loss.disc_ndf", _with_discriminator),
        ("loss.disc_layers", _with_discriminator),
    ),
    "transformer": (
        ("stage", _value),
        *((f"model.{field}", _value) for field in TRANSFORMER_SHAPE_FIELDS),
        ("model.n_head", _value),
        ("tokens.max_len", _value),             # position embedding length
        ("tokens.fine_order", _value),          # the order the model predicts fine tokens in
        ("class_conditional", _value),          # content vocabulary
        ("optim.name", _value),
        ("optim.grad_clip", _on_off),
    ),
    "fid": (("stage", _value),),
}
# Never compared: what this invocation does, not what the run is.
NOT_COMPARED = ("mode",)


class ResumeConfigError(ConfigError):
  """The new config changes fields that a resume cannot change."""


def _getter(root: Any, base: Any) -> Callable[[str], Any]:
  def get(field: str) -> Any:
    for tree in (root, base):
      node, found = tree, True
      for key in field.split("."):
        if is_section(node) and key in node:
          node = node[key]
        else:
          found = False
          break
      if found:
        return node
    return None
  return get


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in (tree.items() if is_section(tree) else ()):
    field = f"{prefix}{key}"
    if is_section(value):
      out.update(_flatten(value, field + "."))
    else:
      out[field] = plain(value)
  return out


def resume_changes(saved: dict, config: Any) -> tuple[list[str], list[str]]:
  """(refused, allowed): `field: saved -> new` lines of the fields that differ.

  `saved` is the run's config.json; a field it lacks (written by an older version) counts as
  the stage's default. `config` is the new config (a ConfigDict).
  """
  stage = config.get("stage")
  saved_stage = saved.get("stage", stage)
  base = base_config(stage) if stage in RESUME_FIXED else None
  new_get, old_get = _getter(config, base), _getter(saved, base)
  refused, fixed_names = [], set(NOT_COMPARED)
  for field, key in RESUME_FIXED.get(stage, (("stage", _value),)):
    fixed_names.add(field)
    old, new = old_get(field), new_get(field)
    if field == "stage":
      old = saved_stage
    if key(old, old_get) != key(new, new_get):
      refused.append(f"{field}: {show(old)} -> {show(new)}{_NOTES.get(key, '')}")
  if refused and saved_stage != stage:
    return refused[:1], []  # another stage's run: its other fields do not compare
  new_flat, old_flat = _flatten(config), _flatten(saved)
  allowed = []
  for field, new in sorted(new_flat.items()):
    if field in fixed_names:
      continue
    old = old_flat.get(field, plain(old_get(field)))
    if old != new:
      allowed.append(f"{field}: {show(old)} -> {show(new)}")
  return refused, allowed


def check_resume(saved: Optional[dict], config: Any, where: str, step: Optional[int]
                 ) -> list[str]:
  """The allowed changes against the saved config of the run in `where` (empty when there is
  none). `step`: the run's latest checkpoint (None: no checkpoint yet, then only `stage` is
  compared: the new config replaces the old one).

  Raises:
    ResumeConfigError: one message listing every refused field as `field: saved -> new`.
  """
  if saved is None:
    return []
  refused, allowed = resume_changes(saved, config)
  if step is None:
    refused = [line for line in refused if line.startswith("stage:")]
  if refused:
    what = f"checkpoint {step}" if step is not None else "its config.json"
    raise ResumeConfigError(
        [f"{where} holds a run ({what}) that this config cannot resume: these fields change "
         "parameter or optimizer-state shapes or what the model means (saved -> new):",
         *(f"  {line}" for line in refused),
         f"Use another --workdir for a new run (--config.init_from={where} starts it from "
         "these weights where the shapes allow), or resume with the saved values (see "
         f"{where}/config.json)"])
  return allowed
