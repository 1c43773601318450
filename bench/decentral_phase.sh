#!/usr/bin/env bash
# Wall time of one decentralized SMS phase (prune, m `fedsms retrain` processes, soup) with
# the m candidates in parallel against the same candidates one after another, one torch
# thread per process, with the load average beside each figure.
#
#   bench/decentral_phase.sh [OUT] [m] [repeats] [extra fedsms local options...]
set -euo pipefail
out=${1:-runs/bench-decentral}
m=${2:-2}
repeats=${3:-2}
shift $(($# < 3 ? $# : 3))
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
rm -rf "$out" && mkdir -p "$out"
fedsms local --dataset digits --model cnn --methods imp --phases 3 --candidates "$m" --retrain-epochs 3 \
    --pretrain-epochs 1 --ood false --device cpu --out-dir "$out/local" "$@" > "$out/local.log"
dense=$out/local/checkpoints/seed0-dense

phase() {  # $1: parallel|sequential, $2: folder
    local dir=$2 pids=() i
    fedsms prune "$dense" --phase 1 -o "$dir/pruned" > /dev/null
    for ((i = 0; i < m; i++)); do
        if [[ $1 == parallel ]]; then
            fedsms retrain "$dir/pruned" --candidate "$i" --device cpu -o "$dir/c$i" > /dev/null &
            pids+=($!)
        else
            fedsms retrain "$dir/pruned" --candidate "$i" --device cpu -o "$dir/c$i" > /dev/null
        fi
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    fedsms soup $(for ((i = 0; i < m; i++)); do echo "$dir/c$i"; done) -o "$dir/soup" > /dev/null
}

printf '%-10s %3s %8s  %s\n' mode m seconds "load average before → after"
for ((r = 1; r <= repeats; r++)); do
    for mode in parallel sequential; do
        before=$(cut -d' ' -f1-3 /proc/loadavg)
        start=$(date +%s.%N)
        phase "$mode" "$out/$mode$r"
        seconds=$(echo "$(date +%s.%N) - $start" | bc)
        printf '%-10s %3d %8.2f  %s → %s\n' "$mode" "$m" "$seconds" "$before" "$(cut -d' ' -f1-3 /proc/loadavg)"
    done
done
cmp "$out/parallel1/soup.safetensors" "$out/sequential1/soup.safetensors" && echo "parallel and sequential soups are identical"
