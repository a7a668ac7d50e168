#!/usr/bin/env bash
# Every GPU-only check and measurement, for a machine with a CUDA GPU (torch >= 2.11 installed there).
# Run from the repo root; results go under $OUT (or ./gpu_results):
#
#   bash .ci/gpu_checks.sh [hellaswag_val.jsonl] [shard folder] [documents.jsonl]
#
# The shard folder holds FineWeb tokens made here by fineweb.py (the GPU machine has no `datasets` and no
# internet), e.g. from the 2,800-document sample:
#   python fineweb.py --input ../shared/data/fineweb_legal_sample.jsonl --out_dir .gpu/legal_shards \
#       --shard_size 2000000 --val_tokens 262144
# PARTS picks what runs (default: all), so that the whole set fits two calls of 10 minutes:
#   PARTS="correctness run" bash .ci/gpu_checks.sh ...   then   PARTS="bench memory recipe" bash .ci/gpu_checks.sh ...
#   correctness  compiled bf16 runs under torchrun (NCCL) with eval, HellaSwag, compiled sampling (CUDA
#                graphs), checkpoint and resume: the default recipe, the fast one (Muon + WSD), LoRA; fp16
#   run          the real 124M step (B=64, T=1024, 2^19 tokens/step, bf16, compile) on real shards,
#                AdamW and Muon: tok/s, MFU, Muon's cost per step
#   bench        bench.py: ours vs HF (train step, HellaSwag, sampling) and each optimisation on vs off
#                (chunked loss incl. peak memory, compiled decode step), compile on and off, B=16 and 64
#   memory       peak memory of full vs LoRA fine-tuning: 124M and 350M (GPT-2 medium's shape), T=1024, bf16
#   recipe       recipe_proxy.py at the 124M shape on documents.jsonl (e.g. ../shared/data/fineweb_legal_sample.jsonl,
#                its last 8% held out): default vs fast at equal tokens, and the fast recipe's token speedup
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
HELLASWAG=${1:-${HELLASWAG_DATA:-}}
SHARDS=${2:-}
DOCS=${3:-}
PARTS=" ${PARTS:-correctness run bench memory recipe} "
part() { [[ "$PARTS" == *" $1 "* ]]; }
failures=()
fail() { failures+=("$1"); echo "FAILED: $1"; }  # every check runs; the script exits 1 at the end if any failed
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)} TIKTOKEN_CACHE_DIR=$(mktemp -d)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"; } 2>&1 | tee "$OUT/hardware.txt" || fail hardware.txt
hella_flags=(--no-hellaswag)
[ -n "$HELLASWAG" ] && hella_flags=(--hellaswag --hellaswag_limit 512 --hellaswag_data "$HELLASWAG")
work=$(mktemp -d)

if part correctness; then
  short=(--preset shakespeare --device cuda --compile on --max_steps 60 --eval_interval 20 --sample_interval 30)
  echo "== correctness 1: the default recipe, compiled bf16 under torchrun (NCCL): eval, HellaSwag, samples, stop, resume"
  torchrun --standalone --nproc_per_node=1 train_gpt2.py "${short[@]}" --log_dir "$work/default" --stop_after_step 30 "${hella_flags[@]}" 2>&1 | tee "$OUT/train_default.txt" || fail train_default.txt
  torchrun --standalone --nproc_per_node=1 train_gpt2.py "${short[@]}" --log_dir "$work/default" --resume "${hella_flags[@]}" 2>&1 | tee -a "$OUT/train_default.txt" || fail train_default.txt
  cp "$work/default/log.txt" "$OUT/train_default_log.txt" || fail train_default_log

  echo "== correctness 2: the fast recipe (Muon + WSD), compiled bf16, stop and resume"
  # --preset fast's recipe, on the short run's steps and warmup
  fast=($(python -c 'from train_gpt2 import PRESETS; print(" ".join(f"--{k} {v}" for k, v in PRESETS["fast"].items() if k not in ("max_steps", "warmup_steps")))'))
  torchrun --standalone --nproc_per_node=1 train_gpt2.py "${short[@]}" "${fast[@]}" --log_dir "$work/fast" --stop_after_step 30 --no-hellaswag 2>&1 | tee "$OUT/train_fast.txt" || fail train_fast.txt
  torchrun --standalone --nproc_per_node=1 train_gpt2.py "${short[@]}" "${fast[@]}" --log_dir "$work/fast" --resume --no-hellaswag 2>&1 | tee -a "$OUT/train_fast.txt" || fail train_fast.txt

  echo "== correctness 3: LoRA on a GPT-2-shaped model (random weights: no hub here), compiled bf16; sample.py --compare; validate.py"
  python -c "from train_gpt2 import GPT, GPTConfig; GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256)).save_hf('$work/base')" || fail base_model
  torchrun --standalone --nproc_per_node=1 train_gpt2.py "${short[@]}" --init_from "$work/base" --lora_rank 8 --max_lr 1e-3 \
    --log_dir "$work/lora" --no-hellaswag 2>&1 | tee "$OUT/train_lora.txt" || fail train_lora.txt
  python sample.py --init_from "$work/lora" --compare "$work/base" --compile on --max_new_tokens 64 --num_samples 2 \
    --prompt "ROMEO:" --eval_text data/tinyshakespeare.txt --eval_tokens 20000 2>&1 | tee "$OUT/sample_compare.txt" || fail sample_compare.txt
  python validate.py "$work/lora" --device cuda 2>&1 | tee "$OUT/validate_lora.txt" || fail validate_lora.txt

  echo "== correctness 4: on CUDA, the compiled decode step (a CUDA graph, never skipped) samples the plain step's tokens,"
  echo "   and LinearCrossEntropy under inductor gives the plain loss and gradients"
  TORCH_LOGS=perf_hints python - 2>"$OUT/cuda_equivalence_stderr.txt" <<'EOF' | tee "$OUT/cuda_equivalence.txt" || fail cuda_equivalence
import torch
import train_gpt2 as t
torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls exact enough for token-for-token equality
torch.manual_seed(0)
model = t.GPT(t.GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_pad_multiple=64)).cuda().eval()
prompt = torch.randint(0, 50257, (4, 10), device="cuda")
for sampling in (dict(temperature=0), dict(temperature=0.8, top_k=50)):
    outs = [model.generate(prompt, 200, compile_step=compiled, generator=torch.Generator("cuda").manual_seed(1), **sampling)
            for compiled in (False, True, True)]  # the second compiled call replays the captured graph
    assert outs[0].tolist() == outs[1].tolist() == outs[2].tolist(), f"compiled decode step differs: {sampling}"
    print(f"compiled decode step == plain step, {sampling}: 4 x 200 tokens equal")
model.train()
x, y = torch.randint(0, 50257, (8, 256), device="cuda"), torch.randint(0, 50257, (8, 256), device="cuda")
compiled = torch.compile(model)
results = {}
for name, chunk_rows in (("chunked", 1024), ("plain", 0)):
    model.zero_grad(set_to_none=True)
    model.loss_chunk_rows = chunk_rows
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = compiled(x, y)
    loss.backward()
    results[name] = (loss.item(), [p.grad.float().clone() for p in model.parameters()])
(loss_c, grads_c), (loss_p, grads_p) = results["chunked"], results["plain"]
assert abs(loss_c - loss_p) < 1e-3 * abs(loss_p), (loss_c, loss_p)
worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads_c, grads_p))
assert worst < 2e-2, worst
print(f"inductor + bf16: chunked loss {loss_c:.5f} vs plain {loss_p:.5f}; largest relative gradient difference {worst:.2e}")
EOF
  if grep -i "skipping cudagraphs" "$OUT/cuda_equivalence_stderr.txt"; then fail "cudagraphs skipped"; fi

  echo "== correctness 5: float16 with the gradient scaler, eager"
  python train_gpt2.py --preset shakespeare --device cuda --compile off --dtype float16 --max_steps 25 --eval_interval 5 \
    --sample_interval 0 --log_dir "$work/fp16" 2>&1 | tee "$OUT/train_fp16.txt" || fail train_fp16.txt
fi

if part run; then
  if [ -z "$SHARDS" ]; then
    echo "== run: skipped (no shard folder given)"
  else
    echo "== run: the real 124M step on real shards (B=64, T=1024, 2^19 tokens/step, bf16, compile), AdamW then Muon"
    for optimizer in adamw muon; do
      torchrun --standalone --nproc_per_node=1 train_gpt2.py --data_dir "$SHARDS" --optimizer "$optimizer" --max_steps 25 \
        --eval_interval 0 --no-hellaswag --sample_interval 0 --checkpoint_interval 1000 --val_tokens 65536 \
        --log_dir "$work/run_$optimizer" 2>&1 | tee "$OUT/run_124M_$optimizer.txt" || fail run_124M_$optimizer.txt
      cp "$work/run_$optimizer/log.txt" "$OUT/run_124M_${optimizer}_log.txt" || fail "run_124M_$optimizer"
    done
    python - "$OUT" <<'EOF' | tee "$OUT/run_124M_summary.txt" || fail run_124M_summary.txt
import statistics, sys
from pathlib import Path
from plumbing import read_log
for optimizer in ("adamw", "muon"):
    log = read_log(Path(sys.argv[1]) / f"run_124M_{optimizer}_log.txt")
    tok_s = [v for step, v in log["tok_s"].items() if step >= 5]  # after compile and warm-up
    mfu = [v for step, v in log.get("mfu", {}).items() if step >= 5]
    print(f"{optimizer}: median {statistics.median(tok_s):,.0f} tok/s over steps 5-24"
          + (f", MFU {100 * statistics.median(mfu):.1f}%" if mfu else ""))
EOF
  fi
fi

if part bench; then
  echo "== bench: 124M, ours vs HF and each optimisation on/off"
  hb=(--hellaswag_limit 0)
  [ -n "$HELLASWAG" ] && hb=(--hellaswag_limit 10042 --hellaswag_batch 32 --hellaswag_data "$HELLASWAG")
  python bench.py --model 124M --device cuda --batch_size 16 --compile on --skip finetune "${hb[@]}" --json "$OUT/bench_124M_compile.json" 2>&1 | tee "$OUT/bench_124M_compile.txt" || fail bench_124M_compile.json
  python bench.py --model 124M --device cuda --batch_size 16 --compile off --skip hellaswag,decode,finetune --json "$OUT/bench_124M_eager.json" 2>&1 | tee "$OUT/bench_124M_eager.txt" || fail bench_124M_eager.json
  python bench.py --model 124M --device cuda --batch_size 64 --compile on --skip sample,hellaswag,decode,finetune --json "$OUT/bench_124M_B64.json" 2>&1 | tee "$OUT/bench_124M_B64.txt" || fail bench_124M_B64.json
fi

if part memory; then
  echo "== memory: full vs LoRA fine-tuning, T=1024, bf16"
  python bench.py --model 124M --device cuda --batch_size 16 --skip train,loss,hellaswag,sample,decode --json "$OUT/finetune_124M.json" 2>&1 | tee "$OUT/finetune_124M.txt" || fail finetune_124M.json
  python bench.py --model 350M --device cuda --batch_size 8 --skip train,loss,hellaswag,sample,decode --json "$OUT/finetune_350M.json" 2>&1 | tee "$OUT/finetune_350M.txt" || fail finetune_350M.json
fi

if part recipe; then
  if [ -z "$DOCS" ]; then
    echo "== recipe: skipped (no documents.jsonl given)"
  else
    echo "== recipe: default vs fast at the 124M shape on real documents, equal tokens (bf16, eager)"
    python recipe_proxy.py --device cuda --data "$DOCS" --work_dir "$work/proxy" --n_layer 12 --n_head 12 --n_embd 768 \
      --block_size 1024 --total_batch_size 65536 --micro_batch_size 16 --max_steps 60 --val_tokens 262144 --seeds 0 \
      --json "$OUT/recipe_124M.json" 2>&1 | tee "$OUT/recipe_124M.txt" || fail recipe_124M.json
  fi
fi

rm -rf "$work"
if ((${#failures[@]})); then
  echo "GPU checks FAILED: ${failures[*]}"
  exit 1
fi
echo "GPU checks passed"
