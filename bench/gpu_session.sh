#!/usr/bin/env bash
# One GPU session's checks, most important first, each under its own time limit, for a lent H100/H200
# (torch, transformers, peft, accelerate preinstalled; no network). Prepare here, in the project root:
#
#   bash ../shared/gpu/wheels.sh                                      # datasets, trl 1.16, fairscale -> .whl/
#   pip download --no-deps trl==0.25.1 -d .whl/trl-0.25.1             # TRL's PPOTrainer, in a folder of its own
#   pip download --no-deps transformers==X peft==Y -d .whl            # optional: this checkout's versions
#   pip download --no-deps liger-kernel==0.8.5 -d .whl                # optional: the SFT liger rows (Triton)
#   mkdir -p .benchdata && cp -r ../shared/data/gsm8k ../shared/data/hh-rlhf .benchdata/   # variable lengths
#
# then on the device machine (carry .whl and .benchdata; both are git-ignored), two calls back to back on one
# warm machine (a machine goes back 30 s after a call: have the second call ready; a lease is 15 minutes,
# start-up included, and a command at most 10):
#
#   ENGINETESTS_S=140 ROLLOUT_S=190 ROLLOUT_ROWS=ours-merged-compiled,hf-generate,hf-generate-static-cache \
#   PPO_S=230 PPO_ROWS=trl-grpo,ours-grpo-fast,ours-gae-fast \
#     bash bench/gpu_session.sh enginetests rollout ppo                       # first call, ~9.5 minutes
#   (the peer rows before the second of ours: a row that does not fit its estimate into the time left is
#   skipped, and a comparison needs the peer; every step's RESULTS.md is copied to $OUT as it ends)
#   SFT_S=<device time left - 40> bash bench/gpu_session.sh sft              # second call, at once
#   # time left: PPO_ROWS=ours-gae-compiled,ours-grpo-compiled ... ppo (--torch_compile: the decoder layers
#   # compiled, its compile in the first step: the table's first-step column); PPO_ROWS=ours-large,trl-ppo ... ppo;
#   # ROLLOUT_ROWS=hf-generate-static-cache,ours-tp,... rollout
#   # where a PPO step's time goes (--profile_step: matmul / attention / other in the row's JSON line):
#   # PPO_ROWS=ours-gae-fast-profile ... ppo
#
# Rows are skipped by their own estimates (GPU_ROW_SECONDS in bench/rollout.py, bench/ppo.py, bench/sft.py),
# not by the slowest row so far. When the merged or compiled engine fails its GPU tests (enginetests), the
# rollout and PPO rows fall back to the unmerged, uncompiled engine (their rows would fail after compiling).
# Each call copies the checkout afresh, and each benchmark rewrites its RESULTS.md sections with only the
# rows of its run: keep every call's returned RESULTS.md and merge them (and the rows of earlier sessions
# the new ones are compared against) by hand.
#
# Issue 13 closes only with its whole table from one run: ours (the fastest variant), hf-generate,
# hf-generate-static-cache and the 7B rows (e.g. ours-merged-compiled@7b, hf-generate@7b); if the first
# call shows <= 3 ms, spend the rest of the lease on those rows rather than on the PPO/SFT extras.
#
# Steps: enginetests (the engine's CUDA-graph tests and the packed-attention GPU test), rollout
# (bench/rollout.py; ROLLOUT_ROWS=a,b picks rows and their order), ppo (bench/ppo.py --gpu-suite; PPO_ROWS=a,b
# picks rows), sft (bench/sft.py --gpu-suite: SFT and reward model), tests (the gpu-marked tests of
# tests/test_gpu.py: the seed commands in fp16 and bf16; and of tests/test_ppo_memory.py: a GPU PPO run logs
# and records its peak memory). Each writes its log to $OUT (the device tool's output folder) or
# runs/gpu_session/; the benchmarks print each row as a JSON line as it finishes and write their sections of
# bench/RESULTS.md (only the rows of that run), which is copied there at the end. Limits (seconds):
# ENGINETESTS_S, ROLLOUT_S, PPO_S, SFT_S, TESTS_S.
#
# Seen on an H200 (2026-11-27): enginetests 46 s (before the merged/compiled graph tests, which compile with
# inductor: hence the 140 s default); a rollout row 25-45 s (the model build ~20 s once); an SFT
# row ~20 s; PPO: build ~25 s, a 1.1B row 35-45 s, TRL GRPOTrainer ~60 s, the 7B row ~100 s with its build.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_session}
mkdir -p "$out"
python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null || {
  echo "bench/gpu_session.sh: no CUDA device here; these checks need a GPU" >&2
  exit 2
}
site=/tmp/gpu_session_site
if ls .whl/*.whl >/dev/null 2>&1; then  # one wheel at a time: a bad optional wheel costs only its own rows
  for wheel in .whl/*.whl; do
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheel" \
      >>"$out/setup.log" 2>&1 || echo "== setup: $wheel did not install (see setup.log)" | tee -a "$out/device.txt"
  done
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export BENCH_MODEL_CACHE=${BENCH_MODEL_CACHE:-/tmp/bench_model_cache}  # one build per model, shared by calls
[ -d .benchdata ] && export BENCH_SHARED_DATA=$PWD/.benchdata
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee -a "$out/device.txt"

run_step() {  # name, limit in seconds, shell command
  local name=$1 limit=$2 cmd=$3
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $cmd" | tee -a "$out/device.txt"
  timeout --kill-after 10 "$limit" bash -c "$cmd" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$out/device.txt"
  tail -n 25 "$out/$name.log"
  cp bench/RESULTS.md "$out/RESULTS.md"  # after every step: a call cut short keeps the finished steps' tables
}

pytest="python3 -m pytest -q -p no:cacheprovider -o addopts="
for name in "$@"; do
  case $name in
    enginetests) run_step enginetests "${ENGINETESTS_S:-140}" \
        "$pytest -m gpu tests/test_generation_gpu.py; a=\$?; $pytest tests/test_packed_attention.py -k on_gpu; b=\$?; exit \$((a || b))"
      # the merged or compiled engine failed on the GPU: its rows would fail too, after their compile time
      if grep -qE "^FAILED .*(merged|compiled)" "$out/enginetests.log"; then
        echo "== merged/compiled engine tests failed: rollout/PPO rows use the unmerged, uncompiled engine" | tee -a "$out/device.txt"
        if [ -n "${ROLLOUT_ROWS:-}" ]; then
          ROLLOUT_ROWS=$(echo "$ROLLOUT_ROWS" | tr ',' '\n' | grep -vE "merged|compiled" | paste -sd, -)
          ROLLOUT_ROWS=${ROLLOUT_ROWS:-ours,hf-generate}
        fi
        [ -n "${PPO_ROWS:-}" ] && PPO_ROWS=$(echo "$PPO_ROWS" | tr ',' '\n' | grep -v -- '-profile$' | sed -E 's/-(fast|compiled)$//' | awk '!seen[$0]++' | paste -sd, -)
      fi ;;
    rollout) run_step rollout "${ROLLOUT_S:-130}" "python3 bench/rollout.py --budget $((${ROLLOUT_S:-130} - 10))${ROLLOUT_ROWS:+ --rows $ROLLOUT_ROWS}" ;;
    ppo) run_step ppo "${PPO_S:-270}" "python3 bench/ppo.py --gpu-suite --budget $((${PPO_S:-270} - 10))${PPO_ROWS:+ --rows $PPO_ROWS}" ;;
    sft) run_step sft "${SFT_S:-200}" "python3 bench/sft.py --gpu-suite --budget $((${SFT_S:-200} - 10))" ;;
    tests) run_step tests "${TESTS_S:-150}" "$pytest -m gpu tests/test_gpu.py tests/test_ppo_memory.py" ;;
    *) echo "bench/gpu_session.sh: unknown step $name (enginetests, rollout, ppo, sft, tests)" >&2; exit 2 ;;
  esac
done
cp bench/RESULTS.md "$out/RESULTS.md"
