#!/bin/bash
# One H200 session: MobileNetV2 search rate (two XLA:GPU settings), the vote trio side by side
# with the paper's code on the GPU, the NB201 chunked engine. Every phase under its own limit.
set -u
T0=$(date +%s)
LOG=$OUT/log.txt
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_DEFAULT_MATMUL_PRECISION=highest WRCOR_JAX_MALLOC=default
DATA=.device/cifar10_sample.npz
left() { echo $(( $1 - ($(date +%s) - T0) )); }
{
  echo "== env"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, flax, torch, numpy; print(jax.__version__, flax.__version__, torch.__version__, numpy.__version__, jax.devices())"
  nproc; free -g | head -2
} >> $LOG 2>&1
monitor() {  # seconds since start, architectures scored (score cache rows)
  while sleep 5; do
    n=$(cat /tmp/$1/cache/*/wrcor.csv 2>/dev/null | wc -l)
    echo "$1 $(( $(date +%s) - T0 )) $n" >> $OUT/progress.txt
  done
}
search() {  # name, seconds, XLA_FLAGS
  echo "== search $1 (XLA_FLAGS=$3) at $(( $(date +%s) - T0 )) s" >> $LOG
  monitor $1 & M=$!
  XLA_FLAGS="$3" timeout -s INT $2 python3 experiments/search_mbv2.py --dataset cifar10 \
    --data $DATA --budget 1000 --out /tmp/$1 --compile-cache /tmp/xla_$1 --quiet >> $LOG 2>&1
  echo "== search $1 exit $? at $(( $(date +%s) - T0 )) s" >> $LOG
  kill $M
  cp /tmp/$1/evolution_vote_0/history.csv $OUT/history_$1.csv 2>/dev/null
  cp /tmp/$1/cache/*/wrcor.csv $OUT/wrcor_$1.csv 2>/dev/null
}
search gpu_default 110 ""
search gpu_autotune0 110 "--xla_gpu_autotune_level=0"
echo "== timing at $(( $(date +%s) - T0 )) s" >> $LOG
OPENBLAS_NUM_THREADS=16 timeout $(left 470) python3 experiments/timing_vs_pytorch.py --space mbv2 \
  --proxies synflow,jacob_cov,wrcor --only paper_code,jax --warm --num-archs 4 \
  --reference-code .device/ref --torch-device cuda --torch-threads 16 --data $DATA --timeout 130 \
  --json $OUT/timing_mbv2.json >> $LOG 2>&1
echo "== timing exit $? at $(( $(date +%s) - T0 )) s" >> $LOG
if [ $(left 540) -gt 50 ]; then
  timeout $(left 540) python3 experiments/accelerator_benchmark.py --num-archs 4096 --floor-archs 16 --check 4 \
    --data $DATA --json $OUT/nb201_chunked.json >> $LOG 2>&1
  echo "== nb201 exit $? at $(( $(date +%s) - T0 )) s" >> $LOG
fi
