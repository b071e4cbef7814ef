"""`resvae export`: the hub folder (config.json + model.safetensors) loads back bit-exact with no
pickle involved, through load_pretrained, load_run and the RUN_DIR commands; the ONNX decoder
gives PyTorch's decoder output under onnxruntime, at any batch size."""

import json
import pickle
import sys

import pytest
import torch
from conftest import clear_resvae_env, train_small

import resvae
import resvae.checkpoints as CK
import resvae.generate as G
from resvae.cli import main
from resvae.config import resolve, to_dict


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny trained run (2 epochs; best = the better one) shared by the tests here."""
    out = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        clear_resvae_env(mp, out / "cache")
        cfg = resolve(preset="tiny", environ={}, overrides={
            "subset": 64, "batch_size": 16, "device": "cpu", "max_epochs": 2, "sample_every": 0})
        train_small(cfg, out / "run")
    return out / "run", cfg


def _no_pickle(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("unpickling while loading an exported folder")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_hub_export_round_trip_is_bit_exact(run, tmp_path, monkeypatch, capsys):
    run_dir, cfg = run
    out = tmp_path / "hub"
    assert main(["export", str(run_dir), "--format", "hub", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta == {"format": "resvae", "resvae_version": resvae.__version__,
                    "image_shape": [3, 32, 32], "config": to_dict(cfg)}

    original, _ = CK.load_run(run_dir)  # checkpoints/best.pt (torch.load, weights only)
    _no_pickle(monkeypatch)
    vae = resvae.load_pretrained(out)
    vae2, cfg2 = resvae.load_run(out)
    assert cfg2 == cfg and not vae.training and not vae2.training
    want = original.state_dict()
    for got in (vae.state_dict(), vae2.state_dict()):
        assert list(got) == list(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    a = G.samples(original, 20, seed=7)
    assert torch.equal(G.samples(vae, 20, seed=7), a)
    assert not torch.equal(G.samples(vae, 20, seed=8), a)  # (the seed matters)

    # every RUN_DIR command takes the folder: the same grid from the run and from the export
    assert main(["sample", str(out), "-n", "20", "--seed", "3", "-o", str(tmp_path / "x.png")]) == 0
    monkeypatch.undo()
    assert main(["sample", str(run_dir), "-n", "20", "--seed", "3",
                 "-o", str(tmp_path / "y.png")]) == 0
    assert (tmp_path / "x.png").read_bytes() == (tmp_path / "y.png").read_bytes()


def test_hub_export_errors(run, tmp_path, capsys):
    run_dir, _ = run
    with pytest.raises(FileNotFoundError, match="not an exported folder"):
        resvae.load_pretrained(run_dir)
    assert main(["export", str(run_dir), "-o", str(run_dir)]) == 2  # onto a run: refused
    assert "holds a run" in capsys.readouterr().err
    out = tmp_path / "hub"
    assert main(["export", str(run_dir), "-o", str(out), "--which", "last"]) == 0
    last = CK.load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    exported = resvae.load_pretrained(out).state_dict()
    assert exported.keys() == last.keys()
    assert all(torch.equal(exported[k], v) for k, v in last.items())
    with pytest.raises(ValueError, match="one set of weights"):
        CK.load_run(out, which="last")


def test_onnx_decoder_matches_pytorch(run, tmp_path, capsys):
    pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnxscript (extra: onnx)")
    onnx = pytest.importorskip("onnx", reason="extra: onnx")
    ort = pytest.importorskip("onnxruntime", reason="extra: onnx")
    run_dir, _ = run
    path = tmp_path / "decoder.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "-o", str(path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["decoder.onnx"]  # one file, no side data
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["likelihood"] == "dlogistic" and json.loads(meta["image_shape"]) == [3, 32, 32]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: any batch size

    vae, _ = CK.load_run(run_dir)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    for b in (1, 5, 17):
        z = torch.randn(b, vae.latent_dim, generator=gen)
        (got,) = session.run(None, {"z": z.numpy()})
        with torch.no_grad():
            want = vae.decode(z)
        assert got.shape == tuple(want.shape) == (b, 18, 32, 32)  # 3 x 2 mixtures x 3 channels
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_onnx_without_onnxscript_names_the_extra(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    path = tmp_path / "decoder.onnx"
    assert main(["export", str(run[0]), "--format", "onnx", "-o", str(path)]) == 2
    assert "pip install 'resvae[onnx]'" in capsys.readouterr().err and not path.exists()


def test_export_never_replaces_without_overwrite(run, tmp_path, capsys):
    run_dir, _ = run
    out = tmp_path / "hub"
    assert main(["export", str(run_dir), "-o", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["export", str(run_dir), "-o", str(out), "--which", "last"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["export", str(run_dir), "-o", str(mine)]) == 2  # any non-empty folder
    # --overwrite replaces an export's own two files, nothing else of the folder's
    assert main(["export", str(run_dir), "-o", str(mine), "--overwrite"]) == 0
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "model.safetensors",
                                                      "notes.txt"]
    assert (mine / "notes.txt").read_text() == "mine"
    theirs = tmp_path / "theirs"  # someone else's config.json is not replaced, even so
    theirs.mkdir()
    (theirs / "config.json").write_text('{"model_type": "gpt2"}')
    capsys.readouterr()
    assert main(["export", str(run_dir), "-o", str(theirs), "--overwrite"]) == 2
    assert "not from a resvae export" in capsys.readouterr().err
    assert (theirs / "config.json").read_text() == '{"model_type": "gpt2"}'
    assert sorted(p.name for p in theirs.iterdir()) == ["config.json"]
    assert main(["export", str(run_dir), "-o", str(out), "--which", "last", "--overwrite"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before


def _tampered(run, tmp_path, name, config=None, image_shape=None, tensors=None):
    """A copy of the run's export, its config.json or weights changed as someone else might."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "clean"
    if not src.exists():
        assert main(["export", str(run), "-o", str(src)]) == 0
    out = tmp_path / name
    shutil.copytree(src, out)
    meta = json.loads((out / "config.json").read_text())
    for key, value in (config or {}).items():
        meta["config"]["model"][key] = value
    if image_shape is not None:
        meta["image_shape"] = image_shape
    (out / "config.json").write_text(json.dumps(meta))
    if tensors is not None:
        save_file(tensors(load_file(str(out / "model.safetensors"))),
                  str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("change, message", [
    ({"config": {"depth": 10**9}}, "depth (from "),  # the config's own bound
    ({"config": {"width": 1e6}}, "refused: width 1000000.0 is over"),
    ({"config": {"latent_dim": 10**9}}, "refused: latent_dim 1000000000 is over"),
    ({"image_shape": [3, 100000, 100000]}, "refused: image_shape"),
    ({"tensors": lambda t: {**t, "extra.weight": torch.zeros(3)}}, "refused: its tensors"),
    ({"tensors": lambda t: {k: v for k, v in list(t.items())[1:]}}, "1 missing"),
    ({"tensors": lambda t: {**t, next(iter(t)): torch.zeros(7)}}, "1 of another shape"),
    ({"tensors": lambda t: {k: v.float() * float("nan") if v.is_floating_point() else v
                            for k, v in t.items()}}, "non-finite weights"),
])
def test_untrusted_export_is_refused_before_anything_is_built(run, tmp_path, capsys, change,
                                                              message):
    import time

    folder = _tampered(run[0], tmp_path, "bad", **change)
    t0 = time.monotonic()
    assert main(["sample", str(folder), "-n", "4", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 10 and not (tmp_path / "x.png").exists()


def test_exported_files_get_the_umask_mode(run, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        out = tmp_path / "hub"
        assert main(["export", str(run[0]), "-o", str(out)]) == 0
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    finally:
        os.umask(umask)
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}  # safetensors gave 0600


def test_export_under_a_file_is_one_line(run, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert main(["export", str(run[0]), "-o", str(tmp_path / "afile" / "x")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no one can write in: a read-only tmpfs where mounting is allowed (root here and
    in CI); else a 0555 folder, which holds only for a user that is not root."""
    import os
    import subprocess

    d = tmp_path / "ro"
    d.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)],
                             capture_output=True).returncode == 0
    if not mounted:
        d.chmod(0o555)
        if os.access(d, os.W_OK):
            pytest.skip("cannot make a read-only folder here (not allowed to mount, and root "
                        "ignores permissions)")
    yield d
    if mounted:
        subprocess.run(["umount", str(d)], check=True)
    else:
        d.chmod(0o755)


def _output_commands(run_dir, sweep_dir):
    return {"sample": ["sample", str(run_dir), "-n", "4"],
            "reconstruct": ["reconstruct", str(run_dir), "-n", "10"],
            "interpolate": ["interpolate", str(run_dir), "--pairs", "1", "--steps", "3"],
            "report": ["report", str(sweep_dir)],
            "export": ["export", str(run_dir)]}


@pytest.mark.parametrize("command, where", [
    (c, w) for c in ("sample", "reconstruct", "interpolate", "report", "export")
    for w in ("a folder", "under a file", "read-only")
    if (c, w) != ("export", "a folder")])  # a folder is what export -o names (tested above)
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(
        run, tmp_path, capsys, request, command, where):
    # (each a traceback before, after the model had been loaded and the images made)
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "r").symlink_to(run[0])
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "adir").mkdir()
    out = {"a folder": tmp_path / "adir",
           "under a file": tmp_path / "afile" / "x.png",
           "read-only": (request.getfixturevalue("read_only_dir") / "x.png")}[where]
    before = sorted(p.name for p in sweep_dir.iterdir())
    assert main([*_output_commands(run[0], sweep_dir)[command], "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"-o {out}" in err[0], err
    assert {"a folder": "a folder", "under a file": "is a file, not a folder",
            "read-only": "cannot write in"}[where] in err[0]
    assert (tmp_path / "afile").read_text() == "mine" and not any((tmp_path / "adir").iterdir())
    assert sorted(p.name for p in sweep_dir.iterdir()) == before  # no results.csv either


@pytest.mark.parametrize("change, message", [
    (lambda w: {**w, "extra.weight": torch.zeros(3)}, "refused: its tensors"),
    (lambda w: {k: v * float("nan") if v.is_floating_point() else v for k, v in w.items()},
     "non-finite weights"),
])
def test_a_run_checkpoint_passes_the_same_gate_as_an_export(run, tmp_path, capsys, change,
                                                            message):
    # a run directory's best.pt (someone else's run) is checked as a .safetensors file is:
    # exactly the model's tensors, all finite (a traceback or a black grid before)
    import shutil

    run_dir = tmp_path / "theirs"
    shutil.copytree(run[0], run_dir)
    ckpt_path = run_dir / "checkpoints" / "best.pt"
    state = torch.load(ckpt_path, weights_only=True)
    key = "ema" if "ema" in state else "model"
    state[key] = change(state[key])
    torch.save(state, ckpt_path)
    (run_dir / "checkpoints" / "best.safetensors").unlink(missing_ok=True)
    assert main(["sample", str(run_dir), "-n", "4", "-o", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ckpt_path) in err[0] and message in err[0], err
    assert not (tmp_path / "g.png").exists()
