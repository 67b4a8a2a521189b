"""Stage 4 under `accelerate launch` (lidr.pipeline.launch + train_worker): two CPU processes
(gloo) with per-process batch b train exactly as one process with batch 2b on the same pairs.

Both runs see the same global batches (planned for the global batch size, then split by
process), the loss weights make every step's gradient the mean over its pairs however they
are split, and the reference log-probs are scored per process and summed. So the per-step
metrics agree to float rounding, the saved models agree, and only one metrics file is written.
A tiny random Gemma 3 model (no Hub)."""

from __future__ import annotations

import json

import pytest
import torch

from lidr.config import TrainingConfig
from lidr.pipeline import launch
from lidr.pipeline.train import planned_steps, shard_batches, train_dpo_nll
from tiny import save_tiny_gemma3

WORDS = """Question : What is the capital of France ? Answer Paris is the capital . La capital de Francia es
París the cat sat on mat and dog ran in park one two three four five six seven eight nine ten hola mundo
gracias por favor bonjour merci danke schön""".split()
Q = "<s>Question : {} Answer :"
# 7 pairs of different lengths: with 2 processes x 1 pair the last global batch has one pair,
# so process 1 runs a weight-0 placeholder there, and the last step has 3 pairs, not 4.
EXAMPLES = [
    {"prompt": Q.format("What is the capital of France ?"), "chosen": " Paris is the capital .</s>",
     "rejected": " the cat sat on the mat</s>"},
    {"prompt": Q.format("hola mundo"), "chosen": " hola mundo gracias</s>",
     "rejected": " one two three four five six seven</s>"},
    {"prompt": Q.format("La capital de Francia ?"), "chosen": " La capital de Francia es París .</s>",
     "rejected": " dog</s>"},
    {"prompt": Q.format("one two three ?"), "chosen": " four five six</s>", "rejected": " ten nine</s>"},
    {"prompt": Q.format("bonjour"), "chosen": " bonjour merci</s>", "rejected": " the park and the dog</s>"},
    {"prompt": Q.format("gracias"), "chosen": " por favor</s>", "rejected": " cat cat cat</s>"},
    {"prompt": Q.format("the dog ?"), "chosen": " the dog ran in the park .</s>", "rejected": " eight</s>"},
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny(path):
    """A random 2-layer Gemma 3 with a word-level tokenizer, saved to path."""
    return save_tiny_gemma3(path, WORDS, vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            sliding_window=32, max_position_embeddings=128)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_shard_batches_weights():
    # 2 processes x 2 pairs, accumulation 2: global batches of 4, 4, 3 -> steps of 8 and 3 pairs
    micro = shard_batches([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]], 2, 2, 2)
    assert [[i for i, _ in mb] for mb in micro] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]]
    assert {w for mb in micro[:4] for _, w in mb} == {2 * 2 / 8}
    assert {w for mb in micro[4:] for _, w in mb} == {2 * 2 / 3}
    # an empty slice becomes a weight-0 placeholder
    assert shard_batches([[5]], 1, 2, 1) == [[(5, 2.0)], [(5, 0.0)]]
    assert planned_steps(7, 1, 2, 2, 3) == 6 and planned_steps(7, 2, 2, 1, 3) == 6


def test_two_processes_match_one(tmp_path):
    model = _tiny(tmp_path / "tiny")
    common = dict(beta=0.5, nll_weight=1.0, learning_rate=2e-3, epochs=3, gradient_accumulation=2,
                  warmup_ratio=0.0, lr_scheduler="linear", dtype="float32", max_length=64, lora=None,
                  final_metrics=True)
    one = TrainingConfig(batch_size=2, **common)
    two = TrainingConfig(batch_size=1, num_processes=2, **common)
    assert not launch.launched(one) and launch.launched(two)

    ref = train_dpo_nll(model, EXAMPLES, tmp_path / "one/model", one, seed=3, log_dir=tmp_path / "one/train")
    calls = []
    got = launch.train(model, EXAMPLES, tmp_path / "two/model", two, seed=3, log_dir=tmp_path / "two/train",
                       progress=lambda s, n, m: calls.append((s, n)))

    assert got["num_processes"] == 2 and got["distributed"] == "MULTI_CPU" and ref["num_processes"] == 1
    assert got["effective_batch"] == ref["effective_batch"] == 4
    a, b = _lines(tmp_path / "one/train/metrics.jsonl"), _lines(tmp_path / "two/train/metrics.jsonl")
    assert len(a) == len(b) == got["steps"] == ref["steps"] == 6  # ceil(ceil(7 / 2) / 2) x 3 epochs
    assert calls == [(s, 6) for s in range(1, 7)]  # the parent followed the worker's metrics
    keys = ("loss", "dpo_loss", "nll_loss", "reward_margin", "reward_chosen", "lr")
    for x, y in zip(a, b):
        for k in keys:
            assert y[k] == pytest.approx(x[k], rel=1e-3, abs=1e-5), (x["step"], k)
        if x["step"] > 1:  # at step 1 π = π_ref: every margin is 0 up to rounding, and so is its sign
            assert y["reward_accuracy"] == x["reward_accuracy"]
    assert a[-1]["loss"] < a[0]["loss"] - 0.05  # it did train
    for part in ("initial", "final"):  # reference / final passes, scored per process and summed
        for k in ("loss", "reward_margin", "reward_accuracy"):
            assert got[part][k] == pytest.approx(ref[part][k], rel=1e-3, abs=1e-5)
    assert got["tokens"] == ref["tokens"]

    # one metrics file, one summary, written by the main process only
    assert sorted(p.name for p in (tmp_path / "two/train").iterdir()) == [
        "examples.jsonl", "job.json", "launch.log", "metrics.jsonl", "summary.json"]
    assert json.loads((tmp_path / "two/train/summary.json").read_text()) == got

    # the saved model loads and equals the single-process one
    from transformers import AutoModelForCausalLM

    m1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one/model", dtype=torch.float32)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "two/model", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    w = lambda m: m.model.layers[1].mlp.down_proj.weight  # noqa: E731
    assert not torch.equal(w(m1), w(base))
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        # (atol: Adam's first step is ~lr x sign(gradient), so an element whose gradient is at rounding
        # level can move by up to lr either way; the updates themselves are ~7e-3)
        torch.testing.assert_close(p2, p1, rtol=1e-3, atol=1e-4, msg=n)


def test_launch_failure_reports_log(tmp_path, monkeypatch):
    """A failed launch raises with the end of train/launch.log (the real launch is the test above)."""
    import sys

    script = "import sys; print('Traceback: worker failed'); sys.exit(3)"
    monkeypatch.setattr(launch, "launch_command", lambda cfg, job: [sys.executable, "-c", script])
    cfg = TrainingConfig(num_processes=2, batch_size=1, lora=None)
    with pytest.raises(RuntimeError, match=r"(?s)failed \(exit code 3\).*Traceback: worker failed"):
        launch.train(tmp_path / "model-in", EXAMPLES[:2], tmp_path / "model", cfg, seed=0, log_dir=tmp_path / "train")
    job = json.loads((tmp_path / "train/job.json").read_text())
    assert job["training"]["num_processes"] == 2 and job["seed"] == 0
    assert len(_lines(tmp_path / "train/examples.jsonl")) == 2


def test_launch_command_and_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # names are found in the checkout's configs/accelerate from anywhere
    cfg = TrainingConfig(num_processes=4)
    cmd = launch.launch_command(cfg, "job.json")
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--num_processes"] and cmd[4] == "4"
    assert "--multi_gpu" in cmd and cmd[-3:] == ["-m", "lidr.pipeline.train_worker", "job.json"]
    for name in ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"):
        cfg = TrainingConfig(num_processes=8, accelerate_config=name)
        conf = launch.resolve_accelerate_config(name)
        assert conf.name == f"{name}.yaml"
        cmd = launch.launch_command(cfg, "job.json")
        assert cmd[cmd.index("--config_file") + 1] == str(conf) and "--multi_gpu" not in cmd
        assert "bf16" in launch.describe(cfg)
    from lidr.config import ConfigError

    with pytest.raises(ConfigError, match="training.accelerate_config.*zero4"):
        launch.check(TrainingConfig(accelerate_config="zero4"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: MULTI_GPU\nnot_an_accelerate_key: 1\n")
    with pytest.raises(ConfigError, match="not a valid accelerate config"):
        launch.check(TrainingConfig(accelerate_config=str(bad)))
