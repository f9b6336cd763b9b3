#!/usr/bin/env bash
# Launch scripts/train.py on one or more nodes with torchrun (one process per GPU).
#
#   ./scripts/train.sh --config configs/config.yaml --gpus-per-node 8
#   ./scripts/train.sh --config configs/config.yaml --gpus-per-node 8 --nnodes 2 --node-rank 0 \
#       --master-addr 10.0.0.1 --master-port 29500 [--set train_config.lr=3e-4 ...] [--resume [PATH]]
#
# On a machine without GPUs the processes train on CPU with the gloo backend (used by the tests).
# DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }

config="" gpus="" nnodes=1 node_rank=0 master_addr="127.0.0.1" master_port=29500
passthrough=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="${2:?--config needs a path}"; shift 2 ;;
    --gpus-per-node) gpus="${2:?--gpus-per-node needs a number}"; shift 2 ;;
    --nnodes) nnodes="${2:?}"; shift 2 ;;
    --node-rank) node_rank="${2:?}"; shift 2 ;;
    --master-addr) master_addr="${2:?}"; shift 2 ;;
    --master-port) master_port="${2:?}"; shift 2 ;;
    --set) passthrough+=("--set" "${2:?--set needs KEY=VALUE}"); shift 2 ;;
    --resume)
      if [[ $# -gt 1 && "$2" != --* ]]; then passthrough+=("--resume" "$2"); shift 2
      else passthrough+=("--resume"); shift; fi ;;
    -h|--help) usage 0 ;;
    *) echo "error: unknown argument $1" >&2; usage ;;
  esac
done
[[ -n "$config" ]] || { echo "error: --config is required" >&2; exit 2; }
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || { echo "error: --gpus-per-node must be a positive integer, got '${gpus}'" >&2; exit 2; }
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || { echo "error: --nnodes must be a positive integer, got '${nnodes}'" >&2; exit 2; }
[[ "$node_rank" =~ ^[0-9]+$ && "$node_rank" -lt "$nnodes" ]] || { echo "error: --node-rank must be in [0, ${nnodes})" >&2; exit 2; }
[[ -f "$config" ]] || { echo "error: config file '${config}' does not exist" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then python="$here/../.venv/bin/python"; else python="$(command -v python3 || command -v python)"; fi
fi
cmd=("$python" -m torch.distributed.run
     --nnodes "$nnodes" --node-rank "$node_rank" --nproc-per-node "$gpus"
     --master-addr "$master_addr" --master-port "$master_port"
     "$here/train.py" --config "$config" "${passthrough[@]}")
# One OpenMP thread per process unless the caller chose: N processes x all cores oversubscribes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ "${DRY_RUN:-0}" == "1" ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
# Bad input once, in one line, with exit 2 (under torchrun every rank would print it, then torchrun a traceback).
"$python" "$here/train.py" --config "$config" "${passthrough[@]}" --check --world-size $((nnodes * gpus)) || exit $?
exec "${cmd[@]}"
