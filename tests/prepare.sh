#!/bin/sh
# Builds what test_all reads: the synthetic tiny checkpoints in Hugging Face
# layout (export.py synth, deterministic from seed 0), exported to fp32 and
# int8 model files. Run by `make test`; regenerated every time so that the
# test always exercises the current export.py.
set -e
PY=${PYTHON:-python3}
mkdir -p build/synth build/models
for preset in tiny-3.2 tiny-3.0; do
    $PY export.py synth build/synth/$preset --preset $preset --seed 0 >/dev/null
    $PY export.py model build/synth/$preset build/models/$preset.f32.bin >/dev/null
    $PY export.py model build/synth/$preset build/models/$preset.q8.bin --int8 >/dev/null
done
echo "prepared synthetic checkpoints: $(ls build/models | tr '\n' ' ')"
