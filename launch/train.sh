#!/usr/bin/env bash
# ---- help: `launch/train.sh --help` prints the lines from here to "end of help", without the leading "# " ----
# Launch moe-recipe training through the DeepSpeed launcher.
#
# Usage: launch/train.sh [options] [-- extra recipe.train args, e.g. --set model.num_experts=16 --resume]
#
# Knobs (flags, or the environment variables in brackets):
#   --nproc N          ranks per node                                  [NPROC, default 2]
#   --config FILE      model/train config, InternEvo style               [CONFIG, default recipe/configs/tiny_finegrained.py]
#   --ds_config FILE   DeepSpeed JSON: ZeRO stage, precision, ep_size    [DS_CONFIG, default ds_configs/zero2_fp32_ep2.json]
#   --run_dir DIR      checkpoints, metrics.jsonl, summary.json          [RUN_DIR, default: train.run_dir of the config]
#   --hostfile FILE    multi-node: DeepSpeed hostfile ("host slots=N" per line); the launcher ssh-es to each host
#   --nnodes N         multi-node without ssh: start this script on every node with the same
#   --node_rank R        --nnodes/--master_addr/--master_port and its own --node_rank (0 .. N-1)
#   --master_addr A    address of node 0 (default 127.0.0.1)             [MASTER_ADDR]
#   --master_port P    port on node 0 (default 29500)                    [MASTER_PORT]
#   --python PY        interpreter (default .venv/bin/python if present, else python3)
#
# Examples:
#   launch/train.sh                                              # default tiny MoE, 2 ranks, EP=2, ZeRO-2 fp32
#   launch/train.sh --nproc 4 --ds_config ds_configs/zero1_bf16_ep2.json -- --set train.steps=200
#   launch/train.sh --hostfile hosts.txt --nproc 8 --ds_config my_ep8.json       # N nodes x 8 ranks, via ssh
#   # two nodes without ssh (run one line on each node):
#   launch/train.sh --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --nproc 8
#   launch/train.sh --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --nproc 8
#
# DeepSpeed's log lines (launcher and ranks) are hidden; MOE_RECIPE_DS_LOG=info shows them. A failed launch ends
# with one line: failed before training started, or the newest complete checkpoint to continue from with
# -- --resume, or that nothing was saved yet.
# ---- end of help ----
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-2}
CONFIG=${CONFIG:-recipe/configs/tiny_finegrained.py}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_fp32_ep2.json}
RUN_DIR=${RUN_DIR:-}
HOSTFILE=""
NNODES=""
NODE_RANK=""
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PY=""
EXTRA=()

die() { echo "launch/train.sh: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) need "$@"; NPROC=$2; shift 2 ;;
    --config) need "$@"; CONFIG=$2; shift 2 ;;
    --ds_config) need "$@"; DS_CONFIG=$2; shift 2 ;;
    --run_dir) need "$@"; RUN_DIR=$2; shift 2 ;;
    --hostfile) need "$@"; HOSTFILE=$2; shift 2 ;;
    --nnodes) need "$@"; NNODES=$2; shift 2 ;;
    --node_rank) need "$@"; NODE_RANK=$2; shift 2 ;;
    --master_addr) need "$@"; MASTER_ADDR=$2; shift 2 ;;
    --master_port) need "$@"; MASTER_PORT=$2; shift 2 ;;
    --python) need "$@"; PY=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) awk '/^# ---- help:/ {on = 1; next} /^# ---- end of help/ {exit} on {sub(/^# ?/, ""); print}' "$0"
               exit 0 ;;
    *) die "unknown option '$1' (see --help; pass recipe.train arguments after --)" ;;
  esac
done

[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$NPROC'"
[ -f "$CONFIG" ] || die "config '$CONFIG' not found (see recipe/configs/)"
[ -f "$DS_CONFIG" ] || die "ds_config '$DS_CONFIG' not found (see ds_configs/)"
[ -z "$HOSTFILE" ] || [ -f "$HOSTFILE" ] || die "hostfile '$HOSTFILE' not found"
if [ -n "$NNODES" ] || [ -n "$NODE_RANK" ]; then
  [ -n "$NNODES" ] && [ -n "$NODE_RANK" ] || die "--nnodes and --node_rank go together"
  [ -z "$HOSTFILE" ] || die "use either --hostfile (ssh launch) or --nnodes/--node_rank (one launcher per node)"
fi
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

ARGS=(--config "$CONFIG" --ds_config "$DS_CONFIG")
[ -z "$RUN_DIR" ] || ARGS+=(--run_dir "$RUN_DIR")
if [ -n "$NNODES" ]; then
  [[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer, got '$NNODES'"
  [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] || die "--node_rank must be in 0..$((NNODES - 1))"
  # No ssh: DeepSpeed's per-node launcher starts this node's ranks; world_info lists every node's slots.
  WORLD_INFO=$("$PY" -c 'import base64, json, sys; n, p = int(sys.argv[1]), int(sys.argv[2]); print(base64.urlsafe_b64encode(json.dumps({f"node{i}": list(range(p)) for i in range(n)}).encode()).decode())' "$NNODES" "$NPROC")
  LAUNCH=(launch --world_info "$WORLD_INFO" --node_rank "$NODE_RANK"
          --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
  LAUNCH=(runner --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --num_gpus "$NPROC")
  [ -z "$HOSTFILE" ] || LAUNCH+=(--hostfile "$HOSTFILE")
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# glibc serves blocks above 32 MB (the stacked experts' weight gradients, fresh every step) with mmap and
# unmaps them at free, so every step page-faults them in again: +40% layer time at 64 experts (make bench).
# Keep big blocks in the heap for reuse instead; set these variables yourself to override.
export MALLOC_MMAP_MAX_=${MALLOC_MMAP_MAX_-0} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_-17179869184} \
       MALLOC_TOP_PAD_=${MALLOC_TOP_PAD_-268435456}
# recipe.launcher runs DeepSpeed's runner (or per-node launch) quietly and ends a failed launch with one line of
# advice read from the run folder; the exit code is the launcher's.
exec "$PY" -m recipe.launcher "${LAUNCH[@]}" --module recipe.train "${ARGS[@]}" "${EXTRA[@]}"
