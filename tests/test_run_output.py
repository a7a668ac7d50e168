"""What a run shows: the settings it really uses, an ETA that counts everything still to come, a
summary at the end, --help that lists the choices, and TensorBoard records equal to log.txt."""


import pytest
import torch
from conftest import TRAIN, read_log, run_script, train

import plumbing
import train_gpt2 as t


def test_a_run_prints_its_resolved_settings_and_a_summary(shakespeare_shards, tmp_path):
    result = train(shakespeare_shards, tmp_path, "--max_steps", "4", "--eval_interval", "2")
    out = result.stdout
    assert "settings:" not in out  # the 50-line dump only on request (--print_settings)
    torch.manual_seed(0)
    params = t.GPT(t.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, vocab_pad_multiple=64)).num_params()
    train_tokens = t.TrainLoader(shakespeare_shards, 2, 32).windows_per_epoch * 64
    assert "on:     cpu (1 thread) | float32 | torch.compile off" in out  # not "auto" (tests run one thread a process)
    assert f"model:  {params / 1e6:.1f}M parameters (2 layers, 2 heads, 32 wide, block 32, vocab 50304) from a new GPT" in out
    assert f"data:   {shakespeare_shards}/: {plumbing.human(train_tokens)} train tokens in 2 shard(s); 256 val tokens per eval" in out
    assert "recipe: AdamW lr 0.001, cosine schedule, warmup 3 steps" in out
    assert f"steps:  4 x 256 tokens = 1.0K tokens ({1024 / train_tokens:.2f} epochs); a step = 2 x 32 tokens x 1 process(es) x 4" in out
    summary = out[out.index("done: step 4 of 4"):]
    assert "this session: 4 steps, 1.0K tokens in" in summary
    assert f"val loss {read_log(tmp_path, 'val')[3]:.4f}\n" in summary  # no GPT-2 beside a 1.6M model
    assert f"newest checkpoint: {tmp_path / 'ckpt_000004.pt'}" in summary
    assert f"python sample.py --init_from {tmp_path}/" in summary and "save_hf" in summary and "play.ipynb" in summary
    printed = run_script(TRAIN, "--data_dir", shakespeare_shards, "--log_dir", tmp_path / "again", "--max_steps", "1",
                         "--print_settings", "--device", "cpu", "--no-hellaswag", "--n_layer", "1", "--block_size", "32",
                         "--micro_batch_size", "2", "--total_batch_size", "64", "--val_tokens", "64")
    assert "settings:\n  data_dir = " in printed.stdout and "  peak_flops = 0.0" in printed.stdout


def test_the_summary_puts_a_gpt2_sized_model_beside_openais():
    model = t.GPT(t.GPTConfig(vocab_pad_multiple=64))
    summary = t.run_summary(t.Settings(max_steps=10), model, 7, 7, 60.0, 3.31, 0.2912, finished=False)
    assert "stopped: step 7 of 10" in summary and "continue: the same command with --resume" in summary
    assert "val loss 3.3100 (OpenAI's gpt2: 3.2924 on FineWeb-Edu's val shard)" in summary
    assert "HellaSwag acc_norm 0.2912 (OpenAI's gpt2: 0.2955)" in summary


@pytest.mark.parametrize("max_steps, eval_interval, sample_interval, checkpoint_interval", [
    (100, 10, 25, 30), (19073, 250, 250, 1000), (7, 0, 3, 1), (50, 7, 0, 50)])
def test_eta_counts_the_evaluations_samples_and_checkpoints_still_due(max_steps, eval_interval, sample_interval,
                                                                     checkpoint_interval):
    """eta_seconds against a plain count of what the loop will do after each step."""
    config = t.Settings(max_steps=max_steps, eval_interval=eval_interval, sample_interval=sample_interval,
                           checkpoint_interval=checkpoint_interval)
    seconds = dict(step=1.0, eval=10.0, sample=100.0, checkpoint=1000.0)
    for step in range(0, max_steps, max(1, max_steps // 40)):
        later = range(step + 1, max_steps)
        last = max_steps - 1
        evals = sum(1 for s in later if eval_interval and (s % eval_interval == 0 or s == last))
        samples = sum(1 for s in later if sample_interval and s > 0 and (s % sample_interval == 0 or s == last))
        checkpoints = sum(1 for s in later if (s + 1) % checkpoint_interval == 0 or s == last)
        expected = len(later) + 10 * evals + 100 * samples + 1000 * checkpoints
        assert plumbing.eta_seconds(step, config, seconds) == expected, step


def test_help_lists_the_choices_the_on_off_defaults_and_the_presets():
    help_text = run_script(TRAIN, "--help").stdout
    for choices in ("{adamw,muon}", "{cosine,wsd}", "{auto,bfloat16,float16,float32}", "{auto,on,off}", "{fast,shakespeare}"):
        assert choices in help_text
    flat = " ".join(help_text.split())
    assert "continue from the newest checkpoint in log_dir (fresh if there is none) (default: off)" in flat
    assert "HellaSwag every eval_interval (needs hellaswag.py's data) (default: on)" in flat
    assert "fast: --optimizer muon --muon_lr 0.02" in help_text and "shakespeare: --data_dir tinyshakespeare_tokens" in help_text


def test_tensorboard_records_what_log_txt_records(shakespeare_shards, tmp_path):
    """A run stopped at step 3 and resumed to 6, with --tensorboard: every scalar of log.txt, once per
    step, with the values log.txt holds; the samples as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--max_steps", "6", "--eval_interval", "2", "--sample_interval", "2", "--sample_tokens", "4", "--tensorboard"]
    train(shakespeare_shards, tmp_path, *args, "--stop_after_step", "3")
    train(shakespeare_shards, tmp_path, *args, "--resume")
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    logged = plumbing.read_log(tmp_path / "log.txt")
    assert set(logged) == {"train", "val", "lr", "norm", "tok_s"}
    for stream, values in logged.items():
        recorded = {e.step: e.value for e in events.Scalars(stream)}
        assert recorded.keys() == values.keys(), stream
        for step, value in values.items():
            assert recorded[step] == pytest.approx(value, rel=1e-6), (stream, step)
    samples = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples/text_summary")}
    assert sorted(samples) == [2, 4, 5] and all("Hello, I'm a language model," in text for text in samples.values())
