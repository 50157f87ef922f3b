#!/usr/bin/env bash
# The GPU check: run this first whenever a CUDA machine is available (one H100/H200: at most 8 minutes).
#
#   bash benchmarks/gpu_check.sh [--tiny] OUT_DIR
#
# On a synthetic CT dataset planned by stock nnU-Net, with plans of a real patch (128^3, nnU-Net's topology for it,
# the same as gpu_suite.sh's isotropic run, whose dataset and compile caches it then reuses):
#   pretrain_<m>  pgl_pretrain --method <m> (pgl, byol, pgl+byol), 2 epochs, AMP, torch.compile per nnU-Net's
#                 nnUNet_compile rule, --save-every 1: checkpoint_final.pth, finite losses in pgl_log.json, one
#                 feature picture per epoch and no "could not write the feature picture" in the log;
#                 pgl also passes -num_gpus 1 and ingests two unlabeled volumes
#   extend_<m>    the same run extended with --c --epochs 3 (the same checks over 3 epochs)
#   finetune      nnUNetv2_train ... -tr nnUNetTrainerPGL_smoke: outputs and the "PGL initialisation from" line
#   predict       nnUNetv2_predict with that model on two images: predictions of the input size, known labels
#   ddp_1rank     pgl_pretrain under torchrun with one process: the DDP code (NCCL, DDP wrapper, ranks_in_sync)
#   suite         benchmarks/gpu_suite.sh's tables (in --tiny mode: pretrain_speed.py at the tiny patch)
# After prepare, the three methods and ddp_1rank run side by side, and extend_pgl beside finetune + predict (the
# GPU has room; these are checks, not timings); the suite runs alone at the end. Each step prints PASS/FAIL with
# its time; a failed step does not stop the others (a step whose input failed is not run and fails); the exit
# code is 1 if any failed. Every command has a time limit that keeps the whole run inside the budget
# ($GPU_CHECK_BUDGET_S, default 480 s; a step left without time fails). Outputs in OUT_DIR (new or empty): the
# nnU-Net folders, logs/<step>.log, summary.txt, env.txt, nvidia-smi.txt and gpu_check_logs.tar.gz (logs,
# pgl_log.json files, training logs, pictures and the suite's JSON: small enough to copy off the machine).
#
# --tiny runs the same steps on CPU (-device cpu, patch 24x48x48, 1 iteration per epoch, nnUNet_def_n_proc=1,
# nnUNet_n_proc_DA=0, budget 1800 s, 4x the time limits; the dense linear probe only in the pgl runs, on 2 cases;
# prediction without mirroring; the suite without its short real run).
# Python: $PYTHON (default .venv/bin/python); the console scripts are those of its environment, found by their
# entry points (the environment may live anywhere).
set -uo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh [--tiny] OUT_DIR   (OUT_DIR: a new or empty folder)"; }
tiny=0
out=""
while (($#)); do
    case $1 in
        --tiny) tiny=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) if [[ -n $out ]]; then echo "gpu_check: one OUT_DIR only" >&2; usage >&2; exit 2; fi; out=$1 ;;
    esac
    shift
done
if [[ -z $out ]]; then echo "gpu_check: give an output folder" >&2; usage >&2; exit 2; fi
if [[ -e $out && ( ! -d $out || -n $(ls -A "$out") ) ]]; then
    echo "gpu_check: $out exists and is not an empty folder; give a new one (the check starts from nothing)" >&2
    exit 2
fi
start_ns=$(date +%s%N)
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
py=${PYTHON:-.venv/bin/python}
if ! cuda=$("$py" -c "import torch, nnunetv2, nnunet_pgl.pretraining; print(int(torch.cuda.is_available()))" \
        2>"$out/import_error.txt"); then
    tail -n 3 "$out/import_error.txt" >&2
    echo "gpu_check: $py cannot import torch, nnunetv2 and nnunet_pgl (set PYTHON to the project's environment)" >&2
    exit 2
fi
rm -f "$out/import_error.txt"

if ((tiny)); then
    # a shared CPU can be many times slower than usual: generous limits (they only stop a hung step)
    device=cpu patch="24 48 48" iters=1 workers=0 cases=6 budget=${GPU_CHECK_BUDGET_S:-1800} cap_scale=4
    # the dense linear probe costs about two training iterations per save epoch on CPU: in the pgl runs only, on
    # 2 cases
    probe_off=(--no-probe) probe_small=(--probe-cases 2) suite_run=(--no-run)
    export nnUNet_def_n_proc=1 nnUNet_n_proc_DA=0
else
    device=cuda patch="128 128 128" iters=10 workers=2 cases=6 budget=${GPU_CHECK_BUDGET_S:-480} cap_scale=1
    probe_off=() probe_small=() suite_run=()
    export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-4}  # nnU-Net's fine-tune augmentation: the steps share the cores
    if [[ $cuda != 1 ]]; then
        echo "gpu_check: no CUDA device is visible to $py; on CPU use --tiny" >&2
        exit 2
    fi
fi
plans=nnUNetPlans_bench_plain
work="$out/suite/work_iso"     # gpu_suite.sh's dataset folder for its 128^3 runs: it reuses what we plan here
logs="$out/logs" status="$out/status"
mkdir -p "$logs" "$status" "$out/tmp" "$out/cache"
export nnUNet_raw="$work/raw" nnUNet_preprocessed="$work/pre" nnUNet_results="$out/results"
export TMPDIR="$out/tmp" TORCHINDUCTOR_CACHE_DIR="$out/cache/inductor" TRITON_CACHE_DIR="$out/cache/triton"
export MPLCONFIGDIR="$out/cache/matplotlib" PYTHONUNBUFFERED=1 PYTHON="$py"

# ---------------------------------------------------------------------------------------------------- helpers
now_s() { echo $((($(date +%s%N) - start_ns) / 1000000000)); }

limit() {  # limit CAP: seconds a command may take, CAP (x cap_scale) at most, within what is left of the budget
    local left=$((budget - $(now_s))) cap=$(($1 * cap_scale))
    echo $((left < cap ? left : cap))
}

EP='import sys
from importlib.metadata import entry_points
eps = [e for e in entry_points(group="console_scripts") if e.name == sys.argv[1]]
if not eps:
    sys.exit(f"console script {sys.argv[1]} is not installed for {sys.executable}")
sys.argv = sys.argv[1:]
sys.exit(eps[0].load()())'

run() {  # run CAP CMD...: CMD under the time limit (its process group is killed when it runs out)
    local t
    t=$(limit "$1")
    shift
    if ((t <= 0)); then echo "problem: no time left in the ${budget} s budget"; return 124; fi
    timeout -k 20 "$t" "$@" &  # timeout leads a process group of its own: its id is noted so that an interrupt
    local pid=$!               # of the whole check can stop that group (see the trap below)
    echo "$pid" >>"$out/tmp/groups"
    wait "$pid"
    local rc=$? shown="$*"
    if ((rc == 124 || rc == 137)); then  # (on a line of its own: the log may end in a progress bar)
        printf '\nproblem: timed out after %s s: %s\n' "$t" "${shown//"$EP"/<entry point>}"
    fi
    return $rc
}

tool() {  # tool CAP NAME ARGS...: the console script NAME of $py's environment
    local cap=$1 name=$2
    shift 2
    run "$cap" "$py" -c "$EP" "$name" "$@"
}

step() {  # step NAME FUNCTION ARGS...: FUNCTION's output to logs/NAME.log; PASS/FAIL line with the time
    local name=$1 t0 rc dt why
    shift
    t0=$(date +%s%N)
    STEP_LOG="$logs/$name.log" "$@" >"$logs/$name.log" 2>&1
    rc=$?
    dt=$((($(date +%s%N) - t0) / 100000000))
    dt="$((dt / 10)).$((dt % 10)) s"
    if ((rc == 0)); then
        printf 'PASS  %-18s %8s\n' "$name" "$dt" | tee "$status/$name"
    else
        why=$(grep -m1 '^problem: ' "$logs/$name.log" | cut -c10-)
        [[ -n $why ]] || why="exit $rc: $( (grep -m1 -E '^[[:alnum:]_.]*(Error|Exception)(: |$)|: error: ' \
            "$logs/$name.log" || grep -v '^[[:space:]]*$' "$logs/$name.log" | tail -n 1) | cut -c1-200)"
        printf 'FAIL  %-18s %8s  %s (logs/%s.log)\n' "$name" "$dt" "$why" "$name" | tee "$status/$name"
    fi
    return $rc
}

after() {  # after DEP STEP...: the step, if step DEP passed; else the step fails at once
    local dep=$1 name=$2
    shift
    if grep -q '^PASS' "$status/$dep" 2>/dev/null; then step "$@"; return; fi
    printf 'FAIL  %-18s %8s  not run: %s failed\n' "$name" "0.0 s" "$dep" | tee "$status/$name"
    return 1
}

pretrainer_dir() {  # pretrainer_dir METHOD [RESULTS]: the fold_all folder of that method's run
    local t
    case $1 in pgl) t=nnUNetPretrainerPGL ;; byol) t=nnUNetPretrainerBYOL ;; *) t=nnUNetPretrainerPGLBYOL ;; esac
    echo "${2:-$nnUNet_results}/Dataset993_PGLBench/${t}__${plans}__3d_fullres/fold_all"
}

# ---------------------------------------------------------------------------------------------------- steps
do_prepare() {  # (nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): it must not see the tiny 0)
    # shellcheck disable=SC2086
    run 300 env -u nnUNet_n_proc_DA "$py" benchmarks/gpu_check.py prepare --root "$work" --patch $patch \
        --cases "$cases" --unlabeled 2
}

do_pretrain() {  # do_pretrain METHOD EPOCHS [pgl_pretrain args]: a run (fresh, or extended with --c), then checks
    local method=$1 epochs=$2
    shift 2
    tool 300 pgl_pretrain -d 993 -c 3d_fullres -p "$plans" -device "$device" --method "$method" \
        --epochs "$epochs" --iters-per-epoch "$iters" --save-every 1 --num-workers "$workers" "$@" || return
    run 120 "$py" benchmarks/gpu_check.py pretrain --out "$(pretrainer_dir "$method")" --method "$method" \
        --epochs "$epochs" --log "$STEP_LOG"
}

do_finetune() {
    tool 300 nnUNetv2_train 993 3d_fullres 0 -tr nnUNetTrainerPGL_smoke -p "$plans" -device "$device" || return
    run 120 "$py" benchmarks/gpu_check.py finetune --log "$STEP_LOG" \
        --out "$nnUNet_results/Dataset993_PGLBench/nnUNetTrainerPGL_smoke__${plans}__3d_fullres/fold_0" \
        --pgl-checkpoint "$(pretrainer_dir pgl)/checkpoint_final.pth"
}

do_predict() {
    local np=()
    ((tiny)) && np=(-npp 1 -nps 1 --disable_tta)  # (mirroring: 8x the CPU time; on the GPU it stays on)
    tool 240 nnUNetv2_predict -i "$work/predict_in" -o "$out/predict_out" -d 993 -c 3d_fullres -p "$plans" \
        -tr nnUNetTrainerPGL_smoke -f 0 -chk checkpoint_final.pth -device "$device" "${np[@]}" || return
    run 120 "$py" benchmarks/gpu_check.py predict --inputs "$work/predict_in" --outputs "$out/predict_out" \
        --dataset-json "$nnUNet_preprocessed/Dataset993_PGLBench/dataset.json"
}

do_ddp() {  # one rank under torchrun: the DDP code path on a single GPU (own results folder, so no lock clash)
    local res="$out/results_ddp"
    nnUNet_results=$res run 300 "$py" -m torch.distributed.run --standalone --nproc_per_node 1 \
        -m nnunet_pgl.pretraining.cli -d 993 -c 3d_fullres -p "$plans" -device "$device" --method pgl+byol \
        --epochs 2 --iters-per-epoch "$iters" --save-every 1 --num-workers "$workers" "${probe_off[@]}" || return
    run 120 "$py" benchmarks/gpu_check.py pretrain --out "$(pretrainer_dir pgl+byol "$res")" --method pgl+byol \
        --epochs 2 --ddp --log "$STEP_LOG"
}

do_suite() {
    mkdir -p "$out/suite"
    if ((tiny)); then  # the suite's command at the tiny patch, on the dataset planned above
        # shellcheck disable=SC2086
        run 300 env -u nnUNet_n_proc_DA "$py" benchmarks/pretrain_speed.py --patch $patch --arch plain \
            --workdir "$work" --steps 2 "${suite_run[@]}" --json "$out/suite/tiny_plain.json"
    else
        run 600 bash benchmarks/gpu_suite.sh "$out/suite"
    fi
}

job_pgl() {
    local extra=(--unlabeled "$work/unlabeled")
    ((tiny)) && extra+=(-np 1 "${probe_small[@]}")
    step pretrain_pgl do_pretrain pgl 2 -num_gpus 1 "${extra[@]}"
    # the extension and the fine-tune side by side: the fine-tune reads checkpoint_final.pth of the 2 or of the 3
    # epochs (it is replaced atomically), both fit
    after pretrain_pgl extend_pgl do_pretrain pgl 3 --c &
    { after pretrain_pgl finetune do_finetune; after finetune predict do_predict; } &
    wait
}

# ---------------------------------------------------------------------------------------------------- run
{
    echo "gpu_check $(date '+%Y-%m-%d %H:%M:%S %Z') on $(hostname), mode $([[ $tiny == 1 ]] && echo tiny || echo gpu)"
    echo "git $(git rev-parse HEAD 2>/dev/null || echo unknown)," \
        "$(git status --porcelain 2>/dev/null | wc -l) files changed or new"
    echo "device $device, patch $patch, $iters iterations per epoch, budget $budget s"
    echo "nnUNet_compile=${nnUNet_compile-unset (nnU-Net compiles on CUDA)}"
    "$py" benchmarks/gpu_check.py env
} >"$out/env.txt" 2>&1
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "(nvidia-smi failed or is missing)" >>"$out/nvidia-smi.txt"
cat "$out/env.txt"
echo

# Ctrl-C or a kill of this script: stop the commands still running (each in its timeout's process group)
trap 'trap - INT TERM; echo "gpu_check: interrupted, stopping the running steps" >&2
      while read -r g; do kill -TERM -- "-$g" 2>/dev/null; done <"$out/tmp/groups"; exit 130' INT TERM
touch "$out/tmp/groups"
step prepare do_prepare
job_pgl &
{ step pretrain_byol do_pretrain byol 2 "${probe_off[@]}"
  after pretrain_byol extend_byol do_pretrain byol 3 --c "${probe_off[@]}"; } &
{ step pretrain_pgl+byol do_pretrain pgl+byol 2 "${probe_off[@]}"
  after pretrain_pgl+byol extend_pgl+byol do_pretrain pgl+byol 3 --c "${probe_off[@]}"; } &
step ddp_1rank do_ddp &
wait
step suite do_suite

order=(prepare pretrain_pgl extend_pgl pretrain_byol extend_byol pretrain_pgl+byol extend_pgl+byol finetune predict
       ddp_1rank suite)
failed=0
{
    echo
    echo "summary ($(now_s) s in all, budget $budget s):"
    for s in "${order[@]}"; do
        if [[ -f $status/$s ]]; then cat "$status/$s"; else printf 'FAIL  %-18s did not run\n' "$s"; fi
        [[ -f $status/$s ]] && grep -q '^PASS' "$status/$s" || failed=$((failed + 1))
    done
    if ((failed)); then echo "gpu_check: $failed of ${#order[@]} steps FAILED"
    else echo "gpu_check: all ${#order[@]} steps passed"; fi
} | tee "$out/summary.txt"
failed=$(grep -c '^FAIL' "$out/summary.txt")

# what to copy off the machine: logs, per-epoch logs, pictures, the suite's JSON (no data, no checkpoints)
(cd "$out" && find results results_ddp suite -maxdepth 6 \( -name 'pgl_log.json' -o -name 'training_log_*.txt' \
    -o -name '*.png' -o -name '*.json' -path 'suite/*' \) 2>/dev/null | grep -v '/work_' |
    tar czf gpu_check_logs.tar.gz summary.txt env.txt nvidia-smi.txt logs -T - 2>/dev/null)
((failed == 0))
