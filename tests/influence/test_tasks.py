"""The built-in tasks' own rules (their influence maths is tested in test_sketch_vs_exact.py)."""

import math

import pytest
import torch

from influencespace.influence import DataSpec, get_task, tasks
from influencespace.train import model as target


def _heads(**options):
    bank = {"image": torch.randn(4, 3, generator=torch.Generator().manual_seed(1)),
            "text": torch.randn(4, 5, generator=torch.Generator().manual_seed(2))}
    spec = DataSpec({"image": 3, "text": 5}, options={"negatives": 4, "head_dim": 2, **options})
    return get_task("contrastive").build_model(spec, bank, torch.Generator().manual_seed(0))


def test_learned_temperature_is_the_targets_parameterisation():
    """s = min(exp(τ), cap), τ tracked: the same form and cap as the train stage's ClipHeads."""
    assert tasks.MAX_LOGIT_SCALE == target.MAX_LOGIT_SCALE
    heads = _heads(logit_scale="learned", logit_scale_init=20.0)
    assert "log_scale" in get_task("contrastive").tracked_parameters(heads)
    assert heads.logit_scale().item() == pytest.approx(20.0)
    reference = target.ClipHeads(3, 5, 2, logit_scale_init=20.0)
    assert reference.scale().item() == pytest.approx(heads.logit_scale().item())
    with torch.no_grad():
        heads.log_scale.fill_(math.log(1e4))  # beyond the cap: clamped as the target clamps
    assert heads.logit_scale().item() == pytest.approx(tasks.MAX_LOGIT_SCALE)


def test_fixed_temperature_scales_the_logits_and_is_not_tracked():
    example = {"image": torch.ones(3), "text": torch.ones(5)}
    low, high = _heads(logit_scale=2.0), _heads(logit_scale=6.0)
    assert "log_scale" not in dict(low.named_parameters())
    torch.testing.assert_close(high(example), 3.0 * low(example))


def test_a_non_positive_fixed_temperature_is_a_config_error():
    from influencespace.config import load_config
    from influencespace.errors import ConfigError

    with pytest.raises(ConfigError, match="logit_scale must be a number > 0 or 'learned'"):
        load_config("test", ["influence.logit_scale=0"])
    assert load_config("test", ["influence.logit_scale=learned"]).influence.logit_scale == "learned"
