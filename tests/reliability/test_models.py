"""Loaded models under failure: a refused adapter never changes what another adapter name means, and one
model loading never blocks another model's requests."""
import threading
import time

import pytest

from eval.local import AdapterError
from eval.pool import ModelPool
from eval.protocol import Request
from test_local_backend import adapter, adapter2, make_adapter, peft_answers, requests_, singles  # noqa: F401


def test_a_failed_adapter_leaves_earlier_adapters_meaning_what_they_meant(demo_model, adapter, adapter2,
                                                                            tmp_path, requests_):
    pool = ModelPool()
    tuned = pool.backend(f"local:{demo_model}+{adapter}")
    before = singles(tuned, requests_)
    wrong = make_adapter(demo_model, tmp_path / "wrong", hidden_size=32, projector=False)
    with pytest.raises(AdapterError, match=r"hidden size 32.*has 384"):
        pool.backend(f"local:{demo_model}+{wrong}")
    bad_target = make_adapter(demo_model, tmp_path / "vision", target=r".*vision_tower.*\.q_proj", projector=False)
    with pytest.raises(AdapterError, match="vision tower"):
        pool.backend(f"local:{demo_model}+{bad_target}")
    other = pool.backend(f"local:{demo_model}+{adapter2}")
    assert singles(tuned, requests_) == before
    assert singles(other, requests_) == singles(ModelPool().backend(f"local:{demo_model}+{adapter2}"), requests_)
    assert singles(pool.backend(f"local:{demo_model}"), requests_) == peft_answers(demo_model, None, requests_)


def test_one_model_loading_does_not_block_another(demo_model, monkeypatch):
    import eval.local
    pool = ModelPool()
    pool.backend(f"local:{demo_model}")
    real_init = eval.local.Engine.__init__
    entered = threading.Event()

    def slow_init(self, *a, **k):
        entered.set()
        time.sleep(3)
        real_init(self, *a, **k)

    monkeypatch.setattr(eval.local.Engine, "__init__", slow_init)
    loader = threading.Thread(target=pool.backend, args=(f"local:{demo_model}",), kwargs={"device": "cpu"})
    loader.start()
    entered.wait(5)
    start = time.perf_counter()
    assert pool.backend(f"local:{demo_model}").generate([Request(None, "hi", max_new_tokens=2)])
    assert time.perf_counter() - start < 1.5
    loader.join()
