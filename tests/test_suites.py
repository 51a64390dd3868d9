"""Every shipped suite expands, and every comparison it makes is fair: the models of one training entry (same task,
task options and recipe) have parameter counts within 10 % of each other (issue: matched parameters)."""

import json
from collections import defaultdict

import pytest

import models
from bench import suite


@pytest.mark.parametrize("name", suite.available())
def test_models_compared_on_a_task_have_matched_parameter_counts(name):
    groups = defaultdict(dict)
    for cell in suite.load(name).cells:
        if cell.kind == "train":
            key = json.dumps([cell.task, cell.task_config, cell.run_config], sort_keys=True, default=list)
            groups[key][cell.model] = models.build(cell.model, **cell.model_config).num_params()
    for key, params in groups.items():
        if len(params) > 1:
            assert max(params.values()) <= 1.10 * min(params.values()), (key, params)
