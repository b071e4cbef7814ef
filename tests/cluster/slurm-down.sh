#!/usr/bin/env bash
# Stop the one-node cluster slurm-up.sh started (its state stays in /tmp/resvae-slurm).
pkill -x slurmd || true
pkill -x slurmctld || true
pkill -x munged || true
