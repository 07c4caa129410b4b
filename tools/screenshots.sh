#!/usr/bin/env bash
# Take the README pictures: the real QGIS desktop under Xvfb, the plugin installed from the zip
# into a temporary profile, the Tessera panel open and a real run's result on the map.
# Usage: tools/screenshots.sh RASTER MODEL   (writes docs/qgis_tessera_panel.png, _map.png)
set -euo pipefail
cd "$(dirname "$0")/.."
RASTER=$(realpath "${1:-resources/sample/dubai_sample.tif}")
MODEL=$(realpath "${2:?model file}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
zip=$(/usr/bin/python3 tools/package.py --out "$work/dist")
prof="$work/profiles/default"
mkdir -p "$prof/python/plugins" "$prof/tessera" "$work/out"
(cd "$prof/python/plugins" && /usr/bin/python3 -m zipfile -e "$zip" .)
ln -s "$PWD/.venv" "$prof/tessera/venv"
env -u PYTHONPATH -u GDAL_DATA -u PROJ_DATA -u PROJ_LIB QGIS_CUSTOM_CONFIG_PATH="$work" \
  QT_QPA_PLATFORM=offscreen /usr/bin/qgis_process.bin plugins enable tessera >/dev/null
env -u PYTHONPATH -u GDAL_DATA -u PROJ_DATA -u PROJ_LIB -u QT_QPA_PLATFORM \
  TESSERA_SHOT_RASTER="$RASTER" TESSERA_SHOT_MODEL="$MODEL" TESSERA_SHOT_OUT="$work/out" \
  timeout 300 xvfb-run -a -s "-screen 0 1366x768x24" \
  /usr/bin/qgis --profiles-path "$work" --nologo --noversioncheck --code "$PWD/tools/screenshot.py" \
  >"$work/qgis.log" 2>&1 || true
cat "$work/out/screenshot.log" 2>/dev/null || { tail -30 "$work/qgis.log"; exit 1; }
mkdir -p docs
cp "$work/out/qgis_tessera_panel.png" "$work/out/qgis_tessera_map.png" docs/
echo "wrote docs/qgis_tessera_panel.png docs/qgis_tessera_map.png"
