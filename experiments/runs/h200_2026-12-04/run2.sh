#!/bin/bash
# Second H200 call: every compile of the MobileNetV2 engine's first architectures (WRCor),
# then the NB201 chunked engine's benchmark.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_DEFAULT_MATMUL_PRECISION=highest WRCOR_JAX_MALLOC=default
DATA=.device/cifar10_sample.npz
JAX_LOG_COMPILES=1 timeout 105 python3 experiments/mbv2_compiles.py --archs 3 \
  --checkpoints 1,2,3 --data $DATA --out $OUT/mbv2_compiles.jsonl > $OUT/mbv2_log.txt 2>&1
echo "mbv2 exit $?" >> $OUT/mbv2_log.txt
timeout 165 python3 experiments/accelerator_benchmark.py --num-archs 8192 --floor-archs 8 \
  --check 2 --data $DATA --json $OUT/nb201_chunked.json > $OUT/nb201_log.txt 2>&1
echo "nb201 exit $?" >> $OUT/nb201_log.txt
