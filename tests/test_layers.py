"""The import rule (studio -> training -> eval -> charts) and the security rules, checked on the source."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["charts", "eval", "training", "studio"]          # each may import only those before it
PROJECT_FILES = sorted(p for d in LAYERS + ["benchmarks"] for p in (ROOT / d).rglob("*.py")) + [ROOT / "app.py"]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for i, layer in enumerate(LAYERS):
        above = set(LAYERS[i + 1:])
        for path in (ROOT / layer).rglob("*.py"):
            for name in imported_modules(path) & above:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "imports must point studio -> training -> eval -> charts:\n" + "\n".join(wrong)


def test_gradio_is_imported_only_under_studio():
    wrong = [str(p.relative_to(ROOT)) for p in PROJECT_FILES
             if "gradio" in imported_modules(p) and p.relative_to(ROOT).parts[0] != "studio"]
    assert not wrong, f"gradio imported outside studio/: {wrong}"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_importing_the_core_packages_leaves_gradio_unloaded():
    loaded = _modules_after("import charts, eval, training, eval.backends, eval.metrics, eval.run, training.config, "
                            "training.launchers")
    assert "gradio" not in loaded


def test_importing_charts_and_metrics_leaves_torch_unloaded():
    loaded = _modules_after("import charts, eval.metrics")
    assert "torch" not in loaded and "transformers" not in loaded and "boto3" not in loaded


def test_no_shell_true_no_remote_code_no_pickle_loading():
    bad = []
    for path in PROJECT_FILES:
        text = path.read_text(encoding="utf-8")
        for needle in ("shell=True", "trust_remote_code=True", "torch.load(", "pickle.load"):
            if needle in text:
                bad.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not bad, bad
