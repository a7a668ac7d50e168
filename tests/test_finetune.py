"""Fine-tuning from GPT-2: the run starts exactly where the pretrained model is."""

import pytest
import torch
from torch.nn import functional as F
from conftest import read_log, train

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
