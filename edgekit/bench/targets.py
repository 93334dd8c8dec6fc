"""Target profiles (threads, context, memory budget), from targets.yaml."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from edgekit.errors import EdgekitError, did_you_mean

PROFILES = yaml.safe_load((Path(__file__).with_name("targets.yaml")).read_text())


def target(name: str) -> dict:
    if name not in PROFILES:
        raise EdgekitError(f"unknown target '{name}'{did_you_mean(name, list(PROFILES))}", f"known targets: {', '.join(PROFILES)}")
    prof = dict(PROFILES[name])
    cores = os.cpu_count() or 1
    prof["threads"] = min(prof.get("threads") or cores, cores)  # never oversubscribe this machine
    prof["name"] = name
    return prof
