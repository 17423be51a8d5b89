#!/usr/bin/env bash
# Check that the declared version floors are true: install every package prefalign declares (its dependencies
# and the extras the tests use, [demos]) at exactly its lower bound into .venv-floors, then run the quick
# subset of tests that exercises what set each floor. CI runs it after the main suite (.ci/run).
#   bash scripts/floors.sh                 # build .venv-floors (once) and run the subset
#   bash scripts/floors.sh tests/x.py ...  # other tests on the floors
# torch is not re-installed: .venv's torch is linked in (a CPU torch 2.3 wheel is not on PyPI; the torch floor
# is the one package not checked here).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/bootstrap.sh
VENV=${FLOORS_VENV:-.venv-floors}
PINS="$VENV/floors.txt"
if [ ! -x "$VENV/bin/python" ]; then
  .venv/bin/python -m venv "$VENV"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
main=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for path in "$main"/torch "$main"/torch-*.dist-info "$main"/torchgen "$main"/functorch; do
  [ -e "$site/$(basename "$path")" ] || ln -s "$(cd "$(dirname "$path")" && pwd)/$(basename "$path")" "$site/"
done
.venv/bin/python scripts/floor_pins.py demos >"$PINS.new"
if ! cmp -s "$PINS.new" "$PINS"; then  # (re)install only when the floors changed
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r "$PINS.new" "pytest>=8" "hypothesis>=6.100"
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
  mv "$PINS.new" "$PINS"
fi
rm -f "$PINS.new"
"$VENV/bin/pip" check
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  tests=(tests/test_packaging.py tests/test_data.py tests/test_inputs_data.py tests/test_data_arrow.py
    tests/test_hub.py tests/test_runner.py tests/test_diffusion_sd.py)
fi
PREFALIGN_QUICK=1 "$VENV/bin/python" -m pytest -q -x -p no:cacheprovider "${tests[@]}"
