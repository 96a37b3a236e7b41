#!/usr/bin/env bash
# Reproduces every table and picture of the Gaussian study in the README (≈15 min on 2 cores, ≈25 more for the listing settings).
# Usage: bash docs/gaussian/reproduce.sh   (after `make install`)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=docs/gaussian
study() { local name=$1; shift; $PY -m l2vsd_core.toys.gaussian "$@" --json "$OUT/$name.json" > "$OUT/$name.md"; }
study fig1 --variant fig1 --seeds 10 --plot "$OUT/fig1.png" &
study fig13 --variant fig13 --seeds 10 --plot "$OUT/fig13.png"
wait
study fig14 --variant fig14 --seeds 10 --plot "$OUT/fig14.png" &
for eta in 0.01 0.1 0.25 1.0; do
  study "eta_$eta" --variant fig1 --seeds 10 --methods real-vsd,l2vsd,l2vsd_last --eta "$eta"
done
wait
for eta in 0.05 0.2; do
  study "fig14_eta_$eta" --variant fig14 --seeds 10 --methods real-vsd,l-vsd,l2vsd --eta "$eta"
done
# Appendix F's listing settings (--setup listing: its noise model, N_render = 4 with a cumulative product, real-vsd's
# r trained after q's step), its η sweep, and the optimizer lookahead in both setups (the baselines real-vsd and l-vsd
# of each sweep are those of fig1.json and listing.json: they do not depend on η or the lookahead)
study listing --setup listing --seeds 10 --plot "$OUT/listing.png"
for eta in 0.01 0.1 0.25 1.0; do
  study "listing_eta_$eta" --setup listing --seeds 10 --methods l2vsd --eta "$eta"
done
for setup in engine listing; do
  for eta in 1 10; do
    study "${setup}_optimizer_eta_$eta" --setup "$setup" --seeds 10 --methods l2vsd --lookahead optimizer --eta "$eta"
  done
done
