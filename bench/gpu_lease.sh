#!/bin/bash
# The GPU figures of issues 11 and 12 in one lease of the device's two-GPU kind (process
# backend; the machine has torch and git but none of our pure-Python needs and no network).
#
#   bash bench/gpu_lease.sh setup      # unpack the carried wheels and data
#   bash bench/gpu_lease.sh warm       # one 50 s baseline trial per GPU from a cold compile
#                                      # cache (start-up cold); each keeps its cache
#   bash bench/gpu_lease.sh yield      # background: GPU 0 runs the research-yield loop on
#                                      # pysource (60 s budgets, no trial started after
#                                      # PY_MINUTES); GPU 1 the same on shakespeare (SH_MINUTES),
#                                      # then one 300 s pysource baseline trial; all start warm
#   bash bench/gpu_lease.sh wait SECS  # progress until the background work ends or SECS pass
#   bash bench/gpu_lease.sh collect    # results, ledgers and logs to $OUT
#
# Carried (ignored paths): .whl (gitpython, gitdb, smmap wheels) and .devdata/carry
# (pysource.tar.xz: the prepared `pysource` set, xz-compressed to fit a carry; shakespeare).
set -u
W=out/lease                                    # ignored: kept on the machine between calls
mkdir -p $W
export PYTHONPATH=$PWD/$W/pylib
Y="python bench/research_yield.py"
case "$1" in
setup)
    mkdir -p $W/pylib $W/data
    for w in .whl/*.whl; do python -m zipfile -e "$w" $W/pylib; done
    tar -xJf .devdata/carry/pysource.tar.xz -C $W/data
    cp -r .devdata/carry/shakespeare $W/data/
    nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
    python -c "import torch, git; print('torch', torch.__version__, 'gitpython', git.__version__)"
    du -sh $W/data/* ;;
warm)
    $Y --data pysource=$W/data/pysource --gpus 0 --budget 50 --minutes 0.01 --noise-runs 1 \
        --same-seed-runs 0 --out $W/warm0 > $W/warm0.log 2>&1 &
    $Y --data shakespeare=$W/data/shakespeare --gpus 1 --budget 50 --minutes 0.01 --noise-runs 1 \
        --same-seed-runs 0 --out $W/warm1 > $W/warm1.log 2>&1 &
    wait; grep -h -A12 'where slot time went\|slot' $W/warm0/results.md | head -20
    ls -d $W/warm*/*/compile-cache ;;
yield)
    setsid nohup $Y --data pysource=$W/data/pysource --gpus 0 --budget 60 \
        --minutes "${PY_MINUTES:-8.5}" --cache-from $W/warm0/pysource/compile-cache \
        --out $W/yield-pysource > $W/yield-pysource.log 2>&1 < /dev/null &
    setsid nohup bash -c "$Y --data shakespeare=$W/data/shakespeare --gpus 1 --budget 60 \
        --minutes ${SH_MINUTES:-4} --cache-from $W/warm1/shakespeare/compile-cache \
        --out $W/yield-shakespeare > $W/yield-shakespeare.log 2>&1;
        $Y --data pysource=$W/data/pysource --gpus 1 --budget 300 --minutes 0.01 --noise-runs 1 \
        --same-seed-runs 0 --cache-from $W/warm0/pysource/compile-cache --out $W/long \
        > $W/long.log 2>&1" < /dev/null > /dev/null 2>&1 &
    sleep 3; tail -n 2 $W/yield-*.log ;;
wait)
    end=$((SECONDS + $2))
    while [ $SECONDS -lt $end ] && pgrep -f bench/research_yield.py > /dev/null; do sleep 30
        for f in $W/yield-*.log $W/long.log; do [ -f $f ] && echo "$(date +%T) $f: $(tail -n 1 $f | cut -c1-150)"; done; done
    pgrep -f bench/research_yield.py > /dev/null && echo "still running" || echo "all done" ;;
collect)
    mkdir -p $OUT
    cp $W/*.log $OUT/ 2>/dev/null
    for d in $W/warm0 $W/warm1 $W/yield-* $W/long; do [ -d $d ] || continue; n=$(basename $d)
        mkdir -p $OUT/$n; cp $d/results.md $d/results.json $OUT/$n/ 2>/dev/null
        find $d -name experiments.jsonl | while read f; do cp $f $OUT/$n/; done; done
    nvidia-smi --query-gpu=index,name,driver_version --format=csv > $OUT/gpus.csv
    ls -R $OUT | head -40 ;;
esac
