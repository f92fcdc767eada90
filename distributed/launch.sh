#!/usr/bin/env bash
# Launch one node of a multi-node schedany job with torchrun and c10d rendezvous.
#
# Run the same command on every node; the nodes find each other through the
# rendezvous endpoint (any one node's host:port, reachable from all of them).
#
#   NNODES=2 NPROC_PER_NODE=4 RDZV_ENDPOINT=node0.example:29400 JOB_ID=gnts-1 \
#       distributed/launch.sh examples/configs/gnts.yaml --set train.steps=2000
#
# Environment (defaults in brackets):
#   NNODES          number of nodes, or a MIN:MAX range for elastic jobs [1]
#   NPROC_PER_NODE  processes per node: a number, "gpu" or "cpu" [1]
#   RDZV_ENDPOINT   host:port of the rendezvous store [127.0.0.1:29400]
#   JOB_ID          rendezvous id; equal on all nodes, unique per job [schedany]
#   MAX_RESTARTS    elastic restarts before the job fails [3]
#   RDZV_TIMEOUT    seconds to wait for all nodes at each rendezvous [900]
#   SHUTDOWN_TIMEOUT  seconds the workers get to checkpoint after a SIGTERM or
#                   SIGUSR1 before torchrun kills them [120]
#   PYTHON          the interpreter that has schedany installed [python3]
# Everything after the config path is passed to `schedany train`.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
config="$1"
shift

# Each rendezvous round gets a fresh store for the workers' process group. Sharing
# torchrun's own store (the default since torch 2.5) lets restarted workers read the
# previous round's keys and hang (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

# Preemption (docs/operations.md): torchrun passes SIGTERM, and with this SIGUSR1 (what
# SLURM sends ahead of a time limit), to every worker, which checkpoints its step and
# exits; it waits SHUTDOWN_TIMEOUT seconds before SIGKILL. Set as torchrun's environment
# (PET_*, TORCH_ELASTIC_*), which a torchrun too old to know them ignores.
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-120}"

exec "${PYTHON:-python3}" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --nproc-per-node="${NPROC_PER_NODE:-1}" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="${RDZV_ENDPOINT:-127.0.0.1:29400}" \
    --rdzv-id="${JOB_ID:-schedany}" \
    --rdzv-conf="timeout=${RDZV_TIMEOUT:-900}" \
    --max-restarts="${MAX_RESTARTS:-3}" \
    -m schedany train "$config" "$@"
