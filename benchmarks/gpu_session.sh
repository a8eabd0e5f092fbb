#!/usr/bin/env bash
# The GPU measurements behind benchmarks/results/<gpu>-<date>/, as one script, for a lease of a
# lent GPU machine that has torch but not this project's other packages (they come as wheels, see
# shared/device/prepare_wheels.sh). Runs in the background; each part writes its results folder and a
# line to the log, so that a lease can collect what is done at any time:
#
#   setsid bash benchmarks/gpu_session.sh PART... > /tmp/gs/session.log 2>&1 &
#   tar czf "$OUT/results.tgz" -C /tmp/gs results session.log     # collect, as often as needed
#
# Parts: kernels (the fused kernels' GPU tests and benchmarks/fused_kernels.py), epilogue-gpu-tests
# (the MLP epilogue's tests in tests/test_fused_kernels_gpu.py), defer-gpu-tests (a shape's first
# request without CUDA graphs: tests/test_defer_graph_recording_gpu.py), edit-path-gpu-tests (the
# pictures in and out and the text encoders' CUDA graphs: tests/test_pictures_gpu.py,
# tests/test_text_encoder_graphs_gpu.py), epilogue-lab
# (benchmarks/epilogue_lab.py: the MLP's GELU -> FP8 in a Triton GEMM's epilogue), startup (cold
# compile via precompile, then serve with the bundle on empty caches; STARTUP_ARGS, e.g.
# "--aot-compile --then-serve-flags=--defer-graph-recording"), aot-profile (after startup
# with --aot-compile: cProfile of its bundle's functions loading, with and without compile workers),
# fidelity (FP8 GEMMs vs FP8 attention, eager), stages (presets 0 and 5 with the kernel profile and
# the option rows), lora (slots, the default), lora-merge (merge mode), lora-fidelity (the picture in
# each mode), lora-sized (slots of the adapters' own rank 32), lora-gpu-tests,
# gemm-templates (Inductor's Triton GEMM templates against cuBLAS on stage 3, stopped after 330 s),
# tiers, tier-gpu-tests (the small tier's knob combinations compiled on the GPU, a pytest on a small
# model), beside-gpu-tests (issue 26: a variant built beside replaying and recording edits),
# fair-service (issue 26: head of line and served / engine over HTTP), codecs (issue 26: the PNG
# encoders and decoders on this host's CPU), small-tiers (the 22
# and 24 GiB tiers' full stack under a memory cap), small-tier-stall (issue 23: the small tier's
# knobs with compile on, each under a time limit, with every thread's Python stack dumped every
# 30 s). Everything else uses synthetic-full (random weights) at 1024x1024.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=/tmp/gs/results
CACHE=/tmp/kontext-startup/cold   # the compile cache the cold start fills; later parts reuse it
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 FLUX_KONTEXT_MODEL=synthetic-full
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

part() { echo "=== $(date +%T) $1 start"; }
install_codecs() {
  # imagecodecs (26 MB) does not fit the lease's carry beside .whl: an earlier call on the same
  # warm machine copies its .whl-codecs to /tmp/whl-codecs (or this tree carries it), with
  # httptools, uvloop and pybase64 (pinned in requirements.txt) where it has them
  for codecs in .whl-codecs /tmp/whl-codecs; do
    if ls "$codecs"/imagecodecs-*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$codecs"/*.whl
      break
    fi
  done
  python3 -c "import imagecodecs" 2> /dev/null || echo "imagecodecs is not installed: PNGs go through Pillow"
  python3 -c "import pybase64" 2> /dev/null || echo "pybase64 is not installed: input base64 goes through binascii"
}
done_() { echo "=== $(date +%T) $1 done ($2)"; }

for name in "$@"; do
  part "$name"
  case "$name" in
    startup)
      # STARTUP_ARGS, e.g. "--aot-compile": the bundle's blocks and VAE as ahead-of-time functions (issue 24)
      python3 -m benchmarks.startup --model synthetic-full --out "$RESULTS/startup" --cold-via-precompile --cache-root /tmp/kontext-startup ${STARTUP_ARGS:-}
      done_ startup $? ;;
    aot-profile)
      # issue 24: where loading the AOT functions of the bundle `startup --aot-compile` left goes (after that part)
      python3 -m benchmarks.profile_aot_load --bundle /tmp/kontext-startup/bundle.zip --out "$RESULTS/aot-profile"
      # the same load with Inductor's kernels compiled in this process, without its pool of compile workers
      TORCHINDUCTOR_COMPILE_THREADS=1 python3 -m benchmarks.profile_aot_load --bundle /tmp/kontext-startup/bundle.zip --out "$RESULTS/aot-profile-one-thread"
      done_ aot-profile $? ;;
    fidelity)
      python3 -m benchmarks.fp8_fidelity --model synthetic-full --out "$RESULTS/fidelity"
      done_ fidelity $? ;;
    kernels)
      python3 -m pytest -q -p no:cacheprovider tests/test_fused_kernels_gpu.py tests/test_gpu_stages.py -k "fused or fa3_kernels" \
        > "$RESULTS/fused_gpu_tests.txt" 2>&1
      echo "tests rc $?"; tail -n 3 "$RESULTS/fused_gpu_tests.txt"
      python3 -m benchmarks.fused_kernels --out "$RESULTS/kernels" --sweep ${KERNEL_ARGS:-}
      done_ kernels $? ;;
    epilogue-gpu-tests)
      # issue 22: the MLP epilogue's GEMMs at FLUX's widths and the fused blocks with it, compiled under
      # CUDA graphs (the stage table's option row "with mlp_epilogue" measures it; a failure there is a row, not a stop)
      python3 -m pytest -q -s -p no:cacheprovider tests/test_fused_kernels_gpu.py -k epilogue > "$RESULTS/epilogue_gpu_tests.txt" 2>&1
      rc=$?; tail -n 3 "$RESULTS/epilogue_gpu_tests.txt"
      done_ epilogue-gpu-tests $rc ;;
    defer-gpu-tests)
      # issue 24: a shape's first request without CUDA graphs (serve --defer-graph-recording), its second recording them
      python3 -m pytest -q -p no:cacheprovider tests/test_defer_graph_recording_gpu.py > "$RESULTS/defer_gpu_tests.txt" 2>&1
      rc=$?; tail -n 3 "$RESULTS/defer_gpu_tests.txt"
      done_ defer-gpu-tests $rc ;;
    edit-path-gpu-tests)
      # issue 22, the edit around the steps: pictures in and out made on the GPU, the text encoders as CUDA graphs
      python3 -m pytest -q -s -p no:cacheprovider tests/test_pictures_gpu.py tests/test_text_encoder_graphs_gpu.py > "$RESULTS/edit_path_gpu_tests.txt" 2>&1
      rc=$?; tail -n 3 "$RESULTS/edit_path_gpu_tests.txt"
      done_ edit-path-gpu-tests $rc ;;
    epilogue-lab)
      # issue 22: GELU -> FP8 in a Triton fc1 GEMM's epilogue with 1x128 block scales, fc2 block-scaled, against today's path
      python3 -m benchmarks.epilogue_lab --out "$RESULTS/epilogue-lab"
      done_ epilogue-lab $? ;;
    stages)
      python3 flux_kontext_optimized.py benchmark --model synthetic-full --stages 0,5 --rows "${STAGE_ROWS:-main,options}" --profile \
        --option-rows "${OPTION_ROWS:-without fused_kernels,with mlp_epilogue,bf16 attention (fa3),without trim_reference_tokens,with split_proj_out,graph inputs copied}" \
        --warmup 1 --repeats 2 --compile-cache "$CACHE" --results-dir "$RESULTS/stages"
      done_ stages $? ;;
    lora)
      python3 -m benchmarks.lora_bench --model synthetic-full --compile-cache "$CACHE" --out "$RESULTS/lora"
      done_ lora $? ;;
    lora-merge)
      python3 -m benchmarks.lora_bench --model synthetic-full --mode merge --compile-cache "$CACHE" --out "$RESULTS/lora-merge"
      done_ lora-merge $? ;;
    lora-fidelity)
      python3 -m benchmarks.lora_fidelity --model synthetic-full --out "$RESULTS/lora-fidelity"
      done_ lora-fidelity $? ;;
    lora-sized)
      python3 -m benchmarks.lora_bench --model synthetic-full --slots 2 --max-rank 32 --repeats 3 --compile-cache "$CACHE" --out "$RESULTS/lora-sized"
      done_ lora-sized $? ;;
    lora-gpu-tests)
      python3 -m pytest -q -p no:cacheprovider tests/test_lora_gpu.py > "$RESULTS/lora_gpu_tests.txt" 2>&1
      done_ lora-gpu-tests $? ;;
    gemm-templates)
      timeout 330 python3 -m benchmarks.step_lab inductor --stages 3 --candidates default,gemm_templates --out "$RESULTS/gemm-templates"
      done_ gemm-templates $? ;;
    tiers)
      # TIER_ARGS, e.g. "--rows large,medium,small --no-loads": the rows issue 23 asks for, on a short lease
      # each job's stacks every 60 s: a row that stalls is stopped at its limit and shows where it was
      python3 -m benchmarks.memory_tiers --model synthetic-full --out "$RESULTS/tiers" --stack-dumps-every 60 ${TIER_ARGS:-}
      done_ tiers $? ;;
    tier-gpu-tests)
      # the small tier's knob combinations compiled with the full stack on the GPU (issue 23), and the tiers' mechanisms
      python3 -m pytest -q -p no:cacheprovider tests/test_small_tier_compile_gpu.py tests/test_memory_gpu.py > "$RESULTS/tier_gpu_tests.txt" 2>&1
      rc=$?; tail -n 5 "$RESULTS/tier_gpu_tests.txt"
      done_ tier-gpu-tests $rc ;;
    beside-gpu-tests)
      # issue 26: a variant built beside the serving thread while it replays and records CUDA graphs
      python3 -m pytest -q -p no:cacheprovider tests/test_compile_beside_serving.py tests/test_build_beside_serving_gpu.py \
        > "$RESULTS/beside_gpu_tests.txt" 2>&1
      rc=$?; tail -n 5 "$RESULTS/beside_gpu_tests.txt"
      done_ beside-gpu-tests $rc ;;
    small-tier-stall)
      # The three knob groups run side by side (each with its own compile cache, all cold), so the
      # bisect costs one limit, not three; a stall shows as the same stack in every dump.
      mkdir -p "$RESULTS/small-tier-stall"
      for knobs in "--memory-budget 22" "--transformer-fp8 rowwise --t5-fp8 --text-encoders offloaded" "--transformer-fp8 rowwise --vae-tiling"; do
        label=$(echo "$knobs" | tr -c 'a-z0-9\n' '_')
        (
          start=$SECONDS
          TORCH_LOGS=recompiles timeout "${STALL_LIMIT:-180}" python3 -m benchmarks.with_stack_dumps --every 30 \
            --to "$RESULTS/small-tier-stall/stacks$label.txt" -- benchmark --model synthetic-full --stages 5 --rows main \
            $knobs --warmup 1 --repeats 1 --compile-cache "$CACHE$label" --results-dir "$RESULTS/small-tier-stall/run$label" \
            > "$RESULTS/small-tier-stall/log$label.txt" 2>&1
          echo "--- $knobs: rc $? after $((SECONDS - start)) s (limit ${STALL_LIMIT:-180} s)"
        ) &
      done
      wait
      done_ small-tier-stall $? ;;
    small-tiers)
      # The small (22 GiB) and medium (24 GiB) tiers with the full stack, each capped to its budget
      # and compiling on a cold cache of its own (the cold compile is its first warm-up edit). Under
      # the cap synthetic-full cannot be built (bf16 on the GPU, 32 GiB: refused on 2026-12-05), so
      # the tiers load a prequantized checkpoint, written first. Not yet run on a GPU in this form.
      python3 flux_kontext_optimized.py quantize --model synthetic-full --out /tmp/kontext-fp8 > "$RESULTS/quantize.log" 2>&1
      for gib in 22 24; do
        python3 -m benchmarks.with_memory_cap --gib $gib -- benchmark --model /tmp/kontext-fp8 --stages 5 --rows main \
          --memory-budget $gib --warmup 1 --repeats 2 --compile-cache "$CACHE-tier$gib" --results-dir "$RESULTS/tier-$gib" \
          > "$RESULTS/tier-$gib.log" 2>&1
        echo "tier $gib GiB: rc $?"
      done
      done_ small-tiers $? ;;
    codecs)
      # issue 26: the PNG encoders (one core, stripes on threads) and input decoders on this host's CPU
      install_codecs
      python3 -m benchmarks.output_encoding --sizes 1024x1024,1392x752 --repeats 9 --out "$RESULTS/output-encoding"
      done_ codecs $? ;;
    fair-service)
      install_codecs
      FLUX_KONTEXT_COMPILE_CACHE="$CACHE" python3 -m benchmarks.fair_service --model synthetic-full --out "$RESULTS/fair-service" \
        --sizes "${FAIR_SIZES:-1024x1024,1392x752,832x1248,1184x880}" --repeats 2
      done_ fair-service $? ;;
    *) echo "unknown part $name" ;;
  esac
done
echo "=== $(date +%T) session finished"
