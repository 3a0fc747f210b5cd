#!/bin/bash
# Variants of train.py for a short MFU sweep on the device (constants patched with sed).
export PYTHONUNBUFFERED=1 AUTORESEARCH_DATA_DIR=.devdata/shakespeare AUTORESEARCH_TIME_BUDGET=45 PYTHONPATH=prepare
nvidia-smi --query-gpu=name --format=csv,noheader
run() { name=$1; shift; cp target/train.py /tmp/v_$name.py; for e in "$@"; do sed -i "$e" /tmp/v_$name.py; done
  AUTORESEARCH_OUT=/tmp/o_$name python3 /tmp/v_$name.py > $OUT/$name.log 2>&1
  echo "$name rc=$? $(grep -E '^(tokens_per_second|mfu_percent|peak_memory_mb):' $OUT/$name.log | tr '\n' ' ')"; }
run base
run nodrop 's/^DROPOUT = .*/DROPOUT = 0.0/'
run batch128 's/^DEVICE_BATCH = .*/DEVICE_BATCH = 128/'
run nodrop_b128 's/^DROPOUT = .*/DROPOUT = 0.0/' 's/^DEVICE_BATCH = .*/DEVICE_BATCH = 128/'
