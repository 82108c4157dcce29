"""GDCM glue for what pydicom's own GDCM plugins leave out.

* Decoding 12-bit JPEG Extended (Process 4): pydicom's GDCM decoder declines it and its Pillow
  decoder cannot read it, yet GDCM decodes it correctly and older CR archives hold it.
  ``register_decoders`` adds the function below as a pydicom decoder plugin.
* Encoding one frame to JPEG extended or lossless, JPEG-LS or JPEG 2000: the synthetic DICOM
  data set and the tests write every syntax the decoder must read, and pydicom encodes only
  RLE, JPEG-LS and JPEG 2000 (each through another package). GDCM fails on the JPEG processes
  with an odd number of 8-bit pixels; the baseline frames come from Pillow instead.

Plugin modules must name ``DECODER_DEPENDENCIES`` and ``is_available`` (pydicom's contract).
"""

from __future__ import annotations

import threading

import numpy as np

PLUGIN_LABEL = "cxr-gdcm"
_JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
DECODER_DEPENDENCIES = {_JPEG_EXTENDED: ("gdcm>=3.0.10",)}
_lock = threading.Lock()
_registered = False


def is_available(uid: str) -> bool:
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return uid in DECODER_DEPENDENCIES


def register_decoders() -> None:
    """Add the 12-bit JPEG Extended decoder to pydicom, once per process (thread-safe)."""
    global _registered
    with _lock:
        if _registered:
            return
        from pydicom.pixels.decoders import JPEGExtended12BitDecoder

        JPEGExtended12BitDecoder.add_plugin(PLUGIN_LABEL, (__name__, "decode_frame"))
        _registered = True


def decode_frame(src: bytes, runner) -> bytes:  # noqa: ANN001 (pydicom's DecodeRunner)
    """One JPEG Extended frame to native little-endian bytes (pydicom's plugin signature)."""
    import gdcm

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(
        gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
    bits = runner.bits_stored
    image.SetPixelFormat(gdcm.PixelFormat(runner.samples_per_pixel, runner.bits_allocated,
                                          bits, bits - 1, runner.pixel_representation))
    frame = image.GetBuffer().encode("utf-8", "surrogateescape")  # GDCM hands back a str
    expected = runner.rows * runner.columns * runner.samples_per_pixel * runner.bits_allocated // 8
    if len(frame) != expected:
        raise ValueError(f"GDCM returned {len(frame)} bytes, expected {expected}")
    return frame


def encode_frame(pixels: np.ndarray, bits_stored: int, transfer_syntax: str,
                 photometric: str = "MONOCHROME2") -> bytes:
    """Encode one greyscale frame (uint8 or uint16) to ``transfer_syntax``; the codestream.

    The image comes from ``ImageWriter.GetImage()`` because GDCM aborts the process when a
    Python-owned ``gdcm.Image`` is handed to a filter.
    """
    import gdcm

    rows, columns = pixels.shape
    allocated = pixels.dtype.itemsize * 8
    writer = gdcm.ImageWriter()
    image = writer.GetImage()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((columns, rows, 1))
    image.SetPixelFormat(gdcm.PixelFormat(1, allocated, bits_stored, bits_stored - 1, 0))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(
        gdcm.PhotometricInterpretation.GetPIType(photometric)))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ExplicitVRLittleEndian))
    raw = np.ascontiguousarray(pixels, pixels.dtype.newbyteorder("<")).tobytes()
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetByteStringValue(raw + b"\x00" * (len(raw) % 2))  # DICOM values are even-length
    image.SetDataElement(element)
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(transfer_syntax)))
    change.SetInput(image)
    if not change.Change():  # e.g. the JPEG processes on an odd number of 8-bit pixels
        raise ValueError(f"GDCM cannot encode {rows}x{columns} {bits_stored}-bit pixels as "
                         f"{transfer_syntax}")
    fragments = change.GetOutput().GetDataElement().GetSequenceOfFragments()
    if fragments is None or fragments.GetNumberOfFragments() < 1:
        raise ValueError(f"GDCM produced no {transfer_syntax} codestream")
    return b"".join(
        fragments.GetFragment(i).GetByteValue().GetBuffer().encode("utf-8", "surrogateescape")
        for i in range(fragments.GetNumberOfFragments())
    )
