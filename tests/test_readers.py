"""Dataset readers (Karpathy JSON, COCO captions, Conceptual Captions TSV, nocaps, image folder): what they
select, and one-line errors naming the file and the line or image for bad input."""
import json

import numpy as np
import pytest
from PIL import Image

from raycap.data.datasets import open_files, parse_dataset_spec
from raycap.data.sources import BadImage, load_image
from raycap.errors import UserError


def png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def karpathy(tmp_path, splits=("train", "restval", "val", "test"), missing=()):
    images = []
    for i, split in enumerate(splits):
        name = f"{i:03d}.jpg"
        if name not in missing:
            png(tmp_path / "imgs" / "val2014" / name, i)
        images.append({"filepath": "val2014", "filename": name, "split": split, "imgid": i, "cocoid": 100 + i,
                       "sentences": [{"raw": f" caption {i}.{k} "} for k in range(5)]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def test_karpathy_selects_splits_and_reads_references(tmp_path):
    path = karpathy(tmp_path)
    src, skipped = open_files("karpathy", path, ["train", "restval"], image_root=tmp_path / "imgs")
    assert src.ids == ["100", "101"] and not skipped and src.labelled
    assert src.references(1) == [f"caption 1.{k}" for k in range(5)]
    assert src.paths[0] == str(tmp_path / "imgs" / "val2014" / "000.jpg")
    assert np.asarray(src.image(1)).mean() == 1
    test, _ = open_files("karpathy", path, "test", image_root=tmp_path / "imgs")
    assert test.ids == ["103"] and test.name == "karpathy:dataset_coco.json:test"


def test_karpathy_bad_input_is_one_line(tmp_path):
    path = karpathy(tmp_path)
    with pytest.raises(UserError) as e:
        open_files("karpathy", path, "testing", image_root=tmp_path / "imgs")
    one_line(e, str(path), "selects no images", "restval, test, train, val")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [{"split": "test", "filename": "x.jpg"}')
    with pytest.raises(UserError) as e:
        open_files("karpathy", bad, "test")
    one_line(e, str(bad), "not valid JSON", "line 1")
    bad.write_text(json.dumps({"images": [{"split": "test", "sentences": []}]}))
    with pytest.raises(UserError) as e:
        open_files("karpathy", bad, "test")
    one_line(e, str(bad), "images[0]", "'filename'")


def test_missing_images_error_or_are_skipped_and_counted(tmp_path):
    path = karpathy(tmp_path, splits=("test",) * 4, missing=("001.jpg", "003.jpg"))
    with pytest.raises(BadImage) as e:
        open_files("karpathy", path, "test", image_root=tmp_path / "imgs")
    one_line(e, "001.jpg", "not found", "and 1 more missing", "on_bad_image: skip")
    src, skipped = open_files("karpathy", path, "test", image_root=tmp_path / "imgs", on_bad_image="skip")
    assert src.ids == ["100", "102"] and [s.id for s in skipped] == ["101", "103"]
    assert all(s.reason == "missing" for s in skipped)


def test_coco_captions_group_by_image_and_need_references(tmp_path):
    for i in (7, 3):
        png(tmp_path / "val2017" / f"{i:012d}.jpg", i)
    ann = {"images": [{"id": 7, "file_name": f"{7:012d}.jpg"}, {"id": 3, "file_name": f"{3:012d}.jpg"}],
           "annotations": [{"image_id": 7, "caption": "a dog."}, {"image_id": 3, "caption": "a cat"},
                           {"image_id": 7, "caption": "a brown dog"}]}
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.parent.mkdir()
    path.write_text(json.dumps(ann))
    src, _ = open_files("coco", tmp_path / "annotations", "captions_val2017.json:val2017", image_root=tmp_path)
    assert src.ids == ["3", "7"] and src.references(1) == ["a dog.", "a brown dog"]
    spec = parse_dataset_spec(f"coco:{path}:{tmp_path / 'val2017'}")
    src2, _ = open_files(**spec)
    assert src2.paths == src.paths
    ann["annotations"] = ann["annotations"][:2] + [{"image_id": 7}]
    path.write_text(json.dumps(ann))
    with pytest.raises(UserError) as e:
        open_files("coco", path, path.name, image_root=tmp_path / "val2017")
    one_line(e, str(path), "annotations[2]", "'caption'")
    ann["annotations"] = [{"image_id": 7, "caption": "a dog"}]
    path.write_text(json.dumps(ann))
    with pytest.raises(UserError) as e:
        open_files("coco", path, path.name, image_root=tmp_path / "val2017")
    one_line(e, str(path), "image '3' has no captions")


def test_nocaps_without_annotations_is_unlabelled(tmp_path):
    png(tmp_path / "a.jpg")
    path = tmp_path / "nocaps_test_image_info.json"
    path.write_text(json.dumps({"images": [{"id": 0, "file_name": "a.jpg"}]}))
    src, _ = open_files("nocaps", path, path.name)
    assert not src.labelled and src.ids == ["0"]
    with pytest.raises(UserError, match="no references"):
        src.references(0)


def test_conceptual_captions_counts_absent_images_and_names_bad_rows(tmp_path):
    png(tmp_path / "images" / "0.jpg")
    png(tmp_path / "images" / "2.jpg")
    tsv = tmp_path / "train.tsv"
    tsv.write_text("a photo of a dog\timages/0.jpg\nabsent one\timages/1.jpg\na cat\timages/2.jpg\n")
    src, skipped = open_files("cc", tmp_path, "train.tsv")
    assert src.ids == ["images/0.jpg", "images/2.jpg"] and src.references(1) == ["a cat"]
    assert [(s.id, s.reason) for s in skipped] == [("images/1.jpg", "missing")]
    tsv.write_text("a photo of a dog\timages/0.jpg\nno tab here\n")
    with pytest.raises(UserError) as e:
        open_files("cc", tmp_path, "train.tsv")
    one_line(e, str(tsv), "line 2", "caption<TAB>image path")


def test_folder_with_and_without_captions(tmp_path):
    png(tmp_path / "photos" / "b.png")
    png(tmp_path / "photos" / "sub" / "a.JPG")
    (tmp_path / "photos" / "notes.txt").write_text("x")
    src, _ = open_files("folder", tmp_path, "photos")
    assert src.ids == ["b.png", "sub/a.JPG"] and not src.labelled
    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"file": "b.png", "caption": "a black square"}\n{"file": "b.png", "captions": ["dark"]}\n')
    src, _ = open_files("folder", tmp_path, "photos", captions=caps)
    assert src.labelled and src.references(0) == ["a black square", "dark"]
    caps.write_text('{"file": "b.png", "caption": "x"}\n{"file": "c.png", "caption": "y"}\n')
    with pytest.raises(UserError) as e:
        open_files("folder", tmp_path, "photos", captions=caps)
    one_line(e, str(caps), "line 2", "'c.png'")
    caps.write_text('{"file": "b.png", "caption": \n')
    with pytest.raises(UserError) as e:
        open_files("folder", tmp_path, "photos", captions=caps)
    one_line(e, str(caps), "line 1", "not valid JSON")


def test_a_corrupt_image_passes_the_reader_and_fails_decoding_by_name(tmp_path):
    path = karpathy(tmp_path, splits=("test",))
    (tmp_path / "imgs" / "val2014" / "000.jpg").write_bytes(b"not an image")
    src, _ = open_files("karpathy", path, "test", image_root=tmp_path / "imgs")  # the reader only stats
    with pytest.raises(BadImage) as e:
        load_image(src.paths[0])
    one_line(e, "000.jpg", "cannot read image")


def test_dataset_specs():
    assert parse_dataset_spec("world:test") == {"kind": "world", "split": "test"}
    assert parse_dataset_spec("karpathy:d.json") == {"kind": "karpathy", "path": "d.json", "split": "test"}
    assert parse_dataset_spec("karpathy:d.json:val")["split"] == "val"
    assert parse_dataset_spec("karpathy:d.json:val", image_root="/imgs")["image_root"] == "/imgs"
    assert parse_dataset_spec("coco:a.json:/x", image_root="/imgs")["image_root"] == "/imgs"  # the flag wins
    assert parse_dataset_spec("folder:pics:c.jsonl") == {"kind": "folder", "path": "pics", "split": ".",
                                                        "captions": "c.jsonl"}
    with pytest.raises(UserError) as e:
        parse_dataset_spec("imagenet:/data")
    one_line(e, "imagenet:/data", "karpathy:DATASET.json[:SPLIT]")
