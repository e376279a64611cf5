import json
import random
from pathlib import Path

import pytest

import charts
from charts.dataset import SPLITS
from charts.io import read_jsonl

N = 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "small"
    manifest = charts.generate(N, seed=3, out_dir=out, workers=1)
    return out, manifest


def _records(out):
    return {s: list(read_jsonl(Path(out) / f"{s}.jsonl")) for s in SPLITS}


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(Path(out).rglob("*"))
            if p.is_file() and p.name not in ("dataset.json",) and not p.name.startswith(".")}


def test_generation_writes_images_split_files_and_manifest(dataset):
    out, manifest = dataset
    assert len(list((out / "images").glob("*.png"))) == N
    assert all((out / f"{s}.jsonl").exists() for s in SPLITS)
    saved = json.loads((out / "dataset.json").read_text())
    assert saved["seed"] == 3 and saved["counts"]["charts"] == N
    assert set(saved["kinds"]) == set(charts.KINDS) and set(saved["families"]) == set(charts.FAMILIES)
    assert {"seed", "created", "settings", "counts"} <= set(saved)


def test_manifest_counts_match_the_files(dataset):
    out, manifest = dataset
    recs = _records(out)
    counts = manifest["counts"]
    for s in SPLITS:
        assert counts["records"][s] == len(recs[s])
        assert counts["images"][s] == len({r["image"] for r in recs[s]})
    all_recs = [r for rs in recs.values() for r in rs]
    assert sum(counts["families"].values()) == len(all_recs)
    assert sum(counts["kinds"].values()) == N
    assert counts["images"] == {"train": 19, "val": 2, "test": 3}


def test_no_image_appears_in_two_splits(dataset):
    out, _ = dataset
    owners = {}
    for split, rows in _records(out).items():
        for r in rows:
            assert owners.setdefault(r["image"], split) == split
            assert r["split"] == split


def test_records_are_llava_conversations_with_image_token_first_and_unique_ids(dataset):
    out, _ = dataset
    rows = [r for rs in _records(out).values() for r in rs]
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"].count("<image>") == 1
        assert gpt["from"] == "gpt" and gpt["value"] and "<image>" not in gpt["value"]
        assert (out / r["image"]).exists() and not Path(r["image"]).is_absolute()
        assert {"chart_type", "family", "answer_type", "split"} <= set(r)


def test_generated_dataset_passes_validation(dataset):
    out, _ = dataset
    report = charts.validate(out)
    assert report.ok and not report.warnings, report.to_text()


def test_same_seed_same_dataset_and_other_seed_differs(dataset, tmp_path):
    out, _ = dataset
    charts.generate(N, seed=3, out_dir=tmp_path / "again", workers=1)
    assert _files(tmp_path / "again") == _files(out)
    charts.generate(6, seed=4, out_dir=tmp_path / "other", workers=1)
    assert (tmp_path / "other/images/000000.png").read_bytes() != (out / "images/000000.png").read_bytes()


def test_two_worker_processes_give_the_same_files_as_one(tmp_path):
    one = charts.generate(10, ["bar", "pie"], seed=5, out_dir=tmp_path / "one", workers=1)
    two = charts.generate(10, ["bar", "pie"], seed=5, out_dir=tmp_path / "two", workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert one["counts"] == two["counts"]


def test_a_killed_run_resumes_without_duplicates(dataset, tmp_path):
    out, _ = dataset
    target = tmp_path / "resumed"

    def die_halfway(done, total):
        if done >= 10:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        charts.generate(N, seed=3, out_dir=target, workers=1, on_progress=die_halfway)
    assert not (target / "train.jsonl").exists()          # split files only appear at the end
    # a kill mid-write leaves a torn journal line and a temp image: both must be harmless
    with open(target / ".progress.jsonl", "a") as f:
        f.write('{"index": 11, "ima')
    (target / "images" / ".000011.png.123.tmp").write_bytes(b"partial")
    seen = []
    charts.generate(N, seed=3, out_dir=target, workers=1, on_progress=lambda d, t: seen.append(d))
    assert seen[0] >= 10                                   # finished charts were skipped
    assert _files(target) == _files(out)
    ids = [r["id"] for rs in _records(target).values() for r in rs]
    assert len(ids) == len(set(ids))


def test_other_settings_on_an_existing_folder_are_refused_unless_overwrite(dataset, tmp_path):
    target = tmp_path / "ds"
    charts.generate(4, ["bar"], seed=1, out_dir=target)
    with pytest.raises(ValueError, match="other settings"):
        charts.generate(4, ["pie"], seed=1, out_dir=target)
    manifest = charts.generate(4, ["pie"], seed=1, out_dir=target, overwrite=True)
    assert manifest["counts"]["kinds"] == {"pie": 4}


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown chart kind"):
        charts.generate(2, ["radar"], out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="split"):
        charts.generate(2, out_dir=tmp_path / "b", split=(0.5, 0.5))


def test_multi_turn_puts_all_questions_of_an_image_in_one_record(tmp_path):
    out = tmp_path / "mt"
    charts.generate(8, seed=2, out_dir=out, multi_turn=True, qa_per_chart=4)
    rows = [r for rs in _records(out).values() for r in rs]
    assert len(rows) == 8 and len({r["image"] for r in rows}) == 8
    for r in rows:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in conv[1:])
        assert len(r["family"]) == len(r["answer_type"]) == len(conv) // 2
    assert charts.validate(out).ok
    items = charts.load_qa(out)
    assert len(items) == sum(len(r["conversations"]) // 2 for r in rows)
    assert all("#turn" in it["id"] for it in items) and len({it["id"] for it in items}) == len(items)


def _instructed(rows):
    return [r for r in rows if r["conversations"][0]["value"].endswith(charts.SHORT_ANSWER_INSTRUCTION)]


def test_instruct_share_puts_the_benchmark_instruction_on_that_share_of_train_val_questions(tmp_path):
    from eval.run import DEFAULT_SUFFIX
    assert charts.SHORT_ANSWER_INSTRUCTION == DEFAULT_SUFFIX      # exactly what the runner appends
    one = charts.generate(24, seed=7, out_dir=tmp_path / "one", workers=1, qa_per_chart=5, instruct_share=0.5)
    recs = _records(tmp_path / "one")
    train_val = recs["train"] + recs["val"]
    assert len(train_val) >= 90
    assert 0.3 <= len(_instructed(train_val)) / len(train_val) <= 0.7
    assert not any(charts.SHORT_ANSWER_INSTRUCTION in r["conversations"][0]["value"] for r in recs["test"])
    assert one["settings"]["instruct_share"] == 0.5
    for r in _instructed(train_val):             # appended once, after the question
        q = r["conversations"][0]["value"]
        assert q.count(charts.SHORT_ANSWER_INSTRUCTION) == 1 and q.startswith("<image>\n")
    report = charts.validate(tmp_path / "one")
    assert report.ok and not report.warnings, report.to_text()
    stored = {r["id"]: r["conversations"][0]["value"].replace("<image>\n", "") for r in train_val}
    assert {it["id"]: it["question"] for it in charts.load_qa(tmp_path / "one") if it["id"] in stored} == stored
    # the choice follows from seed and record id: worker count does not change a byte
    two = charts.generate(24, seed=7, out_dir=tmp_path / "two", workers=2, qa_per_chart=5, instruct_share=0.5)
    assert _files(tmp_path / "two") == _files(tmp_path / "one") and two["counts"] == one["counts"]


def test_instruct_share_zero_gives_none_and_a_changed_share_is_another_setting(tmp_path):
    out = tmp_path / "bare"
    manifest = charts.generate(6, seed=1, out_dir=out, instruct_share=0)
    assert manifest["settings"]["instruct_share"] == 0
    assert not any(charts.SHORT_ANSWER_INSTRUCTION in r["conversations"][0]["value"]
                   for rs in _records(out).values() for r in rs)
    with pytest.raises(ValueError, match="instruct_share"):
        charts.generate(6, seed=1, out_dir=out, instruct_share=0.5)
    with pytest.raises(ValueError, match="instruct_share"):
        charts.generate(6, seed=1, out_dir=tmp_path / "bad", instruct_share=1.5)


def test_instruct_share_one_instructs_the_first_turn_of_every_train_val_record(tmp_path):
    out = tmp_path / "mt"
    charts.generate(10, seed=2, out_dir=out, multi_turn=True, qa_per_chart=3, instruct_share=1)
    recs = _records(out)
    train_val = recs["train"] + recs["val"]
    assert train_val and len(_instructed(train_val)) == len(train_val)
    for r in train_val:
        humans = [t["value"] for t in r["conversations"] if t["from"] == "human"]
        assert not any(charts.SHORT_ANSWER_INSTRUCTION in q for q in humans[1:])
    assert recs["test"] and not _instructed(recs["test"])
    report = charts.validate(out)
    assert report.ok and not report.warnings, report.to_text()


def test_cli_instruct_share_flag(tmp_path, capsys):
    from charts.__main__ import main
    out = tmp_path / "cli"
    assert main(["generate", "--out", str(out), "--n", "4", "--workers", "1", "--split", "1,0,0",
                 "--instruct-share", "1"]) == 0
    assert json.loads((out / "dataset.json").read_text())["settings"]["instruct_share"] == 1.0
    rows = _records(out)["train"]
    assert rows and len(_instructed(rows)) == len(rows)
    assert main(["generate", "--out", str(tmp_path / "bad"), "--n", "2", "--instruct-share", "2"]) == 2
    assert "instruct_share" in capsys.readouterr().err


def test_load_qa_flattens_records_to_questions(dataset):
    out, manifest = dataset
    items = charts.load_qa(out)
    assert len(items) == sum(manifest["counts"]["questions"].values())
    assert len({it["id"] for it in items}) == len(items)
    for it in items:
        assert Path(it["image"]).is_absolute() and Path(it["image"]).exists()
        assert "<image>" not in it["question"] and it["question"].endswith(("?", "."))
        assert len(it["answers"]) == 1 and it["family"] in charts.FAMILIES
    test = charts.load_qa(out, split="test")
    assert test and all(it["split"] == "test" for it in test)
    assert any("tolerance" in it for it in items) or all(it["answer_type"] != "number" for it in items)


def test_load_qa_reads_someone_elses_llava_json_array(tmp_path, dataset):
    out, _ = dataset
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes((out / "images/000000.png").read_bytes())
    records = [{"id": 7, "image": "a.png", "conversations": [
        {"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "A chart"}]}]
    (tmp_path / "img" / "llava.json").write_text(json.dumps(records))
    [item] = charts.load_qa(tmp_path / "img" / "llava.json")
    assert item == {"id": "7", "image": str((tmp_path / "img/a.png").resolve()), "question": "What is shown?",
                    "answers": ["A chart"], "chart_type": None, "family": None, "answer_type": None, "split": None}


def test_random_example_is_reproducible_and_from_the_test_split(dataset):
    out, _ = dataset
    a = charts.random_example(out, 11)
    assert a == charts.random_example(out, random.Random(11))
    assert a["split"] == "test" and Path(a["image"]).exists()


def test_list_datasets_finds_dataset_folders(tmp_path, dataset):
    out, _ = dataset
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "empty").mkdir()
    (tmp_path / "datasets" / "small").symlink_to(out)
    assert charts.list_datasets(tmp_path) == ["small"]
    assert charts.list_datasets(tmp_path / "nowhere") == []


def test_llava_json_export_is_arrays_the_original_trainer_reads(dataset, tmp_path):
    out, manifest = dataset
    exported = charts.export(out, "llava-json", tmp_path / "llava")
    for s in SPLITS:
        rows = json.loads((exported / f"{s}.json").read_text())
        assert isinstance(rows, list) and len(rows) == manifest["counts"]["records"][s]
        assert all((exported / r["image"]).exists() for r in rows)
    assert charts.validate(exported / "train.json").ok


def test_hf_export_loads_with_datasets_offline(dataset, tmp_path):
    import datasets
    out, manifest = dataset
    exported = charts.export(out, "hf", tmp_path / "hf")
    ds = datasets.load_dataset("imagefolder", data_dir=str(exported))
    assert set(ds) == {"train", "validation", "test"}
    assert len(ds["train"]) == manifest["counts"]["records"]["train"]
    row = ds["test"][0]
    assert row["images"][0].size[0] > 100                          # a decoded PIL image
    user, assistant = row["messages"]
    assert user["role"] == "user" and user["content"][0]["type"] == "image"
    assert user["content"][1]["type"] == "text" and "<image>" not in user["content"][1]["text"]
    assert assistant["role"] == "assistant" and assistant["content"][0]["text"]
    assert charts.zip_folder(exported).stat().st_size > 0
