import pytest
import torch

import tasks
from tasks.base import IGNORE, generator
from tasks.niah import EOS, NEEDLE, QUERY, SEP


def parse(tokens):
    needles = [i for i, t in enumerate(tokens) if t == NEEDLE]
    q = tokens.index(QUERY)
    key = tokens[q + 1 : q + 5]
    return needles, q, key


@pytest.mark.parametrize("needle", ["passkey", "number", "word", "uuid"])
@pytest.mark.parametrize("haystack", ["noise", "random"])
def test_example_has_exact_length_one_needle_and_the_query_at_the_end(needle, haystack):
    task = tasks.build("niah", needle=needle, haystack=haystack)
    for depth in (0.0, 37.0, 100.0):
        tokens, marks = task.example(generator(1, int(depth)), 300, depth)
        assert len(tokens) == 300
        needles, q, key = parse(tokens)
        assert len(needles) == 1 and tokens[needles[0] + 1 : needles[0] + 5] == key
        value = tokens[needles[0] + 6 : tokens.index(261, needles[0])]
        answer = [t for t, m in zip(tokens, marks, strict=True) if m]
        assert answer == [*value, EOS] and tokens[q + 5] == SEP
        fill = 300 - 1 - (len(value) + 7) - 6 - (len(value) + 1)
        assert abs((needles[0] - 1) - depth / 100 * fill) <= 1


def test_distractors_carry_other_keys():
    task = tasks.build("niah", distractors=2, train_length=256, train_min_length=256, eval_lengths=(256,))
    tokens, _ = task.example(generator(5), 256, 50.0)
    needles, _, key = parse(tokens)
    keys = [tokens[i + 1 : i + 5] for i in needles]
    assert len(needles) == 3 and keys.count(key) == 1


def test_text_haystack_reads_any_text_file(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time. " * 50)
    task = tasks.build("niah", haystack="text", text_path=str(path), eval_lengths=(128,), train_length=256)
    tokens, _ = task.example(generator(0), 128, 0.0)
    assert bytes(t for t in tokens if t < 256).count(b"upon") >= 3


def test_batches_mark_only_the_value_and_eos():
    task = tasks.build("niah", train_length=128, train_min_length=128, eval_lengths=(128,))
    batch = task.train_batch(0, 4)
    assert batch.inputs.shape == (4, 127)
    scored = (batch.targets != IGNORE).sum(1)
    assert torch.equal(scored, torch.full((4,), 6))  # 5 passkey digits + EOS


def test_eval_rows_cover_the_depth_by_length_grid():
    task = tasks.build("niah", eval_lengths=(128, 192), depths=(0.0, 100.0), eval_samples=4, train_length=256)
    net = task.build_network(__import__("models").build("swa", window=16), 64)
    rows = task.evaluate(net, "cpu")
    cells = {(r["n"], r["depth"]) for r in rows if r["metric"] == "exact_match"}
    assert cells == {(128, 0.0), (128, 100.0), (192, 0.0), (192, 100.0)}


@pytest.mark.parametrize("bad", [dict(haystack="lorem"), dict(needle="emoji"), dict(depths=(120.0,)),
                                 dict(train_length=32), dict(train_min_length=16)])
def test_bad_niah_config_is_rejected_with_the_valid_choices(bad):
    with pytest.raises(ValueError):
        tasks.build("niah", **bad)
