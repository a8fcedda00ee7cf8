"""pyclipq embed: 2 ranks give the 1-rank rows, a killed run restarts with every row once, webdataset round trips."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torchvision.transforms as T
from PIL import Image

import pyclipq
from pyclipq import cli
from pyclipq import embed as embedding
from pyclipq.data import BadImageError
from pyclipq.distributed import shutdown_distributed
from train_helpers import CLASSNAMES, single_thread, tiny_clip, tiny_tokenizer

_threads = pytest.fixture(autouse=True)(single_thread)


def write_images(folder, n: int = 11, bad: bool = True):
    """n PNGs in two sub-folders (a sorted walk crosses folders) and one file that is not an image."""
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()).save(sub / f"{i:03d}.png")
    if bad:
        (folder / "a" / "broken.png").write_bytes(b"\x89PNG but truncated")
    return folder


def model():
    return pyclipq.convert(tiny_clip(0).eval(), "int8")


def run(units, out, **kwargs):
    return embedding.embed(model(), units, out, transform=T.ToTensor(), tokenizer=tiny_tokenizer(), batch_size=3,
                           workers=0, progress=False, describe={"model": "tiny", "format": "int8"}, **kwargs)


def _rank(rank: int, world: int, store: str, images, out):
    torch.set_num_threads(1)
    units = embedding.plan_units(str(images), "image", shard_size=4)
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        run(units, out)
    finally:
        shutdown_distributed()


@pytest.mark.filterwarnings("ignore:skipping image")  # the bad file, on purpose
def test_two_ranks_write_the_rows_of_one_rank(tmp_path):
    images = write_images(tmp_path / "images")
    units = embedding.plan_units(str(images), "image", shard_size=4)
    single = run(units, tmp_path / "one")
    assert single.total_rows == 11 and single.skipped_inputs == 1  # the bad file: counted and left out
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), images, tmp_path / "two"), nprocs=2, join=True)
    one, one_keys = embedding.read_embeddings(tmp_path / "one")
    two, two_keys = embedding.read_embeddings(tmp_path / "two")
    assert one_keys == two_keys == sorted(one_keys)  # the global order: sorted relative paths
    assert one.shape == (11, 32) and np.array_equal(one, two)
    assert (tmp_path / "one" / "index.csv").read_text() == (tmp_path / "two" / "index.csv").read_text()
    # each row is the model's embedding of that file
    reference = model().encode_image(torch.stack([T.ToTensor()(Image.open(images / k).convert("RGB")) for k in one_keys[:3]]))
    np.testing.assert_allclose(one[:3], torch.nn.functional.normalize(reference, dim=-1).detach().numpy(), atol=1e-6)
    meta = json.loads((tmp_path / "two" / "metadata.json").read_text())
    assert meta["rows"] == 11 and meta["shards"] == 3 and meta["skipped_inputs"] == 1
    assert meta["pyclipq_version"] == pyclipq.__version__ and meta["format"] == "int8" and meta["dim"] == 32


class Killed(Exception):
    pass


def test_a_killed_run_restarts_and_writes_every_row_once(tmp_path):
    images = write_images(tmp_path / "images", n=10, bad=False)
    units = embedding.plan_units(str(images), "image", shard_size=3)

    def kill_after_first(unit):
        raise Killed

    with pytest.raises(Killed):
        run(units, tmp_path / "out", on_shard=kill_after_first)
    (tmp_path / "out" / ".part-00001.npy.999.tmp").write_bytes(b"half a shard")  # a write cut off by the kill
    assert not (tmp_path / "out" / "index.csv").exists()
    report = run(units, tmp_path / "out")
    assert (report.shards_skipped, report.shards_written, report.rows) == (1, 3, 7)
    rows, keys = embedding.read_embeddings(tmp_path / "out")
    assert len(keys) == len(set(keys)) == 10 and rows.shape[0] == 10
    run(units, tmp_path / "whole")
    whole, whole_keys = embedding.read_embeddings(tmp_path / "whole")
    assert keys == whole_keys and np.array_equal(rows, whole)
    with pytest.raises(ValueError, match="holds embeddings of another run"):
        run(units, tmp_path / "out", dtype="float16")


def write_shards(folder, n_shards: int = 3, per_shard: int = 4):
    import webdataset as wds

    folder.mkdir()
    g = torch.Generator().manual_seed(2)
    written = {}
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"shard-{s:04d}.tar")) as sink:
            for i in range(per_shard):
                key = f"{s:02d}{i:03d}"
                pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
                caption = f"a photo of a {CLASSNAMES[(s + i) % len(CLASSNAMES)]}."
                sink.write({"__key__": key, "png": Image.fromarray(pixels), "txt": caption})
                written[f"shard-{s:04d}.tar/{key}"] = (pixels, caption)
            if s == 1:
                sink.write({"__key__": "broken", "jpg": b"not a jpeg", "txt": "a photo of a star."})
    return written


@pytest.mark.filterwarnings("ignore:skipping image")  # the broken sample, on purpose
def test_webdataset_round_trip_for_embedding_and_training(tmp_path):
    from pyclipq.data import webdataset_pairs

    written = write_shards(tmp_path / "shards")
    spec = f"wds:{tmp_path}/shards/shard-{{0000..0002}}.tar"
    units = embedding.plan_units(spec, "image", shard_size=100)
    assert [u.url.rsplit("/", 1)[-1] for u in units] == ["shard-0000.tar", "shard-0001.tar", "shard-0002.tar"]
    report = run(units, tmp_path / "images")
    rows, keys = embedding.read_embeddings(tmp_path / "images")
    assert sorted(keys) == sorted(written) and report.skipped_inputs == 1
    first = torch.from_numpy(written[keys[0]][0]).permute(2, 0, 1).float().div(255)  # PNG is lossless
    expected = torch.nn.functional.normalize(model().encode_image(first[None]), dim=-1)
    np.testing.assert_allclose(rows[0], expected[0].detach().numpy(), atol=1e-6)

    run(embedding.plan_units(spec, "text", shard_size=100), tmp_path / "texts")
    text_rows, text_keys = embedding.read_embeddings(tmp_path / "texts")
    assert len(text_keys) == 13  # the broken image's caption is a text like any other
    tokens = tiny_tokenizer()([written[text_keys[0]][1]])
    np.testing.assert_allclose(text_rows[0], torch.nn.functional.normalize(model().encode_text(tokens), dim=-1)[0].detach().numpy(),
                               atol=1e-6)

    # training: one epoch reads every pair once (2 workers, each its own shards), the bad one counted
    loader = webdataset_pairs(spec.removeprefix("wds:"), T.ToTensor(), tiny_tokenizer(), 2, workers=2, shuffle_buffer=4)
    torch.manual_seed(0)
    batches = list(loader)
    seen = torch.cat([b["images"] for b in batches])
    assert sum(int(b["skipped"]) for b in batches) == 1
    expected_images = {tuple(torch.from_numpy(p).permute(2, 0, 1).flatten().tolist()) for p, _ in written.values()}
    got = {tuple((img * 255).round().to(torch.uint8).flatten().tolist()) for img in seen}
    assert len(seen) == 12 and got == expected_images
    with pytest.raises(Exception, match="broken"):
        list(webdataset_pairs(spec.removeprefix("wds:"), T.ToTensor(), tiny_tokenizer(), 2, strict=True))


def test_input_errors_name_the_argument(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--input: .* holds no images"):
        embedding.plan_units(str(tmp_path / "empty"), "image", 10)
    with pytest.raises(FileNotFoundError, match="--input: .* not found"):
        embedding.plan_units(str(tmp_path / "nowhere"), "image", 10)
    (tmp_path / "t.csv").write_text("path,caption\nx.png,hi\n")
    with pytest.raises(ValueError, match="--image-column: column 'image' not in t.csv"):
        embedding.plan_units(str(tmp_path / "t.csv"), "image", 10)
    with pytest.raises(ValueError, match="--shard-size"):
        embedding.plan_units(str(tmp_path / "t.csv"), "text", 0)
    images = write_images(tmp_path / "images", n=2)
    with pytest.raises(BadImageError, match="broken.png"):
        run(embedding.plan_units(str(images), "image", 10), tmp_path / "out", strict=True)


def test_cli_embed_texts_from_a_csv(capsys, tmp_path):
    (tmp_path / "t.csv").write_text("image,caption\nx.png,a red circle\ny.png,a blue square\nz.png,a green star\n")
    code = cli.main(["embed", "testbed", "--format", "ternary", "--input", str(tmp_path / "t.csv"), "--modality", "text",
                     "--out", str(tmp_path / "out"), "--shard-size", "2", "--workers", "0", "--json",
                     "--output-format", "safetensors", "--dtype", "float16"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["rows"] == 3 and payload["shards_written"] == 2 and payload["texts_per_s"] > 0
    rows, keys = embedding.read_embeddings(tmp_path / "out")
    assert keys == ["0", "1", "2"] and rows.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(rows.astype(np.float32), axis=1), 1.0, atol=2e-3)
    code = cli.main(["embed", "testbed", "--input", str(tmp_path / "nowhere.csv"), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2 and "--input" in err and "not found" in err and err.count("\n") == 1
