"""Tuning beside a frozen backbone (methods only, no Lightning): small trained modules that
read a frozen tower without ever back-propagating through its token stream.

* :mod:`vleff.side.vqt`: Visual Query Tuning (per-layer query tokens that read each block's
  frozen keys/values and are collected into the head).
* :mod:`vleff.side.memvp`: MemVP (visual features as extra key/value rows of a language model's
  FFNs, on BLIP and :class:`vleff.models.VisionLanguageModel` hosts).
"""
from __future__ import annotations

from vleff.side.memvp import MemVPConfig, apply_memvp, memvp_applied, remove_memvp, set_memvp_memory
from vleff.side.vqt import VQTConfig, apply_vqt, freeze_backbone_for_vqt, remove_vqt, vqt_applied, vqt_parameters

__all__ = ["MemVPConfig", "VQTConfig", "apply_memvp", "apply_vqt", "freeze_backbone_for_vqt", "memvp_applied",
           "remove_memvp", "remove_vqt", "set_memvp_memory", "vqt_applied", "vqt_parameters"]
