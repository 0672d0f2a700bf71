"""Tuning beside a frozen backbone (methods only, no Lightning): small trained modules that
read a frozen tower without ever back-propagating through its token stream.

* :mod:`vleff.side.vqt`: Visual Query Tuning (per-layer query tokens that read each block's
  frozen keys/values and are collected into the head).
"""
from __future__ import annotations

from vleff.side.vqt import VQTConfig, apply_vqt, freeze_backbone_for_vqt, remove_vqt, vqt_applied, vqt_parameters

__all__ = ["VQTConfig", "apply_vqt", "freeze_backbone_for_vqt", "remove_vqt", "vqt_applied", "vqt_parameters"]
