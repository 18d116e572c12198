#!/usr/bin/env bash
# One GPU session's checks, most important first, each under its own time limit, for a lent H100/H200
# (torch, transformers, peft, accelerate preinstalled; no network). Run from the project root after
# `bash ../shared/gpu/wheels.sh` gathered .whl/ here (carry `.whl` to the device machine):
#
#   bash bench/gpu_session.sh tests rollout      # first call: the GPU test suite, then the rollout engine
#   bash bench/gpu_session.sh ppo                # second call: bench/ppo.py --gpu-suite
#   bash bench/gpu_session.sh sft                # or: bench/sft.py --gpu-suite (SFT and reward model)
#
# Steps: tests (make test-gpu), rollout (bench/rollout.py), ppo (bench/ppo.py --gpu-suite), sft
# (bench/sft.py --gpu-suite). Each writes its log to $OUT (the device tool's output folder) or runs/gpu_session/,
# and the benchmarks write their sections of bench/RESULTS.md, which is copied there at the end.
# Limits (seconds) per step: TESTS_S, ROLLOUT_S, PPO_S, SFT_S.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_session}
mkdir -p "$out"
python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null || {
  echo "bench/gpu_session.sh: no CUDA device here; these checks need a GPU" >&2
  exit 2
}
site=$PWD/.whl/site
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/device.txt"

run_step() {  # name, limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after 10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s (log: $out/$name.log)"
  tail -n 15 "$out/$name.log"
}

for step in "${@:-tests rollout}"; do
  for name in $step; do
    case $name in
      tests) run_step tests "${TESTS_S:-300}" make test-gpu ;;
      rollout) run_step rollout "${ROLLOUT_S:-240}" python3 bench/rollout.py ;;
      ppo) run_step ppo "${PPO_S:-500}" python3 bench/ppo.py --gpu-suite ;;
      sft) run_step sft "${SFT_S:-500}" python3 bench/sft.py --gpu-suite ;;
      *) echo "bench/gpu_session.sh: unknown step $name (tests, rollout, ppo, sft)" >&2; exit 2 ;;
    esac
  done
done
cp bench/RESULTS.md "$out/RESULTS.md"
