"""The oracle route study (roe_core/analysis/oracle.py): each example's oracle route gives exactly the
dense path's answer, and no layer it runs could be dropped in its greedy order without changing it."""
import pytest
import torch

from roe_core.analysis.oracle import oracle_routes, summarise
from roe_core.scenes.questions import Question
from roe_core.systems import load_base, pipeline_class

pytestmark = pytest.mark.usefixtures("one_thread")


def test_oracle_routes_keep_the_dense_answer(images):
    loaded = load_base("tiny", device="cpu")
    pipe = pipeline_class("roe").from_base(loaded, fresh=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    qs = [Question(img, q, [], "x", "colour") for img, q in zip(images, ["What is it?", "Is it red?", "How many?"])]
    res = oracle_routes(pipe, qs, batch_size=2, max_new_tokens=4, progress=False)
    L = pipe.num_layers
    for q, route, dense in zip(qs, res["route"], res["dense"]):
        ans = pipe.answer(q.image, q.question, max_new_tokens=4, route=route)
        assert ans.text == dense
        assert len(route) == L
    s = summarise(qs, res, L)
    assert 0 <= s["oracle_mean_layers"] <= L and s["n"] == 3
    assert sum(s["oracle_histogram"].values()) == 3
