#!/usr/bin/env bash
# One GPU session, run from the repository root on a CUDA machine: install, check the GPU
# backends against float64 on the GPU, time the op against the memory floor / SDPA / fla, time
# the models against timm's DeiT. Every step runs in its own process under a time limit (a
# kernel fault poisons its CUDA context, not the session) and logs to $OUT (default /tmp/gla).
#
#   bash benchmarks/gpu_session.sh [check|ops|models|vig|compile|asv|all]...
#
# fla (flash-linear-attention) is used when importable; wheels in .whl/ are installed first.
set -u
OUT=${OUT:-/tmp/gla}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=${*:-all}

python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >> "$OUT/install.log" 2>&1
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

step() {  # step NAME SECONDS COMMAND...: run, keep the log, print its tail
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc, $((SECONDS - t0)) s"
    tail -n "${TAIL:-25}" "$OUT/$name.log"
    return $rc
}

wants() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }

if wants check; then
    # the op at one ViG shape, every backend on the GPU, against float64 (outputs and gradients)
    step triton_check 150 python3 benchmarks/gpu_ops.py --backend triton --check --shapes vigT_224 --no-baselines \
        || TAIL=40 step triton_diagnose 200 python3 -m glakernels.backends.triton.diagnose_gpu
    step pytest_gpu 200 python3 -m pytest -q --maxfail=25 -n 8 -m gpu -p no:cacheprovider tests
fi
if wants ops; then
    step ops_triton 150 python3 benchmarks/gpu_ops.py --backend triton
    step ops_cupy_vs_triton 100 python3 -m glakernels.backends.cupy.tune --backends triton,cupy --baseline triton --sdpa
fi
if wants models; then
    step models 170 python3 benchmarks/models_gpu.py --models ViG-T,ViG-S,DeiT-T,DeiT-S,DeiT-B --min-time 0.5
fi
if wants vig; then
    # ViG-T against DeiT-T at the DESIGN §8 points, with vig's Triton kernels and without them
    step vig_tests 320 python3 -m pytest -q -p no:cacheprovider tests/test_vig_triton_kernels.py \
        tests/test_vig_fused.py tests/test_vig_compile_autocast.py
    step vig_kernels 120 python3 benchmarks/vig_kernels_gpu.py
    step vigT_models 200 python3 benchmarks/models_gpu.py --models ViG-T,DeiT-T --points 224:128,1024:8 \
        --compile-modes eager,graph --modes infer,train --min-time 0.5
    step vigT_no_kernels 120 env VIG_TRITON_KERNELS=0 python3 benchmarks/models_gpu.py --models ViG-T \
        --points 224:128,1024:8 --compile-modes eager,graph --modes infer --min-time 0.5
    TAIL=45 step vigT_profile 120 python3 benchmarks/models_gpu.py --profile ViG-T:224:128:infer
fi
if wants compile; then
    # torch.compile rows (default mode, and reduce-overhead: CUDA graphs), with dynamo's
    # recompilation and graph-break reasons in the log
    step vigT_compile 400 env TORCH_LOGS=recompiles,graph_breaks python3 benchmarks/models_gpu.py \
        --models ViG-T,DeiT-T --points 224:128 --compile-modes compile,compile-ro --modes infer --min-time 0.5
    TAIL=45 step vigT_compile_profile 200 python3 benchmarks/models_gpu.py --profile ViG-T:224:128:infer:compile
fi
if wants asv; then
    # asv needs the git history to date the commit: use the checkout's, or a bundle of it
    # (git bundle create .stage/repo.bundle HEAD) where the tree was copied without .git
    # (the bundle first: a device copy of the tree may sit inside some other, older checkout)
    repo=$PWD
    if [ -f .stage/repo.bundle ] || ! git -C "$repo" rev-parse HEAD > /dev/null 2>&1; then
        rm -rf /tmp/asv-repo
        git clone -q .stage/repo.bundle /tmp/asv-repo && git -C /tmp/asv-repo checkout -q -B main && repo=/tmp/asv-repo
    fi
    commit=$(git -C "$repo" rev-parse HEAD)
    machine=$(cd asv_bench && HOME=/tmp python3 machine.py | tail -1)
    python3 - "$repo" "$OUT/asv_results" <<'PY'
import json, pathlib, sys
conf = pathlib.Path("asv_bench/asv.conf.json")
config = json.loads("\n".join(l for l in conf.read_text().splitlines() if not l.strip().startswith("//")))
config.update(repo=sys.argv[1], results_dir=sys.argv[2], benchmark_dir=str(conf.parent.resolve() / "benchmarks"),
              html_dir="/tmp/asv-html", env_dir="/tmp/asv-env", environment_type="existing")
for key in ("pythons", "matrix"):  # the virtualenv settings do not apply to this environment
    config.pop(key, None)
pathlib.Path("/tmp/asv.conf.json").write_text(json.dumps(config))
PY
    # asv writes results only when a run ends (and merges them into what the file holds), so the
    # grid runs as several short asv runs, each under its own time limit: a slow group costs
    # its own results, not the others'. ASV_GROUPS: "backends:benchmark-regex:seconds ...";
    # ASV_DIRECTIONS: "bidirectional" (the default), "causal" or both, comma-separated
    groups=${ASV_GROUPS:-"cupy:TimeOp:150 triton:TimeOp:150 cupy,triton:BandwidthOp|GpuMemoryOp:150 cupy:ModelStep|GpuModelMemory:200"}
    for group in $groups; do
        IFS=: read -r backends regex limit <<< "$group"
        GLAKERNELS_ASV_BACKENDS=$backends GLAKERNELS_ASV_DTYPES=bfloat16 GLAKERNELS_ASV_DIRECTIONS=${ASV_DIRECTIONS:-bidirectional} \
            HOME=/tmp step "asv_${backends//,/_}_${regex%%|*}" "$limit" \
            python3 -m asv run --config /tmp/asv.conf.json --python=same --machine "$machine" \
            --set-commit-hash "$commit" -b "$regex" -a repeat=5
    done
    ls -R "$OUT/asv_results" | head -20
fi
