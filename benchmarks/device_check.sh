#!/usr/bin/env bash
# The GPU checks of the GPU-path issue, as run on a lent GPU machine that has PyTorch, cuda-bindings and
# nvidia-ml-py but no network, no diffusers and only the CPU build of onnxruntime. What it lacks arrives in the
# call's carried folder .devK/ (diffusers' wheel; onnxruntime-gpu as an xz tarball split in parts, one per call),
# and sdrt runs from this checkout through a symlinked package folder.
#
#   bash benchmarks/device_check.sh start .dev1    # install, doctor, cuda-bindings test; export SD 1.5 (background)
#   bash benchmarks/device_check.sh part .devK     # one more part of onnxruntime-gpu
#   bash benchmarks/device_check.sh final .dev6 SHA256    # the last part; then the checks, results into $OUT
set -uo pipefail
step=$1 dir=$2
W=/root/sdrt-gpu
export PYTHONPATH=/tmp/site:/tmp/sdrt-pkg PYTHONUNBUFFERED=1
mkdir -p "$W" /tmp/site /tmp/sdrt-pkg/sdrt
for p in runtime export kernels demo; do ln -sfn "$PWD/$p" "/tmp/sdrt-pkg/sdrt/$p"; done
cat "$dir"/part.* >> "$W/ort.tar.xz"
sdrt() { python3 -m sdrt.runtime.cli "$@"; }

case $step in
start)
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$OUT/gpu.txt"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$dir"/diffusers-*.whl
  python3 -c "import torch, diffusers, transformers, onnx, onnxscript, onnxruntime as o; print(torch.__version__,
diffusers.__version__, transformers.__version__, onnx.__version__, onnxscript.__version__, o.__version__)"
  sdrt doctor | tee "$OUT/doctor_cpu_ort.txt"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k buffers 2>&1 | tail -3
  setsid nohup bash -c "python3 -m sdrt.export.random_model --model sd15 $W/sd15 && python3 -m sdrt.runtime.cli \
export --checkpoint $W/sd15 --out $W/sd15-engine --precision fp16 && echo EXPORT-OK" > "$W/export.log" 2>&1 < /dev/null &
  ;;
part)
  ls -la "$W"; tail -c 300 "$W/export.log"
  ;;
final)
  echo "$3  $W/ort.tar.xz" | sha256sum -c || exit 3
  python3 -c "import tarfile; tarfile.open('$W/ort.tar.xz').extractall('/tmp/site')"
  python3 -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"
  for _ in $(seq 120); do grep -q "EXPORT-OK\|Error\|error" "$W/export.log" && break; sleep 5; done
  cp "$W/export.log" "$OUT/export_sd15_fp16.log"
  sdrt doctor "$W/sd15-engine" | tee "$OUT/doctor.txt"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -15
  python3 benchmarks/gpu_copies.py --json "$OUT/gpu_copies.json" | tail -3
  sdrt bench "$W/sd15-engine" --backend cuda --baseline diffusers --steps 30 --runs 3 --warmup 1 \
    --json "$OUT/bench_sd15_512.json" 2>&1 | tail -25
  ;;
esac
