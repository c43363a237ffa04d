#!/usr/bin/env bash
# The Slurm backend's tests start a real one-node Slurm (slurmctld, slurmd, munged) from Debian's packages.
# Install them if missing; quick when they are there. Where this cannot install them, the tests skip with the reason.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
echo "Installing Debian's slurm-wlm and munge for the Slurm backend tests..."
$SUDO apt-get update -qq || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    slurm-wlm slurm-client munge >/dev/null || echo "slurm-wlm could not be installed; the Slurm tests will skip"
