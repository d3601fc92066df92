"""``convert`` as its stages: analyse once, plan before anything changes, apply, calibrate, verify."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from zoo import ZOO, build

import bnmove
from bnmove.errors import BnmoveError
from bnmove.pipeline.analyse import analyse
from bnmove.pipeline.calibration import Calibrator
from bnmove.pipeline.plan import plan


@pytest.mark.parametrize("name", list(ZOO))
def test_the_plan_is_what_inspect_shows_and_convert_does(name: str) -> None:
    model, inputs = build(name)
    pairs = bnmove.find_pairs(model, inputs)
    for placement in ("before", "after"):
        for method in ("exact", "auto"):
            decisions = plan(analyse(model, inputs), placement, method)
            assert [d.site.pair for d in decisions] == pairs
            result = bnmove.convert(model, placement, method=method, example_inputs=inputs)
            assert [m.moved for m in result.moves] == [d.rule is not None for d in decisions]
            for move, decision in zip(result.moves, decisions, strict=True):
                if decision.rule is None:
                    assert move.reason == decision.reason
                elif decision.rule.exact:
                    assert move.rule == decision.rule.name
                    assert move.keeps_outputs


def test_planning_changes_nothing() -> None:
    model, inputs = build("across-shared-module")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan(analyse(model, inputs), "after", "exact")
    assert "forward" not in vars(model) and list(model.state_dict()) == list(state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_the_plan_checks_its_choices_in_one_place() -> None:
    model, inputs = build("mlp")
    with pytest.raises(BnmoveError, match="unknown method 'fold'; choose one of: auto, exact, fit, swap"):
        plan(analyse(model, inputs), "after", "fold")
    with pytest.raises(BnmoveError, match="unknown placement 'beside'"):
        bnmove.convert(model, "beside")


def test_progress_names_each_stage() -> None:
    model, inputs = build("resnet")
    seen: list[tuple[str, int, int | None]] = []
    bnmove.convert(
        model,
        "after",
        method="auto",
        example_inputs=inputs,
        on_progress=lambda s: seen.append((s.what, s.done, s.total)),
    )
    stages = list(dict.fromkeys(what for what, _, _ in seen))
    assert stages == ["analysing the model", "moving pairs", "verifying"]
    moving = [(done, total) for what, done, total in seen if what == "moving pairs"]
    assert moving[0] == (0, 4) and moving[-1] == (4, 4)

    data = torch.randn(40, 3, 8, 8)
    seen.clear()
    bnmove.convert(
        model,
        "after",
        method="fit",
        calibration=bnmove.Calibration(data),
        example_inputs=inputs,
        on_progress=lambda s: seen.append((s.what, s.done, s.total)),
    )
    stages = list(dict.fromkeys(what for what, _, _ in seen))
    assert stages == [
        "analysing the model",
        "moving pairs",
        "calibrating: original model",
        "calibrating: fitting in order",
        "verifying",
    ]
    assert seen[-2][1:] == (seen[-2][2], seen[-2][2])  # the calibration bar ends full


def test_sites_and_calibration_plans_are_made_once_and_never_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """The apply stage hands calibration frozen plans, each made once after its move (BN′'s place
    and the layer to refit in it); the passes return what they fitted instead of writing into them."""
    seen = []
    run = Calibrator.run

    def spy(self, model, converted, plans, batches, progress):  # type: ignore[no-untyped-def]
        seen.extend(plans)
        fits = run(self, model, converted, plans, batches, progress)
        seen.extend(fits)
        return fits

    monkeypatch.setattr(Calibrator, "run", spy)
    model = bnmove.sample_models.resnet().eval()
    x = torch.randn(16, 3, 8, 8)
    result = bnmove.convert(
        model, "after", method="fit", example_inputs=(x[:2],), calibration=bnmove.Calibration(x)
    )
    plans = [p for p in seen if hasattr(p, "bn")]
    assert plans and all(p.bn in dict(result.model.named_modules()) for p in plans)
    for value in (*seen, *result.moves):
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.notes = ()  # a plan's, a fit's or a move's: none is written after it is made
    analysis = analyse(model, (x[:2],))  # the sites: settling a pair's exact rule made new ones
    assert all(analysis.structure(site) is not None for site in analysis.sites if site.pair.movable)
    with pytest.raises(dataclasses.FrozenInstanceError):
        analysis.sites[0].exact_rule = None  # type: ignore[misc]
    fitted = [m for m in result.moved if m.method == "fit-calibrated"]
    assert fitted and all(any(n.startswith("calibrated fit:") for n in m.notes) for m in fitted)
