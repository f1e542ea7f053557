#!/usr/bin/env bash
# One command for the test suite on a fresh machine: installs what the tests need
# (Python packages; Debian's chromium for the browser test, when run as root), then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k api`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the browser test..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: /usr/bin/chromium is missing and this is not root; the browser test will be skipped" >&2
  fi
fi

# Orthanc with its DICOMweb plugin, for the DICOMweb round trip (tests/test_dicomweb.py starts its own on free
# ports; the system service is not started).
if ! command -v Orthanc >/dev/null || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's orthanc and orthanc-dicomweb for the DICOMweb test..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null
  else
    echo "note: Orthanc or its DICOMweb plugin is missing and this is not root; the DICOMweb round trip will be skipped" >&2
  fi
fi

# dcmtk's dsrdump: an independent reader of the DICOM SR (tests/test_report.py).
if ! command -v dsrdump >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's dcmtk for the DICOM SR check..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk >/dev/null
  else
    echo "note: dcmtk's dsrdump is missing and this is not root; the SR structure check will be skipped" >&2
  fi
fi

# Lint and format first: cheap, and a failure here is a real one.
"$PY" -m ruff check .
"$PY" -m ruff format --check .

# pytest exits 5 when it collects no test: with `set -e` that fails this script, as it should.
exec "$PY" -m pytest -q "$@"
