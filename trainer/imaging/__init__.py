"""Bytes to pixels: one decoder (JPEG, PNG, DICOM) for training and serving, and the one SHA-256."""
