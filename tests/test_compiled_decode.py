"""The compiled decode step: same tokens as uncompiled, traced once per bucket, and a failing compile
falls back (reason recorded) and still answers. LoRA rows give the same numbers alone as in a mix."""
import shutil

import pytest
from PIL import Image

from eval.pool import ModelPool
from eval.protocol import Request


def inductor_can_compile() -> bool:
    """Inductor on CPU writes C++ and needs a compiler; without one these tests skip."""
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return False
    try:
        from torch._inductor import cpp_builder
        cpp_builder.get_cpp_compiler()
    except Exception:  # noqa: BLE001 - any failure means: cannot compile here
        return False
    return True


@pytest.fixture(scope="module")
def questions():
    return [Request(Image.effect_noise((64, 64), 40).convert("RGB"), "what is the highest value", max_new_tokens=12),
            Request(Image.new("RGB", (80, 50), (200, 30, 30)), "which category", max_new_tokens=12)]


@pytest.mark.skipif(not inductor_can_compile(), reason="inductor cannot compile on this machine (no C++ compiler)")
def test_compiled_decode_gives_the_same_tokens_as_uncompiled_and_traces_once(demo_model, questions):
    from torch._dynamo.utils import counters
    backend = ModelPool().backend(f"local:{demo_model}", compile=False)
    engine, generator = backend.engine, backend.engine.generator
    assert not generator.use_compile and "compiled" not in engine.describe()
    plain = [backend.generate([q])[0] for q in questions]
    assert not generator.compile_new_shapes, "past warm-up, a request never waits for a compile"
    generator.use_compile = generator.compile_new_shapes = True   # one bucket (batch 1, base): seconds, not minutes
    compiled = [backend.generate([q])[0] for q in questions[:1]]
    graphs = counters["stats"]["unique_graphs"]
    generator.compile_new_shapes = False            # as after warm-up: known shapes stay compiled
    compiled += [backend.generate([q])[0] for q in questions[1:]]
    assert compiled == plain and generator.compile_error is None
    assert generator.compiled_keys == {(1, ((), True))}
    assert counters["stats"]["unique_graphs"] == graphs, "a later request must not trace the step again"
    assert "decode: compiled eager" in engine.describe()
    assert engine.generate(questions[:2], [0, 0]) == plain, "an unwarmed bucket runs the plain step"
    assert generator.compiled_keys == {(1, ((), True))} and counters["stats"]["unique_graphs"] == graphs


def test_a_failing_compile_falls_back_with_its_reason_and_still_answers(demo_model, questions, monkeypatch):
    import torch

    def broken(fn, **options):
        def step(*args, **kwargs):
            raise RuntimeError("inductor cannot build this graph")
        return step
    pool = ModelPool()
    plain = pool.backend(f"local:{demo_model}")              # CPU default: not compiled
    assert not plain.engine.compile and not plain.engine.generator.use_compile
    monkeypatch.setattr(torch, "compile", broken)
    said = []
    tried = pool.backend(f"local:{demo_model}", compile=True, on_progress=said.append)
    assert tried.engine is not plain.engine, "compile is part of the pool key"
    generator = tried.engine.generator
    assert generator.compile_error == "RuntimeError: inductor cannot build this graph"
    assert "compile failed: RuntimeError: inductor cannot build this graph" in tried.engine.describe()
    assert any(m.startswith("compiling the decode step: batch 1") for m in said)
    assert any("compiling the decode step failed" in m for m in said)
    assert [tried.generate([q])[0] for q in questions] == [plain.generate([q])[0] for q in questions]
    assert tried.engine.generator is generator and tried.engine.fallback_reason is None


def test_compile_option_is_checked(demo_model):
    with pytest.raises(ValueError, match="compile='yes'"):
        ModelPool().backend(f"local:{demo_model}", compile="yes")


def test_a_lora_row_gets_the_same_numbers_alone_as_in_a_mixed_batch():
    import torch

    from eval.lora import LoraLinear, Rows
    torch.manual_seed(0)
    rows = Rows(8, "cpu", torch.float32)
    rows.resize(2)
    layer = LoraLinear(torch.nn.Linear(16, 24), rows)
    for slot in (1, 2):
        layer.add(slot, torch.randn(4, 16), torch.randn(24, 4), scale=2.0)
    x = torch.randn(3, 5, 16)
    uniform = {}
    for slot in (0, 1, 2):                  # the whole batch on one slot: the path a lone request takes
        rows.set([slot] * 3)
        assert rows.key == (((slot,) if slot else ()), True)
        uniform[slot] = layer(x)
    rows.set([0, 1, 2])
    assert rows.key == ((1, 2), False)
    mixed = layer(x)
    for i, slot in enumerate((0, 1, 2)):
        assert torch.equal(mixed[i], uniform[slot][i]), slot
    assert torch.equal(uniform[0], layer.base(x)), "base rows add nothing"
    a, b = layer.parts[1]
    assert torch.allclose(uniform[1], layer.base(x) + x @ a.t() @ b)
