#!/bin/sh
# The image's entrypoint. The first argument picks the command: `serve` (the default: the API and
# its GPU workers, or an API node with --no-workers), `worker` (GPU workers alone) or `predict`;
# anything else is handed to `flux-fill serve`, so `docker run IMAGE --help` and
# `docker run IMAGE --weights /models/...` work as they always did.
set -e
case "$1" in
    serve|worker|predict) exec flux-fill "$@" ;;
    *) exec flux-fill serve "$@" ;;
esac
