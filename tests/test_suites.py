"""Every shipped suite expands, and every comparison it makes is fair: the models of one training entry (same task,
task options and recipe) have parameter counts within 10 % of each other (issue: matched parameters). A recipe
sweep (`sweep = true`) compares settings of each model, not models, and says so."""

import json
from collections import defaultdict

import pytest

import models
from bench.running import suite


@pytest.mark.parametrize("name", suite.available())
def test_models_compared_on_a_task_have_matched_parameter_counts(name):
    loaded = suite.load(name)
    if loaded.sweep:
        pytest.skip(f"{name} is a recipe sweep: it compares no models")
    groups = defaultdict(dict)
    for cell in loaded.cells:
        if cell.kind == "train":
            key = json.dumps([cell.task, cell.task_config, cell.run_config.as_dict()], sort_keys=True, default=list)
            groups[key][cell.model] = models.build(cell.model, **cell.model_config).num_params()
    for key, params in groups.items():
        if len(params) > 1:
            assert max(params.values()) <= 1.10 * min(params.values()), (key, params)


def test_a_suite_says_whether_it_is_a_sweep_with_a_boolean():
    assert suite.load("recall-sweep").sweep and not suite.load("recall").sweep
    with pytest.raises(suite.SuiteError, match="sweep true or false"):
        suite.expand("bad", {"sweep": "yes", "train": [{"task": "copy", "models": ["swa"]}]})
