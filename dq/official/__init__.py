"""Official (PyTorch) weights as dq params, without torch.

- `dq.official.torch_pickle`: reads `torch.save` files into numpy arrays (restricted unpickler).
- `dq.official.dqvae`: official DQ-VAE checkpoints -> DQVAE variables and `config.model`;
  converted folders (`params.npz` + `model_config.json`) are written and read here.
- `dq.official.transformer`: official DQ-Transformer (StackGPT / Dualformer) checkpoints ->
  `StackedTransformer` params and their config; converted folders likewise.

The command-line converters are `python -m dq.tools.convert_official_dqvae` and
`python -m dq.tools.convert_official_transformer`.
"""
