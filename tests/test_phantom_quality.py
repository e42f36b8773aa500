"""The quality benchmark's region masks and linear baseline, on known inputs."""

import pytest
import torch

from benchmarks.phantom_quality import (
    add_scores,
    by_height_error,
    linear_fill,
    lr_factor,
    region_l1,
    row_profile,
    target_rows_mask,
    time_schedules,
)


def _batch(rows: int = 20) -> dict:
    ct = torch.zeros(1, 1, rows, 3)
    return {
        "ct": ct,
        "x1": torch.tensor([5]),
        "x2": torch.tensor([15]),
        "row_spacing_mm": torch.tensor([2.0]),
    }


def test_target_rows_split_into_endplates_and_interior():
    batch = _batch()
    rows = lambda m: torch.nonzero(m[0, 0, :, 0]).reshape(-1).tolist()  # noqa: E731
    assert rows(target_rows_mask(batch)) == list(range(5, 15))
    # 4 mm at 2 mm rows: two rows from each end
    assert rows(target_rows_mask(batch, "endplates")) == [5, 6, 13, 14]
    assert rows(target_rows_mask(batch, "interior")) == list(range(7, 13))


def test_region_l1_of_each_part():
    batch = _batch()
    prediction = batch["ct"].clone()
    prediction[:, :, 5] = 1.0  # one endplate row wrong by 1
    assert region_l1(prediction, batch) == pytest.approx([0.1])
    assert region_l1(prediction, batch, "endplates") == pytest.approx([0.25])
    assert region_l1(prediction, batch, "interior") == [0.0]


def test_linear_fill_ramps_between_the_rows_around_the_target():
    batch = _batch()
    ramp = torch.arange(20.0).reshape(1, 1, 20, 1).expand(1, 1, 20, 3).clone()
    batch["ct"] = ramp.clone()
    batch["ct"][:, :, 5:15] = 100.0  # the target's rows: not on the ramp, must be replaced
    filled = linear_fill(batch)
    assert torch.allclose(filled, ramp)
    assert torch.equal(batch["ct"][:, :, 5:15], torch.full((1, 1, 10, 3), 100.0))  # input untouched


def test_add_scores_fills_every_part_of_a_new_method():
    batch = _batch()
    prediction = batch["ct"].clone()
    prediction[:, :, 5] = 1.0
    scores: dict[str, list[float]] = {}
    add_scores(scores, "m", prediction, batch)
    add_scores(scores, "m", prediction, batch)
    assert list(scores) == ["m", "m [endplates]", "m [interior]"]
    assert scores["m"] == pytest.approx([0.1, 0.1])
    assert scores["m [endplates]"] == pytest.approx([0.25, 0.25])
    assert scores["m [interior]"] == [0.0, 0.0]


def test_row_profile_from_each_end():
    batch = _batch()  # target rows 5..14
    prediction = batch["ct"].clone()
    prediction[0, 0, 5] = torch.tensor([0.3, -0.3, 0.3])  # top row: noisy (|error| 0.3), small bias (0.1)
    prediction[0, 0, 13] = 0.2  # second row from the bottom: shifted up by 0.2
    profile = row_profile(prediction, batch, rows=3)
    assert sorted(profile) == [
        ("bottom", 0),
        ("bottom", 1),
        ("bottom", 2),
        ("top", 0),
        ("top", 1),
        ("top", 2),
    ]
    ((l1, bias),) = profile[("top", 0)]
    assert l1 == pytest.approx(0.3) and bias == pytest.approx(0.1)
    assert profile[("bottom", 1)] == [pytest.approx((0.2, 0.2))]
    assert profile[("top", 1)] == [(0.0, 0.0)] and profile[("bottom", 0)] == [(0.0, 0.0)]


def test_row_profile_skips_rows_outside_a_short_target():
    batch = _batch()
    batch["x1"], batch["x2"] = torch.tensor([5]), torch.tensor([7])  # two rows
    profile = row_profile(batch["ct"].clone(), batch, rows=4)
    # rows 5 and 6 from both ends; row +2 and +3 fall outside [x1, x2)
    assert sorted(profile) == [("bottom", 0), ("bottom", 1), ("top", 0), ("top", 1)]


def test_lr_factor_holds_then_falls_linearly_to_zero():
    # train.py's constant-then-linear schedule over the time budget: half held, half decaying
    assert [lr_factor(p, 0.5) for p in (0.0, 0.25, 0.5, 0.75, 1.0)] == pytest.approx([1, 1, 1, 0.5, 0])
    assert lr_factor(0.9, 0.2) == pytest.approx(0.5)
    assert lr_factor(1.3, 0.5) == 0.0  # past the deadline (the last iteration may overrun it)
    assert lr_factor(0.99, 0.0) == 1.0  # held throughout
    assert lr_factor(0.0, 1.0) == 1.0 and lr_factor(0.5, 1.0) == pytest.approx(0.5)


def test_time_schedules_set_every_optimizers_rate_from_the_budget_spent():
    weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    optimizers = [
        torch.optim.Adam([weights[0]], lr=2e-4),
        torch.optim.Adam([{"params": [weights[1]], "lr": 1e-3}, {"params": [weights[2]], "lr": 4e-3}]),
    ]
    spent = [0.0]
    schedules = time_schedules(optimizers, lambda: spent[0], 0.5)
    rates = lambda: [g["lr"] for o in optimizers for g in o.param_groups]  # noqa: E731
    assert rates() == pytest.approx([2e-4, 1e-3, 4e-3])  # set at creation
    for share, factor in ((0.1, 1.0), (0.5, 1.0), (0.75, 0.5), (0.9, 0.2), (1.0, 0.0)):
        spent[0] = share
        for optimizer in optimizers:
            optimizer.step()  # an iteration, as in the benchmark's loop
        for schedule in schedules:
            schedule.step()
        assert rates() == pytest.approx([2e-4 * factor, 1e-3 * factor, 4e-3 * factor])


def test_scores_grouped_by_the_inserted_height_error():
    scores = {"a": [1.0, 2.0, 3.0, 5.0, float("nan")], "b": [0.0, 0.0, 1.0, 1.0, 2.0], "short": [9.0]}
    groups = by_height_error(scores, [0, 0, 3, 2, -4])
    assert list(groups) == [-2, 0, 2]  # +3 pooled with +2, -4 with -2
    assert groups[0] == {"n": 2.0, "a": 1.5, "b": 0.0}
    assert groups[2] == {"n": 2.0, "a": 4.0, "b": 1.0}
    assert groups[-2]["n"] == 1.0 and groups[-2]["b"] == 2.0 and groups[-2]["a"] != groups[-2]["a"]  # NaN
    assert "short" not in groups[0]  # a list of another length is not one value per slice
