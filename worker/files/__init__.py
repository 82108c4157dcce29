"""One owner of file layout (archive, rejected/, heatmaps/) and of safe access to untrusted
folders."""
