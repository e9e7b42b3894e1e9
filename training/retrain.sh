#!/bin/sh
# Train the MNIST preset, evaluate it, and publish it as the next version of the model (dcgan-export
# measures it again and refuses, exit 1, a version worse than the one published: see the README).
# Resumes an interrupted run (same run directory). Used by the `trainer` compose service.
set -eu
DATA=${DATA:-/data/mnist}
RUN=${RUN:-/runs/mnist}
REPOSITORY=${REPOSITORY:-/models}
NAME=${NAME:-mnist-dcgan}
dcgan-train --preset mnist --data-dir "$DATA" --run-dir "$RUN" --no-progress "$@"
dcgan-eval "$RUN" --data-dir "$DATA" --json "$RUN/eval.json"
dcgan-export "$RUN" --repository "$REPOSITORY" --name "$NAME" --data-dir "$DATA"
