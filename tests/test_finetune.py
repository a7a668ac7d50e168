"""Fine-tuning from GPT-2: the run starts exactly where the pretrained model is."""

import pytest
import torch
from torch.nn import functional as F
from conftest import read_log, run_script, train

import train_gpt2 as t


def pretrained_like_hf_dir(out_dir, n_positions=64, n_embd=32, n_layer=2, n_head=2):
    """A random transformers GPT-2 whose logits sit near -60, as a trained GPT-2's do, saved with
    save_pretrained. Every token embedding gets a shared direction u, and the final LayerNorm's bias
    points the other way: each logit h . w_j = h . e_j + h . u is about -60."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    hf_model = GPT2LMHeadModel(config).eval()
    u = F.normalize(torch.randn(n_embd), dim=0)
    with torch.no_grad():
        hf_model.transformer.wte.weight.add_(u)
        hf_model.transformer.ln_f.bias.copy_(-60 * u)
    hf_model.save_pretrained(out_dir)
    return hf_model


@torch.no_grad()
def hf_loss(hf_model, x, y):
    return F.cross_entropy(hf_model(x).logits.flatten(0, 1), y.flatten()).item()


def test_step_zero_losses_equal_hugging_face_from_a_pretrained_start(shakespeare_shards, tmp_path):
    """--init_from an HF directory with the vocab padded to 50,304: the train and val losses of step 0
    are the pretrained model's own, as Hugging Face computes them on the same tokens."""
    hf_model = pretrained_like_hf_dir(tmp_path / "hf")
    train(shakespeare_shards, tmp_path / "run", "--init_from", tmp_path / "hf", "--vocab_pad_multiple", "64",
          "--max_steps", "1")
    logged_train, logged_val = read_log(tmp_path / "run", "train")[0], read_log(tmp_path / "run", "val")[0]

    # The same tokens the run saw: TINY is B=2, T=32, 256 tokens a step = 4 micro-batches; 256 val tokens.
    loader = t.TrainLoader(shakespeare_shards, 2, 32, seed=1337)
    expected_train = sum(hf_loss(hf_model, *loader.next_batch()) for _ in range(4)) / 4
    val_batches = list(t.ValLoader(shakespeare_shards, 2, 32, val_tokens=256).batches())
    expected_val = sum(hf_loss(hf_model, x, y) for x, y in val_batches) / len(val_batches)
    assert 9 < expected_train < 13  # logits near -60 everywhere: about ln(50257), far from the 60+ of a leak
    assert logged_train == pytest.approx(expected_train, abs=1e-4)
    assert logged_val == pytest.approx(expected_val, abs=1e-4)


@pytest.mark.parametrize("field, value", [
    ("tie_word_embeddings", False),
    ("layer_norm_epsilon", 1e-6),
    ("activation_function", "relu"),
    ("n_inner", 100),
    ("scale_attn_by_inverse_layer_idx", True),
])
def test_from_pretrained_refuses_configs_it_cannot_represent(field, value, tmp_path):
    """A GPT2Config variant that computes another function is refused by name, not loaded wrongly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=1, n_head=2, **{field: value})
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(t.UserError, match=f"GPT2Config.{field}={value!r} is not supported"):
        t.GPT.from_pretrained(str(tmp_path))


def test_lora_trains_only_its_adapters_then_merges_into_a_plain_gpt2(shakespeare_shards, tmp_path):
    """LoRA on a pretrained-like model: exactly rank x (in + out) trainable parameters per matrix, the
    val loss falls on real text while every pretrained weight stays bitwise the same, and the merged
    model (and its Hugging Face export) computes what the adapted one does."""
    import contextlib
    import copy

    from transformers import GPT2LMHeadModel

    pretrained_like_hf_dir(tmp_path / "hf")
    model = t.load_pretrained(str(tmp_path / "hf"), vocab_pad_multiple=64)
    pretrained = {name: p.detach().clone() for name, p in model.named_parameters()}
    base = copy.deepcopy(model).eval()
    torch.manual_seed(0)
    t.add_lora(model, rank=4, alpha=8.0)
    tokens = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():  # B starts at zero: the adapted model starts as the pretrained one, exactly
        assert torch.equal(model(tokens)[0], base(tokens)[0])
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    # n_embd 32: c_attn 32 -> 96, attn.c_proj 32 -> 32, c_fc 32 -> 128, mlp.c_proj 128 -> 32; 2 blocks.
    assert sum(trainable.values()) == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)) == 4096
    assert all(name.endswith(("lora_A", "lora_B")) for name in trainable)

    optimizers = t.configure_optimizers(model, t.Settings(max_lr=1e-2), "cpu")
    t.set_lr(optimizers, 1.0)  # the peak: 1e-2
    assert sum(p.numel() for group in optimizers[0].param_groups for p in group["params"]) == 4096  # no state for frozen weights
    loader, val = t.TrainLoader(shakespeare_shards, 8, 32, seed=0), t.ValLoader(shakespeare_shards, 8, 32, val_tokens=4096)
    no_autocast, scaler = contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False)
    val_before, _ = t.evaluate_val_loss(model, val, no_autocast, ddp=False)
    for _ in range(20):
        t.train_step(model, optimizers, loader.next_batch, 1, no_autocast, 1.0, scaler, ddp=False)
    val_after, _ = t.evaluate_val_loss(model, val, no_autocast, ddp=False)
    assert val_after < val_before - 0.02
    for name, param in model.named_parameters():
        if name in pretrained:
            assert torch.equal(param, pretrained[name]), f"{name} changed"
            assert param.grad is None  # frozen: not even a gradient is kept

    merged = t.merge_lora(copy.deepcopy(model)).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        adapted_logits, merged_logits = model.eval()(tokens)[0], merged(tokens)[0]
        scale = adapted_logits.abs().max()  # about 60: float32 resolves ~4e-6 there
        assert (adapted_logits - merged_logits).abs().max() <= 1e-5 * scale
        t.save_hf(merged, tmp_path / "export")
        exported = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
        assert (exported(tokens).logits - merged_logits).abs().max() <= 1e-5 * scale


def test_a_lora_run_resumes_exactly_runs_under_ddp_and_its_checkpoint_works_everywhere(
        shakespeare_shards, shared_data, tmp_path):
    """A LoRA run through the command line: its checkpoint holds only the adapters (a fraction of a
    full one), a stop + --resume gives bitwise the losses of a straight run, 2 DDP ranks match 1, and
    sample.py, hellaswag.py, validate.py, export and --init_from all take it."""
    from transformers import GPT2LMHeadModel

    pretrained_like_hf_dir(tmp_path / "hf")
    lora = ["--init_from", tmp_path / "hf", "--lora_rank", "4", "--lora_alpha", "8", "--max_lr", "3e-3", "--max_steps", "6"]
    train(shakespeare_shards, tmp_path / "straight", *lora)
    straight = read_log(tmp_path / "straight", "train")
    train(shakespeare_shards, tmp_path / "halves", *lora, "--stop_after_step", "3")
    train(shakespeare_shards, tmp_path / "halves", *lora, "--resume")
    assert read_log(tmp_path / "halves", "train") == straight and len(straight) == 6
    train(shakespeare_shards, tmp_path / "ddp", *lora, procs=2)
    for step, loss in read_log(tmp_path / "ddp", "train").items():
        assert loss == pytest.approx(straight[step], abs=1e-5)

    checkpoint_path = tmp_path / "straight" / "ckpt_000006.pt"
    checkpoint = t.load_checkpoint(checkpoint_path)
    assert set(checkpoint["model"]) == {f"transformer.h.{i}.{target}.lora_{m}" for i in range(2)
                                        for target in t.LORA_TARGETS for m in "AB"}
    train(shakespeare_shards, tmp_path / "full", "--init_from", tmp_path / "hf", "--max_steps", "1")
    full_size = (tmp_path / "full" / "ckpt_000001.pt").stat().st_size
    assert checkpoint_path.stat().st_size < full_size / 50

    run = tmp_path / "straight"
    model = t.load_model(str(run))  # merged: a plain GPT-2
    assert t.lora_settings(model) is None and "LoRA rank 4" in model.source
    t.save_hf(model, tmp_path / "export")
    tokens = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        ours, theirs = model(tokens)[0], GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()

    # Before vs after: the same prompt and seed for both models, and their loss on a text.
    text = tmp_path / "scene.txt"
    text.write_text((t.DATA_DIR / "tinyshakespeare.txt").read_text()[-3000:])
    compare = run_script("sample.py", "--init_from", run, "--compare", tmp_path / "hf", "--eval_text", text,
                         "--num_samples", "1", "--max_new_tokens", "4", "--prompt", "ROMEO:")
    assert compare.returncode == 0, compare.stderr
    out = compare.stdout
    assert f"model A: {run / 'ckpt_000006.pt'} (step 6, LoRA rank 4 on {tmp_path / 'hf'}, merged)" in out
    assert out.index("--- sample 0, model A ---") < out.index("--- sample 0, model B ---")
    assert out.count("\nROMEO:") == 2
    tokens = torch.tensor([t.EOT_TOKEN] + t.get_tokenizer().encode_ordinary(text.read_text()))
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():  # model B's loss, the plain way: 64-token windows through Hugging Face's model
        windows = [tokens[i : i + 65] for i in range(0, len(tokens) - 1, 64)]
        total = sum(F.cross_entropy(hf_model(w[None, :-1]).logits[0], w[1:], reduction="sum").item() for w in windows)
    loss_line = out.strip().splitlines()[-1]
    assert loss_line.startswith(f"loss on {text} ({len(tokens) - 1:,} tokens): model A ")
    loss_b = float(loss_line.split("model B ")[1])
    assert loss_b == pytest.approx(total / (len(tokens) - 1), abs=1e-4)

    validate = run_script("validate.py", run, "--max_new_tokens", "4")
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "OK: matches its own export, loaded by Hugging Face's GPT2LMHeadModel" in validate.stdout  # not "GPT-2"
    hellaswag = run_script("hellaswag.py", "--model", run, "--data", shared_data / "hellaswag_val.jsonl", "--limit", "8")
    assert hellaswag.returncode == 0 and "acc_norm" in hellaswag.stdout, hellaswag.stderr
    train(shakespeare_shards, tmp_path / "again", "--init_from", run, "--max_steps", "1")  # a run folder, into a full fine-tune


def test_lora_fine_tuning_takes_less_memory_than_full_fine_tuning():
    """bench.py's memory figure, each case in a fresh process: LoRA keeps no gradients and no optimizer
    moments for the frozen weights, so its peak is lower by about 3 x the block weights (4 x 512 wide:
    12.6M weights, 150 MB). The spawned processes must report their own peaks, not this one's."""
    import types

    import bench

    config = t.GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=512)
    args = types.SimpleNamespace(batch_size=2)
    ballast = torch.ones(2**28)  # 1 GiB here, in the parent, that neither child may count
    full = bench.bench_finetune(config, args, "cpu", torch.float32, lora_rank=0)
    lora = bench.bench_finetune(config, args, "cpu", torch.float32, lora_rank=8)
    assert 0.1 < full - lora < 0.25 and full < 1.0, (full, lora)  # GiB
    del ballast


def test_a_resumed_lora_run_keeps_its_base_as_it_was(shakespeare_shards, tmp_path):
    """--resume must not write lora_base.pt again: with --lora_also_train the model's LayerNorms have
    trained by then, and a base holding them would no longer be the model the adapters were made for."""
    pretrained_like_hf_dir(tmp_path / "hf")
    lora = ["--init_from", tmp_path / "hf", "--lora_rank", "4", "--lora_also_train", "ln_f", "--max_lr", "3e-2",
            "--max_steps", "4"]
    run = tmp_path / "run"
    train(shakespeare_shards, run, *lora, "--stop_after_step", "2")
    base = (run / t.LORA_BASE_FILE).read_bytes()
    train(shakespeare_shards, run, *lora, "--resume")
    assert (run / t.LORA_BASE_FILE).read_bytes() == base
    model = t.load_model(str(run))  # the adapters and the trained ln_f, on the base they were made for
    assert "LoRA rank 4" in model.source
    with torch.no_grad():
        assert not torch.equal(model.transformer.ln_f.weight, torch.ones_like(model.transformer.ln_f.weight))
