"""The model provably matches GPT-2: Hugging Face's GPT2LMHeadModel is the reference."""

import math

import pytest
import tiktoken
import torch
from conftest import assert_one_line_error, run_script

import train_gpt2 as t


def random_hf_model(tmp_path, **shape):
    """A randomly initialised transformers GPT-2 of the given shape, saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(GPT2Config(**shape)).eval()
    # Random-init HF biases and LayerNorms are 0/1; give them values so that a wrong copy shows up.
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.02)
    hf_model.save_pretrained(tmp_path)
    return hf_model


# Two shapes: a small one whose n_head differs from n_layer, and the full GPT-2 124M.
SHAPES = {
    "small": dict(vocab_size=50257, n_positions=128, n_embd=96, n_layer=3, n_head=4),
    "gpt2-124M": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_from_pretrained_matches_hugging_face(shape, tmp_path):
    hf_model = random_hf_model(tmp_path, **SHAPES[shape])
    model = t.GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.n_layer == SHAPES[shape]["n_layer"] and model.config.n_head == SHAPES[shape]["n_head"]

    enc = t.get_tokenizer()
    tokens = torch.tensor([enc.encode("The quick brown fox jumps over the lazy dog, and then it sleeps for a while.")])
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = hf_model(tokens).logits
        assert (ours - theirs).abs().max().item() <= 1e-4

        # Same loss on the same targets (HF shifts labels inside; we pass shifted targets).
        _, our_loss = model(tokens[:, :-1], tokens[:, 1:])
        their_loss = hf_model(tokens, labels=tokens).loss
        assert our_loss.item() == pytest.approx(their_loss.item(), abs=1e-5)

    # Identical greedy continuations to HF generate(do_sample=False).
    prompt = tokens[:, :6]
    ours = model.generate(prompt, max_new_tokens=24, temperature=0)
    theirs = hf_model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=t.EOT_TOKEN)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("vocab_pad_multiple", [1, 64])
def test_export_round_trip_to_hugging_face(vocab_pad_multiple, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.manual_seed(1)
    config = t.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=48, vocab_pad_multiple=vocab_pad_multiple)
    model = t.GPT(config).eval()
    assert model.transformer.wte.weight.size(0) == (50304 if vocab_pad_multiple == 64 else 50257)
    t.save_hf(model, tmp_path)

    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf_model.config.vocab_size == 50257
    tokens = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        assert (model(tokens)[0] - hf_model(tokens).logits).abs().max().item() <= 1e-5
    # The exported directory carries GPT-2's tokenizer too, with no download.
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tokenizer("Hello, I'm a language model,").input_ids == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    # And it loads back into our model unchanged.
    again = t.GPT.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert (again(tokens)[0] - model(tokens)[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("vocab_pad_multiple", [1, 64])
def test_chunked_loss_equals_the_plain_loss(vocab_pad_multiple):
    """The memory-saving loss (F.linear_cross_entropy, a chunk of rows at a time) gives the loss and every
    gradient of the plain classifier + F.cross_entropy: in fp32, under bf16 autocast, without gradients,
    and traced by torch.compile."""
    x, y = torch.randint(0, 50257, (4, 64)), torch.randint(0, 50257, (4, 64))

    def loss_and_grads(chunk_rows, dtype=None, compiled=False):
        torch.manual_seed(0)  # the same weights every time
        model = t.GPT(t.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, vocab_pad_multiple=vocab_pad_multiple))
        if chunk_rows:
            t.use_chunked_loss(model, chunk_rows)  # 100: chunks of 100, 100 and 56 rows
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            _, loss = (torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model)(x, y)
        (loss / 4).backward()  # a grad_output other than 1, as gradient accumulation sends
        return loss.detach(), [p.grad for p in model.parameters()], model

    plain_loss, plain_grads, _ = loss_and_grads(0)
    for chunked_loss, chunked_grads, model in (loss_and_grads(100), loss_and_grads(8192), loss_and_grads(100, compiled=True)):
        torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-6, atol=1e-6)
        for chunked, plain in zip(chunked_grads, plain_grads, strict=True):
            torch.testing.assert_close(chunked, plain, rtol=1e-4, atol=1e-8)
    bf16_plain, bf16_plain_grads, _ = loss_and_grads(0, torch.bfloat16)
    bf16_chunked, bf16_chunked_grads, _ = loss_and_grads(100, torch.bfloat16)
    torch.testing.assert_close(bf16_chunked, bf16_plain, rtol=1e-3, atol=1e-3)
    for chunked, plain in zip(bf16_chunked_grads, bf16_plain_grads, strict=True):
        assert (chunked - plain).abs().max() <= 2e-2 * plain.abs().max()  # bf16 keeps 8 bits of mantissa
    with torch.no_grad():  # the chunked model, without gradients
        torch.testing.assert_close(model(x, y)[1], plain_loss, rtol=1e-6, atol=1e-6)
        assert model(x)[0].shape == (4, 64, 50257)  # without targets: the logits, as GPT.forward gives them


def test_padded_vocab_is_never_sampled():
    torch.manual_seed(0)
    model = t.GPT(t.GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32, vocab_pad_multiple=64)).eval()
    with torch.no_grad():  # make the padded rows the most likely tokens by far
        model.lm_head.weight[50257:] = 10.0
    logits, _ = model(torch.zeros(1, 4, dtype=torch.long))
    assert logits.size(-1) == 50257
    out = model.generate(torch.zeros(4, 4, dtype=torch.long), max_new_tokens=20, temperature=1.0)
    assert out.max().item() < 50257
    assert t.get_tokenizer().decode(out[0].tolist())  # decodes without error


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = t.GPTConfig(**{**dict(block_size=64, n_layer=2, n_head=4, n_embd=64), **overrides})
    return t.GPT(config).eval()


@pytest.mark.parametrize(
    "sampling", [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.8, top_k=50, top_p=0.9)]
)
def test_kv_cache_generation_equals_full_recomputation(sampling):
    model = tiny_model()
    prompt = torch.randint(0, 50257, (3, 7))
    outputs = []
    for generate in (t.generate_with_cache, t.GPT.generate):
        generator = torch.Generator().manual_seed(123)
        outputs.append(generate(model, prompt, 40, generator=generator, **sampling))
    assert outputs[0].shape == (3, 47)
    assert outputs[0].tolist() == outputs[1].tolist()


@pytest.mark.parametrize("fixed_shapes", [True, False], ids=["all-slots", "filled-slots"])
def test_kv_cache_chunked_prefill_matches_one_pass(fixed_shapes):
    """Feeding a sequence in chunks through the cache gives the logits of one full pass, whether
    attention reads every slot (as the compiled step does) or only the filled ones."""
    model = tiny_model()
    tokens = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        full, _ = model(tokens)
        cache = t.KVCache(model.config, batch_size=2)
        cache.reset(fixed_shapes)
        parts = [t.forward_with_cache(model, tokens[:, a:b], cache, last_only=False) for a, b in [(0, 10), (10, 11), (11, 30)]]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_sampling_is_seedable_and_respects_top_k_and_top_p():
    model = tiny_model()
    prompt = torch.randint(0, 50257, (2, 5))
    a = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(7))
    c = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(8))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()

    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    picks = {t.sample_next_token(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {0, 1}
    # softmax([4,3,2,1,0]) = [.636, .234, .086, .032, .012]: top_p 0.8 keeps the first two tokens.
    picks = {t.sample_next_token(logits, top_p=0.8, generator=g).item() for _ in range(200)}
    assert picks == {0, 1}
    picks = {t.sample_next_token(logits, top_p=0.5, generator=g).item() for _ in range(50)}
    assert picks == {0}
    assert t.sample_next_token(logits, temperature=0).item() == 0


def test_stop_at_end_of_text():
    model = tiny_model()
    with torch.no_grad():  # make <|endoftext|> the certain next token
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[t.EOT_TOKEN, 0] = 30.0  # e^30 outweighs 50,256 tokens at e^0
    for generate in (t.GPT.generate, t.generate_with_cache):
        out = generate(model, torch.zeros(2, 3, dtype=torch.long), 30, temperature=1.0, stop_at_eot=True)
        assert out.shape == (2, 4) and out[:, -1].tolist() == [t.EOT_TOKEN] * 2


@pytest.mark.parametrize("prompt_length", [50, 80])  # the block fills while sampling; the prompt alone overfills it
def test_generation_past_block_size_crops_the_context(prompt_length):
    """Past block_size, each token is predicted from the last block_size tokens (nanoGPT's crop): greedy
    decoding equals a full recomputation on the cropped context, with the KV cache or without."""
    model = tiny_model()  # block_size 64
    prompt = torch.randint(0, 50257, (2, prompt_length))
    expected = prompt
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(expected[:, -64:])
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for generate in (t.generate_with_cache, t.GPT.generate):
        out = generate(model, prompt, 30, temperature=0)
        assert out.tolist() == expected.tolist()


def test_compiled_decode_step_gives_the_same_tokens():
    """The compiled one-token step (a CUDA graph on GPUs; the same code, compiled, on this CPU) samples
    exactly the tokens of the plain step, greedy and seeded, before and after the block fills."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(block_size=32, n_layer=1)
    prompt = torch.randint(0, 50257, (3, 5))
    for sampling in (dict(temperature=0), dict(temperature=0.9, top_k=40)):
        outputs = [t.generate_with_cache(model, prompt, 40, generator=torch.Generator().manual_seed(5), compile_step=compiled,
                                         **sampling) for compiled in (False, True)]
        assert outputs[0].shape == (3, 45) and outputs[0].tolist() == outputs[1].tolist()
    assert counters["stats"]["unique_graphs"] == 1  # compiled once for this batch size, not per position
    # A longer block: attention reads 64, then 128, then all 160 slots as they fill; the same tokens,
    # and a few graphs (the width is the only shape that changes), not one per position.
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(block_size=160, n_layer=1)
    outputs = [t.generate_with_cache(model, prompt, 150, temperature=0, compile_step=compiled) for compiled in (False, True)]
    assert outputs[0].shape == (3, 155) and outputs[0].tolist() == outputs[1].tolist()
    assert counters["stats"]["unique_graphs"] <= 3


def test_default_config_is_gpt2_124m_and_starts_at_chance():
    torch.manual_seed(0)
    model = t.GPT(t.GPTConfig())
    assert model.num_params() == 124_439_808
    assert model.transformer.wte.weight is model.lm_head.weight  # tied
    # Both residual projections of a block use the scaled init; the other matrices 0.02.
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(24), rel=0.05)
    assert model.transformer.h[5].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(24), rel=0.05)
    assert model.transformer.h[5].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 50257, (2, 128)), torch.randint(0, 50257, (2, 128))
    with torch.no_grad():
        _, loss = model(idx, targets)
    # Chance is ln(50257) = 10.82. The random classifier adds a little: each logit is h . w with |h| =
    # sqrt(768) after ln_f and w ~ N(0, 0.02), a spread of 0.55 that costs about 0.55^2 / 2 = 0.15.
    assert 0.05 < loss.item() - math.log(50257) < 0.25
    assert t.GPT(t.GPTConfig(vocab_pad_multiple=64)).transformer.wte.weight.shape == (50304, 768)


def test_tokenizer_matches_tiktoken_offline(shared_data):
    enc = t.get_tokenizer()
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [t.EOT_TOKEN]
    # Prompts: the special token is one token there, and an empty prompt starts a document.
    assert t.encode_prompt("Hi<|endoftext|>Hi") == [17250, t.EOT_TOKEN, 17250] and t.encode_prompt("") == [t.EOT_TOKEN]
    assert enc.n_vocab == 50257
    reference = tiktoken.get_encoding("gpt2")  # from the cache copy set up in conftest.py, no network
    import json

    texts = [(shared_data / "tinyshakespeare.txt").read_text()]
    for name in ("fineweb_edu_sample.jsonl", "fineweb_legal_sample.jsonl"):
        with open(shared_data / name) as f:
            texts += [json.loads(line)["text"] for line in f][:600]
    total = 0
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert ids == reference.encode_ordinary(text)
        total += len(ids)
    assert total > 1_000_000


def test_bad_model_references_give_one_line_errors(tmp_path):
    with pytest.raises(t.UserError, match="unknown model 'gpt3'"):
        t.load_model("gpt3")
    with pytest.raises(t.UserError, match="does not exist"):
        t.load_model(str(tmp_path / "nope" / "model_dir"))

    # A checkpoint whose weights do not fit its config.
    model = tiny_model()
    state = model.state_dict()
    state["transformer.wpe.weight"] = torch.zeros(32, 64)
    torch.save({"model": state, "model_config": {**vars(model.config)}}, tmp_path / "ckpt_000001.pt")
    with pytest.raises(t.UserError, match=r"wpe.weight has shape \(32, 64\)"):
        t.load_model(str(tmp_path / "ckpt_000001.pt"))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(t.UserError, match="unreadable"):
        t.load_model(str(tmp_path / "broken.pt"))

    # Through the command line: one line, no traceback.
    assert_one_line_error(run_script("sample.py", "--init_from", "gpt3"), "unknown model")
    assert_one_line_error(run_script("sample.py", "--init_from", tmp_path / "ckpt_000001.pt"), "wpe.weight")
    assert_one_line_error(run_script("validate.py", tmp_path / "missing_dir/"), "does not exist")


def test_validate_and_sample_command_lines(tmp_path):
    random_hf_model(tmp_path / "hf", **SHAPES["small"])
    result = run_script("validate.py", tmp_path / "hf", "--max_new_tokens", "8")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "missing 0, extra 0, shape mismatches 0" in result.stdout
    assert f"OK: matches Hugging Face's GPT2LMHeadModel on the same weights ({tmp_path / 'hf'})" in result.stdout
    assert result.stdout.count("greedy agree") == 4
    # It can fail: no float32 computation matches to 0.0.
    result = run_script("validate.py", tmp_path / "hf", "--max_new_tokens", "2", "--tolerance", "0")
    assert result.returncode == 1 and "FAILED" in result.stdout

    result = run_script("sample.py", "--init_from", tmp_path / "hf", "--prompt", "Hello", "--num_samples", "2",
                        "--max_new_tokens", "5", "--seed", "3", "--top_p", "0.9")
    assert result.returncode == 0, result.stderr
    samples = [line for line in result.stdout.splitlines() if line.startswith("Hello")]
    assert len(samples) == 2 and "--- sample 1 ---" in result.stdout
    again = run_script("sample.py", "--init_from", tmp_path / "hf", "--prompt", "Hello", "--num_samples", "2",
                       "--max_new_tokens", "5", "--seed", "3", "--top_p", "0.9")
    assert again.stdout == result.stdout  # seeded


def test_compiled_decode_step_writes_the_cache_in_place():
    """What inductor generates for the one-token step allocates nothing the size of a layer's cache: each
    new key and value is written into its slot, and no cache is copied whole (with one cache tensor for
    all layers, every layer's write went through a copy, and the step ended by copying the whole cache
    back: 6x slower than eager at the 124M shape on a CPU)."""
    import re

    from torch._inductor.utils import run_and_get_code

    model = tiny_model(block_size=128, n_layer=2)
    B, prompt = 4, torch.randint(0, 50257, (4, 5))
    with torch.no_grad():
        decoder = t.kv_decoder(model, B, prompt.device)
        decoder.prefill(prompt, fixed_shapes=True)
        logits, code = run_and_get_code(lambda: decoder.step(prompt[:, :1], compiled=True))
    assert logits.shape == (B, 1, 50257)
    code = "\n".join(code)
    allocated = {tuple(int(n) for n in shape.split(",") if n.strip()) for shape in re.findall(r"empty_strided_\w+\(\(([^)]*)\)", code)}
    layer_cache = (B, 4, 128, 16)  # (B, n_head, block_size, head size)
    assert allocated and not any(math.prod(shape) >= math.prod(layer_cache) and shape != (B, 50257) for shape in allocated), allocated


def test_sampling_in_bf16_casts_no_weight_per_token():
    """The training loop's samples (write_samples) run on a copy of the weights in the decode dtype, made
    once per sampling event, so that the compiled decode step (a CUDA graph, replayed every token) casts
    no weight: under autocast its graph cast every matmul's weight, the 50,304 x C classifier included,
    on every token. The copy is refreshed in place at the next event, and follows the model."""
    model = tiny_model()
    casts = []  # per compiled graph: the casts of a weight (a 2-D input of the graph)

    def record(graph):
        inputs = {node for node in graph.nodes if node.op == "placeholder"}
        casts.append([tuple(node.args[0].meta["val"].shape) for node in graph.nodes
                      if node.target in (torch.ops.prims.convert_element_type.default, torch.ops.aten._to_copy.default)
                      and node.args[0] in inputs and node.args[0].meta["val"].dim() == 2])

    config = t.Settings(num_samples=2, sample_prompt="Hello", sample_tokens=6)
    with torch._inductor.config.patch(post_grad_custom_post_pass=record, fx_graph_cache=False):
        texts, sampler = t.write_samples(model, config, torch.bfloat16, compile_step=True)
    assert casts == [[]], casts  # one graph, the decode step, and no weight cast in it
    assert len(texts) == 2 and all(text.startswith("Hello") for text in texts)
    assert sampler is not model and sampler.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32
    with torch.no_grad():  # the next event: the same copy, refreshed, holds what a fresh bf16 copy holds
        model.lm_head.weight.mul_(1.5)
    fresh = t.decoding_copy(model, torch.bfloat16)
    again = t.decoding_copy(model, torch.bfloat16, sampler)
    assert again is sampler and all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), fresh.state_dict().values()))
    assert t.decoding_copy(model, torch.float32) is model  # already in the decode dtype: no copy
