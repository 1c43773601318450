#!/usr/bin/env bash
# Sparse Model Soups without a coordinator: every phase is one `fedsms prune`, m independent
# `fedsms retrain` processes (in the background here; on other machines just as well) and
# one `fedsms soup` that closes the phase.
#
#   examples/decentralized/run_sms.sh DENSE OUT [prune options...]
#
# DENSE  a dense checkpoint (e.g. runs/x/checkpoints/seed0-dense from `fedsms local`, or a
#        model's state dict as X.safetensors: its mask is all ones)
# OUT    folder for phaseP/{pruned,candidateI,soup}.* and the candidates' logs
# prune options (e.g. --phases 3 --target-sparsity 0.9 --seed 0) set the job's config; the
#        pruned checkpoint records it, so retrain and soup read it from there.
#
# Environment:
#   CANDIDATES    m, candidate processes per phase (default 2)
#   STEPS         prune steps to run (default: the --phases given, else 3; set it to
#                 the number of mask updates with --schedule gmp)
#   THREADS       torch threads per process (default 1; fedsms local must use the same
#                 number for a bit-for-bit equal soup on CPU)
#   RETRAIN_ARGS  extra options of every `fedsms retrain` (split at spaces, no quoting: "--device cuda --recipe lr=0.05,0.1")
#   SOUP_ARGS     options of every `fedsms soup` (default "--recalibrate", as fedsms local
#                 recalibrates norm statistics; add "--merge greedy" for the greedy soup)
#   FEDSMS        the fedsms command (default: fedsms)
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 DENSE OUT [prune options...]" >&2
    exit 2
fi
dense=$1 out=$2
shift 2
m=${CANDIDATES:-2}
fedsms=${FEDSMS:-fedsms}
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
read -r -a retrain_args <<< "${RETRAIN_ARGS:-}"
read -r -a soup_args <<< "${SOUP_ARGS---recalibrate}"

steps=${STEPS:-}
if [[ -z $steps ]]; then  # --phases N among the prune options, else 3 (the default of fedsms local)
    steps=3
    args=("$@")
    for ((k = 0; k < ${#args[@]}; k++)); do
        [[ ${args[k]} == --phases ]] && steps=${args[k + 1]}
        [[ ${args[k]} == --phases=* ]] && steps=${args[k]#--phases=}
    done
fi

start=$dense
for ((p = 1; p <= steps; p++)); do
    dir=$out/phase$p
    mkdir -p "$dir"
    "$fedsms" prune "$start" --phase "$p" "$@" -o "$dir/pruned"
    pids=() candidates=()
    for ((i = 0; i < m; i++)); do
        "$fedsms" retrain "$dir/pruned" --candidates "$m" --candidate "$i" "${retrain_args[@]}" \
            -o "$dir/candidate$i" > "$dir/candidate$i.log" 2>&1 &
        pids+=($!) candidates+=("$dir/candidate$i")
    done
    for ((i = 0; i < m; i++)); do
        if ! wait "${pids[i]}"; then
            echo "$0: candidate $i of phase $p failed; see $dir/candidate$i.log" >&2
            exit 1
        fi
    done
    "$fedsms" soup "${candidates[@]}" "${soup_args[@]}" -o "$dir/soup"
    start=$dir/soup
done
echo "final soup: $out/phase$steps/soup.safetensors"
