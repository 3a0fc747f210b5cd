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
#   bash bench/gpu_lease.sh warm2      # issue 11's overlap: one 50 s pysource baseline per GPU, cold
#                                      # (GPUS="0": GPU 0 only, for the one-GPU kind; NOISE=2: a
#                                      # second, warm run, whose fuller cache the loop keeps)
#   bash bench/gpu_lease.sh overlap    # background, side by side on pysource at 60 s budgets for
#                                      # MINUTES: GPU 0 scores beside the next trial, GPU 1 alone;
#                                      # then GPU 0 one 300 s baseline (beside), GPU 1
#                                      # bench/overlap_check.py (a memory hog beside the scorer)
#   bash bench/gpu_lease.sh measure    # background, after warm2 (whose cold trials fill the
#                                      # caches: compiled code, the driver's JIT, torch's bytecode
#                                      # when torch has none): GPU 0 the 60 s loop scored beside
#                                      # for MINUTES, then one 300 s baseline; GPU 1 two 300 s
#                                      # baselines, one after the other (~11 minutes in all)
#   bash bench/gpu_lease.sh alone      # background, after warm2: GPU 0 alone (GPU 1 idle) the
#                                      # 60 s loop scored beside for MINUTES, then one 300 s
#                                      # baseline: the figures without a second GPU's work
#   bash bench/gpu_lease.sh provenance # after warm2, ~6 min in the foreground, GPU 0 only: by hand
#                                      # in the runner's environment (cold, then warm), keeping
#                                      # its cache; then a 60 s runner trial on that cache and
#                                      # one on warm0's (made by a runner trial): is the runner's
#                                      # slower first step the cache's making or the runner?
#   bash bench/gpu_lease.sh mtimes     # after warm2, ~3 min, GPU 0: by hand from warm0's cache, each
#                                      # run's cache copied without its file times, then with them
#   bash bench/gpu_lease.sh parts      # after warm2, ~1 min, GPU 0: a holdout check's and a save's
#                                      # cost (bench/check_and_save.py), the interpreter with
#                                      # torch's import, and the CUDA context's start
#   bash bench/gpu_lease.sh sample     # after warm2, ~4 min, GPU 0: by hand in the runner's
#                                      # environment from warm0's cache, two warm runs sampled
#                                      # (bench/sample_stacks.py: the start-up by function); two
#                                      # more with Dynamo's caching precompile on; then a first
#                                      # holdout check after six steps (check_and_save --train-first)
#   bash bench/gpu_lease.sh oninit     # after warm2, ~4 min, GPU 0: the model made on its device
#                                      # against made on the CPU and copied (side by side)
#   bash bench/gpu_lease.sh chain      # background, after warm2: GPU 0 the 60 s loop scored beside
#                                      # for MINUTES (3.5) from CACHE (warm0's cache), NOISE (3)
#                                      # noise runs, to out/lease/NAME (yield-chain), while the
#                                      # run's cache's file list is kept each time it changes
#                                      # (out/lease/NAME-lists/: what each trial adds)
#   bash bench/gpu_lease.sh chainreport # after chain (NAME): slot shares, each trial's exit (the
#                                      # seconds from its summary to its process's end), its
#                                      # fallback line, and the driver's cache files after each
#   bash bench/gpu_lease.sh wait SECS  # progress until the background work ends or SECS pass
#   bash bench/gpu_lease.sh collect    # results, ledgers and logs to $OUT
#
# A background step must be followed by `wait` within the device's idle release (30 s), or the
# machine is handed back and what runs in the background is lost with it:
#   bash bench/gpu_lease.sh setup && bash bench/gpu_lease.sh warm2 && \
#       MINUTES=4 bash bench/gpu_lease.sh measure && bash bench/gpu_lease.sh wait 420
#   bash bench/gpu_lease.sh wait 300; bash bench/gpu_lease.sh collect   # the next calls, at once
# Logs and results stay under out/ (ignored): a call's working tree is replaced by the next
# call's, and what a call starts without setsid ends with it.
# Carried (ignored paths): .whl (gitpython, gitdb, smmap wheels) and .devdata/carry
# (pysource.tar.xz: the prepared `pysource` set, xz-compressed to fit a carry; shakespeare).
set -u
W=out/lease                                    # ignored: kept on the machine between calls
mkdir -p $W
export PYTHONPATH=$PWD/$W/pylib
Y="python bench/research_yield.py"
L="$Y --data pysource=$W/data/pysource --budget 300 --minutes 1 --noise-runs 1 \
    --same-seed-runs 0 --overlap-scoring"          # one 300 s baseline (--minutes 1: the cache copy)

loop_then_long() {   # background on GPU 0: the 60 s loop scored beside for MINUTES (to out/$1),
                     # then one 300 s baseline (to long0); both from warm0's cache
    setsid nohup bash -c "$Y --data pysource=$W/data/pysource --gpus 0 --budget 60 \
        --minutes ${MINUTES:-4} --cache-from $W/warm0/pysource/compile-cache --overlap-scoring \
        --out $W/$1 > $W/$1.log 2>&1;
        $L --gpus 0 --cache-from $W/warm0/pysource/compile-cache --out $W/long0 > $W/long0.log 2>&1" \
        < /dev/null > /dev/null 2>&1 &
}
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
warm2)
    m=0.01; [ "${NOISE:-1}" -gt 1 ] && m=1.2     # --minutes: no run starts after it
    for g in ${GPUS:-0 1}; do $Y --data pysource=$W/data/pysource --gpus $g --budget 50 --minutes $m \
        --noise-runs ${NOISE:-1} --same-seed-runs 0 --out $W/warm$g > $W/warm$g.log 2>&1 & done
    wait; du -sh $W/warm*/*/compile-cache $W/warm*/*/compile-cache/pycache 2>&1 ;;
measure)
    loop_then_long yield-beside
    setsid nohup bash -c "for i in a b; do $L --gpus 1 --cache-from $W/warm1/pysource/compile-cache \
        --out $W/long1\$i > $W/long1\$i.log 2>&1; done" < /dev/null > /dev/null 2>&1 &
    sleep 3; tail -n 2 $W/yield-*.log $W/long1a.log ;;
provenance)
    S="python bench/startup_profile.py --data $W/data/pysource --budget 60 --no-profile \
        --runner-env --move-cache"
    CUDA_VISIBLE_DEVICES=0 $S --warm-runs 1 --keep-cache $W/hand-cache > $W/hand.log 2>&1
    R="$Y --data pysource=$W/data/pysource --gpus 0 --budget 60 --minutes 1 --noise-runs 1 \
        --same-seed-runs 0"
    $R --cache-from $W/hand-cache --out $W/on-hand > $W/on-hand.log 2>&1
    $R --cache-from $W/warm0/pysource/compile-cache --out $W/on-runner > $W/on-runner.log 2>&1
    cat $W/hand.log
    for d in on-hand on-runner; do
        python bench/slot_share.py "$(dirname "$(find $W/$d -name experiments.jsonl)")" | sed -n 3,5p; done
    for c in $W/hand-cache $W/warm0/pysource/compile-cache $W/on-hand/*/compile-cache \
            $W/on-runner/*/compile-cache; do     # the last two: what each trial left, kept
        echo "$c:"; for t in $c/*; do echo "  $(basename $t) $(find $t -type f | wc -l) files \
            $(du -s --apparent-size $t | cut -f1) KiB"; done; done ;;
mtimes)   # after warm2: by hand in the runner's environment from warm0's cache, each run's copy
          # of it made contents only (as the runner's copy_tree makes it), then with file times
          # and modes kept: the cache's files after each run (does the driver's JIT redo work?)
    S="python bench/startup_profile.py --data $W/data/pysource --budget 40 --no-profile \
        --runner-env --move-cache --cache-from $W/warm0/pysource/compile-cache --warm-runs 2"
    for c in plain keep; do echo "copy $c:"; CUDA_VISIBLE_DEVICES=0 $S --copy $c 2>&1 | tail -n 6
        done ;;
parts)
    CUDA_VISIBLE_DEVICES=0 AUTORESEARCH_OUT=$W/parts-out python bench/check_and_save.py \
        --data $W/data/pysource > $W/parts.log 2>&1; grep -v '^ *$' $W/parts.log | head -60
    for i in 1 2; do CUDA_VISIBLE_DEVICES=0 python -c "import time; t = time.time()
import torch; t1 = time.time(); torch.zeros(1, device='cuda'); torch.cuda.synchronize()
print(f'import torch {t1 - t:.2f} s, CUDA context {time.time() - t1:.2f} s')"; done
    python -X importtime -c "import torch" 2>&1 | sort -t'|' -k2 -n | tail -6
    python -c "import time; t = time.time(); import torch; t1 = time.time()
torch.compile(torch.nn.Linear(2, 2)); print(f'torch {t1 - t:.2f} s, torch.compile wrapper {time.time() - t1:.2f} s')" ;;
sample)
    S="python bench/startup_profile.py --data $W/data/pysource --budget 30 --no-profile \
        --runner-env --move-cache --copy runner --cache-from $W/warm0/pysource/compile-cache"
    CUDA_VISIBLE_DEVICES=0 $S --warm-runs 2 --sample > $W/sample.log 2>&1
    CUDA_VISIBLE_DEVICES=0 $S --warm-runs 3 --env TORCH_CACHING_PRECOMPILE=1 > $W/precompile.log 2>&1
    CUDA_VISIBLE_DEVICES=0 AUTORESEARCH_OUT=$W/parts-out python bench/check_and_save.py \
        --data $W/data/pysource --train-first > $W/first-check.log 2>&1
    grep -v '^ *$' $W/sample.log | cut -c1-160; cat $W/precompile.log
    grep -v '^ *$' $W/first-check.log | head -16 ;;
imports)  # after warm2, ~1 min: importing torch, Dynamo and inductor with warm0's bytecode
          # on this disk and on a tmpfs (/dev/shm), then one warm run sampled
    df -T /tmp $W /dev/shm | tail -n +2
    for where in disk shm disk shm; do
        d=$W/pc-disk; [ $where = shm ] && d=/dev/shm/pc; rm -rf $d
        cp -r $W/warm0/pysource/compile-cache/pycache $d; sync
        env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=$d python -c "import time; t = time.time()
import torch, torch._dynamo, torch._inductor.compile_fx, torch.export; print('$where', round(time.time() - t, 2), 's')"
    done
    CUDA_VISIBLE_DEVICES=0 python bench/startup_profile.py --data $W/data/pysource --budget 30 \
        --no-profile --runner-env --move-cache --copy runner --cache-from \
        $W/warm0/pysource/compile-cache --warm-runs 1 --sample > $W/sample2.log 2>&1
    grep -v '^ *$' $W/sample2.log | cut -c1-160 ;;
oninit)   # after warm2, ~4 min, GPU 0: train.py's model made on its device against made on the CPU
          # and copied over (as before 0e8537f), by hand in the runner's environment from warm0's
          # cache, alternating, ROUNDS (3) warm runs each
    python - <<'PY'
s = open("target/train.py").read()
new = "with torch.device(DEVICE):               # made where it trains: no init on the CPU to copy over\n    model = GPT(vocab_size, max_len)\n"
assert new in s
open("out/lease/train-cpu-init.py", "w").write(s.replace(new, "model = GPT(vocab_size, max_len).to(DEVICE)\n"))
PY
    S="python bench/startup_profile.py --data $W/data/pysource --budget 30 --no-profile \
        --runner-env --move-cache --copy runner --cache-from $W/warm0/pysource/compile-cache --warm-runs 1"
    for i in $(seq ${ROUNDS:-3}); do for t in target/train.py $W/train-cpu-init.py; do
        echo "$t: $(CUDA_VISIBLE_DEVICES=0 $S --train $t 2>&1 | grep '^warm:')"; done; done ;;
chain)
    N=${NAME:-yield-chain}
    setsid nohup $Y --data pysource=$W/data/pysource --gpus 0 --budget 60 --minutes ${MINUTES:-3.5} \
        --noise-runs ${NOISE:-3} --same-seed-runs 0 --overlap-scoring --out $W/$N \
        --cache-from ${CACHE:-$W/warm0/pysource/compile-cache} > $W/$N.log 2>&1 < /dev/null &
    setsid nohup bash -c "mkdir -p $W/$N-lists; n=0; last=; while pgrep -f research_[y]ield.py \
        > /dev/null; do c=\$(ls -d \${TMPDIR:-/tmp}/yield-*/pysource/runs/yield-pysource/compile-cache \\
            2> /dev/null | head -1)
        if [ -n \"\$c\" ]; then l=\$(cd \$c && find . -type f -printf '%P %s\\n' | sort)
            if [ \"\$l\" != \"\$last\" ]; then n=\$((n + 1)); last=\$l
                echo \"\$l\" > $W/$N-lists/\$n-\$(date +%H%M%S).txt; fi; fi; sleep 1; done" \
        < /dev/null > /dev/null 2>&1 &
    sleep 3; tail -n 2 $W/$N.log ;;
chainreport)
    N=${NAME:-yield-chain}
    python bench/slot_share.py "$(dirname "$(find $W/$N -name experiments.jsonl)")" | sed -n 3,12p
    python - $W/$N <<'PY'
import glob, json, sys
for f in glob.glob(sys.argv[1] + "/*/experiments.jsonl"):
    for line in open(f):
        r = json.loads(line); s = r.get("summary") or {}
        fb = next((x for x in (r.get("log_tail") or "").splitlines() if x.startswith("fallback saved")), "")
        end = r["phases"].get("train", 0) - float(s.get("total_seconds", "nan"))
        print(f"#{r['number']} {r['role']}: exit {r.get('exit_code')}, stopped {r.get('stopped_at_deadline')}, "
              f"summary at {s.get('total_seconds')} s, left {s.get('left_seconds')} s, process ended "
              f"{end:.2f} s after it; {fb[16:]}")
PY
    for f in $(ls $W/$N-lists | sort -n); do echo "$f nv: $(grep -c '^nv/' $W/$N-lists/$f) files"; done ;;
alone)
    loop_then_long yield-solo
    sleep 3; tail -n 2 $W/yield-solo.log ;;
overlap)
    setsid nohup bash -c "$Y --data pysource=$W/data/pysource --gpus 0 --budget 60 \
        --minutes ${MINUTES:-5} --cache-from $W/warm0/pysource/compile-cache --overlap-scoring \
        --out $W/yield-beside > $W/yield-beside.log 2>&1;
        $Y --data pysource=$W/data/pysource --gpus 0 --budget 300 --minutes 0.01 --noise-runs 1 \
        --same-seed-runs 0 --cache-from $W/warm0/pysource/compile-cache --overlap-scoring \
        --out $W/long > $W/long.log 2>&1" < /dev/null > /dev/null 2>&1 &
    setsid nohup bash -c "$Y --data pysource=$W/data/pysource --gpus 1 --budget 60 \
        --minutes ${MINUTES:-5} --cache-from $W/warm1/pysource/compile-cache --no-overlap-scoring \
        --out $W/yield-alone > $W/yield-alone.log 2>&1;
        python bench/overlap_check.py --data $W/data/shakespeare --gpu 1 > $W/hog.log 2>&1" \
        < /dev/null > /dev/null 2>&1 &
    sleep 3; tail -n 2 $W/yield-*.log ;;
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
    while [ $SECONDS -lt $end ] && pgrep -f "bench/research_yield.py|bench/overlap_check.py" > /dev/null; do sleep 20
        for f in $W/yield-*.log $W/long*.log $W/hog.log; do [ -f $f ] && echo "$(date +%T) $f: $(tail -n 1 $f | cut -c1-150)"; done; done
    pgrep -f "bench/research_yield.py|bench/overlap_check.py" > /dev/null && echo "still running" || echo "all done" ;;
collect)
    mkdir -p $OUT
    cp $W/*.log $OUT/ 2>/dev/null
    for d in $W/warm0 $W/warm1 $W/yield-* $W/long*; do [ -d $d ] || continue; n=$(basename $d)
        mkdir -p $OUT/$n; cp $d/results.md $d/results.json $OUT/$n/ 2>/dev/null
        find $d -name experiments.jsonl | while read f; do cp $f $OUT/$n/; done; done
    nvidia-smi --query-gpu=index,name,driver_version --format=csv > $OUT/gpus.csv
    ls -R $OUT | head -40 ;;
esac
