#!/usr/bin/env bash
# Accelerator check in one go: step benchmarks of the reference and paper-size configs, then a short
# demo training run end to end (checkpoint + eval). Writes JSON lines and logs under ${OUT:-/tmp/out}.
#   bash benchmarks/gpu_suite.sh
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  python3 benchmarks/vae_step.py --steps 10 --batch 2
  python3 benchmarks/vae_step.py --steps 10 --batch 2 --precision highest
  python3 benchmarks/vae_step.py --steps 10 --config=configs/ffhq_vae.py --batch 32
  python3 benchmarks/vae_step.py --steps 10 --config=configs/ffhq_vae.py:entropy --batch 32
  python3 benchmarks/vae_step.py --steps 10 --config=configs/ffhq_vae.py:triple --batch 32
} 2>&1 | tee "$out/bench.log" | grep -E '^\{|^jax|Error|error' | tee "$out/bench.jsonl"
python3 -m dq.main --config=configs/demo_vae.py:steps=1500 --workdir=/tmp/demo_gpu \
  --config.train.log_every=250 > "$out/demo_gpu.log" 2>&1
echo "demo exit $?"
grep -E "steps/s|eval reconstruction" "$out/demo_gpu.log" | tail -8
cp /tmp/demo_gpu/eval/*.json "$out/" 2>/dev/null
cp "$(ls /tmp/demo_gpu/summaries/*.png | tail -1)" "$out/" 2>/dev/null
true
