import math

import pytest
import torch

from mdlm_kit.errors import UserError
from mdlm_kit.schedules import SCHEDULES, Geometric, LogLinear, make_schedule

ALL = [
    make_schedule("loglinear"),
    make_schedule("loglinear", eps=0.0),
    make_schedule("linear"),
    make_schedule("cosine"),
    make_schedule("polynomial", power=0.5),
    make_schedule("polynomial", power=3.0),
    make_schedule("geometric"),
    make_schedule("geometric", sigma_min=1e-2, sigma_max=5.0),
]
T = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


def test_registry_has_the_documented_schedules():
    assert set(SCHEDULES) == {"loglinear", "linear", "cosine", "polynomial", "geometric"}


@pytest.mark.parametrize("s", ALL, ids=repr)
def test_endpoints(s):
    assert float(s.alpha(torch.zeros((), dtype=torch.float64))) == pytest.approx(1.0, abs=1e-12)
    assert 0.0 <= s.alpha_at_one < 1e-2
    a = s.alpha(T)
    assert torch.all(a[1:] < a[:-1]), "alpha must decrease"


@pytest.mark.parametrize("s", ALL, ids=repr)
def test_dalpha_matches_finite_differences(s):
    h = 1e-6
    fd = (s.alpha(T + h) - s.alpha(T - h)) / (2 * h)
    torch.testing.assert_close(s.dalpha(T), fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("s", ALL, ids=repr)
def test_inverse_round_trip(s):
    torch.testing.assert_close(s.inverse(s.alpha(T)), T, rtol=1e-9, atol=1e-9)
    alphas = torch.linspace(s.alpha_at_one + 1e-3, 1 - 1e-3, 50, dtype=torch.float64)
    torch.testing.assert_close(s.alpha(s.inverse(alphas)), alphas, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("s", ALL, ids=repr)
def test_weight_is_minus_dalpha_over_mask_rate(s):
    torch.testing.assert_close(s.weight(T), -s.dalpha(T) / (1 - s.alpha(T)), rtol=1e-9, atol=0)


def test_known_closed_forms():
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    torch.testing.assert_close(LogLinear(1e-3).weight(t), 1 / t)
    torch.testing.assert_close(make_schedule("cosine").alpha(t), 1 - torch.cos(math.pi / 2 * (1 - t)))
    torch.testing.assert_close(make_schedule("polynomial", power=2).alpha(t), 1 - t**2)
    g = Geometric(1e-4, 20.0)
    assert g.alpha_at_one == pytest.approx(math.exp(-(20.0 - 1e-4)))


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(UserError, match="unknown schedule 'cosin'"):
        make_schedule("cosin")
    with pytest.raises(UserError, match="eps"):
        make_schedule("loglinear", eps=1.5)
    with pytest.raises(UserError, match="bad arguments"):
        make_schedule("cosine", power=2)
