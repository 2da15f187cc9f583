"""The message's `argsrepr` (what Flower and the worker's log show as the job's args) is built with Python's
own repr instead of Celery's `saferepr`: the same text for a spec, cut at the same length."""

from celery.utils.saferepr import saferepr

from broker.messages import ARGSREPR_MAX, argsrepr
from broker.schemas import JobSpec


def test_the_same_text_as_celerys_saferepr():
    args = [JobSpec(workload="diffusion", prompt="a 'fox' \"in\" snow", tenant="alice", steps=20).model_dump(mode="json")]
    assert argsrepr(args) == saferepr(args, ARGSREPR_MAX)


def test_a_huge_prompt_is_cut_where_celery_cuts_it():
    args = [JobSpec(workload="llm", prompt="x" * 5_000).model_dump(mode="json")]
    text = argsrepr(args)
    assert len(text) == ARGSREPR_MAX and text.endswith("...") and text.startswith("[{'workload': 'llm'")
