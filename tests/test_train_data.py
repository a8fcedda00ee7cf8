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
from pyclipq.data import (BadImageError, CaptionPairs, LabelledCollate, LabelledImages, LengthGroupedSampler,
                          PairCollate, ResumableDistributedSampler, TextCollate, Texts, parse_data_spec, train_loader)
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


# ---------------------------------------------------------------- length-grouped batches


def _grouped_epoch(lengths, global_batch, *, replicas=1, seed=0, epoch=0, pool_batches=64):
    """Every rank's index order of one epoch, as lists."""
    orders = []
    for rank in range(replicas):
        sampler = LengthGroupedSampler(lengths, global_batch, num_replicas=replicas, rank=rank, seed=seed,
                                       pool_batches=pool_batches)
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert len(sampler) == len(orders[-1])
    return orders


def test_length_grouped_batches_are_sorted_runs_in_shuffled_order():
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randperm(200, generator=generator).tolist()  # distinct lengths: a unique sorted order
    # one pool holds the whole epoch: the batches are the length-sorted runs of 8, in shuffled order
    (order,) = _grouped_epoch(lengths, 8, pool_batches=64)
    assert sorted(order) == list(range(200))
    batches = [order[i:i + 8] for i in range(0, 200, 8)]
    by_length = sorted(range(200), key=lengths.__getitem__)
    runs = [by_length[i:i + 8] for i in range(0, 200, 8)]
    assert sorted(map(sorted, batches)) == sorted(map(sorted, runs))
    assert [min(lengths[i] for i in b) for b in batches] != sorted(min(lengths[i] for i in b) for b in batches)
    # pools of 5 batches: a partial sort, still far less padding than the plain sampler's random batches
    (pooled,) = _grouped_epoch(lengths + [0, 0, 0], 8, pool_batches=5)  # 203 examples: the last 3 dropped
    assert len(pooled) == 200 and len(set(pooled)) == 200

    def padded(indices):
        return sum(max((lengths + [0, 0, 0])[i] for i in indices[j:j + 8]) * 8 for j in range(0, len(indices), 8))

    plain = list(ResumableDistributedSampler(lengths, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True))
    assert padded(pooled) < 0.8 * padded(plain)


def test_length_grouped_order_is_seeded_by_epoch_and_split_over_ranks():
    lengths = [(7 * i) % 31 + 1 for i in range(96)]
    first, again = _grouped_epoch(lengths, 8)[0], _grouped_epoch(lengths, 8)[0]
    assert first == again
    assert _grouped_epoch(lengths, 8, epoch=1)[0] != first
    assert _grouped_epoch(lengths, 8, seed=5)[0] != first
    # two ranks read the halves of the one-rank global batches
    rank0, rank1 = _grouped_epoch(lengths, 8, replicas=2)
    whole = [first[i:i + 8] for i in range(0, 96, 8)]
    assert [rank0[i:i + 4] for i in range(0, 48, 4)] == [b[:4] for b in whole]
    assert [rank1[i:i + 4] for i in range(0, 48, 4)] == [b[4:] for b in whole]
    # resuming part-way reads the rest of the same epoch
    sampler = LengthGroupedSampler(lengths, 8, num_replicas=1, rank=0)
    sampler.start_at(24)
    assert list(sampler) == first[24:] and list(sampler) == first  # start_at holds for one epoch


def test_length_grouped_loader_and_errors():
    texts = Texts([f"text {'x' * (i % 13)}" for i in range(40)])
    tokens = lambda batch: torch.tensor([[len(t)] for t in batch])  # noqa: E731
    loader = train_loader(texts, 8, TextCollate(tokens), lengths=[len(t) for t in texts.texts])
    batches = [b["tokens"].flatten().tolist() for b in loader]
    assert len(batches) == 5 and sum(len(b) for b in batches) == 40
    assert sum(max(b) - min(b) for b in batches) <= 13  # the 5 batches cut one sorted pool
    with pytest.raises(ValueError, match="lengths: 3 lengths for a dataset of 40 examples"):
        train_loader(texts, 8, TextCollate(tokens), lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="global_batch must be a positive multiple of num_replicas"):
        LengthGroupedSampler([1] * 10, 3, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="pool_batches must be >= 1"):
        LengthGroupedSampler([1] * 10, 2, num_replicas=1, rank=0, pool_batches=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        LengthGroupedSampler([1] * 3, 4, num_replicas=1, rank=0)


def test_joined_texts_follow_a_fraction_of_the_texts_by_another(tmp_path):
    texts = Texts([f"text {i}." for i in range(100)])
    joined = texts.joined(0.4, seed=3)
    assert len(joined) == 100 and texts.texts == [f"text {i}." for i in range(100)]  # the source is unchanged
    changed = [i for i in range(100) if joined[i] != texts[i]]
    assert len(changed) == 40
    for i in changed:  # the text itself, then one of the set
        first, second = joined[i][:len(texts[i])], joined[i][len(texts[i]) + 1:]
        assert first == texts[i] and second in texts.texts
    assert joined.texts == texts.joined(0.4, seed=3).texts and joined.texts != texts.joined(0.4, seed=4).texts
    assert texts.joined(0.0).texts == texts.texts and all(t != s for t, s in zip(texts.joined(1.0).texts, texts.texts))
    for bad in (-0.1, 1.5, float("nan"), "half", True):
        with pytest.raises(ValueError, match=r"join_texts \(--join-texts\): expected a fraction in \[0, 1\]"):
            texts.joined(bad)
    # unlabelled_batches joins each text source before batching
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts.texts))
    tokens = lambda batch: torch.tensor([[len(t)] for t in batch])  # noqa: E731
    lengths = sorted(n for b in pyclipq.data.unlabelled_batches([str(source)], tokenizer=tokens, transform=None,
                                                                global_batch=10, join_texts=0.4, seed=3)
                     for n in b["tokens"].flatten().tolist())
    assert lengths == sorted(len(t) for t in joined.texts)
