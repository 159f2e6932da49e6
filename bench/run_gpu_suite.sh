#!/usr/bin/env bash
# The GPU machine's share of the work, in one call (device time is scarce): GPU tests, then
# benchmarks. Needs the slim vLLM bundle in .vllmslim/carry, built by
# ../shared/tools/vllm-gpu/build.sh with EXTRA_WHEELS="crc32c==2.9.post0 blake3==1.0.11 redis==8.1.0"
# (the server imports crc32c and redis (its remote tier's key_slot), the connector blake3; the
# GPU image has none of them) until build.sh carries them.
#
#   bash bench/run_gpu_suite.sh OUT_DIR [tests] [e2e] [transfer] [trace] [ttft] [ttft-trace] [ttft-disk]
#       [multi-round] [multi-round-nocache] [multi-round-trace] [partial-hit]
#       [miss-cost] [decode-stores] [decode-stores-graphs]
#
# Each stage has its own time limit, so one that hangs cannot cost the others' results; with
# SUITE_DEADLINE_S set, no stage runs past that many seconds from the start (keep it under the
# device call's limit, so that the logs still come back). OUT_DIR
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

deadline=${SUITE_DEADLINE_S:-0}
stage() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  if ((deadline > 0)); then
    ((limit > deadline - SECONDS)) && limit=$((deadline - SECONDS))
    if ((limit < 20)); then
      echo "stage $name: skipped, $limit s left before the deadline" | tee -a "$out/stages.txt"
      return
    fi
  fi
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
    ttft-disk) stage vllm_gpu_ttft_disk 480 python3 bench/vllm_gpu_ttft.py --repeat 3 \
            --lengths 8192 32768 --buffer-gb 36 --disk-size 32 \
            --modes kvdepot-store kvdepot-load kvdepot-disk --out "$out/vllm_gpu_ttft_disk.json"
        grep -E "^ +[0-9]+ |: disk hit|: kvdepot hit|disk tier at|raw .* I/O|page cache" \
            "$out/vllm_gpu_ttft_disk.log" ;;
    multi-round) stage vllm_multi_round 540 python3 bench/vllm_multi_round.py \
            --systems gpu-all offload kvdepot --out "$out/vllm_multi_round.json"
        grep -E "^(system|gpu-all|offload|kvdepot|nocache) |WARNING" "$out/vllm_multi_round.log" ;;
    multi-round-nocache) stage vllm_multi_round_nocache 240 python3 bench/vllm_multi_round.py \
            --systems nocache --out "$out/vllm_multi_round_nocache.json"
        grep -E "^(system|nocache) " "$out/vllm_multi_round_nocache.log" ;;
    multi-round-trace) stage vllm_multi_round_trace 240 python3 bench/vllm_multi_round.py \
            --systems kvdepot --trace --out "$out/vllm_multi_round_trace.json"
        grep -E "^(system|kvdepot) |^trace |WARNING" "$out/vllm_multi_round_trace.log" ;;
    miss-cost) stage vllm_miss_cost 330 python3 bench/vllm_miss_decode.py --cases ttft batch \
            --out "$out/vllm_miss_cost.json"
        sed -n '/^case /,$p' "$out/vllm_miss_cost.log" ;;
    decode-stores | decode-stores-graphs) stage vllm_${s//-/_} 300 python3 bench/vllm_miss_decode.py \
            --cases decode $([[ $s == *graphs ]] && echo --cuda-graphs) --out "$out/vllm_${s//-/_}.json"
        sed -n '/^case /,$p' "$out/vllm_${s//-/_}.log" ;;
    partial-hit) stage vllm_partial_hit 480 python3 bench/vllm_multi_round.py --mode partial-hit \
            --max-batched 34816 --out "$out/vllm_partial_hit.json"
        grep -A8 "^partial hit" "$out/vllm_partial_hit.log" ;;
    *) echo "unknown stage $s" ;;
  esac
done
