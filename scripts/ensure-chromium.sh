#!/usr/bin/env bash
# Make sure Debian's Chromium is installed for the browser tests (Playwright drives it with
# executable_path; `playwright install` is never used: it downloads a browser). Also
# installs poppler-utils (pdftotext, pdftoppm), used to read report PDFs back.
set -euo pipefail

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v pdftotext >/dev/null || missing+=(poppler-utils)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "Missing ${missing[*]} and this is not root: install them with apt-get" >&2
  exit 1
fi
echo "Installing ${missing[*]} (Debian packages) for the browser tests" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v chromium >/dev/null && command -v pdftotext >/dev/null
