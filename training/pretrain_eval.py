"""The end-of-run evaluation of training/pretrain.py: does the model read the charts it was trained on,
the kind it never saw, and does it LOOK?

Four numbers per family, on fresh test charts (another seed than training, the demo look):
- seen: the pretraining kinds; held_out: the kind pretraining never drew (what the demo fine-tune fixes);
- *_swapped: the same questions with each image replaced by the next test chart's. A model that reads
  the chart loses accuracy here; one that learned answer priors does not (the issue's target: >= 30
  points lower than seen);
- prior: the most common training answer of each family, answered without looking;
- seen_default: the pretraining kinds drawn in the full default style range (smaller type, other sizes),
  padded and shrunk to the model's input as the studio does: how far the reading carries;
- table: the chart -> data table target itself, on the first charts of each split: title, row labels
  and value cells written back exactly;
- glyph_probe: whether the vision tower's features tell which digit is drawn where (a linear probe), next
  to the raw pixels and a tower of the same shape with random weights.
Scores are eval.metrics' relaxed accuracy (ChartQA's reference rule, and the normalized one), with
questions ending in the benchmark's short-answer instruction, as `python -m eval run` asks them.
"""
from __future__ import annotations

import random
import time
from collections import defaultdict


def greedy_answers(model, tokenizer, prompts: list[list[int]], pixels, pixel_fn, batch_size: int,
                   max_new_tokens: int = 16) -> list[str]:
    """Greedy answers to token-id prompts (image tokens already expanded), prompt k with image pixels[k].
    Batches are sorted by length and left-padded, as the studio's batched generation is."""
    import torch
    device = pixels.device
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
    out = [""] * len(prompts)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    use_amp = device.type == "cuda"
    for s in range(0, len(order), batch_size):
        ks = order[s:s + batch_size]
        width = max(len(prompts[k]) for k in ks)
        ids = torch.full((len(ks), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ks), width), dtype=torch.long)
        for r, k in enumerate(ks):
            ids[r, width - len(prompts[k]):] = torch.tensor(prompts[k])
            mask[r, width - len(prompts[k]):] = 1
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 pixel_values=pixel_fn(pixels[torch.tensor(ks, device=device)]),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos)
        for r, k in enumerate(ks):
            row = gen[r, width:].tolist()
            if eos in row:
                row = row[:row.index(eos)]
            out[k] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


def _score(preds: list[str], items: list[dict]) -> dict:
    from eval.metrics import relaxed_normalized, relaxed_reference
    by_family, by_kind = defaultdict(list), defaultdict(list)
    ref_all, norm_all = [], []
    for p, it in zip(preds, items):
        ref = relaxed_reference(p, [it["answer"]])
        norm = relaxed_normalized(p, [it["answer"]])[0]
        ref_all.append(ref)
        norm_all.append(norm)
        by_family[it["family"]].append(ref)
        by_kind[it["kind"]].append(ref)
    pct = lambda v: round(100 * sum(v) / max(1, len(v)), 1)  # noqa: E731
    return {"n": len(items), "relaxed": pct(ref_all), "relaxed_norm": pct(norm_all),
            "by_family": {f: {"relaxed": pct(v), "n": len(v)} for f, v in sorted(by_family.items())},
            "by_kind": {k: {"relaxed": pct(v), "n": len(v)} for k, v in sorted(by_kind.items())}}


def _rows(table_text: str) -> dict[str, list[str]]:
    out = {}
    for line in table_text.splitlines()[2:]:
        cells = [c.strip() for c in line.split("|")]
        out.setdefault(cells[0], cells[1:])
    return out


def table_scores(preds: list[str], golds: list[str]) -> dict:
    """How much of each data table the model wrote back: title exact, row labels found, value cells exact
    (%). A model that reads shows it here before its QA answers catch up."""
    title = labels = labels_ok = cells = cells_ok = 0
    for p, g in zip(preds, golds):
        title += p.split("\n", 1)[0].strip() == g.split("\n", 1)[0]
        pred_rows = _rows(p)
        for label, values in _rows(g).items():
            labels += 1
            got = pred_rows.get(label)
            labels_ok += got is not None
            for k, v in enumerate(values):
                cells += 1
                cells_ok += bool(got) and k < len(got) and got[k] == v
    pct = lambda a, b: round(100 * a / max(1, b), 1)  # noqa: E731
    return {"n": len(golds), "title": pct(title, len(golds)), "labels": pct(labels_ok, labels),
            "values": pct(cells_ok, cells)}


def evaluate(model, tokenizer, charts: dict[str, list[dict]], encode_prompt, pixel_fn, prior: dict[str, str],
             device, batch_size: int = 128, examples: int = 12, table_charts: int = 48,
             table_tokens: int = 320) -> dict:
    """charts: {"seen": [test_chart dicts], "held_out": [...]} -> the eval JSON (see the module docstring)."""
    import numpy as np
    import torch
    model.eval()
    result, t0 = {}, time.time()
    for split, rows in charts.items():
        if not rows:
            continue
        pixels = torch.from_numpy(np.stack([r["pixels"] for r in rows])).to(device)
        items, image_of = [], []
        for c, r in enumerate(rows):
            for qa in r["qas"]:
                items.append(qa)
                image_of.append(c)
        prompts = [encode_prompt(it["question"]) for it in items]
        swapped = [(c + 1) % len(rows) for c in image_of]      # the next chart: same look, other data
        for name, images in ((split, image_of), (f"{split}_swapped", swapped)):
            preds = greedy_answers(model, tokenizer, prompts, pixels[torch.tensor(images, device=device)],
                                   pixel_fn, batch_size)
            result[name] = _score(preds, items)
            if name == split:
                result[name]["examples"] = [{"kind": it["kind"], "family": it["family"], "question": it["question"],
                                             "gold": it["answer"], "pred": p}
                                            for it, p in list(zip(items, preds))[:examples]]
        result[f"{split}_prior"] = _score([prior.get(it["family"], "") for it in items], items)
        some = rows[:table_charts]       # chart -> table, the pretraining target, on the first few charts
        tables = greedy_answers(model, tokenizer, [encode_prompt(r["table_prompt"]) for r in some],
                                pixels[:len(some)], pixel_fn, batch_size, max_new_tokens=table_tokens)
        result[split]["table"] = table_scores(tables, [r["table"] for r in some])
        result[split]["table"]["example"] = {"gold": some[0]["table"], "pred": tables[0]}
    for split in charts:
        if split in result:
            result[split]["looks_drop"] = round(result[split]["relaxed"] - result[f"{split}_swapped"]["relaxed"], 1)
    result["eval_seconds"] = round(time.time() - t0, 1)
    model.train()
    return result


def table(result: dict) -> str:
    """Relaxed accuracy per family: seen / swapped / prior / held-out / held-out swapped, as text."""
    cols = [c for c in ("seen", "seen_swapped", "seen_prior", "held_out", "held_out_swapped", "held_out_prior",
                        "seen_default") if c in result]
    families = sorted({f for c in cols for f in result[c]["by_family"]})
    lines = ["family".ljust(12) + "".join(c.rjust(18) for c in cols)]
    for f in families:
        cells = []
        for c in cols:
            v = result[c]["by_family"].get(f)
            cells.append((f"{v['relaxed']:.1f} ({v['n']})" if v else "-").rjust(18))
        lines.append(f.ljust(12) + "".join(cells))
    lines.append("ALL".ljust(12) + "".join(f"{result[c]['relaxed']:.1f} ({result[c]['n']})".rjust(18) for c in cols))
    for c in cols:
        if "table" in result[c]:
            t = result[c]["table"]
            lines.append(f"data table, {c}: title {t['title']}%, row labels {t['labels']}%, values {t['values']}% "
                         f"({t['n']} charts)")
    if "glyph_probe" in result:
        g = result["glyph_probe"]
        lines.append(f"glyph probe ({g['px']} px digits, chance 10%): pixels {g['pixels']}%, tower {g['tower']}%, "
                     f"random tower {g['random_tower']}% ({g['n']} images)")
    return "\n".join(lines)


# ---------------------------------------------------------------- glyph probe
GLYPHS = "0123456789"


def glyph_cards(n: int, size: int, px: int, patch: int, seed: int):
    """n images of one digit each in `px`-pixel type (the reading cards' fonts and colours) at a random
    place at least two patches from the edges. Returns (uint8 n x size x size x 3, labels, centres)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from charts.canvas import DPI, _font
    from training.pretrain_data import CARD_FONTS
    rng = random.Random(f"{seed}:glyphs:{px}")
    pixels, labels, centres = np.empty((n, size, size, 3), dtype=np.uint8), [], []
    margin = max(px, 2 * patch)
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
        label, x, y = rng.randrange(len(GLYPHS)), rng.randint(margin, size - margin), rng.randint(margin, size - margin)
        ImageDraw.Draw(img).text((x, y), GLYPHS[label], fill=tuple(rng.randint(0, 90) for _ in range(3)),
                                 font=_font(rng.choice(CARD_FONTS), px * 72 / DPI, False), anchor="mm")
        pixels[i] = np.asarray(img)
        labels.append(label)
        centres.append((x, y))
    return pixels, labels, centres


def _probe_accuracy(x, y, n_train: int) -> float:
    """A linear probe: ridge regression onto one-hot labels, fit on the first n_train rows (its penalty
    chosen on the last fifth of them), scored on the rest: accuracy in %."""
    import torch
    x = x.double()
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-5)
    x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    onehot = torch.nn.functional.one_hot(y, len(GLYPHS)).double()

    def fit(rows, lam):     # in the dual form when there are more features than rows
        a, b = x[rows], onehot[rows]
        if a.shape[0] < a.shape[1]:
            return a.T @ torch.linalg.solve(a @ a.T + lam * torch.eye(a.shape[0], dtype=a.dtype, device=a.device), b)
        return torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1], dtype=a.dtype, device=a.device), a.T @ b)

    def accuracy(w, rows) -> float:
        return float(((x[rows] @ w).argmax(1) == y[rows]).double().mean())

    cut = n_train * 4 // 5
    lam = max((10.0 ** k for k in range(-1, 5)), key=lambda v: accuracy(fit(slice(0, cut), v), slice(cut, n_train)))
    return round(100 * accuracy(fit(slice(0, n_train), lam), slice(n_train, None)), 1)


def glyph_probe(model, pixel_fn, device, n: int = 600, px: int = 24, seed: int = 0, batch: int = 64) -> dict:
    """Reading needs glyphs: can a linear probe tell which digit is drawn, from the tower's features (the
    layer LLaVA passes to its projector) of the 3x3 patches around it? Against the same patches' pixels and
    a tower of the same shape with random weights (what features carry without training). Accuracy in %
    on the last quarter of `n` images; chance is 10."""
    import torch

    from training.pretrain_model import image_features
    tower = model.model.vision_tower
    size, patch = tower.config.image_size, tower.config.patch_size
    grid = size // patch
    pixels, labels, centres = glyph_cards(n, size, px, patch, seed)
    with torch.random.fork_rng(devices=[]):      # the caller's random state stays as it was
        torch.manual_seed(seed)
        random_tower = type(tower)(tower.config).to(device=device, dtype=next(tower.parameters()).dtype).eval()
    cells = [(cy // patch, cx // patch) for cx, cy in centres]
    feats = {"pixels": [], "tower": [], "random_tower": []}
    was_training = tower.training
    tower.eval()
    with torch.no_grad():
        for b in range(0, n, batch):
            pv = pixel_fn(torch.from_numpy(pixels[b:b + batch]).to(device))
            for name, t in (("tower", tower), ("random_tower", random_tower)):
                h = image_features(model, pv.to(next(t.parameters()).dtype), t)
                idx = torch.tensor([[(gy + dy) * grid + gx + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
                                    for gy, gx in cells[b:b + batch]], device=device)
                feats[name].append(h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1])).flatten(1).float())
            feats["pixels"].append(torch.stack([pv[i, :, (gy - 1) * patch:(gy + 2) * patch,
                                                   (gx - 1) * patch:(gx + 2) * patch].flatten()
                                                for i, (gy, gx) in enumerate(cells[b:b + batch])]).float())
    tower.train(was_training)
    y = torch.tensor(labels, device=device)
    n_train = n * 3 // 4
    return {"px": px, "n": n, **{k: _probe_accuracy(torch.cat(v), y, n_train) for k, v in feats.items()}}


def main(argv: list[str] | None = None) -> dict:
    """python -m training.pretrain_eval MODEL_DIR: the glyph probe of an exported demo model, on this machine."""
    import argparse

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from training.pretrain_model import pixel_fn
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("model_dir")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--px", type=int, default=24)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(a.model_dir, dtype=torch.float32).to(device).eval()
    result = glyph_probe(model, pixel_fn(AutoProcessor.from_pretrained(a.model_dir), device), device, a.n, a.px)
    print(result, flush=True)
    return result


if __name__ == "__main__":
    main()
