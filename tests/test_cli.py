"""The pyclipq CLI and the model loader, end to end on small models (no downloads)."""
import json
import os

import pytest
import torch

from pyclipq import cli
from pyclipq.cli.loading import ModelLoadError, encode, load_model, random_inputs


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_json(capsys):
    code, out, _ = run(capsys, "info", "--json")
    info = json.loads(out)
    assert code == 0 and info["cpu_isa"] in info["cpu_isa_variants"]


@pytest.mark.parametrize("argv,needle", [
    (["convert", "ViT-Nope-99", "--format", "int8", "-o", "x.safetensors"], "not an open_clip architecture"),
    (["convert", "testbed", "--format", "int3", "-o", "x.safetensors"], "config must be a QuantConfig or one of"),
    (["convert", "openai:/no/such/file.pt", "--format", "int8", "-o", "x.safetensors"], "not found"),
    (["convert", "ViT-B-32", "--pretrained", "/no/such/ckpt.bin", "--format", "int8", "-o", "x"], "not found"),
    (["eval", "testbed", "--dataset", "imagenet:/data"], "--dataset must be one of"),
    (["eval", "testbed", "--quantized", "/no/such.safetensors"], "not found"),
    (["bench", "--model", "testbed", "--reps", "0"], "reps, rounds and threads must be >= 1"),
    (["bench", "--model", "testbed", "--rounds", "0"], "reps, rounds and threads must be >= 1"),
    (["bench", "--model", "testbed", "--batches", "0"], "batches must be one or more sizes >= 1"),
])
def test_user_mistakes_exit_2_with_one_line(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_convert_then_eval_the_checkpoint(capsys, tmp_path):
    out = tmp_path / "tb.safetensors"
    code, text, _ = run(capsys, "convert", "testbed", "--format", "int8", "-o", str(out), "--json")
    payload = json.loads(text)
    assert code == 0 and out.is_file() and payload["linears_quantized"] == payload["linears_total"] > 0
    code, text, _ = run(capsys, "eval", "testbed", "--quantized", str(out), "--limit", "256", "--json", "--no-progress")
    report = json.loads(text)
    assert code == 0 and report["zero_shot"]["n"] == 256
    # int8 keeps the test bed's predictions almost unchanged
    assert report["fidelity"]["zero_shot_top1_agreement"] > 0.9


def test_bench_json_and_plot(capsys, tmp_path):
    code, text, _ = run(capsys, "bench", "--model", "testbed", "--formats", "int8", "ternary", "--batches", "1", "2",
                        "--reps", "1", "--warmup", "0", "--peers", "none", "--out", str(tmp_path), "--json")
    report = json.loads(text)
    assert code == 0
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == ["fp32", "torch-bf16", "quantize_dynamic", "int8", "ternary"]
    fp32 = results["fp32"]
    for r in (results["int8"], results["ternary"]):
        assert r["linears_quantized"] == r["linears_total"]
        assert r["size_bytes"] < fp32["size_bytes"]
        assert set(r["latency_ms"]) == {"image@1", "image@2", "text@1", "text@2"}
    # ternary's smallest checkpoint (embeddings too) is sized beside it
    (smallest,) = report["size_only"]
    assert smallest["name"] == "ternary-qall-embeddings" and smallest["size_bytes"] < results["ternary"]["size_bytes"]
    assert smallest["size_ratio_vs_fp32"] == fp32["size_bytes"] / smallest["size_bytes"]
    assert results["int8"]["fidelity"]["image_cos_mean"] > 0.99
    # the fp32 model in bf16, fed bf16 images: half the bytes, nearly the same embeddings
    bf16 = results["torch-bf16"]
    assert 1.8 < bf16["size_ratio_vs_fp32"] < 2.2 and bf16["linears_quantized"] == 0
    assert bf16["fidelity"]["image_cos_mean"] > 0.99 and bf16["fidelity"]["text_cos_mean"] > 0.99
    assert os.path.getsize(tmp_path / "bench.png") > 0 and (tmp_path / "bench.json").is_file()
    assert report["machine"]["threads"] == 2 and report["machine"]["cpu_isa"]


def test_bench_compile_times_each_format_compiled_too(capsys, tmp_path):
    """--compile adds '<format>+compile': the same converted model through torch.compile, same embeddings."""
    code, text, _ = run(capsys, *TINY_BENCH, "--peers", "none", "--compile", "--out", str(tmp_path), "--json")
    report = json.loads(text)
    results = {r["name"]: r for r in report["results"]}
    assert code == 0 and list(results) == ["fp32", "torch-bf16", "quantize_dynamic", "int8", "int8+compile"]
    eager, compiled = results["int8"], results["int8+compile"]
    assert compiled["latency_ms"].keys() == eager["latency_ms"].keys() and min(compiled["latency_ms"].values()) > 0
    assert compiled["size_bytes"] == eager["size_bytes"] and compiled["linears_quantized"] == eager["linears_quantized"]
    # compiled fusions reorder float math: the embeddings stay those of the eager model
    for tower in ("image", "text"):
        assert abs(compiled["fidelity"][f"{tower}_cos_mean"] - eager["fidelity"][f"{tower}_cos_mean"]) < 1e-3


def fake_missing_packages(monkeypatch, absent):
    """Make the benchmark see the packages in `absent` as not installed and every other as installed."""
    from pyclipq.cli import bench as benchmark

    monkeypatch.setattr(benchmark, "missing_packages", lambda packages: [p for p in packages if p in absent])


TINY_BENCH = ("bench", "--model", "testbed", "--formats", "int8", "--batches", "1", "--reps", "1", "--warmup", "0")


def test_bench_without_matplotlib_writes_json_and_says_how_to_plot(capsys, tmp_path, monkeypatch):
    from pyclipq.cli import bench as benchmark

    fake_missing_packages(monkeypatch, {"matplotlib"})
    monkeypatch.setattr(benchmark, "save_plot", lambda *a: pytest.fail("plotted without matplotlib"))
    code, text, err = run(capsys, *TINY_BENCH, "--peers", "none", "--out", str(tmp_path), "--json")
    report = json.loads(text)
    assert code == 0 and report["files"] == {"json": str(tmp_path / "bench.json")}
    assert json.loads((tmp_path / "bench.json").read_text())["results"][0]["name"] == "fp32"
    assert not (tmp_path / "bench.png").exists()
    assert err.count("\n") == 1 and "pip install 'pyclipq[plot]'" in err


def test_bench_skips_absent_runtime_peers_with_one_line(capsys, tmp_path, monkeypatch):
    from pyclipq.cli.bench import select_runtime_peers

    fake_missing_packages(monkeypatch, {"onnxruntime"})
    chosen, notice = select_runtime_peers(["auto"])
    assert chosen == ("openvino_fp32", "openvino_int8", "openvino")
    assert notice == ("skipping the runtime peers ort_fp32, ort_int8 (onnxruntime not installed); "
                      "pip install 'pyclipq[peers]' to time them")
    assert select_runtime_peers(["none"]) == ((), None)

    fake_missing_packages(monkeypatch, {"onnxruntime", "openvino"})
    code, text, err = run(capsys, *TINY_BENCH, "--out", str(tmp_path), "--json")
    assert code == 0 and [r["name"] for r in json.loads(text)["results"]] == [
        "fp32", "torch-bf16", "quantize_dynamic", "int8"]
    assert err.count("\n") == 1 and "skipping the runtime peers ort_fp32, ort_int8, openvino_fp32" in err
    # a peer asked for by name is an error before any work
    code, _, err = run(capsys, *TINY_BENCH, "--peers", "ort_int8", "--out", str(tmp_path))
    assert code == 2 and err.count("\n") == 1
    assert "peers: ort_int8 need onnxruntime, not installed; pip install 'pyclipq[peers]'" in err


def test_bench_times_onnxruntime_in_its_own_process(capsys, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the peers extra is not installed: pip install 'pyclipq[peers]'")
    pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (the peers extra)")
    # onnx refuses to write external data whose name exists in the working directory
    monkeypatch.chdir(tmp_path)
    (tmp_path / "image.onnx.data").write_bytes(b"a user's own export")
    code, text, err = run(capsys, *TINY_BENCH, "--peers", "ort_fp32", "ort_int8", "--out", str(tmp_path), "--json")
    report = json.loads(text)
    assert code == 0 and err == ""
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == ["fp32", "torch-bf16", "quantize_dynamic", "int8", "ort_fp32", "ort_int8"]
    ort_fp32, ort_int8 = results["ort_fp32"], results["ort_int8"]
    # the same fp32 graph in another runtime: equal up to float reassociation
    assert ort_fp32["fidelity"]["image_cos_min"] > 0.99999 and ort_fp32["fidelity"]["text_cos_min"] > 0.99999
    # dynamic int8 (weights and activations) keeps the test bed's features close
    assert ort_int8["fidelity"]["image_cos_min"] > 0.99 and ort_int8["fidelity"]["text_cos_min"] > 0.99
    for r in (ort_fp32, ort_int8):
        assert set(r["latency_ms"]) == {"image@1", "text@1"} and min(r["latency_ms"].values()) > 0
        assert r["linears_total"] is None and r["speedup_vs_fp32"]["image@1"] > 0
    # int8 weights take about a quarter of fp32's bytes (embeddings and norms stay float)
    assert ort_int8["size_bytes"] < 0.5 * ort_fp32["size_bytes"]
    assert "onnxruntime" in report["machine"]["runtime_versions"] and "own process" in report["method"]
    assert report["runtime_peers_failed"] == []


def test_bench_times_openvino_in_its_own_process(capsys, tmp_path):
    from pyclipq.cli import bench as benchmark

    pytest.importorskip("openvino", reason="the peers extra is not installed: pip install 'pyclipq[peers]'")
    pytest.importorskip("nncf", reason="openvino_int8 needs nncf (the peers extra)")
    pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (the peers extra)")
    code, text, err = run(capsys, *TINY_BENCH, "--peers", "openvino_fp32", "openvino_int8", "openvino",
                          "--out", str(tmp_path), "--json")
    report = json.loads(text)
    assert code == 0 and err == "" and report["runtime_peers_failed"] == []
    results = {r["name"]: r for r in report["results"]}
    fp32, int8, default = results["openvino_fp32"], results["openvino_int8"], results["openvino"]
    assert fp32["fidelity"]["image_cos_min"] > 0.99999 and fp32["fidelity"]["text_cos_min"] > 0.99999
    # static int8 calibrated on 16 random inputs: close, though less than dynamic int8
    assert int8["fidelity"]["image_cos_min"] > 0.98 and int8["fidelity"]["text_cos_min"] > 0.98
    assert set(int8["latency_ms"]) == {"image@1", "text@1"} and int8["size_bytes"] < 0.5 * fp32["size_bytes"]
    assert "openvino" in report["machine"]["runtime_versions"]
    # OpenVINO's own choice of precision (bf16 where the CPU has it) is reported, a forced one is not
    assert default["precision"] in ("bf16", "f16", "f32") and fp32["precision"] is None
    assert default["fidelity"]["image_cos_min"] > 0.99 and default["size_bytes"] == fp32["size_bytes"]
    assert f"openvino ({default['precision']})" in benchmark.format_table(report)


def test_bench_isa_names_the_tables_this_cpu_runs(capsys, monkeypatch):
    import pyclipq

    runnable = pyclipq.build_info()["cpu_isa_supported"]
    code, _, err = run(capsys, *TINY_BENCH, "--peers", "none", "--isa", "scalar,sse9")
    assert code == 2 and err.count("\n") == 1
    assert f"--isa: unknown CPU kernel table 'sse9'; choose from {runnable}" in err
    # a table this build has but this CPU lacks says so
    info = pyclipq.build_info()
    from pyclipq.cli.peers import forced_isa

    monkeypatch.setattr(forced_isa, "build_info", lambda: {**info, "cpu_isa_variants": [*runnable, "avx1024"]})
    code, _, err = run(capsys, *TINY_BENCH, "--peers", "none", "--isa", "avx1024")
    assert code == 2 and f"--isa: this CPU cannot run the 'avx1024' table; choose from {runnable}" in err


def test_bench_isa_times_the_formats_on_a_forced_table_in_its_own_process(capsys, tmp_path):
    """--isa scalar: the formats again in a child process with PYCLIPQ_CPU_ISA=scalar, rows 'int8 [scalar]'."""
    from pyclipq.cli import bench as benchmark

    code, text, err = run(capsys, *TINY_BENCH, "--peers", "none", "--isa", "scalar", "--out", str(tmp_path), "--json")
    report = json.loads(text)
    # a child that ran another table than the forced one would be listed as failed
    assert code == 0 and err == "" and report["runtime_peers_failed"] == []
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == ["fp32", "torch-bf16", "quantize_dynamic", "int8", "int8 [scalar]"]
    forced, default = results["int8 [scalar]"], results["int8"]
    assert forced["latency_ms"].keys() == default["latency_ms"].keys() and min(forced["latency_ms"].values()) > 0
    assert forced["size_bytes"] == default["size_bytes"] and forced["linears_quantized"] == default["linears_quantized"]
    # the same model and inputs (the child gets the parent's): every table computes the same int8 embeddings
    for key in ("image_cos_mean", "text_cos_mean"):
        assert forced["fidelity"][key] == pytest.approx(default["fidelity"][key], abs=1e-4)
    assert "int8 [scalar]" in benchmark.format_table(report) and "--isa" in report["method"]


def test_runtime_peer_failure_names_the_peer_and_the_error(tmp_path, monkeypatch):
    from pyclipq.cli.peers import runtimes

    failing = tmp_path / "worker.py"
    failing.write_text("import sys\nprint('noise on stdout')\nsys.exit('RuntimeError: no such op')\n")
    monkeypatch.setattr(runtimes, "WORKER", str(failing))
    workspace = runtimes.RuntimePeerWorkspace(torch.nn.Identity(), {}, threads=1, reps=1, warmup=0)
    with pytest.raises(runtimes.RuntimePeerError, match=r"^ort_int8 build failed: RuntimeError: no such op$"):
        workspace._worker("ort_int8", "build", str(tmp_path / "spec.json"))


def test_open_clip_local_checkpoint_loads(tmp_path):
    import open_clip

    model = open_clip.create_model("RN50", pretrained=None)  # smallest config; any arch takes a path
    torch.nn.init.normal_(model.text_projection, std=0.5)
    path = tmp_path / "rn50.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model("RN50", pretrained=str(path))
    assert torch.equal(loaded.model.text_projection, model.text_projection)


def test_hf_local_directory_loads(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 99},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    images, tokens = random_inputs(loaded, 2)
    with torch.no_grad():
        want = model.get_image_features(pixel_values=images)
        want = getattr(want, "pooler_output", want)  # transformers 5 returns a model output
        assert torch.allclose(encode(loaded, images=images), want, atol=1e-6)


def test_openai_local_state_dict_loads(tmp_path):
    clip_model = pytest.importorskip("clip.model")
    # build_model infers heads as width // 64: widths of 128 give 2 heads
    model = clip_model.CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=128, vision_patch_size=16,
                            context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                            transformer_layers=1)
    path = tmp_path / "openai.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(f"openai:{path}")
    # clip.model.build_model stores fp16 weights (as OpenAI ships them); we widen back to fp32
    assert torch.equal(loaded.model.visual.proj, model.visual.proj.half().float())
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("openai:/nope.pt")


def test_train_runs_a_recipe_and_writes_its_packed_model(capsys, tmp_path):
    code, text, _ = run(capsys, "train", "ternary", "--preset", "qffn", "--steps", "2", "--batch-size", "8",
                        "--train-scenes", "16", "--eval-scenes", "32", "--out", str(tmp_path), "--no-progress")
    results = json.loads((tmp_path / "results.json").read_text())
    assert code == 0 and results["recipe"] == "ternary-qffn" and results["train"]["steps"] == 2
    assert results["command"].startswith("pyclipq train ternary ")
    assert (tmp_path / "model.safetensors").is_file() and 0.0 <= results["after_top1"] <= 1.0


def test_train_help_and_unknown_recipe(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "p4q", "--help"])
    assert e.value.code == 0 and "usage: pyclipq train p4q" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "bitnet"])
    assert e.value.code == 2 and "invalid choice: 'bitnet'" in capsys.readouterr().err


def test_linear_inventory_counts_every_contender_on_the_same_maps():
    """ViT-B/32: 24 blocks x (q, k, v, out, fc1, fc2) + 2 projection Parameters = 146 maps;
    torch's quantize_dynamic converts only the 48 MLP Linears (not in_proj, not out_proj)."""
    import copy

    import open_clip

    import pyclipq
    from pyclipq.cli.bench import build_contender, linear_inventory

    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    assert linear_inventory(model) == (0, 146)
    assert linear_inventory(build_contender("quantize_dynamic", model)) == (48, 146)
    assert linear_inventory(pyclipq.convert(copy.deepcopy(model), "int8")) == (146, 146)
    assert linear_inventory(pyclipq.convert(copy.deepcopy(model), "ternary-qffn")) == (48, 146)
    # embeddings are lookups / a convolution, not linears, however they are stored
    assert linear_inventory(pyclipq.convert(copy.deepcopy(model), "ternary-qall-embeddings")) == (146, 146)


# ---------------------------------------------------------------- convert --calibrate


@pytest.fixture
def calibration_files(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = (torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square\n\na green triangle on the left\n")
    return folder, captions


def test_convert_calibrates_static_int8_on_the_users_images_and_captions(capsys, tmp_path, calibration_files):
    import pyclipq
    from pyclipq.nn import QuantLinear

    folder, captions = calibration_files
    out = tmp_path / "tb-static.safetensors"
    code, text, _ = run(capsys, "convert", "testbed", "--format", "int8", "--activation", "static", "--rotation", "64",
                        "--calibrate", str(folder), "--calibrate", str(captions), "--calibrate-batch-size", "3",
                        "--smooth", "0.5", "-o", str(out), "--json")
    payload = json.loads(text)
    assert code == 0 and "static activation scales fixed" in payload["calibration"]
    model = pyclipq.load(str(out), load_model("testbed").model)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and not m.layer.is_float]
    assert layers and all(m.layer.rotation == 64 and float(m.act_scale) > 0 for m in layers)
    assert any(m.layer.smoothing != "none" for m in layers)


@pytest.mark.parametrize("extra,needle", [
    (["--gptq"], "need calibration inputs: --calibrate PATH"),
    (["--calibrate", "/no/such/dir"], "--calibrate: /no/such/dir does not exist"),
    (["--calibrate", "EMPTY"], "holds no images"),
    (["--calibrate", "BADFILE"], "must be a folder of images or a .txt file"),
    (["--calibrate", "BLANK"], "has no non-empty line"),
    (["--calibrate", "BROKEN"], "cannot read image"),
    (["--calibrate", "CAPTIONS", "--smooth", "strong"], "--smooth takes an alpha in [0, 1] or 'search'"),
])
def test_convert_calibration_set_errors(capsys, tmp_path, calibration_files, extra, needle):
    _, captions = calibration_files
    (tmp_path / "empty").mkdir()
    (tmp_path / "data.json").write_text("{}")
    (tmp_path / "blank.txt").write_text("\n\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.jpg").write_bytes(b"not a jpeg")
    names = {"EMPTY": tmp_path / "empty", "BADFILE": tmp_path / "data.json", "BLANK": tmp_path / "blank.txt",
             "BROKEN": tmp_path / "broken", "CAPTIONS": captions}
    extra = [str(names.get(a, a)) for a in extra]
    code, _, err = run(capsys, "convert", "testbed", "--format", "int8", "--activation", "static",
                       "-o", str(tmp_path / "x.safetensors"), *extra)
    assert code == 2 and needle in err and "Traceback" not in err
