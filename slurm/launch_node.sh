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
# Several processes (any node count) run under `accelerate launch --multi_gpu`: without it each process
# trains alone, unsynchronised, into one run dir. A single process in all runs as plain python: accelerate's
# one-process launcher SIGKILLs its child 5 s after a SIGTERM, which would cut the signal's checkpoint short.
LAUNCH=("$PY" train/main.py)
if [ "$TOTAL" -gt 1 ]; then
  LAUNCH=("$PY" -m accelerate.commands.launch --multi_gpu
          --num_machines "$NNODES" --machine_rank "$SLURM_NODEID" --num_processes "$TOTAL"
          --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
          --rdzv_backend static --same_network --dynamo_backend no train/main.py)
fi
# srun's signals (SIGUSR1 at the --signal lead time, SIGTERM on scancel/preemption) reach every process of
# the step: the launcher, whose torch elastic agent stops its workers, and the training processes.
# The node's exit code is what the training reported in $LDM_OUTCOME, not the launcher's: SLURM signals the
# launcher as well, and a launcher signalled after the last step says 143 for a run that completed.
# This shell waits for the launcher (a trapped signal runs only once the launcher has exited).
LDM_OUTCOME=$(mktemp "${TMPDIR:-/tmp}/ldm-outcome.XXXXXX")
export LDM_OUTCOME
trap 'true' TERM USR1
rc=0
"${LAUNCH[@]}" "$@" || rc=$?
outcome=$(cat "$LDM_OUTCOME" 2>/dev/null || true)
rm -f "$LDM_OUTCOME"
case "$outcome" in
  completed) exit 0 ;;
  "stopped "*) exit "${outcome#stopped }" ;;
  *) exit "$rc" ;;
esac
