"""Model packages: the architecture registry, model.json validation, verified and safe weight loading,
safe zip extraction, and the write -> load -> build round trip."""

from __future__ import annotations

import gc
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from http_fixture import tiny_card, tiny_network, write_tiny_package
from torch import nn

from SyntheticCTLib.models.architectures import ARCHITECTURES, UNet3D, build_network, register_architecture
from SyntheticCTLib.models.archive import safe_extract_zip, zip_folder
from SyntheticCTLib.models.errors import (
    ArchitectureError,
    ChecksumError,
    ModelPackageError,
    SchemaVersionError,
    UnknownArchitectureError,
    UnsafeArchiveError,
)
from SyntheticCTLib.models.package import SCHEMA_VERSION, load_model_package, write_model_package


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def edit_card(folder: Path, **changes) -> None:
    path = folder / "model.json"
    card = json.loads(path.read_text())
    card.update(changes)
    path.write_text(json.dumps(card))


# -- architectures --------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["instance", "batch", "group", "none"])
@pytest.mark.parametrize("depth,residual", [(1, True), (2, False), (3, True)])
def test_unet3d_keeps_shape_for_sizes_divisible_by_its_multiple(norm, depth, residual):
    net = build_network(
        "unet3d", in_channels=3, out_channels=1, depth=depth, width=4, norm=norm, residual=residual
    ).eval()
    multiple = 2 ** (depth - 1)
    assert net.size_multiple == multiple
    shape = (2, 3, 3 * multiple, 5 * multiple, 2 * multiple)  # anisotropic, not powers of two
    with torch.no_grad():
        y = net(torch.randn(shape))
    assert y.shape == (2, 1) + shape[2:]
    if depth > 1:
        with pytest.raises(ValueError, match=f"divisible by {multiple}"):
            net(torch.randn(1, 3, multiple + 1, multiple, multiple))


def test_unet3d_width_doubles_per_level():
    net = UNet3D(in_channels=2, depth=3, width=4)
    assert [e.conv1.out_channels for e in net.encoders] == [4, 8, 16]
    assert net.encoders[0].conv1.in_channels == 2


def test_registry_adds_an_architecture_with_one_decorator():
    try:

        @register_architecture("test-linear")
        class PointwiseNet(nn.Module):
            def __init__(self, in_channels: int, out_channels: int = 1) -> None:
                super().__init__()
                self.conv = nn.Conv3d(in_channels, out_channels, 1)

            def forward(self, x):
                return self.conv(x)

        net = build_network("test-linear", in_channels=2)
        assert isinstance(net, PointwiseNet) and ARCHITECTURES["test-linear"] is PointwiseNet
        assert net(torch.zeros(1, 2, 3, 3, 3)).shape == (1, 1, 3, 3, 3)
    finally:
        ARCHITECTURES.pop("test-linear", None)


def test_unknown_architecture_and_bad_arguments_are_clear():
    with pytest.raises(UnknownArchitectureError) as info:
        build_network("transformer9000", in_channels=1)
    assert "transformer9000" in str(info.value) and "unet3d" in str(info.value)
    with pytest.raises(ArchitectureError, match="'colour'"):
        build_network("unet3d", in_channels=1, colour="red")
    with pytest.raises(ArchitectureError, match="norm must be one of"):
        build_network("unet3d", in_channels=1, norm="layer")


# -- round trip -----------------------------------------------------------------------------------
@pytest.mark.parametrize("weights_format", ["safetensors", "torch"])
def test_round_trip_gives_identical_outputs(tmp_path, weights_format):
    folder, original = write_tiny_package(tmp_path / "pkg", seed=7, weights_format=weights_format)
    package = load_model_package(folder)
    network = package.build_network("cpu")
    assert not network.training
    x = torch.randn(1, 2, 16, 8, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(network(x), original(x))
    card = json.loads((folder / "model.json").read_text())
    weights = card["weights"][0]
    assert weights["format"] == weights_format
    assert weights["sha256"] == hashlib.sha256((folder / weights["file"]).read_bytes()).hexdigest()
    assert card["schema_version"] == SCHEMA_VERSION
    assert list(card)[0] == "schema_version"


def test_package_properties_and_monai_style_block(tmp_path):
    folder, _ = write_tiny_package(tmp_path / "pkg", echo_times=(2.2, 4.4, 6.6))
    package = load_model_package(folder)
    assert package.in_channels == 3
    assert package.input_names == ["echo 1 (TE 2.2 ms)", "echo 2 (TE 4.4 ms)", "echo 3 (TE 6.6 ms)"]
    assert package.spacing_mm == (2.0, 2.0, 2.0)
    assert package.patch_size == (16, 16, 16)
    assert package.overlap == 0.25
    assert len(package.normalization) == 3 and package.normalization[0]["method"] == "percentile"
    assert package.output["clip"] == [-1024, 3071]
    assert package.card["diagnostic_use"] == "Not for diagnostic use."
    nd = package.card["network_data_format"]
    image = nd["inputs"]["image"]
    assert image["num_channels"] == 3 and image["channel_def"]["2"] == "echo 3 (TE 6.6 ms)"
    pred = nd["outputs"]["pred"]
    assert pred["format"] == "hounsfield" and pred["num_channels"] == 1
    # The declared output range maps back to the clip range through scale and offset.
    assert [package.to_hu(v) for v in pred["value_range"]] == pytest.approx(package.output["clip"])
    assert package.to_hu(10.0) == 3071 and package.to_hu(-10.0) == -1024


def test_zip_package_loads_and_cleans_up(tmp_path):
    folder, original = write_tiny_package(tmp_path / "pkg")
    flat = zip_folder(folder, tmp_path / "flat.zip")
    nested = zip_folder(folder, tmp_path / "nested.zip", arc_root="tiny-spine")
    x = torch.randn(1, 2, 8, 8, 8)
    for archive in (flat, nested):
        package = load_model_package(archive, extract_dir=tmp_path / "extract")
        root = package.root
        assert root.is_dir() and package.source == archive
        with torch.no_grad():
            assert torch.equal(package.build_network()(x), original(x))
        del package
        gc.collect()
        assert not root.exists()
    assert list((tmp_path / "extract").iterdir()) == []


def test_write_refuses_mismatched_state_dict_and_existing_folder(tmp_path):
    card = tiny_card()
    other = tiny_network(tiny_card(width=8))
    with pytest.raises(ArchitectureError, match="do not match"):
        write_model_package(tmp_path / "bad", card, other.state_dict())
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder left either
    folder, _ = write_tiny_package(tmp_path / "pkg")
    with pytest.raises(ModelPackageError, match="already exists"):
        write_model_package(folder, card, tiny_network(card).state_dict())
    replaced = write_model_package(folder, card, tiny_network(card, seed=5).state_dict(), overwrite=True)
    assert load_model_package(replaced).build_network() is not None


# -- refusals -------------------------------------------------------------------------------------
def test_hash_mismatch_is_refused_naming_file_and_digests(tmp_path):
    folder, _ = write_tiny_package(tmp_path / "pkg")
    weights = folder / "model.safetensors"
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ChecksumError) as info:
        load_model_package(folder)
    message = str(info.value)
    assert str(weights) in message and expected in message and actual in message
    package = load_model_package(folder, verify=False)  # deferred check: still refused when the weights are read
    with pytest.raises(ChecksumError):
        package.build_network()


def test_unknown_architecture_in_package_lists_known_ones(tmp_path):
    folder, _ = write_tiny_package(tmp_path / "pkg")
    edit_card(folder, architecture={"name": "mystery-net", "kwargs": {}})
    with pytest.raises(UnknownArchitectureError) as info:
        load_model_package(folder)
    assert "mystery-net" in str(info.value) and "unet3d" in str(info.value)


def test_newer_schema_version_is_refused(tmp_path):
    folder, _ = write_tiny_package(tmp_path / "pkg")
    edit_card(folder, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(SchemaVersionError, match=f"schema_version {SCHEMA_VERSION + 1}.*Update SyntheticCT"):
        load_model_package(folder)


@pytest.mark.parametrize("field", ["output", "weights", "inputs", "architecture"])
def test_missing_fields_are_named(tmp_path, field):
    folder, _ = write_tiny_package(tmp_path / "pkg")
    card = json.loads((folder / "model.json").read_text())
    del card[field]
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelPackageError, match=f"lacks required field.*{field}"):
        load_model_package(folder)


def test_missing_model_json_and_inconsistent_cards(tmp_path):
    folder, _ = write_tiny_package(tmp_path / "pkg")
    (folder / "model.json").rename(folder / "card.json")
    with pytest.raises(ModelPackageError, match="no model.json"):
        load_model_package(folder)
    folder, _ = write_tiny_package(tmp_path / "pkg2")
    card = json.loads((folder / "model.json").read_text())
    for changes, pattern in (
        ({"normalization": card["normalization"][:1]}, "list of 2 objects"),
        ({"output": {"scale": 1, "offset": 0, "clip": [100, -100]}}, "low < high"),
        ({"spacing_mm": [1, 1]}, "3 numbers"),
        ({"weights": [{"file": "../outside.safetensors", "sha256": "0" * 64}]}, "relative path"),
        ({"weights": [{"file": "model.safetensors", "sha256": "abc"}]}, "64 hexadecimal"),
    ):
        edit_card(folder, **{**card, **changes})
        with pytest.raises(ModelPackageError, match=pattern):
            load_model_package(folder)


def test_weights_not_matching_the_architecture_are_refused(tmp_path):
    folder, _ = write_tiny_package(tmp_path / "pkg")
    card = json.loads((folder / "model.json").read_text())
    card["architecture"]["kwargs"]["width"] = 8
    edit_card(folder, architecture=card["architecture"])
    package = load_model_package(folder)  # the hashes are right; the shapes are not
    with pytest.raises(ArchitectureError, match="do not match the architecture"):
        package.build_network()


class _Exploit:
    """Pickles to a call of ``open(marker, "w")``: running it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    folder, _ = write_tiny_package(tmp_path / "pkg", weights_format="torch")
    weights = folder / "model.pt"
    torch.save({"conv.weight": torch.zeros(1), "payload": _Exploit(marker)}, weights)
    edit_card(
        folder,
        weights=[{"file": "model.pt", "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "format": "torch"}],
    )
    package = load_model_package(folder)  # the hash matches: only the content is hostile
    with pytest.raises(ModelPackageError, match="refused.*Pickled objects are never loaded"):
        package.build_network()
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    live = tmp_path / "live"
    torch.save(_Exploit(live), tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert live.exists()


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    folder, _ = write_tiny_package(tmp_path / "pkg")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    edit_card(
        folder,
        weights=[
            {
                "file": "model.safetensors",
                "format": "safetensors",
                "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            }
        ],
    )
    with pytest.raises(ModelPackageError, match="not a valid safetensors file"):
        load_model_package(folder).build_network()


# -- zip safety -----------------------------------------------------------------------------------
def _zip_with(path: Path, members) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "backslash", "fifo"])
def test_zip_slip_is_refused_and_nothing_is_written(tmp_path, kind):
    folder, _ = write_tiny_package(tmp_path / "pkg")
    good = [(zipfile.ZipInfo(name), (folder / name).read_bytes()) for name in ("model.json", "model.safetensors")]
    outside = tmp_path / "escaped.txt"
    if kind == "dotdot":
        evil = zipfile.ZipInfo("../../escaped.txt")
    elif kind == "absolute":
        evil = zipfile.ZipInfo(str(outside))
    elif kind == "backslash":
        evil = zipfile.ZipInfo("..\\..\\escaped.txt")
    elif kind == "fifo":
        evil = zipfile.ZipInfo("a-pipe")
        evil.external_attr = 0o010644 << 16
    else:
        evil = zipfile.ZipInfo("weights-link")
        evil.external_attr = 0o120777 << 16
    archive = _zip_with(tmp_path / "evil.zip", good + [(evil, str(outside) if kind == "symlink" else b"gotcha")])
    target_parent = tmp_path / "x" / "y"
    reason = {
        "dotdot": "escapes the target",
        "backslash": "escapes the target",
        "absolute": "absolute path",
        "symlink": "symbolic link",
        "fifo": "not a regular file",
    }[kind]
    with pytest.raises(UnsafeArchiveError, match=reason):
        safe_extract_zip(archive, target_parent / "out")
    assert not outside.exists()
    assert not target_parent.exists() or list(target_parent.iterdir()) == []
    extract = tmp_path / "extract"
    with pytest.raises(UnsafeArchiveError, match=reason):
        load_model_package(archive, extract_dir=extract)
    assert list(extract.iterdir()) == []
    assert not outside.exists()


def test_safe_extract_keeps_nested_files(tmp_path):
    regular = zipfile.ZipInfo("top.txt")
    regular.external_attr = 0o100644 << 16  # a regular file, as zip tools on Unix write it
    archive = _zip_with(tmp_path / "ok.zip", [(zipfile.ZipInfo("a/b/c.txt"), b"deep"), (regular, b"t")])
    out = safe_extract_zip(archive, tmp_path / "out")
    assert (out / "a" / "b" / "c.txt").read_bytes() == b"deep" and (out / "top.txt").read_bytes() == b"t"
    with pytest.raises(ModelPackageError, match="already exists"):
        safe_extract_zip(archive, out)
