#!/usr/bin/env bash
# Accelerator check in one go (~8 minutes on one H200 before the stage-2 lines; budget ~10 more): a short demo training run end to end
# (checkpoint + eval, no TensorFlow needed), then step benchmarks of the reference and paper-size
# configs, each bounded by its own timeout. JSON lines and logs go to ${OUT:-/tmp/out}.
#   bash benchmarks/gpu_suite.sh
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  | tee "$out/bench.jsonl"
timeout 200 python3 -m dq.main --config=configs/demo_vae.py:steps=1500 --workdir=/tmp/demo_gpu \
  --config.train.log_every=250 > "$out/demo_gpu.log" 2>&1
echo "demo exit $?"
grep -E "steps/s|eval reconstruction" "$out/demo_gpu.log" | tail -4
cp /tmp/demo_gpu/eval/*.json "$out/" 2>/dev/null
for args in "--batch 2" "--batch 2 --precision highest" "--batch 2 --full_loss" \
            "--config=configs/ffhq_vae.py --batch 32" "--config=configs/ffhq_vae.py:triple --batch 32"; do
  # shellcheck disable=SC2086
  timeout 150 python3 benchmarks/vae_step.py --steps 10 $args 2>>"$out/bench.log" | tee -a "$out/bench.jsonl"
done
for args in "--stage 2 --batch 32" "--stage 2 --batch 32 --attention cudnn" "--stage 1 --batch 16"; do
  # shellcheck disable=SC2086
  timeout 240 python3 benchmarks/train_throughput.py --steps 10 $args 2>>"$out/bench.log" | tee -a "$out/bench.jsonl"
done
timeout 240 python3 benchmarks/sampling.py --batches 1,8 --repeats 3 2>>"$out/bench.log" | tee -a "$out/bench.jsonl"
true
