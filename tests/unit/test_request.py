"""The API's keywords are EvalRequest's fields: a request given whole, its fields by keyword, and
the errors Python itself would give for a wrong call."""
import inspect

import pytest

from nasq.api import evaluate, submit_evaluation
from nasq.request import EvalRequest, rerun_argv


def test_a_request_given_whole_or_by_its_fields_and_the_errors_of_a_wrong_call():
    req = EvalRequest(weights="w.pth", data="/d")
    for fn in (evaluate, submit_evaluation):
        assert inspect.signature(fn).bind(req).arguments["request"] is req  # mock.create_autospec works
        with pytest.raises(TypeError, match=rf"{fn.__name__}\(\) takes an EvalRequest positionally"):
            fn("w.pth", data="/d")
        with pytest.raises(TypeError, match=rf"{fn.__name__}\(\) missing required keyword argument: 'weights'"):
            fn(data="/d")
        with pytest.raises(TypeError, match=rf"{fn.__name__}\(\) got an unexpected keyword argument 'bogus'"):
            fn(weights="w", data="d", bogus=1)


def test_the_rerun_flags_follow_the_declaration_and_say_every_choice():
    argv = rerun_argv(EvalRequest(weights="/w.pth", data="/d", allow_bad_labels=True, gears=(1, 4), queue="eval.x",
                                  require_workers=3))
    assert argv == ["--weights", "/w.pth", "--data", "/d", "--backend", "torch", "-b", "8", "--allow-bad-labels",
                    "--gears", "1,4"]  # where the run goes (queue, require_workers) is not part of what it is
    assert "--outfmt" not in argv  # it comes only with --output
    assert rerun_argv(EvalRequest(weights="/w", data="/d", output_dir="/o", outfmt="TXT"))[-4:] == \
        ["--output", "/o", "--outfmt", "TXT"]
