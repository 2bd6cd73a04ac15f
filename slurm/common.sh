# Sourced by slurm/train.sbatch and slurm/train_cpu.sbatch (set PROCS_PER_NODE first): the job-wide
# settings, then one launch_node.sh per node with the user's arguments intact ("$@").
PY=${PY:-.venv/bin/python}  # the submit dir's venv (sbatch --chdir / cd to the repo); override with PY=...
export PY PROCS_PER_NODE
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The head node's address as SLURM knows it (NodeAddr; equals its name on most clusters, an IP on the CI one).
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$HEAD_NODE" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)}
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}  # per job: jobs may share a node
# Signals: torch elastic's agent (inside `accelerate launch`) dies on SIGUSR1 unless told to forward it,
# and gives the training processes TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds to finish their checkpoint
# before SIGKILL (default 30): set it to the --signal lead time.
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-180}
echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
     "$SLURM_NNODES node(s) x $PROCS_PER_NODE process(es), head $MASTER_ADDR:$MASTER_PORT"
# --kill-on-bad-exit: one node failing ends the others instead of leaving them in a collective.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 slurm/launch_node.sh "$@"
