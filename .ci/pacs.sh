#!/bin/sh
# Make sure dcmtk (storescu, echoscu) and the Orthanc PACS are installed for the DICOM network
# tests (tests/test_dicom_network.py). Installs Debian/Ubuntu's packages when apt-get is there
# and we are root; otherwise says how. Orthanc's own service is not started: tests run a
# private one on free ports.
set -u
have_pacs() { command -v Orthanc >/dev/null 2>&1 && command -v storescu >/dev/null 2>&1; }

if ! have_pacs && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Orthanc and dcmtk (apt-get install orthanc dcmtk) for the DICOM tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends orthanc dcmtk >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1
    apt-get install -y -q --no-install-recommends orthanc dcmtk >/dev/null 2>&1
  }
fi
if have_pacs; then
  echo "Orthanc and dcmtk are installed"
else
  echo "WARNING: no Orthanc or dcmtk: the DICOM network tests will fail." >&2
  echo "Install them (Debian/Ubuntu: apt-get install orthanc dcmtk) and run make test again." >&2
fi
