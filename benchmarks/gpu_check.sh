#!/usr/bin/env bash
# The GPU checks of issue 27, for a machine with CUDA (steps within 8 minutes on one H100/H200):
#   0. setup (outside the 8 minutes): a Python that imports raycap and pytest (below), then torch must see CUDA;
#   1. the CUDA tests (pytest -m cuda): graph decoder, rollouts and select on CUDA equal to CPU captions for a
#      seed, bf16 agreement, NCCL weight broadcast (tests/test_nccl.py: rank 0 alone on one GPU, two ranks when
#      two GPUs exist);
#   2. benchmarks/paper_scale.py --device cuda (ViT-B/32 + ClipCap over GPT-2 124M, batch 100, 40 tokens; warmed
#      at the timed shape, so the CUDA graph captures are outside the timed update);
#   3. benchmarks/bf16_agreement.py --device cuda;
#   4. world-gpu for 20 updates on a local Ray (runtime.address=null: the config's `auto` joins a running cluster).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default gpu_check_out; each step's output goes to OUT_DIR/*.log,
# the setup's to OUT_DIR/setup.log and OUT_DIR/install.log; a table of every step's rc and seconds ends the output)
# Python: $PYTHON if set; else the repo's .venv if its python runs; else python3. If it cannot import raycap and
# pytest, the script makes a venv (.venv, or .venv-gpu-check beside an unusable .venv; --system-site-packages, so
# an installed CUDA torch is reused) unless the Python already is one, and runs `pip install -e '.[test]'` there:
# without network, point pip at a wheelhouse (PIP_FIND_LINKS=DIR PIP_NO_INDEX=1) or carry a working .venv.
# Environment: GPU_CHECK_SCALE=F multiplies every time limit (e.g. 0.1 to try the flow); GPU_CHECK_KEEP_GOING=1
# runs the steps even when torch sees no CUDA device; GPU_CHECK_INSTALL_LIMIT=S bounds the install (default 300 s).
# Exit status: 0 all steps passed, 1 a step failed (or timed out), 2 no usable Python (nothing ran).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
: > "$out/setup.log"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # raycap from this tree, also in Ray's workers
scale=${GPU_CHECK_SCALE:-1}

log() { echo "[gpu_check] $*" | tee -a "$out/setup.log"; }
scaled() { awk -v l="$1" -v s="$scale" 'BEGIN { v = int(l * s + 0.5); print (v < 1 ? 1 : v) }'; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

names=() limits=() rcs=() secs=()
status=0
summary() {
  [ ${#names[@]} -gt 0 ] || return 0
  echo
  echo "== summary ($out)"
  printf '%-16s %8s %6s %9s  %s\n' step limit_s rc seconds result
  local i res
  for i in "${!names[@]}"; do
    case ${rcs[$i]} in
      0) res=ok ;; 124|137) res="TIMED OUT" ;; -) res=skipped ;; *) res=FAILED ;;
    esac
    printf '%-16s %8s %6s %9s  %s\n' "${names[$i]}" "${limits[$i]}" "${rcs[$i]}" "${secs[$i]}" "$res"
  done
}
trap summary EXIT
trap 'exit 143' TERM INT  # killed from outside: the summary of what ran still prints

record() { names+=("$1"); limits+=("$2"); rcs+=("$3"); secs+=("$4"); }

step() {  # name, time limit in seconds (before GPU_CHECK_SCALE), command...
  local name=$1 limit rc t0
  limit=$(scaled "$2"); shift 2
  echo "== $name (limit $limit s): $*"
  echo "\$ $*" > "$out/$name.log"
  t0=$(now)
  timeout -k 10 "$limit" "$@" >> "$out/$name.log" 2>&1
  rc=$?
  local dt; dt=$(since "$t0")
  tail -n 15 "$out/$name.log"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "== $name: TIMED OUT after $limit s"; fi
  echo "== $name: rc=$rc ($dt s)"
  record "$name" "$limit" "$rc" "$dt"
  [ $rc -eq 0 ] || status=1
  return $rc
}

skip() {  # name, time limit, why
  echo "== $1: skipped ($3)"
  record "$1" "$(scaled "$2")" - 0
  status=1
}

# -- setup: a Python that imports raycap and pytest ------------------------------------------------------------
runs() { [ -x "$1" ] && "$1" -c '' > /dev/null 2>&1; }
imports() { "$py" -c 'import raycap, pytest' > /dev/null 2>&1; }
in_venv() { "$py" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' > /dev/null 2>&1; }

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
  log "python: \$PYTHON ($py)"
elif runs .venv/bin/python; then
  py=$root/.venv/bin/python
  log "python: the repo's .venv ($py)"
else
  [ -e .venv ] && log ".venv exists but its python does not run here (carried from another machine?): not used"
  py=$(command -v python3 || command -v python) || { log "no python3 or python on PATH"; exit 2; }
  log "python: $py (no usable .venv)"
fi
log "$("$py" -c 'import sys; print("Python", sys.version.split()[0], "at", sys.prefix)' 2>&1)"

if imports; then
  log "raycap and pytest import: nothing installed"
else
  log "'$py -c \"import raycap, pytest\"' fails: $("$py" -c 'import raycap, pytest' 2>&1 | tail -n 1)"
  if ! in_venv; then
    venv=.venv
    [ -e .venv ] && venv=.venv-gpu-check  # never touch an existing (unusable) .venv
    if runs "$venv/bin/python"; then
      log "using the existing venv $venv"
    elif "$py" -m venv --system-site-packages "$venv" >> "$out/setup.log" 2>&1; then
      log "made a venv: $py -m venv --system-site-packages $venv (the system's packages, torch included, stay visible)"
    else
      log "cannot make a venv with $py (python3-venv missing?): installing into $py itself"
      venv=
    fi
    [ -n "$venv" ] && py=$root/$venv/bin/python
  fi
  ilimit=${GPU_CHECK_INSTALL_LIMIT:-300}
  log "installing: $py -m pip install -e '.[test]' (limit $ilimit s, output in install.log)"
  t0=$(now)
  timeout -k 10 "$ilimit" "$py" -m pip install --retries 1 --timeout 20 -e '.[test]' > "$out/install.log" 2>&1
  rc=$?
  dt=$(since "$t0")
  tail -n 5 "$out/install.log" | tee -a "$out/setup.log"
  record install "$ilimit" "$rc" "$dt"
  if imports; then
    log "install done (rc $rc, $dt s): raycap and pytest import"
  else
    log "install failed (rc $rc, $dt s): '$py' still cannot import raycap and pytest; pip may have no network here:"
    log "give it a wheelhouse (PIP_FIND_LINKS=DIR PIP_NO_INDEX=1), an index (PIP_INDEX_URL) or PYTHON=a Python that has them"
    status=2
    exit 2
  fi
fi

if in_venv; then  # activate it: its scripts (ray, deepspeed's) first on PATH
  venv_dir=$("$py" -c 'import sys; print(sys.prefix)')
  export VIRTUAL_ENV=$venv_dir PATH="$venv_dir/bin:$PATH"
  log "activated the venv $venv_dir"
fi

# -- the machine ---------------------------------------------------------------------------------------------------
if command -v nvidia-smi > /dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
else
  log "no nvidia-smi on PATH" | tee "$out/gpu.txt"
fi

# -- the steps: limits 20 + 100 + 170 + 40 + 150 = 480 s ----------------------------------------------------------
cuda_ok=1
probe='import torch; print("torch", torch.__version__, "cuda", torch.version.cuda); '\
'assert torch.cuda.is_available(), "torch sees no CUDA device"; n = torch.cuda.device_count(); '\
'print(n, "device(s):", ", ".join(torch.cuda.get_device_name(i) for i in range(n)))'
step torch_cuda 20 "$py" -c "$probe" || cuda_ok=0
if [ $cuda_ok -eq 0 ] && [ "${GPU_CHECK_KEEP_GOING:-0}" != 1 ]; then
  for s in "cuda_tests 100" "paper_scale 170" "bf16_agreement 40" "world_gpu 150"; do
    set -- $s
    skip "$1" "$2" "torch sees no CUDA device; GPU_CHECK_KEEP_GOING=1 runs it anyway"
  done
  exit $status
fi
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())' 2> /dev/null || echo 0)

step cuda_tests 100 "$py" -m pytest -q -m cuda tests -p no:cacheprovider
step paper_scale 170 "$py" benchmarks/paper_scale.py --device cuda --threads 8
step bf16_agreement 40 "$py" benchmarks/bf16_agreement.py --device cuda --threads 8
single=()  # world-gpu wants 2 learner ranks + 2 rollout workers, one GPU each; on fewer GPUs its one-GPU form
[ "${gpus:-0}" -ge 4 ] || single=(--set runtime.weight_sync=colocated --set runtime.learner_workers=1)
rm -rf "$out/world-gpu"  # a fresh run, not a resume of an earlier check's
step world_gpu 150 env -u RAY_ADDRESS "$py" -m raycap.train --config world-gpu --out "$out/world-gpu" \
  --set runtime.address=null --set rl.steps=20 --set eval.every=20 --set eval.report=false ${single[@]+"${single[@]}"}
exit $status
