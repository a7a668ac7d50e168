"""Decode step at B=4 (124M, bf16, CUDA graphs): inductor's default GEMMs vs max-autotune. Appends to argv[1]."""
import json, sys, time
import torch
sys.path.insert(0, ".")  # run from the checkout root
import train_gpt2 as t

out = open(sys.argv[1], "a")
def say(**kw):
    print(json.dumps(kw), file=out, flush=True); print(kw, flush=True)

torch.manual_seed(0)
model = t.decoding_copy(t.GPT(t.GPTConfig(vocab_pad_multiple=64)).cuda().eval(), torch.bfloat16)
B, new = 4, 256
prompt = torch.randint(0, 50257, (B, 10), device="cuda")

def timed():
    torch.cuda.synchronize(); start = time.perf_counter()
    tokens = model.generate(prompt, new, temperature=0, compile_step=True)
    torch.cuda.synchronize(); return time.perf_counter() - start, tokens

reference = None
for mode in sys.argv[2].split(","):
    torch._dynamo.reset()
    model._decoder = None
    decoder = t.kv_decoder(model, B, "cuda")
    compile_mode = mode
    if mode.startswith("autotune-"):  # inductor's own GEMM kernels, tuned per shape, no graph cache
        import torch._inductor.config as inductor
        inductor.max_autotune = inductor.max_autotune_gemm = True
        inductor.max_autotune_gemm_backends = mode.removeprefix("autotune-").upper()
        inductor.fx_graph_cache = False
        inductor.coordinate_descent_tuning = True
        compile_mode = "reduce-overhead"
    decoder.compiled_step = torch.compile(decoder.eager_step, mode=compile_mode, fullgraph=True)
    first, tokens = timed()
    timed()
    best = min(timed()[0] for _ in range(3))
    same = reference is None or tokens.tolist() == reference
    reference = reference or tokens.tolist()
    say(mode=mode, first_call_s=round(first, 1), ms_per_step=round(1000 * best / new, 4), tok_s=round(B * new / best),
        same_tokens_as_first_mode=same)
