"""trainer.imaging.dicom through the one decoder: recognition, the viewer's display pipeline, every
transfer syntax, every rejection, the identifiers kept and the patient data never read.

Every DICOM is built here with pydicom (compressed frames through ``synth_dicom.store_pixels``);
images are 64x64 and decoded at 64 px, so no resampling blurs the expected grey levels.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_dicom import (
    PATIENT_NAME,
    UIDS,
    blocks,
    make_ds,
    save,
    texture,
    to_bytes,
)
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from db.exceptions import BadImageError
from db.identifiers import DICOM_KEYWORDS, DicomIdentifiers
from trainer.imaging import dicom
from trainer.imaging.decode import Decoded, decode_bytes, decode_file, decode_many, sniff_bytes

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
LIMIT = 60_000_000


def grey(path_or_bytes, size: int = SIZE, max_pixels: int = LIMIT) -> np.ndarray:
    if isinstance(path_or_bytes, bytes):
        out = decode_bytes(path_or_bytes, size, max_pixels)
    else:
        out = decode_file(path_or_bytes, size, max_pixels).pixels
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 2]).all()
    return out[..., 0]


def block_values(out: np.ndarray) -> list[int]:
    return [int(out[0, 8 * i]) for i in range(8)]


def rejection(data: bytes, size: int = SIZE, max_pixels: int = LIMIT) -> BadImageError:
    with pytest.raises(BadImageError) as info:
        decode_bytes(data, size, max_pixels)
    return info.value


def reason_of(path: Path, max_pixels: int = LIMIT) -> BadImageError:
    with pytest.raises(BadImageError) as info:
        decode_file(path, SIZE, max_pixels)
    return info.value


RAMP12 = blocks([100, 200, 300, 400, 500, 600, 700, 800])


# --- recognition ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chest.dcm", "1.2.826.0.1.3680043.8.498.1.2.3", "chest.jpg"])
def test_recognised_by_content_whatever_the_name(tmp_path, name):
    path = save(make_ds(RAMP12, bits_stored=12), tmp_path / name)
    assert sniff_bytes(path.read_bytes()[:512]) == "DICOM"
    assert block_values(grey(path))[0] == 0 and block_values(grey(path))[-1] == 255


@pytest.mark.parametrize("implicit,with_meta", [(True, False), (False, False), (False, True)])
def test_raw_data_sets_without_the_preamble(implicit, with_meta):
    ds = make_ds(RAMP12, bits_stored=12)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    if with_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else (
            ExplicitVRLittleEndian)
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    write_dataset(fp, ds)
    data = fp.getvalue()
    assert data[128:132] != b"DICM"
    assert sniff_bytes(data[:512]) == "DICOM"
    np.testing.assert_array_equal(grey(data), grey(to_bytes(ds)))


def test_near_misses_are_not_taken_for_raw_dicom():
    assert sniff_bytes(b"\x08\x00\x05\x00" + b"\xff" * 40) is None  # absurd implicit length
    assert sniff_bytes(b"\x08\x00\x08\x00CS\x04\x00ABCD\x08\x00\x05\x00CS\x00\x00") is None
    assert not dicom.looks_like_dicom(b"\x08\x00\x05\x00CS")


# --- the display pipeline -----------------------------------------------------------------


def test_no_window_uses_the_full_range_of_the_values():
    out = block_values(grey(to_bytes(make_ds(RAMP12, bits_stored=12))))
    assert out == [round((v - 100) * 255 / 700) for v in range(100, 900, 100)]


def _linear(x, c, w):
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255


@pytest.mark.parametrize("function,expected", [
    (None, lambda x: _linear(x, 2048, 1024)),
    ("LINEAR", lambda x: _linear(x, 2048, 1024)),
    ("LINEAR_EXACT", lambda x: np.clip((x - 2048) / 1024 + 0.5, 0, 1) * 255),
    ("SIGMOID", lambda x: 255 / (1 + np.exp(-4 * (x - 2048) / 1024))),
])
def test_window_centre_and_width(function, expected):
    values = np.array([1000, 1535, 1536, 1800, 2048, 2300, 2560, 4000])
    ds = make_ds(blocks(values), bits_stored=12, WindowCenter=2048, WindowWidth=1024,
                 VOILUTFunction=function)
    out = block_values(grey(to_bytes(ds)))
    assert out == np.rint(expected(values.astype(float))).astype(int).tolist()
    if function in (None, "LINEAR"):
        assert out[:2] == [0, 0] and out[-2:] == [255, 255] and out[4] == 128


def test_the_first_of_several_windows_is_used():
    one = make_ds(RAMP12, bits_stored=12, WindowCenter=450, WindowWidth=400)
    several = make_ds(RAMP12, bits_stored=12, WindowCenter=[450, 2000], WindowWidth=[400, 50])
    assert block_values(grey(to_bytes(several))) == block_values(grey(to_bytes(one)))
    assert block_values(grey(to_bytes(one)))[0] == 0


def test_rescale_slope_and_intercept_come_before_the_window():
    # Stored 100..800 become -824..576 (x2 - 1024); the window is in those units.
    ds = make_ds(RAMP12, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                 WindowCenter=0, WindowWidth=1001)
    values = RAMP12[0, ::8].astype(float) * 2 - 1024
    assert block_values(grey(to_bytes(ds))) == np.rint(_linear(values, 0, 1001)).tolist()


def test_a_voi_lut_wins_over_the_window():
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.add_new(0x00283006, "US", [(4095 - i) * 16 for i in range(4096)])  # an inverting LUT
    ds = make_ds(RAMP12, bits_stored=12, WindowCenter=450, WindowWidth=400,
                 VOILUTSequence=[lut])
    expected = [round((4095 - v) * 255 / 4095) for v in range(100, 900, 100)]
    assert block_values(grey(to_bytes(ds))) == expected


def test_monochrome1_is_inverted():
    plain = block_values(grey(to_bytes(make_ds(RAMP12, bits_stored=12))))
    inverted = make_ds(RAMP12, bits_stored=12, PhotometricInterpretation="MONOCHROME1")
    assert block_values(grey(to_bytes(inverted))) == [255 - v for v in plain]
    windowed = make_ds(RAMP12, bits_stored=12, PhotometricInterpretation="MONOCHROME1",
                       WindowCenter=2048, WindowWidth=4096)
    assert block_values(grey(to_bytes(windowed)))[0] > block_values(grey(to_bytes(windowed)))[-1]


@pytest.mark.parametrize("bits", range(8, 17))
def test_every_bit_depth_from_8_to_16_shows_the_same_image(bits):
    eight = np.array([0, 20, 60, 100, 140, 200, 240, 255])
    top = (1 << bits) - 1
    stored = blocks(np.rint(eight * top / 255), np.uint8 if bits == 8 else np.uint16)
    out = block_values(grey(to_bytes(make_ds(stored, bits_stored=bits))))
    assert np.abs(np.array(out) - eight).max() <= 1


def test_signed_pixels():
    values = np.array([-2000, -1000, -500, 0, 250, 500, 1000, 2047], dtype=np.int16)
    out = block_values(grey(to_bytes(make_ds(blocks(values, np.int16), bits_stored=12))))
    assert out == [round((v + 2000) * 255 / 4047) for v in values.tolist()]


# --- transfer syntaxes --------------------------------------------------------------------


SYNTAXES = [
    (ExplicitVRLittleEndian, 12, True), (ImplicitVRLittleEndian, 12, True),
    (ExplicitVRBigEndian, 16, True), (DeflatedExplicitVRLittleEndian, 10, True),
    (RLELossless, 12, True), (RLELossless, 8, True),
    (JPEGBaseline8Bit, 8, False), (JPEGExtended12Bit, 12, False), (JPEGExtended12Bit, 8, False),
    (JPEGLossless, 16, True), (JPEGLosslessSV1, 12, True), (JPEGLSLossless, 12, True),
    (JPEGLSNearLossless, 12, False), (JPEG2000Lossless, 16, True), (JPEG2000, 12, False),
]


@pytest.mark.parametrize("syntax,bits,lossless", SYNTAXES,
                         ids=[f"{s.name[:40]}-{b}bit" for s, b, _ in SYNTAXES])
def test_every_transfer_syntax_decodes_like_the_uncompressed_file(tmp_path, syntax, bits,
                                                                   lossless):
    stored = texture(bits)
    path = save(make_ds(stored, syntax, bits_stored=bits), tmp_path / "x.dcm")
    import pydicom

    written = pydicom.dcmread(path)
    assert written.file_meta.TransferSyntaxUID == syntax
    if syntax.is_encapsulated:
        frame = next(generate_frames(written.PixelData, number_of_frames=1))
        assert len(frame) < stored.nbytes or not lossless or syntax == RLELossless
    reference = grey(to_bytes(make_ds(stored, bits_stored=bits)))
    out = grey(path)
    if lossless:
        np.testing.assert_array_equal(out, reference)
    else:
        assert np.abs(out.astype(int) - reference).mean() < 2.0


def test_missing_decoders_name_the_package_to_install(tmp_path):
    """With no GDCM (nor pylibjpeg) importable, the JPEG family is refused with a pip line."""
    lossless = save(make_ds(texture(12), JPEGLosslessSV1, bits_stored=12), tmp_path / "a.dcm")
    save(_with_syntax(make_ds(texture(12), bits_stored=12), "1.2.840.10008.1.2.4.201",
                      b"\xff\x4f\xff\x51" + bytes(64)), tmp_path / "b.dcm")  # HTJ2K
    code = (
        "import sys\n"
        "for name in ('gdcm', 'pylibjpeg', 'libjpeg', 'openjpeg', 'rle', 'jpeg_ls'):\n"
        "    sys.modules[name] = None\n"
        "from trainer.imaging.decode import decode_image\nfrom db.exceptions import BadImageError\n"
        "for path in sys.argv[1:]:\n"
        "    try: decode_image(path, 64, 10**6); print('decoded')\n"
        "    except BadImageError as e: print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(lossless), str(tmp_path / "b.dcm")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first.startswith("no decoder installed for DICOM JPEG Lossless, Non-Hierarchical")
    assert first.endswith(": pip install python-gdcm or pip install pylibjpeg pylibjpeg-libjpeg")
    assert second.startswith("no decoder installed for DICOM High-Throughput JPEG 2000")
    assert "pip install pylibjpeg pylibjpeg-openjpeg" in second


def _with_syntax(ds: Dataset, syntax: str, codestream: bytes) -> Dataset:
    """``ds`` claiming ``syntax``, with a made-up encapsulated frame (nothing decodes it)."""
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    return ds


def test_a_syntax_nothing_decodes_and_an_unknown_one():
    ds = _with_syntax(make_ds(texture(8)), "1.2.840.10008.1.2.4.100", bytes(64))  # MPEG2
    assert str(rejection(to_bytes(ds))) == (
        "unsupported DICOM transfer syntax MPEG2 Main Profile / Main Level"
        " (no decoder exists for it)")
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True, enforce_file_format=True)
    assert str(rejection(buf.getvalue())) == "unknown DICOM transfer syntax 1.2.3.4.5"


# --- rejections ---------------------------------------------------------------------------


@pytest.mark.parametrize("attrs,reason", [
    ({"Modality": "CT"}, "DICOM modality CT is not a radiograph (only CR, DX, RG)"),
    ({"BodyPartExamined": "HAND"}, "DICOM body part HAND is not the chest (BodyPartExamined)"),
    ({"BodyPartExamined": "Zzyzx^Q"},
     "DICOM body part (a value outside the DICOM vocabulary, not shown) is not the chest "
     "(BodyPartExamined)"),
    ({"ViewPosition": "LL"}, "lateral view (ViewPosition LL): the models read frontal (PA or AP)"
                             " chest radiographs only"),
    ({"ViewPosition": "RL"}, "lateral view (ViewPosition RL): the models read frontal (PA or AP)"
                             " chest radiographs only"),
    ({"ViewPosition": "LAT"}, "lateral view (ViewPosition LAT): the models read frontal (PA or"
                              " AP) chest radiographs only"),
    ({"NumberOfFrames": 2}, "multi-frame DICOM (2 frames): send single-frame images"),
    ({"PhotometricInterpretation": "PALETTE COLOR"},
     "colour DICOM (PALETTE COLOR): chest radiographs are greyscale (MONOCHROME1 or "
     "MONOCHROME2)"),
    ({"BitsStored": 6, "HighBit": 5}, "unsupported DICOM bit depth (6 bits stored in 8): "
                                      "8 to 16 bits stored are read"),
])
def test_what_the_header_says_is_refused_with_the_identifiers_kept(attrs, reason):
    error = rejection(to_bytes(make_ds(texture(8), **attrs)))
    assert str(error) == reason
    assert error.identifiers.sop_instance_uid == UIDS["SOPInstanceUID"]
    assert error.identifiers.accession_number == "ACC-0042"


def test_colour_pixels_are_refused():
    ds = make_ds(texture(8))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.repeat(texture(8)[..., None], 3, axis=2).tobytes()
    assert str(rejection(to_bytes(ds))).startswith("colour DICOM (RGB)")


@pytest.mark.parametrize("attrs", [
    {"BodyPartExamined": "THORAX"}, {"BodyPartExamined": "Chest PA"}, {"BodyPartExamined": None},
    {"Modality": "DX"}, {"Modality": "RG"}, {"Modality": None}, {"ViewPosition": "AP"},
    {"ViewPosition": None},
])
def test_frontal_chest_radiographs_are_taken(attrs):
    grey(to_bytes(make_ds(texture(8), **attrs)))


def test_no_pixel_data():
    ds = make_ds(texture(8))
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    assert str(rejection(to_bytes(ds))).startswith("DICOM file without pixel data")
    ds = make_ds(texture(8))
    del ds.PixelData
    assert str(rejection(to_bytes(ds))).startswith("truncated DICOM (the image header is there")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEGLSLossless])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9, 0.99])
def test_truncated_files_are_rejected_not_padded(syntax, keep):
    data = to_bytes(make_ds(texture(12), syntax, bits_stored=12))
    reason = str(rejection(data[: int(len(data) * keep)]))
    assert "truncated DICOM" in reason or "DICOM file without pixel data" in reason, reason


def test_a_truncated_uncompressed_frame_says_so():
    data = to_bytes(make_ds(texture(12), bits_stored=12))
    assert str(rejection(data[:-100])) == "truncated DICOM (the pixel data ends early)"


def test_corrupt_compressed_pixel_data():
    ds = make_ds(texture(12), JPEGLSLossless, bits_stored=12)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(range(256)) * 2])
    assert str(rejection(to_bytes(ds))) == (
        "corrupt or truncated DICOM pixel data (JPEG-LS Lossless Image Compression cannot be "
        "decoded)")


def test_the_pixel_limit_is_checked_before_any_pixel_is_decoded():
    data = to_bytes(make_ds(texture(12), bits_stored=12))
    error = rejection(data[: len(data) - 2000], max_pixels=1000)  # too short to decode
    assert str(error) == ("image too large: 64x64 pixels exceeds the limit of 1,000"
                          " (possible decompression bomb)")
    assert error.identifiers.study_instance_uid == UIDS["StudyInstanceUID"]
    small = to_bytes(make_ds(np.zeros((16, 16), np.uint8)))
    assert str(rejection(small)) == "image too small: 16x16 pixels (minimum 32x32)"


def test_file_size_and_inflated_size_are_bounded(monkeypatch):
    monkeypatch.setattr(dicom, "HEADER_BYTES", 0)
    big = to_bytes(make_ds(texture(12), bits_stored=12))
    assert len(big) > 2 * 64 * 64
    assert str(rejection(big, max_pixels=64 * 64)) == (
        f"DICOM file too large: {len(big) / 2**20:.1f} MiB exceeds the limit of 0.0 MiB"
        " for 4,096 pixels")
    bomb = make_ds(np.zeros((64, 64), np.uint8), DeflatedExplicitVRLittleEndian)
    bomb.add_new(0x00091010, "OB", bytes(4 << 20))  # a private element of zeros
    data = to_bytes(bomb)
    assert len(data) < 2 * 64 * 64
    assert str(rejection(data, max_pixels=64 * 64)) == (
        "DICOM data set inflates beyond the limit of 0.0 MiB for 4,096 pixels"
        " (possible decompression bomb)")
    monkeypatch.undo()
    grey(data)


def test_raw_data_set_with_compressed_pixels_names_the_problem():
    ds = make_ds(texture(12), RLELossless, bits_stored=12)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    assert str(rejection(fp.getvalue())).startswith(
        "DICOM data set without file meta and with compressed pixel data")


# --- identifiers and patient data ---------------------------------------------------------


def test_the_identifiers_come_back_beside_the_pixels_and_nothing_else(tmp_path):
    path = save(make_ds(RAMP12, JPEGLSLossless, bits_stored=12, ViewPosition="AP",
                        Modality="DX"), tmp_path / "x.dcm")
    decoded = decode_file(path, SIZE, LIMIT)
    assert decoded.identifiers == DicomIdentifiers(
        study_instance_uid=UIDS["StudyInstanceUID"], series_instance_uid=UIDS["SeriesInstanceUID"],
        sop_instance_uid=UIDS["SOPInstanceUID"], accession_number="ACC-0042", modality="DX",
        view_position="AP")
    with open(path, "rb") as fp:
        dataset = dicom.read_dicom(fp, LIMIT).dataset
    assert {"PatientName", "PatientID", "PatientBirthDate"}.isdisjoint(dataset.dir())
    assert PATIENT_NAME not in repr(decoded.identifiers)


def test_unusable_identifier_values_are_dropped_not_stored():
    found = DicomIdentifiers.from_header({
        "StudyInstanceUID": "1.2.abc", "SeriesInstanceUID": "1." + "2" * 70,
        "SOPInstanceUID": " 1.2.3\x00", "AccessionNumber": "A\x01B", "Modality": ["DX", "CR"],
        "ViewPosition": "",
    })
    assert found == DicomIdentifiers(sop_instance_uid="1.2.3", modality="DX")
    assert list(DICOM_KEYWORDS) == list(found.columns())


def test_decode_many_returns_identifiers_for_dicom_only(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(texture(8)).save(png)
    dcm = save(make_ds(texture(8), WindowCenter=128, WindowWidth=256), tmp_path / "b.dcm")
    lateral = save(make_ds(texture(8), ViewPosition="LL"), tmp_path / "c.dcm")
    first, second, third = decode_many([png, dcm, lateral], SIZE, LIMIT, threads=3)
    assert isinstance(first, Decoded) and first.identifiers is None
    assert isinstance(second, Decoded) and second.identifiers.accession_number == "ACC-0042"
    assert isinstance(third, BadImageError) and third.identifiers.view_position == "LL"
    np.testing.assert_array_equal(first.pixels, second.pixels)


# --- the same drawing as DICOM and as PNG or JPEG ----------------------------------------


def test_a_dicom_and_a_png_or_jpeg_of_the_same_drawing_get_the_same_answer(tmp_path):
    """Every way ``cxr synth --format dicom`` stores an image, against its PNG and JPEG export,
    through the tiny cascade (brightness models at 32 px; biases put the drawings on both
    sides of both thresholds)."""
    from helpers_models import make_tiny_bundle

    from trainer.model.bundle import load_bundle
    from trainer.synth.dicom_writer import VARIANTS, synthetic_dataset, write_dicom
    from trainer.synth.xrays import render_xray
    from worker.classify.inference import StageModel, classify_arrays

    stages = [StageModel(i, 1, load_bundle(make_tiny_bundle(tmp_path / "models", stage, 1,
                                                              bias=bias)))
              for i, (stage, bias) in enumerate((("pneumonia", 1.5), ("infection", 2.0)), 1)]
    pixels = {"dicom": [], "png": [], "jpeg": []}
    for i, variant in enumerate(VARIANTS):
        drawing = render_xray(np.random.default_rng([5, i]), "BACTERIA", 80, 72)
        Image.fromarray(drawing).save(tmp_path / f"{i}.png")
        Image.fromarray(drawing).save(tmp_path / f"{i}.jpeg", quality=90)
        ds = synthetic_dataset(drawing, variant, patient="p", accession="A1", seed=0, index=i)
        write_dicom(ds, tmp_path / f"{i}.dicom")
        for fmt in pixels:
            pixels[fmt].append(decode_file(tmp_path / f"{i}.{fmt}", 32, LIMIT).pixels)
        lossy = variant.transfer_syntax in (JPEGBaseline8Bit, JPEGExtended12Bit)
        difference = np.abs(pixels["dicom"][-1].astype(int) - pixels["png"][-1])
        assert difference.mean() < 1.0 if lossy else difference.max() == 0, variant
    results = {fmt: classify_arrays(np.stack(batch), *stages) for fmt, batch in pixels.items()}
    labels = {fmt: [r.label for r in found] for fmt, found in results.items()}
    assert labels["dicom"] == labels["png"] == labels["jpeg"]
    assert len(set(labels["dicom"])) >= 2, labels
    for other in ("png", "jpeg"):
        for a, b in zip(results["dicom"], results[other], strict=True):
            assert abs(a.p_pneumonia - b.p_pneumonia) < 0.01
            assert (a.p_virus is None) == (b.p_virus is None)
