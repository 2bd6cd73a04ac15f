#!/usr/bin/env bash
# One node's share of a SLURM job. The sbatch scripts run it once per node
# (`srun --ntasks-per-node=1 slurm/launch_node.sh ARGS...`); it starts PROCS_PER_NODE training processes
# with `accelerate launch`, node SLURM_NODEID of SLURM_NNODES, rendezvous at MASTER_ADDR:MASTER_PORT.
# The training arguments pass through "$@" untouched: data.shards='/d/{000000..000099}.tar' reaches Hydra
# as typed (no inner shell re-parses them).
set -euo pipefail
: "${SLURM_NODEID:?launch_node.sh runs under srun (SLURM_NODEID is unset)}"
: "${PROCS_PER_NODE:?set PROCS_PER_NODE (GPUs per node, or processes per CPU node)}"
: "${MASTER_ADDR:?set MASTER_ADDR (the job head node)}"
: "${MASTER_PORT:?set MASTER_PORT}"
PY=${PY:-.venv/bin/python}
NNODES=${SLURM_NNODES:-1}
TOTAL=$(( NNODES * PROCS_PER_NODE ))
# Several processes (any node count) need --multi_gpu: without it each process trains alone, unsynchronised,
# into one run dir. A single process total is a plain run.
MULTI=()
if [ "$TOTAL" -gt 1 ]; then MULTI=(--multi_gpu); fi
# exec: srun's signals (SIGUSR1 at the --signal lead time, SIGTERM on scancel/preemption) reach the
# launcher, whose torch elastic agent forwards them to the training processes (TORCHELASTIC_SIGNALS_TO_HANDLE).
exec "$PY" -m accelerate.commands.launch "${MULTI[@]}" \
  --num_machines "$NNODES" --machine_rank "$SLURM_NODEID" --num_processes "$TOTAL" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  --rdzv_backend static --same_network --dynamo_backend no \
  train/main.py "$@"
