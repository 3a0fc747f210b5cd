#!/bin/bash
# The GPU figures of issues 11 and 12 in one lease of the device's two-GPU kind (process
# backend; the machine has torch and git but none of our pure-Python needs and no network).
#
#   bash bench/gpu_lease.sh setup      # unpack the carried wheels and data (.whl, .devdata/carry)
#   bash bench/gpu_lease.sh yield M    # research yield: pysource on GPU 0, shakespeare on GPU 1,
#                                      # 60 s budgets, no trial started after M minutes (background)
#   bash bench/gpu_lease.sh long       # one 300 s baseline trial per GPU: GPU 0 on the compile
#                                      # cache the pysource loop kept (warm), GPU 1 cold (background)
#   bash bench/gpu_lease.sh wait SECS  # show progress until the background work ends or SECS pass
#   bash bench/gpu_lease.sh collect    # copy results, ledgers and logs to $OUT
#
# Carried (ignored paths): .whl (gitpython, gitdb, smmap wheels), .devdata/carry
# (pysource.tar.xz: the prepared `pysource` set; shakespeare: the prepared `shakespeare` set).
set -u
W=out/lease                                    # ignored: kept on the machine between calls
mkdir -p $W
export PYTHONPATH=$PWD/$W/pylib
case "$1" in
setup)
    mkdir -p $W/pylib $W/data
    for w in .whl/*.whl; do python -m zipfile -e "$w" $W/pylib; done
    tar -xJf .devdata/carry/pysource.tar.xz -C $W/data
    cp -r .devdata/carry/shakespeare $W/data/
    nvidia-smi --query-gpu=index,name,memory.used --format=csv
    python -c "import torch, git; print('torch', torch.__version__, 'git', git.__version__)"
    du -sh $W/data/* ;;
yield)
    for pair in "pysource 0" "shakespeare 1"; do
        set -- $pair
        setsid nohup python bench/research_yield.py --data $1=$W/data/$1 --gpus $2 --budget 60 \
            --minutes "${MINUTES:-9}" --out $W/yield-$1 > $W/yield-$1.log 2>&1 < /dev/null &
    done; sleep 5; tail -n 3 $W/*.log ;;
long)
    seed=$(ls -d $W/yield-pysource/*/compile-cache 2>/dev/null | head -n 1)
    echo "warm cache from: ${seed:-none}"
    setsid nohup python bench/research_yield.py --data pysource=$W/data/pysource --gpus 0 \
        --budget 300 --minutes 0.1 --noise-runs 1 --same-seed-runs 0 ${seed:+--cache-from $seed} \
        --out $W/long-warm > $W/long-warm.log 2>&1 < /dev/null &
    setsid nohup python bench/research_yield.py --data pysource=$W/data/pysource --gpus 1 \
        --budget 300 --minutes 0.1 --noise-runs 1 --same-seed-runs 0 \
        --out $W/long-cold > $W/long-cold.log 2>&1 < /dev/null &
    sleep 5; tail -n 3 $W/long-*.log ;;
wait)
    end=$((SECONDS + $2))
    while [ $SECONDS -lt $end ] && pgrep -f bench/research_yield.py > /dev/null; do sleep 20
        for f in $W/*.log; do echo "$(date +%T) $f: $(tail -n 1 $f | cut -c1-160)"; done; done
    pgrep -f bench/research_yield.py > /dev/null && echo "still running" || echo "all done" ;;
collect)
    mkdir -p $OUT
    cp $W/*.log $OUT/ 2>/dev/null
    for d in $W/yield-* $W/long-*; do [ -d $d ] || continue; n=$(basename $d); mkdir -p $OUT/$n
        cp $d/results.md $d/results.json $OUT/$n/ 2>/dev/null
        find $d -name experiments.jsonl -exec cp {} $OUT/$n/ \; ; done
    nvidia-smi --query-gpu=index,name,driver_version --format=csv > $OUT/gpus.csv
    ls -R $OUT | head -40 ;;
esac
