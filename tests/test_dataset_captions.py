"""`kiln caption ART DIR`: a training folder captioned as kohya and diffusers read it."""

import json
import signal
import subprocess
import sys
import time

import pytest
from cli_helpers import assert_user_error, run_kiln
from PIL import Image

import kiln
from kiln.pipelines.dataset_captions import DatasetOutput, caption_folder

PREFIX = "photo of sks dog, "
SHORT = ("--max-new-tokens", "4")


def _picture(path, seed, size=(40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, ((seed * 70) % 256, (seed * 40) % 256, 200 - seed * 10)).save(path)
    return path


@pytest.fixture
def training_folder(tmp_path):
    root = tmp_path / "set"
    images = [
        _picture(root / "a.png", 0),
        _picture(root / "dogs" / "b.jpg", 1, (48, 32)),
        _picture(root / "dogs" / "more" / "c.webp", 2),
        _picture(root / "dogs" / "d.png", 3),
    ]
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "dogs" / "d.txt").write_text("my own words\n")
    (root / ".hidden").mkdir()
    _picture(root / ".hidden" / "x.png", 4)
    return root, images


def test_a_nested_folder_gets_one_caption_file_per_image(served_blip, training_folder):
    root, images = training_folder
    result = run_kiln(
        "caption", served_blip["blip"], root, "--recursive", "--sidecar", ".txt",
        "--prefix", PREFIX, *SHORT, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["captioned"] == ["a.png", "dogs/b.jpg", "dogs/more/c.webp"]
    assert report["kept"] == ["dogs/d.png"]
    assert [u["file"] for u in report["unreadable"]] == ["dogs/broken.png"]
    assert "skipped" in result.stderr and "broken.png" in result.stderr
    assert (root / "dogs" / "d.txt").read_text() == "my own words\n"  # kept as it was
    assert not (root / ".hidden" / "x.txt").exists() and not (root / "dogs" / "broken.txt").exists()
    deployment = kiln.load(served_blip["blip"])
    for image in images[:3]:
        expected = deployment.caption([image], max_new_tokens=4).caption
        assert image.with_suffix(".txt").read_text() == PREFIX + expected + "\n"


@pytest.fixture(scope="module")
def captioner(served_blip):
    deployment = kiln.load(served_blip["blip"])

    def caption(pictures):
        return [c[0] for c in deployment.caption(pictures, max_new_tokens=4).captions]

    return caption


def test_without_recursive_only_the_top_folder(captioner, training_folder):
    root, _ = training_folder
    report = caption_folder(captioner, root, DatasetOutput())
    assert [p.name for p in report.captioned] == ["a.png"]
    assert (root / "a.txt").exists()  # .txt beside it by default


def test_a_killed_run_resumes_without_captioning_twice(served_blip, tmp_path):
    root = tmp_path / "many"
    images = [_picture(root / f"{i:02d}.png", i) for i in range(24)]
    slow = ("--batch-size", "1", "--max-new-tokens", "24", "--min-new-tokens", "24")
    args = [sys.executable, "-m", "kiln.cli", "caption", str(served_blip["blip"]), str(root)]
    first = subprocess.Popen([*args, *slow], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(p.with_suffix(".txt").exists() for p in images):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    written = [p for p in images if p.with_suffix(".txt").exists()]
    assert 0 < len(written) < len(images), "the first run was not stopped midway"
    before = {p: p.with_suffix(".txt").stat().st_mtime_ns for p in written}
    assert all(p.with_suffix(".txt").read_text().endswith("\n") for p in written)  # whole
    second = run_kiln("caption", served_blip["blip"], root, *slow, "--json")
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert sorted(report["kept"]) == sorted(p.name for p in written)
    assert len(report["captioned"]) == len(images) - len(written)
    assert all(p.with_suffix(".txt").exists() for p in images)
    assert {p: p.with_suffix(".txt").stat().st_mtime_ns for p in written} == before


def test_jsonl_resumes_after_a_torn_line_and_overwrite_starts_again(captioner, tmp_path):
    root = tmp_path / "set"
    for i in range(3):
        _picture(root / f"{i}.png", i)
    metadata = root / "metadata.jsonl"
    metadata.write_text('{"file_name": "0.png", "text": "mine"}\n{"file_name": "1.pn')
    caption = captioner
    report = caption_folder(caption, root, DatasetOutput(sidecar=None, jsonl=metadata))
    assert [p.name for p in report.captioned] == ["1.png", "2.png"]
    entries = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert [e["file_name"] for e in entries] == ["0.png", "1.png", "2.png"]
    assert entries[0]["text"] == "mine"
    again = caption_folder(
        caption, root, DatasetOutput(sidecar=None, jsonl=metadata, overwrite=True)
    )
    assert len(again.captioned) == 3
    assert json.loads(metadata.read_text().splitlines()[0])["text"] != "mine"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sidecar", ".txt", "--jsonl", "m.jsonl"], "--sidecar SUFFIX or --jsonl FILE"),
        (["--sidecar", "txt"], "expected a suffix such as .txt"),
        (["--sidecar", ".png"], "expected a suffix such as .txt"),
    ],
)
def test_folder_options_refused_in_one_line(served_blip, training_folder, extra, message):
    root, _ = training_folder
    assert_user_error(run_kiln("caption", served_blip["blip"], root, *extra), message)


def test_two_images_that_would_share_a_caption_file_are_refused(served_blip, tmp_path):
    root = tmp_path / "set"
    _picture(root / "dog.png", 0)
    _picture(root / "dog.jpg", 1)
    assert_user_error(run_kiln("caption", served_blip["blip"], root), "would share one caption")


def test_folder_flags_on_files_are_refused(served_blip, training_folder):
    _, images = training_folder
    result = run_kiln("caption", served_blip["blip"], images[0], "--recursive")
    assert_user_error(result, "are for a folder")
