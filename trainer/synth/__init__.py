"""Synthetic JPEG and DICOM chest X-rays: the demo's and the tests' data."""
