"""Training on the user's own data: CSV pairs and ImageFolders, bad images, errors, `pyclipq train --data`."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import pyclipq
from pyclipq import cli
from pyclipq.nn import QuantLinear
from pyclipq.data import (BadImageError, CaptionPairs, LabelledCollate, LabelledImages, PairCollate,
                                parse_data_spec, train_loader)
from test_distributed import write_pairs
from train_helpers import tiny_tokenizer


def test_a_bad_image_is_counted_and_skipped(tmp_path):
    csv = write_pairs(tmp_path, n=8)
    (tmp_path / "003.png").write_bytes(b"garbage")
    (tmp_path / "005.png").unlink()  # missing
    data = train_loader(CaptionPairs.from_csv(csv, T.ToTensor()), 8, PairCollate(tiny_tokenizer()))
    with pytest.warns(UserWarning, match="skipping image"):
        (batch,) = list(data)
    assert int(batch["skipped"]) == 2 and batch["images"].shape == (6, 3, 16, 16) and batch["tokens"].shape[0] == 6
    strict = train_loader(CaptionPairs.from_csv(csv, T.ToTensor(), strict=True), 8, PairCollate(tiny_tokenizer()))
    with pytest.raises(BadImageError, match=r"00[35]\.png"):
        list(strict)


def test_data_errors_name_the_argument(tmp_path):
    (tmp_path / "empty.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match="csv_path: .* has a header but no rows"):
        CaptionPairs.from_csv(tmp_path / "empty.csv", T.ToTensor())
    (tmp_path / "cols.csv").write_text("file,text\na.png,hi\n")
    with pytest.raises(ValueError, match="caption_column: column 'caption' not in cols.csv"):
        CaptionPairs.from_csv(tmp_path / "cols.csv", T.ToTensor(), image_column="file")
    csv = write_pairs(tmp_path, n=4)
    with pytest.raises(ValueError, match="--batch-size: the dataset has 4 examples, fewer than one global batch of 8"):
        train_loader(CaptionPairs.from_csv(csv, T.ToTensor()), 8, PairCollate(tiny_tokenizer()))
    with pytest.raises(FileNotFoundError, match="--data: .*nowhere.csv not found"):
        parse_data_spec(str(tmp_path / "nowhere.csv"))
    (tmp_path / "no_classes").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no class sub-folders"):
        LabelledImages(tmp_path / "no_classes", T.ToTensor())


def write_folder(root, per_class: int = 4):
    for c, name in enumerate(["red_circle", "blue_square"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(16, 16, 3) * 60).to(torch.uint8)
            pixels[..., c * 2] += 180
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.png")
    return root


def test_imagefolder_batches_carry_labels_and_skips(tmp_path):
    root = write_folder(tmp_path / "folder")
    (root / "blue_square" / "9.png").write_bytes(b"broken")
    data = LabelledImages(root, T.ToTensor())
    assert data.classnames == ["blue square", "red circle"] and parse_data_spec(str(root))[0] == "imagefolder"
    with pytest.warns(UserWarning, match="9.png"):
        images, labels, skipped = next(iter(train_loader(data, 9, LabelledCollate())))
    assert images.shape == (8, 3, 16, 16) and int(skipped) == 1 and sorted(labels.tolist()) == [0] * 4 + [1] * 4


@pytest.mark.filterwarnings("ignore:skipping image")  # 000.png, broken on purpose
def test_train_ternary_on_own_csv_exports_the_packed_model(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    csv = write_pairs(tmp_path / "data", n=16)
    (tmp_path / "data" / "000.png").write_bytes(b"broken")
    code = cli.main(["train", "ternary", "--model", "testbed", "--data", f"csv:{csv}", "--out", str(tmp_path / "run"),
                     "--steps", "2", "--batch-size", "8", "--workers", "0", "--no-progress", "--threads", "1"])
    assert code == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["skipped_images"] == 1 and results["world_size"] == 1 and results["recipe"] == "ternary-qall"
    from pyclipq.testbed import load_testbed

    loaded = pyclipq.load(tmp_path / "run" / "model.safetensors", load_testbed().model)
    formats = {m.layer.format for m in loaded.modules() if isinstance(m, QuantLinear)}
    assert formats == {"ternary"}
    capsys.readouterr()
    code = cli.main(["train", "ternary", "--model", "ViT-Nope", "--data", f"csv:{csv}", "--out", str(tmp_path / "x")])
    assert code == 2 and "not an open_clip architecture" in capsys.readouterr().err
    code = cli.main(["train", "p4q", "--model", "testbed", "--data", f"csv:{csv}", "--out", str(tmp_path / "x")])
    assert code == 2 and "P4Q trains on labelled images" in capsys.readouterr().err
