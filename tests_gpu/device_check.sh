#!/usr/bin/env bash
# Everything a session with a lent GPU should measure, as one prepared run (at most 8.5 minutes: give the
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
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1  # -k: a process stuck in CUDA may ignore SIGTERM
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ nvidia-smi -L; python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'; } \
    >"$out/summary.txt" 2>&1
# The CUDA paths against the CPU, NCCL training, the bucket form's launches and syncs, the kernels; a test
# that hangs fails alone (--timeout), and -v names every test with its time.
step test-gpu 250 python3 -m pytest -v --timeout 120 --durations=0 -s -p no:cacheprovider tests_gpu
# Sign and QSGD in both forms (the GPU runs the bucket form by default), beside every other compressor.
step kernels 100 python3 -m gradzip bench --kernels --device cuda --shapes resnet50,bert_base --out /tmp/kernels \
    --methods sign,sign-per-tensor,qsgd,qsgd-per-tensor,topk,randomk,fp16,powersgd,acpsgd
# Measured profiles of the paper's four models at the paper's settings (batch, image size or sequence length,
# classes: gradzip.sim.paper.PAPER), to replace the simulator's derived ones (gradzip/sim/profiles).
step profiles 150 python3 -c '
import sys
from gradzip.sim.paper import PAPER
from gradzip.sim.profile import measure_profile
for m in PAPER:
    p = measure_profile(m.model, m.batch_size, device="cuda", image_size=m.image_size, seq_len=m.seq_len,
                        num_classes=m.num_classes)
    p.save(f"{sys.argv[1]}/profile-{m.model}.json")
    print(m.model, "forward", p.forward_s, "s", flush=True)
' "$out"
exit "$failed"
