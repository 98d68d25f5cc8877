#!/usr/bin/env bash
# One prepared run for a GPU machine, at most 8 minutes: throughput of the trial loop, packed
# trials on one GPU, and the seed net's time to the notebook's 80.67%. Without CUDA it runs a
# short version of each on the CPU, so the script itself is checked anywhere.
#
#   bash bench/gpu_check.sh [CIFAR-10 JPEG archive or image folder]
#
# Default data: $CIFAR10_JPEG_ARCHIVE, else ../shared/data/cifar10-jpeg.tar.gz, else
# shared/data/cifar10-jpeg.tar.gz. Every figure is printed as a table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
source=${1:-${CIFAR10_JPEG_ARCHIVE:-}}
for candidate in "$source" ../shared/data/cifar10-jpeg.tar.gz shared/data/cifar10-jpeg.tar.gz; do
    if [ -n "$candidate" ] && [ -e "$candidate" ]; then source=$candidate; break; fi
done
[ -e "$source" ] || { echo "no CIFAR-10 data: pass the archive or an image folder" >&2; exit 2; }
if [ -f "$source" ]; then  # an archive: unpack once beside this run
    work=${TMPDIR:-/tmp}/gpu_check_data
    [ -d "$work/cifar10-jpeg" ] || { mkdir -p "$work" && tar -xzf "$source" -C "$work"; }
    data=$work/cifar10-jpeg
else
    data=$source
fi
log=$(mktemp -d)/gpu_check
mkdir -p "$log"
started=$(date +%s)

if $PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    device=$($PYTHON -c "import torch; print(torch.cuda.get_device_name())")
    nets=seed,all-cnn-c; steps=200; packing="--trials 1,2,4,8 --steps 300"; accuracy="--epochs 30"
else  # the CPU: the same steps, far smaller
    device="CPU ($(nproc) cores)"
    nets=seed; steps=10; packing="--trials 1,2 --steps 10"; accuracy="--epochs 2 --train-limit 2048 --max-seconds 60"
fi
echo "gpu_check on $device, data $data"

run() {  # name, command...: runs it with its output kept, and prints its last line
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$log/$name.txt" | tail -n 4
}
run throughput_32 $PYTHON bench/train_throughput.py --dataset folder --data "$data" --nets $nets --steps $steps
run throughput_64 $PYTHON bench/train_throughput.py --dataset folder --data "$data" --nets seed --image-size 64 --steps $steps
run packing $PYTHON bench/packing.py $packing
run time_to_accuracy $PYTHON bench/time_to_accuracy.py --dataset folder --data "$data" $accuracy

echo
echo "| figure | value |"
echo "| --- | --- |"
grep -h -E "^(seed|all-cnn-c) " "$log/throughput_32.txt" | sed -E 's/^(\S+)\s+(.*)/| \1, 32x32 | \2 |/'
grep -h -E "^seed " "$log/throughput_64.txt" | sed -E 's/^(\S+)\s+(.*)/| \1, 64x64 | \2 |/'
grep -h -E "^[0-9]+ trials:" "$log/packing.txt" | sed -E 's/^(.*)$/| packed: \1 |/' | sed -E 's/: +/ | /'
grep -h -E "^epoch " "$log/time_to_accuracy.txt" | tail -n 1 | sed -E 's/^(.*)$/| seed net, last epoch timed | \1 |/'
for name in throughput_32 throughput_64 packing time_to_accuracy; do
    tail -n 1 "$log/$name.txt" | sed -E 's/^([a-z_]+): (.*)$/| \1 | \2 |/'
done
echo "| wall time of this check | $(( $(date +%s) - started )) s |"
