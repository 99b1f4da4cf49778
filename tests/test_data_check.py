"""The fleet data check (`launcher validate`, docs/fleet.md): hidden-flaw subjects, each named by
the check that must find it, and 1,000 synthetic subjects read from the S3 test server."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from conftest import job_dict, run_cli, write_job
from launcher.config import Subject
from launcher.inputs_check import PARALLEL, check_inputs


def _png(colour, size=(40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def flawed(tmp_path):
    """One subject per check, each hiding exactly that flaw among good images (and one clean)."""
    root = tmp_path / "subjects"

    def subject(name, files: dict[str, bytes | str]):
        folder = root / name
        folder.mkdir(parents=True)
        for fname, data in files.items():
            (folder / fname).write_bytes(data.encode() if isinstance(data, str) else data)
        return {"id": name, "images": str(folder), "instance_prompt": f"sks {name}"}

    good = {"000.png": _png((200, 0, 0)), "000.txt": "red", "001.png": _png((0, 200, 0)), "001.txt": "green"}
    return [
        subject("clean", good),
        subject("undecodable", {**good, "002.png": _png((0, 0, 200))[:70], "002.txt": "cut"}),
        subject("too-small", {**good, "002.png": _png((0, 0, 200), (40, 16)), "002.txt": "flat"}),
        subject("duplicate", {**good, "copy.png": good["000.png"], "copy.txt": "red again"}),
        subject("caption-without-image", {**good, "gone.txt": "an image that was deleted"}),
        subject("image-without-caption", {**good, "002.png": _png((0, 0, 200))}),
        subject("caption-not-text", {**good, "002.png": _png((0, 0, 200)), "002.txt": b"\xff\xfe\x00bad"}),
    ]


def test_the_data_check_names_each_hidden_flaw(tmp_path, tiny_model, flawed):
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, flawed, tmp_path / "out",
                                                    train={"prompt_template": "{instance}, {caption}"}))
    proc = run_cli("validate", str(job), "--json", "--min-side", "24")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    by_id = {s["id"]: s for s in report["subjects"]}

    def only(sid, kind):
        found = by_id[sid][kind]
        other = "warnings" if kind == "problems" else "problems"
        assert len(found) == 1 and not by_id[sid][other], by_id[sid]
        return found[0]

    assert by_id["clean"]["problems"] == by_id["clean"]["warnings"] == []
    assert [p.rsplit("/", 1)[-1] for p in by_id["clean"]["images"]] == ["000.png", "001.png"]
    assert "002.png cannot be decoded" in only("undecodable", "problems")
    assert only("too-small", "problems").endswith("002.png is only 40x16 pixels, less than the minimum side of 24")
    assert "copy.png is the same image as" in only("duplicate", "warnings") and "000.png" in by_id["duplicate"]["warnings"][0]
    assert only("caption-without-image", "warnings") == "caption file gone.txt has no image beside it"
    assert "002.png has no caption, and train.prompt_template '{instance}, {caption}' needs one (write 002.txt" \
        in only("image-without-caption", "problems")
    assert "caption file" in only("caption-not-text", "problems") and "is not UTF-8 text" in by_id["caption-not-text"]["problems"][0]
    assert len(by_id["undecodable"]["images"]) == 2  # the images it will still use
    assert report["summary"].startswith("checked 7 subject(s), ") and "2 warning(s)" in report["summary"]
    assert "4 with problems (4 problem(s))" in report["summary"]
    assert "4 problem(s) with the inputs" in proc.stderr
    # the human form: one summary line, warnings on stderr; a template without {caption} needs no captions
    job = write_job(tmp_path / "job2.yaml", job_dict(tiny_model, flawed[4:6], tmp_path / "out"))
    proc = run_cli("validate", str(job))
    assert proc.returncode == 0, proc.stderr
    assert "checked 2 subject(s), 5 usable image(s)" in proc.stdout and "0 with problems" in proc.stdout
    assert "warning: subject caption-without-image: caption file gone.txt has no image beside it" in proc.stderr


def test_manifest_captions_for_images_that_are_not_there_are_warned(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "000.png").write_bytes(_png((1, 2, 3)))
    subject = Subject(id="a", images=str(folder), instance_prompt="p", captions={"000.png": "x", "999.png": "y"})
    [report] = check_inputs([subject], "{caption}")
    assert report.problems == [] and report.warnings == ["captions: '999.png' names no image of the subject"]


@pytest.mark.slow
def test_a_thousand_subjects_on_s3_are_checked_concurrently(s3, capsys):
    """1,000 synthetic subjects (two images each) in the S3 test server; two planted flaws are
    found; the reads overlap but stay bounded. The time is printed (recorded, not asserted)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3["proxy"].url, region_name="us-east-1")
    images = [_png((i, 100, 200)) for i in range(2)]
    keys = [(f"fleet/s{i:04d}/{j:03d}.png", images[(i + j) % 2]) for i in range(1000) for j in range(2)]
    keys[2 * 417 + 1] = (keys[2 * 417 + 1][0], b"not a png")  # s0417: undecodable
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=s3["bucket"], Key=kv[0], Body=kv[1]), keys))
    client.put_object(Bucket=s3["bucket"], Key="fleet/s0900/002.png", Body=images[1])  # s0900: a duplicate
    subjects = [Subject(id=f"s{i:04d}", images=f"s3://{s3['bucket']}/fleet/s{i:04d}", instance_prompt="p")
                for i in range(1000)]
    s3["proxy"].reset()
    started = time.perf_counter()
    reports = check_inputs(subjects, progress=True)
    seconds = time.perf_counter() - started
    with capsys.disabled():
        print(f"\ndata check: 1,000 subjects (2,001 images) on the S3 test server in {seconds:.1f} s "
              f"({s3['proxy'].peak_in_flight} requests in flight at most)")
    bad = {r.id: r for r in reports if r.problems or r.warnings}
    assert sorted(bad) == ["s0417", "s0900"]
    assert bad["s0417"].problems == [f"s3://{s3['bucket']}/fleet/s0417/001.png is not an image"]
    assert "002.png is the same image as" in bad["s0900"].warnings[0]
    assert sum(len(r.images) for r in reports) == 2000
    assert 1 < s3["proxy"].peak_in_flight <= 2 * PARALLEL
    assert "checked 1000/1000 subject(s)" in capsys.readouterr().err  # the progress, off a terminal


def test_compile_with_buckets_says_it_compiles_per_shape():
    from launcher.config import job_from_dict
    from launcher.validate import notes_for

    job = job_from_dict(job_dict("/m", [{"id": "a", "images": "/x", "instance_prompt": "p"}], "/o",
                                 train={"compile": True, "buckets": True, "resolution": 512}))
    assert any(n.startswith("train.compile with train.buckets: the UNet compiles once for each bucket shape")
               for n in notes_for(job))
