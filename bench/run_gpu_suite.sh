#!/usr/bin/env bash
# The GPU machine's share of the work, in one call (device time is scarce): GPU tests, then
# benchmarks. Needs the slim vLLM bundle in .vllmslim/carry (../shared/tools/vllm-gpu/build.sh).
#
#   bash bench/run_gpu_suite.sh OUT_DIR [tests] [e2e] [transfer] [trace] [ttft] [ttft-trace]
#
# Each stage has its own time limit, so one that hangs cannot cost the others' results. OUT_DIR
# gets few files (the device tool returns at most 8): stages.txt, the benchmarks' JSON and
# logs.tgz with every log (engines, server, pytest).
set -u
dest=${1:?usage: run_gpu_suite.sh OUT_DIR [stages...]}
shift
stages=${*:-tests e2e transfer ttft}
out=$(mktemp -d /tmp/kvdepot-gpu-run.XXXX)
mkdir -p "$dest"
trap 'cp "$out"/stages.txt "$out"/*.json "$dest"/ 2>/dev/null; tar czf "$dest/logs.tgz" -C "$out" .' EXIT
source .vllmslim/carry/setup.sh
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/gpu.txt" 2>&1

stage() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "stage $name: exit $? in $((SECONDS - t0)) s" | tee -a "$out/stages.txt"
  cp "$out"/stages.txt "$out"/*.json "$dest"/ 2>/dev/null
  tail -4 "$out/$name.log"
}

for s in $stages; do
  case $s in
    tests) stage gpu_tests 150 python3 -m pytest tests/test_gpu_transfer.py tests/test_vllm_gpu_copier.py \
            -q -x -p no:cacheprovider ;;
    e2e) stage vllm_gpu_e2e 300 python3 -m pytest tests/test_vllm_gpu_e2e.py -q -x -p no:cacheprovider ;;
    e2e-auto | e2e-async) stage vllm_gpu_e2e_${s#e2e-} 240 python3 -m pytest \
            tests/test_vllm_gpu_e2e.py -q -x -k "${s#e2e-}" -p no:cacheprovider ;;
    transfer) stage gpu_transfer 200 python3 bench/gpu_transfer.py --out "$out/gpu_transfer.json" ;;
    trace) stage trace_single_chunk 150 python3 bench/trace_single_chunk.py \
            --out "$out/trace_single_chunk.json" ;;
    ttft) stage vllm_gpu_ttft 420 python3 bench/vllm_gpu_ttft.py --repeat 5 --buffer-gb 60 \
            --modes kvdepot-store kvdepot-load kvdepot-load-async offload \
            --out "$out/vllm_gpu_ttft.json" ;;
    ttft-trace) stage vllm_gpu_ttft_trace 300 python3 bench/vllm_gpu_ttft.py --repeat 3 \
            --buffer-gb 60 --modes kvdepot-store kvdepot-load kvdepot-load-trace \
            --out "$out/vllm_gpu_ttft_trace.json" ;;
    *) echo "unknown stage $s" ;;
  esac
done
