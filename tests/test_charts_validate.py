import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import charts
from charts.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
BROKEN = ROOT / "tests" / "fixtures" / "broken"

# fixture folder -> the error it must raise (and no other error)
EXPECTED = {
    "no_image_token": "missing_image_token",
    "duplicate_ids": "duplicate_id",
    "how_many_percent": "how_many_percent",
    "jsonl_is_array": "jsonl_is_json_array",
    "json_is_jsonl": "json_is_json_lines",
    "image_token_twice": "image_token_repeated",
    "missing_image": "image_missing",
    "corrupt_image": "image_unreadable",
    "empty_turn": "empty_turn",
    "not_alternating": "turns_not_alternating",
    "yes_no_mismatch": "yes_no_mismatch",
    "number_not_number": "answer_not_number",
    "shared_image_across_splits": "image_in_several_splits",
}


@pytest.mark.parametrize("name,code", EXPECTED.items())
def test_each_broken_fixture_reports_its_own_error(name, code):
    report = charts.validate(BROKEN / name)
    assert not report.ok
    assert {i.code for i in report.errors} == {code}, report.to_text()
    assert f"[{code}]" in report.to_text()


def test_every_fixture_folder_is_covered():
    covered = set(EXPECTED) | {"no_split", "blog_sample", "image_token_later_turn"}
    assert {p.name for p in BROKEN.iterdir() if p.is_dir()} == covered


def test_image_token_in_a_later_turn_is_misplaced():
    codes = {i.code for i in charts.validate(BROKEN / "image_token_later_turn").errors}
    assert "image_token_misplaced" in codes


def test_missing_split_is_a_warning_not_an_error():
    report = charts.validate(BROKEN / "no_split")
    assert report.ok and [w.code for w in report.warnings] == ["no_split"]


def test_every_known_defect_of_the_blog_sample_is_flagged():
    """MISSION.md: no <image>, repeated ids, 'how many' answered with %, a JSON array where JSON Lines
    was promised, no train/test split."""
    report = charts.validate(BROKEN / "blog_sample")
    assert {"missing_image_token", "duplicate_id", "how_many_percent", "jsonl_is_json_array"} <= {
        i.code for i in report.errors}
    assert "no_split" in {w.code for w in report.warnings}
    text = report.to_text()
    assert "FAILED" in text and "id=1" in text and "data.jsonl:16" in text


def test_decompression_bombs_are_refused_without_decoding(tmp_path):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    # a valid PNG header claiming 30000 x 30000 pixels, with almost no data behind it
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    (tmp_path / "bomb.png").write_bytes(png)
    rec = {"id": "b", "image": "bomb.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A chart"}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(rec) + "\n")
    assert "image_too_large" in {i.code for i in charts.validate(tmp_path / "data.jsonl").errors}


def test_a_missing_path_is_an_error(tmp_path):
    assert {i.code for i in charts.validate(tmp_path / "nope").errors} == {"not_found"}


def test_generated_dataset_passes_and_cli_exit_codes_follow_errors(tmp_path, capsys):
    out = tmp_path / "good"
    charts.generate(12, seed=1, out_dir=out, multi_turn=True)
    assert main(["validate", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["validate", str(BROKEN / "no_split")]) == 0
    assert main(["validate", str(BROKEN / "duplicate_ids")]) == 1
    capsys.readouterr()
    assert main(["validate", "--json", str(BROKEN / "duplicate_ids")]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["errors"][0]["code"] == "duplicate_id"


def test_cli_process_exits_non_zero_on_errors():
    bad = subprocess.run([sys.executable, "-m", "charts", "validate", str(BROKEN / "blog_sample")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "missing_image_token" in bad.stdout


def test_a_yes_no_question_followed_by_an_instruction_is_still_checked(tmp_path):
    import shutil
    src = BROKEN / "yes_no_mismatch"
    shutil.copytree(src, tmp_path / "ds")
    path = tmp_path / "ds" / "data.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row["conversations"][0]["value"] += "\nAnswer the question using a single word or phrase."
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "yes_no_mismatch" in charts.validate(path).codes()
