#!/usr/bin/env bash
# Every GPU-only check in one call, for a machine with a CUDA GPU (torch >= 2.11 installed there).
# Run from the repo root:  bash .ci/gpu_checks.sh [path/to/hellaswag_val.jsonl]   (results under $OUT or ./gpu_results)
# It checks: bf16 autocast + torch.compile + fused AdamW + NCCL under torchrun in a real (short) training
# run with eval, HellaSwag and sampling; then measures the 124M train step (compile on and off), HellaSwag
# on the full val set, and sampling, each next to Hugging Face's GPT-2 (bench.py).
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
HELLASWAG=${1:-${HELLASWAG_DATA:-}}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TIKTOKEN_CACHE_DIR=$(mktemp -d)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"; } 2>&1 | tee "$OUT/hardware.txt"
hella_flags=(--no-hellaswag)
[ -n "$HELLASWAG" ] && hella_flags=(--hellaswag --hellaswag_limit 512 --hellaswag_data "$HELLASWAG")

echo "== 1. a short compiled bf16 run under torchrun (NCCL), with eval, HellaSwag, samples, checkpoint, resume"
run_dir=$(mktemp -d)
torchrun --standalone --nproc_per_node=1 train_gpt2.py --preset shakespeare --device cuda --compile on \
  --max_steps 60 --eval_interval 20 --sample_interval 30 --log_dir "$run_dir/log" --stop_after_step 30 "${hella_flags[@]}" 2>&1 | tee "$OUT/train_short.txt"
torchrun --standalone --nproc_per_node=1 train_gpt2.py --preset shakespeare --device cuda --compile on \
  --max_steps 60 --eval_interval 20 --sample_interval 30 --log_dir "$run_dir/log" --resume "${hella_flags[@]}" 2>&1 | tee -a "$OUT/train_short.txt"
cp "$run_dir/log/log.txt" "$OUT/train_short_log.txt"

echo "== 2. 124M train step, HellaSwag and sampling, ours vs HF GPT-2"
hb=(--hellaswag_limit 0)
[ -n "$HELLASWAG" ] && hb=(--hellaswag_limit 10042 --hellaswag_batch 32 --hellaswag_data "$HELLASWAG")
python bench.py --model 124M --device cuda --batch_size 16 --compile on "${hb[@]}" --json "$OUT/bench_124M_compile.json" 2>&1 | tee "$OUT/bench_124M_compile.txt"
python bench.py --model 124M --device cuda --batch_size 16 --compile off --hellaswag_limit 0 --json "$OUT/bench_124M_eager.json" 2>&1 | tee "$OUT/bench_124M_eager.txt"
python bench.py --model 124M --device cuda --batch_size 64 --compile on --skip sample,hellaswag --json "$OUT/bench_124M_B64.json" 2>&1 | tee "$OUT/bench_124M_B64.txt"
