#!/usr/bin/env bash
# Export $SDRT_CHECKPOINT to $SDRT_ENGINE_DIR unless it exists, build its TensorRT engines for this GPU (a no-op
# when they are up to date), then run `sdrt "$@"`.
set -euo pipefail
if [ ! -f "$SDRT_ENGINE_DIR/manifest.json" ]; then
  sdrt export --checkpoint "$SDRT_CHECKPOINT" --out "$SDRT_ENGINE_DIR" --precision fp32 fp16
fi
# shellcheck disable=SC2086
sdrt build "$SDRT_ENGINE_DIR" $SDRT_BUILD_ARGS
exec sdrt "$@"
