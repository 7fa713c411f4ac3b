"""Writes the small `torch.save` samples read by tests/test_convert_official.py.

Needs PyTorch (the tests do not): `python tests/data/make_torch_samples.py`. The tensors are
deterministic; the test rebuilds the expected values with numpy.
"""
import collections
import pathlib

import torch


def sample_state_dict() -> collections.OrderedDict:
  base = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.5 - 1.0  # [3, 4]
  conv = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)
  return collections.OrderedDict(
      contiguous=base,
      transposed=base.t(),
      offset_view=base[1:, 2:],
      channels_last=conv.to(memory_format=torch.channels_last),
      bf16=torch.tensor([1.0, -2.5, 3.14159, 1e-3, 65504.0], dtype=torch.bfloat16),
      half=torch.tensor([0.5, -1.25, 1e-4], dtype=torch.float16),
      long_strided=torch.arange(10)[1::3],
      flags=torch.tensor([True, False, True]),
      empty=torch.zeros(0, 3),
      param=torch.nn.Parameter(torch.full((2, 2), 7.0)),
  )


def main() -> None:
  folder = pathlib.Path(__file__).resolve().parent
  sd = sample_state_dict()
  lightning = {
      "epoch": 3,
      "global_step": 30,
      "pytorch-lightning_version": "1.4.2",
      "state_dict": sd,
      "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                            "param_groups": [{"lr": 1e-4, "betas": (0.5, 0.9), "params": [0]}]}],
      "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.25),
                                        "best_model_path": "last.ckpt"}},
      "misc": {"shape": sd["contiguous"].shape, "device": torch.device("cpu"),
               "raw": b"\x00\xff", "set": {1, 2}},
  }
  torch.save(lightning, folder / "torch_lightning_sample.ckpt")
  torch.save(sd, folder / "torch_legacy_sample.pt", _use_new_zipfile_serialization=False)


if __name__ == "__main__":
  main()
