import pytest
import torch

import models
import tasks
from tasks.base import IGNORE, wilson_interval
from tasks.copy import BOS, EOS, FIRST_SYMBOL, NOISE, PAD, SEP


def decode(inputs, targets):
    """Full token sequence of one row (inputs plus the last target), padding removed."""
    seq = inputs.tolist() + [int(targets[-1])]
    return [t for t in seq if t != PAD]


def test_copy_example_is_bos_s_sep_s_eos_with_loss_on_the_answer_only():
    task = tasks.build("copy", train_min_len=3, train_max_len=9)
    batch = task.train_batch(step=0, batch_size=16)
    for row in range(16):
        inp, tgt = batch.inputs[row], batch.targets[row]
        n = int((inp != PAD).sum())
        seq = inp[:n].tolist() + [EOS]
        length = (len(seq) - 3) // 2
        assert 3 <= length <= 9
        assert seq[0] == BOS and seq[length + 1] == SEP and seq[-1] == EOS
        assert seq[1 : length + 1] == seq[length + 2 : -1]
        assert all(FIRST_SYMBOL <= t < task.vocab for t in seq[1 : length + 1])
        scored = (tgt != IGNORE).nonzero().flatten().tolist()
        assert scored == list(range(length + 1, 2 * length + 2))  # s after SEP, then EOS
        assert tgt[scored].tolist() == seq[length + 2 :]


def test_selective_copy_scatters_s_in_noise_and_copies_it_in_order():
    task = tasks.build("copy", variant="selective", train_min_len=5, train_max_len=5, spread=3)
    batch = task.train_batch(step=4, batch_size=8)
    for row in range(8):
        inp, tgt = batch.inputs[row], batch.targets[row]
        region = inp[1:16].tolist()
        assert inp[0] == BOS and inp[16] == SEP
        assert region.count(NOISE) == 10
        s = [t for t in region if t != NOISE]
        assert tgt[tgt != IGNORE].tolist() == [*s, EOS]


def test_batches_are_deterministic_per_step_and_differ_across_steps():
    task = tasks.build("copy")
    a, b, c = task.train_batch(7, 8), task.train_batch(7, 8), task.train_batch(8, 8)
    assert torch.equal(a.inputs, b.inputs)
    assert a.inputs.shape != c.inputs.shape or not torch.equal(a.inputs, c.inputs)


def test_eval_data_differs_from_training_data_seed_stream():
    task = tasks.build("copy", train_min_len=8, train_max_len=8)
    net = task.build_network(models.build("swa", window=4), 64)
    rows = task.evaluate(net, "cpu")
    assert {r["metric"] for r in rows} == {"exact_match", "token_accuracy"}
    assert all(0 <= r["value"] <= 1 for r in rows)


def test_untrained_model_scores_near_chance_and_a_perfect_oracle_scores_one():
    task = tasks.build("copy", eval_lengths=(6,), eval_samples=20)

    class Oracle(torch.nn.Module):
        def forward(self, inputs, state=None):
            out = torch.full((*inputs.shape, task.vocab), -1e9)
            for b in range(inputs.shape[0]):
                seq = inputs[b].tolist()
                sep = seq.index(SEP)
                s = seq[1:sep]
                for j, tok in enumerate([*s, EOS]):
                    if sep + j < inputs.shape[1]:
                        out[b, sep + j, tok] = 0
            return out, None

    exact = {r["metric"]: r["value"] for r in task.evaluate(Oracle(), "cpu")}
    assert exact["exact_match"] == 1.0
    net = task.build_network(models.build("transformer"), 64)
    assert {r["metric"]: r["value"] for r in task.evaluate(net, "cpu")}["exact_match"] < 0.05


@pytest.mark.parametrize("bad", [dict(variant="reverse"), dict(train_min_len=5, train_max_len=2),
                                 dict(eval_lengths=(0,)), dict(alphabet=1)])
def test_bad_copy_config_is_rejected_with_a_reason(bad):
    with pytest.raises(ValueError):
        tasks.build("copy", **bad)


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(KeyError, match="valid tasks: copy"):
        tasks.build("sorting")


def test_wilson_interval_is_sound_at_the_edges():
    low, high = wilson_interval(0, 100)
    assert low == 0 and 0.0 < high < 0.05
    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high and abs((low + high) / 2 - 0.5) < 1e-9
