# Shared by the scripts/results_*.sh scripts (sourced): the CLI, where results go, the step budget
# and how many eval rows score each run; each can be overridden from the environment.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T=.venv/bin/tunelab
OUT=${OUT:-results}
STEPS=${STEPS:-60}
EVAL=${EVAL:-100}
mkdir -p "$OUT"
