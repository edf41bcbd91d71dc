"""Trust boundaries, one case per kind of hostile input: code a run folder names runs only when the user
opts in; edited policies, empty or NaN traces, out-of-range inputs, manifests pointing elsewhere and
foreign folders give one clear error (or the right result); every image mode decodes as Pillow does."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import invoke
from test_custom import _write_run

from dart_ee import ArtifactError, ConfigError, DataError, InputError, UntrustedCodeError
from dart_ee.runs.run import Run

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """A run written from Python (its builder: test_custom.py's Net), with a certified DART policy."""
    from dart_ee.calibration.calibrate import calibrate

    path = tmp_path_factory.mktemp("trusted") / "mine"
    _write_run(path)
    pol, rec = calibrate("dart", Run(path).trace("cal"), max_drop=5.0, confidence=0.9)
    pol.save(path / "policies" / "dart.json", calibration=rec)
    return path


def _one_error_line(out: str) -> bool:
    """A command's failure: one ``error:`` line (progress lines may precede it), no traceback."""
    return sum(line.startswith("error:") for line in out.splitlines()) == 1 and "Traceback" not in out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".lock"))
    return to


def _name_code(run: Path, field: str, ref: str | dict) -> None:
    """Edit model.pt as a hostile folder would: its arch names other code to import."""
    ck = torch.load(run / "model.pt", weights_only=True)
    ck["arch"][field] = ref
    torch.save(ck, run / "model.pt")


def _hostile_file(path: Path, marker: Path) -> Path:
    """A module whose import proves it ran (it writes ``marker``) and that defines the classes named."""
    path.write_text(f"import pathlib, sys\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                    f"sys.path.insert(0, {str(TESTS)!r})\nfrom test_custom import MyHead, Net as _Net\n\n\n"
                    "class Net(_Net):\n    pass\n\n\nclass Head(MyHead):\n    pass\n")
    return path


COMMANDS = {  # every command that loads a run's model
    "benchmark": ["--policy", "{run}/policies/dart.json", "--images", "16", "--repeats", "1", "--latency-images", "0",
                  "--batch-size", "16", "--out", "{tmp}/bench.json"],
    "export": ["--out", "{tmp}/onnx", "--policy", "{run}/policies/dart.json"],
    "adapt-tune": ["--policy", "{run}/policies/dart.json"],
    "adapt": ["--policy", "{run}/policies/dart.json", "--family", "impulse", "--level", "1", "--no-mechanisms",
              "--clean", "16", "--shifted", "16", "--batch-size", "16", "--out", "{tmp}/study.json"],
    "trace": [],
}


@pytest.mark.parametrize("field,where", [("builder", "absolute"), ("builder", "relative"), ("head", "absolute")])
def test_a_run_folder_naming_code_is_refused_by_every_command_until_the_user_trusts_it(custom_run, tmp_path, field,
                                                                                         where):
    run, marker = _copy(custom_run, tmp_path / "run"), tmp_path / "code_ran"
    hostile = _hostile_file((run if where == "relative" else tmp_path) / "hostile.py", marker)
    ref = f"{'hostile.py' if where == 'relative' else hostile}:{'Net' if field == 'builder' else 'Head'}"
    _name_code(run, field, ref)
    for cmd, args in COMMANDS.items():
        code, out = invoke(cmd, "--run", run, *(a.format(run=run, tmp=tmp_path) for a in args))
        assert code == 2 and "--trust-code" in out and "hostile.py" in out, (cmd, out)
        assert _one_error_line(out), out
        assert not marker.exists(), f"{cmd} ran the code the run folder names"
    with pytest.raises(UntrustedCodeError, match="names code to import"):
        Run(run).model()
    assert not marker.exists()


def test_with_trust_code_a_custom_run_is_benchmarked_and_a_relative_path_resolves_in_the_run(custom_run, tmp_path,
                                                                                               monkeypatch):
    run, marker = _copy(custom_run, tmp_path / "run"), tmp_path / "code_ran"
    _hostile_file(run / "mine.py", marker)
    _name_code(run, "builder", "mine.py:Net")  # relative: inside the run folder, never the current directory
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    _hostile_file(elsewhere / "mine.py", tmp_path / "cwd_code_ran")
    monkeypatch.chdir(elsewhere)
    code, out = invoke("benchmark", "--run", run, *(a.format(run=run, tmp=tmp_path) for a in COMMANDS["benchmark"]),
                       "--trust-code")
    assert code == 0, out
    assert marker.exists() and not (tmp_path / "cwd_code_ran").exists()
    assert {r["method"] for r in json.loads((tmp_path / "bench.json").read_text())["rows"]} == {"static", "dart"}


@pytest.mark.parametrize("kwargs,message", [({"width": 4}, "weights do not fit"), ({"depth": 3}, "no longer takes")])
def test_a_custom_run_whose_class_changed_gives_one_clear_error(custom_run, tmp_path, kwargs, message):
    run = _copy(custom_run, tmp_path / "run")
    _name_code(run, "builder_kwargs", kwargs)
    code, out = invoke("benchmark", "--run", run, *(a.format(run=run, tmp=tmp_path) for a in COMMANDS["benchmark"]),
                       "--trust-code")
    assert code == 2 and message in out and _one_error_line(out), out


def test_a_named_class_is_checked_before_its_module_runs(capsys, tmp_path):
    from dart_ee.models.coderef import import_builder

    with pytest.raises(ConfigError, match="defines no class 'Foo'"):
        import_builder("this:Foo", trusted=True)  # `import this` would print the Zen of Python
    assert "Beautiful is better" not in capsys.readouterr().out
    marker = tmp_path / "ran"
    script = tmp_path / "script.py"
    script.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n\ndef Net():\n    pass\n")
    with pytest.raises(ConfigError, match="defines no class 'Net'"):
        import_builder(f"{script}:Net", trusted=True)  # a function of that name is not a class
    assert not marker.exists()


def test_a_script_without_a_main_guard_runs_once_when_it_saves_its_run(tmp_path):
    """fit_exits checks that the run rebuilds: the class comes from the running script, which is not run again."""
    count = tmp_path / "count"
    script = tmp_path / "train_mine.py"
    script.write_text(f"""
import pathlib
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from dart_ee import attach_exits
from dart_ee.training.train import fit_exits

count = pathlib.Path({str(count)!r})
count.write_text((count.read_text() if count.exists() else "") + "x")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).mean((2, 3)))


x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 2, (32,))
model = attach_exits(Net(), after=["a"], example_input=x[:1])
fit_exits(model, DataLoader(TensorDataset(x, y), batch_size=16), epochs=1, bf16=False, run_dir={str(tmp_path / "run")!r})
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert count.read_text() == "x"
    assert (tmp_path / "run" / "model.pt").is_file()


# -- policies -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("section,field,value", [
    ("params", "beta_opt", "x"), ("params", "beta_opt", None), ("params", "beta_opt", [1, 2]),
    ("params", "beta_opt", float("nan")), ("params", "beta_opt", -5), ("params", "conf_bins", 2.5),
    ("params", "refine", "yes"), ("fitted", "tau_", float("nan")), ("fitted", "coef_exit_", None),
    ("fitted", "alpha_edges_", None), ("fitted", "conf_edges_", float("inf")), ("fitted", "alpha_source_", "x")])
def test_a_policy_file_with_a_wrong_field_is_refused_with_the_field_named(custom_run, tmp_path, section, field, value):
    d = json.loads((custom_run / "policies" / "dart.json").read_text())
    v = d[section][field]
    d[section][field] = ([[value] * len(v[0])] * len(v) if isinstance(v[0], list) else [value] * len(v)) \
        if isinstance(v, list) else value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    code, out = invoke("evaluate", "--trace", custom_run / "trace_test.npz", "--policy", bad)
    assert code == 2 and field.rstrip("_") in out and _one_error_line(out), out


def test_an_edited_policy_is_never_reported_as_certified(custom_run, tmp_path):
    d = json.loads((custom_run / "policies" / "dart.json").read_text())
    d["params"]["beta_opt"] = 0.0
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(d))
    code, out = invoke("evaluate", "--trace", custom_run / "trace_test.npz", "--policy", edited)
    assert code == 0 and "NOT certified: edited after certification" in out, out
    code, out = invoke("evaluate", "--trace", custom_run / "trace_test.npz", "--policy", custom_run / "policies" / "dart.json")
    assert code == 0 and "NOT certified" not in out and "certified:" in out, out


# -- traces -------------------------------------------------------------------------------------------------------


def _edited_trace(src: Path, to: Path, **change) -> Path:
    from dart_ee import trace as trace_mod

    t = trace_mod.load(src)
    arrays = {"probs": t.probs, "labels": t.labels, "index": t.index, "exit_macs": t.exit_macs, "alpha": t.alpha}
    arrays.update(change)
    n = len(arrays["probs"])
    extra = {k: v[:n] for k, v in t.extra.items()}
    out = trace_mod.Trace(arrays["probs"], arrays["labels"][:n], arrays["index"][:n], arrays["exit_macs"],
                          None if arrays["alpha"] is None else arrays["alpha"][:n], t.meta, extra)
    return trace_mod.save(out, to)


@pytest.mark.parametrize("case,message", [("empty", "holds no sample"), ("nan_alpha", "NaN or infinite difficulty"),
                                          ("logits", "sum to 1"), ("one_exit", "exits are missing")])
def test_a_trace_that_cannot_be_right_is_refused_on_load(custom_run, tmp_path, case, message):
    from dart_ee import trace as trace_mod

    src = custom_run / "trace_cal.npz"
    t = trace_mod.load(src)
    change = {"empty": {"probs": t.probs[:0]},
              "nan_alpha": {"alpha": np.full(t.n, np.nan, np.float32)},
              "logits": {"probs": t.probs * 0.5},
              "one_exit": {"probs": t.probs[:, :1], "exit_macs": t.exit_macs[:1]}}[case]
    path = _edited_trace(src, tmp_path / "trace_cal.npz", **change)
    with pytest.raises(ArtifactError, match=message):
        trace_mod.load(path)
    for cmd in (["sweep", "--cal", path, "--test", custom_run / "trace_test.npz", "--out", tmp_path / "sweep"],
                ["calibrate", "--trace", path, "--policy", "threshold", "--out", tmp_path / "t.json"]):
        code, out = invoke(*cmd)
        assert code == 2 and message in out and _one_error_line(out), out
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "sweep").exists()


# -- runners ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(custom_run, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from dart_ee.deploy.export import export_run

    out = tmp_path_factory.mktemp("exp") / "onnx"
    with_trust = Run(custom_run, trust_code=True)
    from dart_ee import trust_code

    with trust_code():
        export_run(with_trust.path, out, policies=[custom_run / "policies" / "dart.json"])
    return out


BAD_INPUTS = {"0..255 floats": lambda x: x.astype(np.float32), "[-1, 1]": lambda x: x.astype(np.float32) / 127.5 - 1,
              "huge": lambda x: np.full(x.shape, 3e38, np.float32), "NaN": lambda x: np.full(x.shape, np.nan, np.float32),
              "float64": lambda x: x.astype(np.float64) / 255}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_the_onnxruntime_runner_refuses_what_the_torch_runner_refuses(custom_run, export, case):
    from dart_ee.deploy.onnx_runner import OnnxRunner
    from dart_ee.policies import load_policy
    from dart_ee.runtime.eager import EarlyExitRunner

    run = Run(custom_run, trust_code=True)
    x = BAD_INPUTS[case](run.images("test").x[:8])
    with pytest.raises(InputError):
        OnnxRunner(export, "dart")(x)
    with pytest.raises(InputError):
        EarlyExitRunner(run.model(), load_policy(custom_run / "policies" / "dart.json"), run.estimators())(
            torch.from_numpy(x))
    with pytest.raises(InputError, match="batch_size"):
        OnnxRunner(export, "dart").run(run.images("test").x[:8], batch_size=0)


@pytest.mark.parametrize("tamper", ["outside_path", "absolute_path", "unlisted_graph", "missing_key", "broken_graph"])
def test_a_tampered_export_gives_one_clear_error(export, tmp_path, tamper):
    from dart_ee.core.artifacts import file_fingerprint
    from dart_ee.deploy.onnx_runner import OnnxRunner

    out = _copy(export, tmp_path / "onnx")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(out / "policies" / "dart" / "exit_0.onnx", tmp_path / "elsewhere" / "exit_0.onnx")
    m = json.loads((out / "manifest.json").read_text())
    if tamper == "outside_path":
        m["files"]["../elsewhere/exit_0.onnx"] = file_fingerprint(tmp_path / "elsewhere" / "exit_0.onnx")
        m["policies"]["dart"]["exits"][0] = "../elsewhere/exit_0.onnx"
    elif tamper == "absolute_path":
        m["policies"]["dart"]["exits"][0] = str(tmp_path / "elsewhere" / "exit_0.onnx")
    elif tamper == "unlisted_graph":
        shutil.copy(tmp_path / "elsewhere" / "exit_0.onnx", out / "extra.onnx")
        m["policies"]["dart"]["exits"][0] = "extra.onnx"
    elif tamper == "missing_key":
        del m["num_exits"]
    else:  # a graph whose checksum was updated to match garbage
        (out / "stage_0.onnx").write_bytes(b"not a graph")
        m["files"]["stage_0.onnx"] = file_fingerprint(out / "stage_0.onnx")
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as e:
        OnnxRunner(out, "dart")
    assert "\n" not in str(e.value) and str(out) in str(e.value)


# -- folders a command was not asked to write ---------------------------------------------------------------------


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_export_refuses_folders_it_did_not_make_and_writes_nothing_into_the_run(custom_run, export, tmp_path):
    run = _copy(custom_run, tmp_path / "run")
    other = _copy(custom_run, tmp_path / "other_run")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    before, other_before = _snapshot(run), _snapshot(other)
    pol = run / "policies" / "dart.json"
    for out, message in ((other, "is a run folder"), (export, "export of another run"),
                         (tmp_path / "notes", "not empty and holds no export")):
        code, msg = invoke("export", "--run", run, "--out", out, "--policy", pol, "--trust-code")
        assert code == 2 and message in msg, msg
    assert _snapshot(other) == other_before and (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    for _ in range(2):  # a new folder, then the same run's export again
        code, msg = invoke("export", "--run", run, "--out", tmp_path / "mine", "--policy", pol, "--trust-code")
        assert code == 0, msg
    assert _snapshot(run) == before  # read only: no lock file, no write (a read-only run folder exports)


def test_benchmark_never_writes_a_folder_the_user_named_and_keeps_two_policies_of_one_name(custom_run, export,
                                                                                             tmp_path):
    pytest.importorskip("onnxruntime")
    before = _snapshot(export)
    pol = custom_run / "policies" / "dart.json"
    threshold = tmp_path / "b" / "dart.json"  # a threshold policy saved under DART's file name
    from dart_ee.calibration.calibrate import calibrate

    calibrate("threshold", Run(custom_run).trace("cal"), max_drop=5.0)[0].save(threshold)
    args = ["--images", "16", "--repeats", "1", "--latency-images", "0", "--batch-size", "16", "--trust-code"]
    code, out = invoke("benchmark", "--run", custom_run, "--policy", pol, "--policy", threshold, "--engine",
                       "onnxruntime", "--export", export, *args)
    assert code == 2 and "never writes into a folder you name" in out and "dart-ee export" in out, out
    assert _snapshot(export) == before
    second = tmp_path / "a" / "dart.json"
    second.parent.mkdir()
    shutil.copy(pol, second)
    code, out = invoke("benchmark", "--run", custom_run, "--policy", pol, "--policy", second, "--out",
                       tmp_path / "rows.json", *args)
    assert code == 0, out
    rows = [r["method"] for r in json.loads((tmp_path / "rows.json").read_text())["rows"]]
    assert rows == ["static", "dart", "dart_2"]
    from dart_ee.deploy.export import export_names

    assert export_names([pol, second, threshold]) == ["dart", "dart_2", "dart_3"]


# -- images -------------------------------------------------------------------------------------------------------


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey: (H, W); RGB: (H, W, 3)) written by hand, as cameras and scientific tools write them."""
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _encoded(im: Image.Image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_every_image_mode_decodes_to_the_datasets_channels_and_8_bit_range():
    from dart_ee.data.decode import decode_image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (12, 10), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (12, 10, 3), dtype=np.uint16)
    base = Image.fromarray(rgb)
    cases = {  # bytes, and what Pillow's own conversion (16 bits: the high byte) gives for RGB
        "16-bit grey": (_png16(grey16), np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, 2)),
        "16-bit RGB": (_png16(rgb16), (rgb16 >> 8).astype(np.uint8)),
        "palette": (_encoded(base.quantize(16), "PNG"), np.asarray(base.quantize(16).convert("RGB"))),
        "grey + alpha": (_encoded(base.convert("LA"), "PNG"), np.asarray(base.convert("LA").convert("RGB"))),
        "RGBA": (_encoded(base.convert("RGBA"), "PNG"), rgb),
        "CMYK JPEG": (_encoded(base.convert("CMYK"), "JPEG"), None),
    }
    for name, (data, want) in cases.items():
        got = decode_image(data, name, channels=3)
        assert got.shape == (3, 12, 10) and got.dtype == np.uint8, name
        if want is None:  # lossy: compared with Pillow's decode of the same bytes
            import io

            want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(got.transpose(1, 2, 0), want, err_msg=name)
        assert decode_image(data, name, channels=1).shape == (1, 12, 10)
    assert decode_image(_png16(grey16), "g").max() == (grey16 >> 8).max() > 200  # not all white: not clipped


def _tree_with(root: Path, files: dict[str, bytes]) -> Path:
    ok = _encoded(Image.fromarray(np.zeros((8, 8, 3), np.uint8)), "PNG")
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            (root / split / c / "fine.png").write_bytes(ok)
    for name, data in files.items():
        (root / "train" / "a" / name).write_bytes(data)
    return root


def test_16_bit_and_palette_pngs_decode_alike_in_memory_and_streamed(tmp_path):
    from dart_ee.data import datasets as data

    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    pal = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)).quantize(8)
    root = _tree_with(tmp_path / "tree", {"g16.png": _png16(grey16), "pal.png": _encoded(pal, "PNG")})
    mem, _ = data.load_dataset("imagefolder", root, size=8)
    streamed, _ = data.load_dataset("imagefolder", root, size=8, stream=True)
    np.testing.assert_array_equal(streamed.x[:], mem.x)
    assert mem.x.max() > 0 and (mem.x < 255).any()


def _png_header(w: int, h: int) -> bytes:
    def chunk(kind: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + kind + d + struct.pack(">I", zlib.crc32(kind + d) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("case,message", [("truncated", "unreadable image"), ("empty", "unreadable image"),
                                          ("bomb", "too large to decode"), ("dangling_symlink", "cannot read"),
                                          ("deleted", "tree changed")])
def test_every_streamed_error_reaches_the_user_as_one_line_from_a_worker(tmp_path, case, message):
    from dart_ee.data import datasets as data
    from dart_ee.data import streaming

    jpeg = _encoded(Image.fromarray(np.zeros((8, 8, 3), np.uint8)), "JPEG")
    files = {"truncated": {"bad.jpg": jpeg[: len(jpeg) // 2]}, "empty": {"bad.png": b""},
             "bomb": {"bad.png": _png_header(5000, 5000)}}.get(case, {"bad.png": jpeg})
    root = _tree_with(tmp_path / "tree", files)
    bad = root / "train" / "a" / "bad.png"
    train, _ = data.load_dataset("imagefolder", root, size=8, stream=True)
    if case == "dangling_symlink":
        bad.unlink()
        os.symlink(tmp_path / "outside" / "gone.png", bad)
    elif case == "deleted":
        bad.unlink()
    with pytest.raises(DataError) as e:
        list(streaming.batches(train.x, [np.arange(len(train.x))], workers=1))
    text = str(e.value)
    assert message in text and "bad." in text and "\n" not in text and "Traceback" not in text, text


def test_any_file_name_works(tmp_path):
    from dart_ee.data import datasets as data

    ok = _encoded(Image.fromarray(np.full((8, 8, 3), 9, np.uint8)), "PNG")
    root = _tree_with(tmp_path / "tree", {})
    odd = os.fsdecode(b"caf\xe9 \xff.png")  # not UTF-8: Latin-1 bytes, as old cameras and archives write them
    (root / "train" / "a" / odd).write_bytes(ok)
    mem, _ = data.load_dataset("imagefolder", root, size=8)
    streamed, _ = data.load_dataset("imagefolder", root, size=8, stream=True)
    assert len(mem.x) == len(streamed.x) == 3  # fine.png in a and b, and the odd name
    np.testing.assert_array_equal(streamed.x[:], mem.x)


# -- options and commands that used to raise raw exceptions -------------------------------------------------------


def test_bad_options_give_one_clear_line(custom_run, tmp_path):
    from dart_ee.adapt.study import study
    from dart_ee.bench.data_speed import make_tree

    for args, message in ((["benchmark", "--run", custom_run, "--policy", custom_run / "policies" / "dart.json",
                            "--threads", "-2"], "--threads"),
                          (["export", "--run", custom_run, "--out", tmp_path / "o", "--opset", "99"], "--opset"),
                          (["make-tree", "--out", tmp_path / "t", "--train-images", "5", "--classes", "10"],
                           "cannot fill 10 class folders")):
        code, out = invoke(*args)
        assert code == 2 and message in out, out
    assert not (tmp_path / "t").exists() and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="cannot fill"):
        make_tree(tmp_path / "t2", 5, 5, classes=10)
    with pytest.raises(ConfigError, match="development family"):
        study(custom_run, custom_run / "policies" / "dart.json", families=["noise"])
