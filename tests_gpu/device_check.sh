#!/usr/bin/env bash
# Everything a session with a lent GPU should measure, as one prepared run (at most 9.5 minutes: give the
# device tool's run timeout_s=600):
#   bash tests_gpu/device_check.sh      # 8 files under $OUT (the device tool returns 8 at most), else runs/device
# It uses the machine's own python3 and torch (no venv: the pinned CPU wheel is for machines without a GPU) and
# runs gradzip from this checkout. Each step has its own time limit and log, so one failure does not cost the
# rest; the exit status is the number of steps that failed.
set -u
out=${OUT:-runs/device}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME SECONDS COMMAND...: COMMAND's output in $out/NAME.log, its time and status in summary.txt
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ nvidia-smi -L; python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'; } \
    >"$out/summary.txt" 2>&1
# The CUDA paths against the CPU, NCCL training, the bucket form's launches and syncs, the kernels.
step test-gpu 270 python3 -m pytest -q -s -p no:cacheprovider tests_gpu
# Sign and QSGD in both forms (the GPU runs the bucket form by default), beside every other compressor.
step kernels 120 python3 -m gradzip bench --kernels --device cuda --shapes resnet50,bert_base --out /tmp/kernels \
    --methods sign,sign-per-tensor,qsgd,qsgd-per-tensor,topk,randomk,fp16,powersgd,acpsgd
# Measured profiles of the paper's models, to replace the simulator's derived ones (gradzip/sim/profiles).
# The batch sizes of the shipped profiles; one log for the four (the JSON files are the result).
for spec in resnet50:64 resnet152:32 bert_base:32 bert_large:8; do
    model=${spec%%:*}
    step "profile-$model" 45 python3 -m gradzip profile --model "$model" --batch-size "${spec##*:}" \
        --device cuda --out "$out/profile-$model.json"
    cat "$out/profile-$model.log" >>"$out/profiles.log" && rm "$out/profile-$model.log"
done
exit "$failed"
