#!/usr/bin/env bash
# Run a command on one GPU that no other container of this deployment is using.
#
# `docker compose up --scale worker=N` gives every replica the same device request, so with
# `count: 1` all N replicas would land on GPU 0. Each worker container therefore sees every GPU
# and claims one here: an exclusive flock on DATA_DIR/gpu-locks/<uuid>.lock on the shared data
# volume. The lock is held on fd 9, which the command inherits through exec, and the kernel
# drops it when the container stops or dies, so a restarted or scaled-up replica takes the GPU
# that is free. When every GPU is held, the replica waits as a standby.
#
# Skipped (the command runs as it is) when CUDA_VISIBLE_DEVICES is already set, when
# SMOOTHCERT_DEVICE is cpu, or when no NVIDIA GPU is visible (the worker then runs on the CPU).
set -euo pipefail
# What the worker writes on the data volume (models, datasets, inputs, results) is its user's
# only: files 0600, folders 0700. The worker sets the same umask itself as it starts.
umask 077

if [[ $# -eq 0 ]]; then
    echo "usage: gpu-claim.sh COMMAND [ARG...]" >&2
    exit 2
fi
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" || "${SMOOTHCERT_DEVICE:-auto}" == cpu ]]; then
    exec "$@"
fi

gpus=()
if command -v nvidia-smi >/dev/null 2>&1; then
    mapfile -t gpus < <(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null | tr -d ' ' || true)
fi
if [[ ${#gpus[@]} -eq 0 || -z "${gpus[0]}" ]]; then
    echo "gpu-claim: no NVIDIA GPU visible; running on the CPU" >&2
    exec "$@"
fi

lock_dir="${GPU_CLAIM_DIR:-${SMOOTHCERT_DATA_DIR:-/data}/gpu-locks}"
mkdir -p "$lock_dir"
while true; do
    for gpu in "${gpus[@]}"; do
        exec 9>>"$lock_dir/$gpu.lock"
        if flock --exclusive --nonblock 9; then
            echo "gpu-claim: running on GPU $gpu" >&2
            export CUDA_VISIBLE_DEVICES="$gpu"
            exec "$@"
        fi
        exec 9>&-
    done
    echo "gpu-claim: all ${#gpus[@]} GPUs are held by other containers; waiting for one to free up" >&2
    sleep "${GPU_CLAIM_WAIT_S:-30}"
done
